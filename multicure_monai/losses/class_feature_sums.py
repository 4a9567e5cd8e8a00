"""What the prototype contrastive loss reads of one feature level: per-class sums of L2-normalised voxel features.

For a level's features ``f_v`` (``N`` voxels), a class slot ``k_v`` per voxel (``P`` = no class) and a few
sampled voxel indices ``idx``, :func:`class_feature_sums` returns

* ``sums``: ``(P, E)``, ``sum_{v: k_v = p} f_v / ||f_v||`` (the prototypes of eq. 4 before dividing by the count),
* ``rows``: ``(M, E)``, ``f_idx`` and ``inv_norm``: ``(M,)``, ``1 / ||f_idx||`` (the uncertain voxels of eq. 5).

For :class:`~multicure_monai.networks.projected_features.ProjectedFeatures` (``f_v = W h_v + b`` with fewer map
channels ``C`` than ``E``) the values come from the map, so the ``N x E`` projected map is never written:
``||f_v||^2 = h_v^T (W^T W) h_v + 2 (W^T b) . h_v + b . b`` and ``sum_v w_v f_v = (sum_v w_v h_v) W^T +
(sum_v w_v) b``. The per-voxel part is one autograd function (:class:`_GramNormClassSums`) that walks the map in
slabs of about :data:`CHUNK_ROWS` voxels, forward and backward: every per-voxel intermediate stays in cache and
the map is read in place (a cropped or channels-last view is never copied whole), where the same algebra over
whole ``N x C`` tensors makes about a dozen passes through memory. ``W`` and ``b`` enter through ``W^T W``,
``W^T b`` and ``b . b``, small tensors left to autograd. Results equal the direct computation to float rounding
(tested in float64).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from multicure_monai.networks.projected_features import ProjectedFeatures

__all__ = ["CHUNK_ROWS", "class_feature_sums"]

#: Voxels per slab of :class:`_GramNormClassSums` (a slab of 16 channels in float32 is 2 MiB).
CHUNK_ROWS = 32768


def _class_weights(cls: Tensor, num_slots: int, inv_norm: Tensor) -> Tensor:
    """``(N, P)``: ``inv_norm`` in the column of each voxel's class slot, 0 elsewhere (and for slot ``P``)."""
    slots = torch.arange(num_slots, device=cls.device)
    return (cls.unsqueeze(1) == slots).to(inv_norm.dtype) * inv_norm.unsqueeze(1)


def _slabs(h: Tensor, size: tuple[int, ...], rows: int, dtype: torch.dtype) -> Iterator[tuple[int, int, tuple, Tensor]]:
    """``(start, stop, where, h_slab)``: voxels ``[start, stop)`` of ``h[:, :, :size[0], :size[1], ...]`` (the map's
    first ``size`` voxels per axis) in channels-last voxel order as ``(stop - start, C)`` rows of ``dtype``, cut along
    the first spatial axis; ``where`` indexes the slab in a ``(B, *S, C)`` tensor. Copies are slab-sized."""
    inner = math.prod(size[1:])
    step = max(1, rows // inner)
    rest = tuple(slice(0, s) for s in size[1:])
    for b in range(h.shape[0]):
        for x0 in range(0, size[0], step):
            x1 = min(x0 + step, size[0])
            slab = h[(b, slice(None), slice(x0, x1)) + rest].movedim(0, -1).reshape(-1, h.shape[1]).to(dtype)
            start = (b * size[0] + x0) * inner
            yield start, start + slab.shape[0], (b, slice(x0, x1)) + rest, slab


class _GramNormClassSums(torch.autograd.Function):
    """``(sum_{k_v = p} h_v / n_v, sum_{k_v = p} 1 / n_v, h_idx, 1 / n_idx)``, ``n_v^2 = h_v G h_v + 2 a.h_v + c``,
    over the first ``size`` voxels of the ``(B, C, *S)`` map ``h``; float32 or wider whatever the map's dtype and
    any autocast. The gradient of ``h`` has ``h``'s full shape (zero outside ``size``)."""

    @staticmethod
    def forward(
        ctx: Any,
        h: Tensor,
        gram: Tensor,
        a: Tensor,
        c: Tensor,
        cls: Tensor,
        num_slots: int,
        idx: Tensor,
        size: tuple[int, ...],
        rows: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        dtype = gram.dtype
        inv = torch.empty(cls.shape[0], dtype=dtype, device=h.device)
        sums = gram.new_zeros(num_slots, h.shape[1])
        with torch.autocast(h.device.type, enabled=False):
            for start, stop, _, hs in _slabs(h, size, rows, dtype):
                sq = torch.linalg.vecdot(hs @ gram, hs).add_(hs @ a, alpha=2.0).add_(c)
                inv_s = sq.clamp_min_(1e-24).rsqrt_()
                inv[start:stop] = inv_s
                sums.addmm_(_class_weights(cls[start:stop], num_slots, inv_s).t(), hs)
            wsum = torch.bincount(cls, weights=inv, minlength=num_slots + 1)[:num_slots].to(dtype)
            coords = torch.unravel_index(idx, (h.shape[0], *size))
            rows_h = h.movedim(1, -1)[coords].to(dtype)
        ctx.save_for_backward(h, gram, a, inv, cls, idx)
        ctx.num_slots, ctx.size, ctx.rows = num_slots, size, rows
        return sums, wsum, rows_h, inv[idx]

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, g_sums: Tensor, g_wsum: Tensor, g_rows: Tensor, g_inv_rows: Tensor
    ) -> tuple[Tensor | None, ...]:
        h, gram, a, inv, cls, idx = ctx.saved_tensors
        dtype, size, num_slots = gram.dtype, ctx.size, ctx.num_slots
        g_sums, g_wsum = g_sums.to(dtype), g_wsum.to(dtype)
        g_inv_idx = torch.zeros_like(inv).index_add_(0, idx, g_inv_rows.to(dtype))  # the sampled rows' dL/d(1/n_v)
        shape = (h.shape[0], *h.shape[2:], h.shape[1])  # (B, *S, C); zero outside the kept voxels of a padded map
        grad = h.new_zeros(shape) if tuple(h.shape[2:]) != tuple(size) else h.new_empty(shape)
        g_gram, g_a, g_c = torch.zeros_like(gram), torch.zeros_like(a), inv.new_zeros(())
        with torch.autocast(h.device.type, enabled=False):
            for start, stop, where, hs in _slabs(h, size, ctx.rows, dtype):
                onehot = _class_weights(cls[start:stop], num_slots, torch.ones_like(inv[start:stop]))  # (n, P)
                inv_s = inv[start:stop]
                # dL/d(1/n_v) = g_sums[k_v] . h_v + g_wsum[k_v] (+ the rows'), then dL/d(n_v^2)
                g_sq = ((hs @ g_sums.t()) * onehot).sum(dim=1).add_(onehot @ g_wsum).add_(g_inv_idx[start:stop])
                g_sq.mul_(inv_s.pow(3)).mul_(-0.5)
                g_gram.addmm_(hs.t(), hs * g_sq.unsqueeze(1))
                g_a.addmv_(hs.t(), g_sq, alpha=2.0)
                g_c += g_sq.sum()
                # dL/dh_v = g_sums[k_v] / n_v + 2 dL/d(n_v^2) (G h_v + a)
                gh = (hs @ gram).add_(a).mul_(g_sq.unsqueeze(1) * 2.0)
                gh.addmm_(onehot.mul_(inv_s.unsqueeze(1)), g_sums)
                grad[where] = gh.view(-1, *size[1:], h.shape[1])
            grad.index_put_(torch.unravel_index(idx, (h.shape[0], *size)), g_rows.to(h.dtype), accumulate=True)
        return grad.movedim(-1, 1), g_gram, g_a, g_c, None, None, None, None, None


def class_feature_sums(
    feat: Tensor | ProjectedFeatures, cls: Tensor, num_slots: int, idx: Tensor, chunk_rows: int = CHUNK_ROWS
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-class sums of the normalised features of one level and the rows ``idx`` (see the module docstring).

    Args:
        feat: ``(B, E, *S)`` features, or :class:`ProjectedFeatures` of that shape; ``N = B * prod(S)`` voxels in
            channels-last order (``(B, *S)`` row-major, as ``labels.flatten()`` of a ``(B, 1, *S)`` label).
        cls: ``(N,)`` long class slot per voxel in ``[0, num_slots]``; ``num_slots`` marks voxels left out.
        num_slots: number of class slots ``P``.
        idx: ``(M,)`` long voxel indices whose features are returned.
        chunk_rows: voxels per slab of the fused function (the result does not depend on it beyond rounding).

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
    dtype = torch.promote_types(feat.hidden.dtype, torch.float32)
    weight = feat.weight.to(dtype)
    bias = weight.new_zeros(weight.shape[0]) if feat.bias is None else feat.bias.to(dtype)
    with torch.autocast(weight.device.type, enabled=False):
        gram, a, c = weight.t() @ weight, weight.t() @ bias, bias @ bias
    size = tuple(feat.shape[2:])
    sums_h, wsum, rows_h, inv = _GramNormClassSums.apply(
        feat.hidden, gram, a, c, cls, num_slots, idx, size, chunk_rows
    )
    sums = F.linear(sums_h, weight) + wsum.unsqueeze(1) * bias
    return sums, wsum, F.linear(rows_h, weight, bias), inv
