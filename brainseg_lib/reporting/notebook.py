"""What the notebooks show: the header every report starts with, the headline box that puts
the result of 02 and 03 first, the metrics and reference tables of 03, and the test-image
galleries and browser of 04.
"""

from __future__ import annotations

import html
import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from brainseg_lib.config import Params
from brainseg_lib.data.arrays import SplitArrays, load_split_arrays, load_split_lesions
from brainseg_lib.data.coco import dataset_hash
from brainseg_lib.data.identity import check_data_identity, data_for_run
from brainseg_lib.data.locate import SYNTHETIC_BANNER, DataSource
from brainseg_lib.evaluation.predictions import predict_split
from brainseg_lib.inference.predictor import LoadedModel, load_model
from brainseg_lib.metrics.functional import ConfusionCounts, per_image_dice
from brainseg_lib.metrics.lesion import (
    FAILURE_KINDS,
    LESION_DEFINITIONS,
    ImageLesions,
    image_lesions,
    worst_cases,
)
from brainseg_lib.reporting import headline
from brainseg_lib.reporting.figures import overlay_rows
from brainseg_lib.rundir import PARAMS_FILE, git_commit, training_record

_BANNER = ('<div style="background:#fff3cd;border:2px solid #d39e00;padding:10px;'
           'margin:8px 0;font-weight:bold">&#9888; {}</div>')


def _param_table(values: dict[str, Any]) -> str:
    return "<table>" + "".join(
        f"<tr><td style='text-align:left'>{k}</td>"
        f"<td style='text-align:left'>{html.escape(json.dumps(v))}</td></tr>"
        for k, v in values.items()) + "</table>"


def header_html(title: str, params: Params, source: DataSource | None = None,
                notebook: str | None = None, run_dir: Path | None = None) -> str:
    """How the report was made: synthetic-data banner, the data by name and annotation hash,
    environment and the parameters, each set from where it came: this notebook's own
    (``notebook``'s parameters cell, as called) and, with ``run_dir``, the training
    parameters saved with the run (they shaped the weights). Paths of this machine are shown
    only in the folded details."""
    from brainseg_lib.config import names
    from brainseg_lib.reporting.notebook_params import NOTEBOOK_PARAMETERS

    parts = [f"<h3>{html.escape(title)}: how this report was made</h3>"]
    if source is not None and source.synthetic:
        parts.append(_BANNER.format(html.escape(SYNTHETIC_BANNER)))
    env = {"profile": params.profile, "run id": params.run_id or "(latest)",
           "data": (f"{source.path.name} ({source.kind}), annotations "
                    f"{dataset_hash(source.path)}") if source else "-",
           "python": platform.python_version(), "torch": torch.__version__,
           "device": "cuda" if torch.cuda.is_available() else "cpu",
           "git commit": git_commit()}
    rows = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th>"
                   f"<td style='text-align:left'>{html.escape(str(v))}</td></tr>"
                   for k, v in env.items())
    parts.append(f"<table>{rows}</table>")
    if source is not None:
        parts.append(f"<details><summary>where the data is</summary>"
                     f"{html.escape(str(source.path))} (found by {html.escape(source.how)})"
                     "</details>")
    values = params.to_dict()
    called = ("profile", *NOTEBOOK_PARAMETERS[notebook]) if notebook else tuple(values)
    parts.append(f"<details><summary>{len(called)} parameters of this notebook (as called)"
                 f"</summary>{_param_table({k: values[k] for k in called})}</details>")
    if run_dir is not None and (run_dir / PARAMS_FILE).exists():
        from brainseg_lib.config import read_params_file

        trained = read_params_file(run_dir / PARAMS_FILE)
        shown = {k: trained[k] for k in names(groups=("data", "training")) if k in trained}
        parts.append(f"<details><summary>{len(shown)} training parameters of the model "
                     f"(from the run's {PARAMS_FILE})</summary>"
                     f"<p>{html.escape(str(run_dir / PARAMS_FILE))}</p>"
                     f"{_param_table(shown)}</details>")
    return "\n".join(parts)


def show_header(title: str, params: Params, source: DataSource | None = None,
                notebook: str | None = None, run_dir: Path | None = None) -> None:
    from IPython.display import HTML, display

    display(HTML(header_html(title, params, source, notebook, run_dir)))


PHOTO_QUALITY = 85  # JPEG quality of MRI figures: no visible loss at report size


def photo_figures() -> None:
    """Show this notebook's figures as JPEG, not PNG: MRI overlays are photographs, and
    PNG galleries made 04's report several times larger for no visible gain."""
    from IPython import get_ipython
    from matplotlib_inline.backend_inline import set_matplotlib_formats

    if get_ipython() is not None:
        set_matplotlib_formats("jpeg", pil_kwargs={"quality": PHOTO_QUALITY})


def headline_slot() -> Any:
    """The report's result, shown first: a box saying it is pending, to be replaced with
    :func:`training_box` or :func:`evaluation_box` (an IPython display update) once the
    result exists; the executed notebook, its HTML and JupyterLab all show it at the top."""
    from IPython.display import HTML, display

    return display(HTML(headline.pending_headline()), display_id=True)


def training_box(run_dir: Path) -> Any:
    """02's headline from the run's ``train.json``: epochs, minutes, best validation score,
    why it stopped."""
    from IPython.display import HTML

    return HTML(headline.training_headline(training_record(run_dir)))


def evaluation_box(metrics: dict[str, Any]) -> Any:
    """03's headline from its ``metrics.json``: the plain setting, full and clean, with
    intervals, beside the published reference."""
    from IPython.display import HTML

    return HTML(headline.evaluation_headline(metrics))


def show_metrics(metrics: dict[str, Any]) -> None:
    """03's metrics as two tables a reader can scan (the plain setting; the other settings)
    and one footnote defining every short name."""
    from IPython.display import HTML, display

    display(HTML("<h4>Plain setting, model resolution</h4>"), headline.plain_table(metrics),
            HTML("<h4>Source resolution, and the setting selected on validation</h4>"),
            headline.settings_table(metrics), HTML(headline.table_notes(metrics)))


def _fmt_ci(block: headline.Block, key: str) -> str:
    return headline.block_figure(block, key, digits=4)


def reference_table(metrics: headline.Record) -> pd.DataFrame:
    """The reference's two numbers beside ours, each labelled with what it measures."""
    c = headline.as_evaluation(metrics).reference_comparison  # the evaluation's: one source
    loss, iou = c["reference_test_loss (BCE)"], c[
        "reference_test_iou (as published; closest to fg+bg mIoU)"]
    rows = [
        ("Test loss (BCE, mean over test images)", loss, c["our_test_bce"]),
        ("Reference 'Test IoU' vs our mean of foreground and background IoU", iou,
         c["our_fg_bg_miou"]),
        ("Reference 'Test IoU' vs our foreground IoU pooled per batch, averaged", iou,
         c["our_batch_pooled_iou"]),
        ("Reference 'Test IoU' vs our foreground IoU pooled over the split", iou,
         c["our_pooled_foreground_iou"]),
    ]
    return pd.DataFrame(rows, columns=["what is compared", "reference", "ours (plain setting)"]
                        ).set_index("what is compared").round(5)


@dataclass
class TestPredictions:
    """Test images with truth and plain-setting predictions, for galleries and a browser."""

    loaded: LoadedModel
    arrays: SplitArrays
    preds: np.ndarray
    dice: np.ndarray
    lesions: list[ImageLesions]  # each image's lesion-wise outcome (BraTS 2023 rule)

    @classmethod
    def load(cls, run_dir: Path, split: str = "test", data_dir: str = "") -> TestPredictions:
        """The run's plain-setting predictions on ``split`` of the data evaluation would use
        (``data_dir``, else the usual search), checked to be the data the run trained on."""
        loaded = load_model(run_dir)
        params = loaded.params
        source = data_for_run(run_dir, params, data_dir)
        check_data_identity(run_dir, source)
        arrays = load_split_arrays(source.path, split, params.image_size, params.cache_path())
        pred = predict_split(loaded, arrays, tta=False)
        masks = pred.probs >= params.threshold
        dice = per_image_dice(ConfusionCounts.from_masks(masks, arrays.masks))
        truth = load_split_lesions(source.path, split, params.image_size).lesions
        return cls(loaded, arrays, masks, dice,
                   [image_lesions(t, m) for t, m in zip(truth, masks, strict=True)])

    def __len__(self) -> int:
        return len(self.arrays)

    def random(self, n: int, seed: int = 0) -> list[int]:
        rng = np.random.default_rng(seed)
        return sorted(rng.choice(len(self), min(n, len(self)), replace=False).tolist())

    def best(self, n: int) -> list[int]:
        return np.argsort(-self.dice, kind="stable")[:n].tolist()

    def worst(self, n: int) -> list[int]:
        return np.argsort(self.dice, kind="stable")[:n].tolist()

    def failure_figure(self, kind: str, n: int) -> Figure | None:
        """The ``n`` worst images of one kind of failure (:func:`.lesion.worst_cases`),
        zoomed on truth and prediction together; None when no image fails that way."""
        indices = worst_cases(self.lesions, kind, n, self.arrays.masks.sum((1, 2)))
        if not indices:
            print(f"no test image with a {kind}")
            return None
        return self.figure(indices, f"Worst test images: {kind} ({FAILURE_KINDS[kind]})",
                           zoom_on_both=True)

    def figure(self, indices: list[int], title: str, zoom_on_both: bool = False) -> Figure:
        a, r = self.arrays, self.lesions
        titles = [f"{a.files[i][:30]}  Dice {self.dice[i]:.3f}\nlesions {r[i].detected}/"
                  f"{r[i].lesions} found, {r[i].fp_components} FP, lesion Dice "
                  f"{r[i].lesion_dice:.3f}" for i in indices]
        return overlay_rows(a.images[indices], a.masks[indices], self.preds[indices], titles,
                            title, zoom_on_both)

    def browser(self) -> Any:
        """A slider and a file dropdown over every image (ipywidgets).

        The figure is shown as an Image widget updated from a JPEG, not through an Output
        widget: papermill/nbclient can stall on Output-widget capture in long sessions.
        """
        import io

        import ipywidgets as widgets
        import matplotlib.pyplot as plt

        slider = widgets.IntSlider(0, 0, len(self) - 1, description="image")
        files = widgets.Dropdown(options=[(f, i) for i, f in enumerate(self.arrays.files)],
                                 description="file")
        widgets.link((slider, "value"), (files, "value"))
        picture = widgets.Image(format="jpeg")

        def render(index: int) -> bytes:
            fig = self.figure([index], f"test image {index + 1} of {len(self)}")
            buffer = io.BytesIO()
            fig.savefig(buffer, format="jpeg", dpi=80, pil_kwargs={"quality": PHOTO_QUALITY})
            plt.close(fig)
            return buffer.getvalue()

        picture.value = render(0)
        slider.observe(lambda change: setattr(picture, "value", render(change["new"])),
                       names="value")
        return widgets.VBox([widgets.HBox([slider, files]), picture])


def lesion_wise_table(metrics: headline.Record) -> pd.DataFrame:
    """The lesion-wise figures (with 95 % CIs) of every setting: full split and clean subset,
    model and source resolution."""
    scores = headline.as_evaluation(metrics).scores
    blocks = [b for key in ("headline", "headline_original_resolution", "selected")
              if key in scores for b in (scores[key].full, scores[key].clean)
              if b is not None and "lesion_dice" in b.metrics]
    rows = {**LESION_DEFINITIONS, "true_lesions": "True lesions (annotations) scored"}
    return pd.DataFrame({b.setting: [_fmt_ci(b, k) if k != "true_lesions" else
                                     str(b.metrics[k]) for k in rows] for b in blocks},
                        index=pd.Index([f"{v} ({k})" for k, v in rows.items()], name="metric"))


def calibration_table(metrics: headline.Record) -> pd.DataFrame:
    """ECE and Brier score, raw and temperature-scaled, full and clean (with 95 % CIs)."""
    cal = headline.as_evaluation(metrics).calibration
    blocks = {"raw": cal.raw, "temperature scaled": cal.scaled, "raw clean": cal.raw_clean,
              "temperature scaled clean": cal.scaled_clean}
    return pd.DataFrame({name: [_fmt_ci(b, k) for k in ("ece", "brier")]
                         for name, b in blocks.items() if b is not None},
                        index=pd.Index([cal.texts["definitions"][k] for k in ("ece", "brier")],
                                       name="metric"))


def group_table(metrics: headline.Record, group: str, key: str = "headline") -> pd.DataFrame:
    """The main pixel and lesion-wise figures (with 95 % CIs) per value of ``group``
    (``subclass`` or ``size_quintile``) for the setting ``key``."""
    columns = ("mean_image_dice", "pooled_iou", "hd95", "lesion_sensitivity",
               "fp_components_per_image", "lesion_dice", "lesion_hd95", "pq")
    record = headline.as_evaluation(metrics)
    blocks = record.scores[key].groups[group]
    table = pd.DataFrame({c: [_fmt_ci(b, c) for b in blocks.values()] for c in columns},
                         index=pd.Index(list(blocks), name=group.replace("_", " ")))
    table.insert(0, "images", [b.images for b in blocks.values()])
    if group == "size_quintile":
        upper = record.groups.size_quintile_upper_px
        table.insert(1, "largest box, px", [round(upper[q]) for q in blocks])
    return table
