"""Model artifacts: checkpoints that load without running code, and exported model folders.

A checkpoint (``best.pt``/``last.pt``) holds only tensors and plain Python values and is read
with ``torch.load(weights_only=True)``: a file that would need anything else to unpickle is
refused with one line, and nothing in it is executed. An exported model is smp's own format
(``save_pretrained``: ``config.json`` + ``model.safetensors``), plus ``brainseg.json`` (how
it was trained, on what data, what it scored) and a model card ``README.md``. A fold
ensemble is one folder with one weight file per member and the same config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
from torch import nn

from brainseg_lib.config import Params, ParamsError, params_from_dict
from brainseg_lib.io import atomic_write_json, atomic_write_text
from brainseg_lib.model.checkpoint import (
    ArtifactError,
    load_weights,
    network_from_checkpoint,
    save_checkpoint,
)

WEIGHTS_FILE = "model.safetensors"


CONFIG_FILE = "config.json"


INFO_FILE = "brainseg.json"


# parameters that shape the weights; the rest (threshold, TTA, bootstrap, ...) shape a measurement
TRAINING_KEYS = ("image_size", "arch", "encoder", "encoder_weights", "in_channels",
                 "normalize_mean", "normalize_std", "loss", "optimizer", "lr", "weight_decay",
                 "scheduler", "warmup_epochs", "epochs", "batch_size", "monitor", "augment",
                 "ema", "ema_decay", "seed", "fold", "limit_train_images")


def is_model_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file() or (Path(path) / INFO_FILE).is_file()


def read_model_info(model_dir: str | Path) -> dict[str, Any]:
    """``brainseg.json`` of an exported model, checked against smp's ``config.json``."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ArtifactError(f"{model_dir}: model folder not found")
    config_file, info_file = model_dir / CONFIG_FILE, model_dir / INFO_FILE
    for f in (config_file, info_file):
        if not f.is_file():
            raise ArtifactError(f"{f}: missing; a brainseg model folder holds {CONFIG_FILE}, "
                                f"{INFO_FILE} and weights (made by brainseg export)")
    try:
        config = json.loads(config_file.read_text())
        info = json.loads(info_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{model_dir}: unreadable JSON ({err})") from None
    if not isinstance(config, dict) or "_model_class" not in config:
        raise ArtifactError(f"{config_file}: not a segmentation_models_pytorch config (no "
                            "_model_class; is it from another library?)")
    if not hasattr(smp, str(config["_model_class"])):
        raise ArtifactError(f"{config_file}: unknown smp model class {config['_model_class']}")
    members = info.get("members") or [WEIGHTS_FILE]
    for name in members:
        if not (model_dir / name).is_file():
            raise ArtifactError(f"{model_dir / name}: weights missing (the folder has a model "
                                "card but no weights)")
    info["config"], info["members"] = config, members
    return info


def _training_params(model_dir: Path, info: dict[str, Any]) -> Params:
    try:
        return params_from_dict(info["params"], source=str(model_dir / INFO_FILE))
    except (ParamsError, KeyError, TypeError) as err:
        raise ArtifactError(f"{model_dir / INFO_FILE}: invalid parameters ({err})") from None


def networks_from_model_dir(model_dir: str | Path,
                            ) -> tuple[list[nn.Module], Params, dict[str, Any]]:
    """The member networks (one, or k for a fold ensemble), their training parameters and info.

    Equivalent to ``smp.from_pretrained(dir, encoder_weights=None)`` but never touches the
    network and turns every failure into one line.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    info = read_model_info(model_dir)
    config = {k: v for k, v in info["config"].items() if not k.startswith("_")}
    params = _training_params(model_dir, info)
    expected = f"{params.arch}/{params.encoder}"
    found = f"{info['config']['_model_class']}/{config.get('encoder_name')}"
    if found.lower() != expected.lower():
        raise ArtifactError(f"{model_dir}: config.json describes {found}, brainseg.json "
                            f"{expected}")
    members = []
    for name in info["members"]:
        model = getattr(smp, info["config"]["_model_class"])(**(config | {
            "encoder_weights": None}))
        try:
            state = load_file(model_dir / name, device="cpu")
        except (SafetensorError, OSError) as err:
            raise ArtifactError(f"{model_dir / name}: not readable safetensors "
                                f"(truncated or corrupt: {err})") from None
        load_weights(model, state, model_dir / name, expected)
        members.append(model)
    return members, params, info


def export_model(run_dirs: list[Path], out_dir: Path, fp16: bool = True,
                 dataset_name: str = "") -> Path:
    """Write smp's ``save_pretrained`` folder for one run (or several: a fold ensemble).

    Files are written to a temporary folder and renamed, so a failed export leaves nothing.
    """
    import shutil
    import tempfile

    from brainseg_lib.rundir import training_record

    models, params_list, states = [], [], []
    for run in run_dirs:
        model, params, state = network_from_checkpoint(run / "best.pt")
        models.append(model)
        params_list.append(params)
        states.append(state)
    first = params_list[0]
    for p, run in zip(params_list[1:], run_dirs[1:], strict=True):
        if (p.arch, p.encoder, p.image_size) != (first.arch, first.encoder, first.image_size):
            raise ArtifactError(f"{run}: a different network ({p.arch}/{p.encoder} at "
                                f"{p.image_size}px) from {run_dirs[0]}")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        members = [WEIGHTS_FILE] if len(models) == 1 else [
            f"model-fold{i}.safetensors" for i in range(len(models))]
        for model, name in zip(models, members, strict=True):
            if fp16:
                model = model.half()
            model.save_pretrained(tmp)  # smp's format: config.json + model.safetensors
            if name != WEIGHTS_FILE:
                (tmp / WEIGHTS_FILE).rename(tmp / name)
        run0 = run_dirs[0]
        env = json.loads((run0 / "env.json").read_text()) if (run0 / "env.json").exists() \
            else {}
        metrics_file = run0 / "metrics.json"
        info = {
            "format": "brainseg model 1", "members": members,
            "stored_as": "float16" if fp16 else "float32",
            "params": {k: v for k, v in first.to_dict().items()
                       if k not in ("resume", "model_dir", "run_id")},
            "runs": [r.name for r in run_dirs],
            "training": [training_record(r) or {} for r in run_dirs],
            "environment": {k: env.get(k) for k in ("device", "gpu", "git_commit", "created",
                                                    "packages", "cuda") if k in env},
            "dataset": env.get("dataset", {}) | ({"name": dataset_name} if dataset_name
                                                else {}),
            "weights_init": env.get("weights", states[0].get("weights", "")),
            "checkpoint_epochs": [int(s.get("epoch", 0)) for s in states],
            "test_metrics": json.loads(metrics_file.read_text()) if metrics_file.exists()
            else None,
        }
        atomic_write_json(tmp / INFO_FILE, info)
        if (run0 / "history.csv").exists() and len(run_dirs) == 1:
            shutil.copy(run0 / "history.csv", tmp / "history.csv")
        atomic_write_text(tmp / "README.md", model_card(info, out_dir.name))
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def model_card(info: dict[str, Any], name: str) -> str:
    """The model card: what the model is, how it was made, what it scored, what it is not."""
    p = info["params"]
    ds = info.get("dataset", {})
    lines = [
        f"# brainseg model `{name}`", "",
        "**A research model, not a medical device.** It segments brain-tumour regions in "
        "single 2D MRI slices of one public dataset; it has not been validated for, and must "
        "not be used in, diagnosis or treatment.", "",
        "## Model", "",
        f"- {p['arch']} with a {p['encoder']} encoder (segmentation_models_pytorch), "
        f"{p['in_channels']} input channels, one output channel of logits",
        f"- input: {p['image_size']}x{p['image_size']} px, normalised with mean "
        f"{p['normalize_mean']} and std {p['normalize_std']} (of [0, 1] pixel values)",
        f"- weights: {info['stored_as']}, {len(info['members'])} member(s) "
        f"({', '.join(info['members'])}); initialisation: {info.get('weights_init') or '?'}",
        "- load: `brainseg predict --model <this folder> IMAGE`, or in Python "
        "`brainseg_lib.model.package.networks_from_model_dir(folder)`; smp alone: "
        "`smp.from_pretrained(folder)` (single-member folders)", "",
        "## Training", "",
        f"- data: {ds.get('name') or 'Brain Tumor Image DataSet: Semantic Segmentation'} "
        "(Kaggle pkdarabi / Roboflow COCO export), licence CC BY 4.0; annotations sha256 "
        f"{ds.get('annotations_sha256', '?')}; images {ds.get('images', '?')}"
        + (f"; {ds['provenance']}" if ds.get("provenance") else ""),
        f"- recipe: loss {p['loss']}, {p['optimizer']} lr {p['lr']} (weight decay "
        f"{p['weight_decay']}), {p['scheduler']} schedule, batch {p['batch_size']}, "
        f"augmentation {'on' if p['augment'] else 'off'}, EMA {'on' if p.get('ema') else 'off'}"
        f", best checkpoint on {p['monitor']}, seed {p['seed']}",
    ]
    for run, rec in zip(info["runs"], info["training"], strict=True):
        if rec:
            lines.append(f"- run {run}: {rec.get('epochs_run')} epochs on "
                         f"{rec.get('device')}, {rec.get('train_seconds_this_session', 0) / 60:.1f}"
                         f" min, stopped by {rec.get('stop_reason')}; best epoch "
                         f"{rec.get('best_epoch')}")
    env = info.get("environment", {})
    lines += [f"- code: brainseg commit {env.get('git_commit', '?')}", ""]
    m = info.get("test_metrics")
    lines += ["## Test metrics", ""]
    if m:
        clean = m.get("headline_clean")
        ev = m.get("evaluated_with", {})
        lines += [f"Split `{m['split']}` ({m['dataset']['images']} images, annotations "
                  f"{m['dataset'].get('annotations_sha256', '?')}); evaluated on "
                  f"{ev.get('device', '?')} at commit {ev.get('git_commit', '?')}. Plain "
                  f"setting: {m['headline']['setting']}."
                  + (f" Clean subset: {m['clean_test']['images']} test images with no "
                     "near-duplicate in train or valid." if clean else ""), "",
                  "| metric | full test | 95 % CI | clean subset | 95 % CI |",
                  "|---|---|---|---|---|"]

        def cell(block: dict[str, Any] | None, key: str) -> str:
            if not block or key not in block["metrics"]:
                return "– | –"
            bounds = block.get("ci95", {}).get(key)
            value = f"{block['metrics'][key]:.4f}"
            return value + (f" | {bounds[0]:.4f} – {bounds[1]:.4f}" if bounds else " | –")

        for key, label in m["definitions"].items():
            if key in m["headline"]["metrics"]:
                lines.append(f"| {label} | {cell(m['headline'], key)} | {cell(clean, key)} |")
        lines += ["", "Pooled = pixel counts summed over the split, then the ratio; per-image "
                  "= the ratio per image, then the mean (both masks empty scores 1). Threshold "
                  "0.5 on the sigmoid probability unless stated. Intervals: bootstrap over "
                  "test images."]
    else:
        lines.append("Not evaluated yet: run `brainseg evaluate --model <folder>`.")
    lines += ["", "## Intended use", "",
              "Teaching and research on segmentation methods: reproducing and comparing "
              "results on this dataset. Its labels are axis-aligned boxes, so it predicts "
              "box-like regions, not tumour outlines.", ""]
    return "\n".join(lines)


def materialise(model_dir: str | Path, run_dir: Path, expected: Params | None = None) -> Path:
    """Lay out an exported (single) model as a finished run directory, so that evaluation,
    notebooks and reports treat a shipped model like a run trained here.

    ``expected``: the caller's parameters; where they differ from the model's training
    parameters (``TRAINING_KEYS``), that is an error listing the differences.
    """
    from brainseg_lib.config import save_params

    model_dir = Path(model_dir)
    info = read_model_info(model_dir)
    params = _training_params(model_dir, info)
    if len(info["members"]) != 1:
        raise ArtifactError(f"{model_dir}: a {len(info['members'])}-member ensemble; report "
                            "it with brainseg cv, predict with brainseg predict --model")
    if expected is not None:
        diff = {k: (getattr(expected, k), getattr(params, k)) for k in TRAINING_KEYS
                if getattr(expected, k) != getattr(params, k)}
        if diff:
            listed = "; ".join(f"{k}: given {a!r}, model {b!r}" for k, (a, b) in diff.items())
            raise ArtifactError(f"{model_dir}: trained with other parameters than given "
                                f"({listed}); unset model_dir to train anew")
    weights_sha256 = _weights_hash(model_dir, info)
    if (run_dir / "best.pt").exists() and (run_dir / "source_model.json").exists():
        same = json.loads((run_dir / "source_model.json").read_text())
        if same.get("weights_sha256") == weights_sha256:
            return run_dir  # laid out before from these very weights
    models, _, _ = networks_from_model_dir(model_dir)
    epoch = (info.get("checkpoint_epochs") or [0])[0]
    save_checkpoint(run_dir / "best.pt", {"model": models[0].state_dict(),
                                          "params": params.to_dict(), "epoch": epoch,
                                          "weights": info.get("weights_init", "")})
    save_params(params, run_dir / "params.yaml")
    env = dict(info.get("environment", {})) | {
        "dataset": info.get("dataset", {}), "weights": info.get("weights_init", ""),
        "trained_on": f"shipped model {model_dir}"
                      + (f" ({info['dataset']['provenance']})"
                         if info.get("dataset", {}).get("provenance") else "")}
    atomic_write_json(run_dir / "env.json", env)
    record = (info.get("training") or [{}])[0]
    if record:
        atomic_write_json(run_dir / "train.json", {k: v for k, v in record.items()
                                                   if k not in ("device", "trained_on")})
    if (model_dir / "history.csv").exists():
        import shutil

        shutil.copy(model_dir / "history.csv", run_dir / "history.csv")
    atomic_write_json(run_dir / "source_model.json", {
        "model_dir": str(model_dir), "weights_sha256": weights_sha256})
    return run_dir


def _weights_hash(model_dir: Path, info: dict[str, Any]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name in info["members"]:
        digest.update((model_dir / name).read_bytes())
    return digest.hexdigest()[:16]


def record_metrics(model_dir: str | Path, metrics: dict[str, Any]) -> None:
    """Put an evaluation's metrics into a model folder's ``brainseg.json`` and model card
    (what ``brainseg evaluate --model DIR --record`` does after scoring it)."""
    model_dir = Path(model_dir)
    info = json.loads((model_dir / INFO_FILE).read_text())
    info["test_metrics"] = metrics
    atomic_write_json(model_dir / INFO_FILE, info)
    atomic_write_text(model_dir / "README.md", model_card(info, model_dir.name))
