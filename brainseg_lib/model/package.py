"""Exported model folders: smp's own format (``save_pretrained``: ``config.json`` +
``model.safetensors``) plus ``brainseg.json`` (how it was trained, on what data, what it
scored) and a model card ``README.md``. A fold ensemble is one folder with one weight file
per member and the same config. A shipped model can be laid out as a run directory
(:func:`materialise`), so notebooks and evaluation treat it like a run trained here.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from brainseg_lib.config import (
    IDENTITY_KEYS,
    Params,
    ParamsError,
    params_from_record,
    save_params,
)
from brainseg_lib.data.locate import KAGGLE_ID
from brainseg_lib.io import atomic_write_json, atomic_write_text, file_sha256
from brainseg_lib.model.checkpoint import (
    ArtifactError,
    load_weights,
    network_from_checkpoint,
    save_checkpoint,
)
from brainseg_lib.rundir import (
    BEST_CHECKPOINT,
    ENV_FILE,
    HISTORY_FILE,
    METRICS_FILE,
    PARAMS_FILE,
    SOURCE_MODEL_FILE,
    TRAIN_FILE,
    read_env,
    training_record,
)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
INFO_FILE = "brainseg.json"
ONNX_FILE = "model.onnx"  # one per member: model-fold0.onnx ... beside model-fold0.safetensors
INT8_SUFFIX = ".int8.onnx"  # the int8 variant of each: model.int8.onnx, model-fold0.int8.onnx
LICENSE_FILE = "LICENSE"


def is_model_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file() or (Path(path) / INFO_FILE).is_file()


def read_model_info(model_dir: str | Path) -> dict[str, Any]:
    """``brainseg.json`` of an exported model, checked against smp's ``config.json``."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ArtifactError(f"{model_dir}: model folder not found")
    config_file, info_file = model_dir / CONFIG_FILE, model_dir / INFO_FILE
    for f in (config_file, info_file):
        if not f.is_file():
            raise ArtifactError(f"{f}: missing; a brainseg model folder holds {CONFIG_FILE}, "
                                f"{INFO_FILE} and weights (made by brainseg export)")
    try:
        config = json.loads(config_file.read_text())
        info = json.loads(info_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{model_dir}: unreadable JSON ({err})") from None
    if not isinstance(config, dict) or "_model_class" not in config:
        raise ArtifactError(f"{config_file}: not a segmentation_models_pytorch config (no "
                            "_model_class; is it from another library?)")
    if not hasattr(smp, str(config["_model_class"])):
        raise ArtifactError(f"{config_file}: unknown smp model class {config['_model_class']}")
    members = info.get("members") or [WEIGHTS_FILE]
    for name in members:
        if not (model_dir / name).is_file():
            raise ArtifactError(f"{model_dir / name}: weights missing (the folder has a model "
                                "card but no weights)")
    info["config"], info["members"] = config, members
    verify_hashes(model_dir, info, members)
    return info


def verify_hashes(model_dir: Path, info: dict[str, Any], names: list[str]) -> None:
    """Each file's sha256 against the one ``brainseg.json`` recorded at export: weights
    changed afterwards (damaged, or swapped) are refused with one line.

    A folder exported before hashes were recorded is read with a warning, not refused: its
    owner can add them by exporting again, and refusing would strand every older export.
    """
    recorded = info.get("sha256")
    if recorded is None:
        warnings.warn(f"{model_dir / INFO_FILE}: records no sha256 of the weights (an older "
                      "export); their integrity is not checked", stacklevel=3)
        return
    for name in names:
        found = file_sha256(model_dir / name)
        if recorded.get(name) != found:
            raise ArtifactError(f"{model_dir / name}: sha256 {found} differs from "
                                f"{recorded.get(name)} recorded in {INFO_FILE} (changed after "
                                "export); refused")


def _training_params(model_dir: Path, info: dict[str, Any]) -> Params:
    try:
        return params_from_record(info["params"], source=str(model_dir / INFO_FILE))
    except (ParamsError, KeyError, TypeError) as err:
        raise ArtifactError(f"{model_dir / INFO_FILE}: invalid parameters ({err})") from None


def networks_from_model_dir(model_dir: str | Path,
                            ) -> tuple[list[nn.Module], Params, dict[str, Any]]:
    """The member networks (one, or k for a fold ensemble), their training parameters and info.

    Equivalent to ``smp.from_pretrained(dir, encoder_weights=None)`` but never touches the
    network and turns every failure into one line.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    info = read_model_info(model_dir)
    config = {k: v for k, v in info["config"].items() if not k.startswith("_")}
    params = _training_params(model_dir, info)
    expected = f"{params.arch}/{params.encoder}"
    found = f"{info['config']['_model_class']}/{config.get('encoder_name')}"
    if found.lower() != expected.lower():
        raise ArtifactError(f"{model_dir}: config.json describes {found}, brainseg.json "
                            f"{expected}")
    members = []
    for name in info["members"]:
        model = getattr(smp, info["config"]["_model_class"])(**(config | {
            "encoder_weights": None}))
        try:
            state = load_file(model_dir / name, device="cpu")
        except (SafetensorError, OSError) as err:
            raise ArtifactError(f"{model_dir / name}: not readable safetensors "
                                f"(truncated or corrupt: {err})") from None
        load_weights(model, state, model_dir / name, expected)
        members.append(model)
    return members, params, info


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
                states: list[dict[str, Any]], fp16: bool, credit: DataCredit) -> dict[str, Any]:
    """``brainseg.json``: how the model was trained, on what data, and what it scored."""
    run0 = run_dirs[0]
    env = read_env(run0)
    metrics_file = run0 / METRICS_FILE
    return {
        "format": "brainseg model 1", "members": members,
        "stored_as": "float16" if fp16 else "float32",
        # not what the run was, but where it ran from: a shipped model must not log to the
        # trainer's MLflow store
        "params": {k: v for k, v in params.to_dict().items()
                   if k not in ("resume", "model_dir", "run_id", "tracking_uri")},
        "runs": [r.name for r in run_dirs],
        "training": [training_record(r) or {} for r in run_dirs],
        "environment": {k: env.get(k) for k in ("device", "gpu", "git_commit", "created",
                                                "packages", "cuda") if k in env},
        "dataset": env.get("dataset", {}) | {"name": credit.name, "licence": credit.licence},
        "weights_init": env.get("weights", states[0].get("weights", "")),
        "checkpoint_epochs": [int(s.get("epoch", 0)) for s in states],
        "parent": env.get("parent"),  # the model it was fine-tuned from (init_from), or None
        "test_metrics": json.loads(metrics_file.read_text()) if metrics_file.exists()
        else None,
    }


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
        info["sha256"] = {name: file_sha256(folder / name) for name in members}
        atomic_write_json(folder / INFO_FILE, info)
        if (run_dirs[0] / HISTORY_FILE).exists() and len(run_dirs) == 1:
            shutil.copy(run_dirs[0] / HISTORY_FILE, folder / HISTORY_FILE)
        atomic_write_text(folder / LICENSE_FILE, licence_text(info))
        atomic_write_text(folder / "README.md", model_card(info, out_dir.name))
        if onnx:
            add_onnx(folder, out_dir.name, int8)
    return out_dir


def onnx_names(members: list[str]) -> list[str]:
    """The ONNX file of each member weight file (``model.onnx`` for a single model)."""
    return [ONNX_FILE if m == WEIGHTS_FILE else m.removesuffix(".safetensors") + ".onnx"
            for m in members]


def int8_names(members: list[str]) -> list[str]:
    """The int8 ONNX file of each member weight file (``model.int8.onnx`` for one model)."""
    return [f.removesuffix(".onnx") + INT8_SUFFIX for f in onnx_names(members)]


def _verification_batches(params: Params) -> tuple[list[Any], str, list[Any], str]:
    """Normalised batches to compare the engines on: up to 32 validation images of the
    model's data (the synthetic demo where it has none) at its resolution, and two at half
    of it (the ONNX graph's height and width are dynamic); and the batches an int8 file is
    calibrated on: the next 64 validation images (all of them where there are no more than
    32)."""
    from brainseg_lib.data.arrays import load_split_arrays
    from brainseg_lib.data.locate import data_source
    from brainseg_lib.model.network import Normalizer

    source = data_source(params)
    arrays = load_split_arrays(source.path, "valid", params.image_size, params.cache_path())
    normalize = Normalizer(params.normalize_mean, params.normalize_std, torch.device("cpu"))
    images = torch.from_numpy(np.array(arrays.images[:96]))  # a copy: a cache may be read-only
    x = normalize(images[:32])
    half = max(32, params.image_size // 64 * 32)
    small = F.interpolate(x[:2], size=(half, half), mode="bilinear", align_corners=False)
    calibration = normalize(images[32:] if len(images) > 32 else images)
    first = 32 if len(images) > 32 else 0
    return ([x[i:i + 16] for i in range(0, len(x), 16)] + [small],
            f"{len(x)} {source.kind} validation images at {params.image_size} px and 2 at "
            f"{half} px ({source.path})",
            [calibration[i:i + 16] for i in range(0, len(calibration), 16)],
            f"{source.kind} validation images {first}–{first + len(calibration) - 1} at "
            f"{params.image_size} px ({source.path})")


def _write_verified(model_dir: Path, models: list[nn.Module], files: list[str],
                    batches: list[Any], threshold: float, kind: str,
                    write: Callable[[nn.Module, Path], float], refused: str = "",
                    ) -> tuple[list[float], dict[str, float]]:
    """Write each member's ONNX file (``write`` returns its seconds) and verify it against
    torch on ``batches`` with the bounds of its ``kind`` (``ONNX`` or ``int8``); one miss
    removes every file written. Returns the seconds and the worst figures over members."""
    from brainseg_lib.model.onnx_export import (
        OnnxMember,
        compare_engines,
        verification_failures,
    )

    seconds, results = [], []
    try:
        for model, file in zip(models, files, strict=True):
            seconds.append(write(model, model_dir / file))
            result = compare_engines(model, OnnxMember(model_dir / file), batches, threshold)
            failures = verification_failures(result, int8=kind == "int8")
            if failures:
                raise ArtifactError(f"{model_dir / file}: {kind} verification failed against "
                                    f"torch: {'; '.join(failures)}{refused}")
            results.append(result)
    except BaseException:
        for file in files:
            (model_dir / file).unlink(missing_ok=True)
        raise
    return seconds, {"max_abs_prob_diff": max(r["max_abs_prob_diff"] for r in results),
                     "mask_agreement": min(r["mask_agreement"] for r in results)}


def add_onnx(model_dir: str | Path, name: str = "", int8: bool = False) -> dict[str, Any]:
    """Export each member of a model folder to ONNX, verify it against torch on real images
    and record files, hashes and figures in ``brainseg.json`` and the card; with ``int8``,
    also its int8 static quantisation, verified the same way (:func:`_add_int8`).

    A verification that misses its bounds (``onnx_export.MIN_MASK_AGREEMENT``,
    ``MAX_PROB_DIFF``) is an ArtifactError and leaves no ONNX file behind.
    """
    import onnxruntime

    from brainseg_lib.model.onnx_export import MAX_PROB_DIFF, MIN_MASK_AGREEMENT, export_onnx

    model_dir = Path(model_dir)
    models, params, info = networks_from_model_dir(model_dir)
    batches, images, calibration, calibrated_on = _verification_batches(params)
    files = onnx_names(info["members"])
    seconds, figures = _write_verified(
        model_dir, models, files, batches, params.threshold, "ONNX",
        lambda model, path: export_onnx(model, path, params.in_channels, params.image_size))
    stale = int8_names(info["members"])  # made from the ONNX files just replaced
    for file in stale:
        (model_dir / file).unlink(missing_ok=True)
    record = json.loads((model_dir / INFO_FILE).read_text())
    # an older folder gets its weights' hashes too: they just loaded, finite and whole
    record["sha256"] = {m: file_sha256(model_dir / m) for m in info["members"]} | {
        k: v for k, v in (record.get("sha256") or {}).items() if k not in stale} | {
        f: file_sha256(model_dir / f) for f in files}
    record["onnx"] = {
        "files": files, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
        "export_seconds": [round(s, 1) for s in seconds], "verified_on": images,
        "bounds": {"min_mask_agreement": MIN_MASK_AGREEMENT, "max_abs_prob_diff": MAX_PROB_DIFF},
        **figures, "threshold": params.threshold}
    atomic_write_json(model_dir / INFO_FILE, record)
    atomic_write_text(model_dir / "README.md", model_card(record, name or model_dir.name))
    if int8:
        _add_int8(model_dir, name, models, params, batches, calibration, calibrated_on)
    return json.loads((model_dir / INFO_FILE).read_text())["onnx"]


def _add_int8(model_dir: Path, name: str, models: list[nn.Module], params: Params,
              batches: list[Any], calibration: list[Any], calibrated_on: str) -> None:
    """Quantise each verified fp32 ONNX file to int8 (static, calibrated on validation
    images) and verify it against torch like the fp32 one, with the int8 probability bound.

    A miss is an ArtifactError naming its figures and leaves no int8 file; the fp32 files,
    already verified and recorded, stay.
    """
    from brainseg_lib.model.onnx_export import (
        INT8_MAX_PROB_DIFF,
        MIN_MASK_AGREEMENT,
        quantize_int8,
    )

    record = json.loads((model_dir / INFO_FILE).read_text())
    sources, files = record["onnx"]["files"], int8_names(record["members"])
    source_of = dict(zip(files, sources, strict=True))
    seconds, figures = _write_verified(
        model_dir, models, files, batches, params.threshold, "int8",
        lambda _, path: quantize_int8(model_dir / source_of[path.name], path, calibration),
        refused=f"; refused ({sources[0]} stays, verified)")
    record["sha256"] |= {f: file_sha256(model_dir / f) for f in files}
    record["onnx"]["int8"] = {
        "files": files, "quantisation": "onnxruntime quantize_static: QDQ, per-channel int8 "
        "weights, uint8 activations, min/max calibration", "calibrated_on": calibrated_on,
        "quantise_seconds": [round(s, 1) for s in seconds],
        "bounds": {"min_mask_agreement": MIN_MASK_AGREEMENT,
                   "max_abs_prob_diff": INT8_MAX_PROB_DIFF},
        **figures}
    atomic_write_json(model_dir / INFO_FILE, record)
    atomic_write_text(model_dir / "README.md", model_card(record, name or model_dir.name))


def verified_onnx(model_dir: str | Path, int8: bool = False) -> list[Path] | None:
    """The ONNX files (``int8``: their int8 variants) of a model folder when they were
    verified at export and are present, else None (hashes are checked when loaded)."""
    model_dir = Path(model_dir)
    if not (model_dir / INFO_FILE).is_file():
        return None
    try:
        record = json.loads((model_dir / INFO_FILE).read_text()).get("onnx")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if record and int8:
        record = record.get("int8")
    if not record or not all((model_dir / f).is_file() for f in record["files"]):
        return None
    return [model_dir / f for f in record["files"]]


def onnx_members_from_model_dir(model_dir: str | Path, int8: bool = False,
                                ) -> tuple[list[Path], Params, dict[str, Any]]:
    """The verified ONNX files (``int8``: their int8 variants) of a model folder, their
    hashes checked, its training parameters and record; an ArtifactError when it has none."""
    model_dir = Path(model_dir)
    info = read_model_info(model_dir)
    files = verified_onnx(model_dir, int8)
    if files is None:
        kind, flags = ("model.int8.onnx", "--onnx --int8") if int8 else (ONNX_FILE, "--onnx")
        raise ArtifactError(f"{model_dir}: no verified {kind}; write one with brainseg "
                            f"export {model_dir} {flags}")
    verify_hashes(model_dir, info, [f.name for f in files])
    return files, _training_params(model_dir, info), info


def _card_title(name: str) -> list[str]:
    return [
        f"# brainseg model `{name}`", "",
        "**A research model, not a medical device.** It segments brain-tumour regions in "
        "single 2D MRI slices like those it was trained on; it has not been validated for, "
        "and must not be used in, diagnosis or treatment.", "",
    ]


def _card_model(info: dict[str, Any]) -> list[str]:
    """What the network is, what input it expects, and how to load it."""
    p = info["params"]
    return [
        "## Model", "",
        f"- {p['arch']} with a {p['encoder']} encoder (segmentation_models_pytorch), "
        f"{p['in_channels']} input channels, one output channel of logits",
        f"- input: {p['image_size']}x{p['image_size']} px, normalised with mean "
        f"{p['normalize_mean']} and std {p['normalize_std']} (of [0, 1] pixel values)",
        f"- weights: {info['stored_as']}, {len(info['members'])} member(s) "
        f"({', '.join(info['members'])}); initialisation: {info.get('weights_init') or '?'}",
        "- load: `brainseg predict --model <this folder> IMAGE... --out DIR`, or in Python "
        "`brainseg_lib.model.package.networks_from_model_dir(folder)`; smp alone: "
        "`smp.from_pretrained(folder)` (single-member folders)", "",
    ]


def _card_training(info: dict[str, Any]) -> list[str]:
    """The data, the recipe, each member run and the code commit."""
    p = info["params"]
    ds = info.get("dataset", {})
    credit = credit_of(ds)
    lines = [
        "## Training", "",
        f"- data: {credit.name}"
        + (" (Kaggle pkdarabi / Roboflow COCO export)" if credit.kaggle else "")
        + f", licence {credit.licence}; annotations sha256 "
        f"{ds.get('annotations_sha256', '?')}; images {ds.get('images', '?')}"
        + (f"; {ds['provenance']}" if ds.get("provenance") else ""),
        f"- recipe: loss {p['loss']}, {p['optimizer']} lr {p['lr']} (weight decay "
        f"{p['weight_decay']}), {p['scheduler']} schedule, batch {p['batch_size']}, "
        f"augmentation {'on' if p['augment'] else 'off'}, EMA {'on' if p.get('ema') else 'off'}"
        f", best checkpoint on {p['monitor']}, seed {p['seed']}",
    ]
    for run, rec in zip(info["runs"], info["training"], strict=True):
        if rec:
            lines.append(f"- run {run}: {rec.get('epochs_run')} epochs on "
                         f"{rec.get('device')}, {rec.get('train_seconds_this_session', 0) / 60:.1f}"
                         f" min, stopped by {rec.get('stop_reason')}; best epoch "
                         f"{rec.get('best_epoch')}")
    env = info.get("environment", {})
    return lines + [f"- code: brainseg commit {env.get('git_commit', '?')}", ""]


def _metric_cell(block: dict[str, Any] | None, key: str) -> str:
    """``value | CI`` of one metric in a metrics block; dashes where it has none."""
    if not block or key not in block["metrics"]:
        return "– | –"
    bounds = block.get("ci95", {}).get(key)
    value = f"{block['metrics'][key]:.4f}"
    return value + (f" | {bounds[0]:.4f} – {bounds[1]:.4f}" if bounds else " | –")


def _card_test_metrics(m: dict[str, Any] | None) -> list[str]:
    """The test split's plain-setting metrics, full and clean, or how to get them."""
    if not m:
        return ["## Test metrics", "",
                "Not evaluated yet: run `brainseg evaluate --model <folder>`.", ""]
    clean = m.get("headline_clean")
    ev = m.get("evaluated_with", {})
    lines = ["## Test metrics", "",
             f"Split `{m['split']}` ({m['dataset']['images']} images, annotations "
             f"{m['dataset'].get('annotations_sha256', '?')}); evaluated on "
             f"{ev.get('device', '?')} at commit {ev.get('git_commit', '?')}. Plain "
             f"setting: {m['headline']['setting']}."
             + (f" Clean subset: {m['clean_test']['images']} test images with no "
                "near-duplicate in train or valid." if clean else ""), "",
             "| metric | full test | 95 % CI | clean subset | 95 % CI |",
             "|---|---|---|---|---|"]
    for key, label in m["definitions"].items():
        if key in m["headline"]["metrics"]:
            lines.append(f"| {label} | {_metric_cell(m['headline'], key)} | "
                         f"{_metric_cell(clean, key)} |")
    return lines + ["", "Pooled = pixel counts summed over the split, then the ratio; "
                    "per-image = the ratio per image, then the mean (both masks empty scores "
                    "1). Threshold 0.5 on the sigmoid probability unless stated. Intervals: 95 % "
                    "BCa bootstrap over test images (scipy.stats.bootstrap)."
                    + (f" Lesion-wise: {m['lesion_rule']}." if "lesion_rule" in m else ""), "",
                    *_card_calibration(m), *_card_groups(m)]


def _card_calibration(m: dict[str, Any]) -> list[str]:
    """ECE and Brier score of the raw and the temperature-scaled probabilities."""
    cal = m.get("calibration")
    if not cal:
        return []
    lines = ["### Calibration", "",
             f"Pixel level, {cal['binning']}. Temperature T = {cal['temperature']:.3f}, "
             f"fitted on {cal['temperature_fitted_on']}; {cal['note']}.", "",
             "| probabilities | ECE | 95 % CI | Brier | 95 % CI |", "|---|---|---|---|---|"]
    for name in ("raw", "temperature_scaled", "raw_clean", "temperature_scaled_clean"):
        if name in cal:
            lines.append(f"| {name.replace('_', ' ')} | {_metric_cell(cal[name], 'ece')} | "
                         f"{_metric_cell(cal[name], 'brier')} |")
    return [*lines, ""]


def _card_groups(m: dict[str, Any]) -> list[str]:
    """The plain setting's main figures by annotation sub-class and by box-area quintile."""
    keys = ("mean_image_dice", "pooled_iou", "lesion_sensitivity", "fp_components_per_image",
            "lesion_dice")
    lines = []
    for group in ("subclass", "size_quintile"):
        blocks = m.get(f"headline_by_{group}")
        if not blocks:
            continue
        lines += [f"### By {group.replace('_', ' ')}", "", m["groups"][group] + ".", "",
                  "| " + group.replace("_", " ") + " | images | "
                  + " | ".join(f"{k} | 95 % CI" for k in keys) + " |",
                  "|---|---|" + "---|---|" * len(keys)]
        for value, block in blocks.items():
            lines.append(f"| {value} | {block['images']} | "
                         + " | ".join(_metric_cell(block, k) for k in keys) + " |")
        lines.append("")
    return lines


_CARD_INTENDED_USE = [
    "## Intended use", "",
    "Teaching and research on segmentation methods: reproducing and comparing results on "
    "this dataset. Its labels are axis-aligned boxes, so it predicts box-like regions, not "
    "tumour outlines.", "",
]


MODEL_LICENSE = "cc-by-4.0"
_NOT_A_DEVICE = """\
A research model, not a medical device: it has not been validated for, and must not be
used in, diagnosis or treatment. The brainseg code that made it is MIT-licensed (see the
repository's LICENSE).
"""
MODEL_LICENSE_TEXT = """\
The weights, model card and records in this folder are licensed under the Creative Commons
Attribution 4.0 International licence (CC BY 4.0): https://creativecommons.org/licenses/by/4.0/
(full legal code: https://creativecommons.org/licenses/by/4.0/legalcode).

They were trained on the "Brain Tumor Image DataSet: Semantic Segmentation" (Kaggle
pkdarabi / Roboflow, https://www.kaggle.com/datasets/pkdarabi/brain-tumor-image-dataset-semantic-segmentation),
itself licensed CC BY 4.0; reuse must credit that dataset and brainseg.

""" + _NOT_A_DEVICE

KAGGLE_DATASET = "Brain Tumor Image DataSet: Semantic Segmentation"
KAGGLE_LICENCE = "CC BY 4.0"
# dataset_hash of the Kaggle download: the one dataset whose licence brainseg may state itself
KAGGLE_ANNOTATIONS_SHA256 = "f5ad933edb55cdc5"
UNKNOWN = "unknown"


@dataclass(frozen=True)
class DataCredit:
    """The data a model was trained on and its licence: what its card and LICENSE credit."""

    name: str
    licence: str

    @property
    def kaggle(self) -> bool:
        return self.licence == KAGGLE_LICENCE and self.name.startswith(KAGGLE_DATASET)


def is_kaggle_data(dataset: dict[str, Any]) -> bool:
    """Whether a run's data record (``env.json``'s ``dataset``) is the Kaggle dataset or a
    resized copy of it, by the annotations' hash."""
    return KAGGLE_ANNOTATIONS_SHA256 in (
        dataset.get("annotations_sha256"),
        (dataset.get("derived_from") or {}).get("source_annotations_sha256"))


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


def credit_of(dataset: dict[str, Any]) -> DataCredit:
    """The credit a model folder's ``dataset`` record holds; an older record without a
    licence is the Kaggle dataset's only when its hash says so."""
    if dataset.get("licence"):
        return DataCredit(dataset.get("name") or UNKNOWN, dataset["licence"])
    if is_kaggle_data(dataset):
        return DataCredit(dataset.get("name") or KAGGLE_DATASET, KAGGLE_LICENCE)
    return DataCredit(dataset.get("name") or UNKNOWN, UNKNOWN)


def licence_text(info: dict[str, Any]) -> str:
    """The folder's LICENSE: CC BY 4.0 crediting the Kaggle dataset when trained on it; else
    the training data's own licence governs the weights (and a parent's, when fine-tuned)."""
    credit = credit_of(info.get("dataset") or {})
    if credit.kaggle and not info.get("parent"):
        return MODEL_LICENSE_TEXT
    parent = info.get("parent")
    return (f"The weights in this folder were trained on {credit.name} (licence: "
            f"{credit.licence}); that licence governs their reuse"
            + (f", together with the licence of the model they were fine-tuned from "
               f"({parent['path']}, see its LICENSE)" if parent else "")
            + ". brainseg adds no licence of its own to them.\n\n" + _NOT_A_DEVICE)
# the test figures a hub shows in its results widget (model-index), plain setting
_HUB_METRICS = {"pooled_iou": "pooled foreground IoU", "mean_image_dice": "mean image Dice",
                "fg_bg_miou": "foreground+background mIoU",
                "lesion_sensitivity": "lesion sensitivity",
                "fp_components_per_image": "FP components per image"}


def card_metadata(info: dict[str, Any], name: str) -> str:
    """The model card's YAML header in Hugging Face's form (licence, library, tags, the
    test figures as ``model-index``), written by ``huggingface_hub.ModelCardData`` so a hub
    labels the model rather than showing it as unlabelled."""
    from huggingface_hub import EvalResult, ModelCardData

    p, m = info["params"], info.get("test_metrics")
    credit = credit_of(info.get("dataset") or {})
    results = [EvalResult(task_type="image-segmentation", task_name="Brain tumour segmentation",
                          dataset_type=KAGGLE_ID if credit.kaggle else credit.name,
                          dataset_name=credit.name, dataset_split=m["split"], metric_type=key,
                          metric_name=label,
                          metric_value=round(float(m["headline"]["metrics"][key]), 4))
               for key, label in _HUB_METRICS.items()
               if m and key in m["headline"]["metrics"]]
    data = ModelCardData(
        license=MODEL_LICENSE if credit.kaggle else "other",
        library_name="segmentation-models-pytorch",
        pipeline_tag="image-segmentation", model_name=f"brainseg-{name}",
        tags=["segmentation-models-pytorch", "semantic-segmentation", "medical-imaging",
              "mri", "brain-tumor", p["arch"].lower(), p["encoder"], "brainseg"]
        + (["onnx"] if info.get("onnx") else []),
        eval_results=results or None)
    return f"---\n{data.to_yaml()}\n---\n"


def _card_onnx(info: dict[str, Any]) -> list[str]:
    """The ONNX files and their verification against torch, when exported."""
    o = info.get("onnx")
    if not o:
        return []
    return ["## ONNX", "",
            f"- files: {', '.join(o['files'])} (dynamic batch, height and width; exported "
            f"with torch {o['torch']} in {sum(o['export_seconds']):.0f} s; not stored in git: "
            "`brainseg export <folder> --onnx` writes them)",
            f"- verified against torch with onnxruntime {o['onnxruntime']} on "
            f"{o['verified_on']}: max |Δprobability| {o['max_abs_prob_diff']:.1e}, identical "
            f"mask pixels {o['mask_agreement']:.4%} at threshold {o['threshold']}",
            "- use: `brainseg predict --model <folder> --backend onnxruntime IMAGE... --out DIR` "
            "(the default on a CPU), or any ONNX runtime: input `images` (B,3,H,W) float32 "
            "normalised as above, H and W multiples of 32; output `logits` (B,1,H,W)",
            *_card_int8(o), ""]


def _card_int8(onnx: dict[str, Any]) -> list[str]:
    """The int8 variant's line of the ONNX section, when it was written."""
    q = onnx.get("int8")
    if not q:
        return []
    return [f"- int8: {', '.join(q['files'])} ({q['quantisation']}; calibrated on "
            f"{q['calibrated_on']}); verified like the fp32 file: max |Δprobability| "
            f"{q['max_abs_prob_diff']:.1e}, identical mask pixels {q['mask_agreement']:.4%}; "
            "use: `--backend onnxruntime-int8`"]


def _card_parent(info: dict[str, Any]) -> list[str]:
    """The model this one was fine-tuned from, when it was."""
    parent = info.get("parent")
    if not parent:
        return []
    return ["## Fine-tuned from", "",
            f"- {parent['path']} (sha256 {parent['sha256']}); its training is in its own "
            "card", ""]


def model_card(info: dict[str, Any], name: str) -> str:
    """The model card: what the model is, how it was made, what it scored, what it is not."""
    return card_metadata(info, name) + "\n".join([
        *_card_title(name), *_card_model(info), *_card_onnx(info), *_card_training(info),
        *_card_parent(info), *_card_test_metrics(info.get("test_metrics")),
        *_CARD_INTENDED_USE])


def _network_shape(p: Params) -> str:
    """What must agree for weights to carry over: architecture, encoder, input channels,
    classes (always 1 here) and decoder widths."""
    return (f"{p.arch}/{p.encoder} with {p.in_channels} input channel(s), 1 class, decoder "
            f"{list(p.decoder_channels) or 'default'}")


def _network_input(p: Params) -> str:
    """What the weights learnt to see: the resolution and the normalisation of its input."""
    return (f"image_size {p.image_size} normalised with mean {list(p.normalize_mean)} std "
            f"{list(p.normalize_std)}")


def parent_weights(path: Path, params: Params) -> tuple[dict[str, torch.Tensor],
                                                         dict[str, Any]]:
    """The weights a fine-tuning run starts from (``init_from``): a single-member model
    folder or a run directory's ``best.pt``, loaded as safely as any model (hashes, finite
    values, no code), after checking that its network is this run's; and the parent's
    record (path, weight file, sha256) for ``env.json`` and the model card."""
    path = Path(path)
    if path.is_dir() and is_model_dir(path):
        models, theirs, info = networks_from_model_dir(path)
        if len(models) != 1:
            raise ArtifactError(f"init_from {path}: a {len(models)}-member ensemble; "
                                "fine-tune from one member's run directory")
        weights = path / info["members"][0]
    elif (path / BEST_CHECKPOINT).is_file():
        weights = path / BEST_CHECKPOINT
        model, theirs, _ = network_from_checkpoint(weights)
        models = [model]
    else:
        raise ArtifactError(f"init_from {path}: neither a model folder (config.json) nor a "
                            "run directory (best.pt)")
    if _network_shape(theirs) != _network_shape(params):
        raise ArtifactError(f"init_from {path}: the parent is {_network_shape(theirs)}; this "
                            f"run is {_network_shape(params)}")
    if _network_input(theirs) != _network_input(params):
        raise ArtifactError(f"init_from {path}: the parent takes {_network_input(theirs)}; "
                            f"this run feeds {_network_input(params)} (set them as the "
                            "parent's)")
    record = {"path": str(path), "file": weights.name, "sha256": file_sha256(weights)}
    return models[0].state_dict(), record


def _refuse_other_params(model_dir: Path, expected: Params, params: Params) -> None:
    """ArtifactError listing the weight-shaping keys where ``expected`` differs from the
    model's training parameters."""
    diff = {k: (getattr(expected, k), getattr(params, k)) for k in IDENTITY_KEYS
            if getattr(expected, k) != getattr(params, k)}
    if diff:
        listed = "; ".join(f"{k}: given {a!r}, model {b!r}" for k, (a, b) in diff.items())
        raise ArtifactError(f"{model_dir}: trained with other parameters than given "
                            f"({listed}); unset model_dir to train anew")


def _laid_out_from(run_dir: Path, weights_sha256: str) -> bool:
    """Whether ``run_dir`` was already materialised from these very weights."""
    if not ((run_dir / BEST_CHECKPOINT).exists() and (run_dir / SOURCE_MODEL_FILE).exists()):
        return False
    source = json.loads((run_dir / SOURCE_MODEL_FILE).read_text())
    return source.get("weights_sha256") == weights_sha256


def _write_run_files(model_dir: Path, run_dir: Path, info: dict[str, Any],
                     params: Params) -> None:
    """The files a finished run holds: best checkpoint, parameters, environment, training
    record and history, taken from the model folder."""
    models, _, _ = networks_from_model_dir(model_dir)
    epoch = (info.get("checkpoint_epochs") or [0])[0]
    save_checkpoint(run_dir / BEST_CHECKPOINT, {"model": models[0].state_dict(),
                                                "params": params.to_dict(), "epoch": epoch,
                                                "weights": info.get("weights_init", "")})
    save_params(params, run_dir / PARAMS_FILE)
    dataset = info.get("dataset", {})
    env = dict(info.get("environment", {})) | {
        "dataset": dataset, "weights": info.get("weights_init", ""),
        "trained_on": f"shipped model {model_dir}"
                      + (f" ({dataset['provenance']})" if dataset.get("provenance") else "")}
    atomic_write_json(run_dir / ENV_FILE, env)
    record = (info.get("training") or [{}])[0]
    if record:
        atomic_write_json(run_dir / TRAIN_FILE, {k: v for k, v in record.items()
                                                 if k not in ("device", "trained_on")})
    if (model_dir / HISTORY_FILE).exists():
        shutil.copy(model_dir / HISTORY_FILE, run_dir / HISTORY_FILE)


def materialise(model_dir: str | Path, run_dir: Path, expected: Params | None = None) -> Path:
    """Lay out an exported (single) model as a finished run directory, so that evaluation,
    notebooks and reports treat a shipped model like a run trained here.

    ``expected``: the caller's parameters; where they differ from the model's training
    parameters in any key that shaped the weights (``config.IDENTITY_KEYS``), that is an
    error listing the differences.
    """
    model_dir = Path(model_dir)
    info = read_model_info(model_dir)
    params = _training_params(model_dir, info)
    if len(info["members"]) != 1:
        raise ArtifactError(f"{model_dir}: a {len(info['members'])}-member ensemble; report "
                            "it with brainseg cv, predict with brainseg predict --model")
    if expected is not None:
        _refuse_other_params(model_dir, expected, params)
    weights_sha256 = _weights_hash(model_dir, info)
    if _laid_out_from(run_dir, weights_sha256):
        return run_dir
    _write_run_files(model_dir, run_dir, info, params)
    atomic_write_json(run_dir / SOURCE_MODEL_FILE, {
        "model_dir": str(model_dir.resolve()), "weights_sha256": weights_sha256})
    return run_dir


def _weights_hash(model_dir: Path, info: dict[str, Any]) -> str:
    digest = hashlib.sha256()
    for name in info["members"]:
        digest.update((model_dir / name).read_bytes())
    return digest.hexdigest()[:16]


def record_metrics(model_dir: str | Path, metrics: dict[str, Any]) -> None:
    """Put an evaluation's metrics into a model folder's ``brainseg.json`` and model card
    (what ``brainseg evaluate --model DIR --record`` does after scoring it)."""
    model_dir = Path(model_dir)
    info = json.loads((model_dir / INFO_FILE).read_text())
    info["test_metrics"] = metrics
    atomic_write_json(model_dir / INFO_FILE, info)
    atomic_write_text(model_dir / "README.md", model_card(info, model_dir.name))
