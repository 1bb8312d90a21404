"""A shipped model laid out as a finished run directory (:func:`run_folder_from_model`), so
that evaluation, notebooks and reports treat it like a run trained here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from brainseg_lib.config import IDENTITY_KEYS, Params, save_params
from brainseg_lib.io import atomic_write_json, file_sha256
from brainseg_lib.model.checkpoint import ArtifactError, save_checkpoint
from brainseg_lib.model.folder import ModelFolder, ModelInfo, member_networks, open_model_folder
from brainseg_lib.model.schema import file_in
from brainseg_lib.rundir import (
    BEST_CHECKPOINT,
    ENV_FILE,
    HISTORY_FILE,
    PARAMS_FILE,
    SOURCE_MODEL_FILE,
    TRAIN_FILE,
)


def _refuse_other_params(model_dir: Path, expected: Params, params: Params) -> None:
    """ArtifactError listing the weight-shaping keys where ``expected`` differs from the
    model's training parameters."""
    diff = {k: (getattr(expected, k), getattr(params, k)) for k in IDENTITY_KEYS
            if getattr(expected, k) != getattr(params, k)}
    if diff:
        listed = "; ".join(f"{k}: given {a!r}, model {b!r}" for k, (a, b) in diff.items())
        raise ArtifactError(f"{model_dir}: trained with other parameters than given "
                            f"({listed}); unset report_model to train anew")


def _laid_out_from(run_dir: Path, weights_sha256: str) -> bool:
    """Whether ``run_dir`` was already laid out from these very weights."""
    if not ((run_dir / BEST_CHECKPOINT).exists() and (run_dir / SOURCE_MODEL_FILE).exists()):
        return False
    source = json.loads((run_dir / SOURCE_MODEL_FILE).read_text())
    return source.get("weights_sha256") == weights_sha256


def _write_run_files(folder: ModelFolder, run_dir: Path) -> None:
    """The files a finished run holds: best checkpoint, parameters, environment, training
    record and history, taken from the (checked) model folder."""
    info, params = folder.info, folder.params
    epoch = (info.checkpoint_epochs or [0])[0]
    save_checkpoint(run_dir / BEST_CHECKPOINT, {"model": member_networks(folder)[0].state_dict(),
                                                "params": params.to_dict(), "epoch": epoch,
                                                "weights": info.weights_init})
    save_params(params, run_dir / PARAMS_FILE)
    dataset = info.dataset
    env = dict(info.environment) | {
        "dataset": dataset, "weights": info.weights_init,
        "trained_on": f"shipped model {folder.path}"
                      + (f" ({dataset['provenance']})" if dataset.get("provenance") else "")}
    atomic_write_json(run_dir / ENV_FILE, env)
    record = (info.training or [{}])[0]
    if record:
        atomic_write_json(run_dir / TRAIN_FILE, {k: v for k, v in record.items()
                                                 if k not in ("device", "trained_on")})
    if (folder.path / HISTORY_FILE).exists():
        shutil.copy(folder.path / HISTORY_FILE, run_dir / HISTORY_FILE)


def run_folder_from_model(model_dir: str | Path, run_dir: Path,
                          expected: Params | None = None) -> Path:
    """Write ``run_dir`` as a finished run from an exported (single) model folder, so that
    evaluation, notebooks and reports treat a shipped model like a run trained here; a run
    folder already laid out from the same weights (by their recorded sha256) is kept.

    ``expected``: the caller's parameters; where they differ from the model's training
    parameters in any key that shaped the weights (``config.IDENTITY_KEYS``), that is an
    error listing the differences.
    """
    model_dir = Path(model_dir)
    info = ModelInfo.load(model_dir)
    params = info.training_params(model_dir)
    if len(info.members) != 1:
        raise ArtifactError(f"{model_dir}: a {len(info.members)}-member ensemble; report "
                            "it with brainseg cv, predict with brainseg predict --model")
    if expected is not None:
        _refuse_other_params(model_dir, expected, params)
    # the recorded hash names the weights; it is verified below before anything is written
    weights_sha256 = (info.sha256 or {}).get(info.members[0]) or file_sha256(
        file_in(model_dir, info.members[0]))
    if _laid_out_from(run_dir, weights_sha256):
        return run_dir
    _write_run_files(open_model_folder(model_dir), run_dir)
    atomic_write_json(run_dir / SOURCE_MODEL_FILE, {
        "model_dir": str(model_dir.resolve()), "weights_sha256": weights_sha256})
    return run_dir
