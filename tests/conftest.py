"""Shared fixtures: a small synthetic COCO set, the real dataset when present, tiny params."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from brainseg_lib.config import Params, load_params, project_root
from brainseg_lib.data.locate import looks_like_dataset
from brainseg_lib.data.synthetic import write_synthetic_coco

ROOT = project_root()


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

    tmp = tmp_path_factory.mktemp("evaluated")
    runs = []
    for run_id, epochs in (("a-short", 1), ("b-longer", 8)):
        params = tiny_params(tmp, synthetic_root, epochs=epochs, lr=0.003, patience=0,
                             monitor="val_iou", run_id=run_id)
        run_dir = train(params, progress=False).run_dir
        evaluate_run(run_dir, "test", verbose=False)
        runs.append(run_dir)
    return runs


@pytest.fixture(scope="session")
def smoke_reports(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    """``brainseg run`` of the smoke profile (synthetic data, a fixed run id, threshold 0.3),
    compared by 05 with itself (one run of all five notebooks): its exit code and reports
    folder, shared by the pipeline and the HTML-report tests."""
    from brainseg_lib.cli import main

    tmp = tmp_path_factory.mktemp("pipeline")
    reports = tmp / "reports"
    code = main(["run", "--params", str(ROOT / "params" / "smoke.yaml"), "--reports-dir",
                 str(reports), "--set", f"runs_dir={tmp / 'runs'}",
                 "--set", f"cache_dir={tmp / 'cache'}", "--set", "run_id=smoke-fixed",
                 "--set", "threshold=0.3", "--set", "compare=[smoke-fixed]",
                 "--name", "smoke-test"])
    return code, reports


def tiny_params(tmp_path: Path, data_root: Path, **changes) -> Params:
    """The smoke profile shrunk further, on ``data_root``, writing under ``tmp_path``; in
    fp32 on every machine (``amp: auto`` picks bf16 where the CPU has it, and a network
    trained for a few steps in either precision is a different network)."""
    base = {"data_dir": str(data_root), "synthetic": False, "image_size": 64, "amp": "none",
            "runs_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache"),
            "epochs": 2, "batch_size": 4, "bootstrap": 20, "tta": True}
    return load_params(ROOT / "params" / "smoke.yaml", **(base | changes))
