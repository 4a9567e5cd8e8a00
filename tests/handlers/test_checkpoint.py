"""Atomic checkpoint writes, weights-only loading, and the NaN guard (multicure_monai/handlers/checkpoint_*.py)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from monai.losses import DiceCELoss
from torch import nn
from torch.utils.data import DataLoader

from multicure_monai.atomic_files import TMP_SUFFIX
from multicure_monai.handlers.checkpoint_loader import (
    CorruptCheckpointError,
    SafeCheckpointLoader,
    UnsafeCheckpointError,
    safe_load,
)
from multicure_monai.handlers.checkpoint_saver import AtomicCheckpointSaver, AtomicDiskSaver, atomic_torch_save
from multicure_monai.engines.loss_terms import method_loss_terms
from multicure_monai.engines.semi_supervised_trainer import SemiSupervisedTrainer
from multicure_monai.losses.pseudo_label import PseudoLabelLoss

REPO = Path(__file__).resolve().parents[2]


def _state(value: float) -> dict:
    return {"model": {"w": torch.full((64, 64), value), "b": torch.arange(3)}}


# ------------------------------------------------------------------------------------------ atomic writes

SLOW_WRITER = textwrap.dedent(
    """
    import io, sys, time, torch
    from multicure_monai.handlers.checkpoint_saver import atomic_torch_save

    target, marker = sys.argv[1], sys.argv[2]
    real_save = torch.save

    def slow_save(obj, f, *args, **kwargs):  # serialise, then write in small chunks, slowly
        buf = io.BytesIO()
        real_save(obj, buf)
        data = buf.getvalue()
        for i in range(0, len(data), 1024):
            f.write(data[i:i + 1024])
            f.flush()
            if i == 1024:
                open(marker, "w").close()  # tell the parent we are mid-write
            time.sleep(0.05)

    torch.save = slow_save
    atomic_torch_save({"model": {"w": torch.full((64, 64), 2.0), "b": torch.arange(3)}}, target)
    """
)


def test_kill_during_write_keeps_previous_checkpoint(tmp_path: Path) -> None:
    target = tmp_path / "model.pt"
    atomic_torch_save(_state(1.0), target)
    marker = tmp_path / "mid_write"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(target), str(marker)], cwd=REPO)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, "writer exited before it started writing"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # the target still holds the previous, complete checkpoint; the partial write is a hidden non-.pt file
    loaded = torch.load(target, map_location="cpu", weights_only=True)
    torch.testing.assert_close(loaded["model"]["w"], torch.full((64, 64), 1.0))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(TMP_SUFFIX)]
    assert len(leftovers) == 1 and leftovers[0].startswith(".model.pt.")
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["model.pt"]
    # the next saver on that folder removes the leftover
    AtomicDiskSaver(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(TMP_SUFFIX)]


def test_atomic_file_is_complete_and_world_readable(tmp_path: Path) -> None:
    path = atomic_torch_save(_state(3.0), tmp_path / "sub" / "model.pt")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert torch.equal(torch.load(path, weights_only=True)["model"]["w"], torch.full((64, 64), 3.0))
    assert os.listdir(tmp_path / "sub") == ["model.pt"]


def test_previous_checkpoint_survives_until_new_one_is_complete(tmp_path: Path, monkeypatch) -> None:
    """Ignite removes the old file before writing the new one; the atomic saver defers that removal."""
    seen_during_write: list[list[str]] = []
    real_save = torch.save

    def spying_save(obj, f, *args, **kwargs):
        seen_during_write.append(sorted(p.name for p in tmp_path.glob("*.pt")))
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", spying_save)
    net = nn.Linear(2, 2)
    engine = Engine(lambda e, b: None)
    to_save = {"net": net, "opt": torch.optim.SGD(net.parameters(), lr=0.1)}
    ckpt = Checkpoint(to_save, AtomicDiskSaver(tmp_path), n_saved=1)
    engine.add_event_handler(Events.ITERATION_COMPLETED, ckpt)
    engine.run([0, 1, 2], max_epochs=1)
    assert seen_during_write == [[], ["checkpoint_1.pt"], ["checkpoint_2.pt"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_3.pt"]


@pytest.mark.parametrize("save_key_metric", [True, False])
def test_atomic_checkpoint_saver_swaps_every_save_handler(tmp_path: Path, save_key_metric: bool) -> None:
    kwargs = dict(save_key_metric=True, key_metric_filename="model.pt") if save_key_metric else dict(save_interval=1)
    saver = AtomicCheckpointSaver(str(tmp_path), {"model": nn.Linear(2, 2)}, save_final=True, **kwargs)
    for ckpt in (saver._final_checkpoint, saver._key_metric_checkpoint, saver._interval_checkpoint):
        if ckpt is not None:
            assert isinstance(ckpt.save_handler, AtomicDiskSaver)
    if save_key_metric:
        assert saver._key_metric_checkpoint.save_handler.filename == "model.pt"


def test_saver_refuses_nan_weights_and_keeps_previous(tmp_path: Path) -> None:
    net = nn.Linear(2, 2)
    saver = AtomicDiskSaver(tmp_path, filename="model.pt")
    saver({"model": net.state_dict()}, "ignored.pt")
    with torch.no_grad():
        net.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"refusing to write .*model\.pt: non-finite .*model\.weight"):
        saver({"model": net.state_dict()}, "ignored.pt")
    kept = torch.load(tmp_path / "model.pt", weights_only=True)["model"]["weight"]
    assert torch.isfinite(kept).all()


# ------------------------------------------------------------------------------------------ safe loading


class _Malicious:
    """Unpickling this runs ``exec`` and creates a file: what ``weights_only=True`` must refuse."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_malicious_pickle_is_refused_and_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "model.pt"
    torch.save({"model": {"w": torch.ones(2)}, "extra": _Malicious(marker)}, path)
    with pytest.raises(UnsafeCheckpointError) as err:
        safe_load(path)
    message = str(err.value)
    assert str(path) in message and "non-tensor pickled objects" in message and "refused" in message
    assert "(e.g. exec)" in message and "nothing in it was executed" in message
    assert not marker.exists()
    # and through the handler used by evaluate.yaml / inference.yaml
    loader = SafeCheckpointLoader(str(path), {"model": nn.Linear(2, 2)})
    with pytest.raises(UnsafeCheckpointError, match="refused to load"):
        loader(Engine(lambda e, b: None))
    assert not marker.exists()
    # the pickle really is malicious: unsafe loading runs it
    torch.load(path, weights_only=False)
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "missing"])
def test_unreadable_checkpoint_names_the_file(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "model.pt"
    torch.save(_state(1.0), path)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "garbage":
        path.write_bytes(b"not a checkpoint" * 10)
    else:
        path.unlink()
    with pytest.raises(CorruptCheckpointError) as err:
        safe_load(path)
    assert str(path) in str(err.value)


def test_safe_loader_restores_weights(tmp_path: Path) -> None:
    src, dst = nn.Linear(3, 2), nn.Linear(3, 2)
    atomic_torch_save({"model": src.state_dict()}, tmp_path / "model.pt")
    SafeCheckpointLoader(str(tmp_path / "model.pt"), {"model": dst})(Engine(lambda e, b: None))
    assert torch.equal(src.weight, dst.weight)


# ------------------------------------------------------------------------------------------ NaN loss


class _TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3, padding=1)

    def forward(self, x, uncertainty=None, return_features=False):
        return self.conv(x)


class _NaNAt:
    """DiceCE that returns NaN from the ``at``-th iteration (2 calls per iteration: one per net)."""

    def __init__(self, at: int) -> None:
        self.loss, self.calls, self.at = DiceCELoss(to_onehot_y=True, softmax=True), 0, at

    def __call__(self, logits, labels):
        self.calls += 1
        value = self.loss(logits, labels)
        return value * float("nan") if self.calls > 2 * (self.at - 1) else value


def test_nan_loss_stops_run_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net, aux = _TinyNet(), _TinyNet()
    data = [{"image": torch.randn(1, 8, 8, 8), "label": (torch.rand(1, 8, 8, 8) > 0.5).float()} for _ in range(2)]
    trainer = SemiSupervisedTrainer(
        device="cpu",
        max_epochs=3,
        epoch_length=2,
        train_data_loader=DataLoader(data, batch_size=1),
        unlabeled_data_loader=DataLoader([{"image": torch.randn(1, 8, 8, 8)}] * 2, batch_size=1),
        network=net,
        aux_network=aux,
        optimizer=torch.optim.SGD(list(net.parameters()) + list(aux.parameters()), lr=0.01, momentum=0.9),
        loss_terms=method_loss_terms(_NaNAt(at=4), PseudoLabelLoss(confidence_threshold=0.5 + 1e-6)),
        decollate=False,
    )
    saver = AtomicCheckpointSaver(
        str(tmp_path), {"network": net, "aux_network": aux}, engine_key="trainer", epoch_level=True, save_interval=1,
        n_saved=1,
    )  # fmt: skip
    saver.attach(trainer)
    with pytest.raises(FloatingPointError, match=r"non-finite loss at iteration 4: loss_sup=nan"):
        trainer.run()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["checkpoint_iteration=2.pt"]
    ckpt = torch.load(tmp_path / files[0], weights_only=True)
    assert ckpt["trainer"]["iteration"] == 2
    for key in ("network", "aux_network"):
        assert all(torch.isfinite(v).all() for v in ckpt[key].values())
    assert all(torch.isfinite(p).all() for p in list(net.parameters()) + list(aux.parameters()))
