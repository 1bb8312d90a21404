"""ONNX: a member network exported with ``torch.onnx.export``, run through onnxruntime, and
the comparison that verifies one against the other.

PACS plug-ins, web viewers and C++ tools load ONNX, not a Python package, and on a CPU
onnxruntime is the faster engine (``benchmarks/bench_infer.py``). An :class:`OnnxMember` is
called like the torch network (a normalised float batch in, logits out, both torch tensors),
so the predictor's padding, flip TTA, ensemble mean and thresholds serve both engines from
one place.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from brainseg_lib.io import atomic_write
from brainseg_lib.model.checkpoint import ArtifactError

INPUT_NAME, OUTPUT_NAME = "images", "logits"
# a verified export must give the same masks as torch on >= this fraction of pixels, and
# probabilities within this absolute tolerance (fp32 kernels differ by ~1e-6)
MIN_MASK_AGREEMENT = 0.999
MAX_PROB_DIFF = 1e-3
# an int8 file keeps the same mask bound; its probabilities move further (0.19 and 0.21 at
# most on the former and current shipped models' verification images: benchmarks/README.md)
INT8_MAX_PROB_DIFF = 0.25


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


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's CPU pool cut to ``n`` threads inside the block and restored after it.

    Around an onnxruntime call: torch's OpenMP threads, still spinning after the
    normalisation, would take the cores onnxruntime's own threads need (figures in
    ``benchmarks/README.md``). Scoped, so the process-wide setting is left as found.
    """
    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


class OnnxMember:
    """One member network as an onnxruntime session, called like the torch network."""

    def __init__(self, path: Path, threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()  # graph optimisation: ORT_ENABLE_ALL by default
        if threads:
            options.intra_op_num_threads = threads
        self.path = Path(path)
        try:
            self.session = ort.InferenceSession(str(path), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime's own exception types, per failure
            raise ArtifactError(f"{path}: not a readable ONNX file ({type(err).__name__}: "
                                f"{str(err).strip()[:120]})") from None
        self.channels = self._check_signature()

    def _check_signature(self) -> int | str:
        """The input's channel count, after checking the graph takes what the predictor
        feeds (one float ``images`` batch (B,C,H,W)) and gives what it reads (``logits``
        (B,1,H,W)); an ArtifactError naming the file otherwise."""
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        found = (f"inputs {[(i.name, i.type, i.shape) for i in inputs]}, outputs "
                 f"{[(o.name, o.type, o.shape) for o in outputs]}")
        out = next((o for o in outputs if o.name == OUTPUT_NAME), None)
        if (len(inputs) != 1 or inputs[0].name != INPUT_NAME or out is None
                or inputs[0].type != "tensor(float)" or out.type != "tensor(float)"
                or len(inputs[0].shape) != 4 or len(out.shape) != 4
                or out.shape[1] not in (1, None) and not isinstance(out.shape[1], str)):
            raise ArtifactError(f"{self.path}: not the graph brainseg feeds: expected input "
                                f"'{INPUT_NAME}' float (B,C,H,W) and output '{OUTPUT_NAME}' "
                                f"float (B,1,H,W); found {found}"[:400])
        return inputs[0].shape[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.channels, int) and x.shape[1] != self.channels:
            raise ArtifactError(f"{self.path}: takes {self.channels} input channel(s); the "
                                f"model's parameters feed {x.shape[1]}")
        batch = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        with torch_threads(1):
            out = self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
        if out.shape != (x.shape[0], 1, *x.shape[2:]):
            raise ArtifactError(f"{self.path}: gave logits of shape {tuple(out.shape)} for a "
                                f"batch of shape {tuple(x.shape)}; expected "
                                f"{(x.shape[0], 1, *x.shape[2:])}")
        return torch.from_numpy(out)


def quantize_int8(src: Path, dst: Path, calibration: list[torch.Tensor]) -> float:
    """Write ``dst``: the fp32 ONNX file ``src`` with int8 static quantisation, its activation
    ranges calibrated (min/max) on ``calibration`` (normalised validation batches, never
    test); returns the seconds it took.

    onnxruntime's own quantiser: its pre-processing folds batch norms into the convolutions,
    then QDQ nodes with per-channel int8 weights and uint8 activations, which onnxruntime
    runs as integer convolutions (VNNI where the CPU has it).
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.left = iter([{INPUT_NAME: x.numpy()} for x in calibration])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.left, None)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        atomic_write(dst, lambda out: quantize_static(
            str(prepared), str(out), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax))
    return time.perf_counter() - started


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


def verification_failures(result: dict[str, Any], int8: bool = False) -> list[str]:
    """What a comparison misses of the verification's bounds (empty: verified)."""
    failures = []
    max_diff = INT8_MAX_PROB_DIFF if int8 else MAX_PROB_DIFF
    if result["mask_agreement"] < MIN_MASK_AGREEMENT:
        failures.append(f"masks agree on {result['mask_agreement']:.5%} of pixels "
                        f"(< {MIN_MASK_AGREEMENT:.1%})")
    if result["max_abs_prob_diff"] > max_diff:
        failures.append(f"max |Δprobability| {result['max_abs_prob_diff']:.2e} > {max_diff:g}")
    return failures
