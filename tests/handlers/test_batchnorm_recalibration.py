"""Precise-BN recalibration: exact batch-statistics averages, the trainer's batches, and the handler's place."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Events
from monai.losses import DiceCELoss
from torch import nn
from torch.utils.data import DataLoader

from multicure_monai.handlers.batchnorm_recalibration import BatchNormRecalibration, recalibrate_batchnorm
from multicure_monai.engines.loss_terms import method_loss_terms
from multicure_monai.engines.semi_supervised_trainer import SemiSupervisedTrainer
from multicure_monai.losses.pseudo_label import PseudoLabelLoss

SIZE = 8


class BNSegNet(nn.Module):
    """conv - BatchNorm - relu - conv, with the networks' call signature; records its input batch sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm3d(4)
        self.head = nn.Conv3d(4, 2, 1)
        self.batch_sizes: list[int] = []

    def forward(self, x, uncertainty=None, return_features=False):
        self.batch_sizes.append(x.shape[0])
        h = torch.relu(self.norm(self.conv(x)))
        if uncertainty is not None:
            h = h + uncertainty
        return self.head(h)


@pytest.mark.parametrize("steps", [1, 3, 7])
def test_statistics_are_the_average_of_the_batch_statistics(steps: int) -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm3d(3, momentum=0.3)
    bn.running_mean.fill_(50.0)
    batches = [torch.randn(2, 3, 4, 4, 4) * (i + 1) + i for i in range(steps)]
    assert recalibrate_batchnorm([bn], (bn(b) for b in batches)) == steps
    means = torch.stack([b.mean(dim=(0, 2, 3, 4)) for b in batches])
    variances = torch.stack([b.var(dim=(0, 2, 3, 4), unbiased=True) for b in batches])
    torch.testing.assert_close(bn.running_mean, means.mean(0))
    torch.testing.assert_close(bn.running_var, variances.mean(0))
    assert int(bn.num_batches_tracked) == steps and bn.momentum == 0.3


def test_no_steps_leaves_the_statistics_alone() -> None:
    bn = nn.BatchNorm3d(2)
    bn.running_mean.fill_(3.0)
    bn.running_var.fill_(2.0)
    bn.num_batches_tracked.fill_(9)
    assert recalibrate_batchnorm([bn], iter(())) == 0
    assert bn.running_mean.eq(3.0).all() and bn.running_var.eq(2.0).all() and int(bn.num_batches_tracked) == 9


def test_weights_do_not_change_and_no_gradient_is_recorded() -> None:
    torch.manual_seed(0)
    net = BNSegNet()
    before = {k: v.clone() for k, v in net.state_dict().items() if "norm.running" not in k and "tracked" not in k}
    recalibrate_batchnorm([net], (net(torch.randn(2, 1, SIZE, SIZE, SIZE)) for _ in range(2)))
    for k, v in before.items():
        torch.testing.assert_close(net.state_dict()[k], v)
    assert all(p.grad is None for p in net.parameters())


def _trainer(supervised_only: bool, num_batches: int, epoch_level: bool = True, **kwargs) -> SemiSupervisedTrainer:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    labelled = []
    for _ in range(4):
        label = (torch.rand(1, SIZE, SIZE, SIZE, generator=g) > 0.6).float()
        labelled.append({"image": label + 0.3 * torch.randn(1, SIZE, SIZE, SIZE, generator=g), "label": label})
    unlabelled = [{"image": 3.0 + torch.randn(1, SIZE, SIZE, SIZE, generator=g)} for _ in range(6)]
    net, aux = BNSegNet(), BNSegNet()
    trainer = SemiSupervisedTrainer(
        device="cpu",
        max_epochs=1,
        epoch_length=2,
        train_data_loader=DataLoader(labelled, batch_size=2),
        unlabeled_data_loader=DataLoader(unlabelled, batch_size=2),
        network=net,
        aux_network=aux,
        optimizer=torch.optim.SGD(list(net.parameters()) + list(aux.parameters()), lr=0.5),
        loss_terms=method_loss_terms(DiceCELoss(to_onehot_y=True, softmax=True), PseudoLabelLoss()),
        supervised_only=supervised_only,
        decollate=False,
        **{"teacher": "predictive", "student_view": None, **kwargs},  # one forward per net and iteration
    )
    # an epoch is 2 iterations: once per epoch either way
    BatchNormRecalibration(num_batches=num_batches, interval=1 if epoch_level else 2, epoch_level=epoch_level).attach(
        trainer
    )
    return trainer


@pytest.mark.parametrize("supervised_only, batch, epoch_level", [(False, 4, True), (True, 2, True), (False, 4, False)])
def test_handler_recalibrates_from_training_like_batches(supervised_only: bool, batch: int, epoch_level: bool) -> None:
    trainer = _trainer(supervised_only, num_batches=3, epoch_level=epoch_level)
    seen = {}

    @trainer.on(Events.EPOCH_COMPLETED)
    def _after(engine):  # attached after the handler, so it runs after it
        seen["sizes"] = [list(net.batch_sizes) for net in (engine.network, engine.aux_network)]
        seen["tracked"] = [int(n.norm.num_batches_tracked) for n in (engine.network, engine.aux_network)]

    trainer.run()
    for sizes in seen["sizes"]:
        assert sizes[-3:] == [batch] * 3  # the handler's three forwards, labelled (+ unlabelled) like training
        assert len(sizes) == 2 + 3  # two iterations, then the recalibration
    assert seen["tracked"] == [3, 3]  # cumulative statistics of exactly the recalibration batches


def test_zero_batches_disables_the_handler() -> None:
    trainer = _trainer(supervised_only=False, num_batches=0)
    trainer.run()
    assert [int(n.norm.num_batches_tracked) for n in (trainer.network, trainer.aux_network)] == [2, 2]
    with pytest.raises(ValueError):
        BatchNormRecalibration(num_batches=-1)


@pytest.mark.parametrize("has_bf16", [True, False])
def test_recalibration_under_amp_runs_the_trainers_precision_and_keeps_float32_statistics(monkeypatch, has_bf16):
    from multicure_monai import precision

    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: has_bf16)
    stats = {}
    for amp in (False, True):
        trainer = _trainer(False, num_batches=3, amp=amp)
        seen = set()
        trainer.network.conv.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
        trainer.run()
        stats[amp] = [(n.norm.running_mean, n.norm.running_var) for n in (trainer.network, trainer.aux_network)]
        assert seen == {torch.bfloat16 if amp and has_bf16 else torch.float32}
    for (mean, var), (mean32, var32) in zip(stats[True], stats[False]):
        assert mean.dtype == var.dtype == torch.float32
        # same batches, bf16 convolutions: statistics agree to bf16's few significant digits
        torch.testing.assert_close(mean, mean32, atol=0.05, rtol=0.05)
        torch.testing.assert_close(var, var32, atol=0.05, rtol=0.05)
