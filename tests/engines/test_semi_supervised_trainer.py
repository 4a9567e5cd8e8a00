"""The two-network trainer: loss terms, which net each term trains, data streams, fallbacks and NaN guard."""

from __future__ import annotations

import warnings

import pytest
import torch
from ignite.engine import Events
from monai.losses import DiceCELoss
from torch import nn
from torch.utils.data import DataLoader

from multicure_monai.engines.loss_terms import CONTRASTIVE_BAND_WIDTH, method_loss_terms
from multicure_monai.engines.semi_supervised_trainer import SemiSupervisedTrainer
from multicure_monai.losses.prototype_contrastive import PrototypeContrastiveLoss
from multicure_monai.losses.pseudo_label import PseudoLabelLoss
from multicure_monai.losses.xor_regularization import XORRegularizationLoss
from multicure_monai.metrics.calibration import boundary_band

SIZE = 8
LOSS_KEYS = ("loss", "loss_sup", "loss_pseudo", "loss_reg", "loss_contrastive")
TABLE_ARGS = ("supervised_loss", "pseudo_label_loss", "regularization_loss", "contrastive_loss", "lambda_u", "lambda_reg",
              "lambda_c", "contrastive_anchors", "contrastive_networks", "detach_predictive_in_reg")  # fmt: skip


class TinySegNet(nn.Module):
    """Two conv layers with the networks' call signature ``(x, uncertainty=None, return_features=False)``."""

    def __init__(self, record: bool = False) -> None:
        super().__init__()
        self.body = nn.Conv3d(1, 4, 3, padding=1)
        self.head = nn.Conv3d(4, 2, 1)
        self.proj = nn.Conv3d(4, 3, 1)
        self.seen_uncertainty: list[torch.Tensor | None] = []
        self.record = record

    def forward(self, x, uncertainty=None, return_features=False):
        if self.record:
            self.seen_uncertainty.append(None if uncertainty is None else uncertainty.detach().clone())
        h = torch.relu(self.body(x))
        if uncertainty is not None:
            h = h + uncertainty
        logits = self.head(h)
        return (logits, [self.proj(h)]) if return_features else logits


def _labelled(n: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    items = []
    for _ in range(n):
        label = (torch.rand(1, SIZE, SIZE, SIZE, generator=g) > 0.6).float()
        items.append({"image": label + 0.3 * torch.randn(1, SIZE, SIZE, SIZE, generator=g), "label": label})
    return items


def _unlabelled(n: int = 3) -> list[dict]:
    return [{"image": torch.randn(1, SIZE, SIZE, SIZE)} for _ in range(n)]


def _trainer(iterations: int = 3, unlabeled=None, net_cls: type = TinySegNet, **kwargs) -> SemiSupervisedTrainer:
    """A trainer of two tiny nets; the method's loss arguments (``TABLE_ARGS``) build its loss table. The teacher
    and the student view are the paper's unless given (the library's defaults are tested on their own)."""
    torch.manual_seed(0)
    kwargs = {"teacher": "predictive", "student_view": None, **kwargs}
    net, aux = net_cls(), net_cls(record=True)
    table = dict(
        supervised_loss=DiceCELoss(to_onehot_y=True, softmax=True),
        pseudo_label_loss=PseudoLabelLoss(confidence_threshold=0.5 + 1e-6),
        regularization_loss=XORRegularizationLoss(),
        contrastive_loss=PrototypeContrastiveLoss(num_classes=2),
        contrastive_anchors="all",
    )
    table.update({k: kwargs.pop(k) for k in TABLE_ARGS if k in kwargs})
    return SemiSupervisedTrainer(
        device="cpu",
        max_epochs=1,
        epoch_length=iterations,
        train_data_loader=DataLoader(_labelled(), batch_size=2),
        unlabeled_data_loader=DataLoader(_unlabelled(), batch_size=2) if unlabeled is None else unlabeled,
        network=net,
        aux_network=aux,
        optimizer=torch.optim.SGD(list(net.parameters()) + list(aux.parameters()), lr=0.01),
        loss_terms=method_loss_terms(**table),
        decollate=False,
        **kwargs,
    )


def _compute(trainer: SemiSupervisedTrainer, x: torch.Tensor, y_l: torch.Tensor, **weights: float) -> dict:
    """One ``_compute_losses`` on ``x`` with the table's weights at iteration 1, ``weights`` overriding them."""
    trainer.state.device = torch.device("cpu")
    trainer.state.iteration = 1
    w = {name: weights.get(name, row.weight_at(1)) for name, row in trainer.loss_terms.items()}
    return trainer._compute_losses(x, y_l, 2, w)[0]


def test_output_carries_every_finite_term() -> None:
    trainer = _trainer()
    trainer.run()
    out = trainer.state.output
    for key in (*LOSS_KEYS, "diag_weight_contrastive", "diag_uncertain_fraction", "pred", "label", "image"):
        assert key in out, key
    for key in LOSS_KEYS:
        assert torch.isfinite(out[key]) and out[key].ndim == 0
    total = sum(out[f"diag_weight_{name}"] * out[f"loss_{name}"] for name in ("sup", "pseudo", "reg", "contrastive"))
    torch.testing.assert_close(out["loss"], total)
    assert out["pred"].shape == (2, 2, SIZE, SIZE, SIZE)


def test_auxiliary_net_receives_the_predictive_uncertainty_map() -> None:
    trainer = _trainer(iterations=1, contrastive_loss=None)
    trainer.run()
    (seen,) = trainer.aux_network.seen_uncertainty
    assert seen is not None and seen.shape == (4, 1, SIZE, SIZE, SIZE)
    assert set(seen.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize(
    "active, detach_reg, predictive_gets_grad",
    [("pseudo", True, False), ("reg", True, False), ("reg", False, True), ("contrastive", True, True)],
)
def test_which_net_each_unsupervised_term_trains(active: str, detach_reg: bool, predictive_gets_grad: bool) -> None:
    """L_pseudo and (by default) L_reg train the auxiliary net only; L_c, and L_reg undetached, reach the teacher."""
    trainer = _trainer(
        iterations=1,
        detach_predictive_in_reg=detach_reg,
        supervised_loss=lambda logits, labels: logits.sum() * 0,
        pseudo_label_loss=PseudoLabelLoss(confidence_threshold=0.5 + 1e-6) if active == "pseudo" else None,
        regularization_loss=XORRegularizationLoss() if active == "reg" else None,
        contrastive_loss=PrototypeContrastiveLoss(num_classes=2) if active == "contrastive" else None,
    )
    x_l = torch.stack([d["image"] for d in _labelled()[:2]])
    y_l = torch.stack([d["label"] for d in _labelled()[:2]])
    x = torch.cat([x_l, torch.randn(2, 1, SIZE, SIZE, SIZE)])
    terms = _compute(trainer, x, y_l, contrastive=1.0)
    terms["loss"].backward()
    grad_p = sum(p.grad.abs().sum() for p in trainer.network.parameters() if p.grad is not None)
    grad_a = sum(p.grad.abs().sum() for p in trainer.aux_network.parameters() if p.grad is not None)
    assert float(grad_a) > 0
    assert (float(grad_p) > 0) == predictive_gets_grad


def test_supervised_only_ignores_unlabelled_stream() -> None:
    class Exploding:
        def __len__(self):
            return 1

        def __iter__(self):
            raise AssertionError("the unlabelled loader must not be used")

    trainer = _trainer(unlabeled=Exploding(), supervised_only=True)
    trainer.run()
    out = trainer.state.output
    torch.testing.assert_close(out["loss"], out["loss_sup"])


def test_unlabelled_loader_is_cycled() -> None:
    trainer = _trainer(iterations=5)  # 3 unlabelled items, batch 2 with drop_last=False -> 2 batches per pass
    trainer.run()
    assert trainer._unlabeled_epoch >= 2


@pytest.mark.parametrize("mode", ["warn", "error"])
def test_empty_unlabelled_set(mode: str) -> None:
    empty = DataLoader([], batch_size=2)
    if mode == "error":
        with pytest.raises(ValueError, match="no unlabelled data"):
            _trainer(unlabeled=empty, empty_unlabeled="error")
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _trainer(unlabeled=empty)
    assert trainer.supervised_only
    assert any("falls back to supervised-only" in str(w.message) for w in caught)


def test_nan_loss_stops_before_the_step_and_names_the_term() -> None:
    trainer = _trainer(iterations=2)
    before = {k: v.clone() for k, v in trainer.network.state_dict().items()}

    class NaNContrastive(nn.Module):
        def forward(self, features, labels, reliable, uncertain):
            return features[0].sum() * float("nan")

    trainer.loss_terms["contrastive"].compute.loss = NaNContrastive()
    with pytest.raises(FloatingPointError, match=r"iteration 1: loss_contrastive=nan"):
        trainer.run()
    for key, value in trainer.network.state_dict().items():
        torch.testing.assert_close(value, before[key])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"uncertainty_threshold": 1.5}, "uncertainty_threshold"),
        ({"lambda_u": -1.0}, "weight"),
        ({"contrastive_networks": ("teacher",)}, "contrastive_networks"),
        ({"empty_unlabeled": "ignore"}, "empty_unlabeled"),
    ],
)
def test_invalid_configuration_is_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _trainer(**kwargs)


def test_lambda_u_may_be_a_schedule_of_the_iteration() -> None:
    seen: list[int] = []

    def ramp(iteration: int) -> float:
        seen.append(iteration)
        return 0.0

    trainer = _trainer(iterations=2, lambda_u=ramp, contrastive_loss=None)
    trainer.run()
    out = trainer.state.output
    assert sorted(set(seen)) == [1, 2]
    torch.testing.assert_close(out["loss"], out["loss_sup"])


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    x_l = torch.stack([d["image"] for d in _labelled()[:2]])
    y_l = torch.stack([d["label"] for d in _labelled()[:2]])
    return torch.cat([x_l, torch.randn(2, 1, SIZE, SIZE, SIZE)]), y_l


def _pseudo_grads(trainer: SemiSupervisedTrainer, sup_p: float, sup_a: float) -> tuple[float, float]:
    """Gradient mass the pseudo-label term sends into (predictive, auxiliary), with the nets' L_s faked."""
    x, y_l = _batch()
    trainer.loss_terms = {k: trainer.loss_terms[k] for k in ("sup", "pseudo")}
    losses = iter([torch.tensor(sup_p), torch.tensor(sup_a)])
    trainer.loss_terms["sup"].compute.loss = lambda logits, labels: next(losses) + logits.sum() * 0
    terms = _compute(trainer, x, y_l)
    terms["loss"].backward()
    mass = [
        float(sum(p.grad.abs().sum() for p in net.parameters() if p.grad is not None))
        for net in (trainer.network, trainer.aux_network)
    ]
    return mass[0], mass[1]


@pytest.mark.parametrize(
    "teacher, sup_p, sup_a, trains_predictive, trains_auxiliary, teacher_index",
    [
        ("predictive", 1.0, 0.5, False, True, 0),  # the paper: the V-Net teaches whatever the losses
        ("better", 1.0, 0.5, True, False, 1),  # MCF: the auxiliary net has the lower L_s, so it teaches
        ("better", 0.5, 1.0, False, True, 0),
        ("ema", 1.0, 0.5, True, True, 2),  # the EMA teacher trains both nets
        ("mutual", 1.0, 0.5, True, True, 3),  # CPS: each net trains the other
    ],
)
def test_teacher_choice_decides_which_net_learns_from_pseudo_labels(
    teacher: str, sup_p: float, sup_a: float, trains_predictive: bool, trains_auxiliary: bool, teacher_index: int
) -> None:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    ema = AveragedModel(TinySegNet(), multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    trainer = _trainer(iterations=1, teacher=teacher, ema_network=ema if teacher == "ema" else None)
    grad_p, grad_a = _pseudo_grads(trainer, sup_p, sup_a)
    assert (grad_p > 0) == trains_predictive
    assert (grad_a > 0) == trains_auxiliary


@pytest.mark.parametrize("teacher", ["predictive", "better"])
def test_teacher_index_is_logged(teacher: str) -> None:
    trainer = _trainer(iterations=1, teacher=teacher)
    x, y_l = _batch()
    losses = iter([torch.tensor(1.0), torch.tensor(0.5)])
    trainer.loss_terms["sup"].compute.loss = lambda logits, labels: next(losses) + logits.sum() * 0
    terms = _compute(trainer, x, y_l, contrastive=0.0)
    assert float(terms["diag_teacher"]) == (1.0 if teacher == "better" else 0.0)


@pytest.mark.parametrize("anchors, unlabelled_anchors", [("all", True), ("labelled", False), ("band", False)])
def test_contrastive_anchors_switch(anchors: str, unlabelled_anchors: bool) -> None:
    seen: list[torch.Tensor] = []

    class Recording(nn.Module):
        def forward(self, features, labels, reliable, uncertain):
            seen.append(uncertain.clone())
            return features[0].sum() * 0

    trainer = _trainer(iterations=1, contrastive_anchors=anchors, contrastive_loss=Recording())
    x, y_l = _batch()
    # an untrained teacher is unsure almost everywhere, so both halves of the batch hold uncertain voxels
    trainer.uncertainty_threshold = 0.99
    _compute(trainer, x, y_l, contrastive=1.0)
    assert len(seen) == 2  # one call per net
    for uncertain in seen:
        assert bool(uncertain[:2].any())
        assert bool(uncertain[2:].any()) == unlabelled_anchors
        if anchors == "band":  # exactly the labelled voxels near the true surface, whatever the teacher's confidence
            assert torch.equal(uncertain[:2], boundary_band(y_l, CONTRASTIVE_BAND_WIDTH))


def test_diagnostics_every_interval() -> None:
    trainer = _trainer(iterations=4, diagnostics_interval=2)
    grads_at: list[int] = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda e: grads_at.append(e.state.iteration) if "diag_grad_sup_predictive" in e.state.output else None,
    )
    trainer.run()
    out = trainer.state.output
    assert grads_at == [2, 4]
    for key in ("diag_loss_sup_predictive", "diag_loss_sup_auxiliary", "diag_fg_predictive", "diag_fg_auxiliary",
                "diag_fg_label", "diag_pseudo_mask_fraction", "diag_teacher", "diag_weight_pseudo"):  # fmt: skip
        assert key in out and torch.isfinite(torch.as_tensor(out[key])), key
    torch.testing.assert_close(out["loss_sup"], out["diag_loss_sup_predictive"] + out["diag_loss_sup_auxiliary"])
    # L_s reaches both nets; the detached teacher gets no pseudo-label gradient, its student does
    assert float(out["diag_grad_sup_predictive"]) > 0.0 and float(out["diag_grad_sup_auxiliary"]) > 0.0
    assert float(out["diag_grad_pseudo_predictive"]) == 0.0 and float(out["diag_grad_pseudo_auxiliary"]) > 0.0


@pytest.mark.parametrize("kwargs, message", [({"teacher": "student"}, "teacher"), ({"contrastive_anchors": "x"}, "anchors"),
                                             ({"diagnostics_interval": -1}, "diagnostics_interval")])  # fmt: skip
def test_invalid_new_switches_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _trainer(**kwargs)


def test_predictive_net_gets_the_map_of_its_own_first_pass() -> None:
    """``predictive_uses_uncertainty`` (MultiCURE in the predictive net): a gradient-free first pass of the
    predictive net gives the uncertainty map its training pass receives; the auxiliary net gets the map of that
    training pass, as always."""
    trainer = _trainer(iterations=1, contrastive_loss=None, predictive_uses_uncertainty=True)
    trainer.network.record = True
    trainer.run()
    first, second = trainer.network.seen_uncertainty
    assert first is None and second is not None and second.shape == (4, 1, SIZE, SIZE, SIZE)
    (aux_map,) = trainer.aux_network.seen_uncertainty
    assert set(second.unique().tolist()) <= {0.0, 1.0} and set(aux_map.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("has_bf16, amp_dtype", [(True, "auto"), (True, "bfloat16"), (False, "auto"), (True, "float32")])
def test_amp_on_cpu_runs_the_nets_in_bf16_and_the_losses_in_float32(monkeypatch, caplog, has_bf16, amp_dtype) -> None:
    from multicure_monai import precision

    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: has_bf16)
    seen: dict[str, set] = {"net": set(), "loss": set()}
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)

    def loss_function(logits, labels):
        seen["loss"].add(logits.dtype)
        return dice_ce(logits, labels)

    with caplog.at_level("INFO", logger="multicure_monai.precision"):
        trainer = _trainer(iterations=2, amp=True, amp_kwargs={"dtype": amp_dtype},
                           supervised_loss=loss_function)  # fmt: skip
    for net in (trainer.network, trainer.aux_network):
        net.head.register_forward_hook(lambda m, i, o: seen["net"].add(o.dtype))
    before = [p.detach().clone() for p in trainer.network.parameters()]
    trainer.run()
    expected = torch.bfloat16 if has_bf16 and amp_dtype != "float32" else torch.float32
    assert trainer.uses_autocast is (expected == torch.bfloat16)
    assert trainer.scaler is None  # a GradScaler only for CUDA float16
    assert seen["net"] == {expected} and seen["loss"] == {torch.float32}
    out = trainer.state.output
    for key in LOSS_KEYS:
        assert out[key].dtype == torch.float32 and torch.isfinite(out[key]), key
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.network.parameters()))
    messages = [r.getMessage() for r in caplog.records if r.name == "multicure_monai.precision"]
    assert len(messages) == 1 and str(expected).removeprefix("torch.") in messages[0]
    if not has_bf16:
        assert "no bfloat16" in messages[0]


def test_amp_off_logs_nothing_and_runs_float32(caplog) -> None:
    with caplog.at_level("INFO", logger="multicure_monai.precision"):
        trainer = _trainer(iterations=1, amp=False)
    assert not trainer.uses_autocast and trainer.scaler is None
    assert not [r for r in caplog.records if r.name == "multicure_monai.precision"]
