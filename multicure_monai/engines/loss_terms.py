"""The trainer's loss table: one row per term, ``name -> (what it computes, weight schedule, nets, batch part)``.

:class:`~multicure_monai.engines.semi_supervised_trainer.SemiSupervisedTrainer` derives everything about its loss
from this table: the total ``sum_i w_i(t) * L_i``, the weighted terms of the gradient diagnostics, the NaN check,
the values it logs (``loss_<name>``, ``diag_weight_<name>`` and whatever stats a term returns, as ``diag_<key>``)
and the list of tensors it detaches. A new term is one :class:`LossTerm` row (in the bundle: one entry of
``loss_terms``); its ``compute`` reads the iteration's forward pass from an :class:`IterationContext`.

The rows of the method (eqs. 1-5 of the paper) are :class:`SupervisedTerm`, :class:`PseudoLabelTerm`,
:class:`XORRegularizationTerm` and :class:`ContrastiveTerm`; :func:`method_loss_terms` builds them. MONAI has no
multi-term, multi-network loss bookkeeping, so this is written here.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from monai.networks.utils import one_hot

from multicure_monai.engines.teachers import select_teacher
from multicure_monai.metrics.calibration import boundary_band
from multicure_monai.uncertainty import predicted_labels

__all__ = [
    "BATCH_PARTS",
    "CONTRASTIVE_ANCHORS",
    "CONTRASTIVE_BAND_WIDTH",
    "NETWORK_NAMES",
    "IterationContext",
    "LossTerm",
    "SupervisedTerm",
    "PseudoLabelTerm",
    "XORRegularizationTerm",
    "LabelledDisagreementTerm",
    "ContrastiveTerm",
    "call_with_stats",
    "check_loss_terms",
    "method_loss_terms",
]

NETWORK_NAMES = ("predictive", "auxiliary")
#: Which images of the batch a term reads: the labelled ones, the unlabelled ones, or all.
BATCH_PARTS = ("labelled", "unlabelled", "all")
CONTRASTIVE_ANCHORS = ("all", "labelled", "band")
#: Half-width in voxels of the ground-truth boundary band that ``contrastive_anchors="band"`` pulls.
CONTRASTIVE_BAND_WIDTH = 2


@dataclass
class IterationContext:
    """What one iteration's forward pass made, for the table's terms to read (batch: labelled images first).

    ``logits`` / ``probs`` (float32 softmax) / ``features`` are keyed by net name; ``labels`` ``(B_l, 1, H, W, D)``
    are the labelled images' integer labels; ``n_l`` the number of labelled images. The teacher of the iteration
    is chosen on first use of :attr:`teacher` (after the supervised terms, which record each net's ``L_s`` in
    ``supervised`` for MCF's ``better`` teacher), under ``autocast`` (the trainer's forward-pass precision).
    ``view_targets``: with a student view (:mod:`.student_views`), the teachers' targets of the unlabelled rows.
    """

    x: torch.Tensor
    n_l: int
    labels: torch.Tensor
    logits: dict[str, torch.Tensor]
    probs: dict[str, torch.Tensor]
    features: dict[str, list | None]
    iteration: int
    uncertainty_threshold: float
    teacher_name: str = "predictive"
    ema_network: torch.nn.Module | None = None
    autocast: Callable[[], Any] = contextlib.nullcontext
    view_targets: Mapping[str, torch.Tensor] | None = None
    supervised: dict[str, torch.Tensor] = field(default_factory=dict)
    _teacher: tuple | None = None

    @property
    def teacher_index(self) -> int:
        """0 predictive, 1 auxiliary, 2 EMA, 3 mutual; 0 when no row asked for a teacher this iteration."""
        return 0 if self._teacher is None else int(self._teacher[0])

    @property
    def teacher(self) -> tuple[int, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
        """``(index, detached teacher probabilities (B, N, H, W, D), students' (logits, probs, target probs))``;
        see :func:`~multicure_monai.engines.teachers.select_teacher`."""
        if self._teacher is None:
            sup = [self.supervised.get(n) for n in NETWORK_NAMES]
            with self.autocast():  # the EMA teacher's forward pass runs like the nets'
                self._teacher = select_teacher(
                    self.teacher_name,
                    self.x,
                    (self.logits["predictive"], self.probs["predictive"], sup[0]),
                    (self.logits["auxiliary"], self.probs["auxiliary"], sup[1]),
                    self.ema_network,
                    self.view_targets,
                    self.n_l,
                )
        return self._teacher


def _sum(values: Any) -> torch.Tensor:
    """The sum of tensors, without the ``0 +`` that :func:`sum` starts with."""
    total = None
    for value in values:
        total = value if total is None else total + value
    if total is None:
        raise ValueError("nothing to sum: a loss term found no net to apply to.")
    return total


def call_with_stats(loss_fn: Callable, *args: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """``(loss, stats)``: a loss whose ``forward`` takes ``return_stats`` is asked for them, any other gives ``{}``."""
    forward = getattr(loss_fn, "forward", loss_fn)
    try:
        takes_stats = "return_stats" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        takes_stats = False
    return loss_fn(*args, return_stats=True) if takes_stats else (loss_fn(*args), {})


@dataclass
class LossTerm:
    """One row of the loss table.

    Args:
        compute: ``compute(context) -> loss`` or ``(loss, stats)``; a scalar tensor, stats a dict of scalars logged
            as ``diag_<key>``.
        weight: a constant or a callable of the 1-based iteration (e.g.
            :class:`~multicure_monai.schedules.LossWeightSchedule`); a weight of 0 skips the term.
        scale: a constant factor on ``weight`` (``lambda_reg`` on the ramp of ``lambda_u``).
        nets: the nets whose parameters the term trains (documentation and a check of the names).
        part: which images it reads: ``"labelled"``, ``"unlabelled"`` or ``"all"``; supervised-only training keeps
            the ``"labelled"`` rows only.
    """

    compute: Callable[[IterationContext], Any]
    weight: float | Callable[[int], float] = 1.0
    scale: float = 1.0
    nets: Sequence[str] = NETWORK_NAMES
    part: str = "all"

    def __post_init__(self) -> None:
        if self.part not in BATCH_PARTS:
            raise ValueError(f"part must be one of {BATCH_PARTS}, got {self.part!r}.")
        if unknown := set(self.nets) - set(NETWORK_NAMES):
            raise ValueError(f"nets must be among {NETWORK_NAMES}, got {sorted(unknown)}.")
        if not callable(self.weight) and (self.weight < 0 or self.scale < 0):
            raise ValueError(f"weight and scale must be non-negative, got {self.weight} and {self.scale}.")

    def weight_at(self, iteration: int) -> float:
        """``weight(iteration) * scale``."""
        weight = float(self.weight(iteration)) if callable(self.weight) else float(self.weight)
        return weight * self.scale

    @property
    def feature_networks(self) -> tuple[str, ...]:
        """The nets whose features ``compute`` reads (it declares them as ``compute.feature_networks``)."""
        return tuple(getattr(self.compute, "feature_networks", ()))


class SupervisedTerm:
    """``L_s`` (eq. 1): the supervised loss of each net on the labelled images, summed.

    Args:
        loss: ``loss(logits, labels)``, e.g. MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)``.
        networks: the nets it trains.
    """

    def __init__(self, loss: Callable, networks: Sequence[str] = NETWORK_NAMES) -> None:
        self.loss, self.networks = loss, tuple(networks)

    def __call__(self, ctx: IterationContext) -> tuple[torch.Tensor, dict[str, Any]]:
        labels = ctx.labels.long()
        for net in self.networks:
            ctx.supervised[net] = self.loss(ctx.logits[net][: ctx.n_l].float(), labels).mean()
        total = _sum(ctx.supervised[n] for n in self.networks)
        return total, {f"loss_sup_{n}": ctx.supervised[n].detach() for n in self.networks}


class PseudoLabelTerm:
    """``L_pseudo`` (eq. 2): each student net against the teacher's confident argmax on the unlabelled images.

    Args:
        loss: ``loss(student_logits, teacher_probs)``, e.g. :class:`~multicure_monai.losses.PseudoLabelLoss`.
    """

    def __init__(self, loss: Callable) -> None:
        self.loss = loss

    def __call__(self, ctx: IterationContext) -> tuple[torch.Tensor, dict[str, Any]]:
        terms, fractions = [], []
        for logits, _, target in ctx.teacher[2]:
            term, stats = call_with_stats(self.loss, logits[ctx.n_l :].float(), target[ctx.n_l :])
            terms.append(term)
            if "mask_fraction" in stats:
                fractions.append(float(stats["mask_fraction"]))
        stats = {"pseudo_mask_fraction": torch.as_tensor(sum(fractions) / len(fractions))} if fractions else {}
        return _sum(terms), stats


class XORRegularizationTerm:
    """``L_reg`` (eq. 2): L1 between each student and the teacher where their argmaxes disagree (unlabelled images).

    Args:
        loss: ``loss(student_probs, target_probs)``, e.g. :class:`~multicure_monai.losses.XORRegularizationLoss`.
        detach_teacher: compare with the teacher's detached probabilities (eq. 2); ``False`` with the predictive
            teacher also pulls the predictive net towards the auxiliary one (MCF's mutual correction; not with a
            student view, whose targets are the clean crops' detached probabilities).
    """

    def __init__(self, loss: Callable, detach_teacher: bool = True) -> None:
        self.loss, self.detach_teacher = loss, detach_teacher

    def __call__(self, ctx: IterationContext) -> torch.Tensor:
        pull_predictive = not self.detach_teacher and ctx.teacher_name == "predictive" and ctx.view_targets is None
        n_l = ctx.n_l
        return _sum(
            self.loss(probs[n_l:], (ctx.probs["predictive"] if pull_predictive else target)[n_l:])
            for _, probs, target in ctx.teacher[2]
        )


class LabelledDisagreementTerm:
    """MCF's mistake correction on the labelled images: where the two nets' argmaxes disagree, each net's squared
    distance to the one-hot ground truth, averaged over the disagreeing voxels (Wang et al., CVPR 2023).

    Unlike ``L_reg`` on unlabelled voxels (eq. 2), whose target is the teacher, this one corrects with the truth.
    """

    def __call__(self, ctx: IterationContext) -> tuple[torch.Tensor, dict[str, Any]]:
        probs = {net: ctx.probs[net][: ctx.n_l] for net in NETWORK_NAMES}
        disagree = (predicted_labels(probs["predictive"]) != predicted_labels(probs["auxiliary"])).float()
        truth = one_hot(ctx.labels.long(), probs["predictive"].shape[1], dim=1).to(probs["predictive"])
        count = disagree.sum()
        squared = (((p - truth) ** 2).mean(1, keepdim=True) for p in probs.values())
        total = _sum(d.mul(disagree).sum() / (count + 1e-6) for d in squared)
        return total, {"disagreement_fraction": (count / disagree.numel()).detach()}


class ContrastiveTerm:
    """``L_c`` (eqs. 4-5): each listed net's prototype contrastive loss on its own decoder features.

    Reliable voxels (teacher confidence above the threshold) build the class prototypes; anchors are pulled to
    their class prototype. A voxel's class is the ground truth on labelled images, the teacher's argmax elsewhere.

    Args:
        loss: ``loss(features, labels, reliable, uncertain)``, e.g.
            :class:`~multicure_monai.losses.PrototypeContrastiveLoss`.
        anchors: ``"band"`` (every labelled voxel within ``band_width`` voxels of the true surface),
            ``"labelled"`` (the uncertain voxels of the labelled images) or ``"all"`` (the paper: the uncertain
            voxels of every image).
        networks: the nets whose features it trains.
        band_width: half-width of the band in voxels.
    """

    def __init__(self, loss: Callable, anchors: str = "band", networks: Sequence[str] = NETWORK_NAMES,
                 band_width: int = CONTRASTIVE_BAND_WIDTH) -> None:  # fmt: skip
        if anchors not in CONTRASTIVE_ANCHORS:
            raise ValueError(f"contrastive_anchors must be one of {CONTRASTIVE_ANCHORS}, got {anchors!r}.")
        if unknown := set(networks) - set(NETWORK_NAMES):
            raise ValueError(f"contrastive_networks must be among {NETWORK_NAMES}, got {sorted(unknown)}.")
        self.loss, self.anchors, self.band_width = loss, anchors, int(band_width)
        self.feature_networks = tuple(networks)

    def __call__(self, ctx: IterationContext) -> tuple[torch.Tensor, dict[str, Any]]:
        n_l, (_, teacher_probs, _) = ctx.n_l, ctx.teacher
        conf, argmax = teacher_probs.max(dim=1, keepdim=True)
        labels = torch.cat([ctx.labels.long().to(argmax.dtype), argmax[n_l:]], dim=0)
        reliable = conf > ctx.uncertainty_threshold
        uncertain = conf < ctx.uncertainty_threshold  # the uncertainty map's definition
        if self.anchors == "labelled":
            uncertain[n_l:] = False
        elif self.anchors == "band":
            uncertain = torch.zeros_like(uncertain)
            uncertain[:n_l] = boundary_band(ctx.labels.long(), self.band_width)
        total, eq5, chance = None, 0.0, 0.0
        for net in self.feature_networks:
            if not ctx.features.get(net):  # an adapted net without features
                continue
            term, stats = call_with_stats(self.loss, ctx.features[net], labels, reliable, uncertain)
            total = term if total is None else total + term
            if stats.get("contrast") is not None:
                eq5 = eq5 + stats["contrast"]
                chance += float(stats.get("chance", 0.0))
        if total is None:
            total = ctx.logits["predictive"].new_zeros(())
        eq5 = eq5.detach() if isinstance(eq5, torch.Tensor) else torch.as_tensor(eq5)
        return total, {"contrastive_eq5": eq5, "contrastive_chance": torch.as_tensor(chance)}


def method_loss_terms(
    supervised_loss: Callable,
    pseudo_label_loss: Callable | None = None,
    regularization_loss: Callable | None = None,
    contrastive_loss: Callable | None = None,
    lambda_u: float | Callable[[int], float] = 1.0,
    lambda_reg: float = 1.0,
    lambda_c: float | Callable[[int], float] = 0.1,
    contrastive_anchors: str = "band",
    contrastive_networks: Sequence[str] = NETWORK_NAMES,
    detach_predictive_in_reg: bool = True,
    lambda_mistake: float = 0.0,
) -> dict[str, LossTerm]:
    """The method's table (``L = L_s + lambda_u (L_pseudo + lambda_reg L_reg) + lambda_c L_c``) from its parts;
    a ``None`` loss leaves its row out, and ``lambda_mistake > 0`` adds MCF's :class:`LabelledDisagreementTerm`.
    The bundle's train.yaml writes the same rows out."""
    rows = {"sup": LossTerm(SupervisedTerm(supervised_loss), part="labelled")}
    if pseudo_label_loss is not None:
        rows["pseudo"] = LossTerm(PseudoLabelTerm(pseudo_label_loss), lambda_u, part="unlabelled")
    if regularization_loss is not None:
        term = XORRegularizationTerm(regularization_loss, detach_predictive_in_reg)
        rows["reg"] = LossTerm(term, lambda_u, scale=lambda_reg, part="unlabelled")
    if lambda_mistake:
        rows["mistake"] = LossTerm(LabelledDisagreementTerm(), lambda_mistake, part="labelled")
    if contrastive_loss is not None:
        term = ContrastiveTerm(contrastive_loss, contrastive_anchors, contrastive_networks)
        rows["contrastive"] = LossTerm(term, lambda_c, nets=contrastive_networks)
    return rows


def check_loss_terms(terms: Mapping[str, LossTerm]) -> dict[str, LossTerm]:
    """The table as a dict, each row a :class:`LossTerm`; names usable as ``loss_<name>`` keys."""
    if not terms:
        raise ValueError("loss_terms is empty: the trainer needs at least one row (e.g. the supervised loss).")
    out = {}
    for name, row in terms.items():
        if not isinstance(row, LossTerm):
            raise ValueError(f"loss_terms[{name!r}] must be a LossTerm, got {type(row).__name__}.")
        if not str(name).isidentifier():
            raise ValueError(f"loss term names must be identifiers (they become loss_<name>), got {name!r}.")
        out[str(name)] = row
    return out
