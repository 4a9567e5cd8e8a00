"""Tests for multicure_monai/losses/xor_regularization.py."""

from __future__ import annotations

import pytest
import torch

from multicure_monai.losses.xor_regularization import XORRegularizationLoss

#: the paper's reading (the tests below were written for it; the defaults are the bundle's)
PAPER = {"normalization": "xor", "confidence_threshold": None}


def _binary(fg: list[float]) -> torch.Tensor:
    """(1, 2, 4, 1, 1) probabilities from foreground probabilities of four voxels."""
    p = torch.tensor(fg)
    return torch.stack([1 - p, p]).reshape(1, 2, len(fg), 1, 1)


# argmax a = [1, 0, 1, 0], argmax b = [1, 1, 0, 0] -> voxels 1 and 2 disagree.
# d_1 = |0.8-0.3| + |0.2-0.7| = 1.0 ; d_2 = |0.4-0.6| + |0.6-0.4| = 0.4
A = _binary([0.9, 0.2, 0.6, 0.3])
B = _binary([0.8, 0.7, 0.4, 0.1])


@pytest.mark.parametrize("reduction, expected", [("mean", 0.7), ("sum", 1.4)])
def test_hand_computed(reduction: str, expected: float) -> None:
    loss = XORRegularizationLoss(reduction, **PAPER)(A, B)
    assert loss.shape == ()
    assert float(loss) == pytest.approx(expected, abs=1e-6)


def test_none_reduction_map() -> None:
    out = XORRegularizationLoss("none", **PAPER)(A, B)
    assert out.shape == (1, 1, 4, 1, 1)
    torch.testing.assert_close(out.flatten(), torch.tensor([0.0, 1.0, 0.4, 0.0]))


def test_three_class_hand_computed() -> None:
    a = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]).t().reshape(1, 3, 2, 1)  # argmax [0, 2]
    b = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]]).t().reshape(1, 3, 2, 1)  # argmax [0, 1]
    # only voxel 1 disagrees: |0.1-0.2| + |0.3-0.5| + |0.6-0.3| = 0.6
    assert float(XORRegularizationLoss(**PAPER)(a, b)) == pytest.approx(0.6, abs=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shape", [(2, 2, 6, 6), (2, 3, 4, 4, 4)])
def test_zero_and_graph_connected_when_nets_agree(reduction: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    logits = torch.randn(shape, requires_grad=True)
    a = torch.softmax(logits, dim=1)
    b = torch.softmax(logits.detach() * 2.0, dim=1)  # same argmax, different probabilities
    loss = XORRegularizationLoss(reduction, **PAPER)(a, b)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_mask_is_xor_of_foregrounds(seed: int) -> None:
    torch.manual_seed(seed)
    a = torch.softmax(torch.randn(2, 2, 5, 5, 5), dim=1)
    b = torch.softmax(torch.randn(2, 2, 5, 5, 5), dim=1)
    xor = (a[:, 1:] > 0.5) ^ (b[:, 1:] > 0.5)
    expected = 2.0 * (a[:, 1:] - b[:, 1:]).abs() * xor
    torch.testing.assert_close(XORRegularizationLoss("none", **PAPER)(a, b), expected)
    torch.testing.assert_close(XORRegularizationLoss(**PAPER)(a, b), expected.sum() / xor.sum())


def test_gradient_reaches_both_inputs_only_on_disagreement() -> None:
    a = A.clone().requires_grad_(True)
    b = B.clone().requires_grad_(True)
    XORRegularizationLoss(**PAPER)(a, b).backward()
    disagree = torch.tensor([False, True, True, False])
    for g in (a.grad, b.grad):
        per_voxel = g.abs().sum(dim=1).flatten()
        assert bool((per_voxel[disagree] > 0).all())
        assert bool((per_voxel[~disagree] == 0).all())
    torch.testing.assert_close(a.grad, -b.grad)  # d|a-b|/da = -d|a-b|/db


def test_validation() -> None:
    with pytest.raises(ValueError, match="reduction"):
        XORRegularizationLoss("max")
    with pytest.raises(ValueError, match="same shape"):
        XORRegularizationLoss(**PAPER)(torch.rand(1, 2, 4, 4), torch.rand(1, 2, 4, 5))


@pytest.mark.parametrize(
    "normalization, threshold, expected",
    [
        ("xor", None, 0.7),  # the paper: (1.0 + 0.4) / 2 disagreeing voxels
        ("voxels", None, 0.35),  # (1.0 + 0.4) / 4 voxels
        ("xor", 0.65, 1.0),  # teacher B's confidences are [0.8, 0.7, 0.6, 0.9]: voxel 2 drops out
        ("voxels", 0.65, 1.0 / 3),  # ... and 3 confident voxels are the denominator
    ],
)
def test_normalization_and_confidence_mask(normalization: str, threshold: float | None, expected: float) -> None:
    loss = XORRegularizationLoss(normalization=normalization, confidence_threshold=threshold)(A, B)
    assert float(loss) == pytest.approx(expected, abs=1e-6)


def _crop(xor_fraction: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 32x32x24 crop with a 19 % foreground ball, student logits, teacher probabilities disagreeing on
    ``xor_fraction`` of the voxels (a trained pair: confident, mostly right)."""
    g = torch.Generator().manual_seed(0)
    zz, yy, xx = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in (32, 32, 24)), indexing="ij")
    r = ((zz - 15.5) ** 2 + (yy - 15.5) ** 2 + (xx - 11.5) ** 2).sqrt()
    label = (r < 10.55).long()  # ~19 % of the voxels
    margin = (r - 10.55).abs()
    flip = torch.rand(label.shape, generator=g) < xor_fraction
    sign = (2 * label - 1).float()
    student = torch.stack([-sign, sign]) * (1.0 + margin)  # (2, H, W, D) logits, confident away from the edge
    teacher_sign = torch.where(flip, -sign, sign)
    teacher = torch.softmax(torch.stack([-teacher_sign, teacher_sign]) * 2.0, dim=0)
    return student[None].requires_grad_(True), teacher[None], label[None, None]


@pytest.mark.parametrize("xor_fraction", [0.005, 0.027])
def test_gradient_against_the_supervised_loss(xor_fraction: float) -> None:
    """The paper's XOR mean outgrows one net's L_s as the nets agree; the voxel-normalised, confidence-masked
    form stays at the supervised loss's scale."""
    from monai.losses import DiceCELoss

    logits, teacher, label = _crop(xor_fraction)
    (g_sup,) = torch.autograd.grad(DiceCELoss(to_onehot_y=True, softmax=True)(logits, label), logits)
    ratios = {}
    for normalization in ("xor", "voxels"):
        reg = XORRegularizationLoss(normalization=normalization, confidence_threshold=0.7)
        (g_reg,) = torch.autograd.grad(reg(torch.softmax(logits, dim=1), teacher), logits)
        ratios[normalization] = float(g_reg.norm() / g_sup.norm())
    assert ratios["voxels"] < 1.0
    assert ratios["xor"] > 2.0
    assert ratios["xor"] / ratios["voxels"] == pytest.approx(1 / xor_fraction, rel=0.3)


def test_invalid_normalization_and_threshold() -> None:
    with pytest.raises(ValueError, match="normalization"):
        XORRegularizationLoss(normalization="batch")
    with pytest.raises(ValueError, match="confidence_threshold"):
        XORRegularizationLoss(confidence_threshold=1.0)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last_3d])
def test_memory_format_and_ties_do_not_change_the_loss(fmt: torch.memory_format) -> None:
    """Contiguous and channels-last inputs give the same loss; a tie counts as class 0, as ``torch.argmax``."""
    g = torch.Generator().manual_seed(0)
    a = torch.softmax(torch.randn(2, 3, 6, 5, 4, generator=g), dim=1)
    b = torch.softmax(torch.randn(2, 3, 6, 5, 4, generator=g) * 3, dim=1)
    a[0, :, 0, 0, 0] = torch.tensor([0.4, 0.4, 0.2])  # tie between classes 0 and 1
    loss = XORRegularizationLoss(reduction="none", confidence_threshold=None)
    expected = (a - b).abs().sum(1, keepdim=True) * (a.argmax(1, keepdim=True) != b.argmax(1, keepdim=True))
    out = loss(a.contiguous(memory_format=fmt), b.contiguous(memory_format=fmt))
    torch.testing.assert_close(out, expected)
    assert out[0, 0, 0, 0, 0] == (a[0, :, 0, 0, 0] - b[0, :, 0, 0, 0]).abs().sum() * (b[0, :, 0, 0, 0].argmax() != 0)
