"""The loss factory: every name builds, compound losses are the sum of their parts, and a
confident correct prediction scores lower than a confident wrong one."""

import typing

import pytest
import segmentation_models_pytorch as smp
import torch

from brainseg_lib.config import Params
from brainseg_lib.training.losses import LOSSES, build_loss


def _box_target() -> torch.Tensor:
    y = torch.zeros(2, 1, 16, 16)
    y[:, :, 4:9, 5:12] = 1
    return y


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_prefers_the_right_answer(name):
    y = _box_target()
    loss = build_loss(name)
    right, wrong = loss(8 * (2 * y - 1), y), loss(-8 * (2 * y - 1), y)
    assert torch.isfinite(right) and right < wrong


def test_focal_dice_is_focal_plus_dice():
    y = _box_target()
    logits = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    focal = smp.losses.FocalLoss(smp.losses.BINARY_MODE)(logits, y)
    dice = smp.losses.DiceLoss(smp.losses.BINARY_MODE, from_logits=True)(logits, y)
    assert build_loss("focal_dice")(logits, y).item() == pytest.approx((focal + dice).item())


def test_the_params_offer_exactly_the_losses_the_factory_builds():
    offered = typing.get_args(typing.get_type_hints(Params)["loss"])
    assert set(LOSSES) == set(offered)


def test_an_unknown_loss_names_the_choices():
    with pytest.raises(ValueError, match="focal_dice"):
        build_loss("hinge")
