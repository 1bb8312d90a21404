"""The forward pass written once: the training step, validation and inference prepare a
batch alike, validation scores exactly what the predictor computes, and the precision is
resolved in one place (native-bf16 flags, a timed probe) and recorded with the run."""

import dataclasses

import numpy as np
import pytest
import torch

from brainseg_lib.evaluation.predictions import predict_split
from brainseg_lib.inference.predictor import LoadedModel, predict_logits
from brainseg_lib.model.device import Precision
from brainseg_lib.training.distributed import DistContext
from brainseg_lib.training.loop import _Session, load_training_data
from brainseg_lib.training.trainer import validate
from conftest import tiny_params

BF16 = Precision(torch.bfloat16, "bf16 (test)")


@pytest.fixture(scope="module")
def session(tmp_path_factory, synthetic_root):
    """A run after one epoch of training on the synthetic set: weights that are not the
    initial ones, its validation batches, and the validation arrays."""
    tmp = tmp_path_factory.mktemp("forward")
    params = tiny_params(tmp, synthetic_root, run_id="fwd", epochs=1, augment=False)
    session = _Session.open(params, DistContext(), {})
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
