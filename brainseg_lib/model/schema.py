"""A model folder is untrusted input: ``brainseg.json`` is checked against its schema (the
JSON type of every known key, bounded size and nesting) before anything else in the folder is
read, and every file it names must be a plain file name inside the folder.

Every failure is one ArtifactError naming the file and the key, so a damaged or hostile
record never reaches code that would fail with another exception or open another file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from brainseg_lib.model.checkpoint import ArtifactError

FORMAT = "brainseg model 1"  # the one layout of brainseg.json this code reads
MAX_RECORD_BYTES = 16 * 2**20  # the shipped model's brainseg.json is ~100 KB
MAX_DEPTH = 32  # nesting levels of lists and objects
_SHA256 = re.compile(r"[0-9a-f]{64}")
_NUMBER = (int, float)


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, bounded in size and nesting; one line otherwise."""
    if path.stat().st_size > MAX_RECORD_BYTES:
        raise ArtifactError(f"{path}: larger than {MAX_RECORD_BYTES // 2**20} MiB; not a "
                            "brainseg record")
    try:
        record = json.loads(path.read_bytes())
    except RecursionError:
        raise ArtifactError(f"{path}: nested deeper than {MAX_DEPTH} levels") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path}: unreadable JSON ({err})") from None
    if not isinstance(record, dict):
        raise ArtifactError(f"{path}: not a JSON object")
    if _depth(record) > MAX_DEPTH:
        raise ArtifactError(f"{path}: nested deeper than {MAX_DEPTH} levels")
    return record


def _depth(value: Any) -> int:
    """Nesting levels of lists and objects, counted without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(
            item, list) else ()
        deepest = max(deepest, level if isinstance(item, dict | list) else 0)
        stack.extend((child, level + 1) for child in children)
    return deepest


def plain_name(name: Any) -> bool:
    """A file name with no folder part: not absolute, no ``..``, no separator."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name
            and "\\" not in name and "\0" not in name and Path(name).name == name)


def is_file_in(folder: Path, name: Any) -> bool:
    """Whether ``folder/name`` is a regular file of the folder itself (a plain name, not a
    link that leads elsewhere)."""
    path = folder / name if plain_name(name) else None
    return path is not None and not path.is_symlink() and path.is_file()


def file_in(folder: Path, name: str) -> Path:
    """``folder/name`` when :func:`is_file_in`; an ArtifactError otherwise."""
    if not is_file_in(folder, name):
        raise ArtifactError(f"{folder / str(name)}: not a plain file inside {folder}; refused")
    return folder / name


def _is(kind: type | tuple[type, ...], null: bool = False) -> Callable[[Any], bool]:
    """A check that a value is of ``kind`` (a JSON true/false is no number), or null."""
    def check(value: Any) -> bool:
        if value is None:
            return null
        return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    return check


def _list_of(check: Callable[[Any], bool], nonempty: bool = False) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, list) and all(check(x) for x in v) and (v or not nonempty)


def _weights_name(v: Any) -> bool:
    return plain_name(v) and v.endswith(".safetensors")


def _hashes(v: Any) -> bool:
    return v is None or (isinstance(v, dict) and all(
        plain_name(k) and isinstance(h, str) and _SHA256.fullmatch(h) for k, h in v.items()))


_STR, _DICT = _is(str), _is(dict)
# brainseg.json's known keys: the check each value must pass (absent keys take defaults)
SCHEMA: dict[str, Callable[[Any], bool]] = {
    "format": lambda v: v == FORMAT, "members": _list_of(_weights_name, nonempty=True),
    "stored_as": _STR,
    "params": _DICT, "runs": _list_of(_STR), "training": _list_of(_DICT),
    "environment": _DICT, "dataset": _DICT, "weights_init": _STR,
    "checkpoint_epochs": _list_of(_is(int)), "parent": _is(dict, null=True),
    "test_metrics": _is(dict, null=True), "sha256": _hashes, "onnx": _is(dict, null=True),
}
_DATASET = {"name": _STR, "licence": _STR, "derived_from": _DICT, "provenance": _STR}
_PARENT = {"path": _STR, "file": _STR, "sha256": _STR}
_ONNX = {"files": _list_of(plain_name, nonempty=True), "torch": _STR, "onnxruntime": _STR,
         "verified_on": _STR, "export_seconds": _list_of(_is(_NUMBER)),
         "max_abs_prob_diff": _is(_NUMBER), "mask_agreement": _is(_NUMBER),
         "threshold": _is(_NUMBER), "int8": _is(dict, null=True)}
_INT8 = {"files": _list_of(plain_name, nonempty=True), "quantisation": _STR,
         "calibrated_on": _STR, "quantise_seconds": _list_of(_is(_NUMBER)),
         "max_abs_prob_diff": _is(_NUMBER), "mask_agreement": _is(_NUMBER)}
_TRAINING = {"epochs_run": _is(int, null=True), "best_epoch": _is(int, null=True),
             "train_seconds_this_session": _is(_NUMBER)}


def check_record(path: Path, record: dict[str, Any]) -> None:
    """ArtifactError naming the first key of ``record`` (``brainseg.json``) whose value
    does not have its schema's type."""
    if "params" not in record:
        raise ArtifactError(f"{path}: key 'params' missing (the training parameters)")
    _check(path, record, SCHEMA, "")
    for key, schema in (("dataset", _DATASET), ("parent", _PARENT), ("onnx", _ONNX)):
        if record.get(key):
            _check(path, record[key], schema, f"{key}.", required=key != "dataset")
    if (record.get("onnx") or {}).get("int8"):
        _check(path, record["onnx"]["int8"], _INT8, "onnx.int8.", required=True)
    for i, entry in enumerate(record.get("training") or []):
        _check(path, entry, _TRAINING, f"training[{i}].", required=False)
    if len(record.get("runs") or []) != len(record.get("training") or []):
        raise ArtifactError(f"{path}: key 'training': one record per run expected "
                            f"({len(record.get('runs') or [])} runs)")


def _check(path: Path, record: dict[str, Any], schema: dict[str, Callable[[Any], bool]],
           prefix: str, required: bool = False) -> None:
    for key, check in schema.items():
        if key not in record and not required:
            continue
        if key not in record and key != "int8":
            raise ArtifactError(f"{path}: key '{prefix}{key}' missing")
        if key in record and not check(record[key]):
            raise ArtifactError(f"{path}: key '{prefix}{key}' has an invalid value "
                                f"({short_value(record[key])})")


def short_value(value: Any) -> str:
    """A JSON value as an error message quotes it: at most 60 characters."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
