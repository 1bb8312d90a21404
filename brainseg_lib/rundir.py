"""Run directories: the one place that names their files, makes and finds their ids, and
records how a result was produced (environment, commit, devices).

A run directory holds ``params.yaml``, ``env.json``, ``best.pt``, ``last.pt`` (resumable),
``history.csv``, ``train.json`` and, once evaluated, ``metrics.json`` and ``eval-<split>/``.
"""

from __future__ import annotations

import json
import platform
import subprocess
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from brainseg_lib.config import Params, project_root

PARAMS_FILE = "params.yaml"  # the run's parameters, as trained
ENV_FILE = "env.json"  # environment, data identity and weight provenance
BEST_CHECKPOINT = "best.pt"
LAST_CHECKPOINT = "last.pt"  # resumable state
HISTORY_FILE = "history.csv"  # one row per epoch
TRAIN_FILE = "train.json"  # how training ended
METRICS_FILE = "metrics.json"  # the test evaluation (also in eval-test/)
SOURCE_MODEL_FILE = "source_model.json"  # a shipped model laid out as a run: which weights
PER_IMAGE_FILE = "per_image.csv"  # in eval-<split>/: one row per image, with TP/FP/FN
VARIANTS_FILE = "variants.csv"  # in eval-<split>/: every setting tried on the selection split
THRESHOLDS_FILE = "threshold_curve.csv"  # in eval-<split>/: pooled metrics per threshold
FOLDS_FILE = "folds.json"  # in a CV folder
CV_FILE = "cv.json"  # in a CV folder
SWEEP_FILE = "sweep.csv"  # in a sweep folder: one row per variant
SWEEP_RECORD_FILE = "sweep.json"  # in a sweep folder: the table, the selection, its test
STUDY_FILE = "study.db"  # in a sweep folder: the Optuna study (SQLite) unless --storage
LOGS_DIR = "logs"  # in a CV or sweep folder: one log per training process
PROVENANCE_FILE = "provenance.json"  # in a resized dataset copy: what it was made from
REPORT_SUMMARY_FILE = "summary.json"  # in a report folder
TRACKING_FILE = "tracking.json"  # in a run, sweep or CV folder: its MLflow run (tracking_uri)

PACKAGES = ("torch", "torchvision", "segmentation-models-pytorch", "numpy", "pycocotools",
            "scipy", "pandas", "papermill")


def new_run_id(profile: str) -> str:
    return f"{datetime.now():%Y%m%d-%H%M%S}-{profile}"


def eval_dir(run_dir: Path, split: str) -> Path:
    """Where an evaluation on ``split`` writes its metrics and tables."""
    return run_dir / f"eval-{split}"


def read_env(run_dir: Path) -> dict[str, Any]:
    """A run's ``env.json`` ({} when it has none: a run made before it was recorded)."""
    path = run_dir / ENV_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def target_run_dir(params: Params) -> Path:
    """``runs_dir/run_id``, choosing a fresh id when none is set."""
    return params.resolve_path(params.runs_dir) / (params.run_id or new_run_id(params.profile))


def training_record(run_dir: Path) -> dict[str, Any] | None:
    """train.json of a finished run plus where it trained (from env.json), else None."""
    if not (run_dir / TRAIN_FILE).exists():
        return None
    record = json.loads((run_dir / TRAIN_FILE).read_text())
    env = read_env(run_dir)
    record["device"] = env.get("gpu") or env.get("device", "an unrecorded device")
    record["trained_on"] = env.get("trained_on", "")
    return record


def latest_run(runs_dir: Path, profile: str | None = None) -> Path | None:
    """The newest run directory holding a best checkpoint (optionally of one profile)."""
    runs = [p.parent for p in runs_dir.glob(f"*/{BEST_CHECKPOINT}")]
    if profile:
        runs = [r for r in runs if r.name.endswith(f"-{profile}")] or runs
    return max(runs, key=lambda r: (r / BEST_CHECKPOINT).stat().st_mtime, default=None)


def git_commit() -> str:
    try:
        root = project_root()
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                             capture_output=True, text=True, timeout=5).stdout.strip()
        # reports/ holds outputs (a report being written must not mark its own run dirty)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", ".", ":!reports"],
                               cwd=root, capture_output=True, text=True, timeout=5).stdout
        return (sha + ("-dirty" if dirty.strip() else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment_info(device: Any) -> dict[str, Any]:
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    info: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(),
        "packages": versions, "device": str(device), "torch_threads": torch.get_num_threads(),
        "git_commit": git_commit(), "created": datetime.now().isoformat(timespec="seconds"),
    }
    if torch.cuda.is_available():
        info["cuda"] = {"runtime": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                        "driver": _nvidia_driver()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _nvidia_driver() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def find_trained_run(params: Params) -> Path:
    """``runs_dir/run_id`` when set, else the newest run of this profile with a checkpoint."""
    if params.run_id:
        run_dir = target_run_dir(params)
        if not (run_dir / BEST_CHECKPOINT).exists():
            raise FileNotFoundError(f"{run_dir} has no best.pt: run notebooks/02_train first")
        return run_dir
    runs_dir = params.resolve_path(params.runs_dir)
    found = latest_run(runs_dir, params.profile)
    if found is None:
        raise FileNotFoundError(f"no trained run under {runs_dir}: run notebooks/02_train first")
    return found
