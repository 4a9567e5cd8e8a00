"""Weights-only checkpoint loading with one clear error per failure, each naming the file.

Why not MONAI's loader as it is: :class:`monai.handlers.CheckpointLoader` (MONAI 1.6) already passes
``weights_only=True``, but the error for a refused pickle is torch's long ``UnpicklingError`` that does not
name the file, and a missing or truncated file gives an equally anonymous error. :func:`safe_load` turns each
case into one clear message naming the file; :class:`SafeCheckpointLoader` uses it.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from ignite.engine import Engine
from ignite.handlers import Checkpoint
from monai.handlers import CheckpointLoader

from .checkpoint_architecture import check_architecture, explain_load_error, read_architecture

__all__ = ["UnsafeCheckpointError", "CorruptCheckpointError", "safe_load", "SafeCheckpointLoader", "check_loaders"]

# torch's weights-only unpickler messages for a refused object (vs. an unreadable stream: "Unsupported operand")
_UNSAFE_MARKERS = ("Unsupported global", "unrecognized function", "Unsupported class", "not an allowed global")


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint holds pickled objects other than tensors/containers; it was refused, nothing was run."""


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or otherwise unreadable."""


def safe_load(path: str | os.PathLike, map_location: Any = None) -> Any:
    """``torch.load(path, weights_only=True)`` with one clear error per failure, each naming the file.

    Args:
        path: the checkpoint file.
        map_location: as for :func:`torch.load`.

    Returns:
        The loaded object (usually a dict of state dicts).

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

    MONAI's ``__init__`` (argument checks, ``strict``/``strict_shape``) and ``attach`` (``Events.STARTED``,
    logger) are reused. Its ``__call__`` is not: MONAI 1.6.1 calls ``torch.load`` inline (no loading hook to
    override) and also differs beyond loading. Here a non-dict checkpoint and (with ``strict``) missing keys
    are errors naming the file, while with ``strict=False`` absent keys are skipped (MONAI/ignite raise
    ``ValueError``); ``strict_shape=False`` matches each module against its own entry of the checkpoint
    (MONAI passes the whole checkpoint to ``copy_model_state``, which then matches nothing) and neither
    ``load_dict`` nor the loaded checkpoint is modified; the epoch-overflow error names the file.

    Same arguments as MONAI's loader, plus ``engine_key``: also restore the engine this handler is attached to
    (ignite ``state_dict``: iteration, epoch) from that key of the checkpoint; and ``architecture``: the
    switches that shape the configured networks, compared with the checkpoint's record before anything is
    loaded (:mod:`~multicure_monai.handlers.checkpoint_architecture`; one ``BundleInputError`` naming each
    mismatch and its flag). A checkpoint without a record loads as before; if its weights do not fit, the
    error names the switches to set instead of PyTorch's ``size mismatch`` list.
    """

    def __init__(
        self,
        load_path: str,
        load_dict: dict,
        *args: Any,
        engine_key: str | None = None,
        architecture: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ):
        super().__init__(load_path, dict(load_dict), *args, **kwargs)
        self.engine_key = engine_key
        self.architecture = None if architecture is None else dict(architecture)

    def attach(self, engine: Engine) -> None:
        """Put ``engine`` into the objects to restore under ``engine_key`` (if given), then attach as MONAI does.

        Args:
            engine: the ignite engine (trainer or evaluator); the checkpoint is loaded on its ``STARTED``.
        """
        if self.engine_key is not None:
            self.load_dict[self.engine_key] = engine
        super().attach(engine)

    def _read_checkpoint(self) -> Mapping:
        """Load ``load_path`` through :func:`safe_load` and check it holds every key of ``load_dict``.

        Returns:
            The checkpoint as a mapping (a bare state dict is wrapped under the only key of ``load_dict``).

        Raises:
            CorruptCheckpointError: unreadable file or not a mapping.
            UnsafeCheckpointError: see :func:`safe_load`.
            KeyError: ``strict`` and a key of ``load_dict`` is missing from the checkpoint.
        """
        checkpoint = safe_load(self.load_path, map_location=self.map_location)
        if not isinstance(checkpoint, Mapping):
            raise CorruptCheckpointError(f"{self.load_path}: expected a dict of state dicts, got {type(checkpoint)}")
        k = next(iter(self.load_dict))
        if len(self.load_dict) == 1 and k not in checkpoint:  # a bare state dict, as MONAI's loader accepts
            checkpoint = {k: checkpoint}
        missing = [key for key in self.load_dict if key not in checkpoint]
        if missing and self.strict:
            raise KeyError(f"{self.load_path}: checkpoint has no {missing}; it holds {sorted(checkpoint)}")
        return checkpoint

    def __call__(self, engine: Engine) -> None:
        """Restore the objects of ``load_dict`` (and the engine's counters) from ``load_path``.

        Args:
            engine: the ignite engine this handler is attached to.

        Raises:
            BundleInputError: the checkpoint records other architecture switches than ``architecture``, or
                (without a record) its weights do not fit the networks.
            ValueError: the checkpoint's epoch is beyond the engine's ``max_epochs``.
        """
        checkpoint = self._read_checkpoint()
        recorded = None
        if self.architecture is not None:
            recorded = read_architecture(self.load_path, checkpoint)
            check_architecture(self.load_path, recorded, self.architecture)
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
        try:
            Checkpoint.load_objects(to_load=load_dict, checkpoint=dict(checkpoint), strict=self.strict)
        except RuntimeError as e:
            explained = None
            if self.architecture is not None and recorded is None:
                explained = explain_load_error(self.load_path, e, self.architecture)
            if explained is None:
                raise
            raise explained from e
        if prior_max_epochs is not None and engine.state.epoch > prior_max_epochs:
            raise ValueError(
                f"{self.load_path}: the checkpoint is at epoch {engine.state.epoch} (iteration "
                f"{engine.state.iteration}), beyond this run's max_epochs={prior_max_epochs}; raise max_iterations "
                "to train further."
            )
        engine.state.max_epochs = prior_max_epochs
        self.logger.info(f"Restored {sorted(load_dict)} from {self.load_path}")


def check_loaders(handlers: list, architecture: Mapping[str, Any]) -> list:
    """Check the checkpoint of every plain MONAI ``CheckpointLoader`` in a handler list before training starts.

    MONAI Label's fine-tuning inserts MONAI's own ``CheckpointLoader`` (``models/model.pt`` into ``network``)
    at the front of ``train#handlers``; it runs before any handler of this package. This check reads the
    record of its file when the trainer is built. The package's loaders check themselves and are skipped.

    Args:
        handlers: the trainer's handler objects.
        architecture: the configured switches.

    Returns:
        ``handlers``, unchanged.

    Raises:
        BundleInputError: a loader's checkpoint records other switches (see :func:`check_architecture`).
    """
    for h in handlers:
        if isinstance(h, CheckpointLoader) and not isinstance(h, SafeCheckpointLoader):
            path = getattr(h, "load_path", None)
            if path and os.path.isfile(path):
                check_architecture(path, read_architecture(path), architecture)
    return handlers
