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

import http.server
import json
import os
import shutil
import socket
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from brainseg_lib.cli import main
from brainseg_lib.config import ParamsError, load_params
from brainseg_lib.data.arrays import CacheManifest, load_split_arrays
from brainseg_lib.data.duplicates import near_duplicate_groups
from brainseg_lib.data.images import decode_rgb8
from brainseg_lib.data.locate import DataSource
from brainseg_lib.experiments.sweep import read_grid
from brainseg_lib.inference.files import predict_files, save_png
from brainseg_lib.stores import check_tracking_uri
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


# --- 4. parameters, grid files and URLs ---------------------------------------------------

def _one_line_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("brainseg: error: "), err
    return err


@pytest.mark.parametrize("key", ["1", "yes", "2026-01-01", "null"])
def test_a_yaml_key_that_is_not_text_is_one_line(tmp_path, capsys, key):
    path = tmp_path / "p.yaml"
    path.write_text(f"profile: x\n{key}: 3\n")
    err = _one_line_error(["train", "--params", str(path)], capsys)
    assert f"{path}: parameter name" in err and "quote it" in err


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("uri, problem", [
    ("ftp://ann:s3cret@example.org/mlflow", "unknown scheme 'ftp'"),
    ("./mlruns", "MLflow 3 keeps no runs in a folder"),
    ("http://ann:s3cret@127.0.0.1:{port}", "the server does not answer"),
    ("sqlite:///{tmp}/no/such/folder/mlflow.db", "no/such/folder does not exist"),
    ("postgresql+psycopg2://ann:s3cret@127.0.0.1/mlflow", "driver is not installed"),
])
def test_a_bad_tracking_uri_is_one_line_before_any_data_loads(tmp_path, capsys, uri, problem):
    pytest.importorskip("mlflow")
    uri = uri.format(port=_closed_port(), tmp=tmp_path)
    argv = ["train", "--params", str(ROOT / "params" / "smoke.yaml"), "--set",
            f"tracking_uri={uri}", "--set", f"runs_dir={tmp_path / 'runs'}", "--set",
            f"cache_dir={tmp_path / 'cache'}"]
    err = _one_line_error(argv, capsys)
    assert problem in err and "s3cret" not in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_a_tracking_server_that_answers_passes_the_check():
    pytest.importorskip("mlflow")
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.handle_request)  # one answer (501) will do
    thread.start()
    try:
        check_tracking_uri(f"http://127.0.0.1:{server.server_port}")
    finally:
        thread.join(timeout=10)
        server.server_close()


@pytest.mark.parametrize("storage, problem", [
    ("postgres ql://ann:s3cret@db/optuna", "not a database URL"),
    ("nosuchdb://ann:s3cret@db/optuna", "unknown database dialect 'nosuchdb'"),
    ("mysql+pymysql://ann:s3cret@db/optuna", "driver is not installed (no module 'pymysql';"),
    ("sqlite:///{tmp}/absent/study.db", "absent does not exist"),
])
def test_a_bad_sweep_storage_is_one_line_before_anything_runs(tmp_path, capsys, storage,
                                                              problem):
    out = tmp_path / "sweep"
    argv = ["sweep", "--grid", str(ROOT / "params" / "grids" / "smoke.yaml"), "--out",
            str(out), "--storage", storage.format(tmp=tmp_path)]
    err = _one_line_error(argv, capsys)
    assert problem in err and "s3cret" not in err and "--storage" in err
    assert not out.exists()


@pytest.mark.parametrize("grid, blamed", [
    ("common: [epochs, 2]\nvariants: {a: {}}", "{grid}: 'common' must be a mapping"),
    ("variants: {a: {}, fast: {epochz: 1}}",
     "{grid}, variant 'fast' (over {base}): unknown parameter 'epochz' (did you mean"),
    ("common: {lrr: 0.1}\nvariants: {a: {}}", "{grid}, common (over {base}): unknown"),
    ("variants: [a, b]", "{grid}: 'variants' must be a mapping"),
    ("grid: {lr: 0.1}", "{grid}: 'grid' must map parameter names to lists"),
    ("parallel: two\nvariants: {a: {}}", "{grid}: 'parallel' must be a whole number"),
])
def test_a_bad_grid_file_is_one_line_blaming_the_grid(tmp_path, capsys, grid, blamed):
    base = ROOT / "params" / "smoke.yaml"
    path = tmp_path / "g.yaml"
    path.write_text(f"base: {base}\n{grid}\n")
    err = _one_line_error(["sweep", "--grid", str(path), "--out", str(tmp_path / "o")],
                          capsys)
    assert blamed.format(grid=path, base=base) in err
    assert not (tmp_path / "o").exists()


# --- 5. images --------------------------------------------------------------------------------

def _mri_slice() -> np.ndarray:
    """A greyscale test slice of the real data when present, else a synthetic one (uint8)."""
    found = sorted(Path(os.environ.get("BRAINSEG_DATA") or ROOT / "data").glob("test/*.jpg"))
    if found:
        return np.asarray(Image.open(found[0]).convert("L"))
    yy, xx = np.mgrid[:96, :80]
    return np.rint(255 * np.exp(-((yy - 48) ** 2 + (xx - 40) ** 2) / 800)).astype(np.uint8)


# each mode as an exporter writes it, from an 8-bit slice; lossless, so the grey must match
STORED = {
    "L": lambda g: Image.fromarray(g),
    "1": lambda g: Image.fromarray(g).point(lambda v: 255 * (v >= 128)).convert("1"),
    "I;16": lambda g: Image.fromarray(g.astype(np.uint16) * 257),  # 16-bit MRI export
    "I": lambda g: Image.fromarray(g.astype(np.int32) * 1000 - 7000),
    "F": lambda g: Image.fromarray(g.astype(np.float32) / 255),
    "LA": lambda g: Image.fromarray(g).convert("LA"),
    "P": lambda g: Image.fromarray(g).convert("P", palette=Image.Palette.ADAPTIVE, colors=256),
    "RGB": lambda g: Image.fromarray(g).convert("RGB"),
    "RGBA": lambda g: Image.fromarray(g).convert("RGBA"),
    "CMYK": lambda g: Image.fromarray(g).convert("CMYK"),
}


@pytest.mark.parametrize("mode", list(STORED))
def test_every_pillow_mode_is_read_by_its_real_range(tmp_path, mode):
    grey = _mri_slice()
    stored = STORED[mode](grey)
    suffix = "tif" if mode in ("I", "F", "CMYK") else "png"
    path = tmp_path / f"slice-{mode.replace(';', '')}.{suffix}"
    stored.save(path)
    rgb, read_mode = decode_rgb8(path)
    assert read_mode == Image.open(path).mode and rgb.dtype == np.uint8
    assert rgb.shape == (*grey.shape, 3)
    want = (grey >= 128) * np.uint8(255) if mode == "1" else grey
    if mode in ("P", "CMYK"):  # a palette of 256 greys, and CMYK's own rounding
        assert np.abs(rgb[..., 0].astype(int) - want).max() <= 2
    else:
        np.testing.assert_array_equal(rgb[..., 0], want)
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_the_training_reader_reads_a_16_bit_slice_by_its_range(data_root):
    from brainseg_lib.data.coco import load_split, read_image

    split = load_split(data_root, "train")
    image = split.images[0]
    eight_bit, _ = read_image(split, image)
    grey = eight_bit[..., 0]
    path = split.image_path(image)
    Image.fromarray(grey.astype(np.uint16) * 257).save(path, format="PNG")  # same name
    sixteen_bit, mode = read_image(split, image)
    assert mode == "I;16"
    low, high = int(grey.min()), int(grey.max())  # its own range to 0..255, not clipped
    stretched = np.rint((grey.astype(float) - low) * 255 / (high - low)).astype(np.uint8)
    np.testing.assert_array_equal(sixteen_bit[..., 0], stretched)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained smoke-sized network's checkpoint: enough to drive predict's input and
    output handling (the overlays show the pixels it read)."""
    import torch

    from brainseg_lib.model.checkpoint import save_checkpoint
    from brainseg_lib.model.network import create_model

    params = load_params(ROOT / "params" / "smoke.yaml")
    torch.manual_seed(0)
    model, _ = create_model(params.arch, params.encoder, "none", params.in_channels, False,
                            params.decoder_channels)
    path = tmp_path_factory.mktemp("model") / "best.pt"
    save_checkpoint(path, {"model": model.state_dict(), "params": params.to_dict(),
                           "epoch": 1})
    return path


def _predict(checkpoint, inputs, out, capsys):
    code = main(["predict", *map(str, inputs), "--checkpoint", str(checkpoint), "--out",
                 str(out), "--device", "cpu"])
    return code, capsys.readouterr()


def test_a_16_bit_input_is_predicted_as_its_8_bit_self(checkpoint, tmp_path, capsys):
    grey = _mri_slice()
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(grey).save(inputs / "eight.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(inputs / "sixteen.png")
    code, _ = _predict(checkpoint, [inputs], tmp_path / "out", capsys)
    assert code == 0
    for kind in ("mask", "overlay"):
        a, b = (np.asarray(Image.open(tmp_path / "out" / f"{n}_{kind}.png"))
                for n in ("eight", "sixteen"))
        np.testing.assert_array_equal(a, b)


def test_a_decompression_bomb_is_skipped_with_its_reason_and_counted(checkpoint, tmp_path,
                                                                     capsys, monkeypatch):
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(_mri_slice()).resize((64, 64)).save(inputs / "small.png")
    Image.new("L", (400, 300)).save(inputs / "huge.png")
    (inputs / "broken.jpg").write_bytes(b"\xff\xd8 not a JPEG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)  # huge.png is 120,000 pixels
    code, said = _predict(checkpoint, [inputs], tmp_path / "out", capsys)
    assert code == 1  # some inputs were skipped: the status says so
    assert "1 masks written" in said.out and "2 inputs skipped" in said.out
    reasons = dict(line.split(": ", 1) for line in said.err.splitlines())
    assert "too large to decode safely" in reasons[f"skipped {inputs / 'huge.png'}"]
    assert "unreadable" in reasons[f"skipped {inputs / 'broken.jpg'}"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["small_mask.png",
                                                                    "small_overlay.png"]


def test_a_folder_with_no_images_is_an_error(checkpoint, tmp_path, capsys):
    empty = tmp_path / "scans"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    code, said = _predict(checkpoint, [empty], tmp_path / "out", capsys)
    assert code == 2
    assert said.err.strip().splitlines() == [
        f"brainseg: error: predict {empty}: no images there (files ending .jpg, .jpeg, .png, "
        ".bmp, .tif, .tiff)"]


# --- 6. outputs -------------------------------------------------------------------------------

def test_a_png_being_replaced_is_never_seen_half_written(tmp_path):
    """Writers race to one path while a reader keeps decoding it: every read is one writer's
    whole image (Pillow writing straight to the path let readers see truncated files)."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (700, 700, 3), dtype=np.uint8) for _ in range(2)]
    path = tmp_path / "scan_overlay.png"
    save_png(images[0], path)
    done = threading.Event()
    seen = []

    def write(image):
        for _ in range(6):
            save_png(image, path)

    def read():
        while not done.is_set():
            with Image.open(path) as pil:
                seen.append(np.asarray(pil))

    reader = threading.Thread(target=read)
    writers = [threading.Thread(target=write, args=(image,)) for image in images]
    reader.start()
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    done.set()
    reader.join()
    assert seen and all(any(np.array_equal(s, i) for i in images) for s in seen)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_two_predicts_into_one_folder_leave_complete_files_each_from_one_run(
        checkpoint, tmp_path):
    grey = _mri_slice()
    runs = {}
    for name, image in (("a", grey), ("b", 255 - grey)):
        (tmp_path / name).mkdir()
        Image.fromarray(image).save(tmp_path / name / "scan.png")
        predict_files(checkpoint, [tmp_path / name], tmp_path / f"alone-{name}", device="cpu")
        runs[name] = [np.asarray(Image.open(tmp_path / f"alone-{name}" / f"scan_{k}.png"))
                      for k in ("mask", "overlay")]
    out = tmp_path / "out"
    threads = [threading.Thread(target=predict_files, args=(checkpoint, [tmp_path / n], out),
                                kwargs={"device": "cpu"}) for n in ("a", "b", "a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(p.name for p in out.iterdir()) == ["scan_mask.png", "scan_overlay.png"]
    for k, name in enumerate(("mask", "overlay")):
        written = np.asarray(Image.open(out / f"scan_{name}.png"))
        assert any(np.array_equal(written, run[k]) for run in runs.values())


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
        elif isinstance(record[key], dict) and record[key] and draw(st.booleans()):
            out[key] = draw(mutated(record[key], values, keys))  # a nested mapping's own
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
def test_any_mutated_grid_file_reads_or_is_one_params_error(tmp_path):
    import yaml

    record = yaml.safe_load((ROOT / "params" / "grids" / "smoke.yaml").read_text())
    record["base"] = str(ROOT / "params" / "smoke.yaml")
    keys = st.text() | st.integers() | st.booleans()
    path = tmp_path / "g.yaml"

    @PROPERTY
    @given(mutated(record, JSON_VALUES, keys))
    def read_after(mutation):
        path.write_text(yaml.safe_dump(mutation))
        try:
            read_grid(path)
        except ParamsError as err:
            assert str(path) in str(err) and "\n" not in str(err)

    read_after()


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

