"""Crash-safe checkpoint saving: MONAI's saver on the package's atomic writer (:mod:`multicure_monai.atomic_files`).

Why not MONAI's saver as it is: :class:`monai.handlers.CheckpointSaver` builds ignite's
``DiskSaver(atomic=False)`` (``atomic=True`` would leave the file readable by its owner only), so a process
killed while ``torch.save`` writes leaves a truncated ``model.pt``. Ignite's :class:`~ignite.handlers.Checkpoint`
also removes the previous file *before* it writes the new one, so with ``n_saved=1`` a kill in between leaves
no checkpoint at all.

* :func:`atomic_torch_save` is ``torch.save`` through :func:`~multicure_monai.atomic_files.atomic_write`.
* :class:`AtomicDiskSaver` is an ignite save handler writing through :func:`atomic_torch_save`; removals ignite
  asks for are deferred until the new file is complete.
* :class:`AtomicCheckpointSaver` is MONAI's saver with these save handlers swapped in, a finiteness guard (it
  never writes NaN/Inf weights), a ``state_dict`` (so the best key metric survives a resume) and an
  ``engine_key`` (so the trainer itself can be saved from a config without a circular reference).
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from ignite.engine import Engine
from ignite.handlers import Checkpoint
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointSaver

from multicure_monai.atomic_files import atomic_write, remove_stale_partials

from .checkpoint_architecture import ARCHITECTURE_KEY, ArchitectureRecord, sidecar_path, write_sidecar

__all__ = [
    "atomic_torch_save",
    "AtomicDiskSaver",
    "AtomicCheckpointSaver",
]


# one logger for the checkpoint modules (saver, loader, resume, architecture record)
_logger = logging.getLogger("multicure_monai.handlers.checkpoint")


# ------------------------------------------------------------------------------------------------ write


def atomic_torch_save(obj: Any, path: str | os.PathLike, mode: int = 0o644) -> str:
    """``torch.save(obj, path)`` that never leaves a partial ``path`` (through :func:`atomic_write`).

    Args:
        obj: what to save (state dicts).
        path: the target file.
        mode: permissions of the written file (``0o644``: readable by the group/others, like ``torch.save``).

    Returns:
        The absolute path written.
    """
    return atomic_write(path, lambda f: torch.save(obj, f), mode=mode)


def _non_finite_entries(obj: Any, prefix: str = "") -> list[str]:
    """Keys of floating-point tensors in a nested state dict that hold NaN/Inf."""
    bad: list[str] = []
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            if not bool(torch.isfinite(obj).all()):
                bad.append(prefix or "<tensor>")
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            bad += _non_finite_entries(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            bad += _non_finite_entries(v, f"{prefix}[{i}]")
    return bad


# ------------------------------------------------------------------------------------------------ save


class AtomicDiskSaver(BaseSaveHandler):
    """Ignite save handler: atomic writes, deferred removals, optional fixed filename, NaN/Inf guard.

    Ignite's :class:`~ignite.handlers.Checkpoint` calls ``remove(old)`` and then ``save(new)``; here ``remove``
    only records the file, which is deleted after the new file is complete (and never when it is the file
    just written, as with a fixed filename). So a kill at any moment leaves the previous good checkpoint.

    Args:
        dirname: folder of the checkpoints (created).
        filename: fixed filename for every save (e.g. ``model.pt``); ``None``: ignite's names.
        check_finite: refuse (``FloatingPointError``) to write a checkpoint with NaN/Inf in a float tensor.
        sidecar: architecture switches to write next to each file as its side-car (for a bare state dict, see
            :mod:`~multicure_monai.handlers.checkpoint_architecture`); ``None``: no side-car.
    """

    def __init__(
        self,
        dirname: str | os.PathLike,
        filename: str | None = None,
        check_finite: bool = True,
        sidecar: Mapping[str, Any] | None = None,
    ) -> None:
        self.dirname = os.path.abspath(os.fspath(dirname))
        os.makedirs(self.dirname, exist_ok=True)
        self.filename = filename
        self.check_finite = check_finite
        self.sidecar = sidecar
        self._pending_removal: list[str] = []
        stale = remove_stale_partials(self.dirname)
        if stale:
            _logger.warning(f"removed unfinished checkpoint writes of a killed run: {stale}")

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        """Write ``checkpoint`` atomically, then delete the files whose removal ignite asked for before.

        Args:
            checkpoint: the state dicts to save.
            filename: ignite's filename (replaced by the fixed ``filename`` if one was given).
            metadata: ignite's metadata (unused).

        Raises:
            FloatingPointError: ``check_finite`` and a float tensor holds NaN/Inf; nothing is written.
        """
        name = self.filename or filename
        path = os.path.join(self.dirname, name)
        if self.check_finite:
            bad = _non_finite_entries(checkpoint)
            if bad:
                raise FloatingPointError(
                    f"refusing to write {path}: non-finite values (NaN/Inf) in {', '.join(bad[:5])}"
                    f"{' ...' if len(bad) > 5 else ''}; the previous checkpoint is kept."
                )
        atomic_torch_save(checkpoint, path)
        if self.sidecar is not None:
            write_sidecar(path, self.sidecar)
        pending, self._pending_removal = self._pending_removal, []
        for old in pending:
            old_path = os.path.join(self.dirname, old)
            if old != name and os.path.isfile(old_path):
                os.remove(old_path)
                if self.sidecar is not None:
                    if os.path.isfile(sidecar_path(old_path)):
                        os.remove(sidecar_path(old_path))

    def remove(self, filename: str) -> None:
        """Defer the removal of ``filename`` until the next checkpoint has been written completely."""
        self._pending_removal.append(self.filename or filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's :class:`~monai.handlers.CheckpointSaver` writing every file atomically (see the module docstring).

    Same arguments as MONAI's saver, plus:

    Args:
        engine_key: also save the engine this handler is attached to under this key (e.g. ``"trainer"``:
            iteration and epoch counters), so a config does not need to reference the trainer from inside
            its own handler list.
        check_finite: refuse to write NaN/Inf weights (``FloatingPointError``; the previous file is kept).
        prune_stale: for interval checkpoints, after each save also delete older ``*iteration=N.pt`` /
            ``*epoch=N.pt`` files of the same prefix left by an earlier (e.g. killed and resumed) run, so only
            the newest ``n_saved`` remain.
        interval_score: name the interval checkpoints by ``"iteration"`` (default, also for epoch-level
            saving: ``checkpoint_iteration=N.pt``) or ``"epoch"`` (MONAI's naming).
        architecture: the switches that shape the networks (the configs' ``architecture`` id), recorded with
            every file: under the ``"architecture"`` key of a checkpoint of several objects, in a side-car file
            next to a one-object checkpoint (ignite writes that as a bare state dict, e.g. ``model.pt``).
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: dict,
        *args: Any,
        engine_key: str | None = None,
        check_finite: bool = True,
        prune_stale: bool = True,
        interval_score: str = "iteration",
        architecture: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if interval_score not in ("iteration", "epoch"):
            raise ValueError(f"interval_score must be 'iteration' or 'epoch', got {interval_score!r}.")
        save_dict = dict(save_dict)
        if engine_key is not None:
            save_dict.setdefault(engine_key, _EnginePlaceholder())
        sidecar = None
        if architecture is not None:
            if len(save_dict) > 1:
                save_dict[ARCHITECTURE_KEY] = ArchitectureRecord(architecture)
            else:
                sidecar = dict(architecture)
        super().__init__(save_dir, save_dict, *args, **kwargs)
        self.engine_key = engine_key
        self.prune_stale = prune_stale
        self.interval_score = interval_score
        for ckpt in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if ckpt is not None:
                fixed = getattr(ckpt.save_handler, "filename", None)
                ckpt.save_handler = AtomicDiskSaver(
                    save_dir, filename=fixed, check_finite=check_finite, sidecar=sidecar
                )
        if self._interval_checkpoint is not None:
            old = self._interval_checkpoint
            self._interval_checkpoint = Checkpoint(
                to_save=self.save_dict,
                save_handler=old.save_handler,
                filename_prefix=old.filename_prefix,
                score_function=lambda e: e.state.iteration if interval_score == "iteration" else e.state.epoch,
                score_name=interval_score,
                n_saved=old.n_saved,
            )

    def attach(self, engine: Engine) -> None:
        """Put ``engine`` into the saved objects under ``engine_key`` (if given), then attach as MONAI does.

        Args:
            engine: the ignite engine whose events trigger the saves.
        """
        if self.engine_key is not None:
            self.save_dict[self.engine_key] = engine  # the Checkpoint objects hold this same dict
        super().attach(engine)

    def interval_completed(self, engine: Engine) -> None:
        """Save the interval checkpoint (MONAI), then prune older interval files of an earlier run.

        Args:
            engine: the ignite engine.
        """
        super().interval_completed(engine)
        if self.prune_stale and self._interval_checkpoint is not None:
            keep = {item.filename for item in self._interval_checkpoint._saved}
            prefix = self._interval_checkpoint.filename_prefix
            pattern = os.path.join(self.save_dir, f"{prefix + '_' if prefix else ''}*_{self.interval_score}=*.pt")
            for path in glob.glob(pattern):
                if os.path.basename(path) not in keep:
                    os.remove(path)

    def state_dict(self) -> dict:
        """State of the key-metric tracking (best value so far), to store in a resume checkpoint."""
        if self._key_metric_checkpoint is None:
            return {}
        return self._key_metric_checkpoint.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the key-metric tracking (an empty dict, as saved without key metric, is a no-op).

        Args:
            state_dict: as returned by :meth:`state_dict`.
        """
        if not state_dict:
            return
        super().load_state_dict(state_dict)


class _EnginePlaceholder:
    """Stands in for the engine in ``save_dict`` until :meth:`AtomicCheckpointSaver.attach` replaces it."""

    def state_dict(self) -> dict:
        raise RuntimeError("AtomicCheckpointSaver with engine_key must be attached to an engine before saving.")

    def load_state_dict(self, state_dict: dict) -> None:  # pragma: no cover - never loaded
        raise RuntimeError("AtomicCheckpointSaver with engine_key must be attached to an engine before loading.")
