"""Reading a model folder: smp's own format (``save_pretrained``: ``config.json`` +
``model.safetensors``) plus ``brainseg.json`` (:class:`ModelInfo`: how it was trained, on
what data, what it scored, the sha256 of every file) and a model card ``README.md``. A fold
ensemble is one folder with one weight file per member and the same config.

Every network is loaded after its weight file's hash matched the recorded one, without
running code (safetensors), and every failure is one line naming the file.
"""

from __future__ import annotations

import json
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

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
INFO_FILE = "brainseg.json"
CARD_FILE = "README.md"
LICENSE_FILE = "LICENSE"
FORMAT = "brainseg model 1"


@dataclass
class ModelInfo:
    """``brainseg.json``: how the model was trained, on what data, what it scored, and the
    sha256 of each file (None in an export older than hashes). Keys it does not know are
    kept as they are in ``extra``."""

    params: dict[str, Any]
    members: list[str] = field(default_factory=lambda: [WEIGHTS_FILE])
    format: str = FORMAT
    stored_as: str = "float32"
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
        """``brainseg.json`` of ``model_dir``, read as JSON and nothing else."""
        path = model_dir / INFO_FILE
        if not path.is_file():
            raise ArtifactError(f"{path}: missing; a brainseg model folder holds {CONFIG_FILE}, "
                                f"{INFO_FILE} and weights (made by brainseg export)")
        try:
            record = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ArtifactError(f"{path}: unreadable JSON ({err})") from None
        if not isinstance(record, dict):
            raise ArtifactError(f"{path}: not a JSON object")
        return cls.from_dict(record)

    def save(self, model_dir: Path, name: str = "") -> None:
        """Write ``brainseg.json`` and the card made from it, each atomically."""
        atomic_write_json(model_dir / INFO_FILE, self.to_dict())
        atomic_write_text(model_dir / CARD_FILE, model_card(self, name or model_dir.name))

    def save_licence(self, model_dir: Path) -> None:
        atomic_write_text(model_dir / LICENSE_FILE, licence_text(self))

    def training_params(self, model_dir: Path) -> Params:
        try:
            return params_from_record(self.params, source=str(model_dir / INFO_FILE))
        except (ParamsError, KeyError, TypeError) as err:
            raise ArtifactError(f"{model_dir / INFO_FILE}: invalid parameters ({err})") from None


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
    """The folder's record and smp config, cross-checked, and its member weights' hashes
    verified against the record."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ArtifactError(f"{model_dir}: model folder not found")
    info = ModelInfo.load(model_dir)
    config = _read_config(model_dir)
    params = info.training_params(model_dir)
    expected = f"{params.arch}/{params.encoder}"
    found = f"{config['_model_class']}/{config.get('encoder_name')}"
    if found.lower() != expected.lower():
        raise ArtifactError(f"{model_dir}: config.json describes {found}, brainseg.json "
                            f"{expected}")
    for name in info.members:
        if not (model_dir / name).is_file():
            raise ArtifactError(f"{model_dir / name}: weights missing (the folder has a model "
                                "card but no weights)")
    verify_hashes(model_dir, info, info.members)
    return ModelFolder(model_dir, info, config, params)


def _read_config(model_dir: Path) -> dict[str, Any]:
    """smp's ``config.json``, naming a model class smp has."""
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; a brainseg model folder holds {CONFIG_FILE}, "
                            f"{INFO_FILE} and weights (made by brainseg export)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path}: unreadable JSON ({err})") from None
    if not isinstance(config, dict) or "_model_class" not in config:
        raise ArtifactError(f"{path}: not a segmentation_models_pytorch config (no "
                            "_model_class; is it from another library?)")
    if not hasattr(smp, str(config["_model_class"])):
        raise ArtifactError(f"{path}: unknown smp model class {config['_model_class']}")
    return config


def verify_hashes(model_dir: Path, info: ModelInfo, names: list[str]) -> None:
    """Each file's sha256 against the one ``brainseg.json`` recorded at export: weights
    changed afterwards (damaged, or swapped) are refused with one line.

    A folder exported before hashes were recorded is read with a warning, not refused: its
    owner can add them by exporting again, and refusing would strand every older export.
    """
    if info.sha256 is None:
        warnings.warn(f"{model_dir / INFO_FILE}: records no sha256 of the weights (an older "
                      "export); their integrity is not checked", stacklevel=3)
        return
    for name in names:
        found = file_sha256(model_dir / name)
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
        model = getattr(smp, folder.config["_model_class"])(**(config | {
            "encoder_weights": None}))
        try:
            state = load_file(folder.path / name, device="cpu")
        except (SafetensorError, OSError) as err:
            raise ArtifactError(f"{folder.path / name}: not readable safetensors "
                                f"(truncated or corrupt: {err})") from None
        load_weights(model, state, folder.path / name, expected)
        members.append(model)
    return members


def networks_from_model_dir(model_dir: str | Path,
                            ) -> tuple[list[nn.Module], Params, dict[str, Any]]:
    """The member networks (one, or k for a fold ensemble), their training parameters and
    the folder's record (``brainseg.json`` as a dict)."""
    folder = open_model_folder(model_dir)
    return member_networks(folder), folder.params, folder.info.to_dict()


def record_metrics(model_dir: str | Path, metrics: dict[str, Any]) -> None:
    """Put an evaluation's metrics into a model folder's ``brainseg.json`` and model card
    (what ``brainseg evaluate --model DIR --record`` does after scoring it)."""
    model_dir = Path(model_dir)
    info = ModelInfo.load(model_dir)
    info.test_metrics = metrics
    info.save(model_dir)
