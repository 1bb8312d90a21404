"""The trainer on the synthetic set: learns, stops early, resumes, refuses NaN."""

import json

import pytest
import torch

from brainseg_lib.config import Params
from brainseg_lib.evaluation.predictions import predict_split
from brainseg_lib.inference.predictor import load_model
from brainseg_lib.metrics.functional import ConfusionCounts, pooled_iou
from brainseg_lib.model.checkpoint import read_checkpoint
from brainseg_lib.rundir import RunDir
from brainseg_lib.training import trainer as trainer_module
from brainseg_lib.training.augment import BatchAugment
from brainseg_lib.training.loop import load_training_data, train
from brainseg_lib.training.trainer import EarlyStopping, TrainingDivergedError
from conftest import tiny_params


def test_overfits_a_handful_of_images(tmp_path, synthetic_root):
    params = tiny_params(tmp_path, synthetic_root, epochs=20, limit_train_images=8,
                         augment=False, lr=0.003, scheduler="none", monitor="val_loss",
                         patience=0, batch_size=4, run_id="overfit")
    result = train(params, progress=False)
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < 0.3 * losses[0]
    # IoU of the final model on the 8 images it saw; tumours cover ~3 % of the pixels, so
    # an all-tumour guess scores ~0.03
    _, data = load_training_data(params)
    probs = predict_split(load_model(result.run_dir / "last.pt"), data["train"], False)
    assert pooled_iou(ConfusionCounts.from_masks(probs.probs >= 0.5, data["train"].masks)) > 0.5
    run = result.run_dir
    for name in ("params.yaml", "env.json", "best.pt", "last.pt", "history.csv", "train.json"):
        assert (run / name).exists(), name
    env = json.loads((run / "env.json").read_text())
    assert env["dataset"]["kind"] == "real" and "torch" in env["packages"]
    assert [row["epoch"] for row in RunDir(run).history()] == list(range(1, 21))


def test_early_stopping_rule():
    stopper = EarlyStopping("min", patience=2, min_delta=0.1)
    assert stopper.step(1.0, 1)
    assert not stopper.step(0.95, 2)        # improvement below min_delta
    assert not stopper.should_stop
    assert not stopper.step(0.93, 3)
    assert stopper.should_stop and stopper.best_epoch == 1
    up = EarlyStopping("max", patience=1, min_delta=0.0)
    assert up.step(0.2, 1) and up.step(0.3, 2) and not up.step(0.3, 3) and up.should_stop


def test_early_stopping_triggers_on_a_plateau(tmp_path, synthetic_root):
    # lr at the floor: validation loss barely moves, so min_delta 0.5 is never met
    params = tiny_params(tmp_path, synthetic_root, epochs=10, lr=1e-7, patience=2,
                         min_delta=0.5, monitor="val_loss", scheduler="none",
                         limit_train_images=4, run_id="plateau")
    result = train(params, progress=False)
    assert result.stop_reason == "early stopping"
    assert len(result.history) == 3 and result.best_epoch == 1


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, synthetic_root):
    kwargs = dict(epochs=3, limit_train_images=8, augment=True, scheduler="cosine",
                  warmup_epochs=1, patience=0)
    full = train(tiny_params(tmp_path, synthetic_root, run_id="full", **kwargs),
                 progress=False)

    def interrupt(epoch, step):
        if epoch == 2 and step == 1:
            raise KeyboardInterrupt

    params = tiny_params(tmp_path, synthetic_root, run_id="cut", **kwargs)
    with pytest.raises(KeyboardInterrupt):
        train(params, progress=False, step_callback=interrupt)
    state = read_checkpoint(tmp_path / "runs" / "cut" / "last.pt")
    assert state["epoch"] == 1
    resumed = train(tiny_params(tmp_path, synthetic_root, resume=str(tmp_path / "runs" / "cut")),
                    progress=False)
    assert len(resumed.history) == len(full.history) == 3
    assert [r["lr"] for r in resumed.history] == pytest.approx([r["lr"] for r in full.history])
    assert resumed.history[-1]["train_loss"] == pytest.approx(full.history[-1]["train_loss"],
                                                              rel=1e-3)


def test_a_finished_run_is_not_overwritten(tmp_path, synthetic_root):
    params = tiny_params(tmp_path, synthetic_root, epochs=1, limit_train_images=4,
                         run_id="once")
    train(params, progress=False)
    with pytest.raises(FileExistsError, match="resume"):
        train(params, progress=False)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path, synthetic_root,
                                                                     monkeypatch):
    params = tiny_params(tmp_path, synthetic_root, epochs=3, limit_train_images=8,
                         run_id="nan")
    real_loss = trainer_module.build_loss

    class PoisonAfterFirstEpoch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.calls = real_loss(params.loss), 0

        def forward(self, logits, target):
            self.calls += torch.is_grad_enabled()  # count training steps, not validation
            loss = self.inner(logits, target)
            return loss * float("nan") if self.calls > 2 else loss

    monkeypatch.setattr(trainer_module, "build_loss", lambda name: PoisonAfterFirstEpoch())
    with pytest.raises(TrainingDivergedError, match="non-finite loss in epoch 2"):
        train(params, progress=False)
    state = read_checkpoint(tmp_path / "runs" / "nan" / "last.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values()
               if v.is_floating_point())


def test_augmentation_moves_image_and_mask_together():
    params = Params(aug_hflip=1.0, aug_rotate_deg=0, aug_scale=0, aug_shift=0,
                    aug_brightness=0, aug_contrast=0)
    image = torch.zeros(1, 3, 16, 16)
    mask = torch.zeros(1, 1, 16, 16)
    image[..., 4:8, 1:5] = 1.0
    mask[..., 4:8, 1:5] = 1.0
    out_image, out_mask = BatchAugment(params)(image, mask, torch.Generator().manual_seed(0))
    assert torch.equal(out_mask, mask.flip(-1))
    assert torch.allclose(out_image[:, :1], out_mask, atol=1e-5)


def test_rotation_scale_shift_and_flips_keep_image_and_mask_aligned():
    # 16 slices whose bright pixels are exactly an off-centre box of the mask; every
    # geometric transform on, brightness and contrast off so the image's values stay put
    params = Params(aug_hflip=0.5, aug_vflip=0.5, aug_rotate_deg=30, aug_scale=0.2,
                    aug_shift=0.1, aug_brightness=0, aug_contrast=0)
    mask = torch.zeros(16, 1, 64, 64)
    mask[..., 14:34, 8:30] = 1.0
    image = (0.2 + 0.7 * mask).expand(16, 3, 64, 64).clone()
    out_image, out_mask = BatchAugment(params)(image, mask, torch.Generator().manual_seed(7))
    assert set(out_mask.unique().tolist()) <= {0.0, 1.0}
    bright = out_image[:, 0] > 0.5
    moved = out_mask[:, 0].bool()
    iou = (bright & moved).sum((1, 2)) / (bright | moved).sum((1, 2))
    assert (iou >= 0.9).all(), iou
    # the draws vary: the box lands somewhere else in nearly every slice, differently each
    # time, and with a tilt (a rotated box no longer fills its bounding rectangle)
    assert moved.any((1, 2)).all()
    changed = (moved != mask[:, 0].bool()).sum((1, 2)) > 20
    assert changed.sum() >= 14
    centres = torch.stack([torch.nonzero(m).float().mean(0) for m in moved])
    assert torch.cdist(centres, centres).triu(1)[torch.ones(16, 16).triu(1).bool()].min() > 0
    fill = []
    for m in moved:
        rows, cols = torch.nonzero(m, as_tuple=True)
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        fill.append(m.sum() / box)
    assert sum(f < 0.9 for f in fill) >= 8


def test_resume_applies_safe_overrides_and_refuses_the_others(tmp_path, synthetic_root):
    params = tiny_params(tmp_path, synthetic_root, epochs=1, limit_train_images=4,
                         run_id="r")
    train(params, progress=False)
    resume = tiny_params(tmp_path, synthetic_root, resume=str(tmp_path / "runs" / "r"))
    with pytest.raises(ValueError, match=r"cannot change .*\(lr: run 0.003, given 0.5\)"):
        train(resume, progress=False, resume_overrides={"lr": 0.5, "epochs": 2})
    result = train(resume, progress=False, resume_overrides={"epochs": 2})
    assert len(result.history) == 2




def test_ema_weights_differ_and_are_what_best_pt_holds(tmp_path, synthetic_root):
    # no IoU can beat epoch 1's by min_delta 1.0: the best epoch is 1 whatever is learnt
    params = tiny_params(tmp_path, synthetic_root, epochs=2, limit_train_images=8, ema=True,
                         ema_decay=0.9, run_id="ema", monitor="val_iou", min_delta=1.0,
                         patience=0)
    run_dir = tmp_path / "runs" / "ema"
    epoch_1 = {}

    def keep_epoch_1_state(epoch, step):
        if epoch == 2 and step == 1:  # last.pt still holds the state at the end of epoch 1
            epoch_1.update(read_checkpoint(run_dir / "last.pt"))

    result = train(params, progress=False, step_callback=keep_epoch_1_state)
    assert result.best_epoch == 1 and epoch_1["epoch"] == 1
    best = read_checkpoint(run_dir / "best.pt")
    assert best["epoch"] == 1 and best["ema"] is True
    key = "encoder.conv1.weight"
    assert not torch.equal(epoch_1["raw_model"][key], epoch_1["model"][key])
    # best.pt holds epoch 1's EMA weights and buffers, not the raw weights
    assert best["model"].keys() == epoch_1["model"].keys()
    assert all(torch.equal(best["model"][k], epoch_1["model"][k]) for k in best["model"])
    assert not torch.equal(best["model"][key], epoch_1["raw_model"][key])
    # ... and stayed there while the EMA moved on in epoch 2
    last = read_checkpoint(run_dir / "last.pt")
    assert last["epoch"] == 2 and not torch.equal(last["model"][key], best["model"][key])
    assert not torch.equal(last["raw_model"][key], last["model"][key])


def test_compile_on_the_cpu_is_ignored_with_a_message(tmp_path, synthetic_root, capsys):
    params = tiny_params(tmp_path, synthetic_root, epochs=1, limit_train_images=4,
                         compile=True, run_id="c")
    train(params, progress=False)
    assert "compile: true is ignored on the CPU" in capsys.readouterr().err


def test_time_budget_shapes_the_schedule():
    from brainseg_lib.training.trainer import Schedule

    sched = Schedule(Params(scheduler="cosine", epochs=100, train_minutes=1.0), 10)
    assert sched.factor() == pytest.approx(1.0)
    sched.step_count, sched.elapsed = 5, 30.0  # few steps, half the budget: half-way down
    assert sched.factor() == pytest.approx(0.5)
    sched.elapsed = 60.0
    assert sched.factor() == pytest.approx(0.0, abs=1e-9) and sched.out_of_time
    sched.elapsed = 50.0  # of 60 s: a 25 s epoch would end 15 s late (> half of it), 15 s 5 s
    assert sched.next_epoch_overruns(25.0) and not sched.next_epoch_overruns(15.0)
    no_budget = Schedule(Params(scheduler="cosine", epochs=2), 10)
    no_budget.step_count, no_budget.elapsed = 10, 1e6
    assert no_budget.factor() == pytest.approx(0.5) and not no_budget.out_of_time


def test_a_budgeted_run_stops_on_time_at_a_low_learning_rate(tmp_path, synthetic_root):
    params = tiny_params(tmp_path, synthetic_root, epochs=500, limit_train_images=8,
                         train_minutes=0.1, scheduler="cosine", run_id="budget")
    result = train(params, progress=False)
    assert result.stop_reason == "time budget" and 1 <= len(result.history) < 500
    assert result.history[-1]["lr"] < 0.2 * params.lr
    # the epoch the budget ended on is resumable (last.pt written although < 60 s passed)
    assert read_checkpoint(result.run_dir / "last.pt")["epoch"] == len(result.history)


def test_deterministic_runs_repeat_exactly(tmp_path, synthetic_root):
    def run(name):
        params = tiny_params(tmp_path, synthetic_root, epochs=2, limit_train_images=8,
                             deterministic=True, run_id=name)
        rows = train(params, progress=False).history
        return [{k: v for k, v in r.items() if k not in ("seconds", "train_img_per_s")}
                for r in rows]

    assert run("a") == run("b")
