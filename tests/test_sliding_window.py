"""Tests for :mod:`multicure_monai.sliding_window`."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from monai.inferers import SlidingWindowInferer
from monai.inferers.utils import _get_scan_interval

from multicure_monai.sliding_window import StridedSlidingWindowInferer, stride_to_overlap

_rng = random.Random(0)
_RANDOM_PAIRS = []
for _ in range(20):
    _roi = tuple(_rng.randint(1, 160) for _ in range(3))
    _RANDOM_PAIRS.append((_roi, tuple(_rng.randint(1, r) for r in _roi)))

PAIRS = [
    ((112, 112, 80), (18, 18, 4)),  # LA, paper section 3
    ((96, 96, 96), (16, 16, 16)),  # Pancreas, paper section 3
    ((56, 56, 40), (9, 9, 2)),
    ((8, 8, 8), (8, 8, 8)),  # stride == roi: no overlap
    ((7, 5, 3), (1, 1, 1)),  # densest possible
    *_RANDOM_PAIRS,
]


@pytest.mark.parametrize("roi, stride", PAIRS)
def test_scan_interval_equals_stride(roi: tuple[int, ...], stride: tuple[int, ...]) -> None:
    overlap = stride_to_overlap(roi, stride)
    assert len(overlap) == len(roi)
    assert all(0.0 <= o < 1.0 for o in overlap)  # MONAI's admissible range
    image = tuple(r + 37 for r in roi)  # strictly larger than the roi on every axis
    assert _get_scan_interval(image, roi, len(roi), overlap) == stride


@pytest.mark.parametrize("roi", [1, 2, 3, 17, 80, 112, 255])
def test_every_stride_round_trips(roi: int) -> None:
    for step in range(1, roi + 1):
        (overlap,) = stride_to_overlap(roi, step)
        assert _get_scan_interval((roi + 1,), (roi,), 1, (overlap,)) == (step,)


@pytest.mark.parametrize(
    "roi, stride",
    [((8, 8), (0, 2)), ((8, 8), (9, 2)), ((8, 8), (2, 2, 2)), ((8, 0), (2, 1)), ((8, 8), (2.5, 2))],
)
def test_invalid_stride_raises(roi: tuple, stride: tuple) -> None:
    with pytest.raises(ValueError):
        stride_to_overlap(roi, stride)


def test_overlap_argument_is_rejected() -> None:
    with pytest.raises(ValueError, match="overlap"):
        StridedSlidingWindowInferer((8, 8, 8), (4, 4, 4), overlap=0.5)


@pytest.mark.parametrize("roi, stride, expected", [(96, 16, (16,)), ((8, 6, 4), 2, (2, 2, 2)), (8, (4, 2), (4, 2))])
def test_scalar_broadcast(roi, stride, expected: tuple[int, ...]) -> None:
    inferer = StridedSlidingWindowInferer(roi, stride)
    assert inferer.stride == expected


class _RecordingNet(torch.nn.Module):
    """A tiny conv net that records the spatial origin of every window it is called on.

    Channel 0 of the input holds the flat voxel index ``x * (W * D) + y * D + z`` so the top-left-front voxel of
    a patch identifies where MONAI cut it from.
    """

    def __init__(self, image_shape: tuple[int, int, int]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(2, 3, kernel_size=3, padding=1)
        self.image_shape = image_shape
        self.origins: list[tuple[int, int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, w, d = self.image_shape
        for flat in x[:, 0, 0, 0, 0].round().long().tolist():
            self.origins.append((flat // (w * d), (flat // d) % w, flat % d))
        return self.conv(x)


def _coded_image(shape: tuple[int, int, int]) -> torch.Tensor:
    """(1, 2, H, W, D) image: channel 0 = flat voxel index, channel 1 = random noise."""
    torch.manual_seed(1)
    flat = torch.arange(int(torch.tensor(shape).prod()), dtype=torch.float32).reshape(shape)
    return torch.stack([flat, torch.randn(shape)])[None]


@pytest.mark.parametrize(
    "image_shape, roi, stride, mode, sw_batch_size",
    [
        ((14, 12, 9), (8, 8, 6), (3, 3, 2), "constant", 1),
        ((14, 12, 9), (8, 8, 6), (3, 3, 2), "gaussian", 4),
        ((16, 16, 16), (8, 8, 8), (4, 4, 4), "constant", 3),  # (image - roi) divisible by the stride
        ((10, 9, 8), (10, 5, 8), (4, 2, 3), "constant", 2),  # axes where image == roi: one window there
        ((13, 11, 7), (7, 5, 3), (7, 5, 3), "constant", 1),  # stride == roi: no overlap
    ],
)
def test_matches_monai_and_visits_stride_positions(
    image_shape: tuple[int, int, int],
    roi: tuple[int, int, int],
    stride: tuple[int, int, int],
    mode: str,
    sw_batch_size: int,
) -> None:
    image = _coded_image(image_shape)
    net = _RecordingNet(image_shape)
    inferer = StridedSlidingWindowInferer(roi, stride, sw_batch_size=sw_batch_size, mode=mode)
    assert inferer.stride == stride
    with torch.no_grad():
        out = inferer(image, net)
    origins = list(net.origins)

    # windows start at 0, s, 2s, ... and the last one ends at the image border (exactly once each)
    per_axis = [sorted(set(range(0, n - r, s)) | {n - r}) for n, r, s in zip(image_shape, roi, stride)]
    expected = set(itertools.product(*per_axis))
    assert len(origins) == len(expected)
    assert set(origins) == expected
    assert len(origins) == math.prod(math.ceil((n - r) / s) + 1 for n, r, s in zip(image_shape, roi, stride))

    overlap = stride_to_overlap(roi, stride)
    reference = SlidingWindowInferer(roi, sw_batch_size=sw_batch_size, overlap=overlap, mode=mode)
    net.origins.clear()
    with torch.no_grad():
        ref = reference(image, net)
    assert out.shape == (1, 3, *image_shape)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert net.origins == origins  # same windows, same order


@pytest.mark.parametrize(
    "amp, amp_dtype, has_bf16, expected",
    [
        (False, "auto", True, torch.float32),
        (True, "auto", True, torch.bfloat16),
        (True, "bfloat16", False, torch.float32),  # a CPU without bf16: float32, and the log says so
        (True, "float32", True, torch.float32),
    ],
)
def test_amp_autocasts_the_windows_and_returns_float32(monkeypatch, caplog, amp, amp_dtype, has_bf16, expected):
    from multicure_monai import precision

    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: has_bf16)
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(1, 2, 3, padding=1)
    seen = set()
    conv.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
    image = torch.randn(1, 1, 20, 18, 12)
    kwargs = dict(roi_size=(8, 8, 8), stride=(4, 4, 4), sw_batch_size=3)
    with caplog.at_level("INFO", logger="multicure_monai.precision"):
        inferer = StridedSlidingWindowInferer(amp=amp, amp_dtype=amp_dtype, **kwargs)
        with torch.no_grad():
            out = inferer(image, conv)
            inferer(image, conv)  # logged once per device
            amp_dtypes = set(seen)
            ref = StridedSlidingWindowInferer(**kwargs)(image, conv)
    assert amp_dtypes == {expected}
    assert out.dtype == torch.float32
    exact = expected == torch.float32
    torch.testing.assert_close(out, ref, atol=0 if exact else 0.05, rtol=0 if exact else 0.02)
    messages = [r.getMessage() for r in caplog.records if r.name == "multicure_monai.precision"]
    assert len(messages) == (1 if amp else 0)
    if amp:
        assert str(expected).removeprefix("torch.") in messages[0]


def test_bad_amp_dtype_fails_at_construction():
    with pytest.raises(ValueError, match="amp_dtype"):
        StridedSlidingWindowInferer(roi_size=8, stride=4, amp=True, amp_dtype="half")
