"""Resume after SIGKILL: the bundle's training, killed after its first checkpoint and resumed, ends bit-identical.

Tiny phantoms (32^3), K = 4 iterations with ``val_interval = checkpoint_interval = 2``: an uninterrupted run,
then a run killed with SIGKILL (no chance to clean up) right after ``ckpt/checkpoint_iteration=2.pt`` appears,
then the same command plus ``--resume true``. On CPU with one thread, every saved tensor (both nets, SGD
momentum buffers, lr scheduler, iteration counter, best-metric model.pt) must be equal bit for bit:
:class:`multicure_monai.handlers.determinism.EpochSeedHandler` makes each epoch's data a function of
``(seed, epoch)``, and the checkpoint holds everything else.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ignite.engine import Events

from multicure_monai.handlers import find_latest_checkpoint

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "bundle" / "configs" / "train.yaml"
K = 4
TINY = {
    "max_iterations": str(K),
    "val_interval": "2",
    "checkpoint_interval": "2",
    "roi_size": "[32,32,32]",
    "sw_stride": "[16,16,16]",
    "sw_batch_size": "2",
    "num_workers": "0",
}

pytestmark = pytest.mark.slow


def _cmd(root: Path, datalist: Path, **extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(TRAIN)]
    for key, value in {"bundle_root": str(root), "datalist": str(datalist), **TINY, **extra}.items():
        cmd += [f"--{key}", value]
    return cmd


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=_env())
    assert proc.returncode == 0, f"failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def _assert_same(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: max |diff| {(a.double() - b.double()).abs().max().item()}"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {sorted(set(a) ^ set(b))}"
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def datalist(make_phantoms) -> Path:
    return make_phantoms("resume_data", shape=(32, 32, 32), seed=0)


def test_sigkill_then_resume_is_bit_identical(tmp_path: Path, datalist: Path) -> None:
    ref_root, run_root = tmp_path / "uninterrupted", tmp_path / "killed"
    _run(_cmd(ref_root, datalist))

    proc = subprocess.Popen(
        _cmd(run_root, datalist), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    first = run_root / "ckpt" / "checkpoint_iteration=2.pt"
    deadline = time.monotonic() + 600
    try:
        while not first.exists():
            assert proc.poll() is None, "training ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 600 s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)  # the file appears by an atomic rename: it is complete
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert find_latest_checkpoint(run_root / "ckpt") == str(first)
    assert not (run_root / "ckpt" / f"checkpoint_iteration={K}.pt").exists(), "killed too late to test resume"

    log = _run(_cmd(run_root, datalist, resume="true"))
    assert "resumed from" in log and "iteration 2" in log

    ckpt_ref = torch.load(ref_root / "ckpt" / f"checkpoint_iteration={K}.pt", map_location="cpu", weights_only=True)
    ckpt_res = torch.load(run_root / "ckpt" / f"checkpoint_iteration={K}.pt", map_location="cpu", weights_only=True)
    assert ckpt_ref["trainer"]["iteration"] == ckpt_res["trainer"]["iteration"] == K
    for key in ("network", "aux_network", "optimizer", "lr_scheduler", "trainer", "model_saver"):
        _assert_same(ckpt_ref[key], ckpt_res[key], key)
    assert sorted(p.name for p in (run_root / "ckpt").iterdir()) == [f"checkpoint_iteration={K}.pt"]
    assert sorted(p.name for p in (run_root / "models").iterdir()) == ["model.architecture.json", "model.pt"]
    assert ckpt_res["architecture"] == ckpt_ref["architecture"] and ckpt_res["architecture"]["multicure#level"] == 2
    model_ref = torch.load(ref_root / "models" / "model.pt", map_location="cpu", weights_only=True)
    model_res = torch.load(run_root / "models" / "model.pt", map_location="cpu", weights_only=True)
    _assert_same(model_ref, model_res, "model.pt")


def test_resume_true_without_checkpoint_is_a_clear_error(tmp_path: Path, datalist: Path) -> None:
    proc = subprocess.run(
        _cmd(tmp_path / "fresh", datalist, resume="true"), cwd=REPO, capture_output=True, text=True, timeout=600,
        env=_env(),
    )  # fmt: skip
    assert proc.returncode != 0
    assert "resume=true but no resume checkpoint" in proc.stderr
    assert str(tmp_path / "fresh" / "ckpt") in proc.stderr


# ------------------------------------------------------------------ in process, fast: the mechanism and its need


def _build(max_epochs: int, ckpt_dir: Path, resume: bool, reseed: bool):
    from monai.data import DataLoader, Dataset
    from monai.losses import DiceCELoss
    from monai.transforms import Compose, RandFlipd, RandGaussianNoised
    from torch import nn

    from multicure_monai.handlers import AtomicCheckpointSaver, ResumeCheckpointLoader
    from multicure_monai.handlers.determinism import EpochSeedHandler
    from multicure_monai.engines.loss_terms import method_loss_terms
    from multicure_monai.engines.semi_supervised_trainer import SemiSupervisedTrainer
    from multicure_monai.losses.pseudo_label import PseudoLabelLoss

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv3d(1, 2, 3, padding=1)

        def forward(self, x, uncertainty=None, return_features=False):
            return self.conv(x)

    torch.manual_seed(0)  # a new process: same initial state whatever happened before
    g = torch.Generator().manual_seed(1)
    labelled = [
        {"image": torch.randn(1, 8, 8, 8, generator=g), "label": (torch.rand(1, 8, 8, 8, generator=g) > 0.5).float()}
        for _ in range(3)
    ]
    unlabelled = [{"image": torch.randn(1, 8, 8, 8, generator=g)} for _ in range(3)]
    aug = Compose([RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0, allow_missing_keys=True),
                   RandGaussianNoised(keys="image", prob=1.0, std=0.1)])  # fmt: skip
    ds_l, ds_u = Dataset(labelled, transform=aug), Dataset(unlabelled, transform=aug)
    net, aux = Net(), Net()
    optimizer = torch.optim.SGD(list(net.parameters()) + list(aux.parameters()), lr=0.05, momentum=0.9)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    objects = {"network": net, "aux_network": aux, "optimizer": optimizer, "lr_scheduler": lr_scheduler}
    handlers = [ResumeCheckpointLoader(str(ckpt_dir), objects, resume=resume)]
    handlers += [EpochSeedHandler(seed=7, datasets=[ds_l, ds_u])] if reseed else []
    handlers += [AtomicCheckpointSaver(str(ckpt_dir), objects, engine_key="trainer", save_interval=1, n_saved=1)]
    trainer = SemiSupervisedTrainer(
        device="cpu", max_epochs=max_epochs, epoch_length=2,  # 2 iterations/epoch over 2 batches/pass: spans epochs
        train_data_loader=DataLoader(ds_l, batch_size=2, shuffle=True, num_workers=0),
        unlabeled_data_loader=DataLoader(ds_u, batch_size=2, shuffle=True, drop_last=False, num_workers=0),
        network=net, aux_network=aux, optimizer=optimizer,
        loss_terms=method_loss_terms(DiceCELoss(to_onehot_y=True, softmax=True),
                                     PseudoLabelLoss(confidence_threshold=0.5 + 1e-6), lambda_c=0.0),
        train_handlers=handlers, decollate=False,
    )  # fmt: skip
    torch.manual_seed(123)  # whatever the RNG state is now, the epoch handler must not depend on it
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: lr_scheduler.step())
    return trainer, objects


@pytest.mark.parametrize("reseed", [True, False])
def test_in_process_resume_matches_only_with_epoch_reseeding(tmp_path: Path, reseed: bool) -> None:
    ref, ref_objects = _build(4, tmp_path / "ref", resume=False, reseed=reseed)
    ref.run()
    first, _ = _build(2, tmp_path / "res", resume=False, reseed=reseed)
    first.run()  # "killed" after the checkpoint of iteration 4 (epoch 2)
    second, res_objects = _build(4, tmp_path / "res", resume=True, reseed=reseed)
    second.run()
    assert second.state.iteration == ref.state.iteration == 8
    same = all(
        torch.equal(a, b)
        for key in ("network", "aux_network")
        for a, b in zip(ref_objects[key].state_dict().values(), res_objects[key].state_dict().values())
    )
    assert same == reseed  # without re-seeding per epoch the resumed data stream differs
    if reseed:
        _assert_same(ref_objects["optimizer"].state_dict(), res_objects["optimizer"].state_dict(), "optimizer")
        _assert_same(ref_objects["lr_scheduler"].state_dict(), res_objects["lr_scheduler"].state_dict(), "lr")
