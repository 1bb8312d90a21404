"""Run directories: the one place that names their files, reads and writes their records
(:class:`RunDir`), makes and finds their ids, and records how a result was produced
(environment, commit, devices).

A run directory holds ``params.yaml``, ``env.json``, ``best.pt``, ``last.pt`` (resumable),
``history.csv``, ``train.json`` and, once evaluated, ``metrics.json`` and ``eval-<split>/``.
"""

from __future__ import annotations

import csv
import json
import platform
import subprocess
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from brainseg_lib.config import (
    RESUMABLE_KEYS,
    Params,
    ParamsError,
    params_from_dict,
    params_from_record,
    project_root,
    read_params_file,
)
from brainseg_lib.errors import BrainsegError
from brainseg_lib.io import atomic_write_json, atomic_write_text

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

HISTORY_FIELDS = ("epoch", "train_loss", "val_loss", "val_iou", "val_dice", "lr", "seconds",
                  "train_img_per_s")

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


class RunFileError(BrainsegError, ValueError):
    """A run folder's record cannot be read; the message names the file."""


@dataclass(frozen=True)
class TrainRecord:
    """How training ended (``train.json``). Runs written before a field existed load with
    its default; keys this version does not know are kept in ``extra``."""

    best_epoch: int
    monitor: str  # the metric that chose the best checkpoint, e.g. "val_iou"
    best_value: float
    epochs_run: int
    stop_reason: str
    train_seconds_this_session: float
    compile_seconds: float = 0.0
    train_seconds_total: float | None = None  # None: a run from before it was recorded
    ema: bool = False
    precision: dict[str, Any] | None = None  # model.device.Precision.record(); None: older run
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The mapping ``train.json`` holds (the best value under ``best_<monitor>``)."""
        stored: dict[str, Any] = {
            "best_epoch": self.best_epoch, f"best_{self.monitor}": self.best_value,
            "epochs_run": self.epochs_run, "stop_reason": self.stop_reason,
            "train_seconds_this_session": self.train_seconds_this_session,
            "compile_seconds": self.compile_seconds}
        if self.train_seconds_total is not None:
            stored["train_seconds_total"] = self.train_seconds_total
        if self.precision is not None:
            stored["precision"] = self.precision
        return stored | {"ema": self.ema} | self.extra

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str) -> TrainRecord:
        """The record of a ``train.json`` mapping; RunFileError naming ``source`` when a
        field every version wrote is missing."""
        best = [k for k in data if k.startswith("best_val")]
        missing = [k for k in ("best_epoch", "epochs_run", "stop_reason",
                               "train_seconds_this_session") if k not in data]
        if missing or len(best) != 1:
            raise RunFileError(f"{source}: not a training record (missing "
                               f"{', '.join(missing) or 'best_<monitor>'})")
        known = {"best_epoch", best[0], "epochs_run", "stop_reason",
                 "train_seconds_this_session", "compile_seconds", "train_seconds_total", "ema",
                 "precision"}
        total = data.get("train_seconds_total")
        return cls(int(data["best_epoch"]), best[0].removeprefix("best_"), float(data[best[0]]),
                   int(data["epochs_run"]), str(data["stop_reason"]),
                   float(data["train_seconds_this_session"]),
                   float(data.get("compile_seconds", 0.0)),
                   None if total is None else float(total), bool(data.get("ema", False)),
                   data.get("precision"), {k: v for k, v in data.items() if k not in known})


@dataclass(frozen=True)
class RunDir:
    """One run folder: what it holds, and the one definition of a finished run."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def has_model(self) -> bool:
        """A best checkpoint to evaluate (the run may still be training or interrupted)."""
        return (self.path / BEST_CHECKPOINT).exists()

    @property
    def can_resume(self) -> bool:
        return (self.path / LAST_CHECKPOINT).exists()

    @property
    def is_finished(self) -> bool:
        """Training ended (early stopping, budget, last epoch) and left its best model."""
        return (self.path / TRAIN_FILE).exists() and self.has_model

    def params(self) -> Params:
        """The parameters the run trained with (``params.yaml``)."""
        path = self.path / PARAMS_FILE
        return params_from_record(read_params_file(path), str(path))

    def resumed_params(self, wanted: dict[str, Any]) -> Params:
        """The run's own parameters with the ``wanted`` values that differ from them: the
        resumable ones (more budget, execution and measurement settings) apply and are
        announced; one that shaped the weights is a ParamsError listing each difference."""
        saved = self.params().to_dict()
        changed = {k: v for k, v in wanted.items()
                   if k not in ("resume", "run_id") and saved.get(k, v) != v}
        refused = sorted(k for k in changed if k not in RESUMABLE_KEYS)
        if refused:
            listed = "; ".join(f"{k}: run {saved.get(k)!r}, given {changed[k]!r}"
                               for k in refused)
            raise ParamsError(f"resume {self.path}: cannot change what shaped its weights "
                              f"({listed}); start a new run instead")
        if changed:
            print(f"resume: applying {changed}")
        return params_from_dict(saved | changed | {"resume": str(self.path)},
                                source=str(self.path / PARAMS_FILE))

    def env(self) -> dict[str, Any]:
        return read_env(self.path)

    def device(self) -> str:
        """Where the run trained, from ``env.json``."""
        env = self.env()
        return env.get("gpu") or env.get("device", "an unrecorded device")

    def history(self) -> list[dict[str, float]]:
        """``history.csv``: one row per epoch ([] before the first epoch ends)."""
        path = self.path / HISTORY_FILE
        if not path.exists():
            return []
        with path.open() as f:
            return [{k: int(v) if k == "epoch" else float(v) for k, v in row.items()}
                    for row in csv.DictReader(f)]

    def write_history(self, rows: list[dict[str, float]]) -> None:
        lines = [",".join(HISTORY_FIELDS)]
        lines += [",".join(f"{row[k]:.6g}" if isinstance(row[k], float) else str(row[k])
                           for k in HISTORY_FIELDS) for row in rows]
        atomic_write_text(self.path / HISTORY_FILE, "\n".join(lines) + "\n")

    def train_record(self) -> TrainRecord | None:
        """How training ended; None unless the run has finished."""
        if not self.is_finished:
            return None
        path = self.path / TRAIN_FILE
        return TrainRecord.from_json(json.loads(path.read_text()), str(path))

    def write_train_record(self, record: TrainRecord) -> None:
        atomic_write_json(self.path / TRAIN_FILE, record.to_json())


def training_record(run_dir: Path) -> dict[str, Any] | None:
    """A finished run's ``train.json`` with where it trained (``device``, ``trained_on``):
    the mapping reports and model cards show; None when the run has not finished."""
    run = RunDir(run_dir)
    record = run.train_record()
    if record is None:
        return None
    return record.to_json() | {"device": run.device(),
                               "trained_on": run.env().get("trained_on", "")}


def latest_run(runs_dir: Path, profile: str | None = None) -> Path | None:
    """The newest run directory holding a best checkpoint (optionally of one profile)."""
    runs = [best.parent for best in runs_dir.glob(f"*/{BEST_CHECKPOINT}")]
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


# /proc/cpuinfo flags that set torch's CPU speed here: vector width, int8 and native bf16
CPU_SPEED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """The CPU's model name and every flag it reports (empty where /proc/cpuinfo is absent):
    2-core machines of one kind differ severalfold in speed, so a timing needs them beside it."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return {"model": platform.processor() or "unknown", "flags": []}
    field_of = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return {"model": field_of.get("model name", "unknown"),
            "flags": field_of.get("flags", "").split()}


def cpu_record() -> dict[str, Any]:
    """The CPU as a timing records it: model name and the flags of ``CPU_SPEED_FLAGS`` it has."""
    cpu = cpu_info()
    return {"model": cpu["model"], "speed_flags": [f for f in CPU_SPEED_FLAGS
                                                   if f in cpu["flags"]]}


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
    if device.type == "cpu":
        info["cpu"] = cpu_record()
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
