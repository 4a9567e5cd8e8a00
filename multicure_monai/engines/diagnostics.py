"""Training diagnostics of the two-network method: per-loss gradient norms, a collapse guard, a NaN/Inf guard.

A semi-supervised run can fail quietly: one loss term outgrows the supervised one, or a net drifts to predicting
background everywhere while the ensemble still validates. :func:`loss_gradient_norms` measures how hard each
weighted loss term pulls on each net, and :class:`CollapseGuard` watches the foreground the nets predict on the
labelled crops. Neither exists in MONAI or ignite, so both are written here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events

__all__ = ["loss_gradient_norms", "check_finite_losses", "CollapseGuard"]


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


class CollapseGuard:
    """Warn (or stop) when a network stops predicting foreground on the labelled crops.

    After every iteration it reads ``engine.state.output[key]`` (predicted foreground fraction of a net on the
    labelled crops) and ``engine.state.output[label_key]`` (the true one). A net counts as collapsed in an
    iteration when it predicts less than ``ratio`` times the true foreground while the crops hold some; after
    ``patience`` collapsed iterations in a row it logs a warning with the iteration and the loss terms, and with
    ``stop=True`` terminates the run (models/model.pt, the best validated model, stays as it is).

    Args:
        keys: output keys of the nets' predicted foreground fractions.
        label_key: output key of the true foreground fraction.
        ratio: collapsed when predicted < ratio * true foreground.
        patience: consecutive collapsed iterations before it acts.
        stop: terminate the engine when a net collapses.
        loss_prefix: output keys starting with this are printed with the warning.
    """

    def __init__(
        self,
        keys: Sequence[str] = ("diag_fg_predictive", "diag_fg_auxiliary"),
        label_key: str = "diag_fg_label",
        ratio: float = 0.05,
        patience: int = 20,
        stop: bool = False,
        loss_prefix: str = "loss",
    ) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio must lie in [0, 1], got {ratio}.")
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}.")
        self.keys = tuple(keys)
        self.label_key = label_key
        self.ratio = float(ratio)
        self.patience = int(patience)
        self.stop = bool(stop)
        self.loss_prefix = loss_prefix
        self.streak = {k: 0 for k in self.keys}
        self.collapsed: list[tuple[int, str]] = []
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        """Run after every iteration of ``engine``."""
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        if not isinstance(output, dict) or self.label_key not in output:
            return
        true_fg = float(output[self.label_key])
        for key in self.keys:
            if key not in output:
                continue
            low = true_fg > 0 and float(output[key]) < self.ratio * true_fg
            self.streak[key] = self.streak[key] + 1 if low else 0
            if self.streak[key] == self.patience:
                self._act(engine, key, output)

    def _act(self, engine: Engine, key: str, output: dict[str, Any]) -> None:
        iteration = engine.state.iteration
        self.collapsed.append((iteration, key))
        losses = ", ".join(
            f"{k}={float(v):.4g}" for k, v in output.items() if isinstance(k, str) and k.startswith(self.loss_prefix)
        )
        self.logger.warning(
            "COLLAPSE: %s < %.3g x the true foreground (%.4g) for %d iterations in a row at iteration %d; "
            "loss terms: %s. models/model.pt keeps the best validated model.%s",
            key, self.ratio, float(output[self.label_key]), self.patience, iteration, losses,
            " Stopping (stop=True)." if self.stop else "",
        )  # fmt: skip
        if self.stop:
            engine.terminate()
