"""Which network teaches in an iteration of the two-network trainer (the bundle's ``unlabelled#teacher``).

``"predictive"`` is the paper (the V-Net's pseudo labels train the auxiliary net); ``"better"`` is MCF's dynamic
competition (the net with the lower supervised loss on the labelled batch teaches the other); ``"ema"`` is
UA-MT / mean teacher (an exponential moving average of the predictive net, in training mode, teaches both);
``"mutual"`` is cross pseudo supervision (CPS, Chen et al. 2021: each net's confident argmax trains the other), so
the unlabelled images reach both nets.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from multicure_monai.networks.two_nets import forward_two_nets

__all__ = [
    "TEACHERS",
    "TEACHER_INDEX",
    "select_teacher",
    "clean_view_probabilities",
    "ema_teacher",
    "warmup_ema_multi_avg_fn",
]

TEACHERS = ("predictive", "better", "ema", "mutual")
#: ``diag_teacher``'s value for each teacher (``better`` logs 0 or 1, the net that taught).
TEACHER_INDEX = {"predictive": 0, "auxiliary": 1, "ema": 2, "mutual": 3}

Student = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def select_teacher(
    teacher: str,
    x: torch.Tensor,
    predictive: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    auxiliary: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ema_network: torch.nn.Module | None = None,
    view_targets: Mapping[str, torch.Tensor] | None = None,
    n_l: int = 0,
) -> tuple[int, torch.Tensor, list[Student]]:
    """The teacher of this iteration, its detached probabilities and each student's target.

    Args:
        teacher: one of :data:`TEACHERS`.
        x: the iteration's input ``(B, C, H, W, D)`` (the EMA teacher runs on it).
        predictive: the predictive net's ``(logits, probs, supervised loss)``.
        auxiliary: the auxiliary net's ``(logits, probs, supervised loss)``.
        ema_network: the EMA teacher (``teacher="ema"`` only).
        view_targets: the teachers' probabilities of the unlabelled rows ``x[n_l:]`` as the students' view shows
            them (:mod:`.student_views`), keyed ``"predictive"`` / ``"auxiliary"`` / ``"ema"``; they replace the
            in-batch probabilities of those rows. ``None``: the students see what the teacher sees.
        n_l: the number of labelled rows (with ``view_targets``).

    Returns:
        ``(index, teacher_probs, students)``: index per :data:`TEACHER_INDEX`; ``teacher_probs``
        ``(B, N, H, W, D)`` without gradient (for ``mutual`` the predictive net's, the net whose confidence
        defines uncertainty); ``students`` the ``(logits, probs, target probs)`` of each net that learns.
    """
    logits_p, probs_p, sup_p = predictive
    logits_a, probs_a, sup_a = auxiliary

    def rows(probs: torch.Tensor, name: str) -> torch.Tensor:
        probs = probs.detach()
        return probs if view_targets is None else torch.cat([probs[:n_l], view_targets[name]], dim=0)

    if teacher == "ema":
        probs = _ema_probabilities(ema_network, x if view_targets is None else x[:n_l])
        probs = probs if view_targets is None else torch.cat([probs, view_targets["ema"]], dim=0)
        return 2, probs, [(logits_p, probs_p, probs), (logits_a, probs_a, probs)]
    if teacher == "mutual":
        target_p, target_a = rows(probs_p, "predictive"), rows(probs_a, "auxiliary")
        return 3, target_p, [(logits_p, probs_p, target_a), (logits_a, probs_a, target_p)]
    if teacher == "better" and bool(sup_a.detach() < sup_p.detach()):
        target = rows(probs_a, "auxiliary")
        return 1, target, [(logits_p, probs_p, target)]
    target = rows(probs_p, "predictive")
    return 0, target, [(logits_a, probs_a, target)]


def _ema_probabilities(ema_network: torch.nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    """The EMA teacher's float32 softmax of ``x``, without gradient, in training mode (batch statistics)."""
    if ema_network is None:
        raise ValueError("teacher='ema' needs an ema_network.")
    with torch.no_grad():
        ema_network.train()
        return torch.softmax(ema_network(x).float(), dim=1)


def warmup_ema_multi_avg_fn(decay: float) -> Callable:
    """An :class:`~torch.optim.swa_utils.AveragedModel` ``multi_avg_fn`` whose decay warms up as the mean
    teacher's (UA-MT): ``min(1 - 1 / (n + 1), decay)`` after ``n`` updates, so the early teacher follows the net
    instead of averaging its random start."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {decay}.")

    @torch.no_grad()
    def update(ema_params: list, params: list, num_averaged: torch.Tensor) -> None:
        current = min(1.0 - 1.0 / (int(num_averaged) + 1), decay)
        if torch.is_floating_point(ema_params[0]) or torch.is_complex(ema_params[0]):
            torch._foreach_lerp_(ema_params, params, 1.0 - current)
        else:  # integer buffers (BatchNorm's num_batches_tracked) follow the net
            torch._foreach_copy_(ema_params, params)

    return update


def ema_teacher(network: torch.nn.Module, decay: float = 0.99, warmup: bool = True) -> AveragedModel:
    """The EMA teacher of ``network`` (parameters and BatchNorm buffers), updated by the trainer after each step.

    Args:
        network: the predictive net (a fresh copy is averaged; the net itself is not changed).
        decay: the EMA decay.
        warmup: ``min(1 - 1/(n + 1), decay)`` (:func:`warmup_ema_multi_avg_fn`); ``False``: ``decay`` from the
            first update.
    """
    avg_fn = warmup_ema_multi_avg_fn(decay) if warmup else get_ema_multi_avg_fn(decay)
    return AveragedModel(network, multi_avg_fn=avg_fn, use_buffers=True)


def clean_view_probabilities(
    teacher: str,
    predictive: torch.nn.Module,
    auxiliary: torch.nn.Module,
    x_u: torch.Tensor,
    uncertainty_threshold: float,
    predictive_uses_uncertainty: bool = False,
    ema_network: torch.nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """The probabilities ``(B_u, N, H, W, D)`` of the nets that can teach under ``teacher``, on the clean
    unlabelled crops ``x_u``, without gradient: the source of a student view's targets (:mod:`.student_views`)."""
    if teacher == "ema":
        return {"ema": _ema_probabilities(ema_network, x_u)}
    with torch.no_grad():
        out = forward_two_nets(predictive, auxiliary, x_u, uncertainty_threshold, predictive_uses_uncertainty,
                               run_auxiliary=teacher != "predictive")  # fmt: skip
        probs = {"predictive": out.probs_p}
        if out.logits_a is not None:
            probs["auxiliary"] = torch.softmax(out.logits_a.float(), dim=1)
        return probs
