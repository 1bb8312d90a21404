"""How ``make test`` spreads the suite over pytest-xdist workers (``-n logical --dist
loadfile``). At the repository root, so that it holds for ``tests`` and ``notebooks`` alike."""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """A worker runs torch, and the kernels and commands it starts, on one thread: two
    OpenMP pools on two cores spin against each other. Set before any test imports torch."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """``loadfile``, except that the notebooks are one unit, run in order on one worker:
    03-05 read the run that 02 trains into ``runs/``."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class NotebooksInOrder(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return "notebooks" if scope.startswith("notebooks/") else scope

    return NotebooksInOrder(config, log)
