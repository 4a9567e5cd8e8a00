"""Recompute the BatchNorm running statistics of both nets from training batches before they are read.

BatchNorm's running statistics are an exponential moving average (momentum 0.1, about the last ten batches)
of batch statistics taken while the weights move. When the weights move fast, as under the semi-supervised
losses, the average describes earlier weights and eval-mode outputs degrade: on LA-half the auxiliary net,
evaluated with its running statistics, over-segmented, and recomputed statistics restored it (``docs/results.md``).
This is "precise BN" (Wu and Johnson, "Rethinking 'Batch' in BatchNorm", 2021): freeze the weights, run a
few training batches in training mode, and set the running statistics to the plain average of their batch
statistics. ``torch.optim.swa_utils.update_bn`` does it for a one-input model over a loader; here both nets run
the way an iteration runs them (the auxiliary net gets the predictive net's uncertainty map), so the handler
asks the trainer for its inputs and forward pass. MONAI and ignite have no such handler.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["BatchNormRecalibration", "recalibrate_batchnorm"]


def _batchnorm_layers(networks: Iterable[torch.nn.Module]) -> list[_BatchNorm]:
    layers: list[_BatchNorm] = []
    for net in networks:
        layers.extend(m for m in net.modules() if isinstance(m, _BatchNorm) and m.track_running_stats)
    return layers


def recalibrate_batchnorm(networks: Iterable[torch.nn.Module], forward: Iterable[object]) -> int:
    """Reset the running statistics of every BatchNorm layer in ``networks`` and re-estimate them.

    Args:
        networks: the modules whose BatchNorm layers are recalibrated (they are put in training mode; the
            caller restores the mode it needs).
        forward: an iterable whose iteration runs the networks' forward passes, one training batch per step
            (e.g. a generator calling the nets); its values are ignored. It runs under ``torch.no_grad()``.

    Returns:
        The number of forward steps taken. With 0 steps the running statistics are left untouched.

    After the call each layer's ``running_mean``/``running_var`` is the average of the batch statistics of the
    steps (momentum ``None``: a cumulative average, not an exponential one); the momentum is restored. Under
    ``torch.distributed`` the statistics are then averaged over the ranks, so every rank holds the same values.
    """
    networks = list(networks)
    layers = _batchnorm_layers(networks)
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum) for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    for net in networks:
        net.train()
    steps = 0
    with torch.no_grad():
        for _ in forward:
            steps += 1
    for m, (mean, var, tracked, momentum) in zip(layers, saved):
        m.momentum = momentum
        if steps == 0:
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(tracked)
    if steps and layers and dist.is_available() and dist.is_initialized():
        flat = torch.cat([t.reshape(-1) for m in layers for t in (m.running_mean, m.running_var)])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for m in layers:
            for t in (m.running_mean, m.running_var):
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
    return steps


class BatchNormRecalibration:
    """Ignite handler: before every validation, recompute both nets' BatchNorm running statistics.

    Attach it to a :class:`~multicure_monai.engines.semi_supervised_trainer.SemiSupervisedTrainer` *before*
    the ``ValidationHandler`` (with the same ``interval`` and ``epoch_level``) and the checkpoint savers (MONAI
    ``train_handlers`` attach in list order and ignite runs handlers of one event in attach order), so
    validation, ``models/model.pt`` and the checkpoints
    hold the recomputed statistics. The batches are drawn like training batches (labelled, then unlabelled,
    same transforms); the data streams restart at the next epoch (``EpochSeedHandler``), so a resumed run
    stays bit-identical.

    Args:
        num_batches: training batches per recalibration; 0 disables the handler (the EMA statistics of plain
            PyTorch, as the paper and the peers).
        interval: recalibrate every ``interval`` epochs (``epoch_level``) or iterations; use the
            ``ValidationHandler``'s own ``interval`` and ``epoch_level``.
        epoch_level: count ``interval`` in epochs (``EPOCH_COMPLETED``) or iterations (``ITERATION_COMPLETED``).

    Cost: ``num_batches`` gradient-free forward passes of both nets, about a third of an iteration each.
    """

    def __init__(self, num_batches: int = 10, interval: int = 1, epoch_level: bool = True) -> None:
        if num_batches < 0 or interval < 1:
            raise ValueError(f"num_batches must be >= 0 and interval >= 1, got {num_batches}, {interval}.")
        self.num_batches = int(num_batches)
        self.interval = int(interval)
        self.epoch_level = bool(epoch_level)

    def attach(self, engine: Engine) -> None:
        if self.num_batches > 0:
            event = Events.EPOCH_COMPLETED if self.epoch_level else Events.ITERATION_COMPLETED
            engine.add_event_handler(event(every=self.interval), self)

    def __call__(self, engine: Engine) -> None:
        recalibrate_batchnorm([engine.network, engine.aux_network], self._steps(engine))  # type: ignore[attr-defined]

    def _steps(self, engine: Engine) -> Iterator[None]:
        """One training-like forward of both nets per batch, under the trainer's autocast (its precision, on
        CPU as on CUDA); the running statistics themselves are float32 buffers whatever the precision."""
        for x in engine.training_inputs(self.num_batches):  # type: ignore[attr-defined]
            with engine.autocast():  # type: ignore[attr-defined]
                engine.forward_networks(x)  # type: ignore[attr-defined]
            yield None
