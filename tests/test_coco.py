"""Masks against hand-computed masks, and every bad-input case with its message."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from brainseg_lib.data.arrays import load_split_arrays, load_split_lesions, resize_mask
from brainseg_lib.data.check import check_dataset
from brainseg_lib.data.coco import (
    ANNOTATION_FILE,
    DatasetError,
    annotation_mask,
    is_rectangle,
    load_split,
    raise_on_errors,
    read_image,
    tumour_categories,
)

H = W = 8


def box(x0, y0, x1, y1):
    """Hand-computed mask: pixels with x0 <= col < x1 and y0 <= row < y1."""
    m = np.zeros((H, W), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def test_rectangle_polygon_covers_the_pixels_inside():
    ann = {"segmentation": [[6, 1, 2, 1, 2, 4, 6, 4, 6, 1]], "bbox": [2, 1, 4, 3]}
    np.testing.assert_array_equal(annotation_mask(ann, H, W), box(2, 1, 6, 4))
    assert is_rectangle(ann)


def test_triangle_polygon():
    ann = {"segmentation": [[0, 0, 8, 0, 0, 8]]}
    expected = np.array([[1 if c + r < 8 else 0 for c in range(W)] for r in range(H)])
    got = annotation_mask(ann, H, W)
    # pixels on the diagonal are split by pycocotools' rasteriser; the rest is exact
    off_diagonal = np.add.outer(np.arange(H), np.arange(W)) != 7
    np.testing.assert_array_equal(got[off_diagonal], expected[off_diagonal])
    assert not is_rectangle(ann)


def test_bbox_only_annotation():
    np.testing.assert_array_equal(annotation_mask({"bbox": [1, 2, 3, 4]}, H, W), box(1, 2, 4, 6))
    np.testing.assert_array_equal(annotation_mask({"segmentation": [], "bbox": [1, 2, 3, 4]},
                                                  H, W), box(1, 2, 4, 6))


def test_rle_compressed_and_uncompressed():
    target = box(3, 3, 7, 5)
    compressed = mask_utils.encode(np.asfortranarray(target))
    compressed["counts"] = compressed["counts"].decode()
    np.testing.assert_array_equal(annotation_mask({"segmentation": compressed}, H, W), target)
    # uncompressed: run lengths in column-major order, starting with zeros
    flat = target.ravel(order="F")
    runs, current, count = [], 0, 0
    for v in flat:
        if v != current:
            runs.append(count)
            current, count = v, 0
        count += 1
    runs.append(count)
    rle = {"size": [H, W], "counts": runs}
    np.testing.assert_array_equal(annotation_mask({"segmentation": rle}, H, W), target)


def write_split(root, split, images, annotations, categories=None, sizes=None):
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    for img in images:
        size = (sizes or {}).get(img["file_name"], (img["width"], img["height"]))
        Image.new("RGB", size, (40, 40, 40)).save(folder / img["file_name"])
    cats = categories or [{"id": 0, "name": "Tumor", "supercategory": "none"},
                          {"id": 1, "name": "0", "supercategory": "Tumor"}]
    (folder / ANNOTATION_FILE).write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": cats}))
    return folder


def img(i, name=None, w=W, h=H):
    return {"id": i, "file_name": name or f"im{i}.png", "width": w, "height": h}


def ann(i, image_id, bbox, segm=None, category=1):
    return {"id": i, "image_id": image_id, "category_id": category, "bbox": bbox,
            "segmentation": segm if segm is not None else []}


def test_union_of_overlapping_annotations_and_empty_image(tmp_path):
    write_split(tmp_path, "train", [img(0), img(1)],
                [ann(0, 0, [0, 0, 4, 4]), ann(1, 0, [2, 2, 4, 4])])
    split = load_split(tmp_path, "train")
    assert not split.issues
    expected = box(0, 0, 4, 4) | box(2, 2, 6, 6)
    np.testing.assert_array_equal(split.mask(split.images[0]), expected)
    assert split.mask(split.images[1]).sum() == 0


def test_tumour_categories_come_from_the_file():
    roboflow = [{"id": 0, "name": "Tumor", "supercategory": "none"},
                {"id": 1, "name": "0", "supercategory": "Tumor"},
                {"id": 2, "name": "1", "supercategory": "Tumor"}]
    assert tumour_categories(roboflow) == {1, 2}
    flat = [{"id": 7, "name": "lesion"}, {"id": 9, "name": "oedema"}]
    assert tumour_categories(flat) == {7, 9}


def test_non_tumour_category_is_ignored_with_a_warning(tmp_path):
    write_split(tmp_path, "train", [img(0)], [ann(0, 0, [0, 0, 4, 4], category=0)])
    split = load_split(tmp_path, "train")
    assert split.mask(split.images[0]).sum() == 0
    assert [i.severity for i in split.issues] == ["warning"]
    assert "not a tumour category" in split.issues[0].problem


def test_resize_keeps_masks_binary():
    mask = np.zeros((640, 640), np.uint8)
    mask[100:317, 233:401] = 1
    for size in (64, 128, 256, 320):
        small = resize_mask(mask, size)
        assert set(np.unique(small)) <= {0, 1}
        assert small.mean() == pytest.approx(mask.mean(), abs=0.004)


# --- bad input: every case names the split, the file and the problem -------------------

def error_of(root, split="train"):
    with pytest.raises(DatasetError) as info:
        raise_on_errors(load_split(root, split))
    return info.value


def test_missing_split_folder(tmp_path):
    err = error_of(tmp_path)
    assert "train" in str(err) and "split folder is missing" in str(err)


def test_missing_annotation_file(tmp_path):
    (tmp_path / "train").mkdir()
    assert "_annotations.coco.json is missing" in str(error_of(tmp_path))


def test_malformed_json(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / ANNOTATION_FILE).write_text('{"images": [')
    err = error_of(tmp_path)
    assert "malformed JSON" in str(err) and ANNOTATION_FILE in str(err)


def test_json_that_is_not_coco(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / ANNOTATION_FILE).write_text('{"foo": 1}')
    assert "not a COCO file" in str(error_of(tmp_path))


def test_image_listed_but_missing(tmp_path):
    folder = write_split(tmp_path, "train", [img(0), img(1)], [])
    (folder / "im1.png").unlink()
    err = error_of(tmp_path)
    assert "im1.png" in str(err) and "missing on disk" in str(err)


def test_annotation_for_unknown_image(tmp_path):
    write_split(tmp_path, "train", [img(0)], [ann(5, 42, [0, 0, 2, 2])])
    assert "unknown image id 42" in str(error_of(tmp_path))


def test_degenerate_polygons_are_warnings(tmp_path):
    write_split(tmp_path, "train", [img(0), img(1)],
                [ann(0, 0, [1, 1, 2, 2], segm=[[1, 1, 3, 3]]),          # 2 points
                 ann(1, 1, [0, 0, 0, 0], segm=[[1, 1, 5, 1, 3, 1]])])   # zero area, no bbox
    split = raise_on_errors(load_split(tmp_path, "train"))
    problems = [i.problem for i in split.issues]
    assert len(problems) == 2 and all("degenerate polygon" in p for p in problems)
    assert "bbox is used" in problems[0] and "skipped" in problems[1]
    np.testing.assert_array_equal(split.mask(split.images[0]), box(1, 1, 3, 3))
    assert split.mask(split.images[1]).sum() == 0


def test_truncated_and_non_image_files(tmp_path):
    folder = write_split(tmp_path, "train", [img(0, "a.jpg"), img(1, "b.jpg")], [])
    Image.new("RGB", (W, H)).save(folder / "a.jpg", quality=95)
    data = (folder / "a.jpg").read_bytes()
    (folder / "a.jpg").write_bytes(data[: len(data) // 2])
    (folder / "b.jpg").write_text("not an image")
    split = raise_on_errors(load_split(tmp_path, "train"))
    for image, name in zip(split.images, ("a.jpg", "b.jpg"), strict=True):
        with pytest.raises(DatasetError, match=rf"train: .*{name}: unreadable or truncated"):
            read_image(split, image)


def test_wrong_image_size(tmp_path):
    write_split(tmp_path, "train", [img(0)], [], sizes={"im0.png": (10, 8)})
    split = load_split(tmp_path, "train")
    with pytest.raises(DatasetError, match="im0.png: image is 10x8 but the JSON says 8x8"):
        read_image(split, split.images[0])


def test_grey_and_rgba_images_are_converted(tmp_path):
    folder = write_split(tmp_path, "train", [img(0), img(1)], [ann(0, 0, [0, 0, 2, 2])])
    Image.new("L", (W, H), 90).save(folder / "im0.png")
    Image.new("RGBA", (W, H), (90, 90, 90, 255)).save(folder / "im1.png")
    split = load_split(tmp_path, "train")
    for image in split.images:
        rgb, mode = read_image(split, image)
        assert rgb.shape == (H, W, 3) and mode in ("L", "RGBA")


def test_data_check_lists_every_problem(synthetic_root, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(synthetic_root, root)
    (root / "valid" / ANNOTATION_FILE).write_text("{")
    test_json = json.loads((root / "test" / ANNOTATION_FILE).read_text())
    (root / "test" / test_json["images"][0]["file_name"]).write_text("garbage")
    (root / "test" / test_json["images"][1]["file_name"]).unlink()
    report = check_dataset(root)
    text = report.format()
    assert len(report.errors) == 3
    assert "malformed JSON" in text and "unreadable or truncated" in text
    assert "missing on disk" in text and "errors: 3" in text


def test_synthetic_dataset_boxes_are_exact(synthetic_root, cache_dir):
    split = load_split(synthetic_root, "train")
    assert not split.issues and len(split.images) == 16
    for image in split.images:
        for a in split.annotations.get(image["id"], []):
            x, y, w, h = a["bbox"]
            m = annotation_mask(a, 64, 64)
            assert m.sum() == w * h and m[y:y + h, x:x + w].all()
    arrays = load_split_arrays(synthetic_root, "train", 64, cache_dir)
    assert arrays.images.shape == (16, 3, 64, 64) and arrays.images.dtype == np.uint8


def test_lesions_subclass_and_box_area_per_image(tmp_path):
    """One mask per annotation (not their union), the category name as the dataset gives it,
    'mixed' and 'none' where an image has two classes or no annotation; resized like masks."""
    root = tmp_path / "d"
    (root / "test").mkdir(parents=True)
    images, anns = [], []
    boxes = {0: [(1, [0, 0, 4, 2])], 1: [(1, [0, 0, 2, 2]), (2, [4, 4, 4, 4])], 2: []}
    for i, spec in boxes.items():
        Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(root / "test" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": W, "height": H})
        for cat, b in spec:
            anns.append({"id": len(anns), "image_id": i, "category_id": cat, "bbox": b,
                         "segmentation": []})
    cats = [{"id": 0, "name": "Tumor", "supercategory": "none"},
            {"id": 1, "name": "0", "supercategory": "Tumor"},
            {"id": 2, "name": "1", "supercategory": "Tumor"}]
    (root / "test" / ANNOTATION_FILE).write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": cats}))
    split = load_split(root, "test")
    two = split.lesions(split.images[1])
    assert two.shape == (2, H, W)
    assert np.array_equal(two[0], box(0, 0, 2, 2)) and np.array_equal(two[1], box(4, 4, 8, 8))
    assert split.lesions(split.images[2]).shape == (0, H, W)
    assert [split.subclass(img) for img in split.images] == ["0", "mixed", "none"]
    assert [split.box_area(img) for img in split.images] == [8.0, 20.0, 0.0]
    lesions = load_split_lesions(root, "test", 4)
    assert [len(x) for x in lesions.lesions] == [1, 2, 0]
    assert np.array_equal(lesions.lesions[1][1], resize_mask(box(4, 4, 8, 8), 4) > 0)
