"""Iteration-dependent loss weights ``lambda_u`` and ``lambda_c`` (eq. 3), and the learning-rate policy.

Section 3 of the paper states ``lambda_c = 0.1 * e^{4 (1 - t / t_max)^2}``. Read literally this *decays*
from ``0.1 * e^4 ~= 5.46`` at ``t = 0`` to ``0.1`` at ``t_max``, i.e. the contrastive term would dominate the
start of training, when prototypes come from an untrained network. That contradicts the usual practice the
method builds on (UA-MT / MCF style sigmoid ramp-up ``exp(-5 (1 - t/t_max)^2)``, used in the authors' code),
so the formula is most probably a typo of the ramp-up with a lost minus sign (and 4 for 5). Three forms are
offered:

* ``"authors"`` (default): ``base * exp(-5 (1 - t/t_max)^2)``, rising from ``base * e^-5 ~= 0.0067 base``
  to ``base``;
* ``"paper"``: the literal ``base * exp(4 (1 - t/t_max)^2)``, decaying from ``base * e^4`` to ``base``;
* ``"constant"``: ``base``.

``t`` is clamped to ``[0, t_max]``. ``t_max`` is a ramp horizon in iterations: the paper ties it to the run
length, so a 300- and a 6000-iteration run see different curves; :class:`LossWeightSchedule` takes it as its own
``rampup_iterations`` (the bundle's ``unlabelled#rampup_iterations``), independent of the run length. MONAI has no
loss-weight schedule, so this is written by hand.

:func:`learning_rate_scheduler` picks the learning-rate policy by name for the bundle's ``optim#lr_policy`` switch:
the paper's steps, or a polynomial decay that reaches zero at the run's end, so that a short run ends on a
converged model rather than on a snapshot of SGD at the full learning rate.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "SCHEDULE_FORMS",
    "LR_POLICIES",
    "contrastive_weight",
    "LossWeightSchedule",
    "ContrastiveWeightSchedule",
    "learning_rate_scheduler",
]

SCHEDULE_FORMS: tuple[str, ...] = ("authors", "paper", "constant")
LR_POLICIES: tuple[str, ...] = ("step", "poly")


def _validate(max_iterations: int, base: float, form: str) -> None:
    """Raise ``ValueError`` on a non-positive horizon, a negative / non-finite base or an unknown form."""
    if int(max_iterations) != max_iterations or max_iterations <= 0:
        raise ValueError(f"max_iterations must be a positive integer, got {max_iterations!r}.")
    if not math.isfinite(base) or base < 0:
        raise ValueError(f"base must be a finite non-negative number, got {base!r}.")
    if form not in SCHEDULE_FORMS:
        raise ValueError(f"Unknown form {form!r}; choose one of {list(SCHEDULE_FORMS)}.")


def contrastive_weight(iteration: int, max_iterations: int, base: float = 0.1, form: str = "authors") -> float:
    """Contrastive-loss weight ``lambda_c`` at ``iteration``.

    Args:
        iteration: current iteration ``t`` (0-based); clamped to ``[0, max_iterations]``.
        max_iterations: horizon ``t_max`` (> 0).
        base: weight reached at ``t_max`` (0.1 in the paper).
        form: ``"authors"`` (sigmoid ramp-up ``base * exp(-5 (1 - t/t_max)^2)``), ``"paper"`` (literal section 3
            formula ``base * exp(4 (1 - t/t_max)^2)``, probably garbled, see module docstring) or ``"constant"``.

    Returns:
        The weight as a Python float.

    Raises:
        ValueError: on ``max_iterations <= 0``, negative ``base`` or an unknown ``form``.
    """
    _validate(max_iterations, base, form)
    if form == "constant":
        return float(base)
    t = min(max(float(iteration), 0.0), float(max_iterations))
    remaining = 1.0 - t / float(max_iterations)
    exponent = -5.0 * remaining**2 if form == "authors" else 4.0 * remaining**2
    return float(base) * math.exp(exponent)


class LossWeightSchedule:
    """Picklable callable ``iteration -> weight`` wrapping :func:`contrastive_weight` (for bundle configs).

    Args:
        rampup_iterations: ramp horizon ``t_max`` in iterations (> 0); the weight is ``base`` from there on.
        base: weight reached at ``rampup_iterations``.
        form: ``"authors"``, ``"paper"`` or ``"constant"``.

    Example:
        >>> schedule = LossWeightSchedule(200, base=1.0)
        >>> round(schedule(200), 6), round(schedule(6000), 6)
        (1.0, 1.0)
    """

    def __init__(self, rampup_iterations: int, base: float = 0.1, form: str = "authors") -> None:
        _validate(rampup_iterations, base, form)
        self.rampup_iterations = int(rampup_iterations)
        self.base = float(base)
        self.form = form

    def __call__(self, iteration: int) -> float:
        """Weight at ``iteration`` (clamped to ``[0, rampup_iterations]``)."""
        return contrastive_weight(iteration, self.rampup_iterations, self.base, self.form)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rampup_iterations={self.rampup_iterations}, base={self.base}, form={self.form!r})"


class ContrastiveWeightSchedule(LossWeightSchedule):
    """:class:`LossWeightSchedule` with the horizon named ``max_iterations`` (the paper's ``t_max``).

    Args:
        max_iterations: horizon ``t_max`` (> 0).
        base: weight reached at ``t_max``.
        form: ``"authors"``, ``"paper"`` or ``"constant"``.
    """

    def __init__(self, max_iterations: int, base: float = 0.1, form: str = "authors") -> None:
        super().__init__(max_iterations, base, form)

    @property
    def max_iterations(self) -> int:
        """The horizon ``t_max`` (the same value as ``rampup_iterations``)."""
        return self.rampup_iterations


def learning_rate_scheduler(
    optimizer: torch.optim.Optimizer,
    policy: str = "step",
    max_iterations: int | None = None,
    step_size: int = 2500,
    gamma: float = 0.1,
    power: float = 0.9,
) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate scheduler of ``policy``, stepped once per iteration.

    Args:
        optimizer: the optimizer whose learning rate is scheduled.
        policy: ``"step"`` (the paper: multiply by ``gamma`` every ``step_size`` iterations, :class:`StepLR`) or
            ``"poly"`` (``lr * (1 - t / max_iterations) ** power``, zero after ``max_iterations`` steps,
            :class:`PolynomialLR`).
        max_iterations: the run length; required by ``"poly"``.
        step_size: iterations between two steps of ``"step"``.
        gamma: factor of each step of ``"step"``.
        power: exponent of ``"poly"``.

    Returns:
        A PyTorch scheduler (its state goes into the resume checkpoints as any scheduler's does).

    Raises:
        ValueError: an unknown policy, or ``"poly"`` without a positive ``max_iterations``.
    """
    if policy == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)
    if policy == "poly":
        if max_iterations is None or int(max_iterations) <= 0:
            raise ValueError(f"lr_policy 'poly' needs a positive max_iterations, got {max_iterations!r}.")
        return torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=int(max_iterations), power=power)
    raise ValueError(f"Unknown lr_policy {policy!r}; choose one of {list(LR_POLICIES)}.")
