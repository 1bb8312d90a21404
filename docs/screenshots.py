"""Screenshots of a report's 02 and 03 HTML for the README: what a reader sees on opening them.

    python docs/screenshots.py reports/<day>/<run-id> [--out docs] [--height 1300]

Needs playwright (a dev dependency) and Debian's chromium (``/usr/bin/chromium``); writes
``report_02_train.png`` and ``report_03_evaluate.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

PAGES = ("02_train", "03_evaluate")


def screenshots(report: Path, out: Path, width: int = 1280, height: int = 1300) -> list[Path]:
    """The first ``height`` pixels of each page at ``width``: the headline box, the start of
    the report below it."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("chromium is not installed (apt-get install chromium)")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": width, "height": height})
        for name in PAGES:
            html = report / f"{name}.html"
            if not html.is_file():
                raise SystemExit(f"{html}: no such report page")
            page.goto(html.resolve().as_uri())
            written.append(out / f"report_{name}.png")
            page.screenshot(path=written[-1])
        browser.close()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="a report folder: reports/<day>/<run-id>")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--height", type=int, default=1300, help="pixels from the top")
    args = parser.parse_args(argv)
    for path in screenshots(args.report, args.out, height=args.height):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
