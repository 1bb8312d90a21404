"""The package's layout holds: imports flow one way and only tracking imports MLflow (the
import-linter contracts in pyproject.toml), and the light commands stay light (no torch, no
matplotlib)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def test_imports_flow_one_way_and_only_tracking_imports_mlflow():
    pytest.importorskip("importlinter", reason="import-linter is a test-only dependency: "
                        "pip install -e '.[dev]'")
    # the contracts are [tool.importlinter] in pyproject.toml; no cache folder in the checkout
    done = subprocess.run(
        [sys.executable, "-c", "from importlinter.cli import lint_imports_command as c; c()",
         str(ROOT / "pyproject.toml"), "--no-cache", "--no-logo"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    report = done.stdout + done.stderr
    assert "only tracking imports mlflow KEPT (1 ignored import)" in report, report
    assert "2 kept, 0 broken" in report, report
    assert done.returncode == 0, report


HEAVY_MODULES_AFTER = """
import json, sys
from brainseg_lib.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as stop:
    code = stop.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "matplotlib"))
print("RESULT " + json.dumps({"code": code, "heavy": heavy}))
"""


def _heavy_modules_after(argv: list[str], cache: str) -> tuple[int, list[str], str]:
    """Run ``brainseg ARGV`` in a fresh interpreter: (exit code, heavy modules loaded, output)."""
    env = os.environ | {"BRAINSEG_CACHE": cache}
    done = subprocess.run([sys.executable, "-c", HEAVY_MODULES_AFTER, *argv], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    lines = done.stdout.splitlines()
    assert lines and lines[-1].startswith("RESULT "), done.stdout + done.stderr
    result = json.loads(lines[-1].removeprefix("RESULT "))
    return result["code"], result["heavy"], "\n".join(lines[:-1])


def test_help_imports_neither_torch_nor_matplotlib(tmp_path):
    code, heavy, out = _heavy_modules_after(["--help"], str(tmp_path / "cache"))
    assert code == 0 and "data" in out and "train" in out
    assert heavy == []


def test_data_check_imports_neither_torch_nor_matplotlib(synthetic_root, tmp_path):
    # the full check: every image decoded, and the near-duplicate clusters computed
    code, heavy, out = _heavy_modules_after(["data", "check", str(synthetic_root)],
                                            str(tmp_path / "cache"))
    assert code == 0, out
    assert "errors: 0" in out and "near-duplicate clusters" in out
    assert heavy == []
