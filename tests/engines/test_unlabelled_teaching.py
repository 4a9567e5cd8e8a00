"""Unlabelled data that teach both nets: student views in the trainer, the EMA warm-up, MCF's labelled term."""

from __future__ import annotations

import inspect

import pytest
import torch
from test_semi_supervised_trainer import TinySegNet, _batch, _compute, _trainer

from multicure_monai.engines import SemiSupervisedTrainer
from multicure_monai.engines.loss_terms import IterationContext, LabelledDisagreementTerm
from multicure_monai.engines.student_views import CopyPasteView, PerturbedView
from multicure_monai.engines.teachers import clean_view_probabilities, ema_teacher


def _same_crop(x_l, y_l, x_u, targets):
    return x_u, dict(targets)


@pytest.mark.parametrize("teacher", ["predictive", "better", "mutual"])
def test_a_view_that_changes_nothing_gives_the_same_losses(teacher: str) -> None:
    """The clean pass plus an identity view equals the paper's in-batch teacher (the tiny nets have no BatchNorm)."""
    trainer = _trainer(iterations=1, teacher=teacher)
    x, y_l = _batch()
    plain = _compute(trainer, x, y_l, contrastive=1.0)
    clean = clean_view_probabilities(teacher, trainer.network, trainer.aux_network, x[2:], 0.7)
    _, targets = _same_crop(None, None, x[2:], clean)
    w = {name: (1.0 if name == "contrastive" else row.weight_at(1)) for name, row in trainer.loss_terms.items()}
    viewed = trainer._compute_losses(x, y_l, 2, w, targets)[0]
    for key in ("loss_pseudo", "loss_reg", "loss_contrastive", "loss"):
        torch.testing.assert_close(viewed[key], plain[key])


def test_students_learn_the_clean_crop_label_on_their_view() -> None:
    """The pseudo label comes from the teacher's pass on the clean crop, not from the (blanked) student view."""
    seen: list[torch.Tensor] = []

    def recording(logits, target):
        seen.append(target.clone())
        return logits.sum() * 0

    trainer = _trainer(iterations=1, student_view=lambda x_l, y_l, x_u, t: (torch.zeros_like(x_u), dict(t)))
    trainer.loss_terms["pseudo"].compute.loss = recording
    unlabelled = next(iter(trainer.unlabeled_data_loader))["image"]
    expected = torch.softmax(trainer.network(unlabelled).float(), dim=1)
    trainer.run()
    torch.testing.assert_close(seen[0], expected)


@pytest.mark.parametrize("view", [CopyPasteView(), PerturbedView()])
@pytest.mark.parametrize("teacher", ["predictive", "mutual", "ema"])
def test_training_with_a_student_view_is_finite(view, teacher: str) -> None:
    ema = ema_teacher(TinySegNet()) if teacher == "ema" else None
    trainer = _trainer(iterations=2, student_view=view, teacher=teacher, ema_network=ema)
    trainer.run()
    out = trainer.state.output
    for key in ("loss", "loss_pseudo", "loss_reg", "loss_contrastive"):
        assert torch.isfinite(out[key]), key


@pytest.mark.parametrize("view, cls", [("none", type(None)), (None, type(None)), ("perturb", PerturbedView),
                                       ("copy_paste", CopyPasteView), (CopyPasteView(0.5), CopyPasteView)])  # fmt: skip
def test_student_view_by_name_or_object(view, cls: type) -> None:
    assert isinstance(_trainer(iterations=1, student_view=view).student_view, cls)


def test_library_default_teaches_both_nets_on_copy_paste() -> None:
    """The trainer's defaults (the bundle's) are the mutual teacher on BCP's mix; both nets learn from it."""
    params = inspect.signature(SemiSupervisedTrainer).parameters
    defaults = {name: params[name].default for name in ("teacher", "student_view")}
    assert defaults == {"teacher": "mutual", "student_view": "copy_paste"}
    trainer = _trainer(iterations=2, diagnostics_interval=2, **defaults)
    trainer.run()
    out = trainer.state.output
    assert isinstance(trainer.student_view, CopyPasteView) and float(out["diag_teacher"]) == 3.0
    assert float(out["diag_grad_pseudo_predictive"]) > 0.0 and float(out["diag_grad_pseudo_auxiliary"]) > 0.0


@pytest.mark.parametrize("warmup, second", [(True, 0.5), (False, 0.99)])
def test_ema_decay_warms_up(warmup: bool, second: float) -> None:
    net = torch.nn.Conv3d(1, 1, 1)
    ema = ema_teacher(net, decay=0.99, warmup=warmup)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update_parameters(net)  # the first update copies
    with torch.no_grad():
        net.weight.fill_(3.0)
    ema.update_parameters(net)
    torch.testing.assert_close(ema.module.weight, torch.full_like(net.weight, second * 1.0 + (1 - second) * 3.0))


def test_labelled_disagreement_term_known_value() -> None:
    """Two labelled voxels; the nets disagree on the second only, whose truth is foreground."""
    probs_p = torch.tensor([0.9, 0.8]).view(1, 1, 2, 1, 1)
    probs_a = torch.tensor([0.9, 0.3]).view(1, 1, 2, 1, 1)
    probs = {k: torch.cat([p, 1 - p], 1) for k, p in (("predictive", probs_p), ("auxiliary", probs_a))}
    ctx = IterationContext(x=torch.zeros(1, 1, 2, 1, 1), n_l=1, labels=torch.tensor([0.0, 1.0]).view(1, 1, 2, 1, 1),
                           logits=probs, probs=probs, features={}, iteration=1, uncertainty_threshold=0.7)  # fmt: skip
    loss, stats = LabelledDisagreementTerm()(ctx)
    # voxel 2, truth (0, 1): predictive (0.8, 0.2) -> 0.64; auxiliary (0.3, 0.7) -> 0.09 (mean over 2 channels)
    torch.testing.assert_close(loss, torch.tensor(0.64 + 0.09), atol=1e-5, rtol=0)
    torch.testing.assert_close(stats["disagreement_fraction"], torch.tensor(0.5))


def test_the_clean_pass_runs_the_nets_in_training_mode() -> None:
    """After a validation left the nets in eval mode, the teachers' clean pass still uses batch statistics."""
    modes: list[tuple[bool, bool]] = []
    trainer = _trainer(iterations=1)

    def view(x_l, y_l, x_u, targets):
        modes.append((trainer.network.training, trainer.aux_network.training))
        return x_u, dict(targets)

    trainer.student_view = view
    trainer.network.eval()
    trainer.aux_network.eval()
    trainer.run()
    assert modes == [(True, True)]


def test_ema_teacher_follows_the_predictive_net() -> None:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    trainer = _trainer(iterations=3)
    trainer.teacher = "ema"  # the EMA copy needs the trainer's own predictive net
    trainer.ema_network = AveragedModel(trainer.network, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)
    start = [p.detach().clone() for p in trainer.ema_network.module.parameters()]
    trainer.run()
    ema = list(trainer.ema_network.module.parameters())
    net = list(trainer.network.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(ema, start))  # it moved ...
    assert all(float((e - n).abs().max()) <= float((s - n).abs().max()) + 1e-7 for e, s, n in zip(ema, start, net))


def test_ema_teacher_needs_a_network() -> None:
    with pytest.raises(ValueError, match="ema_network"):
        _trainer(teacher="ema")


@pytest.mark.parametrize("lambda_mistake, rows", [(0.0, ["sup"]), (0.5, ["sup", "mistake"])])
def test_method_table_has_the_mistake_row_only_when_weighted(lambda_mistake: float, rows: list) -> None:
    from monai.losses import DiceCELoss

    from multicure_monai.engines.loss_terms import method_loss_terms

    table = method_loss_terms(DiceCELoss(to_onehot_y=True, softmax=True), lambda_mistake=lambda_mistake)
    assert list(table) == rows
    if lambda_mistake:
        assert isinstance(table["mistake"].compute, LabelledDisagreementTerm)
        assert (table["mistake"].part, table["mistake"].weight_at(1)) == ("labelled", 0.5)
