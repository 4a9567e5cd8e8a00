"""How unsure a model is about a whole study, without ground truth: the score an active-learning strategy ranks by.

Active learning offers the annotator the unlabelled study the deployed model is least sure about. The per-voxel
measures are those evaluation reports (:mod:`multicure_monai.metrics.calibration`): the normalised entropy and
the uncertain fraction (confidence below training's threshold). Averaged over every voxel they mostly measure the
field of view (a study with more background looks more certain), so by default they are averaged over the
*structure region*: the voxels the model predicts as foreground or is uncertain about. A study where the model
sees no structure at all, confidently, scores 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from multicure_monai.uncertainty import confidence, entropy, predicted_labels

__all__ = ["STUDY_MEASURES", "STUDY_REGIONS", "study_uncertainty"]

#: Per-voxel measures: normalised entropy in ``[0, 1]``; 1 where the confidence is below the threshold.
STUDY_MEASURES = ("entropy", "uncertain_fraction")
#: Averaging regions: every voxel; predicted foreground or uncertain voxels.
STUDY_REGIONS = ("all", "structure")


def study_uncertainty(
    probs: Tensor, threshold: float = 0.7, measure: str = "entropy", region: str = "structure"
) -> Tensor:
    """Mean uncertainty of each study of a batch.

    Args:
        probs: softmax probabilities ``(B, C, *S)``, ``C >= 2`` (channel 0 is background).
        threshold: confidence below which a voxel is uncertain (training's ``uncertainty_threshold``).
        measure: one of :data:`STUDY_MEASURES`.
        region: one of :data:`STUDY_REGIONS`.

    Returns:
        ``(B,)`` float32 scores in ``[0, 1]``, higher = less sure; 0 for an empty region.

    Raises:
        ValueError: for an unknown ``measure`` or ``region``, a threshold outside ``(0, 1)``, malformed or
            non-finite probabilities.
    """
    if measure not in STUDY_MEASURES:
        raise ValueError(f"measure must be one of {STUDY_MEASURES}, got {measure!r}.")
    if region not in STUDY_REGIONS:
        raise ValueError(f"region must be one of {STUDY_REGIONS}, got {region!r}.")
    if not 0.0 < float(threshold) < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}.")
    probs = probs.detach().float()
    if probs.ndim < 3:
        raise ValueError(f"probs must be (B, C, *S), got shape {tuple(probs.shape)}.")
    if not torch.isfinite(probs).all():
        raise ValueError("probs has NaN or infinite values.")
    uncertain = confidence(probs) < threshold  # (B, 1, *S)
    values = entropy(probs, normalize=True) if measure == "entropy" else uncertain.float()
    if region == "all":
        mask = torch.ones_like(uncertain)
    else:
        mask = (predicted_labels(probs) > 0) | uncertain
    mask = mask.flatten(1).float()
    total = (values.flatten(1) * mask).sum(dim=1)
    return torch.where(mask.sum(dim=1) > 0, total / mask.sum(dim=1).clamp_min(1.0), torch.zeros_like(total))
