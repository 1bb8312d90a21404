"""Many trainings at once as child processes: CV folds (one ``brainseg train`` per run
folder) and sweep workers, several on one big GPU or one per GPU where there are several.

Each child is pinned to a GPU round-robin (where there are several) and logs to its own
file. SIGTERM or SIGINT to this process is forwarded to the children, and a child still
alive after the grace period is killed, so no training outlives its launcher. A training
job is started from the ``params.yaml`` written into its run folder, so the file that
started a run is its record; a job that fails or is killed keeps its last checkpoint, and
launching the same jobs again skips the finished runs and resumes the interrupted ones
(nnU-Net's habit for folds).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from brainseg_lib.config import Params, save_params
from brainseg_lib.rundir import PARAMS_FILE, RunDir, target_run_dir

GRACE_S = 15.0  # after a forwarded signal, how long a child may take to stop
FORWARDED = (signal.SIGTERM, signal.SIGINT)


@dataclass(frozen=True)
class Child:
    """One process to launch: its name (in messages), command line and log file."""

    name: str
    command: list[str]
    log: Path
    note: str = ""  # said when it starts, e.g. " (resuming)"


@dataclass(frozen=True)
class TrainJob:
    """One training run in its own process; ``params`` are resolved, and their
    ``runs_dir``/``run_id`` name its run folder."""

    name: str
    params: Params

    @property
    def run(self) -> RunDir:
        return RunDir(target_run_dir(self.params))

    def prepare(self, log_dir: Path) -> Child:
        """Write the run's ``params.yaml`` (an interrupted run's own, with the resumable
        changes; ParamsError for one that shaped its weights) and the ``brainseg train``
        that starts from it."""
        run = self.run
        run.path.mkdir(parents=True, exist_ok=True)
        params = run.resumed_params(self.params.to_dict()) if run.can_resume else self.params
        save_params(params, run.path / PARAMS_FILE)
        command = [sys.executable, "-m", "brainseg_lib.cli", "train", "--params",
                   str(run.path / PARAMS_FILE), "--no-progress"]
        if run.can_resume:
            return Child(self.name, [*command, "--resume", str(run.path)],
                         log_dir / f"{self.name}.log", " (resuming)")
        return Child(self.name, command, log_dir / f"{self.name}.log")


def visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def run_jobs(jobs: list[TrainJob], parallel: int = 0, log_dir: Path | None = None,
             ) -> dict[str, int]:
    """Train the unfinished jobs (see :func:`run_children`); each job's exit code, 0 for
    the runs that had already finished."""
    codes = {job.name: 0 for job in jobs if job.run.is_finished}
    if codes:
        print(f"already finished: {', '.join(codes)}")
    children = [job.prepare(log_dir or job.run.path.parent) for job in jobs
                if job.name not in codes]
    return codes | run_children(children, parallel)


def run_children(children: list[Child], parallel: int = 0, grace_s: float = GRACE_S,
                 ) -> dict[str, int]:
    """Run ``children``, ``parallel`` at a time (default: one per GPU, else one); each
    one's exit code. Stopped by a signal or an error, the running children get the signal
    (SIGTERM for an error) and are killed after ``grace_s``; the signal then ends this
    process too (SystemExit 128 + n; KeyboardInterrupt for SIGINT)."""
    gpus = visible_gpus()
    parallel = parallel or max(gpus, 1)
    todo, running, codes = list(children), [], {}
    with _signals_raised() as received:
        try:
            slot = 0
            while todo or running:
                while todo and len(running) < parallel:
                    running.append(_start(todo.pop(0), slot, gpus))
                    slot += 1
                time.sleep(0.5)
                for item in [r for r in running if r[1].poll() is not None]:
                    running.remove(item)
                    codes[item[0].name] = _finished(*item)
        finally:
            _stop(running, received[-1] if received else signal.SIGTERM, grace_s)
    return codes


def _start(child: Child, slot: int, gpus: int) -> tuple[Child, subprocess.Popen, IO[str]]:
    env = dict(os.environ)
    if gpus > 1:
        env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
    child.log.parent.mkdir(parents=True, exist_ok=True)
    log = child.log.open("a")
    print(f"start {child.name}{child.note}: log {child.log}", flush=True)
    return child, subprocess.Popen(child.command, stdout=log, stderr=subprocess.STDOUT,
                                   env=env), log


def _finished(child: Child, proc: subprocess.Popen, log: IO[str]) -> int:
    log.close()
    state = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
    print(f"{state}: {child.name}", flush=True)
    return proc.returncode


def _stop(running: list[tuple[Child, subprocess.Popen, IO[str]]], signum: int,
          grace_s: float) -> None:
    """Forward ``signum`` to the children still running; kill those alive after
    ``grace_s`` (each keeps its last checkpoint)."""
    for _, proc, _ in running:
        proc.send_signal(signum)
    deadline = time.monotonic() + grace_s
    for child, proc, log in running:
        try:
            proc.wait(max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            print(f"killed: {child.name} (still running {grace_s:g} s after the signal)",
                  flush=True)
            proc.kill()
            proc.wait()
        log.close()


@contextmanager
def _signals_raised() -> Iterator[list[int]]:
    """While inside, SIGTERM and SIGINT raise here (recorded in the yielded list), so the
    launcher's cleanup runs; outside the main thread signals cannot be caught, and are
    left alone."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def raise_it(signum: int, frame: Any) -> None:
        received.append(signum)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    previous = {s: signal.signal(s, raise_it) for s in FORWARDED}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
