"""Resume a killed run from the latest checkpoint in a folder.

:class:`ResumeCheckpointLoader` finds the latest resume checkpoint (``*iteration=N.pt``, written by
:class:`~multicure_monai.handlers.checkpoint_saver.AtomicCheckpointSaver`) and loads it into the nets,
optimizer, lr scheduler, trainer (iteration/epoch counters) and the ``models/model.pt`` saver, for
``resume: true`` (a missing checkpoint is an error) or ``resume: auto`` (start fresh when there is none).
:func:`resume_checkpoint_dict` names what such a checkpoint holds.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import warnings
from typing import Any

from ignite.engine import Engine

from multicure_monai.errors import BundleInputError, MissingFileError

from .checkpoint_loader import SafeCheckpointLoader

__all__ = ["find_latest_checkpoint", "resume_checkpoint_dict", "ResumeCheckpointLoader"]

_CKPT_RE = re.compile(r"iteration=(\d+)\.pt$")

# one logger for the checkpoint modules (saver, loader, resume, architecture record)
_logger = logging.getLogger("multicure_monai.handlers.checkpoint")


def find_latest_checkpoint(ckpt_dir: str | os.PathLike, pattern: str = "*iteration=*.pt") -> str | None:
    """The checkpoint with the highest ``iteration=N`` in ``ckpt_dir``.

    Args:
        ckpt_dir: folder to search.
        pattern: glob of the candidate files (the number is read from ``iteration=N.pt`` at the name's end).

    Returns:
        Its path, or ``None`` if there is none.
    """
    best: tuple[int, str] | None = None
    for path in glob.glob(os.path.join(os.fspath(ckpt_dir), pattern)):
        m = _CKPT_RE.search(os.path.basename(path))
        if m and (best is None or int(m.group(1)) > best[0]):
            best = (int(m.group(1)), path)
    return None if best is None else best[1]


def resume_checkpoint_dict(
    network: Any,
    aux_network: Any,
    optimizer: Any,
    lr_scheduler: Any,
    model_saver: Any,
    ema_network: Any | None = None,
) -> dict[str, Any]:
    """What a resume checkpoint holds: the objects that are saved to it and loaded from it, by key.

    The keys are the names of the arguments, in this order; ``ema_network`` only when there is one (the EMA
    teacher), so a checkpoint of a run without it has no such key.

    Args:
        network: the predictive net.
        aux_network: the auxiliary net.
        optimizer: the optimizer of both nets.
        lr_scheduler: its learning-rate scheduler.
        model_saver: the saver of ``models/model.pt`` (its best metric so far).
        ema_network: the EMA teacher, or ``None``.

    Returns:
        The ``save_dict`` / ``load_dict`` of the resume checkpoint saver and loader.
    """
    objects = {
        "network": network,
        "aux_network": aux_network,
        "optimizer": optimizer,
        "lr_scheduler": lr_scheduler,
        "model_saver": model_saver,
    }
    if ema_network is not None:
        objects["ema_network"] = ema_network
    return objects


class ResumeCheckpointLoader(SafeCheckpointLoader):
    """Resume a killed run from the latest ``*iteration=N.pt`` in ``ckpt_dir`` (on ``Events.STARTED``).

    Args:
        ckpt_dir: folder of the resume checkpoints (written by ``AtomicCheckpointSaver``).
        load_dict: objects to restore, e.g. ``{"network": ..., "aux_network": ..., "optimizer": ...,
            "lr_scheduler": ..., "model_saver": ...}``; with ``engine_key`` the trainer is added at ``attach``.
        resume: ``False``/``"false"``: do nothing; ``True``/``"true"``: load the latest checkpoint, error if
            there is none; ``"auto"``: load it if there is one, else start fresh.
        engine_key: key of the trainer's own state in the checkpoint (default ``"trainer"``).
        kwargs: passed to :class:`SafeCheckpointLoader` (``map_location``, ``strict``, ...).

    Raises:
        ValueError: ``resume`` is none of the values above.
        FileNotFoundError: ``resume=true`` and ``ckpt_dir`` holds no resume checkpoint.
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
            raise BundleInputError(f"resume must be true, false or 'auto', got {resume!r} (--resume true|false|auto).")
        self.mode = {"0": "false", "1": "true"}.get(mode, mode)
        self.ckpt_dir = os.fspath(ckpt_dir)
        latest = None if self.mode == "false" else find_latest_checkpoint(self.ckpt_dir)
        if self.mode == "true" and latest is None:
            raise MissingFileError(
                f"resume=true but no resume checkpoint (*iteration=N.pt) in {self.ckpt_dir}; run without "
                "--resume to start fresh, or pass --ckpt_dir of the run to continue."
            )
        self.latest = latest
        super().__init__(latest or os.path.join(self.ckpt_dir, "none.pt"), load_dict, engine_key=engine_key, **kwargs)

    def attach(self, engine: Engine) -> None:
        """Attach (load on ``STARTED``) only when there is a checkpoint to resume from.

        Args:
            engine: the trainer.
        """
        if self.latest is None:
            if self.mode == "false" and find_latest_checkpoint(self.ckpt_dir) is not None:
                _logger.warning(
                    f"{self.ckpt_dir} holds a resume checkpoint but resume=false: training starts from scratch and "
                    "will replace it (pass --resume true to continue it)."
                )
            return
        super().attach(engine)

    def __call__(self, engine: Engine) -> None:
        """Load the checkpoint; warn if it was not written at the end of an epoch.

        Args:
            engine: the trainer.
        """
        super().__call__(engine)
        epoch_length = engine.state.epoch_length
        if epoch_length and engine.state.iteration % epoch_length:
            warnings.warn(
                f"{self.load_path}: resumed at iteration {engine.state.iteration}, not at the end of an epoch "
                f"(epoch_length={epoch_length}); the data stream after the resume differs from an uninterrupted run.",
                stacklevel=2,
            )
        engine.logger.info(f"resumed from {self.load_path} at iteration {engine.state.iteration}")
