"""Our COCO splits as an nnU-Net v2 raw dataset, so nnU-Net trains on exactly our data.

Runs in the project's venv (it reads the data with brainseg's own code; nnU-Net is not
needed). Writes ``<out>/Dataset<id>_<name>/``:

* ``imagesTr/<case>_0000.png`` + ``labelsTr/<case>.png``: train and valid, one greyscale
  channel; labels single-channel uint8 {0 background, 1 tumour};
* ``imagesTs/<case>_0000.png``: test images only (no test label is written: scoring reads
  the truth from the COCO files, never from here);
* ``dataset.json`` (``file_ending: .png``), ``splits_final.json`` (fold 0 = our train and
  valid lists exactly; copy it into nnU-Net's preprocessed folder, as ``run_nnunet.sh``
  does) and ``case_map.json`` (case id <-> split and source file).

``--size N`` writes brainseg's own arrays at N px (the images and masks brainseg trains on,
decoded and resized by ``brainseg_lib.data.arrays``); ``--size 0`` writes the source images
at their own size with masks rasterised from the annotations (``CocoSplit.mask``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from brainseg_lib.data.arrays import load_split_arrays
from brainseg_lib.data.coco import (
    SPLITS,
    dataset_hash,
    load_split,
    raise_on_errors,
    read_image,
)
from brainseg_lib.errors import BrainsegError
from brainseg_lib.io import atomic_write, atomic_write_json

CASE_MAP_FILE = "case_map.json"
SPLITS_FILE = "splits_final.json"
LABELS = {"background": 0, "tumour": 1}


@dataclass(frozen=True)
class Case:
    """One image as nnU-Net sees it: its case id, and where it came from."""

    case: str  # e.g. "train_0007": split and position in the split's annotation file
    split: str
    file: str  # the COCO file_name


def case_id(split: str, index: int) -> str:
    return f"{split}_{index:04d}"


def dataset_folder(out: Path, dataset_id: int, name: str) -> Path:
    """nnU-Net's required folder name: ``Dataset`` + three digits + ``_`` + a name."""
    if not 1 <= dataset_id <= 999:
        raise BrainsegError(f"--dataset-id {dataset_id}: nnU-Net needs 1..999")
    return out / f"Dataset{dataset_id:03d}_{name}"


def split_slices(
    data_dir: Path, split: str, size: int
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(file, greyscale uint8 image, uint8 {0,1} mask) of each image of ``split``, in the
    annotation file's order; at ``size`` px from brainseg's arrays, or at the source size."""
    if size:
        arrays = load_split_arrays(data_dir, split, size)
        for i, name in enumerate(arrays.files):
            rgb = np.asarray(arrays.images[i]).transpose(1, 2, 0)
            yield name, _grey(rgb), np.asarray(arrays.masks[i], np.uint8)
        return
    coco = raise_on_errors(load_split(data_dir, split))
    for image in coco.images:
        rgb, _ = read_image(coco, image)
        yield str(image["file_name"]), _grey(rgb), coco.mask(image)


def _grey(rgb: np.ndarray) -> np.ndarray:
    """One channel: PIL's luma (the dataset's slices are grey stored as RGB, R = G = B)."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).convert("L"))


def _save_png(path: Path, array: np.ndarray) -> None:
    atomic_write(
        path,
        lambda tmp: Image.fromarray(np.ascontiguousarray(array, np.uint8)).save(tmp, format="PNG"),
    )


def write_split(data_dir: Path, split: str, size: int, folder: Path) -> list[Case]:
    """Write one split's images (and, outside test, labels); its cases in order."""
    images = folder / ("imagesTs" if split == "test" else "imagesTr")
    cases = []
    for i, (name, grey, mask) in enumerate(split_slices(data_dir, split, size)):
        case = Case(case_id(split, i), split, name)
        _save_png(images / f"{case.case}_0000.png", grey)
        if split != "test":
            _save_png(folder / "labelsTr" / f"{case.case}.png", mask)
        cases.append(case)
    return cases


def dataset_json(n_training: int, name: str) -> dict:
    """nnU-Net's dataset.json: one MRI channel (z-scored per image, its default for a
    non-CT channel), background and tumour, PNG files."""
    return {
        "name": name,
        "channel_names": {"0": "MRI"},
        "labels": LABELS,
        "numTraining": n_training,
        "file_ending": ".png",
        "description": "brainseg's COCO splits (train+valid in imagesTr, test in "
        "imagesTs); fold 0 of splits_final.json is our train/valid split",
    }


def convert(
    data_dir: Path, out: Path, size: int, dataset_id: int = 501, name: str = "BrainsegTumour"
) -> Path:
    """Write the raw dataset; returns its folder. Built aside and renamed when complete;
    refuses a folder that already exists, so two conversions (other sizes, data) never mix."""
    final = dataset_folder(out, dataset_id, name)
    if final.exists():
        raise BrainsegError(f"{final} already exists: remove it or choose --dataset-id")
    out.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=out))
    try:
        _write_dataset(data_dir, folder, size, name)
        folder.chmod(0o755)
        folder.rename(final)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return final


def _write_dataset(data_dir: Path, folder: Path, size: int, name: str) -> None:
    """Images, labels, dataset.json, the split file and the case map, into ``folder``."""
    cases = {split: write_split(data_dir, split, size, folder) for split in SPLITS}
    train = [c.case for c in cases["train"]]
    valid = [c.case for c in cases["valid"]]
    atomic_write_json(folder / "dataset.json", dataset_json(len(train) + len(valid), name))
    atomic_write_json(folder / SPLITS_FILE, [{"train": train, "val": valid}])
    atomic_write_json(
        folder / CASE_MAP_FILE,
        {
            "data_dir": str(data_dir),
            "annotations_sha256": dataset_hash(data_dir),
            "size": size or "source",
            "cases": [asdict(c) for split in SPLITS for c in cases[split]],
        },
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="the COCO dataset folder")
    parser.add_argument("--out", required=True, type=Path, help="nnU-Net's raw folder")
    parser.add_argument(
        "--size",
        type=int,
        default=128,
        help="px (brainseg's arrays at that size; 0 = the source images)",
    )
    parser.add_argument("--dataset-id", type=int, default=501)
    parser.add_argument("--name", default="BrainsegTumour")
    args = parser.parse_args(argv)
    try:
        folder = convert(args.data, args.out, args.size, args.dataset_id, args.name)
    except BrainsegError as err:
        print(f"nnunet_convert: {err}", file=sys.stderr)
        return 2
    print(f"nnunet_convert: wrote {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
