"""Each notebook declares the parameters it takes, in step with Params, as papermill reads them."""

import papermill
import pytest

from brainseg_lib.config import PARAM_NAMES, load_params, params_from_notebook
from brainseg_lib.reporting.notebook_params import (
    NOTEBOOK_PARAMETERS,
    parameters_cell,
    stale_notebooks,
    write_cells,
)
from brainseg_lib.reporting.pipeline import COMPARE, NOTEBOOKS
from conftest import ROOT


def test_committed_parameters_cells_are_the_generated_ones():
    assert stale_notebooks() == [], "run: python -m brainseg_lib.reporting.notebook_params"


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
