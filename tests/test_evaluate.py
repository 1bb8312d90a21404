"""Evaluation outputs, post-processing, and prediction on new images."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from brainseg_lib.cli import main
from brainseg_lib.data.arrays import load_split_arrays
from brainseg_lib.data.coco import load_split
from brainseg_lib.evaluation.evaluate import evaluate_run, score_at_source_resolution
from brainseg_lib.evaluation.postprocess import postprocess
from brainseg_lib.evaluation.predictions import SplitPrediction, predict_split
from brainseg_lib.evaluation.result import Evaluation, Setting
from brainseg_lib.inference.predictor import load_model
from brainseg_lib.metrics.functional import ConfusionCounts, hd95, per_image_dice, per_image_iou
from brainseg_lib.metrics.lesion import image_lesions, label_components
from brainseg_lib.model.export import export_model
from brainseg_lib.model.folder import record_metrics
from brainseg_lib.reporting.notebook import calibration_table, group_table, lesion_wise_table
from brainseg_lib.training.loop import train
from conftest import ROOT, tiny_params


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


def test_postprocessing_counts_components_as_the_lesion_metric_does():
    """A blob touching its neighbour only at a corner is one component for the lesion metric
    (8-connectivity); post-processing must see the same one, not two."""
    m = np.zeros((12, 12), bool)
    m[2:5, 2:5] = True   # 9 px
    m[5:7, 5:7] = True   # 4 px, joined to the first only diagonally at (4,4)-(5,5)
    blob = m.copy()
    m[10, 11] = True     # a 1 px speck apart from both
    outcome = image_lesions(blob[None], m)
    assert outcome.fp_components == 1 and outcome.detected == 1  # the blob is one lesion
    assert label_components(m)[1] == 2
    assert postprocess(m, "keep_largest").sum() == 13
    assert postprocess(m, "drop_small", min_px=10).sum() == 13  # 9 + 4 kept together
    boxed = postprocess(m, "fill_box", 10)
    assert boxed[2:7, 2:7].all() and boxed.sum() == 25


def test_evaluate_run_writes_consistent_results(trained_run, synthetic_root):
    metrics = evaluate_run(trained_run, "test", verbose=False)
    out = trained_run / "eval-test"
    saved = json.loads((out / "metrics.json").read_text())
    per_image = pd.read_csv(out / "per_image.csv")
    assert len(per_image) == saved["dataset"]["images"] == 6
    # the per-image counts are the model's own: its test probabilities at 0.5, recounted
    loaded = load_model(trained_run)
    p = loaded.params
    test = predict_split(loaded, load_split_arrays(synthetic_root, "test", p.image_size,
                                                   p.cache_path()), tta=False)
    assert list(per_image.file) == test.arrays.files
    truth = test.arrays.masks.astype(bool)
    recount = ConfusionCounts.from_masks(test.probs >= 0.5, truth)
    assert list(per_image.tp_headline) == list(recount.tp)
    assert list(per_image.fp_headline) == list(recount.fp)
    assert list(per_image.fn_headline) == list(recount.fn)
    # metrics.json and per_image.csv agree: pooled figures from the summed counts, mean
    # figures from the columns, for the plain and the selected setting, full and clean
    for key in ("headline", "selected"):
        tp, fp, fn = (per_image[f"{n}_{key}"] for n in ("tp", "fp", "fn"))
        head = saved[key]["metrics"]
        assert head["pooled_iou"] == pytest.approx(tp.sum() / (tp + fp + fn).sum())
        assert head["pooled_dice"] == pytest.approx(2 * tp.sum() / (2 * tp + fp + fn).sum())
        dice = np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 1.0)
        assert per_image[f"dice_{key}"].to_numpy() == pytest.approx(dice)
        assert head["mean_image_dice"] == pytest.approx(per_image[f"dice_{key}"].mean())
        assert head["mean_image_iou"] == pytest.approx(per_image[f"iou_{key}"].mean())
    assert saved["clean_test"]["images"] == per_image.clean.sum()
    assert saved["clean_test"]["of"] == len(per_image)
    clean = per_image[per_image.clean]
    if len(clean):
        pooled = clean.tp_headline.sum() / (clean.tp_headline + clean.fp_headline
                                            + clean.fn_headline).sum()
        assert saved["headline_clean"]["metrics"]["pooled_iou"] == pytest.approx(pooled)
    # the test BCE is the model's: recomputed from its probabilities with torch's BCE
    bce = torch.nn.functional.binary_cross_entropy(
        torch.from_numpy(test.probs).double(), torch.from_numpy(truth).double())
    assert saved["loss"]["bce"] == pytest.approx(bce.item(), rel=1e-4)
    assert saved["reference_comparison"]["our_test_bce"] == saved["loss"]["bce"]
    assert saved["headline"]["setting"].startswith("64px (model resolution), threshold 0.50")
    variants = pd.read_csv(out / "variants.csv")
    assert set(variants.postprocess) == {"none", "drop_small", "keep_largest", "fill_box"}
    assert set(variants.tta) == {True, False}
    # the selection table is right: the chosen row recomputed from the model's validation
    # probabilities with plain numpy, and the plain setting is one of the candidates
    pred = predict_split(loaded, load_split_arrays(synthetic_root, "valid", p.image_size,
                                                   p.cache_path()), tta=True)
    chosen = metrics["chosen_on_valid"]
    masks = np.stack([postprocess(prob >= chosen["threshold"], chosen["postprocess"],
                                  p.min_component_px)
                      for prob in (pred.probs_tta if chosen["tta"] else pred.probs)])
    truth = pred.arrays.masks.astype(bool)
    row = variants[(variants.threshold == chosen["threshold"]) & (variants.tta == chosen["tta"])
                   & (variants.postprocess == chosen["postprocess"])]
    assert row.pooled_iou.item() == pytest.approx((masks & truth).sum() / (masks | truth).sum())
    plain = variants[(variants.threshold == 0.5) & ~variants.tta
                     & (variants.postprocess == "none")]
    assert row.pooled_iou.item() >= plain.pooled_iou.item()


def _paths(x, path: str = "") -> set[str]:
    """Every key path of a metrics record; the labels of a group (sub-class, quintile) and of
    the quintile edges are one path, ``*``."""
    if not isinstance(x, dict):
        return {path}
    labelled = "_by_" in path.split("/")[-1] or path.endswith("size_quintile_upper_px")
    return {p for k, v in x.items() for p in _paths(v, f"{path}/{'*' if labelled else k}")}


# keys a record has gained since tests/data/metrics_before_records.json: added, never renamed
ADDED_SINCE = {"/evaluated_with/settings/min_lesion_sensitivity"}


def test_a_fresh_evaluation_writes_the_keys_metrics_json_had_before_the_typed_record(
        trained_run):
    """The record written today has the shape of the shipped model's metrics.json from
    before the typed record (tests/data): same keys at every level."""
    evaluate_run(trained_run, "test", verbose=False)
    fresh = json.loads((trained_run / "metrics.json").read_text())
    assert Evaluation.from_json(fresh).to_json() == fresh
    before = json.loads((ROOT / "tests" / "data" / "metrics_before_records.json").read_text())
    expected = _paths(before) | ADDED_SINCE
    if "clean_test" not in fresh:  # the synthetic test split may have no clean image
        expected = {p for p in expected if "clean" not in p}
    # a group's HD95 interval needs two of its images with both masks non-empty: the six
    # synthetic test images in five size quintiles may have none
    optional = {p for p in expected if "_by_" in p and p.endswith("/ci95/hd95")}
    assert _paths(fresh) - expected == set() and expected - _paths(fresh) <= optional


def test_lesion_calibration_and_group_figures_agree_with_the_per_image_table(trained_run,
                                                                            capsys, tmp_path):
    """Lesion-wise figures recomputed from per_image.csv; every test image in exactly one
    sub-class and one size quintile; calibration recomputed from the test probabilities, with
    the temperature fitted on valid; the lesion line printed beside the pixel line."""
    saved = evaluate_run(trained_run, "test", verbose=True)
    printed = capsys.readouterr().out
    per_image = pd.read_csv(trained_run / "eval-test" / "per_image.csv",
                            dtype={"subclass": str})
    loaded = load_model(trained_run)
    p = loaded.params
    annotations = sum(map(len, load_split(p.data_dir, "test").annotations.values()))
    for key in ("headline", "selected", "headline_original_resolution"):
        assert saved[key]["metrics"]["true_lesions"] == annotations  # one lesion each
        for name in ("lesion_sensitivity", "lesion_dice", "pq"):
            assert name in saved[key]["ci95"]
    head = saved["headline"]["metrics"]
    col = per_image
    assert head["lesion_sensitivity"] == pytest.approx(
        col.detected_headline.sum() / col.lesions_headline.sum())
    assert head["fp_components_per_image"] == pytest.approx(col.fp_components_headline.mean())
    assert head["lesion_dice"] == pytest.approx(col.lesion_dice_headline.mean())
    # groups: the sub-classes as the dataset names them, each image once
    by_class = saved["headline_by_subclass"]
    assert set(by_class) == set(col.subclass) and set(col.subclass) <= {"0", "1", "mixed",
                                                                         "none"}
    assert sum(block["images"] for block in by_class.values()) == len(col)
    for value, block in by_class.items():
        rows = col[col.subclass == value]
        assert block["metrics"]["lesion_dice"] == pytest.approx(rows.lesion_dice_headline.mean())
    quintiles = saved["headline_original_resolution_by_size_quintile"]
    assert sorted(quintiles) == sorted(set(col.size_quintile)) == ["Q1", "Q2", "Q3", "Q4", "Q5"]
    assert col.groupby("size_quintile").box_area_px.max().is_monotonic_increasing
    # calibration: raw Brier from the model's test probabilities; the temperature from valid
    arrays = load_split_arrays(p.data_dir, "test", p.image_size, p.cache_path())
    probs = predict_split(loaded, arrays, tta=False).probs
    cal = saved["calibration"]
    assert cal["temperature_fitted_on"] == "valid" and cal["temperature"] > 0
    assert cal["raw"]["metrics"]["brier"] == pytest.approx(
        float(((probs - arrays.masks) ** 2).mean()), rel=1e-5)
    assert 0 <= cal["raw"]["metrics"]["ece"] <= 1
    assert len(cal["raw"]["reliability"]["pixels"]) == 15
    assert sum(cal["raw"]["reliability"]["pixels"]) == arrays.masks.size
    assert "lesion-wise (BraTS 2023 rule): lesion sensitivity" in printed
    # 03's tables: one column per setting, one row per group, each figure with its interval
    lesion_rows = lesion_wise_table(saved)
    assert saved["headline"]["setting"] in lesion_rows.columns and len(lesion_rows) == 8
    sensitivity = f"{saved['headline']['metrics']['lesion_sensitivity']:.4f} ["
    assert lesion_rows.loc[lesion_rows.index.str.endswith("(lesion_sensitivity)"),
                           saved["headline"]["setting"]].item().startswith(sensitivity)
    assert list(calibration_table(saved).columns[:2]) == ["raw", "temperature scaled"]
    sizes = group_table(saved, "size_quintile")
    assert list(sizes.index) == ["Q1", "Q2", "Q3", "Q4", "Q5"] and sizes.images.sum() == len(col)
    assert group_table(saved, "subclass").images.sum() == len(col)
    # the model card shows them: lesion rows with intervals, calibration, the groups
    model_dir = export_model([trained_run], tmp_path / "model")
    record_metrics(model_dir, saved)
    card = (model_dir / "README.md").read_text()
    sens = saved["headline"]["metrics"]["lesion_sensitivity"]
    assert "| Lesion sensitivity: detected true lesions / all" in card
    assert f"{sens:.4f}" in card and "### Calibration" in card and "fitted on valid" in card
    assert "### By subclass" in card and "### By size quintile" in card


def _non_square_set(root):
    """Two non-square images (96x32 and 64x128, W x H) whose tumour boxes both land on
    model pixels [8, 24) x [8, 24) at 32 px: source and model grids align exactly."""
    (root / "test").mkdir(parents=True)
    images, annotations = [], []
    for n, (w, h, box) in enumerate(((96, 32, [24, 8, 48, 16]), (64, 128, [16, 32, 32, 64]))):
        Image.fromarray(np.full((h, w), 90, np.uint8)).save(root / "test" / f"s{n}.png")
        x, y, bw, bh = box
        images.append({"id": n, "file_name": f"s{n}.png", "width": w, "height": h})
        annotations.append({"id": n, "image_id": n, "category_id": 1, "bbox": box,
                            "segmentation": [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]})
    (root / "test" / "_annotations.coco.json").write_text(json.dumps(
        {"images": images, "annotations": annotations,
         "categories": [{"id": 1, "name": "tumour"}]}))


def _box(shape, x0, x1, y0, y1, round_corners=False):
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    if round_corners:  # bilinear x4 / x2 upsampling leaves each corner at 0.625 * 0.75 < 0.5
        m[[y0, y0, y1 - 1, y1 - 1], [x0, x1 - 1, x0, x1 - 1]] = False
    return m


@pytest.mark.parametrize("shift", [0, 1])
def test_source_resolution_path_maps_predictions_onto_each_images_own_grid(tmp_path, shift):
    """Model-resolution probabilities are resized back to each non-square source image:
    the oracle (the truth at 32 px) and the oracle moved one model pixel to the right
    (3 source pixels on the 96-wide image, 2 on the 64-wide one) give exactly the source
    masks worked out by hand, so the counts and HD95 are those of these masks."""
    root = tmp_path / "ns"
    _non_square_set(root)
    arrays = load_split_arrays(root, "test", 32, tmp_path / "cache")
    assert arrays.masks[:, 8:24, 8:24].all() and arrays.masks.sum() == 2 * 16 * 16
    probs = np.roll(arrays.masks.astype(np.float32), shift, axis=2)
    counts, dists, lesions = score_at_source_resolution(
        SplitPrediction(arrays, probs, None, 0.0, 0.0), root, "test", Setting(0.5), 0)
    split = load_split(root, "test")
    truths = [split.mask(img) for img in split.images]
    expected = [_box((32, 96), 24 + 3 * shift, 72 + 3 * shift, 8, 24),
                _box((128, 64), 16 + 2 * shift, 48 + 2 * shift, 32, 96, round_corners=True)]
    for i, (truth, mask) in enumerate(zip(truths, expected, strict=True)):
        c = ConfusionCounts.from_masks(mask[None], truth[None])
        assert (counts.tp[i], counts.fp[i], counts.fn[i]) == (c.tp[0], c.fp[0], c.fn[0])
        assert dists[i] == pytest.approx(hd95(mask, truth))
        # one annotation, found, no false alarm: its lesion Dice is the image's Dice
        assert (lesions["lesions"][i], lesions["detected"][i],
                lesions["fp_components"][i]) == (1, 1, 0)
        assert lesions["lesion_dice"][i] == pytest.approx(per_image_dice(c)[0])
    if shift == 0:
        assert per_image_iou(counts).tolist() == pytest.approx([1.0, 2044 / 2048])
    else:
        assert per_image_iou(counts)[0] == pytest.approx(45 / 51) and dists[0] > 0


def test_predict_any_size_grey_or_rgb_and_skips_unreadable(trained_run, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(np.full((50, 70), 80, np.uint8)).save(inputs / "grey.png")
    Image.fromarray(np.full((90, 40, 3), 120, np.uint8)).save(inputs / "rgb.jpg")
    (inputs / "broken.jpg").write_text("not an image")
    out = tmp_path / "out"
    code = main(["predict", str(inputs), "--checkpoint", str(trained_run / "best.pt"),
                 "--out", str(out)])
    assert code == 1  # the others are written; the status says one was skipped
    captured = capsys.readouterr()
    assert "broken.jpg" in captured.err and "2 masks written" in captured.out
    assert Image.open(out / "grey_mask.png").size == (70, 50)
    assert Image.open(out / "rgb_overlay.png").size == (40, 90)
    assert set(np.unique(np.asarray(Image.open(out / "rgb_mask.png")))) <= {0, 255}


def test_evaluate_cli_on_a_missing_run_is_a_clear_error(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nope")]) == 2
    assert "nope: no such run directory, model folder or checkpoint" in capsys.readouterr().err


def test_test_predictions_cannot_change_what_is_chosen_on_valid(trained_run, monkeypatch):
    from brainseg_lib.evaluation import evaluate as ev

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
    from brainseg_lib.inference import files as predict_module
    from brainseg_lib.inference.predictor import load_model, predict_images

    rng = np.random.default_rng(0)
    inputs = tmp_path / "in"
    inputs.mkdir()
    shapes = [(64, 64, 3), (50, 90, 3), (120, 40, 3)]
    for i, shape in enumerate(shapes):
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(inputs / f"{i}.png")
    monkeypatch.setattr(predict_module, "PREDICT_BATCH", 2)  # a full and a partial batch
    written, _ = predict_module.predict_files(trained_run, [inputs], tmp_path / "out",
                                              threshold=0.5)
    loaded = load_model(trained_run)
    for i, shape in enumerate(shapes):
        rgb = np.asarray(Image.open(inputs / f"{i}.png").convert("RGB"))
        alone = (predict_images(loaded, [rgb])[0] >= 0.5).astype(np.uint8) * 255
        batched = np.asarray(Image.open(tmp_path / "out" / f"{i}_mask.png"))
        assert batched.shape == shape[:2]
        assert (batched != alone).mean() < 0.001  # float reduction order only


def test_non_square_images_are_padded_to_a_square_not_squashed(trained_run):
    """A 40x100 image is predicted as the centre of its black-padded 100x100 square: the
    probabilities equal that square's, cropped back, and the model never sees it stretched."""
    from brainseg_lib.inference.predictor import load_model, pad_to_square, predict_images

    loaded = load_model(trained_run)
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 255, (40, 100, 3), dtype=np.uint8)
    square, (top, left) = pad_to_square(rgb)
    assert square.shape == (100, 100, 3) and (top, left) == (30, 0)
    assert not square[:30].any() and (square[30:70] == rgb).all()
    prob = predict_images(loaded, [rgb])[0]
    assert prob.shape == (40, 100)
    np.testing.assert_allclose(prob, predict_images(loaded, [square])[0][30:70], atol=1e-6)


def _faint_tumour_case():
    """Three 32-px images, one box tumour each: a sure one, a faint one (probability 0.3)
    and a sure one beside a larger false alarm (0.35): a threshold low enough to find the
    faint tumour lets the false alarm in, which costs more IoU than the tumour brings."""
    from brainseg_lib.data.arrays import SplitArrays, SplitLesions

    masks = np.zeros((3, 32, 32), np.uint8)
    probs = np.full((3, 32, 32), 0.02, np.float32)
    for i, (r, c) in enumerate(((4, 4), (10, 20), (20, 6))):
        masks[i, r:r + 8, c:c + 8] = 1
        probs[i, r:r + 8, c:c + 8] = 0.3 if i == 1 else 0.9
    probs[2, 2:14, 16:30] = 0.35
    files = [f"{i}.jpg" for i in range(3)]
    arrays = SplitArrays("valid", files, np.zeros((3, 3, 32, 32), np.uint8), masks,
                         [(32, 32)] * 3)
    lesions = SplitLesions(files, [m[None].astype(bool) for m in masks], ["tumor"] * 3,
                           np.full(3, 64.0))
    return SplitPrediction(arrays, probs, None, 0.0, 0.0), lesions


def test_a_sensitivity_floor_trades_pooled_iou_for_found_tumours():
    from brainseg_lib.errors import BrainsegError
    from brainseg_lib.evaluation.selection import choose_setting, lesion_sensitivity_at

    pred, lesions = _faint_tumour_case()
    by_iou, _ = choose_setting(pred, 0, True, False, 0.5)
    assert by_iou.threshold > 0.35  # IoU alone skips the faint tumour ...
    assert lesion_sensitivity_at(pred, lesions, by_iou, 0) == pytest.approx(2 / 3)
    floored, table = choose_setting(pred, 0, True, False, 0.5, lesions, 0.9)
    assert floored.threshold <= 0.3  # ... the floor finds it, at the cost of the false alarm
    assert lesion_sensitivity_at(pred, lesions, floored, 0) == 1.0
    chosen = table.loc[(table.threshold == floored.threshold) & (table.postprocess ==
                                                                 floored.postprocess)]
    assert (chosen.pooled_iou.iloc[0] < table.pooled_iou.max()
            and chosen.lesion_sensitivity.iloc[0] == 1.0)
    assert table.lesion_sensitivity.notna().sum() < len(table)  # computed only down the list
    pred.probs[1][pred.probs[1] == 0.3] = 0.05  # below every threshold: the floor is out of
    most, _ = choose_setting(pred, 0, True, False, 0.5, lesions, 0.9)  # reach, so the most
    assert lesion_sensitivity_at(pred, lesions, most, 0) == pytest.approx(2 / 3)  # sensitive
    with pytest.raises(BrainsegError, match="needs the selection split's annotated lesions"):
        choose_setting(pred, 0, True, False, 0.5, None, 0.9)
