"""Every file a user hands us is untrusted (issue 29): bad input is a working load, a rebuild
with a one-line warning, or one clean ``BrainsegError`` naming the file, never another
exception and never a silently wrong result. Organised by the issue's classes (1-2, model
folders and their integrity, live in tests/test_model_files.py and tests/test_onnx.py):

3. caches and derived files: rebuilt, never trusted;
4. parameters, grid files and URLs: checked before any data loads;
5. images: every Pillow mode by its real range; bombs and unreadable files skipped, counted;
6. outputs: written atomically.

The property-based tests mutate valid records with hypothesis (the dev extra).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from brainseg_lib.config import ParamsError, load_params
from brainseg_lib.data.arrays import CacheManifest, load_split_arrays
from brainseg_lib.data.duplicates import near_duplicate_groups
from brainseg_lib.data.locate import DataSource
from conftest import ROOT

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # the dev extra; the property tests are skipped without it
    given = None


def _rebuilt(load):
    """``load()``'s result and the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = load()
    return result, [str(w.message) for w in caught if w.category is UserWarning]


@pytest.fixture
def data_root(synthetic_root, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(synthetic_root, copy)
    return copy


# --- 3. caches and derived files ------------------------------------------------------------

def _load_valid(root, cache_dir):
    return load_split_arrays(root, "valid", 32, cache_dir, use_memory=False)


@pytest.mark.parametrize("field", [f for f in CacheManifest.__dataclass_fields__])
def test_a_manifest_missing_a_field_is_rebuilt_with_a_warning_naming_it(data_root, cache_dir,
                                                                        field):
    good = _load_valid(data_root, cache_dir)
    manifest = next(cache_dir.glob("valid-32-*.json"))
    record = json.loads(manifest.read_text())
    del record[field]
    manifest.write_text(json.dumps(record))
    rebuilt, said = _rebuilt(lambda: _load_valid(data_root, cache_dir))
    assert said == [f"cache {manifest.with_suffix('')}: corrupt ({manifest.name}: the manifest "
                    f"has no field '{field}'); rebuilding from the images"]
    np.testing.assert_array_equal(rebuilt.images, good.images)
    assert rebuilt.files == good.files and rebuilt.source_sizes == good.source_sizes
    assert "images_crc32" in json.loads(manifest.read_text())  # written whole again


def test_corrupt_near_duplicate_groups_are_rebuilt_with_a_warning_naming_the_file(
        data_root, cache_dir):
    source = DataSource(data_root, "real", "test")
    good = near_duplicate_groups(source, 4, cache_dir)
    (path,) = cache_dir.glob("duplicates-*.json")
    for damage in ('{"clusters": ', json.dumps(good | {"clean_test": []}),
                   json.dumps({k: v for k, v in good.items() if k != "hashes"})):
        path.write_text(damage)
        groups, said = _rebuilt(lambda: near_duplicate_groups(source, 4, cache_dir))
        assert len(said) == 1 and said[0].startswith(f"near-duplicate groups {path}: ")
        assert said[0].endswith("; rebuilding from the images")
        as_json = json.loads(json.dumps(good))  # the cluster sizes' keys as text
        assert json.loads(json.dumps(groups)) == as_json == json.loads(path.read_text())


# --- property tests: any mutation of a valid record ------------------------------------------

if given is not None:
    JSON_VALUES = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner,
                                                                     max_size=4),
        max_leaves=8)

    TEXT = st.text()

    @st.composite
    def mutated(draw, record: dict, values=JSON_VALUES, keys=TEXT):
        """``record`` with one key dropped, changed or added, or replaced as a whole."""
        how = draw(st.sampled_from(["drop", "change", "add", "whole"]))
        out = dict(record)
        if how == "whole":
            return draw(values)
        if how == "add":
            out[draw(keys)] = draw(values)
            return out
        key = draw(st.sampled_from(sorted(record, key=str)))
        if how == "drop":
            del out[key]
        else:
            out[key] = draw(values)
        return out

    PROPERTY = settings(max_examples=60, deadline=None, derandomize=True,
                        suppress_health_check=[HealthCheck.function_scoped_fixture,
                                               HealthCheck.too_slow])
else:
    def mutated(*_args, **_kwargs):
        return None


def _needs_hypothesis(test):
    if given is None:
        return pytest.mark.skip(reason="hypothesis is a dev dependency: pip install -e "
                                "'.[dev]'")(test)
    return test


@_needs_hypothesis
def test_any_mutated_cache_manifest_is_a_hit_or_a_rebuild(data_root, cache_dir):
    good = _load_valid(data_root, cache_dir)
    manifest = next(cache_dir.glob("valid-32-*.json"))
    record = json.loads(manifest.read_text())

    @PROPERTY
    @given(mutated(record))
    def load_after(mutation):
        manifest.write_text(json.dumps(mutation))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arrays = _load_valid(data_root, cache_dir)
        np.testing.assert_array_equal(arrays.images, good.images)
        assert arrays.files == good.files and arrays.source_sizes == good.source_sizes

    load_after()


def _load_or_params_error(path: Path):
    try:
        return load_params(path)
    except ParamsError as err:
        assert str(path) in str(err) and "\n" not in str(err)
        return err


@_needs_hypothesis
def test_any_mutated_parameter_file_loads_or_is_one_params_error(tmp_path):
    import yaml

    record = yaml.safe_load((ROOT / "params" / "quick.yaml").read_text())
    keys = st.text() | st.integers() | st.booleans() | st.none()
    path = tmp_path / "p.yaml"

    @PROPERTY
    @given(mutated(record, JSON_VALUES, keys))
    def load_after(mutation):
        path.write_text(yaml.safe_dump(mutation))
        _load_or_params_error(path)

    load_after()


@_needs_hypothesis
def test_any_damaged_parameter_text_loads_or_is_one_params_error(tmp_path):
    text = (ROOT / "params" / "quick.yaml").read_bytes()
    path = tmp_path / "p.yaml"

    @PROPERTY
    @given(st.integers(0, len(text)), st.binary(max_size=8))
    def load_after(at, insert):
        path.write_bytes(text[:at] + insert + text[at + len(insert):])
        _load_or_params_error(path)

    load_after()

