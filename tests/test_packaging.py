"""The project's files agree with each other: pins, notebooks, parameter files."""

import json
import re
import tomllib

import pytest
import yaml

from brainseg_lib.config import load_params
from brainseg_lib.experiments.sweep import read_grid
from conftest import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
PROFILES = sorted((ROOT / "params").glob("*.yaml"))
GRIDS = sorted((ROOT / "params" / "grids").glob("*.yaml"))


def test_environment_yml_pins_match_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    pins = [p for p in pip_section if not p.startswith("-e")]
    assert sorted(pins) == sorted(project["dependencies"])
    assert "python=3.11" in env["dependencies"]


def test_five_numbered_notebooks():
    assert [p.stem for p in NOTEBOOKS] == ["01_data_exploration", "02_train", "03_evaluate",
                                           "04_visualise", "05_compare"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_committed_clean_with_one_parameters_cell(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), \
        f"{path.name} has outputs: clear them before committing"
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1
    assert re.search(r'^profile: str = "smoke"', "".join(tagged[0]["source"]), re.M)
    assert nb["metadata"]["kernelspec"]["name"] == "python3"


def test_every_committed_parameter_file_is_checked():
    """The globs the two tests below run over find the files (an empty glob would skip)."""
    assert {p.stem for p in PROFILES} >= {"smoke", "quick", "seed", "seed_imagenet",
                                          "reference", "cpu_long", "gpu_resnet34"}
    assert {p.stem for p in GRIDS} >= {"smoke", "cpu_patches", "gpu_session"}


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.name)
def test_profiles_load_validate_and_are_flat(path):
    raw = yaml.safe_load(path.read_text())
    assert all(not isinstance(v, dict) for v in raw.values())
    params = load_params(path)  # every key known, every value of its type and range
    assert params.profile == path.stem


@pytest.mark.parametrize("path", GRIDS, ids=lambda p: p.name)
def test_grid_files_parse_and_every_variant_validates(path):
    grid = read_grid(path)  # loads base + common + each variant: unknown keys, bad values
    assert grid["base"].resolve() in {p.resolve() for p in PROFILES}  # a committed profile
    assert grid.get("variants") or grid.get("space")


def test_seed_profile_is_the_reference_method():
    p = load_params(ROOT / "params" / "seed.yaml")
    assert (p.arch, p.encoder, p.loss, p.optimizer, p.monitor) == (
        "Unet", "resnet34", "bce", "adam", "val_loss")
    assert p.patience > 0 and p.min_delta > 0 and p.image_size == 256


def test_report_template_ships_as_package_data():
    """The HTML reports' nbconvert template is read from the installed package."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package = ROOT / "brainseg_lib" / "reporting"
    shipped = {p for g in setuptools["package-data"]["brainseg_lib.reporting"]
               for p in package.glob(g)}
    template = {p for p in (package / "templates").rglob("*") if p.is_file()}
    assert template and template <= shipped
