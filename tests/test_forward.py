"""The forward pass written once: the training step, validation and inference prepare a
batch alike, validation scores exactly what the predictor computes, and the precision is
resolved in one place (native-bf16 flags, a timed probe) and recorded with the run."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from brainseg_lib.config import Params
from brainseg_lib.data.arrays import load_split_arrays
from brainseg_lib.evaluation.predictions import predict_split
from brainseg_lib.inference import predictor as predictor_module
from brainseg_lib.inference.predictor import LoadedModel, load_model, predict_logits
from brainseg_lib.model import device as device_module
from brainseg_lib.model.device import (
    Precision,
    cpu_bf16_flags,
    resolve_precision,
    time_precisions,
)
from brainseg_lib.rundir import CPU_SPEED_FLAGS, cpu_info
from brainseg_lib.training import trainer as trainer_module
from brainseg_lib.training.distributed import DistContext
from brainseg_lib.training.loop import TrainingSession, load_training_data, train
from brainseg_lib.training.trainer import training_probe, validate
from conftest import ROOT, tiny_params

BF16 = Precision(torch.bfloat16, "bf16 (test)")


@pytest.fixture(scope="module")
def session(tmp_path_factory, synthetic_root):
    """A run after one epoch of training on the synthetic set: weights that are not the
    initial ones, its validation batches, and the validation arrays."""
    tmp = tmp_path_factory.mktemp("forward")
    params = tiny_params(tmp, synthetic_root, run_id="fwd", epochs=1, augment=False)
    session = TrainingSession.open(params, DistContext(), {})
    session.trainer.train_epoch(session.train_batches, 1)
    return session, load_training_data(params)[1]["valid"]


def _reference(model, arrays, params, threshold):
    """Validation loss and pooled IoU computed by hand: images / 255, normalised, the
    network in fp32 on contiguous input, the loss of each image on its own."""
    from brainseg_lib.training.losses import build_loss

    model.eval()
    mean = torch.tensor(params.normalize_mean).view(1, -1, 1, 1)
    std = torch.tensor(params.normalize_std).view(1, -1, 1, 1)
    x = (torch.from_numpy(np.array(arrays.images)).float() / 255 - mean) / std
    y = torch.from_numpy(np.array(arrays.masks)).unsqueeze(1).float()
    loss_fn = build_loss(params.loss)
    with torch.no_grad():
        logits = model(x.contiguous()).float()
        loss = np.mean([loss_fn(logits[i:i + 1], y[i:i + 1]).item() for i in range(len(x))])
    pred, truth = torch.sigmoid(logits) >= threshold, y.bool()
    tp, fp = (pred & truth).sum().item(), (pred & ~truth).sum().item()
    fn = (~pred & truth).sum().item()
    return loss, tp / (tp + fp + fn), torch.sigmoid(logits)


def test_validation_matches_a_direct_computation_on_the_same_weights(session):
    s, arrays = session
    model = s.trainer.eval_model
    # a threshold that marks ~5 % of the pixels, so the IoU compared is not a trivial 0
    _, _, probs = _reference(model, arrays, s.params, 0.5)
    threshold = float(torch.quantile(probs.flatten(), 0.95))
    params = dataclasses.replace(s.params, threshold=threshold)
    loss, iou, _ = _reference(model, arrays, params, threshold)
    val = validate(model, s.valid_batches, s.trainer.loss_fn, params, s.device,
                   s.trainer.precision)
    assert 0 < iou < 1
    assert val["val_loss"] == pytest.approx(loss, rel=1e-5)
    assert val["val_iou"] == pytest.approx(iou, abs=1e-3)


def test_validation_loss_is_the_evaluation_loss_of_the_predictor(session):
    s, arrays = session
    val = validate(s.trainer.eval_model, s.valid_batches, s.trainer.loss_fn, s.params,
                   s.device, s.trainer.precision)
    scored = predict_split(LoadedModel([s.trainer.eval_model], s.params, s.device, 0,
                                       precision=s.trainer.precision), arrays, tta=False)
    assert val["val_loss"] == pytest.approx(scored.loss, rel=1e-6)


def test_training_and_inference_prepare_a_batch_alike(session):
    s, arrays = session
    images = torch.from_numpy(np.array(arrays.images[:4]))
    loaded = LoadedModel([s.trainer.eval_model], s.params, s.device, 0,
                         precision=s.trainer.precision)
    # the training step normalises [0, 1] floats (augmented); inference uint8
    x_train = s.trainer.forward_pass.prepare(images.float() / 255.0)
    x_infer = loaded.forward_pass.prepare(images)
    assert torch.equal(x_train, x_infer)
    assert x_infer.is_contiguous(memory_format=torch.channels_last) == s.params.channels_last
    s.trainer.eval_model.eval()
    with torch.no_grad():
        ours = s.trainer.forward_pass.logits(s.trainer.eval_model, x_train)
    assert torch.equal(ours, predict_logits(loaded, images))


def test_bf16_logits_come_back_in_fp32_and_the_loss_is_computed_in_fp32(session):
    s, arrays = session
    fp32 = validate(s.trainer.eval_model, s.valid_batches, s.trainer.loss_fn, s.params,
                    s.device, s.trainer.precision)
    bf16 = validate(s.trainer.eval_model, s.valid_batches, s.trainer.loss_fn, s.params,
                    s.device, BF16)
    assert bf16["val_loss"] != fp32["val_loss"]  # bf16 did run
    assert bf16["val_loss"] == pytest.approx(fp32["val_loss"], rel=0.05)
    loaded = LoadedModel([s.trainer.eval_model], s.params, s.device, 0, precision=BF16)
    images = torch.from_numpy(np.array(arrays.images[:2]))
    assert predict_logits(loaded, images).dtype == torch.float32


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    """Each test starts with no precision chosen yet in this process."""
    monkeypatch.setattr(device_module, "_CHOICES", {})


def test_the_native_bf16_flags_are_read_from_cpuinfo(tmp_path):
    sapphire, epyc = tmp_path / "sapphire", tmp_path / "epyc"
    sapphire.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 "
                        "amx_tile\n\nprocessor\t: 1\nflags\t\t: fpu avx2 avx512_bf16 amx_bf16\n")
    epyc.write_text("processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2 fma\n")
    assert cpu_bf16_flags(sapphire) == ("amx_bf16", "avx512_bf16")
    assert cpu_bf16_flags(epyc) == ()
    assert cpu_bf16_flags(tmp_path / "absent") == ()
    epyc.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2\n")
    assert cpu_info(epyc) == {"model": "AMD EPYC 7B13", "flags": ["fpu", "avx2"]}


def _probe(timings):
    calls = []

    def probe():
        calls.append(1)
        return timings

    return probe, calls


FAST_BF16, SLOW_BF16 = {"fp32": 1.0, "bf16": 0.6}, {"fp32": 1.0, "bf16": 1.4}


@pytest.mark.parametrize(("amp", "kind", "flags", "timings", "chosen", "probed"), [
    ("auto", "cpu", (), FAST_BF16, "fp32", False),  # emulated bf16: not even timed
    ("auto", "cpu", ("amx_bf16",), FAST_BF16, "bf16", True),
    ("auto", "cpu", ("avx512_bf16",), SLOW_BF16, "fp32", True),
    ("auto", "cpu", ("amx_bf16",), {"fp32": 1.0, "bf16": 0.97}, "fp32", True),  # within noise
    ("bf16", "cpu", (), SLOW_BF16, "bf16", False),  # forced
    ("none", "cpu", ("amx_bf16",), FAST_BF16, "fp32", False),
    ("fp16", "cpu", ("amx_bf16",), FAST_BF16, "fp32", False),  # fp16 autocast is CUDA's
    ("auto", "cuda", (), SLOW_BF16, "bf16", False),
    ("fp16", "cuda", (), SLOW_BF16, "fp16", False),
    ("none", "cuda", (), FAST_BF16, "fp32", False),
])
def test_the_precision_follows_amp_the_cpus_flags_and_the_probe(amp, kind, flags, timings,
                                                                chosen, probed):
    probe, calls = _probe(timings)
    precision = resolve_precision(Params(amp=amp), torch.device(kind), probe, flags)
    assert precision.name == chosen
    assert len(calls) == int(probed)
    record = precision.record()
    assert record["cpu_bf16_flags"] == (list(flags) if kind == "cpu" else [])
    assert record["probe_seconds_per_step"] == (timings if probed else None)
    if kind == "cpu" and amp == "auto" and not flags:
        assert "no native bf16" in record["reason"]


def test_a_probed_choice_is_made_once_per_process_and_network():
    probe, calls = _probe(FAST_BF16)
    first = resolve_precision(Params(), torch.device("cpu"), probe, ("amx_bf16",))
    again = resolve_precision(Params(), torch.device("cpu"), probe, ("amx_bf16",))
    unprobed = resolve_precision(Params(), torch.device("cpu"), None, ("amx_bf16",))
    assert first is again is unprobed and first.name == "bf16" and len(calls) == 1
    other = resolve_precision(Params(encoder="resnet18"), torch.device("cpu"), probe,
                              ("amx_bf16",))
    assert other.name == "bf16" and len(calls) == 2


def test_the_probe_warms_up_alternates_and_keeps_each_precisions_best_step():
    now, order = [0.0], []
    costs = {None: [9.0, 3.0, 2.5], torch.bfloat16: [9.0, 1.0, 1.5]}  # warm-up first

    def step(dtype):
        order.append(dtype)
        now[0] += costs[dtype].pop(0)

    best = time_precisions(step, steps=2, clock=lambda: now[0])
    assert best == {"fp32": 2.5, "bf16": 1.0}
    assert order == [None, torch.bfloat16] * 3


def test_the_probes_time_the_real_network_and_change_nothing(session):
    s, _ = session
    model = s.trainer.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [w.grad.clone() for w in model.parameters()]  # the last training step's
    rng = torch.get_rng_state()
    seconds = training_probe(model, s.params, s.device, s.trainer.loss_fn)()
    seconds_infer = predictor_module.inference_probe(model.eval(), s.params, s.device)()
    assert set(seconds) == set(seconds_infer) == {"fp32", "bf16"}
    assert min(*seconds.values(), *seconds_infer.values()) > 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(w.grad, g) for w, g in zip(model.parameters(), grads, strict=True))


@pytest.mark.parametrize(("flags", "chosen"), [(("amx_bf16",), "bf16"), ((), "fp32")])
def test_a_run_records_its_precision_and_inference_in_the_process_agrees(
        tmp_path, synthetic_root, monkeypatch, capsys, flags, chosen):
    timed = []

    def fake_timing(step):  # the probe's step is real; its clock is not (no timed tests)
        timed.append(step)
        return {"fp32": 2.0, "bf16": 1.0}

    monkeypatch.setattr(device_module, "cpu_bf16_flags", lambda: flags)
    monkeypatch.setattr(trainer_module, "time_precisions", fake_timing)
    params = tiny_params(tmp_path, synthetic_root, run_id="amp", epochs=1, amp="auto")
    run = train(params, progress=False).run_dir
    env, summary = (json.loads((run / name).read_text()) for name in ("env.json", "train.json"))
    assert env["precision"]["name"] == summary["precision"]["name"] == chosen
    assert env["precision"]["cpu_bf16_flags"] == list(flags)
    real = cpu_info()  # the CPU beside every speed figure of the run
    assert env["cpu"] == {"model": real["model"], "speed_flags": [
        f for f in CPU_SPEED_FLAGS if f in real["flags"]]}
    assert env["autocast"] == ("torch.bfloat16" if flags else "fp32")
    assert env["precision"]["probe_seconds_per_step"] == (
        {"fp32": 2.0, "bf16": 1.0} if flags else None)
    assert len(timed) == len(flags)  # no native bf16: nothing timed
    if not flags:  # the run's output (and so its report) says why it stayed in fp32
        assert "precision: fp32: no native bf16 on this CPU" in capsys.readouterr().out
    assert load_model(run, "cpu").forward_pass.precision.name == chosen


def test_bf16_masks_of_the_shipped_model_agree_with_fp32(real_root, tmp_path):
    loaded = load_model(ROOT / "models" / "reference", "cpu", "torch")
    arrays = load_split_arrays(real_root, "valid", loaded.params.image_size,
                               os.environ.get("BRAINSEG_CACHE") or tmp_path / "cache")
    images = torch.from_numpy(np.array(arrays.images[:8]))
    fp32 = dataclasses.replace(loaded, precision=Precision(None, "fp32 (test)"))
    bf16 = dataclasses.replace(loaded, precision=BF16)
    masks = [predict_logits(m, images) >= 0 for m in (fp32, bf16)]
    assert masks[0].float().mean() > 0.001  # tumour is predicted on these images
    assert (masks[0] == masks[1]).float().mean().item() >= 0.999


@pytest.mark.parametrize(("device", "flags", "onnx", "engine"), [
    ("cpu", (), True, "onnxruntime"),  # no native bf16: the verified fp32 graph
    ("cpu", (), False, "torch"),  # no verified model.onnx: never an unverified engine
    ("cpu", ("amx_bf16",), True, "torch"),  # native bf16: torch (bf16 where it pays)
    ("cuda", (), True, "torch"),
])
def test_backend_auto_picks_by_the_kind_of_processor(monkeypatch, device, flags, onnx, engine):
    folder = ROOT / "models" / "reference"
    monkeypatch.setattr(predictor_module, "cpu_bf16_flags", lambda: flags)
    monkeypatch.setattr(predictor_module, "verified_onnx",
                        lambda where, int8=False: [where / "model.onnx"] if onnx else [])
    assert predictor_module.resolve_backend(folder, device, "auto") == engine
    assert predictor_module.resolve_backend(folder, device, "torch") == "torch"
