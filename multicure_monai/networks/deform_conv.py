"""3D deformable convolution (DCNv1 / modulated DCNv2) for CPU and CUDA.

MultiCURE (Karimijafarbigloo et al., MIDL 2024, Sec. 2.1) uses a deformable convolution in its third branch.
Neither MONAI nor torchvision provides a *3D* deformable convolution, and compiled dependencies (mmcv) are not
an option, so it is written here: with plain tensor operations that run on CPU and CUDA alike, plus fused CPU
sampling kernels that ship as C++ source and are compiled on first use
(:mod:`multicure_monai.networks.deform_conv_extension`).

Algorithm (memory bounded, recompute in backward):

* The input is padded by one voxel of zeros and stored channels-last as a row table ``(B*Dp*Hp*Wp*G_off, C/G_off)``
  (``G_off`` = offset groups), so that every trilinear corner fetch is a contiguous row.
* Output voxels are processed in chunks. For a chunk the sampling positions of all ``K = kd*kh*kw`` kernel
  points are computed, with their 8 trilinear corner row indices and weights. The weighted 8-corner sum is
  one fused ``F.embedding_bag(mode="sum", per_sample_weights=...)`` call (an optimised gather-and-reduce
  kernel), giving a ``(n, K*C_in)`` column block that is multiplied with the reshaped weight by one GEMM.
* The ``torch.autograd.Function`` saves only its inputs. Backward recomputes the columns chunk by chunk;
  the gradient w.r.t. the sampling positions uses the analytic derivative of the trilinear weights (three
  more ``embedding_bag`` calls and row-wise dot products with the column gradient); the gradient w.r.t.
  the input (a scatter) is computed as a *gather* over the entries sorted by their target row.

``implementation="compiled"`` runs the same chunk loop and GEMMs, with the per-chunk sampling (forward columns;
backward columns, offset / mask gradients and the input-gradient scatter in one sweep) in OpenMP C++ kernels
instead of the gather / sort / scatter tensor operations.

A further implementation, ``"grid_sample"``, samples all ``K`` kernel points with one trilinear
``F.grid_sample`` call (zero padding) and applies the weights with one batched GEMM, with autograd through both.
It needs ``B*C_in*K*S`` floats for the columns (not chunked), but uses PyTorch's native sampling kernels, which
on CUDA are much faster than the gather path; on CPU the 3D ``grid_sample`` kernels are slower than the chunked
gather. ``implementation="auto"`` (the default) therefore picks ``"grid_sample"`` on CUDA, ``"compiled"`` on CPU
when the kernels build, and ``"gather"`` otherwise; all three compute the same function (the tests compare them
in float64).

Out-of-volume samples read zeros (zero padding); every corner outside the volume contributes zero.

Offset layout: ``offset[:, 3 * (g * K + k) + a]`` is the displacement, in voxels, of kernel point ``k``
(raster order over ``(kd, kh, kw)``, the order of ``weight.reshape(C_out, C_in/groups, K)``) of offset group
``g`` along axis ``a`` (0: D, 1: H, 2: W). Mask layout: ``mask[:, g * K + k]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from multicure_monai.networks.deform_conv_extension import EXTENSION_ENV, load_cpu_extension

__all__ = ["deform_conv3d", "DeformConv3d", "DeformConv3dPack", "DEFAULT_MEMORY_BUDGET", "IMPLEMENTATIONS"]

#: Default working-memory budget in bytes for one chunk of output voxels (forward or backward).
DEFAULT_MEMORY_BUDGET: int = 96 * 2**20
#: output voxels per block of the fused compiled CPU kernels (their columns, K*C_in values each, stay in cache)
FUSED_BLOCK: int = 64

#: Accepted values of ``implementation``.
IMPLEMENTATIONS: tuple[str, ...] = ("auto", "gather", "grid_sample", "compiled")


def _triple(v: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(v, int):
        return (v, v, v)
    t = tuple(int(i) for i in v)
    if len(t) != 3:
        raise ValueError(f"expected an int or a sequence of 3 ints, got {v}.")
    return t  # type: ignore[return-value]


def _kernel_displacements(ksz, dilation, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(K, 3) displacement (d, h, w) of every kernel point from the window corner, raster order over (kd, kh, kw)."""
    kk = torch.stack(torch.meshgrid(*[torch.arange(k, device=device) for k in ksz], indexing="ij"), dim=-1)
    return kk.reshape(-1, 3).to(dtype) * torch.tensor(dilation, device=device, dtype=dtype)


class _Geometry:
    """Static sampling geometry shared by forward and backward (no tensors depending on the data)."""

    def __init__(self, x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, og: int, out_sz):
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
        kk = _kernel_displacements(self.ksz, dilation, dev, x.dtype)
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


def _chunk_setup(geo: _Geometry, b: int, s0: int, s1: int, off: torch.Tensor, derivs: bool):
    """Corner indices and trilinear weights of the output voxels ``s0:s1`` of batch item ``b``.

    Args:
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


def _scatter_rows(gtable: torch.Tensor, idx0: torch.Tensor, corner_off: torch.Tensor, w: torch.Tensor, src: torch.Tensor):
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


def _is_channels_last(t: torch.Tensor) -> bool:
    """Whether a ``(B, C, D, H, W)`` tensor is laid out channels-last (``torch.channels_last_3d``) but not
    (also) contiguous, i.e. whether its ``(B, D, H, W, C)`` permutation is the contiguous one."""
    return t.dim() == 5 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last_3d)


def _weight_matrix(weight: torch.Tensor, groups: int, K: int) -> torch.Tensor:
    """(C_out, C_in/g, kd, kh, kw) -> (g, K*C_in/g, C_out/g), row index k*C_in/g + c."""
    cout, cin_g = weight.shape[:2]
    return weight.reshape(groups, cout // groups, cin_g, K).permute(0, 3, 2, 1).reshape(groups, K * cin_g, cout // groups)


def _group_cols(cols: torch.Tensor, groups: int, K: int) -> torch.Tensor:
    """(n, K*C_in) -> (g, n, K*C_in/g)."""
    n = cols.shape[0]
    if groups == 1:
        return cols.view(1, n, -1)
    return cols.view(n, K, groups, -1).permute(2, 0, 1, 3).reshape(groups, n, -1)


def _ungroup_cols(gcols: torch.Tensor, K: int) -> torch.Tensor:
    """(g, n, K*C_in/g) -> (n, K*C_in)."""
    g, n, _ = gcols.shape
    if g == 1:
        return gcols[0]
    return gcols.view(g, n, K, -1).permute(1, 2, 0, 3).reshape(n, -1)


def _padded_table(x: torch.Tensor, og: int) -> torch.Tensor:
    """(B, C, D, H, W) -> zero padded channels-last rows (B*(D+2)*(H+2)*(W+2)*og, C/og)."""
    b, c, d, h, w = x.shape
    t = x.new_zeros(b, d + 2, h + 2, w + 2, c)
    t[:, 1:-1, 1:-1, 1:-1].copy_(x.permute(0, 2, 3, 4, 1))
    return t.view(-1, c // og)


def _chunks(geo: _Geometry, chunk: int):
    for b in range(geo.B):
        for s0 in range(0, geo.S, chunk):
            yield b, s0, min(s0 + chunk, geo.S)


def _ext_args(geo: _Geometry) -> tuple:
    """Geometry arguments of the compiled kernels (see ``csrc/deform_conv3d_cpu.cpp``)."""
    return list(geo.ksz), list(geo.stride), list(geo.padding), list(geo.dilation), list(geo.out_sz)


class _DeformConv3dFunction(torch.autograd.Function):
    """Chunked deformable convolution. The sampling runs in the compiled CPU kernels when ``ext`` is given,
    else in the pure PyTorch gather / scatter code above; chunk loop, GEMMs and grouping are shared. With the
    compiled kernels and one weight group the whole convolution runs in them instead (``fused_forward`` /
    ``fused_backward``): blocks of ``min(chunk, FUSED_BLOCK)`` output voxels are sampled and multiplied by the
    weights while their columns are still in cache, so the columns never go through main memory."""

    @staticmethod
    def forward(ctx, x, offset, weight, bias, mask, stride, padding, dilation, groups, og, out_sz, chunk, ext):
        with torch.autocast(device_type=x.device.type, enabled=False):
            geo = _Geometry(x, weight, stride, padding, dilation, og, out_sz)
            cout = weight.shape[0]
            wm = _weight_matrix(weight, groups, geo.K)
            offv = offset.reshape(geo.B, og, geo.K, 3, geo.S)
            maskv = None if mask is None else mask.reshape(geo.B, og, geo.K, geo.S)
            if ext is None:
                table = _padded_table(x, og)
            else:
                x_cl = x.permute(0, 2, 3, 4, 1).contiguous()  # offsets / mask: the kernels take any strides
            # the output takes the input's memory format: channels-last rows (n, C_out) are what the GEMM yields
            channels_last = _is_channels_last(x)
            fused = ext is not None and groups == 1
            out = x.new_empty(geo.B, geo.S, cout) if channels_last or fused else x.new_empty(geo.B, cout, geo.S)
            if fused:
                block = min(chunk, FUSED_BLOCK)
                ext.fused_forward(x_cl, offv, maskv, wm[0].contiguous(), *_ext_args(geo), out, block)
                if bias is not None:
                    out += bias
            for b, s0, s1 in () if fused else _chunks(geo, chunk):
                if ext is None:
                    off_c = offv[b, ..., s0:s1].permute(3, 1, 0, 2)  # (n, K, og, 3)
                    idx, w, _ = _chunk_setup(geo, b, s0, s1, off_c, derivs=False)
                    if maskv is not None:
                        w = w * maskv[b, ..., s0:s1].permute(2, 1, 0).reshape(-1, 1)
                    cols = _bag(idx, table, w).view(s1 - s0, -1)  # (n, K*C_in)
                else:
                    cols = ext.columns(x_cl, offv, maskv, *_ext_args(geo), b, s0, s1).view(s1 - s0, -1)
                res = torch.bmm(_group_cols(cols, groups, geo.K), wm)  # (g, n, C_out/g)
                res = res.permute(1, 0, 2).reshape(s1 - s0, cout)
                if bias is not None:
                    res = res + bias
                if channels_last:
                    out[b, s0:s1].copy_(res)
                else:
                    out[b, :, s0:s1].copy_(res.t())
        ctx.save_for_backward(x, offset, weight, mask)
        ctx.conf = (stride, padding, dilation, groups, og, out_sz, chunk, bias is not None, ext)
        if channels_last:
            return out.view(geo.B, *out_sz, cout).permute(0, 4, 1, 2, 3)
        if fused:  # channels-first input: channels-first output, as nn.Conv3d
            return out.view(geo.B, *out_sz, cout).permute(0, 4, 1, 2, 3).contiguous()
        return out.view(geo.B, cout, *out_sz)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, offset, weight, mask = ctx.saved_tensors
        stride, padding, dilation, groups, og, out_sz, chunk, has_bias, ext = ctx.conf
        need_x, need_off, need_w, need_b, need_m = ctx.needs_input_grad[:5]
        with torch.autocast(device_type=x.device.type, enabled=False):
            geo = _Geometry(x, weight, stride, padding, dilation, og, out_sz)
            cout = weight.shape[0]
            K = geo.K
            wm = _weight_matrix(weight, groups, K)
            offv = offset.reshape(geo.B, og, K, 3, geo.S)
            maskv = None if mask is None else mask.reshape(geo.B, og, K, geo.S)
            grad_cl = _is_channels_last(grad_out)  # rows (n, C_out) of a channels-last gradient are views
            if grad_cl:
                gout = grad_out.permute(0, 2, 3, 4, 1).reshape(geo.B, geo.S, cout)
            else:
                gout = grad_out.reshape(geo.B, cout, geo.S)
            # laid out like the offsets / mask (channels-last from a channels-last offset conv: no copies)
            g_off = torch.zeros_like(offv) if need_off else None
            g_mask = torch.zeros_like(maskv) if (need_m and mask is not None) else None
            g_wm = wm.new_zeros(wm.shape) if need_w else None
            if ext is None:
                table = _padded_table(x, og)
                g_table = torch.zeros_like(table) if need_x else None
            else:
                x_cl = x.permute(0, 2, 3, 4, 1).contiguous()  # offsets / mask: the kernels take any strides
                g_x_cl = torch.zeros_like(x_cl) if need_x else None
            fused = ext is not None and groups == 1
            if fused:
                rows = gout if grad_cl else grad_out.permute(0, 2, 3, 4, 1).reshape(geo.B, geo.S, cout)
                ext.fused_backward(
                    x_cl, offv, maskv, wm[0].t().contiguous(), rows.contiguous(), *_ext_args(geo), g_x_cl, g_off,
                    g_mask, g_wm[0] if need_w else None, min(chunk, FUSED_BLOCK),
                )
                gout, grad_cl = rows, True  # for the bias gradient
            for b, s0, s1 in () if fused else _chunks(geo, chunk):
                n = s1 - s0
                if grad_cl:
                    g_g = gout[b, s0:s1].reshape(n, groups, cout // groups).transpose(0, 1)  # (g, n, C_out/g)
                else:
                    g_g = gout[b, :, s0:s1].reshape(groups, cout // groups, n).transpose(1, 2)
                gcols = _ungroup_cols(torch.bmm(g_g, wm.transpose(1, 2)), K)  # (n, K*C_in)
                if ext is not None:
                    cols = ext.backward(
                        x_cl, offv, maskv, gcols.contiguous(), *_ext_args(geo), b, s0, s1, need_w, g_x_cl, g_off, g_mask
                    )
                    if need_w:
                        g_wm.baddbmm_(_group_cols(cols.view(n, -1), groups, K).transpose(1, 2), g_g)
                    continue
                gcols = gcols.reshape(-1, geo.cg)  # (E, Cg)
                off_c = offv[b, ..., s0:s1].permute(3, 1, 0, 2)
                idx, w, dws = _chunk_setup(geo, b, s0, s1, off_c, derivs=need_off)
                m_c = None if maskv is None else maskv[b, ..., s0:s1].permute(2, 1, 0).reshape(-1, 1)
                if need_off:  # one fused gather: samples and their derivatives w.r.t. the 3 coordinates
                    n_e = idx.shape[0]
                    both = _bag(idx.expand(4, n_e, 8).reshape(-1, 8), table, torch.stack([w, *dws]).view(-1, 8))
                    both = both.view(4, n_e, -1)
                    val = both[0]  # (E, Cg), unmodulated samples
                else:
                    val = _bag(idx, table, w)
                cols = (val if m_c is None else val * m_c).view(n, -1)
                if need_w:
                    g_wm.baddbmm_(_group_cols(cols, groups, K).transpose(1, 2), g_g)
                if need_off:
                    gq = torch.bmm(both[1:].transpose(0, 1), gcols.unsqueeze(-1)).squeeze(-1)  # (E, 3)
                    if m_c is not None:
                        gq = gq * m_c
                    g_off[b, ..., s0:s1] = gq.view(n, K, og, 3).permute(2, 1, 3, 0)
                if g_mask is not None:
                    g_mask[b, ..., s0:s1] = torch.bmm(val.unsqueeze(1), gcols.unsqueeze(-1)).view(n, K, og).permute(2, 1, 0)
                if need_x:
                    ws = w if m_c is None else w * m_c
                    _scatter_rows(g_table, idx[:, 0], geo.corner_off, ws, gcols)
            grad_x = grad_w = grad_b = None
            if need_x and ext is not None:
                grad_x = g_x_cl.permute(0, 4, 1, 2, 3)
            elif need_x:
                d, h, wd = geo.in_sz
                grad_x = g_table.view(geo.B, d + 2, h + 2, wd + 2, geo.C)[:, 1:-1, 1:-1, 1:-1].permute(0, 4, 1, 2, 3)
            if need_w:
                cin_g = weight.shape[1]
                grad_w = g_wm.view(groups, K, cin_g, cout // groups).permute(0, 3, 2, 1).reshape(weight.shape)
            if need_b and has_bias:
                grad_b = gout.sum((0, 1) if grad_cl else (0, 2))
            grad_off = g_off.view(offset.shape) if need_off else None
            grad_m = g_mask.view(mask.shape) if g_mask is not None else None
        return grad_x, grad_off, grad_w, grad_b, grad_m, None, None, None, None, None, None, None, None


def _deform_conv3d_grid_sample(x, offset, weight, bias, mask, stride, padding, dilation, groups, og, out_sz):
    """``implementation="grid_sample"``: one trilinear ``F.grid_sample`` for all kernel points, one GEMM.

    Shapes as in :func:`deform_conv3d`; autograd differentiates through ``grid_sample`` and the GEMM.
    """
    b, c, d, h, w = x.shape
    cout, cin_g = weight.shape[:2]
    ksz = weight.shape[2:]
    K = ksz[0] * ksz[1] * ksz[2]
    s = out_sz[0] * out_sz[1] * out_sz[2]
    cg = c // og
    dev, dt = x.device, x.dtype
    kk = _kernel_displacements(ksz, dilation, dev, dt)  # (K, 3)
    base = torch.stack(
        torch.meshgrid(*[torch.arange(out_sz[a], device=dev, dtype=dt) * stride[a] - padding[a] for a in range(3)], indexing="ij"),
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


def _auto_chunk(n_entries_per_voxel: int, cg: int, elem: int, budget: int, compiled: bool = False) -> int:
    # rough bytes per (voxel, kernel point, offset group) entry in backward. Pure PyTorch: indices/weights of 8
    # corners for value + 3 derivatives, sampled rows, column gradients, sort buffers. Compiled kernels: the
    # columns and their gradient (twice: GEMM output and its contiguous copy).
    per_entry = 3 * cg * elem + 16 if compiled else 8 * 8 + 4 * 8 * elem + 6 * cg * elem + 8 * (8 + elem) + 64
    return max(64, budget // max(1, per_entry * n_entries_per_voxel))


def deform_conv3d(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    mask: torch.Tensor | None = None,
    offset_groups: int | None = None,
    chunk_size: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    implementation: str = "auto",
) -> torch.Tensor:
    """3D deformable convolution (modulated if ``mask`` is given), trilinear sampling with zero padding.

    Args:
        input: (B, C_in, D, H, W).
        offset: (B, 3*G_off*K, D_out, H_out, W_out), ``K = kd*kh*kw``; channel ``3*(g*K + k) + a`` is the
            displacement in voxels of kernel point ``k`` (raster order over kd, kh, kw) of offset group ``g``
            along axis ``a`` (0: D, 1: H, 2: W).
        weight: (C_out, C_in/groups, kd, kh, kw); ``groups`` is inferred from the shapes.
        bias: optional (C_out,).
        stride, padding, dilation: int or 3-sequence, as in ``nn.Conv3d`` (zero padding).
        mask: optional (B, G_off*K, D_out, H_out, W_out) modulation scalars (DCNv2), channel ``g*K + k``.
        offset_groups: number of offset groups ``G_off`` (C_in must be divisible); inferred from ``offset``
            when None.
        chunk_size: number of output voxels processed at once; None derives it from ``memory_budget``.
        memory_budget: working-memory budget in bytes used to derive the chunk size.
        implementation: ``"gather"`` (chunked, memory bounded, pure PyTorch), ``"compiled"`` (the same chunking
            with fused C++ sampling kernels, CPU only, fastest there), ``"grid_sample"`` (native sampling
            kernels, fastest on CUDA, columns not chunked) or ``"auto"`` (``grid_sample`` on CUDA, ``compiled``
            on CPU when it builds, else ``gather``). ``chunk_size`` and ``memory_budget`` apply to ``gather``
            and ``compiled``.

    Returns:
        (B, C_out, D_out, H_out, W_out), dtype of ``input`` (half inputs are computed in float32).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}.")
    if input.dim() != 5 or weight.dim() != 5:
        raise ValueError("input and weight must be 5D (B, C, D, H, W) / (C_out, C_in/groups, kd, kh, kw).")
    stride, padding, dilation = _triple(stride), _triple(padding), _triple(dilation)
    b, cin = input.shape[:2]
    cout, cin_g = weight.shape[:2]
    if cin % cin_g != 0 or cout % (cin // cin_g) != 0:
        raise ValueError(f"weight {tuple(weight.shape)} incompatible with {cin} input channels.")
    groups = cin // cin_g
    ksz = weight.shape[2:]
    K = ksz[0] * ksz[1] * ksz[2]
    out_sz = tuple(
        (input.shape[2 + a] + 2 * padding[a] - dilation[a] * (ksz[a] - 1) - 1) // stride[a] + 1 for a in range(3)
    )
    if offset_groups is None:
        offset_groups = offset.shape[1] // (3 * K)
    og = offset_groups
    if og < 1 or cin % og != 0 or offset.shape[1] != 3 * og * K:
        raise ValueError(f"offset channels {offset.shape[1]} must be 3*offset_groups*K with C_in % offset_groups == 0.")
    if tuple(offset.shape[2:]) != out_sz or offset.shape[0] != b:
        raise ValueError(f"offset shape {tuple(offset.shape)} does not match output size {out_sz}.")
    if mask is not None and (mask.shape[1] != og * K or tuple(mask.shape[2:]) != out_sz):
        raise ValueError(f"mask shape {tuple(mask.shape)} must be (B, {og * K}, {out_sz}).")
    orig = input.dtype
    dt = torch.float32 if orig in (torch.float16, torch.bfloat16) else orig
    cast = lambda t: None if t is None else t.to(dt)  # noqa: E731
    ext = None
    if implementation == "compiled":
        if input.device.type != "cpu":
            raise ValueError(f"implementation='compiled' runs on CPU tensors only, got {input.device.type}.")
        ext = load_cpu_extension()
        if ext is None:
            raise RuntimeError(f"the compiled CPU kernels are not available (disabled by {EXTENSION_ENV}=0 or not buildable).")
    elif implementation == "auto":
        if input.device.type == "cuda":
            implementation = "grid_sample"
        elif input.device.type == "cpu":
            ext = load_cpu_extension()
    if implementation == "grid_sample":
        with torch.autocast(device_type=input.device.type, enabled=False):
            out = _deform_conv3d_grid_sample(
                input.to(dt), cast(offset), cast(weight), cast(bias), cast(mask),
                stride, padding, dilation, groups, og, out_sz,
            )
        return out.to(orig)
    if chunk_size is None:
        chunk_size = _auto_chunk(K * og, cin // og, torch.finfo(dt).bits // 8, memory_budget, ext is not None)
    out = _DeformConv3dFunction.apply(
        input.to(dt), cast(offset), cast(weight), cast(bias), cast(mask),
        stride, padding, dilation, groups, og, out_sz, int(chunk_size), ext,
    )
    return out.to(orig)


class DeformConv3d(nn.Module):
    """3D deformable convolution with explicitly given offsets (torchvision ``DeformConv2d``-like).

    Args:
        in_channels: number of input channels C_in.
        out_channels: number of output channels C_out.
        kernel_size: int or 3-sequence.
        stride, padding, dilation: int or 3-sequence, as in ``nn.Conv3d``.
        groups: convolution groups.
        offset_groups: number of offset groups (channels sharing one offset field).
        bias: whether to learn an additive bias.
        chunk_size: output voxels per chunk, None: derived from ``memory_budget``.
        memory_budget: working-memory budget in bytes for one chunk.
        implementation: ``"auto"``, ``"gather"``, ``"compiled"`` or ``"grid_sample"``, see :func:`deform_conv3d`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int] = 3,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        offset_groups: int = 1,
        bias: bool = True,
        chunk_size: int | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        implementation: str = "auto",
    ) -> None:
        super().__init__()
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}.")
        self.implementation = implementation
        if in_channels % groups or out_channels % groups or in_channels % offset_groups:
            raise ValueError("in/out channels must be divisible by groups and in_channels by offset_groups.")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _triple(kernel_size)
        self.stride, self.padding, self.dilation = _triple(stride), _triple(padding), _triple(dilation)
        self.groups, self.offset_groups = groups, offset_groups
        self.chunk_size, self.memory_budget = chunk_size, memory_budget
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    @property
    def num_kernel_points(self) -> int:
        return self.kernel_size[0] * self.kernel_size[1] * self.kernel_size[2]

    def reset_parameters(self) -> None:
        """Same initialisation as ``nn.Conv3d``."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.num_kernel_points
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            x: (B, C_in, D, H, W).
            offset: (B, 3*offset_groups*K, D_out, H_out, W_out), layout as in :func:`deform_conv3d`.
            mask: optional (B, offset_groups*K, D_out, H_out, W_out).

        Returns:
            (B, C_out, D_out, H_out, W_out).
        """
        return deform_conv3d(
            x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask,
            self.offset_groups, self.chunk_size, self.memory_budget, self.implementation,
        )


class DeformConv3dPack(DeformConv3d):
    """Deformable convolution that predicts its own offsets (and mask if ``modulated``) from the input.

    The offset/mask predictor is an ``nn.Conv3d`` with the same kernel/stride/padding/dilation, zero
    initialised, so at initialisation the layer equals a plain ``nn.Conv3d`` with the same weights
    (offsets 0, mask ``2*sigmoid(0) = 1``).

    Args:
        modulated: predict a modulation mask (DCNv2) in addition to the offsets.
        other args: see :class:`DeformConv3d`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int] = 3,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        offset_groups: int = 1,
        bias: bool = True,
        modulated: bool = False,
        chunk_size: int | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        implementation: str = "auto",
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, offset_groups, bias,
            chunk_size, memory_budget, implementation,
        )
        self.modulated = modulated
        n_off = 3 * offset_groups * self.num_kernel_points
        n_mask = offset_groups * self.num_kernel_points if modulated else 0
        self.conv_offset = nn.Conv3d(
            in_channels, n_off + n_mask, self.kernel_size, self.stride, self.padding, self.dilation, bias=True
        )
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """
        Args:
            x: (B, C_in, D, H, W).

        Returns:
            (B, C_out, D_out, H_out, W_out).
        """
        out = self.conv_offset(x)
        n_off = 3 * self.offset_groups * self.num_kernel_points
        offset = out[:, :n_off]
        mask = 2 * torch.sigmoid(out[:, n_off:]) if self.modulated else None
        return super().forward(x, offset, mask)
