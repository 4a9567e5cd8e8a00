"""Evaluation metrics: Dice, Jaccard, 95HD and ASD with explicit empty-mask conventions."""

from __future__ import annotations

from .surface_distance import (
    EMPTY_DIAGONAL,
    EmptyAwareHausdorffDistanceMetric,
    EmptyAwareSurfaceDistanceMetric,
    LabelToOneHot,
    grid_diagonal,
    segmentation_metric_handlers,
)

__all__ = [
    "EMPTY_DIAGONAL",
    "EmptyAwareHausdorffDistanceMetric",
    "EmptyAwareSurfaceDistanceMetric",
    "LabelToOneHot",
    "grid_diagonal",
    "segmentation_metric_handlers",
]
