"""Where and in what precision a network runs: the device choice and the autocast dtype,
shared by training and inference.
"""

from __future__ import annotations

import torch

from brainseg_lib.config import Params


def select_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for but CUDA is not available")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def autocast_dtype(params: Params, device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA by default; fp32 on the CPU, where bf16 autocast is slower."""
    if device.type != "cuda" or params.amp == "none":
        return None
    return torch.float16 if params.amp == "fp16" else torch.bfloat16
