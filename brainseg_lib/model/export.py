"""Writing a model folder from one run (or several: a fold ensemble): smp's
``save_pretrained`` weights, ``brainseg.json`` with their hashes, the card and the licence,
crediting the data the runs' own records name.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from brainseg_lib.config import Params, ParamsError
from brainseg_lib.io import file_sha256
from brainseg_lib.model.card import (
    KAGGLE_DATASET,
    KAGGLE_LICENCE,
    UNKNOWN,
    DataCredit,
    is_kaggle_data,
)
from brainseg_lib.model.checkpoint import ArtifactError, network_from_checkpoint
from brainseg_lib.model.folder import CONFIG_FILE, WEIGHTS_FILE, ModelInfo
from brainseg_lib.model.onnx_files import add_onnx
from brainseg_lib.rundir import (
    BEST_CHECKPOINT,
    ENV_FILE,
    HISTORY_FILE,
    METRICS_FILE,
    read_env,
    training_record,
)


def data_credit(run_dirs: list[Path], given: DataCredit | None = None) -> DataCredit:
    """What to credit for the runs' training data, from their own data records: the Kaggle
    dataset (CC BY 4.0) only when every run's annotations are that dataset's. Other data
    needs ``given`` with both name and licence (``unknown`` allowed), else a ParamsError, so
    an export never credits data it was not trained on; without ``given`` at all (a library
    call) its name and licence are recorded as ``unknown``."""
    records = [read_env(r).get("dataset") or {} for r in run_dirs]
    name, licence = (given.name, given.licence) if given else ("", "")
    if all(is_kaggle_data(d) for d in records):
        return DataCredit(name or KAGGLE_DATASET, licence or KAGGLE_LICENCE)
    if given and not (name and licence):
        d = records[0]
        raise ParamsError(
            f"{run_dirs[0] / ENV_FILE}: trained on {d.get('path', 'unrecorded data')} "
            f"(annotations {d.get('annotations_sha256', '?')}), not the Kaggle dataset: give "
            f"--dataset-name and --dataset-licence ('{UNKNOWN}' where you do not know)")
    return DataCredit(name or UNKNOWN, licence or UNKNOWN)


def _load_members(run_dirs: list[Path]) -> tuple[list[nn.Module], Params, list[dict[str, Any]]]:
    """Each run's best network and checkpoint state, and the first run's parameters; every
    run must hold the same network (a fold ensemble shares one config)."""
    models, params_list, states = [], [], []
    for run in run_dirs:
        model, params, state = network_from_checkpoint(run / BEST_CHECKPOINT)
        models.append(model)
        params_list.append(params)
        states.append(state)
    first = params_list[0]
    for p, run in zip(params_list[1:], run_dirs[1:], strict=True):
        if (p.arch, p.encoder, p.image_size) != (first.arch, first.encoder, first.image_size):
            raise ArtifactError(f"{run}: a different network ({p.arch}/{p.encoder} at "
                                f"{p.image_size}px) from {run_dirs[0]}")
    return models, first, states


@contextmanager
def _atomic_folder(out_dir: Path) -> Iterator[Path]:
    """A temporary folder beside ``out_dir`` that replaces it when the block succeeds and
    is removed when it fails, so a failed export leaves nothing."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _save_weights(folder: Path, models: list[nn.Module], fp16: bool) -> list[str]:
    """smp's ``save_pretrained`` for each member; returns the weight file names."""
    members = [WEIGHTS_FILE] if len(models) == 1 else [
        f"model-fold{i}.safetensors" for i in range(len(models))]
    for model, name in zip(models, members, strict=True):
        if fp16:
            model = model.half()
        model.save_pretrained(folder)  # smp's format: config.json + model.safetensors
        if name != WEIGHTS_FILE:
            (folder / WEIGHTS_FILE).rename(folder / name)
    return members


def _model_info(run_dirs: list[Path], members: list[str], params: Params,
                states: list[dict[str, Any]], fp16: bool, credit: DataCredit) -> ModelInfo:
    """``brainseg.json``: how the model was trained, on what data, and what it scored."""
    run0 = run_dirs[0]
    env = read_env(run0)
    metrics_file = run0 / METRICS_FILE
    return ModelInfo(
        members=members, stored_as="float16" if fp16 else "float32",
        # not what the run was, but where it ran from: a shipped model must not log to the
        # trainer's MLflow store
        params={k: v for k, v in params.to_dict().items()
                if k not in ("resume", "report_model", "run_id", "tracking_uri")},
        runs=[r.name for r in run_dirs],
        training=[training_record(r) or {} for r in run_dirs],
        environment={k: env.get(k) for k in ("device", "gpu", "git_commit", "created",
                                             "packages", "cuda") if k in env},
        dataset=env.get("dataset", {}) | {"name": credit.name, "licence": credit.licence},
        weights_init=env.get("weights", states[0].get("weights", "")),
        checkpoint_epochs=[int(s.get("epoch", 0)) for s in states],
        parent=env.get("parent"),  # the model it was fine-tuned from (init_from), or None
        test_metrics=json.loads(metrics_file.read_text()) if metrics_file.exists() else None)


def export_model(run_dirs: list[Path], out_dir: Path, fp16: bool = True,
                 given: DataCredit | None = None, onnx: bool = False,
                 int8: bool = False) -> Path:
    """Write smp's ``save_pretrained`` folder for one run (or several: a fold ensemble),
    with the sha256 of each weight file, a licence and, with ``onnx``, verified ONNX files.

    ``given``: the training data's name and licence from the caller, checked and completed
    by :func:`data_credit` against the runs' own data records.
    Files are written to a temporary folder and renamed, so a failed export leaves nothing.
    """
    models, params, states = _load_members(run_dirs)
    credit = data_credit(run_dirs, given)
    out_dir = Path(out_dir)
    with _atomic_folder(out_dir) as folder:
        members = _save_weights(folder, models, fp16)
        info = _model_info(run_dirs, members, params, states, fp16, credit)
        # config.json too: it shapes the network as much as the weights do
        info.sha256 = {name: file_sha256(folder / name) for name in [*members, CONFIG_FILE]}
        info.save(folder, out_dir.name)
        info.save_licence(folder)
        if (run_dirs[0] / HISTORY_FILE).exists() and len(run_dirs) == 1:
            shutil.copy(run_dirs[0] / HISTORY_FILE, folder / HISTORY_FILE)
        if onnx:
            add_onnx(folder, out_dir.name, int8)
    return out_dir
