"""Model factory: an smp architecture with a named encoder and explicit weight provenance.

ImageNet weights come from the Hugging Face hub. Offline, huggingface_hub retries for ~25 s
before failing, so we probe the hub for 2 s first and use the local HF cache or fall back to
random initialisation with a warning, which :func:`create_model` also returns so the run's
metadata records where its weights came from.
"""

from __future__ import annotations

import pickle
import socket
import warnings
from pathlib import Path

import segmentation_models_pytorch as smp
import torch
from torch import nn

from brainseg_lib.config import ParamsError
from brainseg_lib.errors import BrainsegError

HUB_HOST = "huggingface.co"
# smp's architectures (its model classes): the only names a model folder may ask it to build
SMP_ARCHITECTURES = frozenset(
    name for name in smp.__all__
    if isinstance(getattr(smp, name), type) and issubclass(getattr(smp, name), nn.Module))


class PretrainedWeightsError(BrainsegError, RuntimeError):
    """Requested pretrained weights could not be loaded and ``require_pretrained`` is set."""


def _hub_reachable(timeout: float = 2.0) -> bool:
    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_state_file(path: Path) -> dict[str, torch.Tensor]:
    """A weights file's tensors; a pickle that needs more than tensors is refused unread."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise PretrainedWeightsError(
            f"{path}: refused: it needs more than tensors and plain values to load, so it "
            f"was not unpickled ({str(err).strip().splitlines()[0][:200]})") from None
    return state.get("model", state.get("state_dict", state)) if isinstance(state, dict) else state


def _load_encoder_weights(model: nn.Module, path: Path) -> None:
    """Accept an encoder state dict or a whole smp model's (``encoder.``-prefixed keys)."""
    state = _load_state_file(path)
    prefixed = {k.removeprefix("encoder."): v for k, v in state.items()
                if k.startswith("encoder.")}
    model.encoder.load_state_dict(prefixed or state)


def _cached_imagenet_file(encoder: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache
    from segmentation_models_pytorch.encoders import encoders

    settings = encoders.get(encoder, {}).get("pretrained_settings", {}).get("imagenet")
    if not settings:
        return None
    found = try_to_load_from_cache(settings["repo_id"], "model.safetensors",
                                   revision=settings.get("revision"))
    return Path(found) if isinstance(found, str) else None


def build_network(arch: str, encoder: str, in_channels: int = 3,
                  weights: str | None = None,
                  decoder_channels: list[int] | None = None) -> nn.Module:
    """The smp network with one output channel of logits; ``weights=None`` never touches the
    network (what loading a checkpoint or model folder needs). ``decoder_channels``: the
    decoder's widths, deepest first (None or empty: smp's default for the architecture)."""
    widths = {"decoder_channels": tuple(decoder_channels)} if decoder_channels else {}
    try:
        return smp.create_model(arch, encoder_name=encoder, encoder_weights=weights,
                                in_channels=in_channels, classes=1, **widths)
    except KeyError as err:
        raise ParamsError(f"unknown architecture or encoder: {err}") from None


def create_model(arch: str = "Unet", encoder: str = "resnet34", encoder_weights: str = "none",
                 in_channels: int = 3, require_pretrained: bool = False,
                 decoder_channels: list[int] | None = None) -> tuple[nn.Module, str]:
    """Build the network (one output channel of logits) and say where its weights came from.

    ``encoder_weights``: ``imagenet``, ``none`` or a path to a local weights file.
    Returns ``(model, provenance)``; provenance is a sentence for the run's metadata.
    """
    def build(weights: str | None) -> nn.Module:
        return build_network(arch, encoder, in_channels, weights, decoder_channels)

    choice = encoder_weights.strip()
    if choice.lower() in ("", "none", "null", "random"):
        return build(None), "random initialisation (encoder_weights: none)"
    if choice.lower() != "imagenet":
        path = Path(choice).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"encoder_weights file {path} does not exist")
        model = build(None)
        try:
            _load_encoder_weights(model, path)
        except PretrainedWeightsError:
            raise  # already one line naming the file
        except (RuntimeError, KeyError, OSError) as err:
            raise PretrainedWeightsError(
                f"{path}: not an encoder state dict for {encoder}: {str(err)[:300]}") from None
        return model, f"encoder weights from {path}"

    if _hub_reachable():
        return build("imagenet"), "ImageNet encoder weights (Hugging Face hub)"
    cached = _cached_imagenet_file(encoder)
    if cached:
        model = build(None)
        _load_encoder_weights(model, cached)
        return model, f"ImageNet encoder weights (local cache {cached})"
    message = (f"ImageNet weights for {encoder} are not available: {HUB_HOST} cannot be "
               "reached and they are not in the local Hugging Face cache")
    if require_pretrained:
        raise PretrainedWeightsError(message + " (require_pretrained: true)")
    warnings.warn(message + "; falling back to random initialisation", stacklevel=2)
    return build(None), "random initialisation (ImageNet weights unavailable offline)"


class Normalizer:
    """The model's input normalisation: uint8 or [0, 1] float (B,3,H,W) to float32 with
    per-channel mean/std, its constants made once on the device (no host-to-device copy,
    and so no wait for the GPU, per batch). Training and inference both use it."""

    def __init__(self, mean: list[float], std: list[float], device: torch.device):
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        return (x - self.mean) / self.std
