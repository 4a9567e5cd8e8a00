"""Confidence-masked pseudo-label loss (CE + Dice) of eq. 2.

On unlabelled data the predictive (teacher) network produces the pseudo-label ``argmax(teacher_probs)`` and the
auxiliary (student) network is trained on it with cross-entropy + Dice, "restricting the computation of the
loss function to voxels with prediction confidence exceeding 0.7" (section 2).

Why not ``monai.losses.DiceCELoss``: it has no voxel mask. The Dice part *does* reuse
:class:`monai.losses.DiceLoss`: feeding it ``m * softmax(logits)`` and ``m * onehot(pseudo)`` with a binary
mask ``m`` gives exactly the masked Dice, because ``m^2 = m`` in the intersection and only masked voxels enter
the two sums. The cross-entropy is averaged over masked voxels by hand.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.networks.utils import one_hot
from torch import Tensor, nn

__all__ = ["PseudoLabelLoss"]


class PseudoLabelLoss(nn.Module):
    """Masked CE + soft Dice of the student's logits against the teacher's hard pseudo-label.

    With teacher probabilities ``q`` (detached), pseudo-label ``y = argmax_c q_c``, mask
    ``m = [max_c q_c > confidence_threshold]`` and student probabilities ``p = softmax(logits)``::

        CE   = sum_v m_v * (-log p_{y_v, v}) / sum_v m_v
        Dice = mean_{b, c} [1 - (2 sum_v m p_c t_c + smooth_nr) / (sum_v m p_c + sum_v m t_c + smooth_dr)]
        loss = lambda_ce * CE + lambda_dice * Dice

    where ``t = onehot(y)`` and the Dice sums run over the spatial voxels of each sample (MONAI's
    ``DiceLoss(batch=False)``, mean over batch and channels; channel 0 dropped if ``include_background=False``).
    With ``ignore_empty=True`` (default) a (sample, channel) pair whose pseudo-label has no voxel inside the mask
    is left out of the Dice mean (the Dice is 0 when every pair is left out). A soft Dice against an empty
    target is ~1 whatever the prediction unless every probability of that channel is driven to exactly 0, so
    keeping those pairs (``ignore_empty=False``, MONAI's ``DiceLoss`` behaviour: a sample with no masked voxel
    then contributes Dice 0 for every channel but still counts in the mean) adds a constant ~0.5 to the loss on
    crops without confident foreground and a pull towards predicting background there. When no voxel of the
    batch passes the threshold the loss is ``logits.float().mean() * 0`` (zero, still attached to the graph).
    No gradient ever reaches ``teacher_probs``.

    ``forward(..., return_stats=True)`` also returns ``{"mask_fraction": float}``, the fraction of voxels that
    passed the confidence threshold (for logging; the loss keeps no state between calls, as MONAI's losses).

    Args:
        confidence_threshold: voxels whose teacher confidence is strictly greater are used; in ``[0, 1)``.
        lambda_ce: weight of the cross-entropy term (>= 0).
        lambda_dice: weight of the Dice term (>= 0).
        include_background: include channel 0 in the Dice term (CE always uses all classes).
        smooth_nr: Dice numerator smoothing (MONAI semantics).
        smooth_dr: Dice denominator smoothing (MONAI semantics).
        ignore_empty: leave (sample, channel) pairs with an empty masked pseudo-label out of the Dice mean.

    Example:
        >>> loss_fn = PseudoLabelLoss(confidence_threshold=0.7)
        >>> logits = torch.randn(2, 2, 8, 8, 8, requires_grad=True)
        >>> teacher = torch.softmax(torch.randn(2, 2, 8, 8, 8) * 3, dim=1)
        >>> loss = loss_fn(logits, teacher)
        >>> loss.ndim
        0
    """

    def __init__(
        self,
        confidence_threshold: float = 0.7,
        lambda_ce: float = 1.0,
        lambda_dice: float = 1.0,
        include_background: bool = True,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        ignore_empty: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 <= float(confidence_threshold) < 1.0:
            raise ValueError(f"confidence_threshold must lie in [0, 1), got {confidence_threshold}.")
        if lambda_ce < 0 or lambda_dice < 0:
            raise ValueError(f"lambda_ce and lambda_dice must be >= 0, got {lambda_ce}, {lambda_dice}.")
        self.confidence_threshold = float(confidence_threshold)
        self.lambda_ce = float(lambda_ce)
        self.lambda_dice = float(lambda_dice)
        self.include_background = include_background
        self.ignore_empty = bool(ignore_empty)
        self.dice = DiceLoss(
            include_background=include_background,
            to_onehot_y=False,
            softmax=False,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            batch=False,
            reduction="none",
        )

    def forward(
        self, logits: Tensor, teacher_probs: Tensor, return_stats: bool = False
    ) -> Tensor | tuple[Tensor, dict[str, float]]:
        """Compute the masked pseudo-label loss.

        Args:
            logits: student (auxiliary network) logits ``(B, C, *S)``, ``C >= 2``.
            teacher_probs: teacher (predictive network) softmax probabilities ``(B, C, *S)``; detached here.
            return_stats: also return ``{"mask_fraction": ...}``.

        Returns:
            Scalar loss tensor (and the stats dict with ``return_stats``).

        Raises:
            ValueError: if shapes differ or ``C < 2``.
        """
        if logits.shape != teacher_probs.shape:
            raise ValueError(
                f"logits and teacher_probs must have the same shape, got {tuple(logits.shape)} and "
                f"{tuple(teacher_probs.shape)}."
            )
        if logits.ndim < 3 or logits.shape[1] < 2:
            raise ValueError(f"Expected (B, C, *S) with C >= 2, got {tuple(logits.shape)}.")
        num_classes = logits.shape[1]
        with torch.no_grad():
            teacher_conf, pseudo = teacher_probs.detach().max(dim=1, keepdim=True)  # (B, 1, *S) each
            mask = teacher_conf > self.confidence_threshold  # (B, 1, *S) bool
            num_masked = mask.sum()
            stats = {"mask_fraction": float(num_masked) / mask.numel()}

        if stats["mask_fraction"] == 0.0:
            zero = logits.float().mean() * 0.0  # graph-connected zero (float32: no fp16 overflow to NaN)
            return (zero, stats) if return_stats else zero

        maskf = mask.to(logits.dtype)
        ce_map = F.cross_entropy(logits, pseudo.squeeze(1), reduction="none").unsqueeze(1)  # (B, 1, *S)
        ce = (ce_map * maskf).sum() / num_masked.to(logits.dtype)

        probs = torch.softmax(logits, dim=1)
        target = one_hot(pseudo, num_classes=num_classes, dtype=logits.dtype)
        masked_target = target * maskf
        dice_bc = self.dice(probs * maskf, masked_target).reshape(logits.shape[0], -1)  # (B, C or C-1)
        if self.ignore_empty:
            present = masked_target.flatten(2).sum(-1) > 0  # (B, C)
            if not self.include_background:
                present = present[:, 1:]
            dice = (dice_bc * present).sum() / present.sum().clamp_min(1)
        else:
            dice = dice_bc.mean()
        loss = self.lambda_ce * ce + self.lambda_dice * dice
        return (loss, stats) if return_stats else loss
