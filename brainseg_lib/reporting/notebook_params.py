"""Each notebook's papermill parameters cell, generated from :class:`Params`.

papermill reads a notebook's parameters from the cell tagged ``parameters``
(``papermill --help-notebook``) and warns about any injected name that cell does not
declare. So each notebook declares exactly the parameters it uses, with the comment that
``Params`` gives each field; the cells are written from ``Params`` (``python -m
brainseg_lib.reporting.notebook_params``) and a test keeps them in step. A declared name left at
``None`` takes its value from the profile's file (``params/<profile>.yaml``).
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

from brainseg_lib.config import MEASUREMENT_KEYS, PARAM_NAMES, Params, project_root

DATA = ("data_dir", "synthetic", "synthetic_counts", "synthetic_size", "image_size",
        "limit_train_images", "cache_dir", "normalize_mean", "normalize_std", "folds_file",
        "fold", "duplicate_bits")


RUN = ("runs_dir", "run_id", "device")


TRAINING = tuple(n for n in PARAM_NAMES if n not in ("profile", *DATA, *RUN, *MEASUREMENT_KEYS))


EVALUATION = ("threshold", "tune_threshold", "tta", "min_component_px", "eval_original_size",
              "bootstrap", "seed")


NOTEBOOK_SECTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "01_data_exploration": {"data": DATA},
    "02_train": {"data": DATA, "training (what shapes the weights)": TRAINING,
                 "validation while training (val IoU, hence the best checkpoint)": ("threshold",),
                 "run": RUN},
    "03_evaluate": {"data": DATA, "evaluation (what shapes the measurement)": EVALUATION,
                    "run": RUN},
    "04_visualise": {"data": DATA, "figures": ("n_examples", "seed"), "run": RUN},
    "05_compare": {"data": DATA, "comparison": ("compare",),
                   "evaluation (of runs not yet evaluated)": EVALUATION, "run": RUN},
}


NOTEBOOK_PARAMETERS = {nb: tuple(n for names in sections.values() for n in names)
                       for nb, sections in NOTEBOOK_SECTIONS.items()}


def field_comments() -> dict[str, str]:
    """The comment after each field in :class:`Params`' source, by field name."""
    comments = {}
    for line in inspect.getsource(Params).splitlines():
        match = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.+)$", line)
        if match and match.group(1) in PARAM_NAMES:
            comments[match.group(1)] = match.group(2).strip()
    return comments


def _type_name(name: str) -> str:
    """A type papermill's parser accepts (``Literal`` choices are listed in the comment)."""
    annotation = str(Params.__dataclass_fields__[name].type)
    return annotation if re.fullmatch(r"[\w\[\]]+", annotation) else "str"


def _choices(name: str) -> str:
    annotation = str(Params.__dataclass_fields__[name].type)
    choices = re.findall(r"'(\w+)'", annotation)
    if choices and "bool" in map(str.strip, annotation.split("|")):
        choices += ["true", "false"]
    return "one of " + " | ".join(choices) if choices else ""


def parameters_cell(notebook: str) -> str:
    """The source of ``notebook``'s parameters cell: ``name: type = None  # default; help``."""
    comments, defaults = field_comments(), Params().to_dict()
    lines = ['profile: str = "smoke"  # a file in params/: smoke, quick, seed, reference, ...',
             "# None = the profile's value (brainseg_lib.config.Params: types, ranges, defaults)"]
    for section, names in NOTEBOOK_SECTIONS[notebook].items():
        lines.append(f"# --- {section}")
        for name in names:
            note = "; ".join(x for x in (f"default {json.dumps(defaults[name])}",
                                         _choices(name), comments.get(name, "")) if x)
            # papermill's parser skips a line whose comment holds " = "
            lines.append(f"{name}: {_type_name(name)} = None  # " + note.replace(" = ", ": "))
    return "\n".join(lines)


def _parameters_index(cells: list[dict]) -> int:
    return next(i for i, c in enumerate(cells) if "parameters" in c["metadata"].get("tags", []))


def stale_notebooks(folder: Path | None = None) -> list[str]:
    """Notebooks whose parameters cell differs from :func:`parameters_cell`."""
    folder = folder or project_root() / "notebooks"
    stale = []
    for name in NOTEBOOK_PARAMETERS:
        cells = json.loads((folder / f"{name}.ipynb").read_text())["cells"]
        if "".join(cells[_parameters_index(cells)]["source"]) != parameters_cell(name):
            stale.append(name)
    return stale


def write_cells(folder: Path | None = None) -> list[str]:
    """Rewrite the parameters cell of every notebook that is out of step; returns their names."""
    import nbformat

    from brainseg_lib.io import atomic_write_text

    folder = folder or project_root() / "notebooks"
    changed = stale_notebooks(folder)
    for name in changed:
        path = folder / f"{name}.ipynb"
        nb = nbformat.read(path, as_version=4)
        nb.cells[_parameters_index(nb.cells)].source = parameters_cell(name)
        atomic_write_text(path, nbformat.writes(nb) + "\n")
    return changed


if __name__ == "__main__":
    print("updated: " + (", ".join(write_cells()) or "nothing (all in step)"))
