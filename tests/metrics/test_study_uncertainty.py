"""The per-study uncertainty score of active learning on constructed cases whose values are known."""

from __future__ import annotations

import math

import pytest
import torch

from multicure_monai.metrics import study_uncertainty


def _probs(fg: torch.Tensor) -> torch.Tensor:
    return torch.cat([1.0 - fg, fg], dim=1)


def _binary_entropy(p: float) -> float:
    return -(p * math.log(p) + (1 - p) * math.log(1 - p)) / math.log(2)


def _study(size: int, structure: int, p_in: float, p_edge: float) -> torch.Tensor:
    """Background 0.01 foreground probability; a ``structure``-voxel block at ``p_in`` with a ring at ``p_edge``."""
    fg = torch.full((1, 1, size, size, size), 0.01)
    fg[..., :structure, :structure, :structure] = p_edge
    fg[..., 1 : structure - 1, 1 : structure - 1, 1 : structure - 1] = p_in
    return fg


@pytest.mark.parametrize("measure", ["entropy", "uncertain_fraction"])
def test_known_values_in_the_structure_region(measure: str) -> None:
    """An 8^3 block: 6^3 confident inside (p = 0.95), its shell uncertain (p = 0.5); the rest background."""
    fg = _study(16, 8, 0.95, 0.5)
    shell, inner = 8**3 - 6**3, 6**3
    if measure == "entropy":
        expected = (shell * _binary_entropy(0.5) + inner * _binary_entropy(0.95)) / 8**3
    else:
        expected = shell / 8**3
    (score,) = study_uncertainty(_probs(fg), threshold=0.7, measure=measure, region="structure").tolist()
    assert score == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("measure", ["entropy", "uncertain_fraction"])
def test_structure_region_ignores_the_field_of_view(measure: str) -> None:
    """The same structure in a larger volume scores the same in the structure region, lower over all voxels."""
    small, large = _probs(_study(12, 8, 0.95, 0.5)), _probs(_study(24, 8, 0.95, 0.5))
    s_small, s_large = (float(study_uncertainty(p, measure=measure)[0]) for p in (small, large))
    assert s_small == pytest.approx(s_large, rel=1e-6)
    a_small, a_large = (float(study_uncertainty(p, measure=measure, region="all")[0]) for p in (small, large))
    assert a_large < a_small


def test_ranks_the_less_sure_study_first_and_scores_a_confident_empty_one_zero() -> None:
    batch = torch.cat([_probs(_study(16, 8, 0.95, 0.9)), _probs(_study(16, 8, 0.8, 0.55)),
                       _probs(torch.full((1, 1, 16, 16, 16), 0.01))])  # fmt: skip
    for measure in ("entropy", "uncertain_fraction"):
        scores = study_uncertainty(batch, measure=measure)
        assert scores.shape == (3,) and scores.argmax() == 1
        assert scores[2] == 0.0


@pytest.mark.parametrize(
    "kwargs, probs",
    [
        ({"measure": "variance"}, torch.full((1, 2, 4, 4, 4), 0.5)),
        ({"region": "band"}, torch.full((1, 2, 4, 4, 4), 0.5)),
        ({"threshold": 1.0}, torch.full((1, 2, 4, 4, 4), 0.5)),
        ({}, torch.full((1, 1, 4, 4, 4), 1.0)),
        ({}, torch.full((1, 2, 4, 4, 4), float("nan"))),
    ],
)
def test_bad_input_raises(kwargs: dict, probs: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        study_uncertainty(probs, **kwargs)
