"""Evaluation metrics: Dice, Jaccard, 95HD and ASD with explicit empty-mask conventions (``surface_distance``),
calibration and uncertainty of the foreground probability (``calibration``), and their wiring into a MONAI
evaluator (``handlers``)."""

from __future__ import annotations

from .calibration import UncertaintyMetric, boundary_band, uncertainty_scores
from .handlers import LabelToOneHot, calibration_metric_handlers, segmentation_metric_handlers
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
    "UncertaintyMetric",
    "boundary_band",
    "calibration_metric_handlers",
    "grid_diagonal",
    "segmentation_metric_handlers",
    "uncertainty_scores",
]
