"""Ignite handlers of the bundle's trainer and evaluators, beside :mod:`multicure_monai.engines` as in MONAI.

* Checkpoints: :class:`AtomicCheckpointSaver` (atomic files, deferred removals, NaN/Inf guard,
  :mod:`.checkpoint_saver`), :class:`SafeCheckpointLoader` and :func:`safe_load` (weights-only loading with one
  clear error per failure, :mod:`.checkpoint_loader`), :class:`ResumeCheckpointLoader` (``resume: true | false |
  auto``, :mod:`.checkpoint_resume`), and the architecture switches recorded with each checkpoint and compared
  on loading (:mod:`.checkpoint_architecture`). Each module's docstring says why MONAI's own handlers are not
  enough as they are.
* Training: :class:`EpochSeedHandler` (a resumed run sees the data of an uninterrupted one),
  :class:`BatchNormRecalibration`, :class:`BufferSyncHandler` (DDP), :class:`CollapseGuard`,
  :class:`ProgressBar` and the MLflow wiring of ``--tracking mlflow`` (:mod:`.tracking`).
* Evaluation: the metric handlers (:mod:`.metric_handlers`) and :class:`UncertaintyFigures`.
"""

from __future__ import annotations

from .batchnorm_recalibration import BatchNormRecalibration, recalibrate_batchnorm
from .buffer_sync import BufferSyncHandler, broadcast_buffers
from .checkpoint_architecture import check_architecture, read_architecture
from .checkpoint_loader import SafeCheckpointLoader, check_loaders, safe_load
from .checkpoint_resume import ResumeCheckpointLoader, find_latest_checkpoint, resume_checkpoint_dict
from .checkpoint_saver import AtomicCheckpointSaver, atomic_torch_save
from .collapse_guard import CollapseGuard
from .determinism import EpochSeedHandler
from .metric_handlers import (
    LabelToOneHot,
    additional_metric_handlers,
    calibration_metric_handlers,
    member_metric_handlers,
    segmentation_metric_handlers,
)
from .progress_bar import ProgressBar, scalar_terms
from .tracking import track_training_terms
from .uncertainty_figures import UncertaintyFigures

__all__ = [
    "AtomicCheckpointSaver",
    "BatchNormRecalibration",
    "BufferSyncHandler",
    "CollapseGuard",
    "EpochSeedHandler",
    "LabelToOneHot",
    "ProgressBar",
    "ResumeCheckpointLoader",
    "SafeCheckpointLoader",
    "UncertaintyFigures",
    "additional_metric_handlers",
    "atomic_torch_save",
    "broadcast_buffers",
    "calibration_metric_handlers",
    "check_architecture",
    "check_loaders",
    "find_latest_checkpoint",
    "member_metric_handlers",
    "read_architecture",
    "recalibrate_batchnorm",
    "resume_checkpoint_dict",
    "safe_load",
    "scalar_terms",
    "segmentation_metric_handlers",
    "track_training_terms",
]
