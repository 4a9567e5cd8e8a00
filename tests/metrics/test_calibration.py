"""Calibration and uncertainty metrics on constructed cases whose values are known."""

from __future__ import annotations

import math

import pytest
import torch

from multicure_monai.metrics.calibration import UncertaintyMetric, boundary_band, uncertainty_scores


def _probs(fg: torch.Tensor) -> torch.Tensor:
    """Two-class probabilities from a foreground probability map ``(B, 1, *S)``."""
    return torch.cat([1.0 - fg, fg], dim=1)


def test_perfectly_calibrated_toy_has_zero_ece() -> None:
    """Voxels at p = 0.1, 0.3, ..., 0.9 (10 each); exactly 10 p of them foreground: ECE 0."""
    p, y = [], []
    for k, value in enumerate((0.1, 0.3, 0.5, 0.7, 0.9)):
        p += [value] * 10
        y += [1] * (k * 2 + 1) + [0] * (10 - (k * 2 + 1))
    fg = torch.tensor(p).view(1, 1, 50)
    label = torch.tensor(y).view(1, 1, 50)
    (case,) = uncertainty_scores(_probs(fg), label, num_bins=10)
    assert case["ece"] == pytest.approx(0.0, abs=1e-6)
    expected_brier = sum(v * (1 - v) for v in (0.1, 0.3, 0.5, 0.7, 0.9)) / 5  # calibrated: Brier = mean p(1-p)
    assert case["brier"] == pytest.approx(expected_brier, abs=1e-6)


@pytest.mark.parametrize("confidence", [0.6, 0.9, 0.99])
def test_constant_confident_and_wrong(confidence: float) -> None:
    """Foreground probability c everywhere, all background: ECE = c, Brier = c^2, every voxel an error."""
    fg = torch.full((1, 1, 6, 6, 6), confidence)
    label = torch.zeros(1, 1, 6, 6, 6, dtype=torch.long)
    (case,) = uncertainty_scores(_probs(fg), label, threshold=0.7)
    assert case["ece"] == pytest.approx(confidence, abs=1e-5)  # float32 probabilities
    assert case["brier"] == pytest.approx(confidence**2, abs=1e-5)
    assert case["uncertain_fraction"] == (1.0 if confidence < 0.7 else 0.0)
    assert math.isnan(case["error_auroc"])  # only errors: undefined
    assert math.isnan(case["ece_band"])  # no foreground, no surface, empty band
    expected_entropy = -(confidence * math.log(confidence) + (1 - confidence) * math.log(1 - confidence)) / math.log(2)
    assert case["entropy"] == pytest.approx(expected_entropy, rel=1e-5)


def test_error_auroc_is_one_when_entropy_marks_the_errors_and_zero_when_reversed() -> None:
    label = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    label[..., :2] = 1
    fg = torch.where(label > 0, 0.95, 0.05).float()
    wrong = torch.zeros_like(fg, dtype=torch.bool)
    wrong[0, 0, 0, :, 0] = True  # 4 foreground voxels predicted background, with entropy near 1
    good = torch.where(wrong, 0.45, fg)
    (case,) = uncertainty_scores(_probs(good), label)
    assert case["error_auroc"] == pytest.approx(1.0)
    bad = torch.where(wrong, 0.0, torch.where(label > 0, 0.6, 0.4))  # errors certain, right voxels unsure
    (case,) = uncertainty_scores(_probs(bad), label)
    assert case["error_auroc"] == pytest.approx(0.0)


@pytest.mark.parametrize("width", [1, 2])
def test_boundary_band_of_a_cube(width: int) -> None:
    """A 6^3 cube in a 16^3 volume: the band is the shell of voxels within `width` of its surface."""
    label = torch.zeros(1, 1, 16, 16, 16, dtype=torch.long)
    label[..., 5:11, 5:11, 5:11] = 1
    band = boundary_band(label, width)
    outer, inner = 6 + 2 * width, 6 - 2 * width
    assert int(band.sum()) == outer**3 - inner**3
    assert not band[0, 0, 8, 8, 8]  # the cube's centre
    assert band[0, 0, 5, 8, 8] and band[0, 0, 4, 8, 8] and not band[0, 0, 5 - width - 1, 8, 8]


def test_regions_split_the_volume() -> None:
    """A model sure everywhere but at the boundary: uncertainty sits in the band, none in the rest."""
    label = torch.zeros(1, 1, 16, 16, 16, dtype=torch.long)
    label[..., 4:12, 4:12, 4:12] = 1
    band = boundary_band(label, 2)
    fg = torch.where(label > 0, 0.99, 0.01).float()
    fg = torch.where(band, 0.5, fg)
    (case,) = uncertainty_scores(_probs(fg), label, band_width=2)
    assert case["uncertain_fraction_band"] == 1.0 and case["uncertain_fraction_rest"] == 0.0
    assert case["entropy_band"] == pytest.approx(1.0) and case["entropy_rest"] < 0.1
    assert case["uncertain_fraction"] == pytest.approx(float(band.float().mean()))


def test_metric_gives_one_value_per_case_and_skips_undefined_ones() -> None:
    metric = UncertaintyMetric("error_auroc")
    label = torch.zeros(2, 1, 4, 4, 4, dtype=torch.long)
    label[..., :2] = 1
    fg = torch.where(label > 0, 0.9, 0.1).float()
    fg[0, 0, 0, 0, 0] = 0.45  # case 0: one error, the most uncertain voxel
    fg[1] = torch.where(label[1] > 0, 0.9, 0.1)  # case 1: no error, AUROC undefined
    values = metric(_probs(fg), label)
    assert values.shape == (2, 1) and values[0, 0] == pytest.approx(1.0) and math.isnan(float(values[1, 0]))
    assert float(metric.aggregate()) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        UncertaintyMetric("sharpness")


def test_rank_auroc_equals_monai() -> None:
    from monai.metrics import compute_roc_auc

    from multicure_monai.metrics.calibration import _auroc

    torch.manual_seed(0)
    score = torch.rand(500).round(decimals=1)  # many ties
    positive = torch.rand(500) > 0.7
    assert _auroc(score, positive) == pytest.approx(float(compute_roc_auc(score.double(), positive.double())))


def test_metrics_of_one_case_share_one_computation_and_stay_correct(monkeypatch) -> None:
    import multicure_monai.metrics.calibration as calibration

    calls = []
    real = calibration.uncertainty_scores
    monkeypatch.setattr(calibration, "uncertainty_scores", lambda *a: calls.append(1) or real(*a))
    label = torch.zeros(1, 1, 6, 6, 6, dtype=torch.long)
    label[..., :3] = 1
    probs = _probs(torch.where(label > 0, 0.8, 0.3).float())
    values = [UncertaintyMetric(q)(probs, label) for q in ("ece", "brier", "entropy")]
    assert len(calls) == 1
    probs.mul_(1.0)  # in place: a new version of the data is scored again
    UncertaintyMetric("ece")(probs, label)
    assert len(calls) == 2
    expected = uncertainty_scores(probs, label)[0]
    assert [float(v) for v in values] == pytest.approx([expected["ece"], expected["brier"], expected["entropy"]])
