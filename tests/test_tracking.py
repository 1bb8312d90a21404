"""Optional MLflow tracking: off, nothing imports MLflow (and it need not be installed); on,
a local store holds the run's parameters, per-epoch and final metrics and artefacts, with
sweep trials nested."""

from __future__ import annotations

import ast
import importlib.abc
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import yaml

from brainseg_lib import tracking
from brainseg_lib.cli import main
from brainseg_lib.evaluation.evaluate import evaluate_run
from brainseg_lib.tracking import log_report
from brainseg_lib.training.loop import train
from conftest import ROOT, tiny_params


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _artifacts(client, run_id: str, path: str = "") -> set[str]:
    """Every artefact file of a run, by its path in the run."""
    out = set()
    for item in client.list_artifacts(run_id, path or None):
        out |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return out


class _NoMlflow(importlib.abc.MetaPathFinder):
    """An import hook that refuses MLflow and remembers who asked for it."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "mlflow":
            self.asked.append(name)
            raise ImportError(f"{name}: MLflow imported with tracking off")
        return None


def test_tracking_off_never_imports_mlflow(tmp_path, synthetic_root, monkeypatch):
    """Train and evaluate with tracking off and MLflow unimportable (as without the extra):
    nothing asks for it. Which modules may import it at all is the import-linter contract
    (tests/test_layers.py); this checks that tracking.py's own imports wait until it is on."""
    for name in [m for m in sys.modules if m.split(".")[0] == "mlflow"]:
        monkeypatch.delitem(sys.modules, name)  # imported by an earlier test: forgotten here
    hook = _NoMlflow()
    monkeypatch.setattr(sys, "meta_path", [hook, *sys.meta_path])
    params = tiny_params(tmp_path, synthetic_root, epochs=1, limit_train_images=4,
                         bootstrap=0, eval_original_size=False, run_id="untracked")
    assert params.tracking_uri == ""
    run_dir = train(params, progress=False).run_dir
    evaluate_run(run_dir, "test", verbose=False)
    assert main(["export", str(run_dir), "--out", str(tmp_path / "model"), "--fp32",
                 "--dataset-name", "synthetic demo", "--dataset-licence", "unknown"]) == 0
    log_report(run_dir, params, tmp_path)
    assert hook.asked == [] and not any(m.split(".")[0] == "mlflow" for m in sys.modules)
    assert not list((tmp_path / "runs").glob("*/tracking.json"))
    assert (run_dir / "metrics.json").is_file()  # the evaluation did run


def _imports_at_import_time(node: ast.AST) -> Iterator[str]:
    """Modules a file imports when it is itself imported: not those inside functions."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import):
            yield from (alias.name for alias in child.names)
        elif isinstance(child, ast.ImportFrom):
            yield child.module or ""
        elif not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _imports_at_import_time(child)


def test_tracking_imports_mlflow_only_inside_the_functions_that_log():
    tree = ast.parse(Path(tracking.__file__).read_text())
    everywhere = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "mlflow.tracking" in everywhere  # it does use MLflow, when on
    assert not [m for m in _imports_at_import_time(tree) if m.split(".")[0] == "mlflow"]


def test_a_tracked_run_logs_params_epochs_figures_and_artifacts(tmp_path, synthetic_root):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = tiny_params(tmp_path, synthetic_root, epochs=2, patience=0, bootstrap=0,
                         eval_original_size=False, run_id="tracked", tracking_uri=uri)
    run_dir = train(params, progress=False).run_dir
    evaluate_run(run_dir, "test", verbose=False)
    assert main(["export", str(run_dir), "--out", str(tmp_path / "model"), "--fp32",
                 "--dataset-name", "synthetic", "--dataset-licence", "unknown"]) == 0
    report = tmp_path / "report"
    report.mkdir()
    (report / "02_train.html").write_text("<html>report</html>")
    log_report(run_dir, params, report)

    record = json.loads((run_dir / "tracking.json").read_text())
    client = _client(uri)
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.params["image_size"] == "64" and run.data.params["tracking_uri"] == uri
    assert json.loads(run.data.params["normalize_mean"]) == params.normalize_mean
    history = client.get_metric_history(run.info.run_id, "val_iou")
    assert sorted(m.step for m in history) == [1, 2]
    saved = [float(line.split(",")[3]) for line in
             (run_dir / "history.csv").read_text().splitlines()[1:]]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == saved
    metrics = json.loads((run_dir / "metrics.json").read_text())
    headline = metrics["headline"]["metrics"]
    for name in ("pooled_iou", "mean_image_dice", "fg_bg_miou", "lesion_sensitivity",
                 "fp_components_per_image"):
        assert run.data.metrics[f"test_{name}"] == headline[name]
    if "headline_clean" in metrics:
        assert (run.data.metrics["test_clean_pooled_iou"]
                == metrics["headline_clean"]["metrics"]["pooled_iou"])
    assert run.data.metrics["test_bce"] == metrics["loss"]["bce"]
    assert run.data.metrics["epochs_run"] == 2
    files = _artifacts(client, run.info.run_id)
    assert {"train.json", "test/metrics.json", "report/02_train.html",
            "model/brainseg.json"} <= files, files
    # a shipped model does not carry the trainer's store (evaluating it elsewhere logs nothing)
    info = json.loads((tmp_path / "model" / "brainseg.json").read_text())
    assert "tracking_uri" not in info["params"]
    # the artefacts live beside the local database, not under the working directory
    assert (tmp_path / "mlartifacts").is_dir()


def test_sweep_trials_in_worker_processes_nest_under_the_sweep_run(tmp_path, synthetic_root):
    from brainseg_lib.experiments.sweep import run_sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "base": str(ROOT / "params" / "smoke.yaml"), "parallel": 2, "select_on": "val_iou",
        "common": {"synthetic": False, "data_dir": str(synthetic_root), "epochs": 1,
                   "image_size": 64, "batch_size": 8, "bootstrap": 0,
                   "eval_original_size": False, "cache_dir": str(tmp_path / "cache"),
                   "tracking_uri": uri, "num_threads": 1},  # two workers share the cores
        "variants": {"a": {"lr": 1e-3}, "b": {"lr": 3e-3}}}))
    out = tmp_path / "sweep"
    table = run_sweep(grid, out, evaluate=False)
    assert (table.status == "finished").all()
    client = _client(uri)
    parent_id = json.loads((out / "tracking.json").read_text())["run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "sweep"
    runs = client.search_runs([parent.info.experiment_id])
    children = {r.info.run_name: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent_id}
    assert set(children) == {"a", "b"}
    for name, child in children.items():  # each trained in a worker process, logged there
        assert json.loads((out / name / "tracking.json").read_text())["run_id"] == \
            child.info.run_id
        assert len(client.get_metric_history(child.info.run_id, "val_iou")) == 1
    assert {"sweep.csv", "sweep.json"} <= _artifacts(client, parent_id)
    logs = "".join(p.read_text() for p in (out / "logs").glob("worker*.log"))
    assert logs.count("run ") >= 2  # the trials ran in the two worker processes
