"""The published figures stay true, and a model's identity cannot be quietly changed.

The shipped model's plain-setting test figures are recomputed on the full real test split
(when BRAINSEG_DATA is set) and checked against its model card and the README's headline row.
Reusing a run or a model with a different training key is refused, naming the key.
"""

import json
import re

import pytest

from brainseg_lib.config import IDENTITY_KEYS, load_params, params_from_dict
from brainseg_lib.data.arrays import load_split_arrays, load_split_lesions
from brainseg_lib.evaluation.predictions import predict_split
from brainseg_lib.inference.predictor import load_model
from brainseg_lib.metrics.functional import ConfusionCounts, summarise
from brainseg_lib.metrics.lesion import image_lesions, lesion_table, summarise_lesions
from brainseg_lib.model.checkpoint import ArtifactError
from brainseg_lib.model.export import export_model
from brainseg_lib.model.run_folder import run_folder_from_model
from brainseg_lib.training.loop import train
from conftest import ROOT, tiny_params

SHIPPED = ROOT / "models" / "reference"
# the figures the README prints, and at which precision
PRINTED = {"pooled_iou": 3, "mean_image_dice": 3, "fg_bg_miou": 3, "bce": 4,
           "lesion_sensitivity": 3, "fp_components_per_image": 3}


def _readme_headline_row() -> str:
    """The README table row of the shipped model: the one naming models/reference that
    holds figures (other rows name it in commands)."""
    rows = [line for line in (ROOT / "README.md").read_text().splitlines()
            if line.lstrip().startswith("|") and "models/reference" in line
            and len(re.findall(r"\d\.\d{3}", line)) >= 4]
    assert len(rows) == 1, f"expected one headline row naming models/reference: {rows}"
    return rows[0]


@pytest.mark.realdata
def test_shipped_model_test_figures_are_what_the_card_and_readme_say(real_root):
    loaded = load_model(SHIPPED)
    arrays = load_split_arrays(real_root, "test", loaded.params.image_size)
    assert len(arrays) == 215  # the full test split
    pred = predict_split(loaded, arrays, tta=False)
    counts = ConfusionCounts.from_masks(pred.probs >= 0.5, arrays.masks)
    truth = load_split_lesions(real_root, "test", loaded.params.image_size).lesions
    lesions = lesion_table([image_lesions(t, m) for t, m in zip(truth, pred.probs >= 0.5,
                                                                strict=True)])
    recomputed = summarise(counts) | summarise_lesions(lesions) | {"bce": pred.bce}

    card = json.loads((SHIPPED / "brainseg.json").read_text())["test_metrics"]
    recorded = card["headline"]["metrics"] | {"bce": card["loss"]["bce"]}
    row = _readme_headline_row()
    in_row = set(re.findall(r"\d+\.\d+", row))
    for key, digits in PRINTED.items():
        ours = f"{recomputed[key]:.{digits}f}"
        assert ours == f"{recorded[key]:.{digits}f}", (
            f"{key}: recomputed {recomputed[key]:.6f}, model card {recorded[key]:.6f}")
        assert ours in in_row, f"{key}: recomputed {ours}, not in the README row {row!r}"


def test_the_reference_profile_reports_on_the_shipped_model_that_cpu_long_trains(tmp_path):
    """params/reference.yaml reports on models/reference and params/cpu_long.yaml trains it
    anew: the shipped weights accept the reference profile (else `brainseg run` refuses
    them), and the two files hold one recipe (every key that shapes the weights)."""
    reference = load_params(ROOT / "params" / "reference.yaml")
    assert ROOT / reference.report_model == SHIPPED
    assert run_folder_from_model(SHIPPED, tmp_path / "run", expected=reference).is_dir()
    cpu_long = load_params(ROOT / "params" / "cpu_long.yaml")
    assert {k: getattr(reference, k) for k in IDENTITY_KEYS} == {
        k: getattr(cpu_long, k) for k in IDENTITY_KEYS}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, synthetic_root):
    tmp = tmp_path_factory.mktemp("identity")
    params = tiny_params(tmp, synthetic_root, epochs=1, limit_train_images=4, run_id="done")
    return params, train(params, progress=False).run_dir


def test_resuming_with_another_augmentation_is_refused_naming_it(finished_run):
    params, run_dir = finished_run
    resume = params_from_dict(params.to_dict() | {"resume": str(run_dir)}, "test")
    assert params.aug_rotate_deg != 25.0
    with pytest.raises(ValueError, match="aug_rotate_deg"):
        train(resume, progress=False, resume_overrides={"aug_rotate_deg": 25.0})


@pytest.mark.parametrize("key, value", [("aug_rotate_deg", 25.0), ("grad_clip", 1.0),
                                        ("train_minutes", 5.0)])
def test_a_model_reused_with_another_training_key_is_refused_naming_it(finished_run, tmp_path,
                                                                       key, value):
    params, run_dir = finished_run
    model_dir = export_model([run_dir], tmp_path / "model")
    assert run_folder_from_model(model_dir, tmp_path / "runs" / "same", expected=params).is_dir()
    assert getattr(params, key) != value
    other = params_from_dict(params.to_dict() | {key: value}, "test")
    with pytest.raises(ArtifactError, match=key):
        run_folder_from_model(model_dir, tmp_path / "runs" / "other", expected=other)
