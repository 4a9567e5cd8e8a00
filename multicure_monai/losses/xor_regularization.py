"""XOR-masked L1 regularisation between two networks' predictions (``L_reg`` of eq. 2).

Following MCF (Wang et al., CVPR 2023), the regulariser acts only where the two networks *disagree*: the XOR
region. For multi-class outputs the disagreement mask is ``argmax(a) != argmax(b)`` per voxel; for two classes
this is exactly the XOR of the two foreground masks. Inside it, the L1 distance between the probability maps is
penalised. MONAI has no masked-disagreement loss, so it is written here.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["XORRegularizationLoss"]

_REDUCTIONS = ("mean", "sum", "none")


class XORRegularizationLoss(nn.Module):
    """L1 distance between two probability maps on the voxels where their argmax labels disagree.

    With ``a, b`` of shape ``(B, C, *S)`` and ``x_v = [argmax_c a_{c,v} != argmax_c b_{c,v}]``::

        d_v = sum_c |a_{c,v} - b_{c,v}|              # per-voxel L1 over channels
        "mean": sum_v x_v d_v / max(sum_v x_v, 1)    # average over the disagreeing voxels of the whole batch
        "sum":  sum_v x_v d_v
        "none": x * d, shaped (B, 1, *S)

    For two classes ``d_v = 2 |a_{1,v} - b_{1,v}|``. When the networks agree everywhere the result is an exact
    zero that is still attached to the graph. Gradients flow to both inputs; detach one in the caller to use it
    as a fixed target. Ties in ``argmax`` resolve to the lowest class index (``torch.argmax``).

    Args:
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.

    Example:
        >>> import torch
        >>> a = torch.tensor([[[0.9, 0.4]], [[0.1, 0.6]]]).permute(1, 0, 2)  # (B=1, C=2, 2 voxels)
        >>> b = torch.tensor([[[0.8, 0.7]], [[0.2, 0.3]]]).permute(1, 0, 2)
        >>> round(float(XORRegularizationLoss()(a, b)), 6)  # only voxel 1 disagrees: |0.4-0.7|+|0.6-0.3|
        0.6
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"Unknown reduction {reduction!r}; choose one of {list(_REDUCTIONS)}.")
        self.reduction = reduction

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
        disagree = (probs_a.detach().argmax(dim=1, keepdim=True) != probs_b.detach().argmax(dim=1, keepdim=True))
        l1 = (probs_a - probs_b).abs().sum(dim=1, keepdim=True)  # (B, 1, *S)
        masked = l1 * disagree.to(l1.dtype)
        if self.reduction == "none":
            return masked
        total = masked.sum()
        if self.reduction == "sum":
            return total
        return total / disagree.sum().clamp_min(1).to(total.dtype)
