"""Tests for :mod:`multicure_monai.metrics.surface_distance`."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from monai.data import MetaTensor
from monai.metrics import HausdorffDistanceMetric, SurfaceDistanceMetric

from multicure_monai.metrics import (
    EmptyAwareHausdorffDistanceMetric,
    EmptyAwareSurfaceDistanceMetric,
    grid_diagonal,
)

SHAPE = (12, 12, 12)


def _one_hot(fg: torch.Tensor) -> torch.Tensor:
    """(H, W, D) boolean foreground -> (2, H, W, D) float one-hot."""
    fg = fg.float()
    return torch.stack([1 - fg, fg])


def _box(lo: tuple[int, ...], hi: tuple[int, ...], shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    """(2, *shape) one-hot of the box ``[lo, hi)``; ``lo == hi`` gives an empty foreground."""
    fg = torch.zeros(shape, dtype=torch.bool)
    fg[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return _one_hot(fg)


def _shifted_cubes(size: int, k: int, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched (1, 2, *SHAPE) prediction and ground truth: the same cube shifted by ``k`` voxels along ``axis``."""
    lo, hi = [2, 2, 2], [2 + size] * 3
    gt = _box(tuple(lo), tuple(hi))
    lo[axis] += k
    hi[axis] += k
    return _box(tuple(lo), tuple(hi))[None], gt[None]


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.mark.parametrize("size, k, axis", [(4, 1, 0), (4, 3, 1), (3, 2, 2), (2, 5, 0), (5, 0, 1)])
def test_hausdorff_of_shifted_cubes_is_the_shift(size: int, k: int, axis: int) -> None:
    pred, gt = _shifted_cubes(size, k, axis)
    hd = _quiet(EmptyAwareHausdorffDistanceMetric(), pred, gt)
    assert hd.shape == (1, 1)
    assert hd.item() == pytest.approx(float(k))
    assert _quiet(EmptyAwareHausdorffDistanceMetric(), gt, pred).item() == pytest.approx(float(k))  # symmetric
    # non-empty masks: identical to MONAI
    for ours, theirs in [
        (EmptyAwareHausdorffDistanceMetric(percentile=95), HausdorffDistanceMetric(percentile=95)),
        (EmptyAwareSurfaceDistanceMetric(symmetric=True), SurfaceDistanceMetric(symmetric=True)),
    ]:
        torch.testing.assert_close(_quiet(ours, pred, gt), _quiet(theirs, pred, gt))


def test_known_values_on_a_bar_and_a_voxel() -> None:
    # ground truth: one voxel at p; prediction: the 1x1x3 bar p, p + e_x, p + 2 e_x (every voxel is boundary).
    # pred -> gt distances: 0, 1, 2; gt -> pred: 0.
    gt = _box((3, 3, 3), (4, 4, 4))[None]
    pred = _box((3, 3, 3), (6, 4, 4))[None]
    assert _quiet(EmptyAwareSurfaceDistanceMetric(symmetric=True), pred, gt).item() == pytest.approx(3 / 4)
    assert _quiet(EmptyAwareSurfaceDistanceMetric(symmetric=False), pred, gt).item() == pytest.approx(1.0)
    assert _quiet(EmptyAwareSurfaceDistanceMetric(symmetric=False), gt, pred).item() == pytest.approx(0.0)
    assert _quiet(EmptyAwareHausdorffDistanceMetric(), pred, gt).item() == pytest.approx(2.0)
    # 95th percentile (linear interpolation) of {0, 1, 2} is 1.9; of {0} is 0; the larger direction is kept
    assert _quiet(EmptyAwareHausdorffDistanceMetric(percentile=95), pred, gt).item() == pytest.approx(1.9)


@pytest.mark.parametrize("spacing", [(0.5, 2.0, 1.5), (2.0, 0.625, 3.0)])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_mm_scales_with_anisotropic_spacing(spacing: tuple[float, float, float], axis: int) -> None:
    k = 2
    pred, gt = _shifted_cubes(4, k, axis)
    hd = _quiet(EmptyAwareHausdorffDistanceMetric(unit="mm", spacing=spacing), pred, gt)
    assert hd.item() == pytest.approx(k * spacing[axis])
    # spacing given at call time, and isotropic scalar spacing scales every distance linearly
    hd_call = _quiet(EmptyAwareHausdorffDistanceMetric(unit="mm"), pred, gt, spacing=spacing)
    assert hd_call.item() == pytest.approx(k * spacing[axis])
    asd_vox = _quiet(EmptyAwareSurfaceDistanceMetric(), pred, gt).item()
    asd_iso = _quiet(EmptyAwareSurfaceDistanceMetric(unit="mm", spacing=spacing[axis]), pred, gt).item()
    assert asd_iso == pytest.approx(asd_vox * spacing[axis])


@pytest.mark.parametrize("as_list", [False, True])
def test_metatensor_spacing_path(as_list: bool) -> None:
    spacing = (3.0, 1.0, 0.5)
    pred, gt = _shifted_cubes(4, 2, axis=0)
    affine = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
    metric = EmptyAwareHausdorffDistanceMetric(unit="mm")
    if as_list:  # MONAI's decollated engine output: list of channel-first MetaTensors
        value = _quiet(metric, [pred[0]], [MetaTensor(gt[0], affine=affine)])
    else:
        value = _quiet(metric, pred, MetaTensor(gt, affine=affine))
    assert value.item() == pytest.approx(2 * spacing[0])
    # in voxel units the affine is ignored
    assert _quiet(EmptyAwareHausdorffDistanceMetric(), pred, MetaTensor(gt, affine=affine)).item() == pytest.approx(2)


def test_metatensor_batch_affines_are_per_case() -> None:
    pred, gt = _shifted_cubes(4, 1, axis=1)
    affines = torch.stack([torch.diag(torch.tensor([1.0, s, 1.0, 1.0], dtype=torch.float64)) for s in (2.0, 5.0)])
    y = MetaTensor(torch.cat([gt, gt]), affine=affines)
    y.is_batch = True
    value = _quiet(EmptyAwareHausdorffDistanceMetric(unit="mm"), torch.cat([pred, pred]), y)
    torch.testing.assert_close(value, torch.tensor([[2.0], [5.0]]))


def test_mm_without_spacing_raises() -> None:
    pred, gt = _shifted_cubes(4, 1, axis=0)
    with pytest.raises(ValueError, match="spacing"):
        _quiet(EmptyAwareHausdorffDistanceMetric(unit="mm"), pred, gt)


@pytest.mark.parametrize(
    "kwargs",
    [{"unit": "cm"}, {"empty_value": "max"}, {"spacing": 0.5}, {"unit": "mm", "distance_metric": "chessboard"}],
)
def test_invalid_configuration_raises(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        EmptyAwareSurfaceDistanceMetric(**kwargs)


@pytest.mark.parametrize("metric_cls", [EmptyAwareHausdorffDistanceMetric, EmptyAwareSurfaceDistanceMetric])
@pytest.mark.parametrize("empty_side", ["prediction", "ground truth"])
def test_one_side_empty_gives_diagonal_and_warns(metric_cls: type, empty_side: str) -> None:
    full, empty = _box((2, 2, 2), (6, 6, 6))[None], _box((0, 0, 0), (0, 0, 0))[None]
    pred, gt = (empty, full) if empty_side == "prediction" else (full, empty)
    # MONAI itself gives nan (HD) / inf (ASD) here
    with pytest.warns(UserWarning, match=rf"{metric_cls.__name__}: case 0, class 1: the {empty_side} is empty"):
        value = metric_cls()(pred, gt)
    diagonal = math.sqrt(3) * (SHAPE[0] - 1)
    assert value.item() == pytest.approx(diagonal)
    # the diagonal is the largest distance attainable: opposite corner voxels reach it exactly
    corner_a, corner_b = _box((0, 0, 0), (1, 1, 1))[None], _box((11, 11, 11), (12, 12, 12))[None]
    assert _quiet(metric_cls(), corner_a, corner_b).item() == pytest.approx(diagonal)
    # in mm the diagonal uses the spacing; a float empty_value is used verbatim
    spacing = (0.5, 1.0, 2.0)
    mm = _quiet(metric_cls(unit="mm", spacing=spacing), pred, gt).item()
    assert mm == pytest.approx(grid_diagonal(SHAPE, spacing)) and mm == pytest.approx(11 * math.sqrt(0.25 + 1 + 4))
    assert math.isnan(_quiet(metric_cls(empty_value=float("nan")), pred, gt).item())
    assert _quiet(metric_cls(empty_value=7.0), pred, gt).item() == 7.0


@pytest.mark.parametrize("metric_cls", [EmptyAwareHausdorffDistanceMetric, EmptyAwareSurfaceDistanceMetric])
def test_both_empty_gives_zero_without_warning(metric_cls: type) -> None:
    empty = _box((0, 0, 0), (0, 0, 0))[None]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        value = metric_cls()(empty, empty)
    assert value.item() == 0.0


def test_case_index_counts_across_calls_and_resets() -> None:
    full, empty = _box((2, 2, 2), (6, 6, 6)), _box((0, 0, 0), (0, 0, 0))
    metric = EmptyAwareHausdorffDistanceMetric(percentile=95)
    _quiet(metric, [full, full], [full, full])  # cases 0, 1: perfect
    with pytest.warns(UserWarning, match="case 3, class 1"):
        metric([full, empty], [full, full])  # cases 2, 3
    buffer = metric.get_buffer()
    assert buffer.shape == (4, 1)
    torch.testing.assert_close(buffer[:, 0], torch.tensor([0.0, 0.0, 0.0, grid_diagonal(SHAPE)]))
    assert metric.aggregate().item() == pytest.approx(grid_diagonal(SHAPE) / 4)  # the empty case is not skipped
    metric.reset()
    with pytest.warns(UserWarning, match="case 0, class 1"):
        metric([empty], [full])


@pytest.mark.parametrize("metric", ["chessboard", "taxicab"])
def test_diagonal_follows_distance_metric(metric: str) -> None:
    corner_a, corner_b = _box((0, 0, 0), (1, 1, 1))[None], _box((11, 11, 11), (12, 12, 12))[None]
    expected = {"chessboard": 11.0, "taxicab": 33.0}[metric]
    assert grid_diagonal(SHAPE, distance_metric=metric) == expected
    assert _quiet(EmptyAwareHausdorffDistanceMetric(distance_metric=metric), corner_a, corner_b).item() == expected
