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

from brainseg_lib.errors import BrainsegError


class ParamsError(BrainsegError, ValueError):
    """A parameter file or value is invalid; the message names the file and the key."""


def project_root() -> Path:
    """The checkout holding this package (relative paths in parameters resolve against it)."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "pyproject.toml").exists() else Path.cwd()


ROLES = {
    "label": "names the run; shapes nothing",
    "data": "where the data is and how it is read (its identity is checked by hash)",
    "weights": "shapes the weights: fixed once a run starts, part of a model's identity",
    "budget": "how long training may go: part of a model's identity, may grow on resume",
    "execution": "how and where it runs; the weights are the same recipe either way",
    "run": "where the run is written and which run it is",
    "measurement": "shapes a measurement or a report, never the weights",
}
GROUPS = ("data", "training", "validation", "evaluation", "figures", "comparison", "run")


def _param(default: Any, groups: str | tuple[str, ...], role: str, help: str,
           range: tuple[float, float] | None = None) -> Any:
    """A ``Params`` field with its groups (the notebooks that take it), its role (what it
    shapes: :data:`ROLES`), its help text and its allowed range."""
    groups = (groups,) if isinstance(groups, str) else groups
    assert role in ROLES and set(groups) <= set(GROUPS), (role, groups)
    meta = {"groups": groups, "role": role, "help": help, "range": range}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Params:
    """Everything a run depends on. Defaults are the reference method at 256 px on the real data.

    Each field's metadata is the one source of what it is: its notebook groups, its role
    (what it shapes), its help and its range. Resume-safe keys, a model's identity keys,
    the evaluation settings, the notebooks' parameters cells and
    ``docs/reference/parameters.md`` are all derived from it.
    """

    # --- identity and data
    profile: str = _param("custom", (), "label", "name shown in reports (smoke, quick, seed, "
                          "reference)")
    data_dir: str = _param("", "data", "data", "\"\": $BRAINSEG_DATA, then data/brain-tumor-coco, "
                           "else the synthetic demo")
    synthetic: bool = _param(False, "data", "data", "force the built-in synthetic demo dataset")
    synthetic_counts: list[int] = _param([96, 24, 24], "data", "data",
                                         "synthetic images per split: train, valid, test")
    synthetic_size: int = _param(128, "data", "data", "side of the synthetic images",
                                 (32, 1024))
    image_size: int = _param(256, "data", "weights", "model resolution (square, a multiple of "
                             "32); masks resized by area + 0.5 threshold", (32, 2048))
    crop_size: int = _param(0, "training", "weights", "train on random crop_size patches of "
                            "the image_size image (0 = whole images); validation and test "
                            "see whole images", (0, 2048))
    fg_oversample: float = _param(0.0, "training", "weights", "fraction of training patches "
                                  "placed to contain tumour (nnU-Net: 0.33)", (0.0, 1.0))
    limit_train_images: int = _param(0, "data", "weights", "0 = all; otherwise a seeded subset "
                                     "of the train split", (0, 10**7))
    cache_dir: str = _param("", "data", "execution", "decoded-image cache; \"\" = "
                            "$BRAINSEG_CACHE or ~/.cache/brainseg")
    normalize_mean: list[float] = _param([0.485, 0.456, 0.406], "data", "weights",
                                         "per-channel mean of [0, 1] pixels")
    normalize_std: list[float] = _param([0.229, 0.224, 0.225], "data", "weights",
                                        "per-channel std of [0, 1] pixels")
    folds_file: str = _param("", "data", "data", "cross-validation: folds.json over "
                             "train+valid (written by brainseg cv)")
    fold: int = _param(-1, "data", "weights", "-1 = the dataset's own train/valid split; k = "
                       "hold out fold k of folds_file", (-1, 100))
    duplicate_bits: int = _param(4, ("data", "evaluation"), "measurement", "pHash distance at "
                                 "or under which two images are near-duplicates", (0, 64))

    # --- model
    arch: str = _param("Unet", "training", "weights", "smp architecture")
    encoder: str = _param("resnet34", "training", "weights", "smp encoder (tu-* for timm's)")
    encoder_weights: str = _param("none", "training", "weights", "imagenet | none | path to a "
                                  "local .pt/.pth/.safetensors")
    require_pretrained: bool = _param(False, "training", "execution", "make unavailable "
                                      "ImageNet weights an error, not a warning")
    in_channels: int = _param(3, "training", "weights", "input channels: images are read "
                              "as RGB and normalised per channel", (3, 3))
    decoder_channels: list[int] = _param([], "training", "weights", "decoder widths, deepest "
                                         "first; [] = smp's default (256, 128, 64, 32, 16)")
    report_model: str = _param("", "training", "run", "an exported model (brainseg export) "
                               "that the reports lay out as this run and show, instead of "
                               "training (brainseg train refuses it)")
    init_from: str = _param("", "training", "weights", "fine-tune: start from this model folder "
                            "(models/NAME) or run directory instead of encoder_weights; its "
                            "network must be this run's")
    freeze_encoder_epochs: int = _param(0, "training", "weights", "fine-tune: train the "
                                        "decoder only for the first N epochs (encoder fixed)",
                                        (0, 10000))

    # --- optimisation
    loss: Literal["bce", "dice", "bce_dice", "focal", "focal_dice"] = _param(
        "bce", "training", "weights", "training loss")
    optimizer: Literal["adam", "adamw"] = _param("adam", "training", "weights", "optimiser")
    lr: float = _param(1e-4, "training", "weights", "peak learning rate", (1e-7, 1.0))
    weight_decay: float = _param(0.0, "training", "weights", "weight decay", (0.0, 1.0))
    scheduler: Literal["none", "cosine"] = _param("none", "training", "weights",
                                                  "learning-rate schedule after warm-up")
    warmup_epochs: int = _param(0, "training", "weights", "linear warm-up", (0, 1000))
    epochs: int = _param(50, "training", "budget", "upper bound; early stopping or the time "
                         "budget usually ends sooner", (1, 10000))
    batch_size: int = _param(16, "training", "weights", "global batch (all processes)",
                             (1, 4096))
    monitor: Literal["val_loss", "val_iou"] = _param("val_loss", "training", "weights",
                                                     "early stopping and best checkpoint")
    patience: int = _param(5, "training", "budget", "epochs without improvement before "
                           "stopping; 0 disables early stopping", (0, 10000))
    min_delta: float = _param(1e-4, "training", "weights", "smallest change of the monitored "
                              "value that counts as improvement", (0.0, 1.0))
    grad_clip: float = _param(0.0, "training", "weights", "max gradient norm; 0 = off",
                              (0.0, 1e6))
    train_minutes: float = _param(0.0, "training", "budget", "time budget: the schedule runs "
                                  "over it, training ends with it; 0 = none", (0.0, 1e5))
    ema: bool = _param(False, "training", "weights", "validate and keep an exponential moving "
                       "average of the weights")
    ema_decay: float = _param(0.999, "training", "weights", "EMA decay per optimiser step",
                              (0.0, 0.99999))

    # --- augmentation (train only; applied to image and mask together)
    augment: bool = _param(False, "training", "weights", "augment training batches")
    aug_hflip: float = _param(0.5, "training", "weights", "probability of a horizontal flip",
                              (0.0, 1.0))
    aug_vflip: float = _param(0.0, "training", "weights", "probability of a vertical flip",
                              (0.0, 1.0))
    aug_rotate_deg: float = _param(10.0, "training", "weights", "rotation in [-d, d] degrees",
                                   (0.0, 180.0))
    aug_scale: float = _param(0.1, "training", "weights", "zoom in [1 - s, 1 + s]", (0.0, 0.9))
    aug_shift: float = _param(0.05, "training", "weights", "shift, fraction of the side",
                              (0.0, 0.5))
    aug_brightness: float = _param(0.1, "training", "weights", "additive, in [0, 1] pixel "
                                   "units", (0.0, 1.0))
    aug_contrast: float = _param(0.1, "training", "weights", "multiplicative, around the "
                                 "image mean", (0.0, 0.9))

    # --- execution
    seed: int = _param(42, ("training", "evaluation", "figures"), "weights", "seeds training, "
                       "bootstrap resampling and the random gallery")
    deterministic: bool = _param(False, "training", "execution", "deterministic kernels "
                                 "(slower on GPU)")
    device: Literal["auto", "cpu", "cuda"] = _param("auto", "run", "execution", "auto = cuda "
                                                    "when available")
    amp: Literal["auto", "bf16", "fp16", "none"] = _param(
        "auto", "training", "execution", "auto = bf16 on CUDA; on a CPU with native bf16 "
        "(avx512_bf16, amx_bf16) bf16 where a short probe finds it faster, else fp32")
    channels_last: bool = _param(True, "training", "execution", "channels-last memory format")
    compile: Literal["auto"] | bool = _param("auto", "training", "execution", "torch.compile "
                                             "the training step; auto = on CUDA")
    num_threads: int = _param(0, "training", "execution", "torch CPU threads; 0 = torch's "
                              "default", (0, 1024))
    progress_bar: bool = _param(True, "training", "execution", "tqdm bars while training (the "
                                "report pipeline turns them off)")
    runs_dir: str = _param("runs", "run", "run", "folder of run directories")
    run_id: str = _param("", "run", "run", "\"\" = <timestamp>-<profile>")
    resume: str = _param("", "training", "run", "run directory to continue from its last.pt")
    tracking_uri: str = _param("", "run", "execution", "MLflow tracking store (needs the "
                               "brainseg[mlflow] extra): sqlite:///mlflow.db, http://host:5000; "
                               "\"\" = off")

    # --- evaluation
    threshold: float = _param(0.5, ("evaluation", "validation"), "measurement",
                              "a pixel is tumour when its sigmoid probability reaches it",
                              (0.0, 1.0))
    tune_threshold: bool = _param(True, "evaluation", "measurement", "pick the best threshold "
                                  "on valid, report it on test too")
    eval_original_size: bool = _param(True, "evaluation", "measurement", "also score "
                                      "predictions resized back to the source size")
    tta: bool = _param(True, "evaluation", "measurement", "also consider horizontal-flip "
                       "test-time augmentation")
    bootstrap: int = _param(1000, "evaluation", "measurement", "resamples for the 95 % "
                            "confidence intervals; 0 = off", (0, 100000))
    min_component_px: int = _param(20, "evaluation", "measurement", "post-processing: "
                                   "components smaller than this are dropped", (0, 10**7))
    min_lesion_sensitivity: float = _param(0.0, "evaluation", "measurement", "operating "
                                           "point: the best pooled IoU among the settings "
                                           "whose lesion sensitivity on valid reaches this; "
                                           "0 = pooled IoU alone", (0.0, 1.0))
    n_examples: int = _param(6, "figures", "measurement", "overlays per gallery in the "
                             "reports", (0, 100))

    # --- comparison (notebooks/05_compare)
    compare: list[str] = _param([], "comparison", "measurement", "run ids, run dirs, "
                                "sweep/CV folders")

    def __post_init__(self) -> None:
        _check_types(self)
        _check_ranges(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def patch_size(self) -> int | None:
        """The side of the training patches; None where training sees whole images (no
        ``crop_size``, or one at least ``image_size``)."""
        return self.crop_size if 0 < self.crop_size < self.image_size else None

    def cache_path(self) -> Path | None:
        """The decoded-image cache folder, or None for the default."""
        return self.resolve_path(self.cache_dir) if self.cache_dir else None

    def resolve_path(self, value: str) -> Path:
        """Relative paths in parameters are relative to the project root, not the cwd."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else project_root() / path


PARAM_NAMES = tuple(f.name for f in fields(Params))
# keys that were parameters once: dropped from saved records, explained when given anew
RETIRED = {
    "num_workers": "batches are served from memory on the training device; no DataLoader",
    "pin_memory": "batches are served from memory on the training device; no DataLoader",
    "max_train_minutes": "use train_minutes (a time budget the schedule runs over)",
}
# keys that were renamed: saved records load under the new name, files given anew must use it
RENAMED = {"model_dir": "report_model"}


def names(*, groups: tuple[str, ...] = (), roles: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Parameter names in ``Params`` order, of any of ``groups`` and any of ``roles``."""
    return tuple(f.name for f in fields(Params)
                 if (not groups or set(groups) & set(f.metadata["groups"]))
                 and (not roles or f.metadata["role"] in roles))


# what may change when a run is resumed: more budget, other execution or measurement settings
RESUMABLE_KEYS = names(roles=("budget", "execution", "run", "measurement", "label"))
# what makes a trained model what it is: a shipped model is reused only when these agree
IDENTITY_KEYS = names(roles=("weights", "budget"))


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


def _check_ranges(params: Params) -> None:
    for f in fields(params):
        if f.metadata["range"] is None:
            continue
        (low, high), value = f.metadata["range"], getattr(params, f.name)
        if not low <= value <= high:
            raise ParamsError(f"parameter '{f.name}' = {value!r} is outside [{low}, {high}]")
    if params.image_size % 32:
        raise ParamsError(f"parameter 'image_size' = {params.image_size} must be a multiple of 32")
    if params.crop_size and (params.crop_size % 32 or params.crop_size > params.image_size):
        raise ParamsError(f"parameter 'crop_size' = {params.crop_size} must be 0 or a multiple "
                          f"of 32 no larger than image_size ({params.image_size})")
    if params.decoder_channels and (len(params.decoder_channels) != 5
                                    or min(params.decoder_channels) < 1):
        raise ParamsError("parameter 'decoder_channels' must be [] or five positive widths")
    if params.fg_oversample and not params.crop_size:
        raise ParamsError("parameter 'fg_oversample' needs crop_size (patches to place)")
    if len(params.synthetic_counts) != 3 or min(params.synthetic_counts) < 1:
        raise ParamsError("parameter 'synthetic_counts' must be three positive counts")
    if len(params.normalize_mean) != 3 or len(params.normalize_std) != 3:
        raise ParamsError("parameters 'normalize_mean'/'normalize_std' need three values")
    if min(params.normalize_std) <= 0:
        raise ParamsError("parameter 'normalize_std' must be positive")


def params_from_dict(values: dict[str, Any], source: str = "<dict>") -> Params:
    """Build parameters from a flat mapping; unknown keys are errors naming the closest key."""
    odd = [k for k in values if not isinstance(k, str)]
    if odd:  # YAML reads yes/no/on/off, numbers and dates as such, also as keys
        raise ParamsError(f"{source}: parameter name {odd[0]!r} is a {type(odd[0]).__name__}, "
                          "not a name (quote it if it is meant as one)")
    retired = [f"'{k}' ({RETIRED[k]})" for k in values if k in RETIRED]
    if retired:
        raise ParamsError(f"{source}: parameter no longer used: {'; '.join(retired)}")
    renamed = [f"'{k}' is now '{RENAMED[k]}'" for k in values if k in RENAMED]
    if renamed:
        raise ParamsError(f"{source}: parameter renamed: {'; '.join(renamed)}")
    unknown = [k for k in values if k not in PARAM_NAMES]
    if unknown:
        hints = "; ".join(f"{k!r}{_closest(k)}" for k in unknown)  # repr: one line
        raise ParamsError(f"{source}: unknown parameter {hints}")
    try:
        return Params(**values)
    except ParamsError as err:
        raise ParamsError(f"{source}: {err}") from None


def params_from_record(values: dict[str, Any], source: str) -> Params:
    """Parameters saved with a run, checkpoint or model: retired keys are dropped, not errors
    (they did nothing then either), and renamed ones take their new names."""
    return params_from_dict({RENAMED.get(k, k): v for k, v in values.items()
                             if k not in RETIRED}, source)


def read_params_file(path: str | Path, kind: str = "parameter file") -> dict[str, Any]:
    """The raw mapping of a YAML parameter (or sweep grid) file, with errors naming it."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: {kind} not found")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as err:
        problem = " ".join(str(err).split()) if isinstance(err, yaml.YAMLError) else (
            "not UTF-8 text" if isinstance(err, UnicodeDecodeError) else "nested too deeply")
        raise ParamsError(f"{path}: not valid YAML: {problem}") from None
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

