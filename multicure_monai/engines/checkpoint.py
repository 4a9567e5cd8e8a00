"""Crash-safe checkpoints: atomic writes, weights-only loading, resume from the latest checkpoint.

Why not MONAI's handlers as they are:

* :class:`monai.handlers.CheckpointSaver` builds ignite's ``DiskSaver(atomic=False)`` (``atomic=True`` would
  leave the file readable by its owner only), so a process killed while ``torch.save`` writes leaves a
  truncated ``model.pt``. Ignite's :class:`~ignite.handlers.Checkpoint` also removes the previous file
  *before* it writes the new one, so with ``n_saved=1`` a kill in between leaves no checkpoint at all.
  :class:`AtomicDiskSaver` writes to a hidden temporary file in the same folder, fsyncs it, makes it
  ``0o644`` and ``os.replace`` s it over the target; removals ignite asks for are deferred until the new file
  is complete. :class:`AtomicCheckpointSaver` is MONAI's saver with these save handlers swapped in, a
  finiteness guard (it never writes NaN/Inf weights), a ``state_dict`` (so the best key metric survives a
  resume) and an ``engine_key`` (so the trainer itself can be saved from a config without a circular
  reference).
* :class:`monai.handlers.CheckpointLoader` (MONAI 1.6) already passes ``weights_only=True``, but the error
  for a refused pickle is torch's long ``UnpicklingError`` that does not name the file, and a missing or
  truncated file gives an equally anonymous error. :func:`safe_load` turns each case into one clear
  message naming the file; :class:`SafeCheckpointLoader` uses it.
* :class:`ResumeCheckpointLoader` finds the latest resume checkpoint in a folder and loads it into the
  nets, optimizer, lr scheduler, trainer (iteration/epoch counters) and the ``models/model.pt`` saver, for
  ``resume: true`` (a missing checkpoint is an error) or ``resume: auto`` (start fresh when there is none).
"""

from __future__ import annotations

import glob
import logging
import os
import pickle
import re
import tempfile
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from ignite.engine import Engine
from ignite.handlers import Checkpoint
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointLoader, CheckpointSaver

__all__ = [
    "TMP_SUFFIX",
    "UnsafeCheckpointError",
    "CorruptCheckpointError",
    "atomic_torch_save",
    "remove_stale_partials",
    "safe_load",
    "find_latest_checkpoint",
    "AtomicDiskSaver",
    "AtomicCheckpointSaver",
    "SafeCheckpointLoader",
    "ResumeCheckpointLoader",
]

#: Suffix of the temporary files written before the rename (never ``.pt``: MONAI Label offers ``models/*.pt``).
TMP_SUFFIX = ".partial"
_CKPT_RE = re.compile(r"iteration=(\d+)\.pt$")
# torch's weights-only unpickler messages for a refused object (vs. an unreadable stream: "Unsupported operand")
_UNSAFE_MARKERS = ("Unsupported global", "unrecognized function", "Unsupported class", "not an allowed global")


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint holds pickled objects other than tensors/containers; it was refused, nothing was run."""


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or otherwise unreadable."""


# ------------------------------------------------------------------------------------------------ write


def atomic_torch_save(obj: Any, path: str | os.PathLike, mode: int = 0o644) -> str:
    """``torch.save(obj, path)`` that never leaves a partial ``path``: temp file, fsync, chmod, rename.

    The temporary file is ``.<name>.<random>.partial`` in the target's folder (same file system, so
    :func:`os.replace` is atomic); after a crash it is the only leftover and :class:`AtomicDiskSaver` removes
    it at the next start. Until the rename, ``path`` keeps its previous content.

    Args:
        obj: what to save (state dicts).
        path: the target file.
        mode: permissions of the written file (``0o644``: readable by the group/others, like ``torch.save``).

    Returns:
        The absolute path written.
    """
    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=TMP_SUFFIX, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(folder)
    return path


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_partials(folder: str | os.PathLike) -> list[str]:
    """Delete temporary files left by a process killed inside :func:`atomic_torch_save`; return their paths."""
    stale = sorted(glob.glob(os.path.join(os.fspath(folder), f".*{TMP_SUFFIX}")))
    for p in stale:
        try:
            os.remove(p)
        except OSError:
            pass
    return stale


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


class AtomicDiskSaver(BaseSaveHandler):
    """Ignite save handler: atomic writes, deferred removals, optional fixed filename, NaN/Inf guard.

    Ignite's :class:`~ignite.handlers.Checkpoint` calls ``remove(old)`` and then ``save(new)``; here ``remove``
    only records the file, which is deleted after the new file is complete (and never when it is the file
    just written, as with a fixed filename). So a kill at any moment leaves the previous good checkpoint.

    Args:
        dirname: folder of the checkpoints (created).
        filename: fixed filename for every save (e.g. ``model.pt``); ``None``: ignite's names.
        check_finite: refuse (``FloatingPointError``) to write a checkpoint with NaN/Inf in a float tensor.
    """

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None, check_finite: bool = True) -> None:
        self.dirname = os.path.abspath(os.fspath(dirname))
        os.makedirs(self.dirname, exist_ok=True)
        self.filename = filename
        self.check_finite = check_finite
        self._pending_removal: list[str] = []
        stale = remove_stale_partials(self.dirname)
        if stale:
            logging.getLogger(__name__).warning(f"removed unfinished checkpoint writes of a killed run: {stale}")

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
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
        pending, self._pending_removal = self._pending_removal, []
        for old in pending:
            old_path = os.path.join(self.dirname, old)
            if old != name and os.path.isfile(old_path):
                os.remove(old_path)

    def remove(self, filename: str) -> None:
        """Defer the removal of ``filename`` until the next checkpoint has been written completely."""
        self._pending_removal.append(self.filename or filename)


# ------------------------------------------------------------------------------------------------ save


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
        **kwargs: Any,
    ) -> None:
        if interval_score not in ("iteration", "epoch"):
            raise ValueError(f"interval_score must be 'iteration' or 'epoch', got {interval_score!r}.")
        save_dict = dict(save_dict)
        if engine_key is not None:
            save_dict.setdefault(engine_key, _EnginePlaceholder())
        super().__init__(save_dir, save_dict, *args, **kwargs)
        self.engine_key = engine_key
        self.prune_stale = prune_stale
        self.interval_score = interval_score
        for ckpt in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if ckpt is not None:
                fixed = getattr(ckpt.save_handler, "filename", None)
                ckpt.save_handler = AtomicDiskSaver(save_dir, filename=fixed, check_finite=check_finite)
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
        if self.engine_key is not None:
            self.save_dict[self.engine_key] = engine  # the Checkpoint objects hold this same dict
        super().attach(engine)

    def interval_completed(self, engine: Engine) -> None:
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
        if not state_dict:
            return
        super().load_state_dict(state_dict)


class _EnginePlaceholder:
    """Stands in for the engine in ``save_dict`` until :meth:`AtomicCheckpointSaver.attach` replaces it."""

    def state_dict(self) -> dict:
        raise RuntimeError("AtomicCheckpointSaver with engine_key must be attached to an engine before saving.")

    def load_state_dict(self, state_dict: dict) -> None:  # pragma: no cover - never loaded
        raise RuntimeError("AtomicCheckpointSaver with engine_key must be attached to an engine before loading.")


# ------------------------------------------------------------------------------------------------ load


def safe_load(path: str | os.PathLike, map_location: Any = None) -> Any:
    """``torch.load(path, weights_only=True)`` with one clear error per failure, each naming the file.

    Raises:
        CorruptCheckpointError: the file is missing, empty, truncated or not a torch file.
        UnsafeCheckpointError: the file holds arbitrary pickled objects (classes, functions such as
            ``os.system``); the weights-only unpickler refuses them *before* anything is executed.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CorruptCheckpointError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        detail = str(e)
        match = re.search(r"GLOBAL (\S+) was not an allowed global", detail) or re.search(r"GLOBAL (\S+)", detail)
        what = f" (e.g. {match.group(1)})" if match else ""
        if match or any(m in detail for m in _UNSAFE_MARKERS):
            raise UnsafeCheckpointError(
                f"{path}: refused to load: the file contains non-tensor pickled objects{what} that weights-only "
                "loading does not allow; nothing in it was executed. Only load checkpoints you trust; re-save "
                "plain state dicts (tensors, numbers, strings, lists, dicts)."
            ) from None
        raise CorruptCheckpointError(f"{path}: cannot read checkpoint, corrupt or truncated? ({detail[:300]})") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CorruptCheckpointError(
            f"{path}: cannot read checkpoint, corrupt or truncated? ({type(e).__name__}: {str(e).strip()[:300]})"
        ) from e


class SafeCheckpointLoader(CheckpointLoader):
    """MONAI's :class:`~monai.handlers.CheckpointLoader` loading through :func:`safe_load` (weights only).

    Same arguments as MONAI's loader, plus ``engine_key``: also restore the engine this handler is attached to
    (ignite ``state_dict``: iteration, epoch) from that key of the checkpoint.
    """

    def __init__(self, load_path: str, load_dict: dict, *args: Any, engine_key: str | None = None, **kwargs: Any):
        super().__init__(load_path, dict(load_dict), *args, **kwargs)
        self.engine_key = engine_key

    def attach(self, engine: Engine) -> None:
        if self.engine_key is not None:
            self.load_dict[self.engine_key] = engine
        super().attach(engine)

    def __call__(self, engine: Engine) -> None:
        checkpoint = safe_load(self.load_path, map_location=self.map_location)
        if not isinstance(checkpoint, Mapping):
            raise CorruptCheckpointError(f"{self.load_path}: expected a dict of state dicts, got {type(checkpoint)}")
        k = next(iter(self.load_dict))
        if len(self.load_dict) == 1 and k not in checkpoint:  # a bare state dict, as MONAI's loader accepts
            checkpoint = {k: checkpoint}
        missing = [key for key in self.load_dict if key not in checkpoint]
        if missing and self.strict:
            raise KeyError(f"{self.load_path}: checkpoint has no {missing}; it holds {sorted(checkpoint)}")
        prior_max_epochs = engine.state.max_epochs
        load_dict = self.load_dict
        if not self.strict_shape:
            from monai.networks.utils import copy_model_state

            load_dict = {}
            for key, obj in self.load_dict.items():
                if isinstance(obj, torch.nn.Module):
                    checkpoint = dict(checkpoint)
                    checkpoint[key] = copy_model_state(obj, checkpoint[key], inplace=False)[0]
                    load_dict[key] = obj
                else:
                    warnings.warn("`strict_shape` is False, load checkpoint for model, skip others in `load_dict`.")
        load_dict = {key: obj for key, obj in load_dict.items() if key in checkpoint}
        Checkpoint.load_objects(to_load=load_dict, checkpoint=dict(checkpoint), strict=self.strict)
        if prior_max_epochs is not None and engine.state.epoch > prior_max_epochs:
            raise ValueError(
                f"{self.load_path}: the checkpoint is at epoch {engine.state.epoch} (iteration "
                f"{engine.state.iteration}), beyond this run's max_epochs={prior_max_epochs}; raise max_iterations "
                "to train further."
            )
        engine.state.max_epochs = prior_max_epochs
        self.logger.info(f"Restored {sorted(load_dict)} from {self.load_path}")


def find_latest_checkpoint(ckpt_dir: str | os.PathLike, pattern: str = "*iteration=*.pt") -> str | None:
    """The checkpoint with the highest ``iteration=N`` in ``ckpt_dir`` (``None`` if there is none)."""
    best: tuple[int, str] | None = None
    for path in glob.glob(os.path.join(os.fspath(ckpt_dir), pattern)):
        m = _CKPT_RE.search(os.path.basename(path))
        if m and (best is None or int(m.group(1)) > best[0]):
            best = (int(m.group(1)), path)
    return None if best is None else best[1]


class ResumeCheckpointLoader(SafeCheckpointLoader):
    """Resume a killed run from the latest ``*iteration=N.pt`` in ``ckpt_dir`` (on ``Events.STARTED``).

    Args:
        ckpt_dir: folder of the resume checkpoints (written by :class:`AtomicCheckpointSaver`).
        load_dict: objects to restore, e.g. ``{"network": ..., "aux_network": ..., "optimizer": ...,
            "lr_scheduler": ..., "model_saver": ...}``; with ``engine_key`` the trainer is added at ``attach``.
        resume: ``False``/``"false"``: do nothing; ``True``/``"true"``: load the latest checkpoint, error if
            there is none; ``"auto"``: load it if there is one, else start fresh.
        engine_key: key of the trainer's own state in the checkpoint (default ``"trainer"``).
        kwargs: passed to :class:`SafeCheckpointLoader` (``map_location``, ``strict``, ...).
    """

    def __init__(
        self,
        ckpt_dir: str,
        load_dict: dict,
        resume: bool | str = False,
        engine_key: str | None = "trainer",
        **kwargs: Any,
    ) -> None:
        mode = str(resume).strip().lower()
        if mode not in ("false", "true", "auto", "0", "1"):
            raise ValueError(f"resume must be true, false or 'auto', got {resume!r}.")
        self.mode = {"0": "false", "1": "true"}.get(mode, mode)
        self.ckpt_dir = os.fspath(ckpt_dir)
        latest = None if self.mode == "false" else find_latest_checkpoint(self.ckpt_dir)
        if self.mode == "true" and latest is None:
            raise FileNotFoundError(
                f"resume=true but no resume checkpoint (*iteration=N.pt) in {self.ckpt_dir}; run without "
                "--resume to start fresh, or pass --ckpt_dir of the run to continue."
            )
        self.latest = latest
        super().__init__(latest or os.path.join(self.ckpt_dir, "none.pt"), load_dict, engine_key=engine_key, **kwargs)

    def attach(self, engine: Engine) -> None:
        if self.latest is None:
            if self.mode == "false" and find_latest_checkpoint(self.ckpt_dir) is not None:
                logging.getLogger(__name__).warning(
                    f"{self.ckpt_dir} holds a resume checkpoint but resume=false: training starts from scratch and "
                    "will replace it (pass --resume true to continue it)."
                )
            return
        super().attach(engine)

    def __call__(self, engine: Engine) -> None:
        super().__call__(engine)
        epoch_length = engine.state.epoch_length
        if epoch_length and engine.state.iteration % epoch_length:
            warnings.warn(
                f"{self.load_path}: resumed at iteration {engine.state.iteration}, not at the end of an epoch "
                f"(epoch_length={epoch_length}); the data stream after the resume differs from an uninterrupted run.",
                stacklevel=2,
            )
        engine.logger.info(f"resumed from {self.load_path} at iteration {engine.state.iteration}")
