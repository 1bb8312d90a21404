"""The model a fine-tuning run starts from (``init_from``): its weights, loaded as safely as
any model, after checking that it is this run's network fed this run's input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from brainseg_lib.config import Params
from brainseg_lib.io import file_sha256
from brainseg_lib.model.checkpoint import ArtifactError, network_from_checkpoint
from brainseg_lib.model.folder import is_model_dir, member_networks, open_model_folder
from brainseg_lib.rundir import BEST_CHECKPOINT


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
    values, no code), after checking that its network and input are this run's; and the
    parent's record (path, weight file, sha256) for ``env.json`` and the model card."""
    path = Path(path)
    if path.is_dir() and is_model_dir(path):
        folder = open_model_folder(path)
        if len(folder.info.members) != 1:
            raise ArtifactError(f"init_from {path}: a {len(folder.info.members)}-member "
                                "ensemble; fine-tune from one member's run directory")
        model, theirs = member_networks(folder)[0], folder.params
        weights = path / folder.info.members[0]
        sha256 = (folder.info.sha256 or {}).get(weights.name) or file_sha256(weights)
    elif (path / BEST_CHECKPOINT).is_file():
        weights = path / BEST_CHECKPOINT
        model, theirs, _ = network_from_checkpoint(weights)
        sha256 = file_sha256(weights)
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
    return model.state_dict(), {"path": str(path), "file": weights.name, "sha256": sha256}
