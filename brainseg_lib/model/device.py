"""Where and in what precision a network runs: the device, and one resolved
:class:`Precision` (the autocast dtype, or fp32, and why) that training, validation and
inference all run under.

On CUDA, bf16 autocast by default (fp16 on request). On the CPU, bf16 autocast pays only
where the CPU computes bf16 natively (the ``avx512_bf16`` or ``amx_bf16`` flags); elsewhere
it is emulated and slower. So ``amp: auto`` on a CPU with those flags times a few steps of
the actual network in each precision and keeps bf16 only when it is clearly faster; without
the flags it stays fp32 and times nothing. The choice is made once per process and network
and is recorded with the run.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch

from brainseg_lib.config import Params, ParamsError
from brainseg_lib.rundir import cpu_info

BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of native bf16 arithmetic
BF16_MARGIN = 0.95  # probed bf16 is kept when its step takes at most this share of fp32's
PROBE_STEPS = 2  # timed steps per precision in the probe, after one warm-up step each
PROBE_BATCH = 4  # at most this many images per probe step: a few seconds in all

# seconds per step by precision name ("fp32", "bf16"): what a probe measures
Probe = Callable[[], dict[str, float]]
_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_CHOICES: dict[tuple[str, str, str, str], Precision] = {}  # probed choices, one per network


@dataclass(frozen=True)
class Precision:
    """The precision a network runs in: an autocast dtype (None: plain fp32) and why."""

    autocast: torch.dtype | None = None
    reason: str = "fp32"
    cpu_flags: tuple[str, ...] = ()
    probe_seconds: dict[str, float] | None = field(default=None, hash=False, compare=False)

    @property
    def name(self) -> str:
        return _NAMES[self.autocast]

    def context(self, device: torch.device) -> AbstractContextManager[Any]:
        """Autocast in this precision on ``device`` (a no-op for fp32)."""
        return torch.autocast(device.type, dtype=self.autocast,
                              enabled=self.autocast is not None)

    def record(self) -> dict[str, Any]:
        """What a run records (env.json, train.json): the choice, why, the CPU's native-bf16
        flags and the probe's seconds per step (null when nothing was timed)."""
        return {"name": self.name, "reason": self.reason, "cpu_bf16_flags": list(self.cpu_flags),
                "probe_seconds_per_step": self.probe_seconds}


FP32 = Precision(None, "fp32")


def select_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ParamsError("device: cuda was asked for but CUDA is not available")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


@cache
def cpu_bf16_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, ...]:
    """The native-bf16 flags this CPU reports (none where /proc/cpuinfo is absent)."""
    flags = cpu_info(cpuinfo)["flags"]
    return tuple(f for f in BF16_FLAGS if f in flags)


def time_precisions(step: Callable[[torch.dtype | None], None], steps: int = PROBE_STEPS,
                    clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """The best seconds per ``step`` in fp32 and in bf16 autocast: one warm-up step each
    (oneDNN picks its kernels), then ``steps`` timed ones, alternating so that a change in
    the machine's load falls on both."""
    dtypes = {"fp32": None, "bf16": torch.bfloat16}
    best = dict.fromkeys(dtypes, math.inf)
    for dtype in dtypes.values():
        step(dtype)
    for _ in range(steps):
        for name, dtype in dtypes.items():
            start = clock()
            step(dtype)
            best[name] = min(best[name], clock() - start)
    return best


def _cpu_auto(flags: tuple[str, ...], probe: Probe | None) -> Precision:
    """``amp: auto`` on the CPU: bf16 only with native bf16 and a probe that finds it faster."""
    if not flags:
        return Precision(None, "fp32: no native bf16 on this CPU (neither avx512_bf16 nor "
                         "amx_bf16), not probed")
    if probe is None:
        return Precision(None, "fp32: native bf16, but no probe of the network", flags)
    seconds = probe()
    faster = seconds["bf16"] <= BF16_MARGIN * seconds["fp32"]
    verdict = "faster" if faster else "not faster"
    return Precision(torch.bfloat16 if faster else None,
                     f"{'bf16' if faster else 'fp32'}: native bf16 ({', '.join(flags)}) and "
                     f"bf16 {verdict} in the probe ({seconds['bf16']:.3f} s vs fp32 "
                     f"{seconds['fp32']:.3f} s per step)", flags, seconds)


def _decide(amp: str, device: torch.device, flags: tuple[str, ...],
            probe: Probe | None) -> Precision:
    if amp == "none":
        return Precision(None, "fp32: amp: none", flags)
    if device.type == "cuda":
        fp16 = amp == "fp16"
        return Precision(torch.float16 if fp16 else torch.bfloat16,
                         f"{'fp16' if fp16 else 'bf16'} autocast on CUDA (amp: {amp})")
    if device.type != "cpu" or amp == "fp16":
        return Precision(None, f"fp32: amp: {amp} is for CUDA; {device.type} runs fp32", flags)
    if amp == "bf16":
        native = "native" if flags else "emulated: no native bf16 on this CPU"
        return Precision(torch.bfloat16, f"bf16: amp: bf16 ({native})", flags)
    return _cpu_auto(flags, probe)


def resolve_precision(params: Params, device: torch.device, probe: Probe | None = None,
                      flags: tuple[str, ...] | None = None) -> Precision:
    """The precision for ``params.amp`` on ``device``: ``none`` fp32, ``bf16``/``fp16``
    forced (fp16 on CUDA only), ``auto`` bf16 on CUDA and on the CPU as :func:`_cpu_auto`
    decides. ``probe`` times the caller's network; a probed choice is kept for the rest of
    the process (per network), so training, validation and inference agree and the probe
    runs once. ``flags``: the CPU's native-bf16 flags (default: read from /proc/cpuinfo)."""
    key = (device.type, params.amp, params.arch, params.encoder)
    if key in _CHOICES:
        return _CHOICES[key]
    flags = cpu_bf16_flags() if flags is None else flags
    choice = _decide(params.amp, device, flags, probe)
    if choice.probe_seconds is not None:
        _CHOICES[key] = choice
        print(f"precision: {choice.reason}", file=sys.stderr, flush=True)
    return choice
