"""A model folder's ONNX files: each member exported (and, with ``int8``, quantised),
verified against torch on real images, and recorded with its hash in ``brainseg.json``; and
the verified files found again when a model is loaded. The engines themselves are in
:mod:`brainseg_lib.model.onnx_export`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from brainseg_lib.config import Params
from brainseg_lib.io import file_sha256
from brainseg_lib.model.checkpoint import ArtifactError
from brainseg_lib.model.folder import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ModelInfo,
    member_networks,
    open_model_folder,
    verify_hashes,
)
from brainseg_lib.model.schema import is_file_in

ONNX_FILE = "model.onnx"  # one per member: model-fold0.onnx ... beside model-fold0.safetensors
INT8_SUFFIX = ".int8.onnx"  # the int8 variant of each: model.int8.onnx, model-fold0.int8.onnx


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
    from brainseg_lib.model.device import FP32
    from brainseg_lib.model.forward import ForwardPass

    source = data_source(params)
    arrays = load_split_arrays(source.path, "valid", params.image_size, params.cache_path())
    # the engines take contiguous fp32 input: the forward pass prepares it as for inference
    normalize = ForwardPass.build(params, torch.device("cpu"), FP32, channels_last=False).prepare
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

    folder = open_model_folder(model_dir)
    models, params, info = member_networks(folder), folder.params, folder.info
    batches, images, calibration, calibrated_on = _verification_batches(params)
    files = onnx_names(info.members)
    seconds, figures = _write_verified(
        folder.path, models, files, batches, params.threshold, "ONNX",
        lambda model, path: export_onnx(model, path, params.in_channels, params.image_size))
    stale = int8_names(info.members)  # made from the ONNX files just replaced
    for file in stale:
        (folder.path / file).unlink(missing_ok=True)
    # an older folder gets its weights' and config's hashes too: they just loaded, finite,
    # whole and matching the record
    info.sha256 = {m: file_sha256(folder.path / m) for m in [*info.members, CONFIG_FILE]} | {
        k: v for k, v in (info.sha256 or {}).items() if k not in stale} | {
        f: file_sha256(folder.path / f) for f in files}
    info.onnx = {
        "files": files, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
        "export_seconds": [round(s, 1) for s in seconds], "verified_on": images,
        "bounds": {"min_mask_agreement": MIN_MASK_AGREEMENT, "max_abs_prob_diff": MAX_PROB_DIFF},
        **figures, "threshold": params.threshold}
    info.save(folder.path, name)
    if int8:
        _add_int8(folder.path, name, models, params, (batches, calibration, calibrated_on))
    return ModelInfo.load(folder.path).onnx or {}


def _add_int8(model_dir: Path, name: str, models: list[nn.Module], params: Params,
              data: tuple[list[Any], list[Any], str]) -> None:
    """Quantise each verified fp32 ONNX file to int8 (static, calibrated on validation
    images: ``data`` is the verification batches, the calibration batches and their
    description) and verify it against torch like the fp32 one, with the int8 bound.

    A miss is an ArtifactError naming its figures and leaves no int8 file; the fp32 files,
    already verified and recorded, stay.
    """
    from brainseg_lib.model.onnx_export import (
        INT8_MAX_PROB_DIFF,
        MIN_MASK_AGREEMENT,
        quantize_int8,
    )

    batches, calibration, calibrated_on = data
    info = ModelInfo.load(model_dir)
    onnx = info.onnx or {}
    sources, files = onnx["files"], int8_names(info.members)
    source_of = dict(zip(files, sources, strict=True))
    seconds, figures = _write_verified(
        model_dir, models, files, batches, params.threshold, "int8",
        lambda _, path: quantize_int8(model_dir / source_of[path.name], path, calibration),
        refused=f"; refused ({sources[0]} stays, verified)")
    info.sha256 = (info.sha256 or {}) | {f: file_sha256(model_dir / f) for f in files}
    onnx["int8"] = {
        "files": files, "quantisation": "onnxruntime quantize_static: QDQ, per-channel int8 "
        "weights, uint8 activations, min/max calibration", "calibrated_on": calibrated_on,
        "quantise_seconds": [round(s, 1) for s in seconds],
        "bounds": {"min_mask_agreement": MIN_MASK_AGREEMENT,
                   "max_abs_prob_diff": INT8_MAX_PROB_DIFF},
        **figures}
    info.save(model_dir, name)


def verified_onnx(model_dir: str | Path, int8: bool = False) -> list[Path] | None:
    """The ONNX files (``int8``: their int8 variants) of a model folder when they were
    verified at export and are present, else None (hashes are checked when loaded)."""
    model_dir = Path(model_dir)
    try:
        record = ModelInfo.load(model_dir).onnx
    except ArtifactError:
        return None
    if record and int8:
        record = record.get("int8")
    if not record or not all(is_file_in(model_dir, f) for f in record["files"]):
        return None
    return [model_dir / f for f in record["files"]]


def onnx_members_from_model_dir(model_dir: str | Path, int8: bool = False,
                                ) -> tuple[list[Path], Params, dict[str, Any]]:
    """The verified ONNX files (``int8``: their int8 variants) of a model folder, their
    hashes checked, its training parameters and record; an ArtifactError when it has none."""
    folder = open_model_folder(model_dir)
    files = verified_onnx(folder.path, int8)
    if files is None:
        kind, flags = ("model.int8.onnx", "--onnx --int8") if int8 else (ONNX_FILE, "--onnx")
        raise ArtifactError(f"{folder.path}: no verified {kind}; write one with brainseg "
                            f"export {folder.path} {flags}")
    verify_hashes(folder.path, folder.info, [f.name for f in files])
    return files, folder.params, folder.info.to_dict()
