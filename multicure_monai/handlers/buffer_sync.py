"""Make the ranks' module buffers (BatchNorm running statistics) identical before anything reads them.

Under ``DistributedDataParallel`` the parameters stay identical across ranks (averaged gradients, same optimizer
step), but buffers do not: every rank updates its BatchNorm running statistics from its own batch. DDP's own
remedy, ``broadcast_buffers=True``, broadcasts rank 0's buffers at the start of *every* forward of *every*
wrapped net, although training-mode BatchNorm never reads them. :class:`BufferSyncHandler` does it only when
they are read (validation, checkpoints, the final model: at the end of every engine epoch), in one collective
per dtype instead of one per buffer, so the multi-GPU bundle config builds the nets with
``broadcast_buffers=False``. ignite and MONAI have no such handler.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from ignite.engine import Engine
from monai.engines.utils import IterationEvents

__all__ = ["BufferSyncHandler", "broadcast_buffers"]


def broadcast_buffers(modules: Iterable[torch.nn.Module], src: int = 0) -> int:
    """Overwrite every floating point and integer buffer of ``modules`` with rank ``src``'s values.

    The buffers are flattened into one tensor per dtype (and device) and broadcast once each.

    Args:
        modules: modules whose ``buffers()`` are synchronised (a ``DistributedDataParallel`` wrapper or the
            module it wraps: the buffers are the same tensors).
        src: global rank whose values win.

    Returns:
        The number of collectives issued (0 outside an initialised process group or without buffers).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    seen: set[int] = set()
    for module in modules:
        for buf in module.buffers():
            if id(buf) not in seen:
                seen.add(id(buf))
                groups.setdefault((buf.dtype, buf.device), []).append(buf)
    for bufs in groups.values():
        flat = torch.cat([b.detach().reshape(-1) for b in bufs])
        dist.broadcast(flat, src=src)
        offset = 0
        for b in bufs:
            n = b.numel()
            b.detach().copy_(flat[offset : offset + n].view_as(b))
            offset += n
    return len(groups)


class BufferSyncHandler:
    """Broadcast rank ``src``'s buffers of ``networks`` after the optimizer step of each engine epoch's last iteration.

    It runs on MONAI's ``IterationEvents.MODEL_COMPLETED``, which the trainer fires before any
    ``ITERATION_COMPLETED`` / ``EPOCH_COMPLETED`` handler, so validation, checkpoint savers and the final
    model all see one set of running statistics on every rank.

    Args:
        networks: the modules to synchronise (e.g. both DDP-wrapped nets).
        src: global rank whose buffers win.
    """

    def __init__(self, networks: Sequence[torch.nn.Module], src: int = 0) -> None:
        self.networks = list(networks)
        self.src = int(src)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.MODEL_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if engine.state.iteration % engine.state.epoch_length == 0:
            broadcast_buffers(self.networks, self.src)
