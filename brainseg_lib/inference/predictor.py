"""A trained model ready to predict: loaded safely from a checkpoint, a run directory or a
model folder (one member or a fold ensemble), and turned into probabilities for uint8
batches or for images of any size (padded to a square, not squashed).

Two engines run the members: torch (in the resolved precision), or onnxruntime for a model
folder with verified ONNX files (fp32, or their int8 variants with ``onnxruntime-int8``);
``auto`` picks by the kind of processor (``AUTO_ENGINES``). Either way a member is
called on the same normalised batch, so padding, flip TTA, the ensemble mean and thresholds
live here once for both.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from brainseg_lib.config import Params, ParamsError
from brainseg_lib.data.arrays import resize_image
from brainseg_lib.model.checkpoint import ArtifactError, network_from_checkpoint
from brainseg_lib.model.device import (
    FP32,
    Precision,
    Probe,
    cpu_bf16_flags,
    resolve_precision,
    select_device,
    time_precisions,
)
from brainseg_lib.model.folder import is_model_dir, networks_from_model_dir
from brainseg_lib.model.forward import ForwardPass, place_model, probe_batch
from brainseg_lib.model.onnx_files import onnx_members_from_model_dir, verified_onnx
from brainseg_lib.rundir import BEST_CHECKPOINT, SOURCE_MODEL_FILE

Backend = Literal["auto", "torch", "onnxruntime", "onnxruntime-int8"]
BACKENDS = ("auto", "torch", "onnxruntime", "onnxruntime-int8")


@dataclass
class LoadedModel:
    """One network, or the members of a fold ensemble, with their training parameters.

    A member maps a normalised float batch to logits: a torch network, or an
    ``OnnxMember`` (``backend`` ``onnxruntime`` or ``onnxruntime-int8``, on the CPU).
    """

    members: list[Callable[[torch.Tensor], torch.Tensor]]
    params: Params
    device: torch.device
    epoch: int
    source: str = ""  # where the weights came from, for reports
    backend: str = "torch"
    precision: Precision | None = None  # None: resolved from params (no probe) when first used

    @property
    def model(self) -> nn.Module:
        return self.members[0]

    @cached_property
    def forward_pass(self) -> ForwardPass:
        """How a batch becomes logits here; an ONNX engine takes fp32, contiguous input."""
        if self.backend != "torch":
            return ForwardPass.build(self.params, self.device, self.precision or FP32, False)
        precision = self.precision or resolve_precision(self.params, self.device)
        return ForwardPass.build(self.params, self.device, precision)


def _to_device(models: list[nn.Module], params: Params, device: str) -> tuple[
        list[nn.Module], torch.device]:
    dev = select_device(device if device != "auto" else params.device)
    return [place_model(m, dev, params.channels_last).eval() for m in models], dev


def _onnx_folder(path: Path) -> Path | None:
    """The model folder whose ONNX files may stand in for ``path``: the folder itself, or
    the one a run directory was laid out from (``source_model.json``)."""
    if path.is_dir() and is_model_dir(path):
        return path
    source = path / SOURCE_MODEL_FILE
    if path.is_dir() and source.is_file():
        folder = Path(json.loads(source.read_text()).get("model_dir", ""))
        return folder if is_model_dir(folder) else None
    return None


# --backend auto: the engines to try by kind of processor, the first available one wins.
# torch is the reference engine (its precision: resolve_precision); onnxruntime counts only
# with a verified model.onnx; int8 is never picked (its masks differ slightly: by name only).
AUTO_ENGINES = {
    "cuda": ("torch",),  # bf16 autocast
    "cpu-bf16": ("torch",),  # native bf16: torch, in bf16 where its probe finds that faster
    "cpu": ("onnxruntime", "torch"),  # no native bf16: fp32, onnxruntime's graph if verified
}


def processor_kind(device: str) -> str:
    """``cuda``, ``cpu-bf16`` (a CPU with native bf16: avx512_bf16 or amx_bf16) or ``cpu``."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu-bf16" if cpu_bf16_flags() else "cpu"


def resolve_backend(path: str | Path, device: str, backend: Backend) -> str:
    """The engine: as asked, or for ``auto`` the first of ``AUTO_ENGINES`` for this kind of
    processor that is available (onnxruntime: the model folder has verified ONNX files)."""
    if backend not in BACKENDS:
        raise ParamsError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    folder = _onnx_folder(Path(path))

    def available(engine: str) -> bool:
        return engine == "torch" or bool(folder and verified_onnx(folder))

    return next(e for e in AUTO_ENGINES[processor_kind(device)] if available(e))


def _load_onnx(path: Path, device: str, backend: str) -> LoadedModel:
    """The members as onnxruntime sessions of the folder's verified ONNX files (their int8
    variants for ``onnxruntime-int8``)."""
    from brainseg_lib.model.onnx_export import OnnxMember

    if device == "cuda":
        raise ParamsError(f"backend {backend} runs on the CPU; use --backend torch on cuda")
    folder = _onnx_folder(path)
    if folder is None:
        raise ArtifactError(f"{path}: backend onnxruntime needs a model folder with a "
                            "verified model.onnx (brainseg export DIR --onnx)")
    files, params, info = onnx_members_from_model_dir(folder, backend == "onnxruntime-int8")
    members = [OnnxMember(f, params.num_threads) for f in files]
    epoch = int((info.get("checkpoint_epochs") or [0])[0])
    graph = "int8" if backend == "onnxruntime-int8" else "fp32"
    return LoadedModel(members, params, torch.device("cpu"), epoch, str(folder), backend,
                       Precision(None, f"{backend}: the verified {graph} ONNX graph"))


def load_model(path: str | Path, device: str = "auto", backend: Backend = "torch",
               ) -> LoadedModel:
    """The one way to get a model for inference: a checkpoint file, a run directory (its
    best.pt) or an exported model folder (one member, or a fold ensemble), loaded safely.

    ``backend``: ``torch``; ``onnxruntime`` (a model folder's verified ONNX files, or those
    of the folder a run was laid out from); ``onnxruntime-int8`` (their verified int8
    variants); ``auto`` (:func:`resolve_backend`)."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: no such run directory, model folder or checkpoint")
    backend = resolve_backend(path, device, backend)
    if backend != "torch":
        return _load_onnx(path, device, backend)
    if path.is_dir() and is_model_dir(path):
        models, params, info = networks_from_model_dir(path)
        epoch = int((info.checkpoint_epochs or [0])[0])
    else:
        if path.is_dir():
            if not (path / BEST_CHECKPOINT).is_file():
                raise ArtifactError(f"{path}: neither a model folder (config.json) nor a run "
                                    "directory (best.pt)")
            path = path / BEST_CHECKPOINT
        model, params, state = network_from_checkpoint(path)
        models, epoch = [model], int(state.get("epoch", 0))
    members, dev = _to_device(models, params, device)
    precision = resolve_precision(params, dev, inference_probe(members[0], params, dev))
    return LoadedModel(members, params, dev, epoch, str(path), precision=precision)


def inference_probe(model: nn.Module, params: Params, device: torch.device) -> Probe:
    """Seconds per forward pass in fp32 and bf16 of the network (in eval mode, so nothing in
    it changes) on ``PROBE_BATCH`` images at its input size."""
    def measure() -> dict[str, float]:
        x = probe_batch(params, device, params.image_size)

        def step(dtype: torch.dtype | None) -> None:
            with torch.inference_mode(), Precision(dtype).context(device):
                model(x)

        return time_precisions(step)

    return measure


@torch.inference_mode()
def predict_both(loaded: LoadedModel, images_u8: torch.Tensor,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B,1,H,W) float32 without and with horizontal-flip TTA, from one forward pass
    of the image and one of its mirror per member.

    TTA averages the logits of the image and its mirror inside each member; an ensemble
    averages its members' probabilities (returned as the logit of the mean).
    """
    run = loaded.forward_pass
    x = run.prepare(images_u8)
    plain, tta = [], []
    for model in loaded.members:
        logits = run.logits(model, x)
        plain.append(logits)
        tta.append((logits + run.logits(model, x.flip(-1)).flip(-1)) / 2)
    return _combine(plain), _combine(tta)


@torch.inference_mode()
def predict_logits(loaded: LoadedModel, images_u8: torch.Tensor, tta: bool = False,
                   ) -> torch.Tensor:
    """Logits (B,1,H,W) in float32 for a uint8 batch (B,3,H,W); see :func:`predict_both`."""
    if tta:
        return predict_both(loaded, images_u8)[1]
    run = loaded.forward_pass
    x = run.prepare(images_u8)
    return _combine([run.logits(model, x) for model in loaded.members])


def _combine(member_logits: list[torch.Tensor]) -> torch.Tensor:
    if len(member_logits) == 1:
        return member_logits[0]
    mean = torch.stack([torch.sigmoid(o) for o in member_logits]).mean(0)
    return torch.logit(mean.clamp(1e-7, 1 - 1e-7))


def pad_to_square(rgb: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """Centre an image on a black square (the MRI background); returns it and (top, left).

    The training images are square, so a model has only seen undistorted anatomy: padding
    keeps a non-square image's aspect ratio where squashing would stretch it. Measured on
    non-square crops of the validation split (``benchmarks/bench_fit.py``): mean image Dice
    0.722 padded vs 0.644 squashed with the model shipped until 2026-12-07.
    """
    h, w = rgb.shape[:2]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    square = np.zeros((side, side, *rgb.shape[2:]), rgb.dtype)
    square[top:top + h, left:left + w] = rgb
    return square, (top, left)


def predict_images(loaded: LoadedModel, images: list[np.ndarray], tta: bool = False,
                   ) -> list[np.ndarray]:
    """Tumour probabilities (H,W) float32 for RGB uint8 images of any sizes, in one batch.

    Each image is padded to a square (:func:`pad_to_square`) and resized to the model's
    input; its probabilities are resized back and cropped to its own size.
    """
    size = loaded.params.image_size
    padded = [pad_to_square(rgb) for rgb in images]
    x = torch.from_numpy(np.stack([resize_image(square, size) for square, _ in padded]))
    probs = torch.sigmoid(predict_logits(loaded, x, tta))
    out = []
    for i, (rgb, (square, (top, left))) in enumerate(zip(images, padded, strict=True)):
        full = F.interpolate(probs[i:i + 1], size=square.shape[:2], mode="bilinear",
                             align_corners=False)[0, 0]
        out.append(full[top:top + rgb.shape[0], left:left + rgb.shape[1]].cpu().numpy())
    return out
