"""Which network teaches in an iteration of the two-network trainer (the ``teacher`` switch).

``"predictive"`` is the paper (the V-Net's pseudo labels train the auxiliary net); ``"better"`` is MCF's dynamic
competition (the net with the lower supervised loss on the labelled batch teaches the other); ``"ema"`` is
UA-MT / mean teacher (an exponential moving average of the predictive net, in training mode, teaches both).
"""

from __future__ import annotations

import torch

__all__ = ["TEACHERS", "select_teacher"]

TEACHERS = ("predictive", "better", "ema")


def select_teacher(
    teacher: str,
    x: torch.Tensor,
    predictive: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    auxiliary: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ema_network: torch.nn.Module | None = None,
) -> tuple[int, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The teacher of this iteration, its detached probabilities and the students.

    Args:
        teacher: one of :data:`TEACHERS`.
        x: the iteration's input ``(B, C, H, W, D)`` (the EMA teacher runs on it).
        predictive: the predictive net's ``(logits, probs, supervised loss)``.
        auxiliary: the auxiliary net's ``(logits, probs, supervised loss)``.
        ema_network: the EMA teacher (``teacher="ema"`` only).

    Returns:
        ``(index, teacher_probs, students)``: index 0 predictive, 1 auxiliary, 2 EMA; ``teacher_probs``
        ``(B, C, H, W, D)`` without gradient; ``students`` the ``(logits, probs)`` of each net it teaches.
    """
    logits_p, probs_p, sup_p = predictive
    logits_a, probs_a, sup_a = auxiliary
    if teacher == "ema":
        if ema_network is None:
            raise ValueError("teacher='ema' needs an ema_network.")
        with torch.no_grad():
            ema_network.train()
            probs = torch.softmax(ema_network(x).float(), dim=1)
        return 2, probs, [(logits_p, probs_p), (logits_a, probs_a)]
    if teacher == "better" and bool(sup_a.detach() < sup_p.detach()):
        return 1, probs_a.detach(), [(logits_p, probs_p)]
    return 0, probs_p.detach(), [(logits_a, probs_a)]
