"""CPU inference: torch eager fp32 and bf16 autocast vs onnxruntime fp32 and int8 (and
OpenVINO, when installed) on the shipped model, through the predictor.

Copies the model folder to a temporary one and exports its ONNX files there (timed, and
verified against torch as ``brainseg export DIR --onnx --int8`` does; an int8 file that
fails its verification is reported and left out), then times ``predict_logits``
(normalisation included, no TTA) with each engine at batch 1 and 16, with the same number
of threads for each; torch eager runs as the predictor runs it (channels_last, oneDNN).
Images: 64 validation images of the real data (``BRAINSEG_DATA``; random images without
it) that neither the verification (0–31) nor the int8 calibration (32–95) used. Prints
images/s, the ratio to torch fp32 and the share of mask pixels identical to torch fp32's on
all 64 images, each row beside the CPU's native-bf16 flags (``avx512_bf16``, ``amx_bf16``:
without them bf16 is emulated, and ``--backend auto`` does not choose it); run it alone
(nothing else using the cores).

OpenVINO is not a brainseg dependency: its rows appear when ``openvino`` is importable
(``pip install openvino``); it compiles the same ONNX files for the CPU. Its onnxruntime
execution provider needs the ``onnxruntime-openvino`` build, which replaces
``onnxruntime`` itself, so it is not measured.

    BRAINSEG_DATA=... python benchmarks/bench_infer.py [--model models/reference]
        [--threads 2] [--batches 1 16] [--seconds 20]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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
from brainseg_lib.model.checkpoint import ArtifactError
from brainseg_lib.model.device import Precision, cpu_bf16_flags
from brainseg_lib.model.onnx_export import OnnxMember, torch_threads
from brainseg_lib.model.onnx_files import add_onnx, verified_onnx


class OpenVinoMember:
    """An ONNX file compiled by OpenVINO for the CPU (fp32 kernels for an fp32 file, int8
    ones for a QDQ file), called like the torch network and, like ``OnnxMember``, with
    torch's pool cut to one thread during the call."""

    def __init__(self, path: Path, threads: int):
        import openvino

        self.compiled = openvino.Core().compile_model(
            str(path), "CPU", {"INFERENCE_NUM_THREADS": threads,
                               "INFERENCE_PRECISION_HINT": "f32"})

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch_threads(1):
            out = self.compiled(np.ascontiguousarray(x.numpy(), dtype=np.float32))
        return torch.from_numpy(out[0])


def openvino_model(loaded: LoadedModel, files: list[Path] | None, threads: int,
                   ) -> LoadedModel | None:
    """``loaded`` with its members run by OpenVINO, or None where it is not installed."""
    if not files:
        return None
    try:
        members = [OpenVinoMember(f, threads) for f in files]
    except ImportError:
        return None
    except RuntimeError as e:  # a graph it cannot compile: reported, not measured
        print(f"OpenVINO cannot compile {files[0].name}: {str(e).splitlines()[0]}")
        return None
    return dataclasses.replace(loaded, members=members, backend="openvino")


def images(size: int, n: int) -> tuple[torch.Tensor, str]:
    """``n`` uint8 images at ``size``: real validation images from the 97th on (those before
    verify and calibrate the ONNX files), else random ones."""
    found = find_real_dataset("")
    if found:
        arrays = load_split_arrays(found.path, "valid", size, os.environ.get("BRAINSEG_CACHE"))
        return (torch.from_numpy(np.array(arrays.images[96:96 + n])),  # a copy: may be read-only
                f"real validation images 96–{96 + n - 1} ({found.path})")
    rng = np.random.default_rng(0)
    return (torch.from_numpy(rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)),
            "random images (no BRAINSEG_DATA)")


def masks(loaded: LoadedModel, data: torch.Tensor) -> torch.Tensor:
    """The masks (logit >= 0) of every image, in batches of 16."""
    return torch.cat([predict_logits(loaded, data[i:i + 16]) >= 0
                      for i in range(0, len(data), 16)])


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
    ap.add_argument("--images", type=int, default=64, help="mask agreement counted on these")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / Path(args.model).name
        shutil.copytree(args.model, folder, ignore=shutil.ignore_patterns("*.onnx"))
        started = time.perf_counter()
        try:
            add_onnx(folder, int8=True)
        except ArtifactError as e:  # the fp32 file stays verified; int8 is left out
            print(f"int8 refused: {e}")
        record = json.loads((folder / "brainseg.json").read_text())["onnx"]
        print(f"ONNX export + verification (fp32 and int8): {time.perf_counter() - started:.1f}"
              f" s (fp32 export {sum(record['export_seconds']):.1f} s); max |Δprobability| "
              f"{record['max_abs_prob_diff']:.1e}, identical mask pixels "
              f"{record['mask_agreement']:.4%} on {record['verified_on']}")
        if "int8" in record:
            q = record["int8"]
            print(f"int8: quantised in {sum(q['quantise_seconds']):.1f} s, calibrated on "
                  f"{q['calibrated_on']}; max |Δprobability| {q['max_abs_prob_diff']:.1e}, "
                  f"identical mask pixels {q['mask_agreement']:.4%} on the same images")
        by_torch = dataclasses.replace(load_model(folder, "cpu", "torch"),
                                       precision=Precision(None, "fp32 (benchmark)"))
        engines = {"torch bf16": dataclasses.replace(
            by_torch, precision=Precision(torch.bfloat16, "bf16 autocast (benchmark)"))}
        for backend, int8 in (("onnxruntime", False), ("onnxruntime-int8", True)):
            files = verified_onnx(folder, int8)
            if files:
                engines[f"{backend} (fp32)" if not int8 else backend] = dataclasses.replace(
                    by_torch, members=[OnnxMember(f, args.threads) for f in files],
                    backend=backend)
            by_ov = openvino_model(by_torch, files, args.threads)
            if by_ov:
                engines["OpenVINO (int8 file)" if int8 else "OpenVINO (fp32)"] = by_ov
        size = by_torch.params.image_size
        data, what = images(size, max(args.images, *args.batches))
        flags = " ".join(cpu_bf16_flags()) or "none"
        print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"{args.threads} threads; native bf16 flags: {flags}; torch {torch.__version__}; "
              f"{size} px; {what}")
        print("| CPU bf16 flags | batch | engine | img/s | ratio to torch fp32 | "
              "mask px identical to torch fp32 |")
        print("|---|---|---|---|---|---|")
        reference = masks(by_torch, data)
        same = {name: (masks(loaded, data) == reference).float().mean().item()
                for name, loaded in engines.items()}
        for batch in args.batches:
            x = data[:batch]
            base = img_per_s(by_torch, x, args.seconds)
            print(f"| {flags} | {batch} | torch fp32 | {base:.1f} | 1.00x | – |", flush=True)
            for name, loaded in engines.items():
                speed = img_per_s(loaded, x, args.seconds)
                print(f"| {flags} | {batch} | {name} | {speed:.1f} | {speed / base:.2f}x | "
                      f"{same[name]:.4%} |", flush=True)


if __name__ == "__main__":
    main()
