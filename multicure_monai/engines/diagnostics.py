"""The trainer's diagnostics: what each iteration's nets predict, per-loss gradient norms and a NaN/Inf guard.

A semi-supervised run can fail quietly: one loss term outgrows the supervised one. :func:`loss_gradient_norms`
measures how hard each weighted loss term pulls on each net; :func:`check_finite_losses` stops before an
optimizer step on a non-finite loss and names the term. Neither exists in MONAI or ignite, so both are written
here. The collapse guard, a handler, is :class:`multicure_monai.handlers.collapse_guard.CollapseGuard`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from multicure_monai.uncertainty import predicted_labels

__all__ = ["prediction_diagnostics", "loss_gradient_norms", "check_finite_losses"]


@torch.no_grad()
def prediction_diagnostics(
    logits_p: torch.Tensor,
    logits_a: torch.Tensor,
    probs_p: torch.Tensor,
    y_l: torch.Tensor,
    uncertainty_threshold: float,
) -> dict[str, torch.Tensor]:
    """Foreground fractions of the labels and of each net's argmax on the ``n_l = len(y_l)`` labelled crops, and
    the fraction of voxels the predictive net is unsure of (``diag_*`` of the trainer's output).

    Args:
        logits_p / logits_a: each net's logits ``(B, N, H, W, D)``, the labelled crops first.
        probs_p: the predictive net's probabilities, same shape.
        y_l: the labels ``(n_l, 1, H, W, D)``.
        uncertainty_threshold: confidence below which a voxel is uncertain.
    """
    n_l = y_l.shape[0]
    return {
        "diag_fg_label": (y_l.long() != 0).float().mean(),
        "diag_fg_predictive": (predicted_labels(logits_p[:n_l]) != 0).float().mean(),
        "diag_fg_auxiliary": (predicted_labels(logits_a[:n_l]) != 0).float().mean(),
        "diag_uncertain_fraction": (probs_p.amax(dim=1) < uncertainty_threshold).float().mean(),
    }


def loss_gradient_norms(
    terms: Mapping[str, torch.Tensor], networks: Mapping[str, torch.nn.Module], prefix: str = "grad_"
) -> dict[str, torch.Tensor]:
    """L2 norm of the gradient each loss term sends into each network's parameters.

    One ``torch.autograd.grad`` call per term (over the parameters of all networks at once, keeping the graph),
    so the caller's ``backward`` still runs afterwards. A term that does not reach a network (detached teacher,
    a zero loss) gives 0.

    Args:
        terms: name -> scalar loss term (weighted as it enters the total loss).
        networks: name -> network.
        prefix: prepended to the output keys.

    Returns:
        ``{prefix + term + "_" + net: norm}`` as detached scalar tensors.
    """
    params = {name: [p for p in net.parameters() if p.requires_grad] for name, net in networks.items()}
    flat = [p for plist in params.values() for p in plist]
    out: dict[str, torch.Tensor] = {}
    for term_name, term in terms.items():
        if not isinstance(term, torch.Tensor) or not term.requires_grad:
            grads: Sequence[torch.Tensor | None] = [None] * len(flat)
        else:
            grads = torch.autograd.grad(term, flat, retain_graph=True, allow_unused=True)
        start = 0
        for net_name, plist in params.items():
            chunk = [g for g in grads[start : start + len(plist)] if g is not None]
            start += len(plist)
            norm = torch.linalg.vector_norm(torch.stack([g.float().norm() for g in chunk])) if chunk else None
            out[f"{prefix}{term_name}_{net_name}"] = torch.zeros(()) if norm is None else norm.detach()
    return out


def check_finite_losses(terms: Mapping[str, Any], iteration: int, names: Sequence[str]) -> None:
    """Stop before the optimizer step when the loss is NaN/Inf, naming the term(s) and the iteration.

    The weights are left as they were after the previous (good) iteration, so no checkpoint handler can write NaN
    weights; the raised ``FloatingPointError`` ends the run through ignite's exception event.

    Args:
        terms: the engine output; ``terms[names[0]]`` is the total loss, the other names its terms.
        iteration: the current iteration, for the message.
        names: the total loss's key, then the keys of its terms.

    Raises:
        FloatingPointError: if the total loss is not finite.
    """
    if bool(torch.isfinite(terms[names[0]].detach())):
        return
    values = {k: float(terms[k].detach()) for k in names if k in terms}
    bad = [k for k in names[1:] if k in values and not math.isfinite(values[k])]
    listed = ", ".join(f"{k}={values[k]}" for k in bad) or f"{names[0]}={values[names[0]]}"
    raise FloatingPointError(
        f"non-finite loss at iteration {iteration}: {listed}; the step was skipped and the weights are those "
        "of the previous iteration (check the input intensities and the learning rate; with amp, try amp=false)."
    )
