"""Evaluation metrics: Dice, Jaccard, 95HD and ASD with explicit empty-mask conventions (``surface_distance``),
calibration and uncertainty of the foreground probability (``calibration``), a ground-truth-free uncertainty
score per study for active learning (``study_uncertainty``). Their wiring into a MONAI evaluator is
:mod:`multicure_monai.handlers.metric_handlers`."""

from __future__ import annotations

from .calibration import UncertaintyMetric, boundary_band, uncertainty_scores
from .study_uncertainty import STUDY_MEASURES, STUDY_REGIONS, study_uncertainty
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
    "STUDY_MEASURES",
    "STUDY_REGIONS",
    "UncertaintyMetric",
    "boundary_band",
    "grid_diagonal",
    "study_uncertainty",
    "uncertainty_scores",
]
