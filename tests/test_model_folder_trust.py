"""Model folders are untrusted input: brainseg.json is checked against its schema before
anything else is read, the files it names stay inside the folder, smp builds only its own
architectures, config.json is covered by the integrity record and cross-checked on every
backend, and an ONNX file that does not take what the predictor feeds is refused by name."""

import json
import os
import shutil
import warnings

import pytest
import torch
from torch import nn

from brainseg_lib.inference.predictor import load_model
from brainseg_lib.io import file_sha256
from brainseg_lib.model.checkpoint import ArtifactError, save_checkpoint
from brainseg_lib.model.export import export_model
from brainseg_lib.model.folder import networks_from_model_dir
from brainseg_lib.model.network import build_network
from brainseg_lib.model.onnx_export import OnnxMember
from brainseg_lib.model.onnx_files import onnx_members_from_model_dir, verified_onnx
from conftest import ROOT, tiny_params


@pytest.fixture(scope="module")
def valid_folder(tmp_path_factory, synthetic_root):
    """A small exported model (MobileNetV2 encoder, narrow decoder) from a checkpoint:
    quick to hash and build, so many variants of its record can be loaded."""
    tmp = tmp_path_factory.mktemp("trust")
    params = tiny_params(tmp, synthetic_root, encoder="mobilenet_v2",
                         decoder_channels=[32, 16, 8, 8, 8])
    network = build_network(params.arch, params.encoder, decoder_channels=[32, 16, 8, 8, 8])
    run = tmp / "runs" / "small"
    run.mkdir(parents=True)
    save_checkpoint(run / "best.pt", {"model": network.state_dict(),
                                      "params": params.to_dict(), "epoch": 1})
    return export_model([run], tmp / "models" / "small")


@pytest.fixture
def folder(valid_folder, tmp_path):
    return shutil.copytree(valid_folder, tmp_path / "m")


ONNX_RECORD = {"files": ["model.onnx"], "torch": "2.9", "onnxruntime": "1.23",
               "export_seconds": [1.0], "verified_on": "32 validation images",
               "max_abs_prob_diff": 1e-6, "mask_agreement": 1.0, "threshold": 0.5}


def _edit(folder, change, rehash=()):
    """Change brainseg.json's record; ``rehash``: files whose recorded sha256 is renewed
    (a consistent but hostile folder)."""
    record = json.loads((folder / "brainseg.json").read_text())
    change(record)
    for name in rehash:
        record["sha256"][name] = file_sha256(folder / name)
    (folder / "brainseg.json").write_text(json.dumps(record))


def _refused(folder, *words):
    with pytest.raises(ArtifactError) as caught:
        networks_from_model_dir(folder)
    message = str(caught.value)
    assert len(message.splitlines()) == 1 and all(w in message for w in words), message
    return message


@pytest.mark.parametrize("change, words", [
    (lambda r: r.update(members="model.safetensors"), ["brainseg.json", "'members'"]),
    (lambda r: r.update(sha256={"model.safetensors": "abc"}), ["brainseg.json", "'sha256'"]),
    (lambda r: r.update(params=[1, 2]), ["brainseg.json", "'params'"]),
    (lambda r: r.pop("params"), ["brainseg.json", "'params' missing"]),
    (lambda r: r.update(format="brainseg model 9"), ["brainseg.json", "'format'"]),
    (lambda r: r["params"].update(arch="losses"), ["brainseg.json", "'params.arch'"]),
    (lambda r: r["params"].update(arch="__class__"), ["brainseg.json", "'params.arch'"]),
    (lambda r: r.update(onnx={"files": ["../../x.onnx"]}), ["brainseg.json", "'onnx.files'"]),
    (lambda r: r.update(parent={"path": 3}), ["brainseg.json", "'parent.path'"]),
])
def test_a_malformed_record_is_one_line_naming_the_file_and_key(folder, change, words):
    _edit(folder, change)
    _refused(folder, *words)


def test_a_record_nested_without_bound_is_refused_not_a_recursion_error(folder):
    (folder / "brainseg.json").write_text("[" * 100_000 + "]" * 100_000)
    _refused(folder, "brainseg.json", "nested")
    (folder / "brainseg.json").write_text(json.dumps({"params": {}, "x": [[[[[[[[[[[[[[[[[[[[[
        [[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}))
    _refused(folder, "brainseg.json", "nested deeper than 32")


@pytest.mark.parametrize("name", ["/tmp/model.safetensors", "../outside.safetensors",
                                  "sub/model.safetensors", ".."])
def test_member_paths_outside_the_folder_are_refused_unopened(folder, name, tmp_path):
    outside = tmp_path / "outside.safetensors"  # valid weights outside, hash recorded
    shutil.copy(folder / "model.safetensors", outside)
    _edit(folder, lambda r: (r.update(members=[name]),
                             r["sha256"].update({name: file_sha256(outside)})))
    _refused(folder, "brainseg.json", "'members'")


def test_a_weight_file_linked_from_outside_is_refused(folder, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(folder / "model.safetensors", outside)
    os.symlink(outside, folder / "model.safetensors")
    _refused(folder, "model.safetensors", "not a plain file inside")


def test_config_is_hashed_at_export_and_verified_on_load(folder):
    assert set(json.loads((folder / "brainseg.json").read_text())["sha256"]) == {
        "model.safetensors", "config.json"}
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"decoder_attention_type": "scse"}))
    _refused(folder, "config.json", "differs from", "recorded in brainseg.json")


@pytest.mark.parametrize("key, value", [("_model_class", "encoders"), ("_model_class", None),
                                        ("activation", "sigmoid"),
                                        ("classes", 2), ("in_channels", 1),
                                        ("encoder_name", "resnet18")])
def test_a_consistent_but_other_config_is_refused_by_the_cross_check(folder, key, value):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {key: value}))
    _edit(folder, lambda r: None, rehash=["config.json"])
    _refused(folder, "config.json", f"'{key}'")


def test_the_cross_check_runs_on_the_onnxruntime_backend_too(folder, synthetic_root):
    """``--backend auto`` takes onnxruntime on a CPU when a verified model.onnx is present:
    config.json is checked against brainseg.json there as well, before the ONNX is read."""
    (folder / "model.onnx").write_bytes(b"not read: the config is refused first")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"encoder_name": "resnet34"}))
    _edit(folder, lambda r: r.update(onnx=ONNX_RECORD), rehash=["config.json", "model.onnx"])
    assert verified_onnx(folder)
    with pytest.raises(ArtifactError, match="config.json: key 'encoder_name'"):
        load_model(folder, "cpu", backend="auto")
    with pytest.raises(ArtifactError, match="config.json: key 'encoder_name'"):
        onnx_members_from_model_dir(folder)


def test_an_older_folder_without_a_config_hash_loads_with_a_warning(folder):
    """The rule for exports made before config.json was hashed: loaded, said so, and the
    config still cross-checked against brainseg.json."""
    _edit(folder, lambda r: r["sha256"].pop("config.json"))
    with pytest.warns(UserWarning, match="no sha256 of config.json"):
        members, params, _ = networks_from_model_dir(folder)
    assert len(members) == 1 and params.encoder == "mobilenet_v2"


def test_the_shipped_model_records_its_config_hash_and_loads_without_warnings():
    shipped = ROOT / "models" / "reference"
    record = json.loads((shipped / "brainseg.json").read_text())
    assert record["sha256"]["config.json"] == file_sha256(shipped / "config.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        members, params, _ = networks_from_model_dir(shipped)
    assert len(members) == 1 and params.arch == "Unet"


class _Renamed(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1, keepdim=True)


def _onnx(path, channels, input_name="images", output_name="logits"):
    torch.onnx.export(_Renamed(), (torch.zeros(1, channels, 32, 32),), str(path),
                      input_names=[input_name], output_names=[output_name], dynamo=False,
                      dynamic_axes={input_name: {0: "b", 2: "h", 3: "w"}})
    return path


def test_an_onnx_file_of_another_signature_is_refused_naming_it(tmp_path):
    with pytest.raises(ArtifactError, match=r"model.onnx: not the graph brainseg feeds"):
        OnnxMember(_onnx(tmp_path / "model.onnx", 3, input_name="x"))
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07 not a protobuf")
    with pytest.raises(ArtifactError, match=r"model.onnx: not a readable ONNX file"):
        OnnxMember(tmp_path / "model.onnx")
    member = OnnxMember(_onnx(tmp_path / "one.onnx", 1))
    with pytest.raises(ArtifactError, match=r"one.onnx: takes 1 input channel\(s\)"):
        member(torch.zeros(2, 3, 32, 32))


def test_a_verified_onnx_of_another_signature_stops_prediction_in_one_line(folder):
    _onnx(folder / "model.onnx", 3, output_name="probabilities")
    _edit(folder, lambda r: r.update(onnx=ONNX_RECORD), rehash=["model.onnx"])
    with pytest.raises(ArtifactError, match="model.onnx: not the graph brainseg feeds"):
        load_model(folder, "cpu", backend="onnxruntime")


def _paths(value, path=()):
    """Every place in a JSON value, as a key path."""
    yield path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(
        value, list) else ()
    for key, child in items:
        yield from _paths(child, (*path, key))


def _mutate(record, path, operation, value):
    if not path:
        return value
    parent = record
    for key in path[:-1]:
        parent = parent[key]
    if operation == "delete":
        del parent[path[-1]]
    elif operation == "add" and isinstance(parent, dict):
        parent[f"{path[-1]}_new"] = value
    else:
        parent[path[-1]] = value
    return record


def test_any_mutation_of_the_record_loads_or_is_one_artifact_error(valid_folder, tmp_path):
    """The property: whatever is changed in a valid brainseg.json (a value of any JSON type
    anywhere, a key removed or added, the whole file replaced), loading the folder either
    works or raises one ArtifactError of one line; never another exception."""
    hypothesis = pytest.importorskip("hypothesis", reason="hypothesis: a test-only dependency")
    st = hypothesis.strategies
    folder = shutil.copytree(valid_folder, tmp_path / "m")
    original = json.loads((folder / "brainseg.json").read_text())
    paths = list(_paths(original))
    values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats()
                          | st.text(max_size=12),
                          lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                          max_leaves=8)

    @hypothesis.settings(max_examples=120, deadline=None, derandomize=True, database=None)
    @hypothesis.given(path=st.sampled_from(paths), value=values,
                      operation=st.sampled_from(["replace", "delete", "add"]),
                      raw=st.none() | st.binary(max_size=40))
    def load_mutated(path, value, operation, raw):
        record = _mutate(json.loads(json.dumps(original)), path, operation, value)
        text = raw if raw is not None else json.dumps(record).encode()
        (folder / "brainseg.json").write_bytes(text)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an older export's missing hashes: a warning
            for load in (networks_from_model_dir, onnx_members_from_model_dir):
                try:
                    load(folder)
                except ArtifactError as err:
                    assert len(str(err).splitlines()) == 1, str(err)
            assert verified_onnx(folder) is None

    load_mutated()


def test_an_architecture_named_in_another_case_still_loads(folder):
    """smp takes architecture names in any case (``unet``); so may a record."""
    _edit(folder, lambda r: r["params"].update(arch="unet"))
    members, params, _ = networks_from_model_dir(folder)
    assert params.arch == "unet" and len(members) == 1
