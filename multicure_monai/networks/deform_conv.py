"""3D deformable convolution (DCNv1 / modulated DCNv2) for CPU and CUDA: public API and argument checks.

MultiCURE (Karimijafarbigloo et al., MIDL 2024, Sec. 2.1) uses a deformable convolution in its third branch.
Neither MONAI nor torchvision provides a *3D* deformable convolution, and compiled dependencies (mmcv) are not
an option, so it is written here: with plain tensor operations that run on CPU and CUDA alike, plus fused CPU
sampling kernels that ship as C++ source and are compiled on first use
(:mod:`multicure_monai.networks.deform_conv_extension`).

This module checks the arguments and dispatches; the implementations live in

* :mod:`multicure_monai.networks.deform_conv_chunked`: the memory-bounded chunked autograd Function (chunk loop,
  GEMMs, recompute in backward) shared by ``"gather"`` and ``"compiled"``;
* :mod:`multicure_monai.networks.deform_conv_torch`: the pure PyTorch sampling, ``"gather"`` (``embedding_bag``
  gathers, chunked) and ``"grid_sample"`` (one ``F.grid_sample`` call and one GEMM, not chunked);
* :mod:`multicure_monai.networks.deform_conv_compiled`: the glue of the compiled OpenMP C++ kernels.

``implementation="auto"`` (the default) picks ``"grid_sample"`` on CUDA (PyTorch's native sampling kernels are
much faster there than the gather path, and a ``torch.jit.trace`` records its plain tensor operations),
``"compiled"`` on CPU when the kernels build (on CPU the 3D
``grid_sample`` kernels are slower than the chunked gather), and ``"gather"`` otherwise; all three compute the
same function (the tests compare them in float64).

Out-of-volume samples read zeros (zero padding); every corner outside the volume contributes zero.

Offset layout: ``offset[:, 3 * (g * K + k) + a]`` is the displacement, in voxels, of kernel point ``k``
(raster order over ``(kd, kh, kw)``, the order of ``weight.reshape(C_out, C_in/groups, K)``) of offset group
``g`` along axis ``a`` (0: D, 1: H, 2: W). Mask layout: ``mask[:, g * K + k]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from multicure_monai.networks.deform_conv_chunked import DeformConv3dFunction, auto_chunk_size
from multicure_monai.networks.deform_conv_compiled import FUSED_BLOCK  # noqa: F401 - re-exported
from multicure_monai.networks.deform_conv_extension import EXTENSION_ENV, load_cpu_extension
from multicure_monai.networks.deform_conv_torch import deform_conv3d_grid_sample

__all__ = ["deform_conv3d", "DeformConv3d", "DeformConv3dPack", "DEFAULT_MEMORY_BUDGET", "IMPLEMENTATIONS"]

#: Default working-memory budget in bytes for one chunk of output voxels (forward or backward).
DEFAULT_MEMORY_BUDGET: int = 96 * 2**20

#: Accepted values of ``implementation``.
IMPLEMENTATIONS: tuple[str, ...] = ("auto", "gather", "grid_sample", "compiled")


def _triple(v: int | Sequence[int]) -> tuple[int, int, int]:
    """An int or a 3-sequence as a 3-tuple of ints (``nn.Conv3d``'s convention)."""
    if isinstance(v, int):
        return (v, v, v)
    t = tuple(int(i) for i in v)
    if len(t) != 3:
        raise ValueError(f"expected an int or a sequence of 3 ints, got {v}.")
    return t  # type: ignore[return-value]


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
        if input.device.type == "cuda" or torch.jit.is_tracing():  # TorchScript traces the plain tensor ops
            implementation = "grid_sample"
        elif input.device.type == "cpu":
            ext = load_cpu_extension()
    if implementation == "grid_sample":
        with torch.autocast(device_type=input.device.type, enabled=False):
            out = deform_conv3d_grid_sample(
                input.to(dt), cast(offset), cast(weight), cast(bias), cast(mask),
                stride, padding, dilation, groups, og, out_sz,
            )
        return out.to(orig)
    if chunk_size is None:
        chunk_size = auto_chunk_size(K * og, cin // og, torch.finfo(dt).bits // 8, memory_budget, ext is not None)
    out = DeformConv3dFunction.apply(
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
        """Number of kernel points ``K = kd*kh*kw``."""
        return self.kernel_size[0] * self.kernel_size[1] * self.kernel_size[2]

    def reset_parameters(self) -> None:
        """Same initialisation as ``nn.Conv3d``."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.num_kernel_points
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Deformable convolution of ``x`` with the given offsets (and mask).

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
        """Predict offsets (and mask) from ``x``, then convolve ``x`` with them.

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
