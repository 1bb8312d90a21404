"""JupyterLab as a new user meets it: open 04 and 05, Run All, move the image slider.

playwright drives Debian's chromium (playwright's own browsers cannot be downloaded here);
JupyterLab serves a copy of the two notebooks on a free local port, their run folder (and
05's runs to compare) set in the parameters cell as a user would. Screenshots go to
``$BRAINSEG_SCREENSHOTS`` when set (the tmp folder otherwise).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from conftest import ROOT

CHROMIUM = shutil.which("chromium")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)"),
]
playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is a dev dependency: pip install -e '.[dev]'")
TOKEN = "brainseg-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory, evaluated_runs):
    """The notebooks 04/05 pointing at two evaluated runs, JupyterLab serving them."""
    tmp = tmp_path_factory.mktemp("lab")
    folders = {"runs": evaluated_runs[0].parent, "cache": evaluated_runs[0].parent.parent / "cache"}
    root = tmp / "notebooks"
    root.mkdir()
    for name in ("04_visualise", "05_compare"):
        nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
        cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
        for key, folder in folders.items():
            cell.source = cell.source.replace(f"{key}_dir: str = None",
                                              f'{key}_dir: str = "{folder}"')
        cell.source = cell.source.replace(  # in this order, whatever was evaluated last
            "compare: list[str] = None", f"compare: list[str] = {[r.name for r in evaluated_runs]}")
        nbformat.write(nb, root / f"{name}.ipynb")
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}",
         "--ServerApp.ip=127.0.0.1", "--allow-root", f"--IdentityProvider.token={TOKEN}",
         f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
         "--LabServerApp.workspaces_dir=" + str(tmp / "workspaces")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=os.environ | {"JUPYTER_CONFIG_DIR": str(tmp / "config")})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=2)
            break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail("JupyterLab did not start within 90 s")
            time.sleep(0.5)
    yield url
    server.terminate()
    server.wait(20)


@pytest.fixture(scope="module")
def page(lab):
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser.new_page(viewport={"width": 1400, "height": 1000})
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = os.environ.get("BRAINSEG_SCREENSHOTS")
    folder = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


CURRENT = "window.jupyterapp && window.jupyterapp.shell.currentWidget"
FINISHED = f"""() => {{
    const nb = {CURRENT};
    const kernel = nb && nb.sessionContext && nb.sessionContext.session
        && nb.sessionContext.session.kernel;
    const cells = nb ? nb.content.widgets.filter(c => c.model.type === 'code') : [];
    return kernel && kernel.status === 'idle' && cells.length > 0
        && cells.every(c => c.model.executionCount !== null);
}}"""
# every output's text from the notebook's model: JupyterLab renders only the cells in view
OUTPUT_TEXT = f"""() => {CURRENT}.content.widgets
    .filter(c => c.model.type === 'code')
    .flatMap(c => Array.from({{length: c.model.outputs.length}},
                             (_, i) => JSON.stringify(c.model.outputs.get(i).toJSON())))
    .join('\\n')"""


def _run_all(page, lab: str, notebook: str) -> str:
    """Open ``notebook``, Run All, wait until every code cell has run; its outputs' text."""
    page.goto(f"{lab}/lab/tree/{notebook}?token={TOKEN}")
    page.wait_for_function(f"() => {CURRENT} && {CURRENT}.context.path === '{notebook}' && "
                           f"{CURRENT}.sessionContext.session && "
                           f"{CURRENT}.sessionContext.session.kernel", timeout=60_000)
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    page.wait_for_function(FINISHED, timeout=240_000)
    return page.evaluate(OUTPUT_TEXT)


def _errors(page) -> list[str]:
    outputs = page.locator("[data-mime-type='application/vnd.jupyter.stderr']").all_inner_texts()
    return [o for o in outputs if "Traceback" in o or "Error" in o]


def test_04_runs_all_and_its_slider_changes_the_image(lab, page, shots):
    _run_all(page, lab, "04_visualise.ipynb")
    assert _errors(page) == []
    picture = page.locator(".widget-image").last
    picture.scroll_into_view_if_needed()
    before = picture.get_attribute("src")
    page.screenshot(path=shots / "04_visualise_image1.png")
    handle = page.locator(".widget-slider .noUi-handle").last
    handle.focus()
    handle.press("ArrowRight")
    page.wait_for_function("([el, old]) => el.getAttribute('src') !== old",
                           arg=[picture.element_handle(), before], timeout=30_000)
    assert page.locator(".widget-readout").last.inner_text().strip() == "1"
    page.screenshot(path=shots / "04_visualise_image2.png")
    assert picture.get_attribute("src") != before


def test_05_runs_all_and_shows_the_comparison(lab, page, shots):
    text = _run_all(page, lab, "05_compare.ipynb")
    assert _errors(page) == []
    assert "baseline (first): a-short" in text and "pooled_iou" in text
    page.screenshot(path=shots / "05_compare.png", full_page=True)
