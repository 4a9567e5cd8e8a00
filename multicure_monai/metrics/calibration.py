"""Calibration and uncertainty of a segmentation's foreground probability, per case, overall and by region.

The paper's claim is about uncertainty ("the network tends to produce lower confidence scores without the
uncertainty-aware modules", Figure 4), so evaluation measures it: how well the foreground probability is
calibrated (expected calibration error, Brier score), how uncertain the model is (mean normalised entropy, the
fraction of voxels below the confidence threshold of training) near the ground-truth surface and away from it,
and whether the uncertainty points at the errors (area under the ROC curve of the entropy as a detector of the
misclassified voxels).

MONAI provides the binning (:func:`monai.metrics.calibration_binning`, behind its ``CalibrationErrorMetric``);
the AUROC is the rank form of :func:`monai.metrics.compute_roc_auc` (same values, no per-voxel Python loop). What
MONAI lacks is the region split
(a band of ``band_width`` voxels around the ground-truth surface and the rest) and one per-case record of all
quantities, which this module adds. :class:`UncertaintyMetric` exposes one quantity as a MONAI
``CumulativeIterationMetric``, so the evaluator's ``MetricsSaver`` writes it per case like Dice.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from monai.metrics import CumulativeIterationMetric, calibration_binning
from monai.utils import MetricReduction
from torch import Tensor

from multicure_monai.uncertainty import confidence, entropy, predicted_labels

__all__ = ["QUANTITIES", "REGIONS", "boundary_band", "uncertainty_scores", "UncertaintyMetric"]

#: Per-case quantities: calibration and uncertainty (each in every region) and the error-detection AUROC.
QUANTITIES = ("ece", "brier", "entropy", "uncertain_fraction", "error_auroc")
#: Regions: every voxel, the band around the ground-truth surface, the voxels outside the band.
REGIONS = ("all", "band", "rest")


def boundary_band(label: Tensor, width: int = 2) -> Tensor:
    """Voxels within ``width`` voxels (chessboard distance) of the foreground surface, on both sides.

    Args:
        label: ``(B, 1, *S)`` label map (foreground = any class > 0) or boolean mask.
        width: half-width of the band in voxels (>= 1).

    Returns:
        ``(B, 1, *S)`` bool: dilation minus erosion of the foreground by a ``(2 width + 1)`` cube. Empty for
        a case without foreground (and for one that is all foreground).
    """
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}.")
    fg = (label > 0).float()
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[fg.ndim - 2]
    k = 2 * width + 1
    dilated = pool(fg, k, stride=1, padding=width) > 0
    # erosion = not dilation of the background; outside the image counts as background-free (no border band)
    eroded = ~(pool(1.0 - fg, k, stride=1, padding=width) > 0)
    return dilated & ~eroded


def _ece(prob: Tensor, target: Tensor, num_bins: int) -> float:
    """Expected calibration error of probabilities ``prob`` against 0/1 ``target`` (1D), MONAI's binning."""
    if prob.numel() == 0:
        return math.nan
    mean_p, mean_gt, counts = calibration_binning(prob.view(1, 1, -1), target.view(1, 1, -1), num_bins=num_bins)
    gap = (mean_p - mean_gt).abs().nan_to_num(0.0)
    return float((gap * counts).sum() / counts.sum())


def _auroc(score: Tensor, positive: Tensor) -> float:
    """ROC AUC of ``score`` for ``positive`` (1D); NaN when only one class is present.

    The Mann-Whitney form with tie-averaged ranks (``scipy.stats.rankdata``) equals MONAI's ``compute_roc_auc``
    (tested) without its per-sample Python loop, which takes seconds on a million voxels.
    """
    if positive.all() or not positive.any():
        return math.nan
    ranks = rankdata(score.double().cpu().numpy())
    pos = positive.cpu().numpy().astype(bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def uncertainty_scores(
    probs: Tensor, label: Tensor, threshold: float = 0.7, band_width: int = 2, num_bins: int = 15
) -> list[dict[str, float]]:
    """Calibration and uncertainty of each case of a batch.

    Args:
        probs: softmax probabilities ``(B, C, *S)`` (``C >= 2``; channels ``1..C-1`` are foreground).
        label: ``(B, 1, *S)`` integer label map (or ``(B, C, *S)`` one-hot).
        threshold: confidence below which a voxel is uncertain (training's ``uncertainty_threshold``).
        band_width: half-width in voxels of the boundary band (:func:`boundary_band`).
        num_bins: equal-width bins of the calibration error.

    Returns:
        One dict per case with ``ece``, ``brier``, ``entropy`` (normalised to ``[0, 1]``) and
        ``uncertain_fraction`` for each region (keys ``<quantity>`` for all voxels, ``<quantity>_band``,
        ``<quantity>_rest``; NaN for an empty region), and ``error_auroc`` (NaN when the case has no error
        or only errors). Calibration is of the foreground probability ``1 - p_background`` against the
        foreground mask.
    """
    if probs.ndim < 3 or probs.shape[1] < 2:
        raise ValueError(f"probs must be (B, C, *S) with C >= 2, got {tuple(probs.shape)}.")
    if label.shape[1] != 1:
        label = predicted_labels(label)
    if label.shape[0] != probs.shape[0] or label.shape[2:] != probs.shape[2:]:
        raise ValueError(f"label {tuple(label.shape)} does not match probs {tuple(probs.shape)}.")
    probs = probs.detach().float()
    label = label.detach().long()
    fg_prob = 1.0 - probs[:, :1]
    fg = (label > 0).float()
    ent = entropy(probs, normalize=True)
    uncertain = (confidence(probs) < threshold).float()
    errors = predicted_labels(probs) != label
    band = boundary_band(label, band_width)
    results = []
    for b in range(probs.shape[0]):
        case: dict[str, float] = {}
        for region in REGIONS:
            mask = {"all": torch.ones_like(band[b]), "band": band[b], "rest": ~band[b]}[region]
            suffix = "" if region == "all" else f"_{region}"
            p, y = fg_prob[b][mask], fg[b][mask]
            empty = p.numel() == 0
            case[f"ece{suffix}"] = _ece(p, y, num_bins)
            case[f"brier{suffix}"] = math.nan if empty else float(((p - y) ** 2).mean())
            case[f"entropy{suffix}"] = math.nan if empty else float(ent[b][mask].mean())
            case[f"uncertain_fraction{suffix}"] = math.nan if empty else float(uncertain[b][mask].mean())
        case["error_auroc"] = _auroc(ent[b].flatten(), errors[b].flatten())
        results.append(case)
    return results


class UncertaintyMetric(CumulativeIterationMetric):
    """One quantity of :func:`uncertainty_scores` as a MONAI cumulative metric (one value per case).

    ``y_pred`` must hold softmax **probabilities** ``(B, C, *S)`` (not an argmax), ``y`` the label map
    ``(B, 1, *S)`` or its one-hot form. ``aggregate()`` reduces the per-case values with ``reduction``
    (NaN cases, e.g. an AUROC of a case without errors, are left out of the mean).

    Args:
        quantity: one of :data:`QUANTITIES`.
        region: one of :data:`REGIONS` (``error_auroc`` is always over all voxels).
        threshold, band_width, num_bins: as in :func:`uncertainty_scores`.
        reduction: MONAI ``MetricReduction`` of ``aggregate``.
    """

    def __init__(
        self,
        quantity: str = "ece",
        region: str = "all",
        threshold: float = 0.7,
        band_width: int = 2,
        num_bins: int = 15,
        reduction: MetricReduction | str = MetricReduction.MEAN,
    ) -> None:
        super().__init__()
        if quantity not in QUANTITIES:
            raise ValueError(f"quantity must be one of {QUANTITIES}, got {quantity!r}.")
        if region not in REGIONS:
            raise ValueError(f"region must be one of {REGIONS}, got {region!r}.")
        self.key = quantity if region == "all" or quantity == "error_auroc" else f"{quantity}_{region}"
        self.threshold, self.band_width, self.num_bins = float(threshold), int(band_width), int(num_bins)
        self.reduction = reduction

    def _compute_tensor(self, y_pred: Tensor, y: Tensor | None = None) -> Tensor:  # type: ignore[override]
        if y is None:
            raise ValueError("UncertaintyMetric needs the ground truth y.")
        cases = _cached_scores(y_pred, y, self.threshold, self.band_width, self.num_bins)
        return torch.tensor([[c[self.key]] for c in cases], dtype=torch.float32, device=y_pred.device)


    def aggregate(self, reduction: MetricReduction | str | None = None) -> Tensor:
        data = self.get_buffer()
        if not isinstance(data, Tensor):
            raise ValueError("the data to aggregate must be a PyTorch Tensor.")
        values = data.flatten()
        values = values[~torch.isnan(values)]
        mode = MetricReduction(reduction or self.reduction)
        if values.numel() == 0:
            return torch.tensor(math.nan)
        if mode == MetricReduction.NONE:
            return data
        return values.sum() if mode == MetricReduction.SUM else values.mean()


_LAST: list = []  # [(key, probs, label, scores)]: the last case's scores, shared by the metrics of one evaluator


def _cached_scores(probs: Tensor, label: Tensor, threshold: float, band_width: int, num_bins: int) -> list[dict]:
    """:func:`uncertainty_scores`, computed once for the metrics that score the same case one after another.

    The cache holds the tensors themselves, so their memory cannot be reused while the key (data pointer, shape,
    strides, in-place version, settings) is kept: a hit is the same data.
    """

    def signature(t: Tensor) -> tuple:
        return (t.data_ptr(), tuple(t.shape), t.stride(), t._version, t.dtype, t.device)

    key = (signature(probs), signature(label), threshold, band_width, num_bins)
    if _LAST and _LAST[0][0] == key:
        return _LAST[0][3]
    scores = uncertainty_scores(probs, label, threshold, band_width, num_bins)
    _LAST[:] = [(key, probs, label, scores)]
    return scores
