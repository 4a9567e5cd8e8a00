"""An endless iterator over a data loader, for the unlabelled stream that runs beside ignite's labelled one.

Ignite restarts the engine's own (labelled) loader itself; the trainer's second, unlabelled loader has a different
length, so it is cycled here: re-iterated when exhausted, with ``sampler.set_epoch`` called on every restart so a
``DistributedSampler`` reshuffles. Neither MONAI nor ignite has an iterator that does this for a second loader.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["CyclingLoader"]


class CyclingLoader:
    """Yields the batches of ``loader`` forever, restarting it (and its sampler's epoch) when exhausted.

    Args:
        loader: a data loader (any re-iterable); its ``sampler.set_epoch`` is called on each restart if present.

    Attributes:
        epoch: number of the current pass, the value given to ``sampler.set_epoch``.
    """

    def __init__(self, loader: Iterable) -> None:
        self.loader = loader
        self.epoch = 0
        self._iter: Iterator | None = None

    def next(self) -> Any:
        """The next batch; starts a new pass (``epoch + 1``) when the current one is exhausted."""
        if self._iter is None:
            self._iter = self._restart()
        try:
            return next(self._iter)
        except StopIteration:
            self.epoch += 1
            self._iter = self._restart()
            return next(self._iter)

    def reset(self, epoch: int | None = None) -> None:
        """Start afresh: the next batch comes from a new iterator; ``epoch`` (if given) sets the pass number."""
        self._iter = None
        if epoch is not None:
            self.epoch = int(epoch)

    def _restart(self) -> Iterator:
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        return iter(self.loader)
