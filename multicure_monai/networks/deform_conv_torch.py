"""Pure PyTorch sampling of the 3D deformable convolution: the chunked ``"gather"`` path and ``"grid_sample"``.

MONAI and torchvision have no *3D* deformable convolution (torchvision's ``deform_conv2d`` is 2D only) and a
compiled dependency (mmcv) is not an option, so :func:`multicure_monai.networks.deform_conv.deform_conv3d`
samples its input with plain tensor operations that run on CPU and CUDA alike. This module holds those
operations; the public API and argument checks live in :mod:`multicure_monai.networks.deform_conv`, the chunk
loop and GEMMs in :mod:`multicure_monai.networks.deform_conv_chunked`.

``"gather"`` (:class:`GatherSampler`, driven chunk by chunk, recomputed in backward):

* The input is padded by one voxel of zeros and stored channels-last as a row table ``(B*Dp*Hp*Wp*G_off, C/G_off)``
  (``G_off`` = offset groups), so that every trilinear corner fetch is a contiguous row.
* For a chunk of output voxels the sampling positions of all ``K = kd*kh*kw`` kernel points are computed, with
  their 8 trilinear corner row indices and weights. The weighted 8-corner sum is one fused
  ``F.embedding_bag(mode="sum", per_sample_weights=...)`` call (an optimised gather-and-reduce kernel), giving
  a ``(n, K*C_in)`` column block.
* In backward the gradient w.r.t. the sampling positions uses the analytic derivative of the trilinear weights
  (three more ``embedding_bag`` calls and row-wise dot products with the column gradient); the gradient w.r.t.
  the input (a scatter) is computed as a *gather* over the entries sorted by their target row.

``"grid_sample"`` (:func:`deform_conv3d_grid_sample`) samples all ``K`` kernel points with one trilinear
``F.grid_sample`` call (zero padding) and applies the weights with one batched GEMM, with autograd through both.
It needs ``B*C_in*K*S`` floats for the columns (not chunked) but uses PyTorch's native sampling kernels, much
faster on CUDA than the gather path (slower on CPU).

Out-of-volume samples read zeros (zero padding); every corner outside the volume contributes zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["Geometry", "GatherSampler", "kernel_displacements", "deform_conv3d_grid_sample"]


def kernel_displacements(
    ksz: Sequence[int], dilation: Sequence[int], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Displacement of every kernel point from the window corner.

    Args:
        ksz: kernel size ``(kd, kh, kw)``.
        dilation: dilation per axis.
        device: device of the result.
        dtype: dtype of the result.

    Returns:
        (K, 3) displacements ``(d, h, w)`` in voxels, raster order over ``(kd, kh, kw)``.
    """
    kk = torch.stack(torch.meshgrid(*[torch.arange(k, device=device) for k in ksz], indexing="ij"), dim=-1)
    return kk.reshape(-1, 3).to(dtype) * torch.tensor(dilation, device=device, dtype=dtype)


class Geometry:
    """Static sampling geometry shared by forward and backward (no tensors depending on the data).

    Args:
        x: input, (B, C_in, D, H, W).
        weight: (C_out, C_in/groups, kd, kh, kw).
        stride, padding, dilation: 3-tuples.
        og: number of offset groups ``G_off``.
        out_sz: output size ``(D_out, H_out, W_out)``.
    """

    def __init__(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        stride: tuple[int, int, int],
        padding: tuple[int, int, int],
        dilation: tuple[int, int, int],
        og: int,
        out_sz: tuple[int, int, int],
    ) -> None:
        self.B, self.C = x.shape[0], x.shape[1]
        self.in_sz = tuple(x.shape[2:])
        self.ksz = tuple(weight.shape[2:])
        self.K = self.ksz[0] * self.ksz[1] * self.ksz[2]
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.og = og
        self.cg = self.C // og
        self.out_sz = out_sz
        self.S = out_sz[0] * out_sz[1] * out_sz[2]
        d, h, w = self.in_sz
        self.Dp, self.Hp, self.Wp = d + 2, h + 2, w + 2
        dev = x.device
        # kernel displacements, (K,) per axis, raster order over (kd, kh, kw)
        kk = kernel_displacements(self.ksz, dilation, dev, x.dtype)
        self.kdisp = [kk[:, a] for a in range(3)]
        # corner row offsets in the padded table, (8,) in (cd, ch, cw) raster order
        c = torch.stack(torch.meshgrid(*[torch.arange(2, device=dev)] * 3, indexing="ij"), dim=-1).reshape(8, 3)
        self.corner_off = ((c[:, 0] * self.Hp + c[:, 1]) * self.Wp + c[:, 2]) * og
        self.garange = torch.arange(og, device=dev)
        self.dev, self.dtype = dev, x.dtype

    def out_pos(self, s0: int, s1: int) -> list[torch.Tensor]:
        """Top-left-front sampling position of output voxels ``s0:s1`` (before kernel/offset), per axis (n,)."""
        s = torch.arange(s0, s1, device=self.dev)
        _, ho, wo = self.out_sz
        idx = [s // (ho * wo), (s // wo) % ho, s % wo]
        return [(idx[a] * self.stride[a] - self.padding[a]).to(self.dtype) for a in range(3)]


def _chunk_setup(
    geo: Geometry, b: int, s0: int, s1: int, off: torch.Tensor, derivs: bool
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor] | None]:
    """Corner indices and trilinear weights of the output voxels ``s0:s1`` of batch item ``b``.

    Args:
        geo: the sampling geometry.
        b: batch item.
        s0, s1: range of flat output voxels.
        off: offsets of the chunk, (n, K, G_off, 3).
        derivs: also return the derivatives of the weights w.r.t. the three sampling coordinates.

    Returns:
        idx: (E, 8) int64 rows of the padded table, ``E = n*K*G_off`` entries ordered (n, K, G_off).
        w: (E, 8) trilinear weights (zero for samples outside the volume).
        dw: None or list of three (E, 8) derivatives w.r.t. the d, h, w coordinates.
    """
    pos = geo.out_pos(s0, s1)
    lin = []
    t = []
    valid = None
    for a in range(3):
        q = pos[a][:, None, None] + geo.kdisp[a][None, :, None] + off[..., a]  # (n, K, og)
        f = torch.floor(q)
        va = (q > -1) & (q < geo.in_sz[a])
        lin.append(torch.where(va, f, torch.full_like(f, -1.0)).long() + 1)  # padded index of corner 0
        t.append(q - f)
        valid = va if valid is None else valid & va
    base = ((b * geo.Dp + lin[0]) * geo.Hp + lin[1]) * geo.Wp + lin[2]
    rows = base * geo.og + geo.garange  # (n, K, og)
    idx = (rows.unsqueeze(-1) + geo.corner_off).reshape(-1, 8)
    vf = valid.to(geo.dtype)
    fd = torch.stack(((1 - t[0]) * vf, t[0] * vf), dim=-1)  # (n, K, og, 2), validity folded in
    fh = torch.stack((1 - t[1], t[1]), dim=-1)
    fw = torch.stack((1 - t[2], t[2]), dim=-1)
    wdh = fd[..., :, None] * fh[..., None, :]  # (n, K, og, 2, 2)
    w = (wdh[..., None] * fw[..., None, None, :]).reshape(-1, 8)
    if not derivs:
        return idx, w, None
    sgn = torch.tensor([-1.0, 1.0], device=geo.dev, dtype=geo.dtype)
    vs = vf[..., None] * sgn  # (n, K, og, 2)
    d_d = ((vs[..., :, None] * fh[..., None, :])[..., None] * fw[..., None, None, :]).reshape(-1, 8)
    d_h = ((fd[..., :, None] * sgn)[..., None] * fw[..., None, None, :]).reshape(-1, 8)
    d_w = (wdh[..., None] * sgn).reshape(-1, 8)
    return idx, w, [d_d, d_h, d_w]


def _bag(idx: torch.Tensor, table: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Weighted sum of table rows: out[e] = sum_c w[e, c] * table[idx[e, c]]; idx, w (E, 8) -> (E, Cg)."""
    e, m = idx.shape
    offsets = torch.arange(0, e * m, m, device=idx.device)
    return F.embedding_bag(idx.reshape(-1), table, offsets, mode="sum", per_sample_weights=w.reshape(-1))


def _scatter_rows(
    gtable: torch.Tensor, idx0: torch.Tensor, corner_off: torch.Tensor, w: torch.Tensor, src: torch.Tensor
) -> None:
    """gtable[idx0[e] + corner_off[c]] += w[e, c] * src[e] for all e, c, computed as a gather.

    The entries are sorted by target row; the transposed weighted sum is then again an ``embedding_bag``
    over contiguous target rows (no slow per-row scatter).

    Args:
        gtable: (R_total, Cg) accumulator.
        idx0: (E,) target row of corner 0.
        corner_off: (8,) row offsets of the corners.
        w: (E, 8) weights.
        src: (E, Cg) rows to distribute.
    """
    skey, perm = torch.sort(idx0)
    lo, hi = int(skey[0]), int(skey[-1])
    n_rows = hi - lo + 1
    e = idx0.numel()
    wp = w.index_select(0, perm).t().reshape(-1)  # (8*E,) corner-major
    perm8 = perm.repeat(8)
    if n_rows <= 4 * e:
        starts = torch.searchsorted(skey, torch.arange(lo, hi + 1, device=idx0.device))
        offs = (starts[None, :] + torch.arange(0, 8 * e, e, device=idx0.device)[:, None]).reshape(-1)
        out = F.embedding_bag(perm8, src, offs, mode="sum", per_sample_weights=wp).view(8, n_rows, -1)
        for c in range(8):
            o = lo + int(corner_off[c])
            gtable[o : o + n_rows] += out[c]
    else:  # widely spread targets (large offsets): only the rows actually hit
        uniq, counts = torch.unique_consecutive(skey, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        offs = (starts[None, :] + torch.arange(0, 8 * e, e, device=idx0.device)[:, None]).reshape(-1)
        out = F.embedding_bag(perm8, src, offs, mode="sum", per_sample_weights=wp).view(8, uniq.numel(), -1)
        for c in range(8):
            gtable.index_add_(0, uniq + corner_off[c], out[c])


def _padded_table(x: torch.Tensor, og: int) -> torch.Tensor:
    """(B, C, D, H, W) -> zero padded channels-last rows (B*(D+2)*(H+2)*(W+2)*og, C/og)."""
    b, c, d, h, w = x.shape
    t = x.new_zeros(b, d + 2, h + 2, w + 2, c)
    t[:, 1:-1, 1:-1, 1:-1].copy_(x.permute(0, 2, 3, 4, 1))
    return t.view(-1, c // og)


class GatherSampler:
    """Per-chunk sampling with ``embedding_bag`` gathers (``implementation="gather"``), any device.

    A :class:`~multicure_monai.networks.deform_conv_chunked.ColumnSampler` of the chunked autograd Function: it
    builds the padded row table once, then samples the columns of a chunk (forward) or distributes a chunk's column
    gradient to the input, offset and mask gradients (backward).

    Args:
        geo: the sampling geometry.
        x: input, (B, C_in, D, H, W).
        need_grad_x: allocate the input-gradient accumulator (backward only).
    """

    #: never runs the whole convolution in one call (unlike the compiled kernels with one weight group)
    fused = False

    def __init__(self, geo: Geometry, x: torch.Tensor, need_grad_x: bool = False) -> None:
        self.geo = geo
        self.table = _padded_table(x, geo.og)
        self.g_table = torch.zeros_like(self.table) if need_grad_x else None

    def columns(self, offv: torch.Tensor, maskv: torch.Tensor | None, b: int, s0: int, s1: int) -> torch.Tensor:
        """Modulated columns of output voxels ``s0:s1`` of batch item ``b`` (see ``ColumnSampler``)."""
        geo = self.geo
        off_c = offv[b, ..., s0:s1].permute(3, 1, 0, 2)  # (n, K, og, 3)
        idx, w, _ = _chunk_setup(geo, b, s0, s1, off_c, derivs=False)
        if maskv is not None:
            w = w * maskv[b, ..., s0:s1].permute(2, 1, 0).reshape(-1, 1)
        return _bag(idx, self.table, w).view(s1 - s0, -1)  # (n, K*C_in)

    def backward_chunk(
        self,
        offv: torch.Tensor,
        maskv: torch.Tensor | None,
        gcols: torch.Tensor,
        b: int,
        s0: int,
        s1: int,
        need_cols: bool,
        g_off: torch.Tensor | None,
        g_mask: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """Backward of :meth:`columns` for one chunk (see ``ColumnSampler``)."""
        geo = self.geo
        n, K, og = s1 - s0, geo.K, geo.og
        need_off = g_off is not None
        gcols = gcols.reshape(-1, geo.cg)  # (E, Cg)
        off_c = offv[b, ..., s0:s1].permute(3, 1, 0, 2)
        idx, w, dws = _chunk_setup(geo, b, s0, s1, off_c, derivs=need_off)
        m_c = None if maskv is None else maskv[b, ..., s0:s1].permute(2, 1, 0).reshape(-1, 1)
        if need_off:  # one fused gather: samples and their derivatives w.r.t. the 3 coordinates
            n_e = idx.shape[0]
            both = _bag(idx.expand(4, n_e, 8).reshape(-1, 8), self.table, torch.stack([w, *dws]).view(-1, 8))
            both = both.view(4, n_e, -1)
            val = both[0]  # (E, Cg), unmodulated samples
        else:
            val = _bag(idx, self.table, w)
        cols = (val if m_c is None else val * m_c).view(n, -1) if need_cols else None
        if need_off:
            gq = torch.bmm(both[1:].transpose(0, 1), gcols.unsqueeze(-1)).squeeze(-1)  # (E, 3)
            if m_c is not None:
                gq = gq * m_c
            g_off[b, ..., s0:s1] = gq.view(n, K, og, 3).permute(2, 1, 3, 0)
        if g_mask is not None:
            g_mask[b, ..., s0:s1] = torch.bmm(val.unsqueeze(1), gcols.unsqueeze(-1)).view(n, K, og).permute(2, 1, 0)
        if self.g_table is not None:
            ws = w if m_c is None else w * m_c
            _scatter_rows(self.g_table, idx[:, 0], geo.corner_off, ws, gcols)
        return cols

    def grad_input(self) -> torch.Tensor:
        """The accumulated input gradient, (B, C_in, D, H, W) (a channels-last view)."""
        geo = self.geo
        d, h, wd = geo.in_sz
        return self.g_table.view(geo.B, d + 2, h + 2, wd + 2, geo.C)[:, 1:-1, 1:-1, 1:-1].permute(0, 4, 1, 2, 3)


def deform_conv3d_grid_sample(
    x: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    stride: tuple[int, int, int],
    padding: tuple[int, int, int],
    dilation: tuple[int, int, int],
    groups: int,
    og: int,
    out_sz: tuple[int, int, int],
) -> torch.Tensor:
    """``implementation="grid_sample"``: one trilinear ``F.grid_sample`` for all kernel points, one GEMM.

    Arguments are checked by :func:`multicure_monai.networks.deform_conv.deform_conv3d`; autograd
    differentiates through ``grid_sample`` and the GEMM.

    Args:
        x: (B, C_in, D, H, W).
        offset: (B, 3*G_off*K, D_out, H_out, W_out).
        weight: (C_out, C_in/groups, kd, kh, kw).
        bias: None or (C_out,).
        mask: None or (B, G_off*K, D_out, H_out, W_out).
        stride, padding, dilation: 3-tuples.
        groups: convolution groups.
        og: offset groups ``G_off``.
        out_sz: ``(D_out, H_out, W_out)``.

    Returns:
        (B, C_out, D_out, H_out, W_out).
    """
    b, c, d, h, w = x.shape
    cout, cin_g = weight.shape[:2]
    ksz = weight.shape[2:]
    K = ksz[0] * ksz[1] * ksz[2]
    s = out_sz[0] * out_sz[1] * out_sz[2]
    cg = c // og
    dev, dt = x.device, x.dtype
    kk = kernel_displacements(ksz, dilation, dev, dt)  # (K, 3)
    base = torch.stack(
        torch.meshgrid(
            *[torch.arange(out_sz[a], device=dev, dtype=dt) * stride[a] - padding[a] for a in range(3)], indexing="ij"
        ),
        dim=-1,
    )  # (D', H', W', 3) top-left-front sampling position of each output voxel
    off = offset.reshape(b, og, K, 3, *out_sz).permute(0, 1, 2, 4, 5, 6, 3)  # (B, og, K, D', H', W', 3)
    pos = base + kk.view(K, 1, 1, 1, 3) + off
    # voxel position -> grid_sample coordinate with align_corners=False: g = (2 p + 1) / size - 1 (valid for size 1)
    size = torch.tensor((d, h, w), device=dev, dtype=dt)
    grid = ((2 * pos + 1) / size - 1).flip(-1)  # grid_sample's last axis is (x=W, y=H, z=D)
    grid = grid.reshape(b * og, K * out_sz[0], out_sz[1], out_sz[2], 3)
    cols = F.grid_sample(
        x.reshape(b * og, cg, d, h, w), grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )  # (B*og, Cg, K*D', H', W')
    cols = cols.view(b, og, cg, K, s)
    if mask is not None:
        cols = cols * mask.reshape(b, og, 1, K, s)
    cols = cols.reshape(b, groups, cin_g * K, s)  # channel-major rows (c, k), the order of weight.view(..., K)
    out = torch.matmul(weight.reshape(groups, cout // groups, cin_g * K), cols)  # (B, groups, C_out/g, S)
    out = out.reshape(b, cout, *out_sz)
    return out if bias is None else out + bias.view(1, cout, 1, 1, 1)
