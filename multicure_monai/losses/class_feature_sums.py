"""What the prototype contrastive loss reads of one feature level: per-class sums of L2-normalised voxel features.

For a level's features ``f_v`` (``N`` voxels), a class slot ``k_v`` per voxel (``P`` = no class) and a few
sampled voxel indices ``idx``, :func:`class_feature_sums` returns

* ``sums``: ``(P, E)``, ``sum_{v: k_v = p} f_v / ||f_v||`` (the prototypes of eq. 4 before dividing by the count),
* ``rows``: ``(M, E)``, ``f_idx`` and ``inv_norm``: ``(M,)``, ``1 / ||f_idx||`` (the uncertain voxels of eq. 5).

For :class:`~multicure_monai.networks.projected_features.ProjectedFeatures` (``f_v = W h_v + b`` with fewer map
channels ``C`` than ``E``) the values come from the map, so the ``N x E`` projected map is never written:
``||f_v||^2 = h_v^T (W^T W) h_v + 2 (W^T b) . h_v + b . b`` and ``sum_v w_v f_v = (sum_v w_v h_v) W^T +
(sum_v w_v) b``. The per-voxel part is one autograd function (:class:`_GramNormClassSums`) whose backward is a
few matrix products over the map and one gradient tensor, where autograd's chain of broadcasts and gradient
accumulations over ``N x C`` tensors makes about a dozen passes; ``W`` and ``b`` enter through ``W^T W``,
``W^T b`` and ``b . b``, small tensors left to autograd. Results equal the direct computation to float rounding
(tested in float64).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from multicure_monai.networks.projected_features import ProjectedFeatures

__all__ = ["class_feature_sums"]


def _class_weights(cls: Tensor, num_slots: int, inv_norm: Tensor) -> Tensor:
    """``(N, P)``: ``inv_norm`` in the column of each voxel's class slot, 0 elsewhere (and for slot ``P``)."""
    slots = torch.arange(num_slots, device=cls.device)
    return (cls.unsqueeze(1) == slots).to(inv_norm.dtype) * inv_norm.unsqueeze(1)


class _GramNormClassSums(torch.autograd.Function):
    """``(sum_{k_v = p} h_v / n_v, sum_{k_v = p} 1 / n_v, h_idx, 1 / n_idx)``, ``n_v^2 = h_v G h_v + 2 a.h_v + c``."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)  # norms in float32 under CUDA autocast
    def forward(
        ctx: Any, h: Tensor, gram: Tensor, a: Tensor, c: Tensor, cls: Tensor, num_slots: int, idx: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        q = torch.addmm(2.0 * a, h, gram)  # h G + 2a, (N, C)
        inv = (q * h).sum(dim=1).add_(c).clamp_min_(1e-24).rsqrt_()  # (N,)
        w = _class_weights(cls, num_slots, inv)  # (N, P)
        ctx.save_for_backward(h, gram, a, inv, cls, idx)
        ctx.num_slots = num_slots
        return w.t() @ h, w.sum(dim=0), h[idx], inv[idx]

    @staticmethod
    @once_differentiable
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(
        ctx: Any, g_sums: Tensor, g_wsum: Tensor, g_rows: Tensor, g_inv_rows: Tensor
    ) -> tuple[Tensor | None, ...]:
        # Written with matrix products over the voxels: on CPU they run several times faster than the equivalent
        # broadcast elementwise passes over the N x C map.
        h, gram, a, inv, cls, idx = ctx.saved_tensors
        onehot_g = _class_weights(cls, ctx.num_slots, torch.ones_like(inv))  # (N, P)
        w = onehot_g * inv.unsqueeze(1)
        # dL/d(1/n_v): from the class sums (g_sums[k_v] . h_v + g_wsum[k_v]) and from the sampled rows
        g_inv = ((h @ g_sums.t()) * onehot_g).sum(dim=1) + onehot_g @ g_wsum
        g_sq = g_inv.index_add_(0, idx, g_inv_rows).mul_(inv.pow(3)).mul_(-0.5)  # dL/d(n_v^2)
        u = g_sq.unsqueeze(1) * h
        grad_h = (w @ g_sums).addmm_(u, gram, alpha=2.0).addr_(g_sq, a, alpha=2.0)  # + 2 g (h G + a)
        grad_h.index_add_(0, idx, g_rows)
        return grad_h, h.t() @ u, 2.0 * (h.t() @ g_sq), g_sq.sum(), None, None, None


def class_feature_sums(
    feat: Tensor | ProjectedFeatures, cls: Tensor, num_slots: int, idx: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-class sums of the normalised features of one level and the rows ``idx`` (see the module docstring).

    Args:
        feat: ``(B, E, *S)`` features, or :class:`ProjectedFeatures` of that shape; ``N = B * prod(S)`` voxels in
            channels-last order (a view for channels-last maps).
        cls: ``(N,)`` long class slot per voxel in ``[0, num_slots]``; ``num_slots`` marks voxels left out.
        num_slots: number of class slots ``P``.
        idx: ``(M,)`` long voxel indices whose features are returned.

    Returns:
        ``sums`` ``(P, E)``, ``counts_w`` ``(P,)`` (sum of ``1 / ||f_v||`` per slot, for the projected form's bias;
        returned for both forms), ``rows`` ``(M, E)`` and ``inv_norm`` ``(M,)``; float32 or wider.
    """
    if isinstance(feat, ProjectedFeatures) and feat.hidden.shape[1] >= feat.weight.shape[0]:
        feat = feat.materialize()  # projecting first is no more work when the head does not widen the map
    if isinstance(feat, Tensor):
        f = feat.movedim(1, -1).reshape(-1, feat.shape[1])
        f = f.to(torch.promote_types(f.dtype, torch.float32))  # half precision features are summed in float32
        inv = 1.0 / torch.linalg.vector_norm(f, dim=1).clamp_min(1e-12)  # as F.normalize
        w = _class_weights(cls, num_slots, inv)
        return w.t() @ f, w.sum(dim=0), f[idx], inv[idx]
    h = feat.hidden.movedim(1, -1).reshape(-1, feat.hidden.shape[1])
    dtype = torch.promote_types(h.dtype, torch.float32)
    h, weight = h.to(dtype), feat.weight.to(dtype)
    bias = weight.new_zeros(weight.shape[0]) if feat.bias is None else feat.bias.to(dtype)
    sums_h, wsum, rows_h, inv = _GramNormClassSums.apply(
        h, weight.t() @ weight, weight.t() @ bias, bias @ bias, cls, num_slots, idx
    )
    sums = F.linear(sums_h, weight) + wsum.unsqueeze(1) * bias
    return sums, wsum, F.linear(rows_h, weight, bias), inv
