"""Which data a run saw and which data it is scored on: the annotations' hash, the
provenance of a resized copy, and the check that evaluated labels are the trained ones."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from brainseg_lib.config import Params
from brainseg_lib.data.coco import DatasetError, dataset_hash
from brainseg_lib.data.locate import DataSource, data_source, find_real_dataset
from brainseg_lib.rundir import PROVENANCE_FILE, read_env


def dataset_record(source: Any, images: dict[str, int]) -> dict[str, Any]:
    """What a run records about its data: where, which labels (hash), and, for a resized copy,
    the dataset it was made from (``brainseg data resize`` writes provenance.json)."""
    record = {"path": str(source.path), "kind": source.kind, "found_by": source.how,
              "annotations_sha256": dataset_hash(source.path), "images": images}
    provenance = source.path / PROVENANCE_FILE
    if provenance.exists():
        prov = json.loads(provenance.read_text())
        record["derived_from"] = prov
        record["provenance"] = (f"trained on a {prov['size']}-px "
                                f"{'greyscale ' if prov.get('grey') else ''}copy of dataset "
                                f"{prov['source_annotations_sha256']}")
    return record


def data_for_run(run_dir: Path, params: Params, data_dir: str = "") -> DataSource:
    """The data to evaluate a run (trained with ``params``) on: the caller's ``data_dir``,
    else the run's own ``data_dir``, else $BRAINSEG_DATA or data/ in the repository, else the
    path the run recorded when it still exists there. Synthetic runs are evaluated on their
    own synthetic data. Whatever is chosen is then checked against the training record
    (:func:`check_data_identity`)."""
    recorded = read_env(run_dir).get("dataset", {})
    if params.synthetic or recorded.get("kind") == "synthetic":
        return data_source(params)
    found = find_real_dataset(data_dir or params.data_dir)
    if found:
        return found
    path = Path(recorded.get("path", ""))
    if recorded and (path / "test").is_dir():
        return DataSource(path, recorded["kind"], "the path recorded in env.json")
    return data_source(params)


def check_data_identity(run_dir: Path, source: DataSource) -> str:
    """Compare the evaluated labels with those the run trained on; returns a sentence for
    reports. Raises DatasetError on a mismatch that no recorded provenance explains."""
    env = read_env(run_dir)
    if not env:
        return "training data not recorded"
    trained = env.get("dataset", {})
    now = dataset_hash(source.path)
    if trained.get("annotations_sha256") in (None, now):
        return f"evaluated on the training data (annotations {now})"
    origin = trained.get("derived_from", {}).get("source_annotations_sha256")
    if origin == now:
        return f"{trained.get('provenance')}; evaluated on that dataset ({now})"
    raise DatasetError(f"{run_dir}: trained on annotations {trained.get('annotations_sha256')} "
                     f"but {source.path} holds {now}, and no recorded provenance links them")
