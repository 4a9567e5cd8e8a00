"""XOR-masked L1 regularisation between two networks' predictions (``L_reg`` of eq. 2).

Following MCF (Wang et al., CVPR 2023), the regulariser acts only where the two networks *disagree*: the XOR
region. For multi-class outputs the disagreement mask is ``argmax(a) != argmax(b)`` per voxel; for two classes
this is exactly the XOR of the two foreground masks. Inside it, the L1 distance between the probability maps is
penalised. MONAI has no masked-disagreement loss, so it is written here.

Two settings decide how strong it is (each a bundle switch; see ``docs/results.md`` for the evidence):

* ``normalization``: the paper's mean over the XOR voxels (``"xor"``) divides by the number of disagreeing
  voxels, so the per-voxel gradient grows as ``1 / (XOR fraction)`` as the nets come to agree and outgrows one
  net's supervised gradient; ``"voxels"`` divides by the number of (confidence-masked) voxels instead, which
  gives it the per-voxel scale of a cross-entropy.
* ``confidence_threshold``: the paper restricts ``L_u`` (which holds ``L_reg``) to voxels whose teacher
  confidence exceeds 0.7; with a threshold only those XOR voxels count (``None``: all of them).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from multicure_monai.uncertainty import predicted_labels

__all__ = ["XORRegularizationLoss"]

_REDUCTIONS = ("mean", "sum", "none")
_NORMALIZATIONS = ("xor", "voxels")


class XORRegularizationLoss(nn.Module):
    """L1 distance between two probability maps on the voxels where their argmax labels disagree.

    With ``a, b`` of shape ``(B, C, *S)`` and ``x_v = [argmax_c a_{c,v} != argmax_c b_{c,v}]``::

        d_v = sum_c |a_{c,v} - b_{c,v}|              # per-voxel L1 over channels
        m_v = [max_c b_{c,v} > confidence_threshold]  (1 everywhere when the threshold is None)
        "mean": sum_v m_v x_v d_v / max(N, 1)      # N = sum_v m_v x_v ("xor") or sum_v m_v ("voxels")
        "sum":  sum_v m_v x_v d_v
        "none": m * x * d, shaped (B, 1, *S)

    For two classes ``d_v = 2 |a_{1,v} - b_{1,v}|``. When the networks agree everywhere the result is an exact
    zero that is still attached to the graph. Gradients flow to both inputs; detach one in the caller to use it
    as a fixed target. Ties in ``argmax`` resolve to the lowest class index (``torch.argmax``). ``b`` is the
    teacher whose confidence masks the voxels.

    Args:
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
        normalization: denominator of ``"mean"``: ``"voxels"`` (all masked voxels; the bundle's) or ``"xor"``
            (the paper: the disagreeing voxels).
        confidence_threshold: keep only voxels where ``max_c b_c`` exceeds it (0.7, the bundle's); ``None`` keeps
            all (the paper).

    Example:
        >>> import torch
        >>> a = torch.tensor([[[0.9, 0.4]], [[0.1, 0.6]]]).permute(1, 0, 2)  # (B=1, C=2, 2 voxels)
        >>> b = torch.tensor([[[0.8, 0.7]], [[0.2, 0.3]]]).permute(1, 0, 2)
        >>> paper = XORRegularizationLoss(normalization="xor", confidence_threshold=None)
        >>> round(float(paper(a, b)), 6)  # only voxel 1 disagrees: |0.4-0.7|+|0.6-0.3|
        0.6
    """

    def __init__(
        self, reduction: str = "mean", normalization: str = "voxels", confidence_threshold: float | None = 0.7
    ) -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"Unknown reduction {reduction!r}; choose one of {list(_REDUCTIONS)}.")
        if normalization not in _NORMALIZATIONS:
            raise ValueError(f"Unknown normalization {normalization!r}; choose one of {list(_NORMALIZATIONS)}.")
        if confidence_threshold is not None and not 0.0 <= float(confidence_threshold) < 1.0:
            raise ValueError(f"confidence_threshold must lie in [0, 1) or be None, got {confidence_threshold}.")
        self.reduction = reduction
        self.normalization = normalization
        self.confidence_threshold = None if confidence_threshold is None else float(confidence_threshold)

    def forward(self, probs_a: Tensor, probs_b: Tensor) -> Tensor:
        """Compute the XOR-masked L1 loss.

        Args:
            probs_a: probabilities ``(B, C, *S)`` of one network.
            probs_b: probabilities ``(B, C, *S)`` of the other network.

        Returns:
            Scalar for ``"mean"`` / ``"sum"``, ``(B, 1, *S)`` for ``"none"``.

        Raises:
            ValueError: if shapes differ or there is no channel dimension.
        """
        if probs_a.shape != probs_b.shape:
            raise ValueError(
                f"probs_a and probs_b must have the same shape, got {tuple(probs_a.shape)} and "
                f"{tuple(probs_b.shape)}."
            )
        if probs_a.ndim < 2:
            raise ValueError(f"Expected (B, C, *S), got {tuple(probs_a.shape)}.")
        b = probs_b.detach()
        disagree = predicted_labels(probs_a.detach()) != predicted_labels(b)
        confident = None
        if self.confidence_threshold is not None:
            confident = b.amax(dim=1, keepdim=True) > self.confidence_threshold
            disagree = disagree & confident
        l1 = (probs_a - probs_b).abs().sum(dim=1, keepdim=True)  # (B, 1, *S)
        masked = l1 * disagree.to(l1.dtype)
        if self.reduction == "none":
            return masked
        total = masked.sum()
        if self.reduction == "sum":
            return total
        if self.normalization == "xor":
            count = disagree.sum()
        else:
            count = confident.sum() if confident is not None else torch.tensor(disagree.numel(), device=total.device)
        return total / count.clamp_min(1).to(total.dtype)
