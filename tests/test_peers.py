"""benchmarks/peers: the nnU-Net converter and the peer scorer, in the project's venv (no
peer installed: the trainings are benchmarks, not tests)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from brainseg_lib.data.arrays import load_split_arrays
from brainseg_lib.data.coco import load_split
from brainseg_lib.errors import BrainsegError
from conftest import ROOT


def _load(name: str) -> ModuleType:
    """A script of benchmarks/peers as a module (that folder is not a package)."""
    spec = importlib.util.spec_from_file_location(
        f"peers_{name}", ROOT / "benchmarks" / "peers" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


convert = _load("nnunet_convert")
score = _load("score")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BRAINSEG_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _png(path: Path) -> tuple[Image.Image, np.ndarray]:
    with Image.open(path) as pil:
        pil.load()
        return pil.copy(), np.asarray(pil)


def test_converter_writes_our_splits_in_nnunet_raw_format(synthetic_root, tmp_path, cache):
    folder = convert.convert(synthetic_root, tmp_path / "raw", size=32)
    assert folder.name == "Dataset501_BrainsegTumour"
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temp folder left
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["file_ending"] == ".png" and list(meta["channel_names"]) == ["0"]
    assert meta["labels"] == {"background": 0, "tumour": 1} and meta["numTraining"] == 22
    cases = json.loads((folder / "case_map.json").read_text())["cases"]
    by_split = {s: [c for c in cases if c["split"] == s] for s in ("train", "valid", "test")}
    for split, listed in by_split.items():  # every image of every split, in COCO order
        assert [c["file"] for c in listed] == [
            img["file_name"] for img in load_split(synthetic_root, split).images
        ]
    split_file = json.loads((folder / "splits_final.json").read_text())
    assert split_file == [
        {
            "train": [c["case"] for c in by_split["train"]],
            "val": [c["case"] for c in by_split["valid"]],
        }
    ]
    dev = [c["case"] for c in by_split["train"] + by_split["valid"]]
    test = [c["case"] for c in by_split["test"]]
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == sorted(
        f"{c}_0000.png" for c in dev
    )
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == sorted(
        f"{c}.png" for c in dev
    )
    assert sorted(p.name for p in (folder / "imagesTs").iterdir()) == sorted(
        f"{c}_0000.png" for c in test
    )
    assert not (folder / "labelsTs").exists()
    assert not set(test) & {p.stem.removesuffix("_0000") for p in (folder / "imagesTr").iterdir()}


def test_converter_labels_are_our_masks_single_channel_0_1(synthetic_root, tmp_path, cache):
    folder = convert.convert(synthetic_root, tmp_path / "raw", size=32)
    cases = json.loads((folder / "case_map.json").read_text())["cases"]
    arrays = load_split_arrays(synthetic_root, "train", 32)
    tumour_px = 0
    for case in (c for c in cases if c["split"] == "train"):
        i = arrays.files.index(case["file"])
        label, values = _png(folder / "labelsTr" / f"{case['case']}.png")
        image, grey = _png(folder / "imagesTr" / f"{case['case']}_0000.png")
        assert label.getbands() == ("L",) and image.getbands() == ("L",)
        assert set(np.unique(values)) <= {0, 1} and values.shape == (32, 32)
        np.testing.assert_array_equal(values, arrays.masks[i])
        np.testing.assert_array_equal(grey, arrays.images[i][0])  # grey slices: R = G = B
        tumour_px += int(values.sum())
    assert tumour_px > 0


def test_converter_source_size_rasterises_the_annotations(synthetic_root, tmp_path, cache):
    folder = convert.convert(synthetic_root, tmp_path / "raw", size=0, dataset_id=7)
    coco = load_split(synthetic_root, "valid")
    _, label = _png(folder / "labelsTr" / "valid_0002.png")
    np.testing.assert_array_equal(label, coco.mask(coco.images[2]))
    with pytest.raises(BrainsegError, match="already exists"):
        convert.convert(synthetic_root, tmp_path / "raw", size=0, dataset_id=7)


def _write_truth(
    synthetic_root: Path, out: Path, names: dict[str, str] | None = None, empty: bool = False
) -> Path:
    """The test masks at the source size as a peer's PNGs, named by stem or by case."""
    coco = load_split(synthetic_root, "test")
    out.mkdir(parents=True)
    for img in coco.images:
        mask = np.zeros_like(coco.mask(img)) if empty else coco.mask(img)
        name = names[img["file_name"]] if names else Path(img["file_name"]).stem
        Image.fromarray(mask).save(out / f"{name}.png")
    return out


def _score(*args: str | Path) -> int:
    return score.main([str(a) for a in args] + ["--bootstrap", "20"])


def test_truth_as_predictions_scores_one_at_both_resolutions(synthetic_root, tmp_path, cache):
    pred = _write_truth(synthetic_root, tmp_path / "pred")
    assert (
        _score("--pred", pred, "--data", synthetic_root, "--out", tmp_path / "s", "--size", 32) == 0
    )
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    for resolution in ("model_resolution", "source_resolution"):
        m = summary[resolution]["full"]["metrics"]
        assert m["pooled_iou"] == m["mean_image_dice"] == m["fg_bg_miou"] == 1.0
        assert m["lesion_sensitivity"] == 1.0 and m["fp_components_per_image"] == 0.0
        assert summary[resolution]["full"]["ci95"]["pooled_iou"] == [1.0, 1.0]
    table = pd.read_csv(tmp_path / "s" / "per_image.csv")
    assert len(table) == 6 and (table.iou_headline == 1).all()
    assert (
        table.tp_headline + table.fn_headline + table.fp_headline + table.tn_headline == 32 * 32
    ).all()
    assert (table.tp_source + table.fn_source + table.fp_source + table.tn_source == 64 * 64).all()
    assert summary["clean_test"]["images"] == int(table.clean.sum())


def test_nnunet_case_names_through_the_case_map(synthetic_root, tmp_path, cache):
    folder = convert.convert(synthetic_root, tmp_path / "raw", size=64)
    cases = json.loads((folder / "case_map.json").read_text())["cases"]
    names = {c["file"]: c["case"] for c in cases if c["split"] == "test"}
    pred = _write_truth(synthetic_root, tmp_path / "pred", names)
    assert (
        _score(
            "--pred",
            pred,
            "--data",
            synthetic_root,
            "--out",
            tmp_path / "s",
            "--size",
            64,
            "--case-map",
            folder / "case_map.json",
        )
        == 0
    )
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["model_resolution"]["full"]["metrics"]["pooled_iou"] == 1.0


@pytest.mark.parametrize(
    "damage, message",
    [
        ("empty file", "unreadable mask"),
        ("missing", "no prediction for 1 of 6 test images"),
        ("rgb", "not a single-channel mask"),
        ("probabilities", "not a binary mask"),
    ],
)
def test_bad_prediction_folder_is_one_clear_line(
    synthetic_root, tmp_path, cache, capsys, damage, message
):
    pred = _write_truth(synthetic_root, tmp_path / "pred")
    victim = sorted(pred.iterdir())[2]
    if damage == "empty file":
        victim.write_bytes(b"")
    elif damage == "missing":
        victim.unlink()
    elif damage == "rgb":
        Image.new("RGB", (64, 64)).save(victim)
    else:
        Image.fromarray(np.full((64, 64), 77, np.uint8)).save(victim)
    assert _score("--pred", pred, "--data", synthetic_root, "--out", tmp_path / "s") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and victim.name in err
    assert not (tmp_path / "s").exists()


def test_paired_difference_brainseg_minus_peer(synthetic_root, tmp_path, cache):
    """A perfect 'brainseg' table against an empty peer: brainseg ahead on every image;
    a table scored at another size is refused rather than paired."""
    good = _write_truth(synthetic_root, tmp_path / "good")
    assert (
        _score("--pred", good, "--data", synthetic_root, "--out", tmp_path / "b", "--size", 64) == 0
    )
    empty = _write_truth(synthetic_root, tmp_path / "empty", empty=True)
    brainseg_csv = tmp_path / "b" / "per_image.csv"

    def paired(out: str, size: int) -> int:
        return _score("--pred", empty, "--data", synthetic_root, "--out", tmp_path / out,
                      "--size", size, "--brainseg-run", brainseg_csv)

    assert paired("p", 64) == 0
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    rows = summary["paired_brainseg_minus_peer"]["rows"]
    full = {r["metric"]: r for r in rows if r["subset"] == "full"}
    assert full["pooled_iou"]["brainseg_minus_peer"] == 1.0
    assert full["pooled_iou"]["verdict"] == "brainseg better"
    assert full["lesion_sensitivity"]["verdict"] == "brainseg better"
    assert paired("q", 32) == 2


table = _load("table")


def _timings(path: Path, peer: str) -> Path:
    """A timings.json of the shape each peer's script writes (the fields the table reads)."""
    if peer == "nnunet":
        record = {"budget": {"epochs": 3, "iterations": 750, "train_seconds": 900.0,
                             "plan": {"batch_size": 97}}, "predict_tta_images_per_s": 4.0}
    else:
        record = {"epochs": 12, "iterations": 1200, "train_images_per_s": 21.5,
                  "predict_notta_images_per_s": 60.0}
    path.write_text(json.dumps(record))
    return path


def test_table_sets_brainseg_beside_its_peers(synthetic_root, evaluated_runs, tmp_path, cache):
    """The comparison table reads each side's own records: brainseg's metrics.json and
    train.json, each peer's score summary and timings, and the paired rows score.py wrote."""
    run = evaluated_runs[1]
    truth = _write_truth(synthetic_root, tmp_path / "truth")
    peers = tmp_path / "peers"
    for peer, folder, tta in (("nnunet", "run-1", "tta"), ("monai", "seed-0", "notta")):
        timings = _timings(tmp_path / f"{peer}.json", peer)
        out = peers / peer / folder / f"score_{tta}"
        assert _score("--pred", truth, "--data", synthetic_root, "--out", out, "--size", 64,
                      "--timings", timings, "--brainseg-run", run) == 0
    text = table.render([run], peers)
    metrics = json.loads((run / "eval-test" / "metrics.json").read_text())
    ours = [line for line in text.splitlines() if line.startswith("| brainseg smoke")]
    assert len(ours) == 4  # plain and chosen, full and clean
    assert f"{metrics['headline']['metrics']['pooled_iou']:.3f} [" in ours[0]
    nnunet = next(line for line in text.splitlines() if line.startswith("| nnunet | run-1"))
    assert "| 3 (750) | 80.8 | 4.0 | 1.000 [1.00, 1.00] |" in nnunet  # 750 x 97 / 900 s
    monai = next(line for line in text.splitlines() if line.startswith("| monai | seed-0"))
    assert "| 12 (1200) | 21.5 | 60.0 | 1.000 [1.00, 1.00] |" in monai
    summary = json.loads((peers / "monai" / "seed-0" / "score_notta" / "summary.json").read_text())
    full = next(r for r in summary["paired_brainseg_minus_peer"]["rows"]
                if r["subset"] == "full" and r["metric"] == "pooled_iou")
    paired = [line for line in text.splitlines()
              if line.startswith("| monai seed-0") and "| full |" in line and "pooled_iou" in line]
    assert paired == [f"| monai seed-0 (thr 0.5, no TTA) | {run.name} | full | 6 | pooled_iou | "
                      f"{full['brainseg_minus_peer']:+.3f} ({full['ci95_low']:+.3f} to "
                      f"{full['ci95_high']:+.3f}) | {full['verdict']} |"]
    assert table.main(["--peers", str(tmp_path / "none"), "--brainseg", str(run)]) == 2
