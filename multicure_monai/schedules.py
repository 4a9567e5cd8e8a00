"""Iteration-dependent weight ``lambda_c`` of the contrastive loss (eq. 3).

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

``t`` is clamped to ``[0, t_max]``. MONAI has no loss-weight schedule, so this is written by hand.
"""

from __future__ import annotations

import math

__all__ = ["SCHEDULE_FORMS", "contrastive_weight", "ContrastiveWeightSchedule"]

SCHEDULE_FORMS: tuple[str, ...] = ("authors", "paper", "constant")


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


class ContrastiveWeightSchedule:
    """Picklable callable ``iteration -> lambda_c`` wrapping :func:`contrastive_weight` (for bundle configs).

    Args:
        max_iterations: horizon ``t_max`` (> 0).
        base: weight reached at ``t_max``.
        form: ``"authors"``, ``"paper"`` or ``"constant"``.

    Example:
        >>> schedule = ContrastiveWeightSchedule(6000, base=0.1)
        >>> round(schedule(6000), 6)
        0.1
    """

    def __init__(self, max_iterations: int, base: float = 0.1, form: str = "authors") -> None:
        _validate(max_iterations, base, form)
        self.max_iterations = int(max_iterations)
        self.base = float(base)
        self.form = form

    def __call__(self, iteration: int) -> float:
        """Weight at ``iteration`` (clamped to ``[0, max_iterations]``)."""
        return contrastive_weight(iteration, self.max_iterations, self.base, self.form)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_iterations={self.max_iterations}, base={self.base}, form={self.form!r})"
