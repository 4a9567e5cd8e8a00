"""Evaluation metrics: Dice, Jaccard, 95HD and ASD with explicit empty-mask conventions (``surface_distance``),
and their wiring into a MONAI evaluator (``handlers``)."""

from __future__ import annotations

from .handlers import LabelToOneHot, segmentation_metric_handlers
from .surface_distance import (
    EMPTY_DIAGONAL,
    EmptyAwareHausdorffDistanceMetric,
    EmptyAwareSurfaceDistanceMetric,
    grid_diagonal,
)

__all__ = [
    "EMPTY_DIAGONAL",
    "EmptyAwareHausdorffDistanceMetric",
    "EmptyAwareSurfaceDistanceMetric",
    "LabelToOneHot",
    "grid_diagonal",
    "segmentation_metric_handlers",
]
