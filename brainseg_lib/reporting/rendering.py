"""An executed notebook as an HTML report that reads like a paper: the result first, code
folded behind a toggle, the parameters cell out of the way, a bar linking the run's reports
and this report's sections.

nbconvert does the work: the ``brainseg`` template (``templates/brainseg``, extending
JupyterLab's) folds the inputs and draws the bar, TagRemovePreprocessor drops the parameters
cells (the header lists every value), and ``resources`` carry what the bar shows. The
executed ``.ipynb`` is left complete.
"""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from brainseg_lib.io import atomic_write_text
from brainseg_lib.reporting.headline import HEADLINE_ID

TEMPLATES = Path(__file__).parent / "templates"
TEMPLATE = "brainseg"
# the declared parameters cell and papermill's injected one: the header lists their values
HIDDEN_TAGS = {"parameters", "injected-parameters"}
INDEX = "../../index.html"  # reports/<day>/<run>/ -> reports/index.html (pipeline.write_index)


class _Headings(HTMLParser):
    """The ``<h2>`` headings of rendered markdown with the ids nbconvert gave them."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[dict[str, str]] = []
        self._open: dict[str, str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "h2":
            self._open = {"id": dict(attrs).get("id") or "", "text": ""}

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            self._open["text"] += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "h2" and self._open is not None:
            self._open["text"] = self._open["text"].rstrip("¶").strip()
            if self._open["id"]:
                self.found.append(self._open)
            self._open = None


def _has_headline(nb: Any) -> bool:
    return any(HEADLINE_ID in (o.get("data", {}).get("text/html") or "")
               for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def table_of_contents(nb: Any) -> list[dict[str, str]]:
    """The report's sections: the headline box when it has one, then every ``##`` heading
    of its markdown, linked by the id nbconvert's markdown renderer gives it."""
    from nbconvert.filters import markdown2html

    parser = _Headings()
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            parser.feed(markdown2html(cell.source))
    head = [{"id": HEADLINE_ID, "text": "Result"}] if _has_headline(nb) else []
    return head + parser.found


def report_links(notebook: Path, siblings: list[str] | None = None) -> list[dict[str, Any]]:
    """The run's reports in order (``siblings``: notebook names; by default the numbered
    notebooks in the same folder), this one marked."""
    names = siblings or sorted({p.stem for p in notebook.parent.glob("[0-9][0-9]_*.ipynb")}
                               | {notebook.stem})
    return [{"label": n.replace("_", " "), "href": f"{n}.html", "here": n == notebook.stem}
            for n in names]


def render_html(notebook: Path, siblings: list[str] | None = None) -> Path:
    """The report's HTML beside the notebook, written atomically; ``siblings`` names the
    run's notebooks for the bar (default: the numbered notebooks beside it)."""
    import nbformat
    from nbconvert import HTMLExporter
    from nbconvert.preprocessors import TagRemovePreprocessor

    nb = nbformat.read(notebook, as_version=4)
    exporter = HTMLExporter(template_name=TEMPLATE, extra_template_basedirs=[str(TEMPLATES)])
    exporter.register_preprocessor(TagRemovePreprocessor(
        remove_cell_tags=HIDDEN_TAGS, enabled=True), enabled=True)
    resources = {"brainseg": {"run": notebook.parent.name, "index": INDEX,
                              "reports": report_links(notebook, siblings),
                              "toc": table_of_contents(nb)}}
    body, _ = exporter.from_notebook_node(nb, resources=resources)
    return atomic_write_text(notebook.with_suffix(".html"), body)
