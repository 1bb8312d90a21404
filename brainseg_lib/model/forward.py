"""The forward pass, written once: a batch prepared as the network takes it (on its device,
normalised, in its memory format) and its logits computed in the resolved precision.

The training step, validation and inference all call it, so what the network sees and the
precision it runs in cannot drift apart between them; logits come back in float32, so
losses and metrics are computed in fp32 whatever the autocast dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from brainseg_lib.config import Params
from brainseg_lib.model.device import FP32, PROBE_BATCH, Precision
from brainseg_lib.model.network import Normalizer


def place_model(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """The network on ``device``, its weights in the memory format its inputs will have."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


@dataclass
class ForwardPass:
    """Batch to logits: normalisation, memory format, device and precision in one place."""

    normalizer: Normalizer
    device: torch.device
    precision: Precision
    channels_last: bool

    @classmethod
    def build(cls, params: Params, device: torch.device, precision: Precision,
              channels_last: bool | None = None) -> ForwardPass:
        """The pass ``params`` describe; ``channels_last`` False for an engine (ONNX) that
        takes contiguous input whatever the parameters say."""
        return cls(Normalizer(params.normalize_mean, params.normalize_std, device), device,
                   precision, params.channels_last if channels_last is None else channels_last)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """A uint8 batch, or a [0, 1] float one (augmented), as the network takes it."""
        x = self.normalizer(images.to(self.device))
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def logits(self, model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
               ) -> torch.Tensor:
        """``model``'s logits for a prepared batch, run in the precision, as float32."""
        with self.precision.context(self.device):
            return model(x).float()


def probe_batch(params: Params, device: torch.device, size: int,
                images: int = PROBE_BATCH) -> torch.Tensor:
    """A seeded random batch of the network's input shape, prepared as the network takes it:
    what a precision probe times (speed does not depend on what the pixels show)."""
    x = torch.rand(min(images, PROBE_BATCH), params.in_channels, size, size,
                   generator=torch.Generator().manual_seed(0))
    return ForwardPass.build(params, device, FP32).prepare(x)
