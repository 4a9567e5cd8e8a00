"""Tests for multicure_monai/uncertainty.py."""

from __future__ import annotations

import math

import pytest
import torch

from multicure_monai.uncertainty import confidence, entropy, predicted_labels, uncertainty_map

# Two classes, four voxels: foreground prob 0.1, 0.4, 0.5, 0.8 -> confidences 0.9, 0.6, 0.5, 0.8.
_FG = torch.tensor([0.1, 0.4, 0.5, 0.8])
TOY = torch.stack([1 - _FG, _FG]).reshape(1, 2, 4, 1, 1)


def test_confidence_known_values() -> None:
    conf = confidence(TOY)
    assert conf.shape == (1, 1, 4, 1, 1)
    torch.testing.assert_close(conf.flatten(), torch.tensor([0.9, 0.6, 0.5, 0.8]))


@pytest.mark.parametrize(
    "threshold, expected",
    [(0.7, [0.0, 1.0, 1.0, 0.0]), (0.55, [0.0, 0.0, 1.0, 0.0]), (0.85, [0.0, 1.0, 1.0, 1.0]), (0.5, [0.0] * 4)],
)
def test_uncertainty_map_known_values(threshold: float, expected: list[float]) -> None:
    umap = uncertainty_map(TOY, threshold)
    assert umap.shape == (1, 1, 4, 1, 1)
    assert umap.dtype == TOY.dtype
    torch.testing.assert_close(umap.flatten(), torch.tensor(expected))


@pytest.mark.parametrize("shape", [(2, 3, 5, 6), (2, 2, 4, 5, 6)])
@pytest.mark.parametrize("threshold", [0.3, 0.7, 0.95])
def test_uncertainty_map_is_thresholded_confidence(shape: tuple[int, ...], threshold: float) -> None:
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(shape) * 2, dim=1)
    umap = uncertainty_map(probs, threshold)
    assert umap.shape == (shape[0], 1, *shape[2:])
    assert set(umap.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(umap.bool(), confidence(probs) < threshold)
    assert not umap.requires_grad


@pytest.mark.parametrize("threshold", [0.0, 1.0, -0.1, 1.5])
def test_uncertainty_map_rejects_threshold(threshold: float) -> None:
    with pytest.raises(ValueError, match="threshold"):
        uncertainty_map(TOY, threshold)


@pytest.mark.parametrize("fn", [confidence, uncertainty_map, entropy])
def test_single_channel_rejected(fn) -> None:
    with pytest.raises(ValueError, match="channels"):
        fn(torch.rand(1, 1, 4, 4))


@pytest.mark.parametrize("num_classes", [2, 3, 5])
def test_entropy_extremes(num_classes: int) -> None:
    uniform = torch.full((1, num_classes, 3, 3), 1.0 / num_classes)
    torch.testing.assert_close(entropy(uniform), torch.full((1, 1, 3, 3), math.log(num_classes)))
    torch.testing.assert_close(entropy(uniform, normalize=True), torch.ones(1, 1, 3, 3))
    onehot = torch.zeros(1, num_classes, 3, 3)
    onehot[:, 1] = 1.0
    torch.testing.assert_close(entropy(onehot), torch.zeros(1, 1, 3, 3))


def test_entropy_known_value_and_bounds() -> None:
    ent = entropy(TOY).flatten()
    expected = torch.tensor([-(p * math.log(p) + (1 - p) * math.log(1 - p)) for p in _FG.tolist()])
    torch.testing.assert_close(ent, expected)
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(2, 4, 6, 6, 6) * 3, dim=1)
    normed = entropy(probs, normalize=True)
    assert normed.shape == (2, 1, 6, 6, 6)
    assert bool((normed >= 0).all()) and bool((normed <= 1 + 1e-6).all())


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last_3d])
@pytest.mark.parametrize("keepdim", [True, False])
def test_predicted_labels_is_argmax_with_first_maximum_on_ties(fmt: torch.memory_format, keepdim: bool) -> None:
    scores = torch.randn(2, 3, 4, 5, 6, generator=torch.Generator().manual_seed(0))
    scores[0, :, 0, 0, 0] = torch.tensor([0.5, 0.5, 0.1])
    scores[1, :, 1, 1, 1] = torch.tensor([0.1, 0.7, 0.7])
    got = predicted_labels(scores.contiguous(memory_format=fmt), keepdim=keepdim)
    assert torch.equal(got, scores.argmax(dim=1, keepdim=keepdim))
    assert got.flatten()[0] == 0
