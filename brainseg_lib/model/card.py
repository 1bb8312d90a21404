"""What a model folder says about itself: the model card (``README.md``), one template filled
from ``brainseg.json``, and the ``LICENSE``, which credits the data the weights learnt from.

The Kaggle dataset's licence (CC BY 4.0) is stated only for weights trained on it, known by
its annotations' hash; any other data is credited as the exporter named it, or ``unknown``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from brainseg_lib.data.locate import KAGGLE_ID

if TYPE_CHECKING:
    from brainseg_lib.model.folder import ModelInfo

KAGGLE_DATASET = "Brain Tumor Image DataSet: Semantic Segmentation"
KAGGLE_LICENCE = "CC BY 4.0"
# dataset_hash of the Kaggle download: the one dataset whose licence brainseg may state itself
KAGGLE_ANNOTATIONS_SHA256 = "f5ad933edb55cdc5"
UNKNOWN = "unknown"
MODEL_LICENSE = "cc-by-4.0"  # the hub's id of the weights' licence when trained on Kaggle's


@dataclass(frozen=True)
class DataCredit:
    """The data a model was trained on and its licence: what its card and LICENSE credit."""

    name: str
    licence: str

    @property
    def kaggle(self) -> bool:
        return self.licence == KAGGLE_LICENCE and self.name.startswith(KAGGLE_DATASET)


def is_kaggle_data(dataset: dict[str, Any]) -> bool:
    """Whether a run's data record (``env.json``'s ``dataset``) is the Kaggle dataset or a
    resized copy of it, by the annotations' hash."""
    return KAGGLE_ANNOTATIONS_SHA256 in (
        dataset.get("annotations_sha256"),
        (dataset.get("derived_from") or {}).get("source_annotations_sha256"))


def credit_of(dataset: dict[str, Any]) -> DataCredit:
    """The credit a model folder's ``dataset`` record holds; an older record without a
    licence is the Kaggle dataset's only when its hash says so."""
    if dataset.get("licence"):
        return DataCredit(dataset.get("name") or UNKNOWN, dataset["licence"])
    if is_kaggle_data(dataset):
        return DataCredit(dataset.get("name") or KAGGLE_DATASET, KAGGLE_LICENCE)
    return DataCredit(dataset.get("name") or UNKNOWN, UNKNOWN)


_NOT_A_DEVICE = """\
A research model, not a medical device: it has not been validated for, and must not be
used in, diagnosis or treatment. The brainseg code that made it is MIT-licensed (see the
repository's LICENSE).
"""
MODEL_LICENSE_TEXT = """\
The weights, model card and records in this folder are licensed under the Creative Commons
Attribution 4.0 International licence (CC BY 4.0): https://creativecommons.org/licenses/by/4.0/
(full legal code: https://creativecommons.org/licenses/by/4.0/legalcode).

They were trained on the "Brain Tumor Image DataSet: Semantic Segmentation" (Kaggle
pkdarabi / Roboflow, https://www.kaggle.com/datasets/pkdarabi/brain-tumor-image-dataset-semantic-segmentation),
itself licensed CC BY 4.0; reuse must credit that dataset and brainseg.

""" + _NOT_A_DEVICE


def licence_text(info: ModelInfo) -> str:
    """The folder's LICENSE: CC BY 4.0 crediting the Kaggle dataset when trained on it; else
    the training data's own licence governs the weights (and a parent's, when fine-tuned)."""
    credit = credit_of(info.dataset)
    if credit.kaggle and not info.parent:
        return MODEL_LICENSE_TEXT
    parent = info.parent
    return (f"The weights in this folder were trained on {credit.name} (licence: "
            f"{credit.licence}); that licence governs their reuse"
            + (f", together with the licence of the model they were fine-tuned from "
               f"({parent['path']}, see its LICENSE)" if parent else "")
            + ". brainseg adds no licence of its own to them.\n\n" + _NOT_A_DEVICE)


# the card; each {field} is one line or a block of lines (empty when it does not apply)
MODEL_CARD = """\
{metadata}# brainseg model `{name}`

**A research model, not a medical device.** It segments brain-tumour regions in single 2D MRI \
slices like those it was trained on; it has not been validated for, and must not be used in, \
diagnosis or treatment.

## Model

- {p[arch]} with a {p[encoder]} encoder and {decoder} (segmentation_models_pytorch), \
{p[in_channels]} input channels, one output channel of logits
- input: {p[image_size]}x{p[image_size]} px, normalised with mean {p[normalize_mean]} and std \
{p[normalize_std]} (of [0, 1] pixel values)
- weights: {stored_as}, {n_members} member(s) ({members}); initialisation: {weights_init}
- load: `brainseg predict --model <this folder> IMAGE... --out DIR`, or in Python \
`brainseg_lib.model.folder.networks_from_model_dir(folder)`; smp alone: \
`smp.from_pretrained(folder)` (single-member folders)

{onnx}## Training

- data: {data}
- recipe: loss {p[loss]}, {p[optimizer]} lr {p[lr]} (weight decay {p[weight_decay]}), \
{p[scheduler]} schedule, batch {p[batch_size]}, augmentation {augment}, EMA {ema}, best \
checkpoint on {p[monitor]}, seed {p[seed]}
{runs}- code: brainseg commit {commit}

{parent}## Test metrics

{test_metrics}## Intended use

Teaching and research on segmentation methods: reproducing and comparing results on this \
dataset. Its labels are axis-aligned boxes, so it predicts box-like regions, not tumour \
outlines.
"""

_ONNX = """\
## ONNX

- files: {files} (dynamic batch, height and width; exported with torch {o[torch]} in \
{seconds:.0f} s; not stored in git: `brainseg export <folder> --onnx` writes them)
- verified against torch with onnxruntime {o[onnxruntime]} on {o[verified_on]}: max \
|Δprobability| {o[max_abs_prob_diff]:.1e}, identical mask pixels {o[mask_agreement]:.4%} at \
threshold {o[threshold]}
- use: `brainseg predict --model <folder> --backend onnxruntime IMAGE... --out DIR` (the \
default on a CPU), or any ONNX runtime: input `images` (B,3,H,W) float32 normalised as \
above, H and W multiples of 32; output `logits` (B,1,H,W)
{int8}
"""

_INT8 = """\
- int8: {files} ({q[quantisation]}; calibrated on {q[calibrated_on]}); verified like the fp32 \
file: max |Δprobability| {q[max_abs_prob_diff]:.1e}, identical mask pixels \
{q[mask_agreement]:.4%}; use: `--backend onnxruntime-int8`
"""

_PARENT = """\
## Fine-tuned from

- {path} (sha256 {sha256}); its training is in its own card

"""

_NOT_EVALUATED = "Not evaluated yet: run `brainseg evaluate --model <folder>`.\n\n"


def model_card(info: ModelInfo, name: str) -> str:
    """The model card: what the model is, how it was made, what it scored, what it is not."""
    p, env = info.params, info.environment
    return MODEL_CARD.format(
        metadata=card_metadata(info, name), name=name, p=p, stored_as=info.stored_as,
        n_members=len(info.members), members=", ".join(info.members),
        decoder=(f"decoder widths {list(p['decoder_channels'])}" if p.get("decoder_channels")
                 else "smp's default decoder"),
        weights_init=info.weights_init or "?", onnx=_onnx_block(info.onnx),
        data=_data_line(info.dataset), augment="on" if p["augment"] else "off",
        ema="on" if p.get("ema") else "off", runs=_run_lines(info),
        commit=env.get("git_commit", "?"),
        parent=_PARENT.format(**info.parent) if info.parent else "",
        test_metrics=_test_metrics(info.test_metrics) if info.test_metrics else _NOT_EVALUATED)


def _onnx_block(o: dict[str, Any] | None) -> str:
    if not o:
        return ""
    q = o.get("int8")
    int8 = _INT8.format(files=", ".join(q["files"]), q=q) if q else ""
    return _ONNX.format(files=", ".join(o["files"]), seconds=sum(o["export_seconds"]), o=o,
                        int8=int8)


def _data_line(ds: dict[str, Any]) -> str:
    credit = credit_of(ds)
    return (credit.name + (" (Kaggle pkdarabi / Roboflow COCO export)" if credit.kaggle else "")
            + f", licence {credit.licence}; annotations sha256 "
            f"{ds.get('annotations_sha256', '?')}; images {ds.get('images', '?')}"
            + (f"; {ds['provenance']}" if ds.get("provenance") else ""))


def _run_line(run: str, rec: dict[str, Any]) -> str:
    """One training run; its precision where recorded (bf16 on a CPU is worth saying)."""
    precision = (rec.get("precision") or {}).get("name")
    return (f"- run {run}: {rec.get('epochs_run')} epochs on {rec.get('device')}"
            f"{f' in {precision}' if precision else ''}, "
            f"{rec.get('train_seconds_this_session', 0) / 60:.1f} min, stopped by "
            f"{rec.get('stop_reason')}; best epoch {rec.get('best_epoch')}\n")


def _run_lines(info: ModelInfo) -> str:
    return "".join(_run_line(run, rec)
                   for run, rec in zip(info.runs, info.training, strict=True) if rec)


def _metric_cell(block: dict[str, Any] | None, key: str) -> str:
    """``value | CI`` of one metric in a metrics block; dashes where it has none."""
    if not block or key not in block["metrics"]:
        return "– | –"
    bounds = block.get("ci95", {}).get(key)
    value = f"{block['metrics'][key]:.4f}"
    return value + (f" | {bounds[0]:.4f} – {bounds[1]:.4f}" if bounds else " | –")


_TEST = """\
Split `{m[split]}` ({m[dataset][images]} images, annotations {annotations}); evaluated on \
{device} at commit {commit}. Plain setting: {m[headline][setting]}.{clean_note}

| metric | full test | 95 % CI | clean subset | 95 % CI |
|---|---|---|---|---|
{rows}
Pooled = pixel counts summed over the split, then the ratio; per-image = the ratio per \
image, then the mean (both masks empty scores 1). Threshold 0.5 on the sigmoid probability \
unless stated. Intervals: 95 % BCa bootstrap over test images (scipy.stats.bootstrap).{lesion}

{calibration}{groups}"""


def _test_metrics(m: dict[str, Any]) -> str:
    """The test split's plain-setting metrics, full and clean, calibration and groups."""
    clean, ev = m.get("headline_clean"), m.get("evaluated_with", {})
    rows = "".join(f"| {label} | {_metric_cell(m['headline'], key)} | "
                   f"{_metric_cell(clean, key)} |\n"
                   for key, label in m["definitions"].items() if key in m["headline"]["metrics"])
    return _TEST.format(
        m=m, annotations=m["dataset"].get("annotations_sha256", "?"),
        device=ev.get("device", "?"), commit=ev.get("git_commit", "?"), rows=rows,
        clean_note=(f" Clean subset: {m['clean_test']['images']} test images with no "
                    "near-duplicate in train or valid.") if clean else "",
        lesion=f" Lesion-wise: {m['lesion_rule']}." if "lesion_rule" in m else "",
        calibration=_calibration(m), groups=_groups(m))


def _calibration(m: dict[str, Any]) -> str:
    """ECE and Brier score of the raw and the temperature-scaled probabilities."""
    cal = m.get("calibration")
    if not cal:
        return ""
    rows = "".join(f"| {name.replace('_', ' ')} | {_metric_cell(cal[name], 'ece')} | "
                   f"{_metric_cell(cal[name], 'brier')} |\n"
                   for name in ("raw", "temperature_scaled", "raw_clean",
                                "temperature_scaled_clean") if name in cal)
    return (f"### Calibration\n\nPixel level, {cal['binning']}. Temperature T = "
            f"{cal['temperature']:.3f}, fitted on {cal['temperature_fitted_on']}; "
            f"{cal['note']}.\n\n| probabilities | ECE | 95 % CI | Brier | 95 % CI |\n"
            f"|---|---|---|---|---|\n{rows}\n")


_GROUP_KEYS = ("mean_image_dice", "pooled_iou", "lesion_sensitivity", "fp_components_per_image",
               "lesion_dice")


def _groups(m: dict[str, Any]) -> str:
    """The plain setting's main figures by annotation sub-class and by box-area quintile."""
    text = ""
    for group in ("subclass", "size_quintile"):
        blocks = m.get(f"headline_by_{group}")
        if not blocks:
            continue
        label = group.replace("_", " ")
        text += (f"### By {label}\n\n{m['groups'][group]}.\n\n| {label} | images | "
                 + " | ".join(f"{k} | 95 % CI" for k in _GROUP_KEYS) + " |\n|---|---|"
                 + "---|---|" * len(_GROUP_KEYS) + "\n"
                 + "".join(f"| {value} | {block['images']} | "
                           + " | ".join(_metric_cell(block, k) for k in _GROUP_KEYS) + " |\n"
                           for value, block in blocks.items()) + "\n")
    return text


# the test figures a hub shows in its results widget (model-index), plain setting
_HUB_METRICS = {"pooled_iou": "pooled foreground IoU", "mean_image_dice": "mean image Dice",
                "fg_bg_miou": "foreground+background mIoU",
                "lesion_sensitivity": "lesion sensitivity",
                "fp_components_per_image": "FP components per image"}


def card_metadata(info: ModelInfo, name: str) -> str:
    """The model card's YAML header in Hugging Face's form (licence, library, tags, the
    test figures as ``model-index``), written by ``huggingface_hub.ModelCardData`` so a hub
    labels the model rather than showing it as unlabelled."""
    from huggingface_hub import EvalResult, ModelCardData

    p, m = info.params, info.test_metrics
    credit = credit_of(info.dataset)
    results = [EvalResult(task_type="image-segmentation", task_name="Brain tumour segmentation",
                          dataset_type=KAGGLE_ID if credit.kaggle else credit.name,
                          dataset_name=credit.name, dataset_split=m["split"], metric_type=key,
                          metric_name=label,
                          metric_value=round(float(m["headline"]["metrics"][key]), 4))
               for key, label in _HUB_METRICS.items()
               if m and key in m["headline"]["metrics"]]
    data = ModelCardData(
        license=MODEL_LICENSE if credit.kaggle else "other",
        library_name="segmentation-models-pytorch",
        pipeline_tag="image-segmentation", model_name=f"brainseg-{name}",
        tags=["segmentation-models-pytorch", "semantic-segmentation", "medical-imaging",
              "mri", "brain-tumor", p["arch"].lower(), p["encoder"], "brainseg"]
        + (["onnx"] if info.onnx else []),
        eval_results=results or None)
    return f"---\n{data.to_yaml()}\n---\n"
