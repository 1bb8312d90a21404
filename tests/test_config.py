import pytest

from brainseg_lib.config import Params, ParamsError, load_params, params_from_notebook
from conftest import ROOT


def test_unknown_key_names_it_and_suggests(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("profile: x\nimag_size: 128\n")
    with pytest.raises(ParamsError, match=r"p.yaml: unknown parameter 'imag_size' \(did you "
                                          r"mean 'image_size'\?\)"):
        load_params(f)


@pytest.mark.parametrize("text, message", [
    ("image_size: big", "image_size.*expected"),
    ("image_size: 100", "multiple of 32"),
    ("lr: 5.0", "'lr' = 5.0 is outside"),
    ("loss: hinge", "'loss' = 'hinge'"),
    ("augment: 1", "'augment' = 1"),
    ("- a\n- b", "flat mapping"),
    ("a: [", "not valid YAML"),
])
def test_bad_values_are_rejected_with_the_key(tmp_path, text, message):
    f = tmp_path / "p.yaml"
    f.write_text(text)
    with pytest.raises(ParamsError, match=message):
        load_params(f)


def test_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_ints_are_accepted_for_floats():
    assert Params(lr=1).lr == 1.0 and isinstance(Params(lr=1).lr, float)


def test_notebook_parameters_overlay_the_profile_file():
    before = {"bs", "In", "Out"}
    params = params_from_notebook({"profile": "quick", "epochs": 2, "_x": 1, "bs": None},
                                  before)
    quick = load_params(ROOT / "params" / "quick.yaml")
    assert params.epochs == 2 and params.image_size == quick.image_size
    assert params_from_notebook({"profile": "smoke"}, set()).synthetic is True
    with pytest.raises(ParamsError, match="did you mean 'epochs'"):
        params_from_notebook({"profile": "smoke", "epoch": 3}, set())


def test_relative_paths_resolve_against_project_root():
    assert Params(runs_dir="runs").resolve_path("runs") == ROOT / "runs"
