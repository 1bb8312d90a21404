"""Finding the dataset: explicit path, $BRAINSEG_DATA, data/ in the repo, download, or demo.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from brainseg_lib.config import Params, project_root

KAGGLE_ID = "pkdarabi/brain-tumor-image-dataset-semantic-segmentation"
KAGGLE_URL = f"https://www.kaggle.com/datasets/{KAGGLE_ID}"
SYNTHETIC_BANNER = ("SYNTHETIC DEMO DATA: no real dataset was found, so this run uses generated "
                    "images. Its numbers say nothing about brain tumours.")


MANUAL_STEPS = (
    f"Get the data by hand: download {KAGGLE_URL} (CC BY 4.0), unzip it so that "
    "train/, valid/ and test/ each hold _annotations.coco.json and the JPEGs, then either "
    "put it at data/brain-tumor-coco/ in this repository or set BRAINSEG_DATA to its folder."
)


@dataclass(frozen=True)
class DataSource:
    path: Path
    kind: str  # "real" or "synthetic"
    how: str  # how it was found, for reports

    @property
    def synthetic(self) -> bool:
        return self.kind == "synthetic"


def looks_like_dataset(path: Path) -> bool:
    return not missing_parts(path)


def missing_parts(path: Path) -> str:
    """What keeps ``path`` from being a dataset, in words ('' when nothing)."""
    from brainseg_lib.data.coco import detect_layout

    if not path.is_dir():
        return "the folder does not exist"
    try:
        detect_layout(path)
    except FileNotFoundError as err:
        return str(err)
    return ""


def find_real_dataset(data_dir: str | Path = "") -> DataSource | None:
    """The first of: ``data_dir``, ``$BRAINSEG_DATA``, ``data/brain-tumor-coco`` in the repo.

    A path that is set but holds no dataset is an error naming it and what is missing: a
    typo must not quietly turn a run into a run on the synthetic demo.
    """
    if data_dir:
        path = Path(data_dir).expanduser()
        path = path if path.is_absolute() else project_root() / path
        problem = missing_parts(path)
        if problem:
            raise FileNotFoundError(f"data_dir {path}: {problem}")
        return DataSource(path.resolve(), "real", "data_dir parameter")
    env = os.environ.get("BRAINSEG_DATA")
    if env:
        path = Path(env).expanduser().resolve()
        problem = missing_parts(path)
        if problem:
            raise FileNotFoundError(f"BRAINSEG_DATA={env}: {problem} (unset it to use "
                                    "data/brain-tumor-coco or the synthetic demo)")
        return DataSource(path, "real", "BRAINSEG_DATA")
    local = project_root() / "data" / "brain-tumor-coco"
    if looks_like_dataset(local):
        return DataSource(local.resolve(), "real", "data/brain-tumor-coco in the repository")
    return None


def _online(host: str = "www.kaggle.com", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def download_dataset(dest: Path | None = None) -> Path:
    """Download the Kaggle dataset with kagglehub into ``data/brain-tumor-coco``.

    Offline it fails within seconds with the manual steps, instead of retrying for minutes.
    """
    from brainseg_lib.data.coco import DatasetError

    dest = dest or project_root() / "data" / "brain-tumor-coco"
    if not _online():
        raise DatasetError(f"cannot reach Kaggle (offline?). {MANUAL_STEPS}")
    import kagglehub

    downloaded = Path(kagglehub.dataset_download(KAGGLE_ID))
    candidates = [p for p in [downloaded, *downloaded.rglob("*")] if p.is_dir()
                  and looks_like_dataset(p)]
    if not candidates:
        raise DatasetError(f"the download at {downloaded} has no train/valid/test split. "
                           f"{MANUAL_STEPS}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(candidates[0], dest)
    return dest


def resolve_data(data_dir: str = "", synthetic: bool = False, cache_dir: str | Path = "",
                 synthetic_counts: tuple[int, int, int] = (96, 24, 24),
                 synthetic_size: int = 128, seed: int = 0) -> DataSource:
    """The dataset a run uses; without a real one, the synthetic demo, announced loudly."""
    from brainseg_lib.data.arrays import default_cache_dir
    from brainseg_lib.data.synthetic import ensure_synthetic_coco

    if not synthetic:
        found = find_real_dataset(data_dir)
        if found:
            return found
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    counts = tuple(synthetic_counts)
    path = ensure_synthetic_coco(
        root / f"synthetic-{'-'.join(map(str, counts))}-{synthetic_size}px-seed{seed}",
        counts=counts, size=synthetic_size, seed=seed)
    how = "synthetic parameter" if synthetic else "no real dataset found"
    if not synthetic:
        print(f"\n{'!' * 78}\n{SYNTHETIC_BANNER}\n{MANUAL_STEPS}\n{'!' * 78}\n", file=sys.stderr)
    return DataSource(path, "synthetic", how)


def data_source(params: Params) -> DataSource:
    """The dataset a run with these parameters uses."""
    return resolve_data(params.data_dir, params.synthetic, params.cache_path() or "",
                        tuple(params.synthetic_counts), params.synthetic_size, params.seed)
