"""Tests for multicure_monai/schedules.py."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from multicure_monai.schedules import ContrastiveWeightSchedule, contrastive_weight

T_MAX = 6000


@pytest.mark.parametrize("base", [0.1, 1.0])
@pytest.mark.parametrize(
    "form, factors",
    [
        ("authors", (math.exp(-5.0), math.exp(-1.25), 1.0)),
        ("paper", (math.exp(4.0), math.exp(1.0), 1.0)),
        ("constant", (1.0, 1.0, 1.0)),
    ],
)
def test_known_values(form: str, factors: tuple[float, float, float], base: float) -> None:
    for t, factor in zip((0, T_MAX // 2, T_MAX), factors):
        assert contrastive_weight(t, T_MAX, base, form) == pytest.approx(base * factor, rel=1e-12)


def test_authors_start_value() -> None:
    assert contrastive_weight(0, T_MAX) == pytest.approx(0.1 * 0.006738, rel=1e-3)


@pytest.mark.parametrize("form", ["authors", "paper", "constant"])
def test_clamped(form: str) -> None:
    assert contrastive_weight(-10, T_MAX, form=form) == contrastive_weight(0, T_MAX, form=form)
    assert contrastive_weight(3 * T_MAX, T_MAX, form=form) == contrastive_weight(T_MAX, T_MAX, form=form)


@pytest.mark.parametrize("form, sign", [("authors", 1), ("paper", -1)])
def test_monotone(form: str, sign: int) -> None:
    values = [contrastive_weight(t, 100, form=form) for t in range(101)]
    diffs = [sign * (b - a) for a, b in zip(values, values[1:])]
    assert all(d > 0 for d in diffs)


@pytest.mark.parametrize("max_iterations", [0, -5])
def test_rejects_bad_horizon(max_iterations: int) -> None:
    with pytest.raises(ValueError, match="max_iterations"):
        contrastive_weight(0, max_iterations)
    with pytest.raises(ValueError, match="max_iterations"):
        ContrastiveWeightSchedule(max_iterations)


def test_rejects_unknown_form_listing_choices() -> None:
    with pytest.raises(ValueError, match="authors.*paper.*constant"):
        contrastive_weight(0, 10, form="linear")
    with pytest.raises(ValueError, match="authors"):
        ContrastiveWeightSchedule(10, form="linear")


@pytest.mark.parametrize("form", ["authors", "paper", "constant"])
def test_schedule_object_matches_function_and_pickles(form: str) -> None:
    schedule = ContrastiveWeightSchedule(T_MAX, base=0.2, form=form)
    clone = pickle.loads(pickle.dumps(schedule))
    for t in (0, 1, 1234, T_MAX // 2, T_MAX, T_MAX + 7):
        expected = contrastive_weight(t, T_MAX, 0.2, form)
        assert schedule(t) == expected
        assert clone(t) == expected
    assert form in repr(schedule)


def _lrs(policy: str, steps: int, **kwargs) -> list[float]:
    from multicure_monai.schedules import learning_rate_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    scheduler = learning_rate_scheduler(optimizer, policy, **kwargs)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_step_policy_is_the_papers_steps() -> None:
    lrs = _lrs("step", 7, step_size=3, gamma=0.1)
    assert lrs == pytest.approx([0.01] * 3 + [0.001] * 3 + [0.0001])


@pytest.mark.parametrize("max_iterations", [4, 300])
def test_poly_policy_anneals_to_zero_at_the_end(max_iterations: int) -> None:
    lrs = _lrs("poly", max_iterations + 1, max_iterations=max_iterations)
    expected = [0.01 * (1 - t / max_iterations) ** 0.9 for t in range(max_iterations + 1)]
    assert lrs == pytest.approx(expected, abs=1e-12)
    assert lrs[-1] == 0.0 and all(a > b for a, b in zip(lrs[:-1], lrs[1:]))


@pytest.mark.parametrize("policy, kwargs", [("cosine", {}), ("poly", {}), ("poly", {"max_iterations": 0})])
def test_unknown_or_incomplete_lr_policy_is_refused(policy: str, kwargs: dict) -> None:
    with pytest.raises(ValueError, match="lr_policy"):
        _lrs(policy, 1, **kwargs)
