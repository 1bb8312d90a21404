"""COCO as real tools write it: the standard layout, encodings, ids, paths, odd images."""

import codecs
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from brainseg_lib.cli import main
from brainseg_lib.data.arrays import load_split_arrays
from brainseg_lib.data.check import check_dataset
from brainseg_lib.data.coco import ANNOTATION_FILE, SPLITS, detect_layout, load_split
from brainseg_lib.data.locate import find_real_dataset
from brainseg_lib.data.resize import resize_dataset


def to_standard_layout(src, dst, val_name="val"):
    """The synthetic set rewritten as pycocotools/CVAT write it: annotations/instances_*.json
    and one image folder per split (``val`` for valid), JSON pretty-printed."""
    (dst / "annotations").mkdir(parents=True)
    for split in SPLITS:
        name = val_name if split == "valid" else split
        shutil.copytree(src / split, dst / name, ignore=shutil.ignore_patterns("*.json"))
        data = json.loads((src / split / ANNOTATION_FILE).read_text())
        (dst / "annotations" / f"instances_{name}.json").write_text(json.dumps(data, indent=4))
    return dst


def test_standard_layout_gives_identical_masks(synthetic_root, tmp_path, capsys):
    std = to_standard_layout(synthetic_root, tmp_path / "std")
    assert detect_layout(synthetic_root) == "roboflow" and detect_layout(std) == "coco"
    for split in SPLITS:
        a = load_split_arrays(synthetic_root, split, 64, tmp_path / "c1")
        b = load_split_arrays(std, split, 64, tmp_path / "c2")
        assert a.files == b.files
        assert np.array_equal(a.masks, b.masks) and np.array_equal(a.images, b.images)
    assert main(["data", "check", str(std)]) == 0
    assert "layout: coco" in capsys.readouterr().out
    assert find_real_dataset(std).path == std.resolve()


def test_encodings_bom_utf16_and_string_ids(synthetic_root, tmp_path):
    root = tmp_path / "d"
    shutil.copytree(synthetic_root, root)
    ann = root / "train" / ANNOTATION_FILE
    data = json.loads(ann.read_text())
    reference = load_split(synthetic_root, "train")
    for img in data["images"]:
        img["id"] = f"img-{img['id']}"
    for a in data["annotations"]:
        a["image_id"] = f"img-{a['image_id']}"
    text = json.dumps(data, indent=2)
    for raw in (codecs.BOM_UTF8 + text.encode(), text.encode("utf-16")):
        ann.write_bytes(raw)
        split = load_split(root, "train")
        assert not split.errors
        for img, ref in zip(split.images, reference.images, strict=True):
            assert np.array_equal(split.mask(img), reference.mask(ref))


@pytest.mark.parametrize("raw, message", [
    (b'{"images": [], "annotations": [],}', "trailing comma"),
    (b'{"images": [] // a comment\n}', "malformed JSON at line 1"),
    (b"\x81\x82 not text", "save it as UTF-8"),
])
def test_unreadable_annotation_files_name_what_to_change(synthetic_root, tmp_path, raw,
                                                         message):
    root = tmp_path / "d"
    shutil.copytree(synthetic_root, root)
    (root / "test" / ANNOTATION_FILE).write_bytes(raw)
    (issue,) = load_split(root, "test").errors
    assert message in issue.problem and ANNOTATION_FILE in issue.file


def test_paths_relative_to_the_root_png_grey_and_non_square(tmp_path):
    root = tmp_path / "ls"
    for split in SPLITS:
        (root / "images" / split).mkdir(parents=True)
    (root / "annotations").mkdir()
    for n, split in enumerate(SPLITS):
        pixels = np.zeros((40, 60), np.uint8)
        pixels[10:20, 5:35] = 200
        Image.fromarray(pixels).save(root / "images" / split / f"s{n}.png")  # grey PNG
        coco = {"images": [{"id": n, "file_name": f"images/{split}/s{n}.png", "width": 60,
                            "height": 40}],
                "categories": [{"id": 1, "name": "tumour"}],
                # a polygon straying outside the image, and a crowd RLE region
                "annotations": [
                    {"id": 1, "image_id": n, "category_id": 1, "bbox": [5, 10, 30, 10],
                     "segmentation": [[5, 10, 35, 10, 35, 20, 5, 20]]},
                    {"id": 2, "image_id": n, "category_id": 1, "bbox": [50, 30, 20, 20],
                     "segmentation": [[50, 30, 70, 30, 70, 50, 50, 50]]},
                    {"id": 3, "image_id": n, "category_id": 1, "iscrowd": 1,
                     "bbox": [0, 0, 2, 2],
                     "segmentation": {"size": [40, 60], "counts": [0, 2, 38, 2, 2358]}}]}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    report = check_dataset(root)
    assert not report.errors, report.format()
    split = load_split(root, "test")
    mask = split.mask(split.images[0])
    assert mask.shape == (40, 60)
    assert mask[10:20, 5:35].all() and mask[30:, 50:].all() and mask[:2, :2].all()
    arrays = load_split_arrays(root, "test", 32, tmp_path / "cache")
    assert arrays.images.shape == (1, 3, 32, 32) and arrays.source_sizes == [(40, 60)]
    out = resize_dataset(root, tmp_path / "small", 32)
    assert detect_layout(out) == "roboflow"
    small = load_split(out, "test")
    assert small.mask(small.images[0]).shape == (32, 32)


def test_data_check_shows_every_kind_of_problem(synthetic_root, tmp_path, capsys):
    root = tmp_path / "d"
    shutil.copytree(synthetic_root, root)
    for jpg in (root / "valid").glob("*.jpg"):
        jpg.unlink()  # a flood of one kind ...
    victim = sorted((root / "test").glob("*.jpg"))[0]
    victim.write_bytes(victim.read_bytes()[:200])  # ... and a single truncated file
    assert main(["data", "check", str(root)]) == 1
    out = capsys.readouterr().out
    assert "valid: image listed in the JSON is missing on disk — 6 file(s)" in out
    assert "and 3 more of this kind" in out
    assert "test: unreadable or truncated image — 1 file(s)" in out and victim.name in out


def test_a_mistyped_data_path_is_an_error_not_the_demo(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BRAINSEG_DATA", str(tmp_path / "typo"))
    with pytest.raises(FileNotFoundError, match="typo: the folder does not exist"):
        find_real_dataset()
    runs = tmp_path / "runs"
    assert main(["train", "--params", "params/quick.yaml", "--set", "epochs=1",
                 "--set", f"runs_dir={runs}"]) == 2
    assert str(tmp_path / "typo") in capsys.readouterr().err
    assert not runs.exists()  # no empty run folder left behind
    (tmp_path / "typo" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="instances_train.json"):
        find_real_dataset()
