"""Python glue of the compiled CPU kernels of the 3D deformable convolution (``implementation="compiled"``).

MONAI and torchvision have no *3D* deformable convolution and a compiled dependency (mmcv) is not an option, so
the package ships its own OpenMP C++ sampling kernels (``csrc/deform_conv3d_cpu.cpp``), compiled on first use by
:func:`multicure_monai.networks.deform_conv_extension.load_cpu_extension`. This module adapts them to the chunk
loop of :class:`multicure_monai.networks.deform_conv_chunked.DeformConv3dFunction`; they compute the same
function as the pure PyTorch ``"gather"`` path (:mod:`multicure_monai.networks.deform_conv_torch`), without its
gather / sort / scatter temporaries.

Entry points of the extension and when they run:

* ``fused_forward`` / ``fused_backward`` (one weight group, the case of MultiCURE's layer): the whole
  convolution in one call; blocks of ``min(chunk, FUSED_BLOCK)`` output voxels are sampled and multiplied by
  the weights while their columns are still in cache, so the columns never go through main memory.
* ``columns`` / ``backward`` (grouped convolutions, ``groups > 1``): one chunk of columns (forward) or one chunk's
  column gradient to the input / offset / mask gradients in one sweep (backward); chunk loop, grouping and
  GEMMs stay in PyTorch.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from multicure_monai.networks.deform_conv_torch import Geometry

__all__ = ["FUSED_BLOCK", "CompiledSampler"]

#: output voxels per block of the fused compiled CPU kernels (their columns, K*C_in values each, stay in cache)
FUSED_BLOCK: int = 64


def _ext_args(geo: Geometry) -> tuple:
    """Geometry arguments of the compiled kernels (see ``csrc/deform_conv3d_cpu.cpp``)."""
    return list(geo.ksz), list(geo.stride), list(geo.padding), list(geo.dilation), list(geo.out_sz)


class CompiledSampler:
    """Sampling with the compiled CPU kernels: a ``deform_conv_torch.ColumnSampler`` of the chunked Function.

    The input is copied once to channels-last ``(B, D, H, W, C_in)``; offsets and mask are passed as they are
    (the kernels take any strides).

    Args:
        ext: the extension module from ``load_cpu_extension()``.
        geo: the sampling geometry.
        x: input, (B, C_in, D, H, W), on CPU.
        groups: convolution groups; with one group the fused entry points are used (``fused`` is True).
        need_grad_x: allocate the input-gradient accumulator (backward only).
    """

    def __init__(
        self, ext: ModuleType, geo: Geometry, x: torch.Tensor, groups: int, need_grad_x: bool = False
    ) -> None:
        self.ext, self.geo = ext, geo
        self.fused = groups == 1
        self.x_cl = x.permute(0, 2, 3, 4, 1).contiguous()  # offsets / mask: the kernels take any strides
        self.g_x_cl = torch.zeros_like(self.x_cl) if need_grad_x else None

    def columns(self, offv: torch.Tensor, maskv: torch.Tensor | None, b: int, s0: int, s1: int) -> torch.Tensor:
        """Columns of output voxels ``s0:s1`` of item ``b``: extension ``columns`` (see ``ColumnSampler``)."""
        return self.ext.columns(self.x_cl, offv, maskv, *_ext_args(self.geo), b, s0, s1).view(s1 - s0, -1)

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
        """Backward of :meth:`columns` for one chunk, extension ``backward`` (see ``ColumnSampler``)."""
        cols = self.ext.backward(
            self.x_cl, offv, maskv, gcols.contiguous(), *_ext_args(self.geo), b, s0, s1, need_cols, self.g_x_cl,
            g_off, g_mask,
        )
        return cols.view(s1 - s0, -1) if need_cols else None

    def fused_forward(
        self,
        offv: torch.Tensor,
        maskv: torch.Tensor | None,
        wm: torch.Tensor,
        out: torch.Tensor,
        chunk: int,
        channels_first: bool = False,
    ) -> None:
        """Whole convolution without bias, one weight group (extension ``fused_forward``).

        Args:
            offv: offsets, (B, G_off, K, 3, S).
            maskv: None or mask, (B, G_off, K, S).
            wm: weight matrix, (1, K*C_in, C_out).
            out: written, contiguous (B, S, C_out), or (B, C_out, S) when ``channels_first``.
            chunk: chunk size; blocks of ``min(chunk, FUSED_BLOCK)`` output voxels.
            channels_first: the layout of ``out``.
        """
        self.ext.fused_forward(
            self.x_cl, offv, maskv, wm[0].contiguous(), *_ext_args(self.geo), out, channels_first,
            min(chunk, FUSED_BLOCK),
        )

    def fused_backward(
        self,
        offv: torch.Tensor,
        maskv: torch.Tensor | None,
        wm: torch.Tensor,
        gout: torch.Tensor,
        g_off: torch.Tensor | None,
        g_mask: torch.Tensor | None,
        g_wm: torch.Tensor | None,
        chunk: int,
        channels_first: bool = False,
    ) -> None:
        """Backward of :meth:`fused_forward` (extension ``fused_backward``).

        Accumulates into the input gradient (when allocated) and ``g_wm``, writes ``g_off`` / ``g_mask``, each
        when given.

        Args:
            offv: offsets, (B, G_off, K, 3, S).
            maskv: None or mask, (B, G_off, K, S).
            wm: weight matrix, (1, K*C_in, C_out).
            gout: output gradient, (B, S, C_out) rows, or (B, C_out, S) when ``channels_first``.
            g_off: None or offset gradient, (B, G_off, K, 3, S).
            g_mask: None or mask gradient, (B, G_off, K, S).
            g_wm: None or weight-matrix gradient, (1, K*C_in, C_out).
            chunk: chunk size; blocks of ``min(chunk, FUSED_BLOCK)`` output voxels.
            channels_first: the layout of ``gout``.
        """
        self.ext.fused_backward(
            self.x_cl, offv, maskv, wm[0].t().contiguous(), gout.contiguous(), *_ext_args(self.geo), self.g_x_cl,
            g_off, g_mask, None if g_wm is None else g_wm[0], channels_first, min(chunk, FUSED_BLOCK),
        )

    def grad_input(self) -> torch.Tensor:
        """The accumulated input gradient, (B, C_in, D, H, W) (a channels-last view)."""
        return self.g_x_cl.permute(0, 4, 1, 2, 3)
