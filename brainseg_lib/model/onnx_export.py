"""ONNX: a member network exported with ``torch.onnx.export``, run through onnxruntime, and
the comparison that verifies one against the other.

PACS plug-ins, web viewers and C++ tools load ONNX, not a Python package, and on a CPU
onnxruntime is the faster engine (``benchmarks/bench_infer.py``). An :class:`OnnxMember` is
called like the torch network (a normalised float batch in, logits out, both torch tensors),
so the predictor's padding, flip TTA, ensemble mean and thresholds serve both engines from
one place.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from brainseg_lib.io import atomic_write

INPUT_NAME, OUTPUT_NAME = "images", "logits"
# a verified export must give the same masks as torch on >= this fraction of pixels, and
# probabilities within this absolute tolerance (fp32 kernels differ by ~1e-6)
MIN_MASK_AGREEMENT = 0.999
MAX_PROB_DIFF = 1e-3


def export_onnx(model: nn.Module, path: Path, in_channels: int, image_size: int) -> float:
    """Write ``model`` (float32, eval mode) as one ONNX file with a dynamic batch, height and
    width (multiples of 32); returns the seconds it took.

    torch's exporter (``dynamo=True``, its current default) at its default opset; the
    weights are stored inside the file (``external_data=False``: one file to hand over).
    """
    model = model.float().eval().cpu()
    example = torch.zeros(2, in_channels, image_size, image_size)
    dims = {0: torch.export.Dim("batch", min=1, max=4096),
            2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own notes on its progress
        atomic_write(path, lambda tmp: torch.onnx.export(
            model, (example,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamo=True, external_data=False, dynamic_shapes={"x": dims}, verbose=False))
    return time.perf_counter() - started


class OnnxMember:
    """One member network as an onnxruntime session, called like the torch network."""

    def __init__(self, path: Path, threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()  # graph optimisation: ORT_ENABLE_ALL by default
        if threads:
            options.intra_op_num_threads = threads
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        batch = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0])


@torch.inference_mode()
def compare_engines(model: nn.Module, member: OnnxMember, batches: list[torch.Tensor],
                    threshold: float) -> dict[str, Any]:
    """Probabilities and masks of torch and onnxruntime on the same normalised batches:
    the largest |Δprobability| and the fraction of mask pixels that agree."""
    model = model.float().eval().cpu()
    worst, same, pixels = 0.0, 0, 0
    for x in batches:
        p_torch = torch.sigmoid(model(x)).numpy()
        p_onnx = torch.sigmoid(member(x)).numpy()
        worst = max(worst, float(np.abs(p_torch - p_onnx).max()))
        same += int(((p_torch >= threshold) == (p_onnx >= threshold)).sum())
        pixels += p_torch.size
    return {"max_abs_prob_diff": worst, "mask_agreement": same / pixels, "pixels": pixels,
            "threshold": threshold}


def verification_failures(result: dict[str, Any]) -> list[str]:
    """What a comparison misses of the verification's bounds (empty: verified)."""
    failures = []
    if result["mask_agreement"] < MIN_MASK_AGREEMENT:
        failures.append(f"masks agree on {result['mask_agreement']:.5%} of pixels "
                        f"(< {MIN_MASK_AGREEMENT:.1%})")
    if result["max_abs_prob_diff"] > MAX_PROB_DIFF:
        failures.append(f"max |Δprobability| {result['max_abs_prob_diff']:.2e} > "
                        f"{MAX_PROB_DIFF:g}")
    return failures
