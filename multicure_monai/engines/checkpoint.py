"""Crash-safe checkpoints: atomic writes, weights-only loading, resume from the latest checkpoint.

This module gathers the public names of three modules, one job each (bundle configs and callers import them
from here):

* :mod:`~multicure_monai.engines.checkpoint_saver`: :func:`atomic_write` (the one temp-file-then-rename
  writer), :func:`atomic_torch_save`, :func:`remove_stale_partials`, the ignite save handler
  :class:`AtomicDiskSaver` and MONAI's saver on top of it, :class:`AtomicCheckpointSaver` (atomic files,
  deferred removals, NaN/Inf guard, key-metric ``state_dict``, ``engine_key``).
* :mod:`~multicure_monai.engines.checkpoint_loader`: :func:`safe_load` (``torch.load(weights_only=True)``
  with one clear error per failure, :class:`CorruptCheckpointError` / :class:`UnsafeCheckpointError`, each
  naming the file) and MONAI's loader on top of it, :class:`SafeCheckpointLoader`.
* :mod:`~multicure_monai.engines.checkpoint_resume`: :func:`find_latest_checkpoint` and
  :class:`ResumeCheckpointLoader` (``resume: true | false | auto``).
* :mod:`~multicure_monai.engines.checkpoint_architecture`: the switches that shape the networks, recorded
  with each checkpoint and compared on loading (:func:`check_architecture`, :func:`check_loaders` for
  MONAI's own loader).

Each module's docstring says why MONAI's own handlers are not enough as they are.
"""

from __future__ import annotations

from .checkpoint_architecture import (
    ARCHITECTURE_KEY,
    ArchitectureRecord,
    check_architecture,
    check_loaders,
    read_architecture,
    sidecar_path,
)
from .checkpoint_loader import (
    _UNSAFE_MARKERS,  # noqa: F401 - importable from here before the split
    CorruptCheckpointError,
    SafeCheckpointLoader,
    UnsafeCheckpointError,
    safe_load,
)
from .checkpoint_resume import _CKPT_RE, ResumeCheckpointLoader, find_latest_checkpoint  # noqa: F401
from .checkpoint_saver import (
    TMP_SUFFIX,
    AtomicCheckpointSaver,
    AtomicDiskSaver,
    _EnginePlaceholder,  # noqa: F401 - importable from here before the split
    _fsync_dir,  # noqa: F401
    _non_finite_entries,  # noqa: F401
    atomic_torch_save,
    atomic_write,
    remove_stale_partials,
)

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
    "AtomicDiskSaver",
    "AtomicCheckpointSaver",
    "SafeCheckpointLoader",
    "ResumeCheckpointLoader",
]
