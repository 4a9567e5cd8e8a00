"""Checkpoints record the switches that shape the nets; loading names each mismatch and its flag
(multicure_monai/handlers/checkpoint_architecture.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader
from torch import nn

from multicure_monai.handlers import AtomicCheckpointSaver, ResumeCheckpointLoader, SafeCheckpointLoader, check_loaders
from multicure_monai.errors import BundleInputError
from multicure_monai.handlers.checkpoint_architecture import (
    ARCHITECTURE_KEY,
    read_architecture,
    sidecar_path,
    write_sidecar,
)
from multicure_monai.networks.ensemble import DualNetworkEnsemble
from multicure_monai.networks.resnet_vnet import ResNetVNet
from multicure_monai.networks.vnet import VNet

# the configs' `architecture`: nested as the configs write it; a record holds it by config id (FLAT)
ARCH = {"num_classes": 2, "in_channels": 1,
        "multicure": {"use": True, "form": "authors", "level": 2, "in_predictive": False}}  # fmt: skip
FLAT = {"num_classes": 2, "in_channels": 1, "multicure#use": True, "multicure#form": "authors", "multicure#level": 2,
        "multicure#in_predictive": False}  # fmt: skip


def _arch(**multicure) -> dict:
    """ARCH with some of the multicure group's switches changed."""
    return {**ARCH, "multicure": {**ARCH["multicure"], **multicure}}


def _ensemble(arch: dict) -> DualNetworkEnsemble:
    """The deployed network as the bundle configs build it from the switches."""
    block = arch["multicure"]
    kw = dict(spatial_dims=3, in_channels=arch["in_channels"], out_channels=arch["num_classes"])
    kw.update(multicure_level=block["level"], multicure_kwargs={"form": block["form"]})
    predictive = VNet(multicure=block["in_predictive"], **kw)
    auxiliary = ResNetVNet(multicure=block["use"], **kw)
    return DualNetworkEnsemble(predictive, auxiliary, predictive_uses_uncertainty=block["in_predictive"])


def _save_final(folder: Path, save_dict: dict, arch: dict | None, **kwargs) -> AtomicCheckpointSaver:
    saver = AtomicCheckpointSaver(str(folder), save_dict, save_final=True, final_filename="model.pt",
                                  architecture=arch, **kwargs)  # fmt: skip
    engine = Engine(lambda e, b: None)
    saver.attach(engine)
    engine.run([0], max_epochs=1)
    return saver


def _load(path: Path, net: nn.Module, arch: dict | None) -> None:
    SafeCheckpointLoader(str(path), {"model": net}, architecture=arch)(Engine(lambda e, b: None))


def test_model_pt_stays_a_bare_state_dict_with_a_sidecar(tmp_path: Path) -> None:
    net = nn.Linear(3, 2)
    _save_final(tmp_path, {"model": net}, ARCH)
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert set(state) == {"weight", "bias"}  # plain torch.load + load_state_dict, MONAI Label, CheckpointLoader
    nn.Linear(3, 2).load_state_dict(state, strict=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.architecture.json", "model.pt"]
    assert read_architecture(tmp_path / "model.pt") == FLAT
    # MONAI's own loader (strict) is unaffected
    loader = CheckpointLoader(str(tmp_path / "model.pt"), {"model": nn.Linear(3, 2)}, strict=True)
    loader(Engine(lambda e, b: None))


def test_resume_checkpoint_holds_the_record(tmp_path: Path) -> None:
    net = nn.Linear(3, 2)
    _save_final(tmp_path, {"network": net, "optimizer": torch.optim.SGD(net.parameters(), lr=0.1)}, ARCH)
    checkpoint = torch.load(tmp_path / "model.pt", weights_only=True)
    assert checkpoint[ARCHITECTURE_KEY] == FLAT and not Path(sidecar_path(tmp_path / "model.pt")).exists()
    assert read_architecture(tmp_path / "model.pt", checkpoint) == FLAT


@pytest.mark.parametrize(
    "changes, flags",
    [
        ({"level": 1}, ["--multicure#level 2"]),
        ({"use": False}, ["--multicure#use True"]),
        ({"form": "paper", "in_predictive": True}, ["--multicure#form authors", "--multicure#in_predictive False"]),
    ],
)  # fmt: skip
def test_mismatch_names_every_switch_and_its_flag(tmp_path: Path, changes: dict, flags: list[str]) -> None:
    _save_final(tmp_path, {"model": nn.Linear(3, 2)}, ARCH)
    with pytest.raises(BundleInputError) as err:
        _load(tmp_path / "model.pt", nn.Linear(3, 2), _arch(**changes))
    message = str(err.value)
    assert str(tmp_path / "model.pt") in message
    for flag in flags:
        assert flag in message
    for key in set(FLAT) - {f"multicure#{k}" for k in changes}:
        assert f"--{key} " not in message


def test_a_record_from_before_the_groups_is_compared_by_todays_ids(tmp_path: Path) -> None:
    """A model.pt of version 0.11 or older records the switches by their flat ids (``multicure_level``)."""
    torch.save(nn.Linear(3, 2).state_dict(), tmp_path / "model.pt")
    old = {"num_classes": 2, "in_channels": 1, "use_multicure": True, "multicure_form": "authors",
           "multicure_level": 1, "predictive_uses_uncertainty": False}  # fmt: skip
    write_sidecar(tmp_path / "model.pt", old)
    assert read_architecture(tmp_path / "model.pt") == {**FLAT, "multicure#level": 1}
    with pytest.raises(BundleInputError, match="--multicure#level 1"):
        _load(tmp_path / "model.pt", nn.Linear(3, 2), ARCH)


def test_matching_record_loads(tmp_path: Path) -> None:
    source = nn.Linear(3, 2)
    _save_final(tmp_path, {"model": source}, ARCH)
    target = nn.Linear(3, 2)
    _load(tmp_path / "model.pt", target, dict(ARCH))
    assert torch.equal(target.weight, source.weight)


def test_real_level_mismatch_names_the_switch_not_the_tensors(tmp_path: Path) -> None:
    """The issue's case: a default (level 2) model.pt loaded with --multicure#level 1."""
    _save_final(tmp_path, {"model": _ensemble(ARCH)}, ARCH)
    level1 = _arch(level=1)
    with pytest.raises(BundleInputError, match="--multicure#level 2") as err:
        _load(tmp_path / "model.pt", _ensemble(level1), level1)
    assert "size mismatch" not in str(err.value)


def test_old_checkpoint_without_record_loads_and_a_misfit_names_the_switches(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    source = _ensemble(ARCH)
    torch.save(source.state_dict(), path)  # as written before the record existed
    target = _ensemble(ARCH)
    _load(path, target, ARCH)
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), source.state_dict().values()))
    level1 = _arch(level=1)
    with pytest.raises(BundleInputError, match="records no architecture") as err:
        _load(path, _ensemble(level1), level1)
    assert "--multicure#level" in str(err.value) and "--multicure#use" in str(err.value)


def test_sidecar_of_another_model_pt_is_ignored(tmp_path: Path) -> None:
    _save_final(tmp_path, {"model": nn.Linear(3, 2)}, ARCH)
    torch.save(nn.Linear(3, 2).state_dict(), tmp_path / "model.pt")  # replaced by hand, side-car left behind
    assert read_architecture(tmp_path / "model.pt") is None
    _load(tmp_path / "model.pt", nn.Linear(3, 2), _arch(level=1))  # not compared: loads
    side = json.loads(Path(sidecar_path(tmp_path / "model.pt")).read_text())
    assert side["architecture"] == FLAT and len(side["sha256"]) == 64


def test_resume_compares_before_loading(tmp_path: Path) -> None:
    net = nn.Linear(3, 2)
    saver = AtomicCheckpointSaver(str(tmp_path), {"network": net}, save_interval=1, engine_key="trainer",
                                  architecture=ARCH)  # fmt: skip
    engine = Engine(lambda e, b: None)
    saver.attach(engine)
    engine.run([0], max_epochs=1)
    loader = ResumeCheckpointLoader(str(tmp_path), {"network": nn.Linear(3, 2)}, resume=True,
                                    architecture={**ARCH, "num_classes": 3})  # fmt: skip
    trainer = Engine(lambda e, b: None)
    loader.attach(trainer)
    with pytest.raises(BundleInputError, match="--num_classes 2"):
        trainer.run([0], max_epochs=2)


def test_check_loaders_checks_monai_loaders_only(tmp_path: Path) -> None:
    """MONAI Label's fine-tuning puts MONAI's own CheckpointLoader first; its file is checked up front."""
    _save_final(tmp_path, {"model": nn.Linear(3, 2)}, ARCH)
    monai_loader = CheckpointLoader(str(tmp_path / "model.pt"), {"model": nn.Linear(3, 2)}, strict=False)
    handlers = [monai_loader, Events.STARTED]
    assert check_loaders(handlers, ARCH) is handlers
    with pytest.raises(BundleInputError, match="--multicure#level 2"):
        check_loaders(handlers, _arch(level=1))
    ours = SafeCheckpointLoader(str(tmp_path / "model.pt"), {"model": nn.Linear(3, 2)})
    check_loaders([ours], _arch(level=1))  # checks itself when it loads
