"""The peers' one-window test loop of benchmarks/inference.py covers the volume and averages the windows."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("inference_benchmark", ROOT / "benchmarks" / "inference.py")
inference_benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(inference_benchmark)


@pytest.mark.parametrize(
    "shape, roi, stride", [((20, 18, 16), (16, 16, 16), (4, 2, 16)), ((9, 9, 9), (4, 5, 3), (3, 3, 2))]
)
def test_pointwise_net_gives_its_own_probabilities(shape, roi, stride) -> None:
    """A 1x1x1 net gives every window the same values at a voxel, so the average is the whole-volume softmax."""
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 3, 1)
    image = torch.randn(1, 1, *shape)
    probs = inference_benchmark.one_window_loop(image, net, roi, stride)
    expected = torch.softmax(net(image), dim=1)[0].detach().numpy()
    assert probs.shape == (3, *shape)
    assert abs(probs - expected).max() < 1e-5
