"""One typed parameter set for every run, loaded from a flat YAML file.

The same flat file is what papermill injects into the notebooks (``-f params/X.yaml``),
so a key means the same thing on the command line, in a notebook and in a saved run.
Unlike papermill, which only warns, an unknown key is an error naming the closest known key.
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml


class ParamsError(ValueError):
    """A parameter file or value is invalid; the message names the file and the key."""


def project_root() -> Path:
    """The checkout holding this package (relative paths in parameters resolve against it)."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "pyproject.toml").exists() else Path.cwd()


@dataclass
class Params:
    """Everything a run depends on. Defaults are the reference method at 256 px on the real data."""

    # --- identity and data
    profile: str = "custom"  # name shown in reports (smoke, quick, seed, reference)
    data_dir: str = ""  # "": $BRAINSEG_DATA, then data/brain-tumor-coco, else synthetic demo
    synthetic: bool = False  # force the built-in synthetic demo dataset
    synthetic_counts: list[int] = field(default_factory=lambda: [96, 24, 24])  # train/valid/test
    synthetic_size: int = 128  # side of the synthetic images
    image_size: int = 256  # model resolution (square); masks resized by area + 0.5 threshold
    limit_train_images: int = 0  # 0 = all; otherwise a seeded subset of the train split
    cache_dir: str = ""  # "" = $BRAINSEG_CACHE or ~/.cache/brainseg
    normalize_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    normalize_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    folds_file: str = ""  # cross-validation: folds.json over train+valid (brainseg cv)
    fold: int = -1  # -1 = the dataset's own train/valid split; k = hold out fold k of folds_file
    duplicate_bits: int = 4  # pHash distance at or under which two images are near-duplicates

    # --- model
    arch: str = "Unet"
    encoder: str = "resnet34"
    encoder_weights: str = "none"  # imagenet | none | path to a local .pt/.pth/.safetensors
    require_pretrained: bool = False  # make unavailable ImageNet weights an error, not a warning
    in_channels: int = 3
    model_dir: str = ""  # an exported model (brainseg export) to report on instead of training

    # --- optimisation
    loss: Literal["bce", "dice", "bce_dice", "focal"] = "bce"
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = 1e-4
    weight_decay: float = 0.0
    scheduler: Literal["none", "cosine"] = "none"
    warmup_epochs: int = 0
    epochs: int = 50  # upper bound; early stopping usually ends sooner
    batch_size: int = 16
    monitor: Literal["val_loss", "val_iou"] = "val_loss"  # early stopping and best checkpoint
    patience: int = 5  # epochs without improvement before stopping; 0 disables early stopping
    min_delta: float = 1e-4  # smallest change of the monitored value that counts as improvement
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    max_train_minutes: float = 0.0  # wall-clock cap on training; 0 = none
    train_minutes: float = 0.0  # time budget: the schedule runs over it, training ends with it
    ema: bool = False  # validate and keep an exponential moving average of the weights
    ema_decay: float = 0.999  # per optimiser step

    # --- augmentation (train only; applied to image and mask together)
    augment: bool = False
    aug_hflip: float = 0.5  # probability
    aug_vflip: float = 0.0
    aug_rotate_deg: float = 10.0
    aug_scale: float = 0.1  # zoom in [1 - s, 1 + s]
    aug_shift: float = 0.05  # fraction of the side
    aug_brightness: float = 0.1  # additive, in [0, 1] pixel units
    aug_contrast: float = 0.1  # multiplicative, around the image mean

    # --- execution
    seed: int = 42
    deterministic: bool = False  # cudnn/algorithms deterministic (slower on GPU)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "fp16", "none"] = "auto"  # auto = bf16 on CUDA, fp32 on CPU
    channels_last: bool = True
    compile: Literal["auto"] | bool = "auto"  # torch.compile the training step; auto = on CUDA
    num_threads: int = 0  # torch CPU threads; 0 = torch's default
    num_workers: int = 0
    pin_memory: bool = True  # only used on CUDA
    progress_bar: bool = True  # tqdm bars while training (the report pipeline turns them off)
    runs_dir: str = "runs"
    run_id: str = ""  # "" = <timestamp>-<profile>
    resume: str = ""  # run directory to continue from its last.pt

    # --- evaluation
    threshold: float = 0.5  # on the sigmoid probability
    tune_threshold: bool = True  # pick the best threshold on valid, report it on test too
    eval_original_size: bool = True  # also score predictions resized back to the source size
    tta: bool = True  # also report horizontal-flip test-time augmentation
    bootstrap: int = 1000  # resamples for the 95 % confidence intervals; 0 = off
    min_component_px: int = 20  # post-processing: components smaller than this are dropped
    n_examples: int = 6  # overlays per gallery in the reports

    # --- comparison (notebooks/05_compare)
    compare: list[str] = field(default_factory=list)  # run ids, run dirs, sweep/CV folders

    def __post_init__(self) -> None:
        _check_types(self)
        _check_ranges(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def cache_path(self) -> Path | None:
        """The decoded-image cache folder, or None for the default."""
        return self.resolve_path(self.cache_dir) if self.cache_dir else None

    def resolve_path(self, value: str) -> Path:
        """Relative paths in parameters are relative to the project root, not the cwd."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else project_root() / path


PARAM_NAMES = tuple(f.name for f in fields(Params))
# what shapes a measurement or a report, never the weights: taken from the call at evaluation,
# free to change on resume, and not what notebook 02 is given
MEASUREMENT_KEYS = ("threshold", "tune_threshold", "eval_original_size", "tta", "bootstrap",
                    "min_component_px", "n_examples", "compare")


def _closest(key: str) -> str:
    match = difflib.get_close_matches(key, PARAM_NAMES, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = get_origin(annotation)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation in (str, bool):
        return isinstance(value, annotation)
    if origin is Literal:
        return value in get_args(annotation)
    if origin is list:
        (item,) = get_args(annotation)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in get_args(annotation))
    return True


def _check_types(params: Params) -> None:
    hints = typing.get_type_hints(Params)
    for f in fields(params):
        value = getattr(params, f.name)
        annotation = hints[f.name]
        if annotation is float and isinstance(value, int) and not isinstance(value, bool):
            setattr(params, f.name, float(value))
            continue
        if not _type_ok(value, annotation):
            allowed = get_args(annotation) if get_origin(annotation) is Literal else annotation
            raise ParamsError(f"parameter '{f.name}' = {value!r}: expected {allowed}")


_RANGES: dict[str, tuple[float, float]] = {
    "image_size": (32, 2048),
    "synthetic_size": (32, 1024),
    "limit_train_images": (0, 10**7),
    "in_channels": (1, 4),
    "lr": (1e-7, 1.0),
    "weight_decay": (0.0, 1.0),
    "warmup_epochs": (0, 1000),
    "epochs": (1, 10000),
    "batch_size": (1, 4096),
    "patience": (0, 10000),
    "min_delta": (0.0, 1.0),
    "grad_clip": (0.0, 1e6),
    "max_train_minutes": (0.0, 1e5),
    "train_minutes": (0.0, 1e5),
    "ema_decay": (0.0, 0.99999),
    "fold": (-1, 100),
    "duplicate_bits": (0, 64),
    "aug_hflip": (0.0, 1.0),
    "aug_vflip": (0.0, 1.0),
    "aug_rotate_deg": (0.0, 180.0),
    "aug_scale": (0.0, 0.9),
    "aug_shift": (0.0, 0.5),
    "aug_brightness": (0.0, 1.0),
    "aug_contrast": (0.0, 0.9),
    "num_threads": (0, 1024),
    "num_workers": (0, 64),
    "threshold": (0.0, 1.0),
    "bootstrap": (0, 100000),
    "min_component_px": (0, 10**7),
    "n_examples": (0, 100),
}


def _check_ranges(params: Params) -> None:
    for name, (low, high) in _RANGES.items():
        value = getattr(params, name)
        if not low <= value <= high:
            raise ParamsError(f"parameter '{name}' = {value!r} is outside [{low}, {high}]")
    if params.image_size % 32:
        raise ParamsError(f"parameter 'image_size' = {params.image_size} must be a multiple of 32")
    if len(params.synthetic_counts) != 3 or min(params.synthetic_counts) < 1:
        raise ParamsError("parameter 'synthetic_counts' must be three positive counts")
    if len(params.normalize_mean) != 3 or len(params.normalize_std) != 3:
        raise ParamsError("parameters 'normalize_mean'/'normalize_std' need three values")
    if min(params.normalize_std) <= 0:
        raise ParamsError("parameter 'normalize_std' must be positive")


def params_from_dict(values: dict[str, Any], source: str = "<dict>") -> Params:
    """Build parameters from a flat mapping; unknown keys are errors naming the closest key."""
    unknown = [k for k in values if k not in PARAM_NAMES]
    if unknown:
        hints = "; ".join(f"'{k}'{_closest(k)}" for k in unknown)
        raise ParamsError(f"{source}: unknown parameter {hints}")
    try:
        return Params(**values)
    except ParamsError as err:
        raise ParamsError(f"{source}: {err}") from None


def read_params_file(path: str | Path, kind: str = "parameter file") -> dict[str, Any]:
    """The raw mapping of a YAML parameter (or sweep grid) file, with errors naming it."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: {kind} not found")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(values, dict):
        raise ParamsError(f"{path}: expected a flat mapping of key: value")
    return values


def load_params(path: str | Path, **overrides: Any) -> Params:
    """Load and validate a flat YAML parameter file; keyword overrides win."""
    values = read_params_file(path) | overrides
    return params_from_dict(values, source=str(path))


def profile_path(profile: str) -> Path:
    return project_root() / "params" / f"{profile}.yaml"


def params_from_notebook(namespace: dict[str, Any], before: set[str]) -> Params:
    """Parameters of a notebook run: its profile's file, overlaid with what papermill injected.

    ``before`` is the set of global names that existed before the parameters cell, so every
    name defined since then is a parameter: an injected typo is caught here, before any work.
    A parameter left at ``None`` (how the parameters cells declare them) keeps the profile's
    value.
    """
    injected = {k: v for k, v in namespace.items()
                if k not in before and not k.startswith("_") and v is not None}
    profile = injected.get("profile", "smoke")
    base_file = profile_path(profile)
    base = read_params_file(base_file) if base_file.exists() else {}
    return params_from_dict(base | injected, source=f"notebook parameters (profile {profile})")


def save_params(params: Params, path: Path) -> None:
    from brainseg_lib.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(params.to_dict(), sort_keys=False))

