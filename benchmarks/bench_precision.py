"""Does bf16 change anything but speed? The same `quick` training (same seed, data, fixed
number of epochs, so the same schedule) once in fp32 and once in bf16 autocast, on the real
data; prints both validation curves side by side with the CPU's flags and writes them as a
figure. On a CPU without native bf16 the bf16 run is emulated and several times slower.

    BRAINSEG_DATA=... python benchmarks/bench_precision.py [--epochs 10] [--seed 42]
        [--runs-dir runs] [--figure docs/precision_curves.png]

Trains ``<runs-dir>/precision-fp32`` and ``<runs-dir>/precision-bf16``; a run that already
finished is read, not trained again (delete it to retrain).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from brainseg_lib.rundir import cpu_record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
AMPS = {"fp32": "none", "bf16": "bf16"}


def train(run: Path, amp: str, epochs: int, seed: int) -> None:
    """One fixed-length `quick` training (no time budget: the schedule runs over epochs)."""
    if (run / "train.json").is_file():
        return
    subprocess.run([sys.executable, "-m", "brainseg_lib.cli", "train", "--params",
                    str(ROOT / "params" / "quick.yaml"), "--run-id", run.name, "--no-progress",
                    "--set", f"runs_dir={run.parent}", "--set", f"amp={amp}",
                    "--set", "train_minutes=0", "--set", f"epochs={epochs}",
                    "--set", f"seed={seed}"], check=True)


def curves(runs: dict[str, Path]) -> pd.DataFrame:
    """Per-epoch validation figures and epoch seconds of each run, side by side."""
    parts = []
    for name, run in runs.items():
        h = pd.read_csv(run / "history.csv").set_index("epoch")
        parts.append(h[["val_iou", "val_dice", "val_loss", "seconds"]].add_suffix(f" {name}"))
    return pd.concat(parts, axis=1)


def plot(table: pd.DataFrame, flags: str, figure: Path) -> None:
    fig, (ax_iou, ax_loss) = plt.subplots(1, 2, figsize=(9, 3.4))
    for name in AMPS:
        ax_iou.plot(table.index, table[f"val_iou {name}"], marker="o", label=name)
        ax_loss.plot(table.index, table[f"val_loss {name}"], marker="o", label=name)
    ax_iou.set(xlabel="epoch", ylabel="validation pooled IoU")
    ax_loss.set(xlabel="epoch", ylabel="validation loss (focal + Dice)")
    ax_iou.legend()
    fig.suptitle(f"quick, same seed, fp32 vs bf16 autocast (CPU flags: {flags})", fontsize=10)
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "runs")
    ap.add_argument("--figure", type=Path, default=ROOT / "docs" / "precision_curves.png")
    args = ap.parse_args()
    runs = {name: args.runs_dir / f"precision-{name}" for name in AMPS}
    for name, run in runs.items():
        train(run, AMPS[name], args.epochs, args.seed)
    cpu = cpu_record()
    flags = " ".join(cpu["speed_flags"]) or "none"
    table = curves(runs)
    print(f"CPU: {cpu['model']}; flags: {flags}; quick, seed {args.seed}, {args.epochs} epochs")
    print("| epoch | " + " | ".join(table.columns) + " |")
    print("|---" * (len(table.columns) + 1) + "|")
    for epoch, row in table.iterrows():
        print(f"| {epoch} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    seconds = table[[f"seconds {n}" for n in AMPS]].median()
    print(f"median epoch: fp32 {seconds.iloc[0]:.1f} s, bf16 {seconds.iloc[1]:.1f} s "
          f"({seconds.iloc[0] / seconds.iloc[1]:.2f}x)")
    plot(table, flags, args.figure)
    print("wrote", args.figure)


if __name__ == "__main__":
    main()
