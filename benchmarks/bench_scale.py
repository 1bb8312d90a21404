"""Memory and speed as the dataset grows: synthetic sets of 2k, 20k and 100k training images
at 128 px, trained and evaluated from the memory-mapped cache (streamed batches) and, for
comparison, from arrays read into memory (resident batches). Prints one table.

A full epoch over 100,000 images takes hours on a 2-core CPU, so each measurement is a fixed
number of training steps (``--steps``, batches drawn at random from the whole train split)
and of evaluation batches, with a small network (ResNet-18 encoder, a narrow decoder):
peak memory and img/s of those steps, not of whole epochs. Each measurement runs in a fresh
process, so its peak RSS is its own.

    python benchmarks/bench_scale.py prepare --out /tmp/bench-scale   # no torch: generate,
                                                                        # decode into caches
    python benchmarks/bench_scale.py measure --out /tmp/bench-scale   # the table
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

SIZES = (2_000, 20_000, 100_000)
PX = 128


def _dataset(out: Path, n: int) -> Path:
    return out / f"synthetic-{n}"


def prepare(out: Path, sizes: tuple[int, ...]) -> None:
    """Generate each dataset (the project's synthetic generator) and decode its train split
    into the disk cache; print how long each takes."""
    from brainseg_lib.data.arrays import load_split_arrays
    from brainseg_lib.data.synthetic import ensure_synthetic_coco

    for n in sizes:
        t0 = time.perf_counter()
        root = ensure_synthetic_coco(_dataset(out, n), (n, 64, 64), PX, seed=0)
        made = time.perf_counter() - t0
        t0 = time.perf_counter()
        load_split_arrays(root, "train", PX, out / "cache", use_memory=False)
        cached = time.perf_counter() - t0
        print(f"{n:>7} images: generated in {made:6.1f} s, decoded into the cache in "
              f"{cached:6.1f} s", flush=True)


class PeakAnon:
    """Peak anonymous memory (RssAnon) of this process, sampled every 20 ms: unlike
    ``ru_maxrss`` it leaves out pages of the memory-mapped cache, which the kernel can drop."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    @staticmethod
    def now() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.now())

    def stop(self) -> int:
        self._stop.set()
        return max(self.peak, self.now())


def one(out: Path, n: int, mode: str, steps: int, batch: int) -> dict[str, float]:
    """One measurement in this process: ``steps`` training steps and ``steps`` evaluation
    batches over the train split of the n-image set, memory-mapped or in memory."""
    import torch

    from brainseg_lib.config import Params
    from brainseg_lib.data.arrays import load_split_arrays
    from brainseg_lib.model.network import create_model
    from brainseg_lib.training.batches import ResidentBatches, StreamedBatches
    from brainseg_lib.training.trainer import Trainer, validate

    torch.set_num_threads(2)
    peak = PeakAnon()
    arrays = load_split_arrays(_dataset(out, n), "train", PX, out / "cache", use_memory=False,
                               mmap=mode == "mmap")
    cpu = torch.device("cpu")
    kind = StreamedBatches if mode == "mmap" else ResidentBatches
    params = Params(profile="bench", image_size=PX, batch_size=batch, encoder="resnet18",
                    decoder_channels=[64, 32, 16, 8, 4], loss="focal_dice", device="cpu",
                    augment=True)
    model, _ = create_model("Unet", "resnet18", "none", 3, False, params.decoder_channels)
    train = _Steps(kind(arrays, cpu, batch, shuffle=True, seed=0), steps)
    trainer = Trainer(params, model, cpu, len(train))
    _loss, images, seconds = trainer.train_epoch(train, 1)
    t0 = time.perf_counter()
    validate(trainer.eval_model, _Steps(kind(arrays, cpu, batch, shuffle=True, seed=1), steps),
             trainer.loss_fn, params, cpu)
    eval_seconds = time.perf_counter() - t0
    return {"n": n, "mode": mode, "train_img_per_s": images / seconds,
            "eval_img_per_s": steps * batch / eval_seconds,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "peak_anon_gb": peak.stop() / 2**30}


class _Steps:
    """The first ``steps`` batches of ``batches`` (random ones when it shuffles)."""

    def __init__(self, batches: object, steps: int):
        self.batches, self.steps = batches, min(steps, len(batches))

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):  # noqa: ANN204
        for i, batch in enumerate(self.batches):
            if i == self.steps:
                return
            yield batch


def clustering(out: Path, n: int) -> dict[str, float]:
    """pHash of every train image (from the memory map) and the near-duplicate clusters."""
    from brainseg_lib.data.arrays import load_split_arrays
    from brainseg_lib.data.duplicates import duplicate_clusters, phash

    arrays = load_split_arrays(_dataset(out, n), "train", PX, out / "cache", use_memory=False)
    t0 = time.perf_counter()
    hashes = phash(arrays)
    hashed = time.perf_counter() - t0
    t0 = time.perf_counter()
    labels = duplicate_clusters(hashes, 4)
    return {"hash_s": hashed, "cluster_s": time.perf_counter() - t0,
            "clusters": int(labels.max()) + 1}


def measure(out: Path, sizes: tuple[int, ...], steps: int, batch: int) -> None:
    rows = []
    for n in sizes:
        for mode in ("mmap", "memory"):
            cmd = [sys.executable, __file__, "one", "--out", str(out), "--n", str(n),
                   "--mode", mode, "--steps", str(steps), "--batch", str(batch)]
            rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True,
                                                  text=True).stdout.splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
        rows[-1] |= clustering(out, n)
    print(f"\n{steps} training steps and {steps} evaluation batches of {batch} images at "
          f"{PX} px, drawn at random from the whole train split (not whole epochs); "
          "ResNet-18 U-Net with a narrow decoder, 2 threads")
    print("| train images | data | train img/s | eval img/s | peak RSS (GB) | peak anon RSS "
          "(GB) | pHash (s) | clustering (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        extra = (f"{row['hash_s']:.1f} | {row['cluster_s']:.1f}" if "hash_s" in row
                 else "| ")
        print(f"| {row['n']:,} | {row['mode']} | {row['train_img_per_s']:.1f} | "
              f"{row['eval_img_per_s']:.1f} | {row['peak_rss_gb']:.2f} | "
              f"{row['peak_anon_gb']:.2f} | {extra} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["prepare", "measure", "one"])
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench-scale"))
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--n", type=int)
    ap.add_argument("--mode", choices=["mmap", "memory"])
    args = ap.parse_args()
    if args.step == "prepare":
        prepare(args.out, tuple(args.sizes))
    elif args.step == "measure":
        measure(args.out, tuple(args.sizes), args.steps, args.batch)
    else:
        print(json.dumps(one(args.out, args.n, args.mode, args.steps, args.batch)))


if __name__ == "__main__":
    main()
