"""Engines: the two-network semi-supervised trainer and its handlers (checkpoints, resume, seeding, progress,
DDP buffer sync, BatchNorm recalibration, training diagnostics, uncertainty figures of an evaluation)."""

from __future__ import annotations

from .batchnorm_recalibration import BatchNormRecalibration, recalibrate_batchnorm
from .buffer_sync import BufferSyncHandler, broadcast_buffers
from .checkpoint import AtomicCheckpointSaver, ResumeCheckpointLoader, SafeCheckpointLoader, safe_load
from .determinism import EpochSeedHandler
from .diagnostics import CollapseGuard, loss_gradient_norms
from .progress_bar import ProgressBar
from .semi_supervised_trainer import LOSS_TERMS, SemiSupervisedTrainer
from .uncertainty_figures import UncertaintyFigures

__all__ = [
    "AtomicCheckpointSaver",
    "BatchNormRecalibration",
    "BufferSyncHandler",
    "CollapseGuard",
    "EpochSeedHandler",
    "LOSS_TERMS",
    "ProgressBar",
    "ResumeCheckpointLoader",
    "SafeCheckpointLoader",
    "SemiSupervisedTrainer",
    "UncertaintyFigures",
    "broadcast_buffers",
    "loss_gradient_norms",
    "recalibrate_batchnorm",
    "safe_load",
]
