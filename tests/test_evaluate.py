"""Evaluation outputs, post-processing, and prediction on new images."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from brainseg_lib.cli import main
from brainseg_lib.evaluate import evaluate_run, postprocess
from brainseg_lib.metrics import ConfusionCounts, pooled_iou
from brainseg_lib.modeling.train import train
from conftest import tiny_params


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, synthetic_root):
    tmp = tmp_path_factory.mktemp("evalrun")
    params = tiny_params(tmp, synthetic_root, epochs=6, lr=0.003, monitor="val_iou",
                         patience=0, run_id="run")
    return train(params, progress=False).run_dir


def test_postprocessing_by_hand():
    m = np.zeros((10, 10), bool)
    m[1:4, 1:3] = True          # 6 px
    m[6, 6] = True              # 1 px speck
    m[5:9, 8] = True            # 4 px bar
    assert postprocess(m, "none").sum() == 11
    assert postprocess(m, "drop_small", min_px=3).sum() == 10
    assert postprocess(m, "keep_largest").sum() == 6
    ell = np.zeros_like(m)
    ell[6:9, 0] = ell[8, 0:3] = True     # an L of 5 px
    boxed = postprocess(m | ell, "fill_box", 3)
    assert boxed[6:9, 0:3].all() and boxed[6:9, 0:3].sum() == 9  # its 3x3 bounding box
    assert not boxed[6, 6]               # the speck is dropped
    assert boxed.sum() == 6 + 4 + 9


def test_evaluate_run_writes_consistent_results(trained_run, synthetic_root):
    metrics = evaluate_run(trained_run, "test", verbose=False)
    out = trained_run / "eval-test"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["headline"]["metrics"] == pytest.approx(metrics["headline"]["metrics"],
                                                         nan_ok=True)
    per_image = pd.read_csv(out / "per_image.csv")
    assert len(per_image) == 6
    # the pooled IoU can be recomputed from the per-image table's masks only through counts;
    # the mean of the per-image column must equal the reported mean per-image IoU
    assert per_image.iou_headline.mean() == pytest.approx(
        metrics["headline"]["metrics"]["mean_image_iou"])
    for block in ("headline", "selected", "headline_original_resolution"):
        m = metrics[block]["metrics"]
        low, high = metrics[block]["ci95"]["pooled_iou"]
        assert low <= m["pooled_iou"] <= high
    assert metrics["headline"]["setting"].startswith("64px (model resolution), threshold 0.50")
    variants = pd.read_csv(out / "variants.csv")
    assert set(variants.postprocess) == {"none", "drop_small", "keep_largest", "fill_box"}
    assert set(variants.tta) == {True, False}
    chosen = metrics["chosen_on_valid"]
    best = variants.loc[variants.pooled_iou.idxmax()]
    assert (chosen["threshold"], chosen["postprocess"]) == (best.threshold, best.postprocess)
    assert metrics["loss"]["bce"] > 0
    assert metrics["reference_comparison"]["reference_test_loss (BCE)"] == 0.07201


def test_counts_of_an_oracle_prediction_are_perfect():
    target = np.zeros((2, 8, 8), np.uint8)
    target[0, 2:5, 2:6] = 1
    assert pooled_iou(ConfusionCounts.from_masks(target, target)) == 1.0


def test_predict_any_size_grey_or_rgb_and_skips_unreadable(trained_run, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(np.full((50, 70), 80, np.uint8)).save(inputs / "grey.png")
    Image.fromarray(np.full((90, 40, 3), 120, np.uint8)).save(inputs / "rgb.jpg")
    (inputs / "broken.jpg").write_text("not an image")
    out = tmp_path / "out"
    code = main(["predict", str(inputs), "--checkpoint", str(trained_run / "best.pt"),
                 "--out", str(out)])
    assert code == 0
    captured = capsys.readouterr()
    assert "broken.jpg" in captured.err and "2 masks written" in captured.out
    assert Image.open(out / "grey_mask.png").size == (70, 50)
    assert Image.open(out / "rgb_overlay.png").size == (40, 90)
    assert set(np.unique(np.asarray(Image.open(out / "rgb_mask.png")))) <= {0, 255}


def test_evaluate_cli_on_a_missing_run_is_a_clear_error(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nope")]) == 2
    assert "nope: no such run directory, model folder or checkpoint" in capsys.readouterr().err


def test_test_predictions_cannot_change_what_is_chosen_on_valid(trained_run, monkeypatch):
    from brainseg_lib import evaluate as ev

    honest = evaluate_run(trained_run, "test", verbose=False)["chosen_on_valid"]
    real = ev.predict_split

    def garbage_on_test(loaded, arrays, tta, batch_size=32):
        pred = real(loaded, arrays, tta, batch_size)
        if arrays.name == "test":
            pred.probs[:] = 1.0
            if pred.probs_tta is not None:
                pred.probs_tta[:] = 0.0
        return pred

    monkeypatch.setattr(ev, "predict_split", garbage_on_test)
    poisoned = evaluate_run(trained_run, "test", verbose=False)
    assert poisoned["chosen_on_valid"] == honest
    assert poisoned["headline"]["metrics"]["pooled_iou"] < 0.2  # the poison did reach test


def test_valid_split_selected_result_is_labelled_in_sample(trained_run):
    metrics = evaluate_run(trained_run, "valid", verbose=False)
    assert metrics["selected_is_in_sample"]
    assert "IN-SAMPLE" in metrics["selected"]["setting"]


def test_batched_prediction_equals_one_image_at_a_time(trained_run, tmp_path, monkeypatch):
    from brainseg_lib.modeling import predict as predict_module

    rng = np.random.default_rng(0)
    inputs = tmp_path / "in"
    inputs.mkdir()
    shapes = [(64, 64, 3), (50, 90, 3), (120, 40, 3)]
    for i, shape in enumerate(shapes):
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(inputs / f"{i}.png")
    monkeypatch.setattr(predict_module, "PREDICT_BATCH", 2)  # a full and a partial batch
    written, _ = predict_module.predict_files(trained_run, [inputs], tmp_path / "out",
                                              threshold=0.5)
    loaded = predict_module.load_model(trained_run)
    for i, shape in enumerate(shapes):
        rgb = np.asarray(Image.open(inputs / f"{i}.png").convert("RGB"))
        alone = (predict_module.predict_image(loaded, rgb) >= 0.5).astype(np.uint8) * 255
        batched = np.asarray(Image.open(tmp_path / "out" / f"{i}_mask.png"))
        assert batched.shape == shape[:2]
        assert (batched != alone).mean() < 0.001  # float reduction order only
