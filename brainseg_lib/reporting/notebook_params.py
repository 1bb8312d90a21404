"""Each notebook's papermill parameters cell, and the parameter reference, generated from
:class:`Params`.

papermill reads a notebook's parameters from the cell tagged ``parameters``
(``papermill --help-notebook``) and warns about any injected name that cell does not
declare. So each notebook declares exactly the parameters of its groups (each field's
``groups`` metadata), with the help ``Params`` gives each field. ``python -m
brainseg_lib.reporting.notebook_params`` writes the cells and ``docs/reference/parameters.md``;
tests keep both in step. A declared name left at ``None`` takes its value from the
profile's file (``params/<profile>.yaml``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from brainseg_lib.config import GROUPS, ROLES, Params, names, project_root

SECTION_TITLES = {
    "data": "data",
    "training": "training (what shapes the weights, and how it runs)",
    "validation": "validation while training (val IoU, hence the best checkpoint)",
    "evaluation": "evaluation (what shapes the measurement)",
    "figures": "figures",
    "comparison": "comparison",
    "run": "run",
}
NOTEBOOK_GROUPS: dict[str, tuple[str, ...]] = {
    "01_data_exploration": ("data",),
    "02_train": ("data", "training", "validation", "run"),
    "03_evaluate": ("data", "evaluation", "run"),
    "04_visualise": ("data", "figures", "run"),
    "05_compare": ("data", "comparison", "evaluation", "run"),
}
REFERENCE_FILE = Path("docs") / "reference" / "parameters.md"


def notebook_sections(notebook: str) -> dict[str, tuple[str, ...]]:
    """Section title -> parameter names, for one notebook; a name shows in its first group."""
    taken: set[str] = set()
    sections = {}
    for group in NOTEBOOK_GROUPS[notebook]:
        new = tuple(n for n in names(groups=(group,)) if n not in taken)
        taken.update(new)
        sections[SECTION_TITLES[group]] = new
    return sections


NOTEBOOK_PARAMETERS = {nb: tuple(n for ns in notebook_sections(nb).values() for n in ns)
                       for nb in NOTEBOOK_GROUPS}


def _groups(name: str) -> tuple[str, ...]:
    return Params.__dataclass_fields__[name].metadata["groups"]


def _help(name: str) -> str:
    return Params.__dataclass_fields__[name].metadata["help"]


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
    defaults = Params().to_dict()
    lines = ['profile: str = "smoke"  # a file in params/: smoke, quick, seed, reference, ...',
             "# None = the profile's value (brainseg_lib.config.Params: types, ranges, defaults)"]
    for section, section_names in notebook_sections(notebook).items():
        lines.append(f"# --- {section}")
        for name in section_names:
            note = "; ".join(x for x in (f"default {json.dumps(defaults[name])}",
                                         _choices(name), _help(name)) if x)
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


def parameters_reference() -> str:
    """``docs/reference/parameters.md``: every parameter with its type, default, range, role
    and help, by group."""
    defaults = Params().to_dict()
    lines = ["# Parameters", "",
             "Generated from `brainseg_lib.config.Params` by `python -m "
             "brainseg_lib.reporting.notebook_params` (a test keeps it in step). Profiles in "
             "`params/*.yaml` set them; `--set key=value` and notebook parameters override them.",
             "", "Roles (what a parameter shapes):", ""]
    lines += [f"- **{role}**: {what}" for role, what in ROLES.items()]
    lines += ["", "A resumed run may change `label`, `budget`, `execution`, `run` and "
              "`measurement` parameters only; a shipped model is reported on (`report_model`) only "
              "when every `weights` and `budget` parameter agrees."]
    for group in ("label", *GROUPS):  # each parameter under its first group
        group_names = ("profile",) if group == "label" else tuple(
            n for n in names(groups=(group,)) if _groups(n)[0] == group)
        if not group_names:
            continue
        lines += ["", f"## {group}", "", "| name | type | default | range | role | help |",
                  "|---|---|---|---|---|---|"]
        for name in group_names:
            meta = Params.__dataclass_fields__[name].metadata
            span = "–" if meta["range"] is None else f"{meta['range'][0]} – {meta['range'][1]}"
            kind = _type_name(name) + (f" ({_choices(name)})" if _choices(name) else "")
            lines.append(f"| `{name}` | {kind} | `{json.dumps(defaults[name])}` | {span} | "
                         f"{meta['role']} | {meta['help']} |")
    return "\n".join(lines) + "\n"


def stale_reference(root: Path | None = None) -> bool:
    """Whether ``docs/reference/parameters.md`` differs from :func:`parameters_reference`."""
    path = (root or project_root()) / REFERENCE_FILE
    return not path.exists() or path.read_text() != parameters_reference()


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


def write_reference(root: Path | None = None) -> bool:
    """Write ``docs/reference/parameters.md`` when out of step; True when written."""
    from brainseg_lib.io import atomic_write_text

    if not stale_reference(root):
        return False
    atomic_write_text((root or project_root()) / REFERENCE_FILE, parameters_reference())
    return True


if __name__ == "__main__":
    written = write_cells() + ([str(REFERENCE_FILE)] if write_reference() else [])
    print("updated: " + (", ".join(written) or "nothing (all in step)"))
