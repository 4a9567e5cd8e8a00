"""Surface-distance metrics (95HD, ASD) with an explicit convention for empty masks.

Why not MONAI's metrics as they are: in monai 1.6.1 :class:`monai.metrics.HausdorffDistanceMetric` returns
``nan`` and :class:`monai.metrics.SurfaceDistanceMetric` returns ``inf`` when exactly one of prediction /
ground truth of a class is empty, and both return ``nan`` when both are empty. Reductions then either skip the
case (``nan``: a model predicting nothing on a hard case is *not penalised*) or blow up (``inf``), and ad-hoc
``nan_to_num`` code silently turns a missed organ into a perfect distance of 0. The classes here wrap MONAI's
computation unchanged for non-empty masks and apply one documented rule otherwise:

* prediction and ground truth both empty: ``0.0`` (perfect agreement, consistent with Dice = 1 under
  ``ignore_empty=False``);
* exactly one empty: ``empty_value``, by default ``"diagonal"``: the length of the image grid's diagonal
  between opposite voxel centres, ``sqrt(sum_i ((n_i - 1) * s_i)^2)`` for a spatial shape ``(n_1, ..., n_d)``
  and spacing ``s`` (``s = 1`` in voxel units). It is the largest distance between any two voxels of the image,
  so an empty prediction never scores better than any non-empty one. (For ``distance_metric="chessboard"`` /
  ``"taxicab"`` the corresponding maximum is used: ``max_i (n_i - 1)`` / ``sum_i (n_i - 1)``.) A float (e.g.
  ``float("nan")`` to reproduce "skip the case") may be given instead. A :class:`UserWarning` naming the metric,
  case and class is emitted, replacing MONAI's generic empty-mask warning.

Units: the paper reports 95HD and ASD in voxels (``unit="voxel"``, the default). With ``unit="mm"`` the
spacing is the ``spacing=`` given to the constructor or to the call, else it is read from the ground truth
``y`` (or, failing that, ``y_pred``) when it is a :class:`monai.data.MetaTensor`, via its affine
(:func:`monai.data.utils.affine_to_spacing`); note that a MetaTensor built without metadata carries an identity
affine, i.e. 1 mm spacing. If no spacing can be found a ``ValueError`` is raised.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Union

import torch
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.metrics import HausdorffDistanceMetric, SurfaceDistanceMetric
from monai.metrics.utils import create_ignore_mask
from monai.utils import MetricReduction

__all__ = [
    "EMPTY_DIAGONAL",
    "grid_diagonal",
    "EmptyAwareHausdorffDistanceMetric",
    "EmptyAwareSurfaceDistanceMetric",
]

EMPTY_DIAGONAL = "diagonal"
UNITS: tuple[str, ...] = ("voxel", "mm")

SpacingArg = Union[float, Sequence[float], Sequence[Sequence[float]], None]


def grid_diagonal(
    spatial_shape: Sequence[int], spacing: Sequence[float] | None = None, distance_metric: str = "euclidean"
) -> float:
    """Largest distance between two voxel centres of a grid.

    Args:
        spatial_shape: ``(n_1, ..., n_d)``, e.g. ``(H, W, D)``.
        spacing: voxel size per axis (``None``: 1, i.e. voxel units). Only used by ``"euclidean"``, as in MONAI.
        distance_metric: ``"euclidean"`` (``sqrt(sum ((n_i - 1) s_i)^2)``), ``"chessboard"``
            (``max (n_i - 1)``) or ``"taxicab"`` (``sum (n_i - 1)``).

    Returns:
        The distance as a Python float.
    """
    steps = [max(int(n) - 1, 0) for n in spatial_shape]
    if distance_metric == "euclidean":
        sp = [1.0] * len(steps) if spacing is None else [float(s) for s in spacing]
        if len(sp) != len(steps):
            raise ValueError(f"spacing {tuple(sp)} does not match the spatial shape {tuple(spatial_shape)}.")
        return math.sqrt(sum((k * s) ** 2 for k, s in zip(steps, sp)))
    if distance_metric == "chessboard":
        return float(max(steps, default=0))
    if distance_metric == "taxicab":
        return float(sum(steps))
    raise ValueError(f"unknown distance_metric {distance_metric!r}.")


class _EmptyAwareMixin:
    """Shared logic: spacing resolution, MONAI call, empty-mask convention, case bookkeeping.

    To be listed *before* a MONAI surface-distance metric class in the bases.
    """

    include_background: bool
    distance_metric: str
    ignore_index: int | None
    _buffers: list | None

    def _init_empty_aware(self, empty_value: float | str, unit: str, spacing: SpacingArg) -> None:
        if isinstance(empty_value, str):
            if empty_value != EMPTY_DIAGONAL:
                raise ValueError(f"empty_value must be a float or {EMPTY_DIAGONAL!r}, got {empty_value!r}.")
        else:
            empty_value = float(empty_value)
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {unit!r}.")
        if unit == "voxel" and spacing is not None:
            raise ValueError("a spacing was given with unit='voxel'; use unit='mm' to measure in physical units.")
        if unit == "mm" and self.distance_metric != "euclidean":
            raise ValueError(
                f"unit='mm' needs distance_metric='euclidean' (MONAI ignores spacing for {self.distance_metric!r})."
            )
        self.empty_value = empty_value
        self.unit = unit
        self.spacing = spacing
        self._case_cursor = 0

    def __call__(self, y_pred: Any, y: Any = None, **kwargs: Any) -> Any:
        # index of the first case of this call among those accumulated since the last ``reset()``
        self._case_cursor = len(self._buffers[0]) if self._buffers else 0
        return super().__call__(y_pred, y, **kwargs)  # type: ignore[misc]

    def _case_spacings(self, y_pred: torch.Tensor, y: torch.Tensor, spacing: SpacingArg) -> list[list[float]] | None:
        """Per-case spacing ``[[s_1, ..., s_d]] * B`` (``None`` in voxel units)."""
        batch, dims = y_pred.shape[0], y_pred.ndim - 2
        if self.unit == "voxel":
            if spacing is not None:
                raise ValueError("a spacing was given with unit='voxel'; use unit='mm' to measure in physical units.")
            return None
        spacing = spacing if spacing is not None else self.spacing
        if spacing is None:
            for src in (y, y_pred):
                if isinstance(src, MetaTensor):
                    affine = torch.as_tensor(src.affine)
                    affines = list(affine) if affine.ndim == 3 else [affine] * batch
                    if len(affines) != batch:
                        raise ValueError(f"got {len(affines)} affines for a batch of {batch} cases.")
                    return [[float(s) for s in affine_to_spacing(a, r=dims)] for a in affines]
            raise ValueError(
                f"{type(self).__name__}(unit='mm') needs a voxel spacing: pass `spacing=` or give `y` as a "
                "MetaTensor carrying its affine."
            )
        if isinstance(spacing, (int, float)):
            return [[float(spacing)] * dims for _ in range(batch)]
        items = list(spacing)
        if len(items) > 0 and all(isinstance(s, (int, float)) for s in items):
            per_case = [items] * batch
        else:
            per_case = [list(s) for s in items]
        if len(per_case) != batch or any(len(s) != dims for s in per_case):
            raise ValueError(f"spacing {spacing!r} fits neither {dims} spatial axes nor a batch of {batch} cases.")
        return [[float(v) for v in s] for s in per_case]

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Distances ``(B, C')`` for binarised one-hot ``y_pred`` / ``y`` of shape ``(B, C, H, W[, D])``.

        ``C' = C - 1`` without background. Non-empty classes get MONAI's value; empty ones the convention of
        the module docstring. ``kwargs`` may hold ``spacing`` (see :func:`_case_spacings`).
        """
        if y_pred.ndim < 3:
            raise ValueError("y_pred should have at least three dimensions.")
        spacings = self._case_spacings(y_pred, y, kwargs.pop("spacing", None))
        with warnings.catch_warnings():
            # MONAI's generic "... is all 0, this may result in nan/inf distance" is replaced by ours below
            warnings.filterwarnings("ignore", message=".*may result in nan/inf distance")
            # deprecation notice about an argument MONAI passes to itself internally; nothing a user can act on
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy")
            values = super()._compute_tensor(y_pred, y, spacing=spacings, **kwargs)  # type: ignore[misc]
        values = values.clone()

        # emptiness exactly as MONAI sees it: after the ignore mask, foreground == (value == 1)
        yp = (y_pred.as_tensor() if isinstance(y_pred, MetaTensor) else torch.as_tensor(y_pred)).float()
        yt = (y.as_tensor() if isinstance(y, MetaTensor) else torch.as_tensor(y)).float()
        mask = create_ignore_mask(yt, self.ignore_index)
        if mask is not None:
            yp, yt = yp * mask, yt * mask
        offset = 0 if self.include_background else 1
        yp, yt = yp[:, offset:], yt[:, offset:]
        pred_any = (yp == 1).flatten(2).any(-1)
        gt_any = (yt == 1).flatten(2).any(-1)

        batch, n_class = values.shape
        for b in range(batch):
            for c in range(n_class):
                cls = c + offset
                if self.ignore_index is not None and cls == self.ignore_index:
                    continue  # MONAI's handling of the ignored class is kept
                p, g = bool(pred_any[b, c]), bool(gt_any[b, c])
                if p and g:
                    continue
                if not p and not g:
                    values[b, c] = 0.0
                    continue
                spacing = None if spacings is None else spacings[b]
                if self.empty_value == EMPTY_DIAGONAL:
                    fill = grid_diagonal(y_pred.shape[2:], spacing, self.distance_metric)
                    how = "the image diagonal"
                else:
                    fill = float(self.empty_value)
                    how = "empty_value"
                which = "prediction" if not p else "ground truth"
                warnings.warn(
                    f"{type(self).__name__}: case {self._case_cursor + b}, class {cls}: the {which} is empty "
                    f"and the other is not; distance set to {fill:.4g} {self.unit} ({how}).",
                    UserWarning,
                    stacklevel=2,
                )
                values[b, c] = fill
        self._case_cursor += batch
        return values


class EmptyAwareHausdorffDistanceMetric(_EmptyAwareMixin, HausdorffDistanceMetric):
    """:class:`monai.metrics.HausdorffDistanceMetric` with a defined value for empty masks (e.g. 95HD).

    Inputs: binarised one-hot ``y_pred`` and ``y`` of shape ``(B, C, H, W[, D])`` or lists of ``(C, H, W[, D])``
    tensors (MONAI's decollated engine output). Output of a call / ``aggregate(reduction="none")``: ``(B, C')``
    with ``C' = C - 1`` unless ``include_background``. Empty masks: see the module docstring.

    Args:
        include_background: whether to score channel 0.
        distance_metric: ``"euclidean"``, ``"chessboard"`` or ``"taxicab"``.
        percentile: e.g. ``95`` for the paper's 95HD; ``None`` for the maximum.
        directed: directed (prediction -> ground truth) distance instead of the symmetric one.
        reduction: MONAI reduction applied by ``aggregate``.
        get_not_nans: whether ``aggregate`` also returns the not-nan counts.
        ignore_index: class index (or sentinel) masked out, as in MONAI.
        empty_value: ``"diagonal"`` or a float used when exactly one of prediction / ground truth is empty.
        unit: ``"voxel"`` (paper) or ``"mm"``.
        spacing: voxel spacing for ``unit="mm"``: a float, one value per spatial axis, or one such sequence per
            case; overrides the MetaTensor affine. A ``spacing=`` passed to the call overrides this one.

    Raises:
        ValueError: for an unknown ``unit`` / ``empty_value``, a spacing with ``unit="voxel"``, ``unit="mm"``
            with a non-euclidean distance, or (at call time) ``unit="mm"`` without any known spacing.
    """

    def __init__(
        self,
        include_background: bool = False,
        distance_metric: str = "euclidean",
        percentile: float | None = None,
        directed: bool = False,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
        ignore_index: int | None = None,
        empty_value: float | str = EMPTY_DIAGONAL,
        unit: str = "voxel",
        spacing: SpacingArg = None,
    ) -> None:
        super().__init__(
            include_background=include_background,
            distance_metric=distance_metric,
            percentile=percentile,
            directed=directed,
            reduction=reduction,
            get_not_nans=get_not_nans,
            ignore_index=ignore_index,
        )
        self._init_empty_aware(empty_value, unit, spacing)


class EmptyAwareSurfaceDistanceMetric(_EmptyAwareMixin, SurfaceDistanceMetric):
    """:class:`monai.metrics.SurfaceDistanceMetric` with a defined value for empty masks (ASD).

    The paper's ASD is the symmetric average surface distance, hence ``symmetric=True`` by default (MONAI's
    default is ``False``): the mean over the union of both boundaries' distances to the other boundary.
    Shapes as in :class:`EmptyAwareHausdorffDistanceMetric`.

    Args:
        include_background: whether to score channel 0.
        symmetric: symmetric ASD (paper) or prediction -> ground truth only.
        distance_metric: ``"euclidean"``, ``"chessboard"`` or ``"taxicab"``.
        reduction: MONAI reduction applied by ``aggregate``.
        get_not_nans: whether ``aggregate`` also returns the not-nan counts.
        ignore_index: class index (or sentinel) masked out, as in MONAI.
        empty_value: ``"diagonal"`` or a float used when exactly one of prediction / ground truth is empty.
        unit: ``"voxel"`` (paper) or ``"mm"``.
        spacing: voxel spacing for ``unit="mm"`` (see :class:`EmptyAwareHausdorffDistanceMetric`).

    Raises:
        ValueError: as :class:`EmptyAwareHausdorffDistanceMetric`.
    """

    def __init__(
        self,
        include_background: bool = False,
        symmetric: bool = True,
        distance_metric: str = "euclidean",
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
        ignore_index: int | None = None,
        empty_value: float | str = EMPTY_DIAGONAL,
        unit: str = "voxel",
        spacing: SpacingArg = None,
    ) -> None:
        super().__init__(
            include_background=include_background,
            symmetric=symmetric,
            distance_metric=distance_metric,
            reduction=reduction,
            get_not_nans=get_not_nans,
            ignore_index=ignore_index,
        )
        self._init_empty_aware(empty_value, unit, spacing)
