"""Many training runs at once: several on one big GPU, or one per GPU where there are several.

Each job is an ordinary ``brainseg train`` in its own process and run directory, so a job
that fails or is killed leaves its last checkpoint, and running the same job list again
skips the finished runs and resumes the interrupted ones (nnU-Net's habit for folds).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brainseg_lib.rundir import LAST_CHECKPOINT, RunDir


@dataclass
class Job:
    name: str
    run_dir: Path
    params_file: Path
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return RunDir(self.run_dir).is_finished

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "brainseg_lib.cli", "train", "--params",
               str(self.params_file), "--no-progress"]
        sets = dict(self.overrides)
        if (self.run_dir / LAST_CHECKPOINT).exists():
            cmd += ["--resume", str(self.run_dir)]
            sets = {k: v for k, v in sets.items() if k not in ("runs_dir", "run_id")}
        else:
            sets |= {"runs_dir": str(self.run_dir.parent), "run_id": self.run_dir.name}
        for key, value in sets.items():
            cmd += ["--set", f"{key}={json.dumps(value)}"]  # JSON is valid YAML
        return cmd


def visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def run_jobs(jobs: list[Job], parallel: int = 0, log_dir: Path | None = None,
             ) -> dict[str, int]:
    """Run the unfinished jobs, ``parallel`` at a time (default: one per GPU, else one),
    each pinned to a GPU round-robin. Returns each job's exit code (0 for skipped ones)."""
    gpus = visible_gpus()
    parallel = parallel or max(gpus, 1)
    codes = {j.name: 0 for j in jobs if j.finished}
    todo = [j for j in jobs if not j.finished]
    if codes:
        print(f"already finished: {', '.join(codes)}")
    running: list[tuple[Job, subprocess.Popen, Any]] = []
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        _loop(todo, running, parallel, gpus, log_dir, codes)
    finally:  # stopped or killed: stop the runs too (each keeps its last checkpoint)
        for _, proc, _log in running:
            proc.terminate()
        for _, proc, log in running:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
        signal.signal(signal.SIGTERM, previous)
    return codes


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _loop(todo: list[Job], running: list[tuple[Job, subprocess.Popen, Any]], parallel: int,
          gpus: int, log_dir: Path | None, codes: dict[str, int]) -> None:
    slot = 0
    while todo or running:
        while todo and len(running) < parallel:
            job = todo.pop(0)
            env = dict(os.environ)
            if gpus > 1:
                env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
            slot += 1
            log_path = (log_dir or job.run_dir.parent) / f"{job.name}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log = log_path.open("a")
            resumed = " (resuming)" if (job.run_dir / LAST_CHECKPOINT).exists() else ""
            print(f"start {job.name}{resumed}: log {log_path}", flush=True)
            running.append((job, subprocess.Popen(job.command(), stdout=log,
                                                  stderr=subprocess.STDOUT, env=env), log))
        time.sleep(0.5)
        for item in list(running):
            job, proc, log = item
            if proc.poll() is not None:
                log.close()
                codes[job.name] = proc.returncode
                state = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
                print(f"{state}: {job.name}", flush=True)
                running.remove(item)
