"""Evaluation metrics: Dice, Jaccard, 95HD and ASD with explicit empty-mask conventions (``surface_distance``),
calibration and uncertainty of the foreground probability (``calibration``), a ground-truth-free uncertainty
score per study for active learning (``study_uncertainty``), and their wiring into a MONAI evaluator
(``handlers``)."""

from __future__ import annotations

from .calibration import UncertaintyMetric, boundary_band, uncertainty_scores
from .study_uncertainty import STUDY_MEASURES, STUDY_REGIONS, study_uncertainty
from .handlers import (
    LabelToOneHot,
    additional_metric_handlers,
    calibration_metric_handlers,
    member_metric_handlers,
    segmentation_metric_handlers,
)
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
    "STUDY_MEASURES",
    "STUDY_REGIONS",
    "UncertaintyMetric",
    "additional_metric_handlers",
    "boundary_band",
    "calibration_metric_handlers",
    "grid_diagonal",
    "member_metric_handlers",
    "segmentation_metric_handlers",
    "study_uncertainty",
    "uncertainty_scores",
]
