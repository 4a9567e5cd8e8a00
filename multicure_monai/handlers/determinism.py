"""Per-epoch re-seeding, so that a resumed run sees exactly the data of an uninterrupted one.

Restoring torch's RNG state from a checkpoint does not reproduce the data stream: MONAI's random transforms
hold their own ``RandomState``; ``DataLoader`` shuffling and worker seeds are drawn from torch's RNG when an
iterator is created; ignite's labelled iterator and the trainer's unlabelled iterator run across epoch
boundaries. :class:`EpochSeedHandler` therefore makes every epoch's stream a function of ``(seed, epoch)``
only: at ``EPOCH_STARTED`` it seeds ``torch``/``numpy``/``random`` and every given dataset's transforms from
``(seed, epoch)`` and restarts both data iterators. A checkpoint written at the end of an epoch then resumes
bit-identically (on CPU; on GPU up to cuDNN/atomics non-determinism). MONAI has ``set_determinism`` (one
seed for the whole run) but nothing that ties the data stream to the epoch number, hence this handler.

Cost: the labelled and unlabelled loaders restart at each epoch (the engine's epoch is ``val_interval``
iterations, usually more than one pass over the few labelled cases), so each epoch begins with a fresh
shuffle instead of continuing the previous one; the distribution of batches is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from ignite.engine import Engine, Events
from ignite.utils import manual_seed
from monai.data.utils import set_rnd
from monai.utils import MAX_SEED

__all__ = ["epoch_seed", "EpochSeedHandler"]


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 32-bit seed for ``(seed, epoch)`` (numpy ``SeedSequence``; epochs never share streams)."""
    return int(np.random.SeedSequence([int(seed) % MAX_SEED, int(epoch)]).generate_state(1)[0]) % MAX_SEED


class EpochSeedHandler:
    """Ignite handler: at every ``EPOCH_STARTED``, re-seed everything from ``(seed, epoch)`` and restart the data.

    Attach it to the trainer (MONAI ``train_handlers``). It must run before anything consumes randomness in
    the epoch; ignite fires ``EPOCH_STARTED`` before the first batch is drawn.

    Args:
        seed: the run's seed (``@seed``).
        datasets: datasets whose transforms are re-seeded (``monai.data.utils.set_rnd`` on
            ``dataset.transform``), e.g. the labelled and the unlabelled training sets.
        restart_data: restart the engine's (labelled) data iterator and, when the engine has
            ``reset_unlabeled_stream``, the unlabelled one, so that each epoch's batches do not depend on
            where the previous epoch stopped.
    """

    def __init__(self, seed: int, datasets: Sequence[Any] = (), restart_data: bool = True) -> None:
        self.seed = int(seed)
        self.datasets = [d for d in datasets if d is not None]
        self.restart_data = restart_data

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        epoch = int(engine.state.epoch)
        s = epoch_seed(self.seed, epoch)
        manual_seed(s)  # torch (CPU and CUDA), numpy, random
        for i, dataset in enumerate(self.datasets):
            set_rnd(getattr(dataset, "transform", dataset), seed=epoch_seed(s, i + 1))
        if not self.restart_data:
            return
        if engine.state.dataloader is not None:
            engine.set_data(engine.state.dataloader)
        reset = getattr(engine, "reset_unlabeled_stream", None)
        if callable(reset):
            reset(sampler_epoch=epoch << 16)
