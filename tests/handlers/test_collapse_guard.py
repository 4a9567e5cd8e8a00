"""Tests for multicure_monai/handlers/collapse_guard.py: a net that stops predicting foreground is reported."""

from __future__ import annotations

import logging

import pytest
import torch
from ignite.engine import Engine

from multicure_monai.handlers.collapse_guard import CollapseGuard


def _engine(fractions: list[tuple[float, float]], guard: CollapseGuard) -> Engine:
    """An engine whose output per iteration is (predicted fg of the predictive net, true fg)."""

    def step(engine: Engine, batch: tuple[float, float]) -> dict:
        pred, true = batch
        return {"diag_fg_predictive": torch.tensor(pred), "diag_fg_label": torch.tensor(true), "loss": torch.tensor(1.0)}

    engine = Engine(step)
    guard.attach(engine)
    return engine


@pytest.mark.parametrize(
    "sequence, patience, collapsed_at",
    [
        ([(0.0, 0.2)] * 5, 3, [3]),  # warns once, at the third collapsed iteration in a row
        ([(0.0, 0.2), (0.0, 0.2), (0.1, 0.2), (0.0, 0.2), (0.0, 0.2)], 3, []),  # a recovery resets the streak
        ([(0.0, 0.0)] * 5, 2, []),  # crops without foreground never count
        ([(0.009, 0.2)] * 4, 4, [4]),  # below 5 % of the true foreground
        ([(0.011, 0.2)] * 4, 4, []),
    ],
)
def test_collapse_guard_warns_after_patience(sequence, patience, collapsed_at, caplog) -> None:
    guard = CollapseGuard(patience=patience)
    engine = _engine(sequence, guard)
    with caplog.at_level(logging.WARNING):
        engine.run(sequence, max_epochs=1)
    assert [it for it, _ in guard.collapsed] == collapsed_at
    assert ("COLLAPSE" in caplog.text) == bool(collapsed_at)
    assert engine.state.iteration == len(sequence)


def test_collapse_guard_can_stop_the_run(caplog) -> None:
    guard = CollapseGuard(patience=2, stop=True)
    sequence = [(0.0, 0.2)] * 6
    engine = _engine(sequence, guard)
    with caplog.at_level(logging.WARNING):
        engine.run(sequence, max_epochs=1)
    assert engine.state.iteration == 2
    assert "iteration 2" in caplog.text and "loss=1" in caplog.text


@pytest.mark.parametrize("kwargs", [{"ratio": 1.5}, {"patience": 0}])
def test_collapse_guard_rejects_bad_settings(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        CollapseGuard(**kwargs)
