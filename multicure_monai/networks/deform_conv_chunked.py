"""Memory-bounded chunked autograd Function of the 3D deformable convolution (``"gather"`` and ``"compiled"``).

MONAI and torchvision have no *3D* deformable convolution, so
:func:`multicure_monai.networks.deform_conv.deform_conv3d` implements one. Its two chunked implementations share
this Function and differ only in the *sampler* that produces the columns of a chunk of output voxels and
distributes their gradient back:

* :class:`multicure_monai.networks.deform_conv_torch.GatherSampler`: pure PyTorch ``embedding_bag`` gathers;
* :class:`multicure_monai.networks.deform_conv_compiled.CompiledSampler`: the compiled CPU kernels, which with
  one weight group run the whole convolution in one call (``sampler.fused``, no chunk loop here).

Algorithm (memory bounded, recompute in backward): output voxels are processed in chunks; the ``(n, K*C_in)``
column block of a chunk is multiplied with the reshaped weight by one (grouped) GEMM. The Function saves only its
inputs (the compiled path: its channels-last copy of the input instead); backward recomputes the columns chunk by
chunk, gets the column gradient from one GEMM with the weight and hands it to the sampler (input, offset and mask
gradients); the weight gradient is one GEMM of the columns with the output gradient.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType
from typing import Protocol

import torch
from torch.autograd.function import once_differentiable

from multicure_monai.networks.deform_conv_compiled import CompiledSampler
from multicure_monai.networks.deform_conv_torch import GatherSampler, Geometry

__all__ = ["DeformConv3dFunction", "auto_chunk_size"]


def auto_chunk_size(n_entries_per_voxel: int, cg: int, elem: int, budget: int, compiled: bool = False) -> int:
    """Output voxels per chunk that keep the backward working memory within ``budget``.

    Args:
        n_entries_per_voxel: sampled entries per output voxel, ``K * G_off``.
        cg: channels per offset group, ``C_in / G_off``.
        elem: bytes per element of the compute dtype.
        budget: working-memory budget in bytes.
        compiled: size for the compiled kernels instead of the pure PyTorch path.

    Returns:
        The chunk size, at least 64.
    """
    # rough bytes per (voxel, kernel point, offset group) entry in backward. Pure PyTorch: indices/weights of 8
    # corners for value + 3 derivatives, sampled rows, column gradients, sort buffers. Compiled kernels: the
    # columns and their gradient (twice: GEMM output and its contiguous copy).
    per_entry = 3 * cg * elem + 16 if compiled else 8 * 8 + 4 * 8 * elem + 6 * cg * elem + 8 * (8 + elem) + 64
    return max(64, budget // max(1, per_entry * n_entries_per_voxel))


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


def _chunks(geo: Geometry, chunk: int) -> Iterator[tuple[int, int, int]]:
    """``(b, s0, s1)``: batch item and range of flat output voxels of every chunk."""
    for b in range(geo.B):
        for s0 in range(0, geo.S, chunk):
            yield b, s0, min(s0 + chunk, geo.S)


class ColumnSampler(Protocol):
    """What :class:`~multicure_monai.networks.deform_conv_chunked.DeformConv3dFunction` asks of a sampler.

    Implemented by :class:`~multicure_monai.networks.deform_conv_torch.GatherSampler` (pure PyTorch) and
    :class:`~multicure_monai.networks.deform_conv_compiled.CompiledSampler` (the C++ kernels).
    """

    fused: bool

    def columns(self, offv: torch.Tensor, maskv: torch.Tensor | None, b: int, s0: int, s1: int) -> torch.Tensor:
        """Modulated columns of the output voxels ``s0:s1`` of batch item ``b``.

        Args:
            offv: offsets, (B, G_off, K, 3, S) (a view of the offset tensor).
            maskv: None or mask, (B, G_off, K, S).
            b: batch item.
            s0, s1: range of flat output voxels (``n = s1 - s0``).

        Returns:
            (n, K*C_in) columns, row index ``k*C_in + c``.
        """

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
        """Backward of :meth:`columns` for one chunk.

        Accumulates into the input gradient (when allocated) and writes the chunk's entries of ``g_off`` and
        ``g_mask`` (each when given).

        Args:
            offv: offsets, (B, G_off, K, 3, S).
            maskv: None or mask, (B, G_off, K, S).
            gcols: gradient of the chunk's columns, (n, K*C_in).
            b: batch item.
            s0, s1: range of flat output voxels.
            need_cols: return the recomputed columns (for the weight gradient).
            g_off: None or offset gradient, (B, G_off, K, 3, S).
            g_mask: None or mask gradient, (B, G_off, K, S).

        Returns:
            The recomputed modulated columns, (n, K*C_in), when ``need_cols``, else None.
        """

    def grad_input(self) -> torch.Tensor:
        """The accumulated input gradient, (B, C_in, D, H, W)."""


def _sampler(
    ext: ModuleType | None, geo: Geometry, x: torch.Tensor, groups: int, need_grad_x: bool = False
) -> ColumnSampler:
    """The compiled-kernel sampler when ``ext`` is given, else the pure PyTorch gather sampler."""
    if ext is None:
        return GatherSampler(geo, x, need_grad_x)
    return CompiledSampler(ext, geo, x, groups, need_grad_x)


class DeformConv3dFunction(torch.autograd.Function):
    """Chunked deformable convolution; the sampling runs in the compiled CPU kernels when ``ext`` is given, else
    in the pure PyTorch gather / scatter code. Chunk loop, GEMMs, grouping and memory layouts are shared.

    ``apply(x, offset, weight, bias, mask, stride, padding, dilation, groups, og, out_sz, chunk, ext)`` with the
    checked arguments of :func:`multicure_monai.networks.deform_conv.deform_conv3d` (3-tuples for the geometry,
    ``og`` offset groups, ``out_sz`` the output size, ``chunk`` output voxels per chunk, ``ext`` the extension
    module or None); returns (B, C_out, D_out, H_out, W_out) in the memory format of ``x``.
    """

    @staticmethod
    def forward(ctx, x, offset, weight, bias, mask, stride, padding, dilation, groups, og, out_sz, chunk, ext):
        with torch.autocast(device_type=x.device.type, enabled=False):
            geo = Geometry(x, weight, stride, padding, dilation, og, out_sz)
            cout = weight.shape[0]
            wm = _weight_matrix(weight, groups, geo.K)
            offv = offset.reshape(geo.B, og, geo.K, 3, geo.S)
            maskv = None if mask is None else mask.reshape(geo.B, og, geo.K, geo.S)
            sampler = _sampler(ext, geo, x, groups)
            # the output takes the input's memory format: channels-last rows (n, C_out) are what the GEMM yields
            channels_last = _is_channels_last(x)
            fused = sampler.fused
            out = x.new_empty(geo.B, geo.S, cout) if channels_last else x.new_empty(geo.B, cout, geo.S)
            if fused:
                sampler.fused_forward(offv, maskv, wm, out, chunk, channels_first=not channels_last)
                if bias is not None:
                    out += bias if channels_last else bias[:, None]
            for b, s0, s1 in () if fused else _chunks(geo, chunk):
                cols = sampler.columns(offv, maskv, b, s0, s1)  # (n, K*C_in)
                res = torch.bmm(_group_cols(cols, groups, geo.K), wm)  # (g, n, C_out/g)
                res = res.permute(1, 0, 2).reshape(s1 - s0, cout)
                if bias is not None:
                    res = res + bias
                if channels_last:
                    out[b, s0:s1].copy_(res)
                else:
                    out[b, :, s0:s1].copy_(res.t())
        # the compiled sampler's channels-last copy of x serves the backward too (a channels-last view of x)
        ctx.save_for_backward(sampler.x_cl.permute(0, 4, 1, 2, 3) if ext is not None else x, offset, weight, mask)
        ctx.conf = (stride, padding, dilation, groups, og, out_sz, chunk, bias is not None, ext)
        if channels_last:
            return out.view(geo.B, *out_sz, cout).permute(0, 4, 1, 2, 3)
        return out.view(geo.B, cout, *out_sz)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, offset, weight, mask = ctx.saved_tensors
        stride, padding, dilation, groups, og, out_sz, chunk, has_bias, ext = ctx.conf
        need_x, need_off, need_w, need_b, need_m = ctx.needs_input_grad[:5]
        with torch.autocast(device_type=x.device.type, enabled=False):
            geo = Geometry(x, weight, stride, padding, dilation, og, out_sz)
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
            # laid out like the offsets / mask (channels-last from a channels-last offset conv: no copies); both
            # samplers write every entry of them, so they need no zero fill
            g_off = torch.empty_like(offv) if need_off else None
            g_mask = torch.empty_like(maskv) if (need_m and mask is not None) else None
            g_wm = wm.new_zeros(wm.shape) if need_w else None
            sampler = _sampler(ext, geo, x, groups, need_x)
            if sampler.fused:
                sampler.fused_backward(offv, maskv, wm, gout, g_off, g_mask, g_wm, chunk, channels_first=not grad_cl)
            for b, s0, s1 in () if sampler.fused else _chunks(geo, chunk):
                n = s1 - s0
                if grad_cl:
                    g_g = gout[b, s0:s1].reshape(n, groups, cout // groups).transpose(0, 1)  # (g, n, C_out/g)
                else:
                    g_g = gout[b, :, s0:s1].reshape(groups, cout // groups, n).transpose(1, 2)
                gcols = _ungroup_cols(torch.bmm(g_g, wm.transpose(1, 2)), K)  # (n, K*C_in)
                cols = sampler.backward_chunk(offv, maskv, gcols, b, s0, s1, need_w, g_off, g_mask)
                if need_w:
                    g_wm.baddbmm_(_group_cols(cols, groups, K).transpose(1, 2), g_g)
            grad_x = sampler.grad_input() if need_x else None
            grad_w = grad_b = None
            if need_w:
                cin_g = weight.shape[1]
                grad_w = g_wm.view(groups, K, cin_g, cout // groups).permute(0, 3, 2, 1).reshape(weight.shape)
            if need_b and has_bias:
                grad_b = gout.sum((0, 1) if grad_cl else (0, 2))
            grad_off = g_off.view(offset.shape) if need_off else None
            grad_m = g_mask.view(mask.shape) if g_mask is not None else None
        return grad_x, grad_off, grad_w, grad_b, grad_m, None, None, None, None, None, None, None, None
