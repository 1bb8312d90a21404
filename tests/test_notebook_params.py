"""Each notebook declares the parameters it takes, in step with Params, as papermill reads them."""

import papermill
import pytest

from brainseg_lib.config import PARAM_NAMES, load_params, params_from_notebook
from brainseg_lib.reporting.notebook_params import (
    NOTEBOOK_PARAMETERS,
    REFERENCE_FILE,
    parameters_cell,
    parameters_reference,
    stale_notebooks,
    stale_reference,
    write_cells,
    write_reference,
)
from brainseg_lib.reporting.pipeline import COMPARE, NOTEBOOKS
from conftest import ROOT


def test_committed_parameters_cells_are_the_generated_ones():
    assert stale_notebooks() == [], "run: python -m brainseg_lib.reporting.notebook_params"


def test_the_parameter_reference_is_generated_from_params_and_lists_every_field(tmp_path):
    assert not stale_reference(), "run: python -m brainseg_lib.reporting.notebook_params"
    text = (ROOT / REFERENCE_FILE).read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert sorted(row.split("`")[1] for row in rows) == sorted(PARAM_NAMES)  # each once
    assert "| `aug_rotate_deg` | float | `10.0` | 0.0 – 180.0 | weights |" in text
    assert stale_reference(tmp_path) and write_reference(tmp_path)  # missing: written
    assert (tmp_path / REFERENCE_FILE).read_text() == parameters_reference()
    assert not write_reference(tmp_path)  # in step: left alone


def test_every_parameter_is_taken_by_some_notebook_and_each_notebook_is_covered():
    declared = {n for names in NOTEBOOK_PARAMETERS.values() for n in names}
    assert declared | {"profile"} == set(PARAM_NAMES)
    assert tuple(NOTEBOOK_PARAMETERS) == (*NOTEBOOKS, COMPARE)
    assert "lr" in NOTEBOOK_PARAMETERS["02_train"]
    assert "lr" not in NOTEBOOK_PARAMETERS["03_evaluate"]
    assert "threshold" in NOTEBOOK_PARAMETERS["03_evaluate"]


@pytest.mark.parametrize("notebook", (*NOTEBOOKS, COMPARE))
def test_papermill_help_lists_exactly_the_declared_parameters(notebook):
    inferred = papermill.inspect_notebook(str(ROOT / "notebooks" / f"{notebook}.ipynb"))
    assert list(inferred) == ["profile", *NOTEBOOK_PARAMETERS[notebook]]
    assert all(p["help"].startswith("default ") for name, p in inferred.items()
               if name != "profile"), "papermill dropped a help text"
    assert inferred["profile"]["default"] == '"smoke"'


def test_a_stale_cell_is_found_and_rewritten(tmp_path):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    for name in (*NOTEBOOKS, COMPARE):
        (folder / f"{name}.ipynb").write_bytes(
            (ROOT / "notebooks" / f"{name}.ipynb").read_bytes())
    path = folder / "03_evaluate.ipynb"
    path.write_text(path.read_text().replace("threshold: float = None", "thresh = None"))
    assert stale_notebooks(folder) == ["03_evaluate"]
    assert write_cells(folder) == ["03_evaluate"]
    assert stale_notebooks(folder) == []
    assert parameters_cell("03_evaluate").splitlines()[0].startswith('profile: str = "smoke"')


def test_undeclared_parameters_keep_the_profiles_values_and_typos_are_errors():
    namespace = {"profile": "smoke", "threshold": 0.3, "tta": None, "lr": None}
    params = params_from_notebook(namespace, set())
    smoke = load_params(ROOT / "params" / "smoke.yaml")
    assert params.threshold == 0.3 and params.tta == smoke.tta and params.lr == smoke.lr
    with pytest.raises(ValueError, match="thresold"):
        params_from_notebook({"profile": "smoke", "thresold": 0.3}, set())
