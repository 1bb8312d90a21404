"""Optional MLflow tracking (``tracking_uri``): the one module that talks to MLflow.

Off (``tracking_uri: ""``, the default) every function here returns at once and MLflow is
never imported. On, a training run gets one MLflow run (its id kept in the run directory's
``tracking.json``, so a resumed run, its evaluation and its report log to the same run):
parameters, per-epoch metrics, the final figures of an evaluation and the artefacts.
A sweep or a cross-validation opens a parent run and names it in ``$BRAINSEG_MLFLOW_PARENT``
for the processes it starts; a training run started under it is nested there.

MLflow's client API (``MlflowClient``) is used rather than its global "active run", so that
nested runs, worker processes and notebooks cannot pick up one another's run.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from brainseg_lib.config import Params
from brainseg_lib.io import atomic_write_json
from brainseg_lib.rundir import METRICS_FILE, SOURCE_MODEL_FILE, TRACKING_FILE, eval_dir

PARENT_ENV = "BRAINSEG_MLFLOW_PARENT"  # the parent run of the runs this process starts
EXPERIMENT = "brainseg"  # unless $MLFLOW_EXPERIMENT_NAME names another, as in MLflow itself
ARTIFACTS_DIR = "mlartifacts"  # beside a local SQLite store: where its artefacts go
# an evaluation's final figures (its plain-setting headline, full and clean subsets)
FINAL_FIGURES = ("pooled_iou", "mean_image_dice", "fg_bg_miou", "lesion_sensitivity",
                 "fp_components_per_image")
BATCH = 100  # MLflow accepts at most 100 parameters in one log_batch call


class Tracker:
    """One MLflow run of a store, logged to through the client."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client, self.run_id = client, run_id

    def log_params(self, params: Params) -> None:
        """Every parameter, as MLflow wants them: flat string values (lists as JSON)."""
        from mlflow.entities import Param

        items = [Param(k, json.dumps(v) if isinstance(v, list) else str(v))
                 for k, v in params.to_dict().items()]
        for start in range(0, len(items), BATCH):
            self.client.log_batch(self.run_id, params=items[start:start + BATCH])

    def log_metrics(self, values: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[
            Metric(k, float(v), now, step) for k, v in values.items() if v is not None])

    def log_epoch(self, epoch: int, row: dict[str, float]) -> None:
        """One epoch's history row (losses, validation IoU/Dice, lr, time), step = epoch."""
        self.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """A file, or a folder's files (under ``artifact_path``)."""
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED", why: str = "") -> None:
        """Close the run: FINISHED, or KILLED with ``why`` (pruned, interrupted, failed)."""
        if why:
            self.client.set_tag(self.run_id, "brainseg.stopped_by", why)
        self.client.set_terminated(self.run_id, status)


def enabled(params: Params) -> bool:
    return bool(params.tracking_uri)


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _experiment_id(client: Any, uri: str) -> str:
    """The experiment's id, created on first use; a local SQLite store keeps its artefacts
    beside its database (MLflow's default would be ``./mlartifacts`` under the cwd)."""
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    url = urlparse(uri)
    if url.scheme == "sqlite" and url.path not in ("", "/:memory:"):
        # sqlite:///relative.db and sqlite:////absolute.db: the path after the third slash
        location = (Path(url.path[1:]).resolve().parent / ARTIFACTS_DIR).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # another worker created it meanwhile
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _recorded(folder: Path, uri: str) -> str | None:
    """The MLflow run id a run (or sweep/CV) folder recorded for this store, if any."""
    path = folder / TRACKING_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError:  # JSONDecodeError and UnicodeDecodeError included
        record = None
    if not (isinstance(record, dict) and isinstance(record.get("run_id"), str)):
        warnings.warn(f"{path}: not a tracking record; a new MLflow run is started",
                      stacklevel=2)
        return None
    return record["run_id"] if record.get("tracking_uri") == uri else None


def _open(params: Params, folder: Path, parent: str | None = None) -> Tracker:
    """The folder's MLflow run, reopened, or a new one (named after the folder, nested under
    ``parent``, recorded in its ``tracking.json``, its parameters logged)."""
    uri = params.tracking_uri
    client = _client(uri)
    run_id = _recorded(folder, uri)
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
        return Tracker(client, run_id)
    tags = {"mlflow.runName": folder.name, "brainseg.folder": str(folder.resolve())}
    if parent:
        tags["mlflow.parentRunId"] = parent
    run = client.create_run(_experiment_id(client, uri), tags=tags)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / TRACKING_FILE, {"tracking_uri": uri,
                                               "run_id": run.info.run_id})
    tracker = Tracker(client, run.info.run_id)
    tracker.log_params(params)
    return tracker


def training_run(params: Params, run_dir: Path) -> Tracker | None:
    """The MLflow run a training session logs to (None when tracking is off): the run
    directory's own when it has one (a resumed run), else a new one, nested under
    ``$BRAINSEG_MLFLOW_PARENT`` when a sweep or cross-validation started this training."""
    if not enabled(params):
        return None
    return _open(params, run_dir, os.environ.get(PARENT_ENV) or None)


@contextmanager
def parent_run(params: Params, folder: Path) -> Iterator[Tracker | None]:
    """The parent run of a sweep or cross-validation folder (None when tracking is off):
    reopened when the folder has one (a resumed sweep), named in ``$BRAINSEG_MLFLOW_PARENT``
    for the block, so that the trainings this process and its children start nest under it."""
    if not enabled(params):
        yield None
        return
    tracker = _open(params, folder)
    before = os.environ.get(PARENT_ENV)
    os.environ[PARENT_ENV] = tracker.run_id
    try:
        yield tracker
    except BaseException as err:
        tracker.end("KILLED", type(err).__name__)
        raise
    else:
        tracker.end()
    finally:
        if before is None:
            os.environ.pop(PARENT_ENV, None)
        else:
            os.environ[PARENT_ENV] = before


@contextmanager
def nested_under(parent: str | None) -> Iterator[None]:
    """``$BRAINSEG_MLFLOW_PARENT`` = ``parent`` for the block unless already set (a sweep
    worker on another machine learns its parent from the shared study)."""
    if not parent or os.environ.get(PARENT_ENV):
        yield
        return
    os.environ[PARENT_ENV] = parent
    try:
        yield
    finally:
        os.environ.pop(PARENT_ENV, None)


def final_figures(out: dict[str, Any]) -> dict[str, float]:
    """An evaluation's headline figures as metrics: ``<split>_<figure>`` for the full split,
    ``<split>_clean_<figure>`` for its clean subset, and ``<split>_bce``."""
    split = out["split"]
    figures = {f"{split}_bce": out["loss"]["bce"]}
    for key, prefix in (("headline", split), ("headline_clean", f"{split}_clean")):
        if key in out:
            metrics = out[key]["metrics"]
            figures |= {f"{prefix}_{k}": metrics[k] for k in FINAL_FIGURES if k in metrics}
    return figures


def log_evaluation(run_dir: Path, params: Params, out: dict[str, Any]) -> None:
    """An evaluation of ``run_dir``: its final figures and ``metrics.json``, and the model
    folder it was laid out from, if any; into the run directory's MLflow run (a new one for
    a shipped model evaluated as a run). Nothing when tracking is off."""
    if not enabled(params):
        return
    tracker = _open(params, run_dir, os.environ.get(PARENT_ENV) or None)
    tracker.log_metrics(final_figures(out))
    tracker.log_artifact(eval_dir(run_dir, out["split"]) / METRICS_FILE, out["split"])
    source = run_dir / SOURCE_MODEL_FILE
    if source.is_file():
        model_dir = Path(json.loads(source.read_text())["model_dir"])
        if model_dir.is_dir():
            tracker.log_artifact(model_dir, "model")
    tracker.end()


def log_model_folder(run_dir: Path, model_dir: Path, params: Params) -> None:
    """An exported model folder, into the MLflow run of the run directory it was made from
    (when that run was tracked)."""
    if not enabled(params) or not _recorded(run_dir, params.tracking_uri):
        return
    tracker = _open(params, run_dir)
    tracker.log_artifact(model_dir, "model")
    tracker.end()


def log_report(run_dir: Path, params: Params, report_dir: Path) -> None:
    """A ``brainseg run``'s HTML reports, into the MLflow run of the run directory it made."""
    if not enabled(params) or not _recorded(run_dir, params.tracking_uri):
        return
    tracker = _open(params, run_dir)
    for page in sorted(report_dir.glob("*.html")):
        tracker.log_artifact(page, "report")
    tracker.end()
