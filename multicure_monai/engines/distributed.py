"""The pieces of a multi-process (torchrun) run that the bundle's multi-GPU configs wire in.

``bundle/configs/multi_gpu_train.yaml`` and ``multi_gpu_evaluate.yaml`` call these (as
``multicure_monai.engines.<name>``) so that each of their expressions stays one short line: joining the
process group (:func:`ensure_process_group`), the module a ``DistributedDataParallel`` wraps
(:func:`ddp_module`), the validation sampler (:func:`validation_sampler`), the refusal of a split with fewer
cases than processes (:func:`check_cases_per_process`) and the handlers that run on rank 0 only
(:func:`rank_handlers`).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Sequence, Sized
from typing import Any

import torch
import torch.distributed as dist
from monai.data import DistributedSampler

from multicure_monai.errors import BundleInputError

__all__ = [
    "check_cases_per_process",
    "ddp_module",
    "ensure_process_group",
    "rank_handlers",
    "validation_sampler",
]


def ensure_process_group(timeout_minutes: float) -> None:
    """Join torchrun's default process group unless this process is already in one.

    The backend is ``nccl`` when CUDA is available, else ``gloo``; rank, world size and rendezvous come from
    torchrun's environment variables (``init_method="env://"``).

    Args:
        timeout_minutes: how long a collective waits for the other ranks (e.g. while rank 0 writes a checkpoint).
    """
    if dist.is_initialized():
        return
    dist.init_process_group(
        backend="nccl" if torch.cuda.is_available() else "gloo",
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )


def ddp_module(
    network: torch.nn.Module,
    device: torch.device,
    memory_format: torch.memory_format = torch.contiguous_format,
    sync_batchnorm: bool = False,
) -> torch.nn.Module:
    """The module to wrap in ``DistributedDataParallel``: ``network`` on ``device``, optionally with SyncBatchNorm.

    Args:
        network: the single-process net; with ``sync_batchnorm`` its BatchNorm layers are replaced in place
            (:meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`), otherwise it is returned moved.
        device: where the module's parameters go.
        memory_format: memory format of its parameters (e.g. ``torch.channels_last_3d``).
        sync_batchnorm: use SyncBatchNorm (CUDA/NCCL only: PyTorch has no CPU kernel for it).

    Returns:
        The module on ``device``.
    """
    module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(network) if sync_batchnorm else network
    return module.to(device, memory_format=memory_format)


def validation_sampler(
    dataset: Sized, num_replicas: int | None = None, rank: int | None = None
) -> DistributedSampler | None:
    """A sampler giving each rank a disjoint shard of ``dataset``, or None when it has fewer cases than ranks.

    With ``None`` every rank validates on the whole set; MONAI's metrics all-gather, so the means are the
    single-process ones either way. The shards are neither padded nor shuffled.

    Args:
        dataset: the validation dataset.
        num_replicas: number of processes; default: the process group's world size.
        rank: this process's rank; default: its rank in the process group.

    Returns:
        A :class:`monai.data.DistributedSampler` (``even_divisible=False, shuffle=False``) or ``None``.
    """
    world_size = dist.get_world_size() if num_replicas is None else num_replicas
    if len(dataset) < world_size:
        return None
    return DistributedSampler(dataset, even_divisible=False, num_replicas=num_replicas, rank=rank, shuffle=False)


def check_cases_per_process(num_cases: int, world_size: int | None = None) -> None:
    """Refuse a multi-process evaluation with fewer cases than processes.

    A process with an empty shard would skip its run and leave the others waiting in the metrics' all-gather.

    Args:
        num_cases: number of cases in the evaluated split.
        world_size: number of processes; default: the process group's world size.

    Raises:
        BundleInputError: ``num_cases < world_size``.
    """
    world_size = dist.get_world_size() if world_size is None else world_size
    if num_cases < world_size:
        raise BundleInputError(
            "multi-process evaluation needs at least as many cases as processes; got %d cases for %d processes: "
            "run it single-process" % (num_cases, world_size)
        )


def rank_handlers(handlers: Iterable[Any], rank0_only: Sequence[type], rank: int | None = None) -> list[Any]:
    """The handlers this rank attaches: all of them on rank 0, elsewhere those not of a ``rank0_only`` type.

    Filtering by type keeps the result independent of the order of the configs' handler lists; the order of
    ``handlers`` is kept.

    Args:
        handlers: the single-process handler list.
        rank0_only: handler types that write files or logs (checkpoint savers, loggers, progress bars, ...).
        rank: this process's rank; default: its rank in the process group.

    Returns:
        A new list holding the same handler objects.
    """
    rank = dist.get_rank() if rank is None else rank
    types = tuple(rank0_only)
    return [h for h in handlers if rank == 0 or not isinstance(h, types)]
