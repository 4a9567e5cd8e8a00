"""The losses keep no state between calls (as MONAI's): logging values come back with ``return_stats=True``."""

from __future__ import annotations

import copy

import pytest
import torch

from multicure_monai.losses import PrototypeContrastiveLoss, PseudoLabelLoss, XORRegularizationLoss


def _calls():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(2, 2, 6, 6, 6), 1)
    labels = torch.randint(0, 2, (2, 1, 6, 6, 6))
    reliable = torch.rand(2, 1, 6, 6, 6) > 0.3
    return [
        (PseudoLabelLoss(0.6), (torch.randn(2, 2, 6, 6, 6), probs)),
        (PrototypeContrastiveLoss(num_classes=2), ([torch.randn(2, 4, 6, 6, 6)], labels, reliable, ~reliable)),
        (XORRegularizationLoss(), (torch.softmax(torch.randn(2, 2, 6, 6, 6), 1), probs)),
    ]


@pytest.mark.parametrize("index", range(3), ids=["pseudo_label", "contrastive", "xor"])
def test_a_call_leaves_the_loss_unchanged(index: int) -> None:
    loss_fn, args = _calls()[index]
    before = copy.deepcopy({k: v for k, v in vars(loss_fn).items() if not k.startswith("_")})
    loss_fn(*args)
    after = {k: v for k, v in vars(loss_fn).items() if not k.startswith("_")}
    assert after == before


@pytest.mark.parametrize("index", range(2), ids=["pseudo_label", "contrastive"])
def test_stats_come_with_the_same_loss(index: int) -> None:
    loss_fn, args = _calls()[index]
    torch.manual_seed(1)  # the contrastive loss subsamples voxels
    plain = loss_fn(*args)
    torch.manual_seed(1)
    loss, stats = loss_fn(*args, return_stats=True)
    torch.testing.assert_close(loss, plain)
    assert isinstance(stats, dict) and stats
