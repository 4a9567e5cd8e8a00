"""Crash-safe checkpoints: atomic writes, weights-only loading, resume from the latest checkpoint.

This module gathers the public names of three modules, one job each (bundle configs and callers import them
from here):

* :mod:`~multicure_monai.engines.checkpoint_saver`: :func:`atomic_torch_save` (through the package's one
  atomic writer, :func:`~multicure_monai.atomic_files.atomic_write`), the ignite save handler
  :class:`AtomicDiskSaver` and MONAI's saver on top of it, :class:`AtomicCheckpointSaver` (atomic files,
  deferred removals, NaN/Inf guard, key-metric ``state_dict``, ``engine_key``).
* :mod:`~multicure_monai.engines.checkpoint_loader`: :func:`safe_load` (``torch.load(weights_only=True)``
  with one clear error per failure, :class:`CorruptCheckpointError` / :class:`UnsafeCheckpointError`, each
  naming the file) and MONAI's loader on top of it, :class:`SafeCheckpointLoader`.
* :mod:`~multicure_monai.engines.checkpoint_resume`: :func:`find_latest_checkpoint`,
  :class:`ResumeCheckpointLoader` (``resume: true | false | auto``) and :func:`resume_checkpoint_dict`.
* :mod:`~multicure_monai.engines.checkpoint_architecture`: the switches that shape the networks, recorded
  with each checkpoint and compared on loading (:func:`check_architecture`; :func:`check_loaders` of the loader
  module checks MONAI's own loader).

Each module's docstring says why MONAI's own handlers are not enough as they are.
"""

from __future__ import annotations

from multicure_monai.atomic_files import TMP_SUFFIX, atomic_write, remove_stale_partials

from .checkpoint_architecture import (
    ARCHITECTURE_KEY,
    ArchitectureRecord,
    check_architecture,
    read_architecture,
    sidecar_path,
)
from .checkpoint_loader import (
    CorruptCheckpointError,
    SafeCheckpointLoader,
    UnsafeCheckpointError,
    check_loaders,
    safe_load,
)
from .checkpoint_resume import ResumeCheckpointLoader, find_latest_checkpoint, resume_checkpoint_dict
from .checkpoint_saver import AtomicCheckpointSaver, AtomicDiskSaver, atomic_torch_save

__all__ = [
    "ARCHITECTURE_KEY",
    "ArchitectureRecord",
    "check_architecture",
    "check_loaders",
    "read_architecture",
    "sidecar_path",
    "TMP_SUFFIX",
    "UnsafeCheckpointError",
    "CorruptCheckpointError",
    "atomic_write",
    "atomic_torch_save",
    "remove_stale_partials",
    "safe_load",
    "find_latest_checkpoint",
    "resume_checkpoint_dict",
    "AtomicDiskSaver",
    "AtomicCheckpointSaver",
    "SafeCheckpointLoader",
    "ResumeCheckpointLoader",
]
