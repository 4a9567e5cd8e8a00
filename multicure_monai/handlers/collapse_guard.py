"""Warn (or stop) when a net of the two-network trainer stops predicting foreground on the labelled crops.

A semi-supervised run can fail quietly: a net drifts to predicting background everywhere while the ensemble
still validates. :class:`CollapseGuard` watches the foreground fractions the trainer reports for each net
(``diag_fg_*``). MONAI and ignite have no such handler.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from ignite.engine import Engine, Events

__all__ = ["CollapseGuard"]


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
