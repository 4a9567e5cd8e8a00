"""Tests for multicure_monai/losses/pseudo_label.py."""

from __future__ import annotations

import math

import pytest
import torch
from monai.losses import DiceCELoss, DiceLoss

from multicure_monai.losses.pseudo_label import PseudoLabelLoss

LN3 = math.log(3.0)
# Teacher foreground probs: confidences 0.9, 0.8, 0.6, 0.5 -> only voxels 0 and 1 pass 0.7;
# pseudo-labels there: 1, 0.
_TFG = torch.tensor([0.9, 0.2, 0.6, 0.5])
TEACHER = torch.stack([1 - _TFG, _TFG]).reshape(1, 2, 4, 1, 1)
# Student: voxel 0 -> p = (0.25, 0.75), voxel 1 -> p = (0.75, 0.25); voxels 2, 3 arbitrary.
LOGITS = torch.tensor([[0.0, LN3, 5.0, -2.0], [LN3, 0.0, -1.0, 3.0]]).reshape(1, 2, 4, 1, 1)
# CE = mean(-log 0.75, -log 0.75); Dice per channel: 1 - 2*0.75 / (1 + 1) = 0.25 (both channels)
CE_HAND = -math.log(0.75)
DICE_HAND = 0.25


@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("lambda_ce, lambda_dice", [(1.0, 1.0), (1.0, 0.0), (0.0, 1.0), (0.5, 2.0)])
def test_hand_computed(lambda_ce: float, lambda_dice: float, include_background: bool) -> None:
    loss_fn = PseudoLabelLoss(0.7, lambda_ce, lambda_dice, include_background)
    loss, stats = loss_fn(LOGITS, TEACHER, return_stats=True)
    assert float(loss) == pytest.approx(lambda_ce * CE_HAND + lambda_dice * DICE_HAND, abs=1e-5)
    assert stats == {"mask_fraction": pytest.approx(0.5)}


def test_unmasked_voxels_ignored() -> None:
    loss_fn = PseudoLabelLoss(0.7)
    logits = LOGITS.clone().requires_grad_(True)
    loss = loss_fn(logits, TEACHER)
    loss.backward()
    per_voxel = logits.grad.abs().sum(dim=1).flatten()
    assert bool((per_voxel[:2] > 0).all())
    assert bool((per_voxel[2:] == 0).all())
    changed = LOGITS.clone()
    changed[..., 2:, :, :] = torch.randn(1, 2, 2, 1, 1) * 10
    assert float(loss_fn(changed, TEACHER)) == pytest.approx(float(loss.detach()), abs=1e-7)


def test_threshold_is_strict() -> None:
    teacher = torch.stack([torch.full((4,), 0.3), torch.full((4,), 0.7)]).reshape(1, 2, 4, 1, 1)
    loss_fn = PseudoLabelLoss(0.7)
    logits = torch.randn(1, 2, 4, 1, 1, requires_grad=True)
    loss, stats = loss_fn(logits, teacher, return_stats=True)
    assert float(loss.detach()) == 0.0 and stats["mask_fraction"] == 0.0


def test_no_gradient_to_teacher() -> None:
    torch.manual_seed(0)
    teacher_logits = torch.randn(2, 2, 4, 4, 4, requires_grad=True) * 3
    teacher_logits.retain_grad()
    student = torch.randn(2, 2, 4, 4, 4, requires_grad=True)
    loss = PseudoLabelLoss(0.6)(student, torch.softmax(teacher_logits, dim=1))
    loss.backward()
    assert student.grad is not None and float(student.grad.abs().sum()) > 0
    assert teacher_logits.grad is None


@pytest.mark.parametrize("shape", [(2, 2, 4, 4, 4), (1, 3, 5, 5)])
def test_empty_mask_is_graph_connected_zero(shape: tuple[int, ...]) -> None:
    num_classes = shape[1]
    teacher = torch.full(shape, 1.0 / num_classes)
    logits = torch.randn(shape, requires_grad=True)
    loss_fn = PseudoLabelLoss(0.7)
    loss, stats = loss_fn(logits, teacher, return_stats=True)
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()
    assert float(logits.grad.abs().sum()) == 0.0
    assert stats["mask_fraction"] == 0.0


@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("shape", [(2, 2, 6, 6, 6), (2, 3, 8, 8)])
def test_full_mask_equals_monai_dicece(include_background: bool, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    logits = torch.randn(shape)
    teacher = torch.softmax(torch.randn(shape) * 3, dim=1)
    pseudo = teacher.argmax(dim=1, keepdim=True)
    ours = PseudoLabelLoss(0.0, include_background=include_background)(logits, teacher)
    ref = DiceCELoss(to_onehot_y=True, softmax=True, include_background=include_background)(logits, pseudo)
    torch.testing.assert_close(ours, ref)


def test_mask_fraction() -> None:
    torch.manual_seed(0)
    teacher = torch.softmax(torch.randn(2, 2, 6, 6, 6) * 2, dim=1)
    loss_fn = PseudoLabelLoss(0.8)
    _, stats = loss_fn(torch.randn(2, 2, 6, 6, 6), teacher, return_stats=True)
    assert stats["mask_fraction"] == pytest.approx(float((teacher.amax(1) > 0.8).float().mean()))


def test_validation() -> None:
    with pytest.raises(ValueError, match="confidence_threshold"):
        PseudoLabelLoss(1.0)
    with pytest.raises(ValueError, match="same shape"):
        PseudoLabelLoss()(torch.randn(1, 2, 4, 4), torch.rand(1, 3, 4, 4))


@pytest.mark.parametrize("include_background", [True, False])
def test_empty_pseudo_label_class_left_out_of_dice(include_background: bool) -> None:
    """A confident all-background teacher: the foreground Dice term (~1 for any non-zero p_fg) is dropped."""
    torch.manual_seed(1)
    teacher = torch.stack([torch.full((2, 6, 6, 6), 0.95), torch.full((2, 6, 6, 6), 0.05)], dim=1)
    teacher[1, :, :2] = torch.tensor([0.1, 0.9]).view(2, 1, 1, 1)  # sample 1 has confident foreground
    logits = torch.randn(2, 2, 6, 6, 6)
    ce = torch.nn.functional.cross_entropy(logits, teacher.argmax(1))
    per_pair = DiceLoss(to_onehot_y=True, softmax=True, include_background=include_background, reduction="none")(
        logits, teacher.argmax(1, keepdim=True)
    ).reshape(2, -1)
    present = torch.tensor([[True, False], [True, True]])[:, 0 if include_background else 1 :]
    expected = ce + per_pair[present].mean()
    ours = PseudoLabelLoss(0.7, include_background=include_background)(logits, teacher)
    torch.testing.assert_close(ours, expected)
    legacy = PseudoLabelLoss(0.7, include_background=include_background, ignore_empty=False)(logits, teacher)
    torch.testing.assert_close(legacy, ce + per_pair.mean())
    assert float(legacy) > float(ours)  # the empty pair adds ~1 to the legacy mean

