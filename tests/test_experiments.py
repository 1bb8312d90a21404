"""Near-duplicate groups, grouped folds, cross-validation with a fold ensemble, and sweeps."""

import json
import os
import shutil
import signal
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from brainseg_lib.config import ParamsError, load_params
from brainseg_lib.data.arrays import SplitArrays, load_dataset
from brainseg_lib.data.duplicates import duplicate_groups
from brainseg_lib.data.splits import dev_keys, fold_indices, fold_split, make_folds
from brainseg_lib.data.synthetic import write_synthetic_coco
from brainseg_lib.evaluation.predictions import predict_split
from brainseg_lib.experiments import cv as cv_module
from brainseg_lib.experiments.launcher import Child, TrainJob, run_children
from brainseg_lib.experiments.sweep import run_sweep
from brainseg_lib.inference.predictor import LoadedModel, load_model, predict_logits
from brainseg_lib.metrics.functional import ConfusionCounts, per_image_dice, pooled_iou
from brainseg_lib.rundir import RunDir
from conftest import ROOT

PLANTED = 3  # train images copied into test under new names: leaks by construction


@pytest.fixture(scope="module")
def leaky_root(tmp_path_factory):
    root = write_synthetic_coco(tmp_path_factory.mktemp("leaky"), (24, 9, 8), 64, seed=5)
    train = json.loads((root / "train" / "_annotations.coco.json").read_text())
    test_file = root / "test" / "_annotations.coco.json"
    test = json.loads(test_file.read_text())
    next_img = max(i["id"] for i in test["images"]) + 1
    next_ann = max(a["id"] for a in test["annotations"]) + 1
    for img in train["images"][:PLANTED]:
        name = "leak_" + img["file_name"]
        shutil.copy(root / "train" / img["file_name"], root / "test" / name)
        test["images"].append(img | {"id": next_img, "file_name": name})
        for ann in train["annotations"]:
            if ann["image_id"] == img["id"]:
                test["annotations"].append(ann | {"id": next_ann, "image_id": next_img})
                next_ann += 1
        next_img += 1
    test_file.write_text(json.dumps(test))
    return root


def test_clusters_find_the_planted_leaks_and_only_them(leaky_root, tmp_path):
    arrays = load_dataset(leaky_root, 64, tmp_path)
    groups = duplicate_groups(arrays, 4, "leaky", tmp_path)
    leaks = {f for f in arrays["test"].files if f.startswith("leak_")}
    assert set(arrays["test"].files) - set(groups["clean_test"]) == leaks
    assert groups["n_test"] == 8 + PLANTED and groups["clusters_across_splits"] >= PLANTED
    again = duplicate_groups(arrays, 4, "leaky", tmp_path)  # from the JSON cache
    assert again["clusters"] == groups["clusters"]


def test_folds_never_split_a_cluster_and_cover_every_image_once(leaky_root, tmp_path):
    arrays = load_dataset(leaky_root, 64, tmp_path)
    groups = duplicate_groups(arrays, 4, "leaky", tmp_path)
    # plant a cluster inside the development data too: the same label for 3 images
    keys = dev_keys(arrays)
    groups["clusters"] |= {k: 10_000 for k in keys[:3]}
    folds = make_folds(groups, 3, seed=1)
    where = {k: i for i, f in enumerate(folds["folds"]) for k in f}
    assert sorted(where) == sorted(keys)
    assert len({where[k] for k in keys[:3]}) == 1
    assert max(map(len, folds["folds"])) - min(map(len, folds["folds"])) <= 3
    path = tmp_path / "folds.json"
    path.write_text(json.dumps(folds))
    split = fold_split(arrays, path, 1)
    assert len(split["valid"]) == len(folds["folds"][1])
    assert len(split["train"]) + len(split["valid"]) == len(keys)
    folds["folds"][0] = folds["folds"][0][1:]  # a hand edit that drops an image
    path.write_text(json.dumps(folds))
    with pytest.raises(ValueError, match="1 missing"):
        fold_split(arrays, path, 0)


def test_cv_trains_folds_resumes_and_scores_oof_and_ensemble(leaky_root, tmp_path,
                                                             monkeypatch):
    params_file = tmp_path / "cv.yaml"
    params_file.write_text(yaml.safe_dump(
        yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text()) | {
            "synthetic": False, "data_dir": str(leaky_root), "epochs": 1, "batch_size": 8,
            "bootstrap": 20, "runs_dir": str(tmp_path / "runs"),
            "cache_dir": str(tmp_path / "cache"), "eval_original_size": False,
            "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}))
    overrides = {"run_id": "cv"}
    # interrupted: only fold 0 trained
    real_run_jobs = cv_module.run_jobs
    monkeypatch.setattr(cv_module, "run_jobs",
                        lambda jobs, parallel, log_dir: real_run_jobs(jobs[:1], 1, log_dir))
    with pytest.raises(RuntimeError, match="fold1, fold2 not finished"):
        cv_module.run_cv(params_file, 3, overrides, verbose=False)
    fold0_mtime = (tmp_path / "runs" / "cv" / "fold0" / "best.pt").stat().st_mtime
    monkeypatch.setattr(cv_module, "run_jobs", real_run_jobs)
    result = cv_module.run_cv(params_file, 3, overrides, verbose=False)
    cv_dir = tmp_path / "runs" / "cv"
    assert (cv_dir / "fold0" / "best.pt").stat().st_mtime == fold0_mtime  # not retrained
    assert all((cv_dir / f"fold{i}" / "train.json").exists() for i in range(3))
    _assert_folds_tracked_under_the_cv_run(tmp_path / "mlflow.db", cv_dir, result)
    # every development image is held out by exactly one fold, whose model trained on the
    # rest only
    arrays = load_dataset(leaky_root, 64, tmp_path / "cache")
    keys = dev_keys(arrays)
    folds = json.loads((cv_dir / "folds.json").read_text())["folds"]
    assert sorted(k for fold in folds for k in fold) == sorted(keys)
    for i, fold in enumerate(folds):
        seen = json.loads((cv_dir / f"fold{i}" / "env.json").read_text())["dataset"]["images"]
        assert seen == {"train": len(keys) - len(fold), "valid": len(fold)}
    # the out-of-fold figures, recomputed: each fold model on its own held-out images
    dev = SplitArrays.concat("dev", [arrays["train"], arrays["valid"]])
    models = [load_model(cv_dir / f"fold{i}") for i in range(3)]
    per_fold = []
    for model, fold in zip(models, folds, strict=True):
        held = dev.subset(np.array([keys.index(k) for k in fold]))
        probs = predict_split(model, held, tta=False).probs
        per_fold.append(ConfusionCounts.from_masks(probs >= 0.5, held.masks))
    assert result["cv"]["per_fold_pooled_iou"] == pytest.approx(
        [pooled_iou(c) for c in per_fold])
    oof = ConfusionCounts.concat(per_fold)
    assert len(oof) == len(keys)
    assert result["cv"]["metrics"]["pooled_iou"] == pytest.approx(pooled_iou(oof))
    assert result["cv"]["metrics"]["mean_image_dice"] == pytest.approx(
        per_image_dice(oof).mean())
    # the ensemble's test figure, recomputed: the mean of the fold models' probabilities
    test = arrays["test"]
    mean_prob = np.mean([predict_split(m, test, tta=False).probs for m in models], axis=0)
    ensemble = ConfusionCounts.from_masks(mean_prob >= 0.5, test.masks)
    per_image = pd.read_csv(cv_dir / "eval-test" / "per_image.csv")
    assert list(per_image.file) == test.files
    for name in ("tp", "fp", "fn"):  # a pixel at 0.5 may round either way, not more
        assert np.abs(per_image[f"{name}_headline"] - getattr(ensemble, name)).max() <= 2
    assert result["ensemble_test"]["headline"]["metrics"]["pooled_iou"] == pytest.approx(
        pooled_iou(ensemble), abs=1e-3)
    assert result["clean_test"]["images"] == 8  # the planted leaks are excluded
    assert "headline_clean" in result["ensemble_test"]
    assert set(per_image.loc[~per_image.clean, "file"]) == {
        f for f in per_image.file if f.startswith("leak_")}


def _assert_folds_tracked_under_the_cv_run(db, cv_dir, result) -> None:
    """The resumed cv reopened its MLflow run; each fold, trained in its own process (fold 0
    before the interruption), is logged under it, and the run holds the cv's figures."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    parent_id = json.loads((cv_dir / "tracking.json").read_text())["run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["cv_pooled_iou"] == result["cv"]["metrics"]["pooled_iou"]
    assert "cv.json" in {item.path for item in client.list_artifacts(parent_id)}
    runs = client.search_runs([parent.info.experiment_id])
    folds = {r.info.run_id for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id}
    recorded = {json.loads((cv_dir / f"fold{i}" / "tracking.json").read_text())["run_id"]
                for i in range(3)}
    assert folds == recorded
    for run_id in folds:
        assert len(client.get_metric_history(run_id, "val_iou")) == 1


def test_out_of_fold_predictions_cover_each_image_once_by_the_right_model(leaky_root,
                                                                          tmp_path):
    arrays = load_dataset(leaky_root, 64, tmp_path)
    keys = dev_keys(arrays)
    folds = [keys[0::2], keys[1::2]]

    class Constant(torch.nn.Module):
        def __init__(self, value):
            super().__init__()
            self.value = value

        def forward(self, x):
            return torch.full((len(x), 1, *x.shape[2:]), self.value)

    from brainseg_lib.config import Params
    from brainseg_lib.data.arrays import SplitArrays

    params = Params(image_size=64, channels_last=False, device="cpu")
    members = [LoadedModel([Constant(v)], params, torch.device("cpu"), 0) for v in (-1., 1.)]
    dev = SplitArrays.concat("dev", [arrays["train"], arrays["valid"]])
    oof = cv_module.out_of_fold(members, dev, fold_indices(keys, folds), tta=False)
    expected = np.where(np.arange(len(keys)) % 2 == 0, torch.sigmoid(torch.tensor(-1.)),
                        torch.sigmoid(torch.tensor(1.)))
    assert np.allclose(oof.probs.mean((1, 2)), expected)


def test_ensemble_probability_is_the_members_mean():
    from brainseg_lib.config import Params

    params = Params(image_size=64, channels_last=False, device="cpu")
    nets = [torch.nn.Conv2d(3, 1, 3, padding=1) for _ in range(3)]
    x = torch.randint(0, 255, (2, 3, 16, 16), dtype=torch.uint8)
    ens = LoadedModel(nets, params, torch.device("cpu"), 0)
    singles = [torch.sigmoid(predict_logits(LoadedModel([n], params, torch.device("cpu"), 0),
                                            x, tta=True)) for n in nets]
    mean = torch.stack(singles).mean(0)
    assert torch.allclose(torch.sigmoid(predict_logits(ens, x, tta=True)), mean, atol=1e-5)


def _grid_file(tmp_path, synthetic_root, variants, common=None, **extra):
    """A grid on the synthetic set; ``common`` adds to every variant's shared parameters."""
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "base": str(ROOT / "params" / "smoke.yaml"), "parallel": 1, "select_on": "val_iou",
        "common": {"synthetic": False, "data_dir": str(synthetic_root), "epochs": 2,
                   "batch_size": 8, "bootstrap": 20, "eval_original_size": False,
                   "cache_dir": str(tmp_path / "cache")} | (common or {}),
        "variants": variants} | extra))
    return grid


def test_a_two_variant_sweep_runs_resumes_and_selects_on_validation(tmp_path, synthetic_root,
                                                                     capsys):
    grid = _grid_file(tmp_path, synthetic_root, {"slow": {"lr": 1e-6}, "fast": {"lr": 0.003}})
    out = tmp_path / "sweep"
    # interrupted: the study's first trial (slow) is stopped in its second epoch
    from brainseg_lib.training import loop

    real_train = loop.train

    def interrupted(params, **kwargs):
        def stop(epoch, step):
            if epoch == 2:
                raise KeyboardInterrupt
        return real_train(params, step_callback=stop, **kwargs)

    loop.train = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            run_sweep(grid, out)
    finally:
        loop.train = real_train
    assert not (out / "slow" / "train.json").exists() and (out / "slow" / "last.pt").exists()
    table = run_sweep(grid, out)  # the same command again resumes
    assert (table.status == "finished").all()
    assert "queued again (their runs resume): slow" in capsys.readouterr().out
    slow_history = pd.read_csv(out / "slow" / "history.csv")
    assert list(slow_history.epoch) == [1, 2]  # resumed, not restarted
    picked = table.loc[table.selected, "variant"].item()
    assert picked == table.loc[table.val_iou.idxmax(), "variant"]
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["selected"] == picked and "headline" in summary["selected_test"]
    assert summary["storage"].startswith("sqlite:///") and (out / "study.db").exists()
    # the table itself is built from validation numbers only
    assert not any("test" in c for c in table.columns)
    # a third run finds everything done: nothing is trained again
    mtime = (out / "fast" / "best.pt").stat().st_mtime
    run_sweep(grid, out, evaluate=False)
    assert (out / "fast" / "best.pt").stat().st_mtime == mtime


def test_two_worker_processes_share_one_study_and_run_each_variant_once(tmp_path,
                                                                         synthetic_root):
    import optuna

    from brainseg_lib.experiments.sweep import open_study, read_grid

    variants = {f"lr{i}": {"lr": lr} for i, lr in enumerate((1e-3, 2e-3, 3e-3, 4e-3))}
    grid = _grid_file(tmp_path, synthetic_root, variants, parallel=2,
                      common={"num_threads": 1})  # two workers share the machine's cores
    out = tmp_path / "sweep"
    table = run_sweep(grid, out, evaluate=False)
    assert list(table.variant) == list(variants) and (table.status == "finished").all()
    logs = "".join(p.read_text() for p in (out / "logs").glob("worker*.log"))
    assert len(list((out / "logs").glob("worker*.log"))) == 2
    for name in variants:  # each trained once, by one worker, two epochs
        assert logs.count(f"run {out / name} |") == 1, logs
        assert list(pd.read_csv(out / name / "history.csv").epoch) == [1, 2]
    study = open_study(read_grid(grid), out)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert sorted(t.params["variant"] for t in complete) == sorted(variants)
    others = [t for t in study.get_trials() if t.state != optuna.trial.TrialState.COMPLETE]
    assert all(t.user_attrs.get("duplicate_of") is not None for t in others)


def test_a_lagging_trial_is_pruned_and_marked_so_in_the_table(tmp_path, synthetic_root):
    # GridSampler runs the grid in a seeded shuffled order: with seed 0 "b-good" runs first
    # (asserted below), so the median pruner has a finished trial to compare the laggard with
    grid = _grid_file(tmp_path, synthetic_root,
                      {"a-lagging": {"lr": 1e-7}, "b-good": {"lr": 0.003}},
                      pruner="median", prune_startup=1, prune_warmup=0)
    grid_values = yaml.safe_load(grid.read_text())
    grid_values["common"] |= {"epochs": 4, "patience": 0, "monitor": "val_iou"}
    grid.write_text(yaml.safe_dump(grid_values))
    out = tmp_path / "sweep"
    table = run_sweep(grid, out, evaluate=False).set_index("variant")
    assert table.loc["b-good", "trial"] < table.loc["a-lagging", "trial"]
    assert table.loc["b-good", "status"] == "finished" and table.loc["b-good", "selected"]
    assert table.loc["a-lagging", "status"] == "pruned"
    assert not table.loc["a-lagging", "selected"]
    history = pd.read_csv(out / "a-lagging" / "history.csv")
    assert len(history) < 4 and not (out / "a-lagging" / "train.json").exists()
    good = pd.read_csv(out / "b-good" / "history.csv")
    assert history.val_iou.iloc[-1] < good.val_iou.iloc[len(history) - 1]
    assert "pruned" in (out / "sweep.csv").read_text()


def test_a_search_space_file_runs_tpe_trials(tmp_path, synthetic_root):
    grid = _grid_file(tmp_path, synthetic_root, {})
    values = yaml.safe_load(grid.read_text())
    del values["variants"]
    values |= {"space": {"lr": {"low": 1e-4, "high": 1e-2, "log": True},
                         "loss": ["bce", "focal_dice"]}, "trials": 2}
    values["common"]["epochs"] = 1
    grid.write_text(yaml.safe_dump(values))
    table = run_sweep(grid, tmp_path / "sweep", evaluate=False)
    assert list(table.variant) == ["trial-000", "trial-001"]
    assert (table.status == "finished").all()
    for differs in table.differs:
        chosen = json.loads(differs)
        assert 1e-4 <= chosen["lr"] <= 1e-2 and chosen["loss"] in ("bce", "focal_dice")


def test_a_bad_search_space_names_the_file_and_the_key(tmp_path, synthetic_root):
    from brainseg_lib.config import ParamsError

    grid = _grid_file(tmp_path, synthetic_root, {})
    values = yaml.safe_load(grid.read_text())
    del values["variants"]
    values |= {"space": {"lr": {"low": 0.0, "high": 2.0}}, "trials": 2}
    grid.write_text(yaml.safe_dump(values))
    with pytest.raises(ParamsError,
                       match=r"grid.yaml: space: lr: .*parameter 'lr' = 0.0 is outside"):
        run_sweep(grid, tmp_path / "sweep")


CHILD = """
import os, signal, sys, time
if sys.argv[1] == "ignores":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
else:
    def stop(signum, frame):
        print("stopping on", signal.Signals(signum).name, flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
print("ready", os.getpid(), flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("signum, raised", [(signal.SIGTERM, SystemExit),
                                            (signal.SIGINT, KeyboardInterrupt)])
def test_a_stopped_launcher_forwards_the_signal_and_kills_a_child_that_ignores_it(
        tmp_path, signum, raised):
    children = [Child(kind, [sys.executable, "-c", CHILD, kind], tmp_path / f"{kind}.log")
                for kind in ("obeys", "ignores")]

    def signal_once_both_run():  # as `kill` or Ctrl-C would, once the children are up
        for _ in range(600):
            logs = [c.log.read_text() if c.log.exists() else "" for c in children]
            if all("ready" in text for text in logs):
                os.kill(os.getpid(), signum)
                return
            time.sleep(0.05)

    before = signal.getsignal(signum)
    threading.Thread(target=signal_once_both_run, daemon=True).start()
    with pytest.raises(raised) as stopped:
        run_children(children, parallel=2, grace_s=1.0)
    if raised is SystemExit:
        assert stopped.value.code == 128 + signum
    obeys, ignores = (c.log.read_text() for c in children)
    assert f"stopping on {signal.Signals(signum).name}" in obeys  # forwarded
    pid = int(ignores.split()[1])
    with pytest.raises(ProcessLookupError):  # killed (and reaped), not left running
        os.kill(pid, 0)
    assert signal.getsignal(signum) == before  # the launcher's handler is gone again


def test_a_training_job_is_launched_from_the_params_file_in_its_run_folder(tmp_path):
    params = load_params(ROOT / "params" / "smoke.yaml", runs_dir=str(tmp_path / "cv"),
                         run_id="fold0", fold=0, train_minutes=1.0)
    child = TrainJob("fold0", params).prepare(tmp_path / "logs")
    run_dir = tmp_path / "cv" / "fold0"
    assert child.command[child.command.index("--params") + 1] == str(run_dir / "params.yaml")
    assert "--resume" not in child.command and "--set" not in child.command
    assert RunDir(run_dir).params() == params  # the file that starts the run is its record
    # interrupted: relaunched from the same file, a longer budget applied and recorded ...
    (run_dir / "last.pt").write_bytes(b"state")
    longer = load_params(ROOT / "params" / "smoke.yaml", runs_dir=str(tmp_path / "cv"),
                         run_id="fold0", fold=0, train_minutes=3.0)
    child = TrainJob("fold0", longer).prepare(tmp_path / "logs")
    assert child.command[-2:] == ["--resume", str(run_dir)]
    assert RunDir(run_dir).params().train_minutes == 3.0
    # ... but not a change to what shaped its weights
    other = load_params(ROOT / "params" / "smoke.yaml", runs_dir=str(tmp_path / "cv"),
                        run_id="fold0", fold=0, lr=0.5)
    with pytest.raises(ParamsError, match=r"fold0: cannot change what shaped its weights "
                                          r"\(lr: run 0.003, given 0.5\)"):
        TrainJob("fold0", other).prepare(tmp_path / "logs")
    assert RunDir(run_dir).params().lr == params.lr
