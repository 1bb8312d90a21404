"""CPU inference: torch eager vs onnxruntime (and OpenVINO, when installed) on the shipped
model, through the predictor.

Copies the model folder to a temporary one and exports its ONNX file there (timed, and
verified against torch as ``brainseg export DIR --onnx`` does), then times
``predict_logits`` (normalisation included, no TTA) with each engine at batch 1 and 16,
on validation images of the real data (``BRAINSEG_DATA``; random images without it),
with the same number of threads for each. Prints images/s, the ratio to torch and how many
mask pixels agree with torch's; run it alone (nothing else using the cores).

OpenVINO is not a brainseg dependency: its row appears when ``openvino`` is importable
(``pip install openvino``); it compiles the same ONNX file for the CPU in fp32. Its
onnxruntime execution provider needs the ``onnxruntime-openvino`` build, which replaces
``onnxruntime`` itself, so it is not measured.

    BRAINSEG_DATA=... python benchmarks/bench_infer.py [--model models/reference]
        [--threads 2] [--batches 1 16] [--seconds 20]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from brainseg_lib.data.arrays import load_split_arrays
from brainseg_lib.data.locate import find_real_dataset
from brainseg_lib.inference.predictor import LoadedModel, load_model, predict_logits
from brainseg_lib.model.onnx_export import OnnxMember
from brainseg_lib.model.package import add_onnx, verified_onnx


class OpenVinoMember:
    """The ONNX file compiled by OpenVINO for the CPU (fp32), called like the torch network."""

    def __init__(self, path: Path, threads: int):
        import openvino

        self.compiled = openvino.Core().compile_model(
            str(path), "CPU", {"INFERENCE_NUM_THREADS": threads,
                               "INFERENCE_PRECISION_HINT": "f32"})

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.compiled(np.ascontiguousarray(x.numpy(), dtype=np.float32))
        return torch.from_numpy(out[0])


def openvino_model(loaded: LoadedModel, files: list[Path], threads: int,
                   ) -> LoadedModel | None:
    """``loaded`` with its members run by OpenVINO, or None where it is not installed."""
    try:
        members = [OpenVinoMember(f, threads) for f in files]
    except ImportError:
        return None
    return dataclasses.replace(loaded, members=members, backend="openvino")


def images(size: int, n: int) -> tuple[torch.Tensor, str]:
    """``n`` uint8 images at ``size``: the real validation split's first, else random."""
    found = find_real_dataset("")
    if found:
        arrays = load_split_arrays(found.path, "valid", size, os.environ.get("BRAINSEG_CACHE"))
        return torch.from_numpy(arrays.images[:n]), f"real validation images ({found.path})"
    rng = np.random.default_rng(0)
    return (torch.from_numpy(rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)),
            "random images (no BRAINSEG_DATA)")


def img_per_s(loaded: LoadedModel, x: torch.Tensor, seconds: float) -> float:
    """Images per second of ``predict_logits`` over at least ``seconds`` (after a warm-up)."""
    predict_logits(loaded, x)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or done < 3:
        predict_logits(loaded, x)
        done += 1
    return done * len(x) / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/reference")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--seconds", type=float, default=20.0, help="timed per engine and batch")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / Path(args.model).name
        shutil.copytree(args.model, folder, ignore=shutil.ignore_patterns("*.onnx"))
        started = time.perf_counter()
        record = add_onnx(folder)
        print(f"ONNX export + verification: {time.perf_counter() - started:.1f} s (export "
              f"{sum(record['export_seconds']):.1f} s); max |Δprobability| "
              f"{record['max_abs_prob_diff']:.1e}, identical mask pixels "
              f"{record['mask_agreement']:.4%} on {record['verified_on']}")
        by_torch = load_model(folder, "cpu", "torch")
        by_ort = load_model(folder, "cpu", "onnxruntime")
        by_ort.members = [OnnxMember(f, args.threads) for f in verified_onnx(folder)]
        engines = {"onnxruntime": by_ort}
        by_ov = openvino_model(by_ort, verified_onnx(folder), args.threads)
        if by_ov:
            engines["OpenVINO"] = by_ov
        size = by_torch.params.image_size
        data, what = images(size, max(args.batches))
        print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"{args.threads} threads; torch {torch.__version__}; {size} px; {what}")
        print("| batch | engine | img/s | ratio to torch eager | mask px identical to torch |")
        print("|---|---|---|---|---|")
        for batch in args.batches:
            x = data[:batch]
            reference = predict_logits(by_torch, x) >= 0
            base = img_per_s(by_torch, x, args.seconds)
            print(f"| {batch} | torch eager | {base:.1f} | 1.00x | – |", flush=True)
            for name, loaded in engines.items():
                same = (predict_logits(loaded, x) >= 0) == reference
                speed = img_per_s(loaded, x, args.seconds)
                print(f"| {batch} | {name} | {speed:.1f} | {speed / base:.2f}x | "
                      f"{same.float().mean().item():.4%} |", flush=True)


if __name__ == "__main__":
    main()
