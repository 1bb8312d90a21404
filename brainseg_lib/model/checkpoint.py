"""Checkpoints that load without running code.

A checkpoint (``best.pt``/``last.pt``) holds only tensors and plain Python values and is read
with ``torch.load(weights_only=True)``: a file that would need anything else to unpickle is
refused with one line, and nothing in it is executed. A truncated file or one of another
architecture is one line naming the file and the problem.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from brainseg_lib.config import Params, ParamsError, params_from_record
from brainseg_lib.errors import BrainsegError
from brainseg_lib.io import atomic_write
from brainseg_lib.model.network import build_network

PLAIN_TYPES = (str, int, float, bool, type(None))


class ArtifactError(BrainsegError, ValueError):
    """A checkpoint or model folder cannot be used; the message names the file and why."""


def _check_plain(value: Any, where: str = "") -> None:
    """Refuse, before saving, anything weights_only loading would reject (numpy scalars...)."""
    if isinstance(value, torch.Tensor) or type(value) in PLAIN_TYPES:  # not np.float64
        return
    if isinstance(value, dict):
        for k, v in value.items():
            _check_plain(k, where)
            _check_plain(v, f"{where}.{k}")
        return
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"checkpoint value {where or '<root>'} is a {type(value).__name__}; "
                    "only tensors and plain Python values are saved")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically after checking it holds only tensors and plain values."""
    _check_plain(state)
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's contents, loaded with ``weights_only=True`` (nothing is executed)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0][:200]
        raise ArtifactError(f"{path}: refused: it needs more than tensors and plain values "
                            f"to load, so it was not unpickled ({first})") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise ArtifactError(f"{path}: not a readable checkpoint (truncated or corrupt: "
                            f"{str(err).strip().splitlines()[0][:160]})") from None
    if not isinstance(state, dict) or "model" not in state or "params" not in state:
        raise ArtifactError(f"{path}: not a brainseg checkpoint (no 'model' and 'params')")
    return state


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], path: Path,
                 expected: str) -> None:
    """Strict load; a mismatch is one line naming the file, what was expected and found."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        found = _describe_keys(state)
        raise ArtifactError(
            f"{path}: weights do not fit {expected} ({len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(shapes)} wrong-shaped tensors; found "
            f"{found})")
    refuse_non_finite(state, path)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v
                           for k, v in state.items()})


def refuse_non_finite(state: dict[str, torch.Tensor], path: Path) -> None:
    """ArtifactError when a weight holds NaN or inf: such a network writes empty or random
    masks without any error, so damaged weights must stop at loading, not at the result."""
    bad = [k for k, v in state.items()
           if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ArtifactError(f"{path}: {len(bad)} weight tensor(s) hold NaN or inf (first "
                            f"'{bad[0]}'); refused")


def _describe_keys(state: dict[str, torch.Tensor]) -> str:
    """A guess at what produced a state dict, for error messages."""
    n = sum(v.numel() for v in state.values() if isinstance(v, torch.Tensor))
    first = next(iter(state), "nothing")
    return f"{len(state)} tensors, {n / 1e6:.1f} M values, first key '{first}'"


def network_from_checkpoint(path: str | Path) -> tuple[nn.Module, Params, dict[str, Any]]:
    """Network, training parameters and the checkpoint's contents, loaded safely."""
    path = Path(path)
    state = read_checkpoint(path)
    try:
        params = params_from_record(state["params"], source=str(path))
    except (ParamsError, TypeError) as err:
        raise ArtifactError(f"{path}: its parameters are invalid: {err}") from None
    model = build_network(params.arch, params.encoder, params.in_channels,
                          decoder_channels=params.decoder_channels)
    load_weights(model, state["model"], path, f"{params.arch}/{params.encoder}")
    return model, params, state
