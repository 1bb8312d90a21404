"""Reading a model folder: smp's own format (``save_pretrained``: ``config.json`` +
``model.safetensors``) plus ``brainseg.json`` (:class:`ModelInfo`: how it was trained, on
what data, what it scored, the sha256 of every file) and a model card ``README.md``. A fold
ensemble is one folder with one weight file per member and the same config.

A folder is untrusted input: ``brainseg.json`` is checked against its schema before
anything else is read (:mod:`brainseg_lib.model.schema`), every file it names is a plain file
of the folder, ``config.json`` and each weight file are hashed against the record before
they are read, smp builds only its own architectures, and every failure is one line naming
the file. Nothing runs code (safetensors).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
from torch import nn

from brainseg_lib.config import Params, ParamsError, params_from_record
from brainseg_lib.io import atomic_write_json, atomic_write_text, file_sha256
from brainseg_lib.model.card import licence_text, model_card
from brainseg_lib.model.checkpoint import ArtifactError, load_weights
from brainseg_lib.model.network import SMP_ARCHITECTURES
from brainseg_lib.model.schema import (
    FORMAT,
    check_record,
    file_in,
    read_json_object,
    short_value,
)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
INFO_FILE = "brainseg.json"
CARD_FILE = "README.md"
LICENSE_FILE = "LICENSE"


@dataclass
class ModelInfo:
    """``brainseg.json``: how the model was trained, on what data, what it scored, and the
    sha256 of each file (None in an export older than hashes). Keys it does not know are
    kept as they are in ``extra``."""

    format: str = FORMAT
    members: list[str] = field(default_factory=lambda: [WEIGHTS_FILE])
    stored_as: str = "float32"
    params: dict[str, Any] = field(default_factory=dict)  # required in a file (the schema)
    runs: list[str] = field(default_factory=list)
    training: list[dict[str, Any]] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    weights_init: str = ""
    checkpoint_epochs: list[int] = field(default_factory=list)
    parent: dict[str, Any] | None = None
    test_metrics: dict[str, Any] | None = None
    sha256: dict[str, str] | None = None
    onnx: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> ModelInfo:
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in record.items() if k in known},
                   extra={k: v for k, v in record.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        """The record as written: ``sha256`` and ``onnx`` only once there are some."""
        record = asdict(self)
        return {k: v for k, v in record.items() if k != "extra"
                and not (k in ("sha256", "onnx") and v is None)} | self.extra

    @classmethod
    def load(cls, model_dir: Path) -> ModelInfo:
        """``brainseg.json`` of ``model_dir``, checked against its schema."""
        path = model_dir / INFO_FILE
        if not path.exists():
            raise ArtifactError(f"{path}: missing; a brainseg model folder holds {CONFIG_FILE}, "
                                f"{INFO_FILE} and weights (made by brainseg export)")
        record = read_json_object(file_in(model_dir, INFO_FILE))
        check_record(path, record)
        return cls.from_dict(record)

    def save(self, model_dir: Path, name: str = "") -> None:
        """Write ``brainseg.json`` and the card made from it, each atomically."""
        atomic_write_json(model_dir / INFO_FILE, self.to_dict())
        atomic_write_text(model_dir / CARD_FILE, model_card(self, name or model_dir.name))

    def save_licence(self, model_dir: Path) -> None:
        atomic_write_text(model_dir / LICENSE_FILE, licence_text(self))

    def training_params(self, model_dir: Path) -> Params:
        """The parameters the model was trained with, naming one of smp's architectures."""
        path = model_dir / INFO_FILE
        try:
            params = params_from_record(self.params, source=str(path))
        except (ParamsError, KeyError, TypeError, ValueError) as err:
            raise ArtifactError(f"{path}: key 'params': invalid parameters ({err})") from None
        if params.arch.lower() not in {a.lower() for a in SMP_ARCHITECTURES}:  # smp's own rule
            raise ArtifactError(f"{path}: key 'params.arch': {params.arch!r} is none of smp's "
                                f"architectures ({', '.join(sorted(SMP_ARCHITECTURES))})")
        return params


def is_model_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file() or (Path(path) / INFO_FILE).is_file()


@dataclass(frozen=True)
class ModelFolder:
    """A model folder whose record, config and member weights were checked: what loading
    it needs, read once."""

    path: Path
    info: ModelInfo
    config: dict[str, Any]  # smp's config.json
    params: Params


def open_model_folder(model_dir: str | Path) -> ModelFolder:
    """The folder's record (checked first), its smp config (hashed, then read and
    cross-checked against the record) and its member weight files (hashed)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ArtifactError(f"{model_dir}: model folder not found")
    info = ModelInfo.load(model_dir)
    params = info.training_params(model_dir)
    if info.sha256 is not None and CONFIG_FILE not in info.sha256:
        warnings.warn(f"{model_dir / INFO_FILE}: records no sha256 of {CONFIG_FILE} (an "
                      f"older export); it is checked against {INFO_FILE} only", stacklevel=2)
    verify_hashes(model_dir, info, [CONFIG_FILE] if CONFIG_FILE in (info.sha256 or {}) else [])
    config = _read_config(model_dir, params)
    for name in info.members:
        if not (model_dir / name).exists():
            raise ArtifactError(f"{model_dir / name}: weights missing (the folder has a model "
                                "card but no weights)")
    verify_hashes(model_dir, info, info.members)
    return ModelFolder(model_dir, info, config, params)


def _read_config(model_dir: Path, params: Params) -> dict[str, Any]:
    """smp's ``config.json``: one of smp's architectures, describing the network the record
    says was trained (architecture, encoder, input channels, one class of logits)."""
    path = model_dir / CONFIG_FILE
    if not path.exists():
        raise ArtifactError(f"{path}: missing; a brainseg model folder holds {CONFIG_FILE}, "
                            f"{INFO_FILE} and weights (made by brainseg export)")
    config = read_json_object(file_in(model_dir, CONFIG_FILE))
    if "_model_class" not in config:
        raise ArtifactError(f"{path}: not a segmentation_models_pytorch config (no "
                            "_model_class; is it from another library?)")
    model_class = config["_model_class"]
    if not isinstance(model_class, str) or model_class not in SMP_ARCHITECTURES:
        raise ArtifactError(f"{path}: key '_model_class': {short_value(model_class)} is none of "
                            "smp's architectures")
    if model_class.lower() != params.arch.lower():
        raise ArtifactError(f"{path}: key '_model_class' is {model_class!r}, {INFO_FILE} says "
                            f"{params.arch!r}; refused")
    expected = {"encoder_name": params.encoder, "in_channels": params.in_channels,
                "classes": 1, "activation": None, "aux_params": None}
    if params.decoder_channels:
        expected["decoder_channels"] = list(params.decoder_channels)
    for key, value in expected.items():
        found = config.get(key, None if value is None else "(absent)")
        if found != value or type(found) is not type(value):
            raise ArtifactError(f"{path}: key '{key}' is {short_value(found)}, {INFO_FILE} says "
                                f"{value!r}; refused")
    return config


def verify_hashes(model_dir: Path, info: ModelInfo, names: list[str]) -> None:
    """Each file's sha256 against the one ``brainseg.json`` recorded at export: a file
    changed afterwards (damaged, or swapped) is refused with one line, as is one that is not
    a plain file of the folder.

    A folder exported before hashes were recorded is read with a warning, not refused: its
    owner can add them by exporting again, and refusing would strand every older export.
    """
    if info.sha256 is None:
        for name in names:
            file_in(model_dir, name)
        warnings.warn(f"{model_dir / INFO_FILE}: records no sha256 of the weights (an older "
                      "export); their integrity is not checked", stacklevel=3)
        return
    for name in names:
        found = file_sha256(file_in(model_dir, name))
        if info.sha256.get(name) != found:
            raise ArtifactError(f"{model_dir / name}: sha256 {found} differs from "
                                f"{info.sha256.get(name)} recorded in {INFO_FILE} (changed "
                                "after export); refused")


def member_networks(folder: ModelFolder) -> list[nn.Module]:
    """The member networks of a checked folder, built from its config and loaded from
    safetensors (nothing runs); equivalent to ``smp.from_pretrained(dir,
    encoder_weights=None)`` but every failure is one line."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = {k: v for k, v in folder.config.items() if not k.startswith("_")}
    expected = f"{folder.params.arch}/{folder.params.encoder}"
    members = []
    for name in folder.info.members:
        model = _build(folder, config)
        try:
            state = load_file(folder.path / name, device="cpu")
        except (SafetensorError, OSError) as err:
            raise ArtifactError(f"{folder.path / name}: not readable safetensors "
                                f"(truncated or corrupt: {err})") from None
        load_weights(model, state, folder.path / name, expected)
        members.append(model)
    return members


def _build(folder: ModelFolder, config: dict[str, Any]) -> nn.Module:
    """smp's architecture built from the folder's config, never fetching weights."""
    try:
        return getattr(smp, folder.config["_model_class"])(**(config | {
            "encoder_weights": None}))
    except Exception as err:  # smp's own checks of an untrusted config, whatever they raise
        raise ArtifactError(f"{folder.path / CONFIG_FILE}: smp cannot build "
                            f"{folder.config['_model_class']} from it ({type(err).__name__}: "
                            f"{str(err)[:120]})") from None


def networks_from_model_dir(model_dir: str | Path,
                            ) -> tuple[list[nn.Module], Params, ModelInfo]:
    """The member networks (one, or k for a fold ensemble), their training parameters and
    the folder's record (``brainseg.json``)."""
    folder = open_model_folder(model_dir)
    return member_networks(folder), folder.params, folder.info


def record_metrics(model_dir: str | Path, metrics: dict[str, Any]) -> None:
    """Put an evaluation's metrics into a model folder's ``brainseg.json`` and model card
    (what ``brainseg evaluate --model DIR --record`` does after scoring it)."""
    model_dir = Path(model_dir)
    info = ModelInfo.load(model_dir)
    info.test_metrics = metrics
    info.save(model_dir)
