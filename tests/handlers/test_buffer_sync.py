"""Tests for multicure_monai/handlers/buffer_sync.py: two gloo processes on CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents

from multicure_monai.handlers.buffer_sync import BufferSyncHandler, broadcast_buffers

WORLD = 2


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv3d(1, 2, 1), torch.nn.BatchNorm3d(2), torch.nn.BatchNorm3d(2))


def _worker(rank: int, init_file: str, out_dir: str, epoch_length: int, max_epochs: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    nets = [_net(), _net()]
    handler = BufferSyncHandler(nets)
    log: list[tuple[int, bool]] = []

    def step(engine: Engine, _batch: object) -> None:
        for net in nets:  # rank-dependent batches: the running statistics drift apart
            net.train()(torch.randn(2, 1, 3, 3, 3) * (rank + 1) + rank)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)

    engine = Engine(step)
    engine.register_events(*IterationEvents)
    handler.attach(engine)

    @engine.on(Events.ITERATION_COMPLETED)
    def _record(e: Engine) -> None:  # what a validation / checkpoint handler would read at this point
        same = []
        for net in nets:
            for buf in net.buffers():
                gathered = [torch.empty_like(buf) for _ in range(WORLD)]
                dist.all_gather(gathered, buf)
                same.append(all(torch.equal(gathered[0], g) for g in gathered))
        log.append((e.state.iteration, all(same)))

    engine.run(range(epoch_length), max_epochs=max_epochs, epoch_length=epoch_length)
    # direct call: floating point and integer (num_batches_tracked) buffers -> one collective per dtype
    nets[0](torch.randn(2, 1, 3, 3, 3) * (rank + 1))
    collectives = broadcast_buffers(nets)
    torch.save({"log": log, "collectives": collectives, "state": nets[0].state_dict()}, Path(out_dir) / f"{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("epoch_length, max_epochs", [(3, 2)])
def test_buffers_identical_exactly_at_epoch_ends(tmp_path: Path, epoch_length: int, max_epochs: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), epoch_length, max_epochs), nprocs=WORLD)
    results = [torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in range(WORLD)]
    log = results[0]["log"]
    assert [it for it, _ in log] == list(range(1, epoch_length * max_epochs + 1))
    for it, same in log:
        assert same == (it % epoch_length == 0), (it, same)  # synced at epoch ends only, drifted otherwise
    assert results[0]["collectives"] == 2
    for key, value in results[0]["state"].items():
        assert torch.equal(value, results[1]["state"][key]), key


def test_noop_without_process_group() -> None:
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert broadcast_buffers([net]) == 0
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
