"""Shared fixtures: a small synthetic COCO set, the real dataset when present, tiny params."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from brainseg_lib.config import Params, load_params, project_root
from brainseg_lib.data.locate import looks_like_dataset
from brainseg_lib.data.synthetic import write_synthetic_coco

ROOT = project_root()


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str,
               build: Callable[[Path], Any]) -> Any:
    """``build(folder)`` once for the whole test session, whichever worker asks first: the
    others wait on a lock and read its JSON result (pytest-xdist's recipe for expensive
    session fixtures). The folder lives beside the workers' own, so none deletes it early."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    result, failed = root / f"{name}.json", root / f"{name}.failed"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if failed.exists():  # reported once, where it failed; not rebuilt in its debris
            pytest.fail(f"{name} failed on another worker: {failed.read_text()}", pytrace=False)
        if not result.exists():
            (root / name).mkdir()
            try:
                value = build(root / name)
            except BaseException as err:
                failed.write_text(repr(err))
                raise
            result.write_text(json.dumps(value))
    return json.loads(result.read_text())


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/valid/test with 16/6/6 MRI-like 64x64 slices and exact box annotations."""
    return write_synthetic_coco(tmp_path_factory.mktemp("synthetic"), (16, 6, 6), 64, seed=3)


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def real_root() -> Path:
    env = os.environ.get("BRAINSEG_DATA", "")
    if not env or not looks_like_dataset(Path(env)):
        pytest.skip("real dataset not available: set BRAINSEG_DATA to brain-tumor-coco/")
    return Path(env)


@pytest.fixture(scope="session")
def evaluated_runs(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path,
                   ) -> list[Path]:
    """A barely trained run (1 epoch) and a better one (8), both evaluated on test, in one
    runs folder (its cache beside it): what 05_compare and the JupyterLab test compare."""
    from brainseg_lib.evaluation.evaluate import evaluate_run
    from brainseg_lib.training.loop import train

    def build(tmp: Path) -> list[str]:
        runs = []
        for run_id, epochs in (("a-short", 1), ("b-longer", 8)):
            params = tiny_params(tmp, synthetic_root, epochs=epochs, lr=0.003, patience=0,
                                 monitor="val_iou", run_id=run_id)
            run_dir = train(params, progress=False).run_dir
            evaluate_run(run_dir, "test", verbose=False)
            runs.append(str(run_dir))
        return runs

    return [Path(run) for run in built_once(tmp_path_factory, "evaluated", build)]


@pytest.fixture(scope="session")
def smoke_reports(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    """``brainseg run`` of the smoke profile (synthetic data, a fixed run id, threshold 0.3),
    compared by 05 with itself (one run of all five notebooks): its exit code and reports
    folder, shared by the pipeline and the HTML-report tests."""
    from brainseg_lib.cli import main

    def build(tmp: Path) -> list:
        reports = tmp / "reports"
        code = main(["run", "--params", str(ROOT / "params" / "smoke.yaml"), "--reports-dir",
                     str(reports), "--set", f"runs_dir={tmp / 'runs'}",
                     "--set", f"cache_dir={tmp / 'cache'}", "--set", "run_id=smoke-fixed",
                     "--set", "threshold=0.3", "--set", "compare=[smoke-fixed]",
                     "--name", "smoke-test"])
        return [code, str(reports)]

    code, reports = built_once(tmp_path_factory, "pipeline", build)
    return code, Path(reports)


def tiny_params(tmp_path: Path, data_root: Path, **changes) -> Params:
    """The smoke profile shrunk further, on ``data_root``, writing under ``tmp_path``; in
    fp32 on every machine (``amp: auto`` picks bf16 where the CPU has it, and a network
    trained for a few steps in either precision is a different network)."""
    base = {"data_dir": str(data_root), "synthetic": False, "image_size": 64, "amp": "none",
            "runs_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache"),
            "epochs": 2, "batch_size": 4, "bootstrap": 20, "tta": True}
    return load_params(ROOT / "params" / "smoke.yaml", **(base | changes))
