"""multicure_monai/engines/distributed.py: the multi-process pieces of the multi-GPU configs, on one CPU process."""

from __future__ import annotations

import datetime
import socket

import pytest
import torch
import torch.distributed as dist
from monai.data import DistributedSampler
from monai.handlers import CheckpointSaver, StatsHandler

from multicure_monai.engines.distributed import (
    check_cases_per_process,
    ddp_module,
    ensure_process_group,
    rank_handlers,
    validation_sampler,
)
from multicure_monai.errors import BundleInputError


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv3d(1, 2, 1), torch.nn.BatchNorm3d(2))


@pytest.mark.parametrize("cuda, backend", [(False, "gloo"), (True, "nccl")])
@pytest.mark.parametrize("minutes", [1, 60])
def test_ensure_process_group_picks_backend_and_timeout(monkeypatch, cuda: bool, backend: str, minutes: int) -> None:
    calls: list[dict] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert ensure_process_group(minutes) is None
    assert calls == [{"backend": backend, "timeout": datetime.timedelta(minutes=minutes)}]


def test_ensure_process_group_leaves_an_existing_group_alone(monkeypatch) -> None:
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: pytest.fail("initialised twice"))
    ensure_process_group(60)


@pytest.mark.skipif(not dist.is_gloo_available(), reason="needs the gloo backend")
def test_ensure_process_group_joins_a_real_group_once(monkeypatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not dist.is_initialized()
    try:
        ensure_process_group(1)
        ensure_process_group(1)  # a second call is a no-op
        assert dist.get_backend() == "gloo" and dist.get_world_size() == 1
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sync_batchnorm", [False, True])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last_3d])
def test_ddp_module(sync_batchnorm: bool, memory_format: torch.memory_format) -> None:
    net = _net()
    module = ddp_module(net, torch.device("cpu"), memory_format, sync_batchnorm=sync_batchnorm)
    assert module is net  # converted in place; the parameter tensors stay those of the single-process net
    norm = type(module[1])
    assert norm is (torch.nn.SyncBatchNorm if sync_batchnorm else torch.nn.BatchNorm3d)
    assert module[0].weight.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize(
    "num_cases, world_size, rank, expected",
    [(4, 2, 0, [0, 2]), (4, 2, 1, [1, 3]), (3, 2, 1, [1]), (2, 2, 1, [1]), (1, 2, 0, None), (1, 2, 1, None)],
)
def test_validation_sampler(num_cases: int, world_size: int, rank: int, expected: list[int] | None) -> None:
    sampler = validation_sampler(list(range(num_cases)), num_replicas=world_size, rank=rank)
    if expected is None:
        assert sampler is None
    else:
        assert isinstance(sampler, DistributedSampler) and not sampler.shuffle
        assert list(sampler) == expected  # disjoint, in order, not padded


@pytest.mark.parametrize("num_cases, world_size", [(2, 2), (5, 2), (1, 1)])
def test_check_cases_per_process_passes(num_cases: int, world_size: int) -> None:
    assert check_cases_per_process(num_cases, world_size) is None


@pytest.mark.parametrize("num_cases, world_size", [(1, 2), (0, 1), (3, 8)])
def test_check_cases_per_process_refuses(num_cases: int, world_size: int) -> None:
    message = (
        "multi-process evaluation needs at least as many cases as processes; "
        f"got {num_cases} cases for {world_size} processes: run it single-process"
    )
    with pytest.raises(BundleInputError) as info:
        check_cases_per_process(num_cases, world_size)
    assert str(info.value) == message


class _Saver(CheckpointSaver):
    def __init__(self) -> None:  # no files: only the type matters here
        pass


class _Other:
    pass


@pytest.mark.parametrize("rank0_only", [(CheckpointSaver, StatsHandler), [CheckpointSaver, StatsHandler]])
@pytest.mark.parametrize("rank, kept", [(0, [0, 1, 2, 3, 4]), (1, [1, 3]), (3, [1, 3])])
def test_rank_handlers(rank0_only, rank: int, kept: list[int]) -> None:
    handlers = [_Saver(), _Other(), StatsHandler(iteration_log=False), _Other(), _Saver()]
    result = rank_handlers(handlers, rank0_only, rank=rank)
    assert result is not handlers
    assert [id(h) for h in result] == [id(handlers[i]) for i in kept]  # same objects, same order
