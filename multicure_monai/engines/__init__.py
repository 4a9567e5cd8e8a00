"""Engines: the two-network semi-supervised trainer, its loss table and its handlers (checkpoints, resume,
seeding, progress, DDP buffer sync, BatchNorm recalibration, training diagnostics, uncertainty figures), and
the multi-process pieces of the multi-GPU configs (:mod:`.distributed`)."""

from __future__ import annotations

from .batchnorm_recalibration import BatchNormRecalibration, recalibrate_batchnorm
from .buffer_sync import BufferSyncHandler, broadcast_buffers
from .checkpoint import AtomicCheckpointSaver, ResumeCheckpointLoader, SafeCheckpointLoader, safe_load
from .determinism import EpochSeedHandler
from .diagnostics import CollapseGuard, loss_gradient_norms
from .distributed import (
    check_cases_per_process,
    ddp_module,
    ensure_process_group,
    rank_handlers,
    validation_sampler,
)
from .progress_bar import ProgressBar
from .loss_terms import LossTerm, method_loss_terms
from .semi_supervised_trainer import SemiSupervisedTrainer
from .uncertainty_figures import UncertaintyFigures

__all__ = [
    "AtomicCheckpointSaver",
    "BatchNormRecalibration",
    "BufferSyncHandler",
    "CollapseGuard",
    "EpochSeedHandler",
    "LossTerm",
    "ProgressBar",
    "ResumeCheckpointLoader",
    "SafeCheckpointLoader",
    "SemiSupervisedTrainer",
    "UncertaintyFigures",
    "broadcast_buffers",
    "check_cases_per_process",
    "ddp_module",
    "ensure_process_group",
    "loss_gradient_norms",
    "method_loss_terms",
    "rank_handlers",
    "recalibrate_batchnorm",
    "safe_load",
    "validation_sampler",
]
