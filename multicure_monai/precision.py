"""Which reduced precision ``amp`` runs on a device: float16 on CUDA, bfloat16 on a CPU that has it.

MONAI's engines apply ``amp`` as ``torch.autocast("cuda", ...)`` only, so on a CPU ``amp`` did nothing, and the
float16 that suits CUDA is slow on CPUs (few have float16 arithmetic) while bfloat16 has oneDNN kernels on any
CPU with AVX-512 (native on ``avx512_bf16`` / AMX). ``amp_dtype="auto"`` picks per device:

* CUDA: float16 (with a gradient scaler in training, :func:`needs_grad_scaler`);
* CPU: bfloat16 where :func:`cpu_supports_bf16`, else float32 (autocast off, and the log says so);
* any other device: float32.

An explicit ``"bfloat16"`` or ``"float16"`` is honoured on every device, except bfloat16 on a CPU without it,
which runs float32 as well. Every caller logs the precision it runs once (:func:`log_precision`). The callers
(the trainer, BatchNorm recalibration, the sliding-window inferer) keep losses, metrics and BatchNorm statistics
in float32: autocast only wraps the networks' forward passes.

One float32 island is forced: on CPU the oneDNN bfloat16 weight gradient of a 3D convolution whose input is
smaller than the kernel along an axis (depth 2 under a 3x3x3 kernel: the deepest level of a V-Net on a 32^3 crop)
comes out wrong, up to inf (PyTorch 2.13's oneDNN; ``tests/test_precision.py`` checks the guarded gradient). The
trainer therefore runs such convolutions in float32 (:func:`guard_small_convolutions`); their maps are a few voxels
wide, so the float32 work is small.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from multicure_monai.errors import BundleInputError

__all__ = [
    "AMP_DTYPES",
    "cpu_supports_bf16",
    "parse_amp_dtype",
    "resolve_amp_dtype",
    "autocast",
    "needs_grad_scaler",
    "describe_precision",
    "log_precision",
    "SmallMapSafeConv3d",
    "guard_small_convolutions",
]

#: Values of the bundle's ``precision#amp_dtype``.
AMP_DTYPES = ("auto", "bfloat16", "float16", "float32")

_logger = logging.getLogger("multicure_monai.precision")


def cpu_supports_bf16() -> bool:
    """Whether oneDNN runs bfloat16 on this CPU (PyTorch's own test: AVX-512 BW/VL/DQ on x86, or Arm BF16).

    This is the test PyTorch's CPU autocast and oneDNN convolutions rely on; CPUs that pass it without
    ``avx512_bf16`` convert in software and may gain less (``benchmarks/train_step.py`` measures it).
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def parse_amp_dtype(amp_dtype: str | torch.dtype) -> torch.dtype | None:
    """``amp_dtype`` as a torch dtype, ``None`` for ``"auto"``; a :class:`BundleInputError` names a bad value."""
    name = _name(amp_dtype)
    if name not in AMP_DTYPES:
        raise BundleInputError(
            f"amp_dtype must be one of {AMP_DTYPES}, got {amp_dtype!r}: set it to auto (the bundle: "
            "--precision#amp_dtype auto; float16 on CUDA, bfloat16 on a CPU with bf16 support)."
        )
    return None if name == "auto" else getattr(torch, name)


def resolve_amp_dtype(device: str | torch.device, amp_dtype: str | torch.dtype = "auto") -> torch.dtype | None:
    """The autocast dtype of ``amp`` on ``device``; ``None`` means float32 (autocast off).

    Args:
        device: where the networks run.
        amp_dtype: one of :data:`AMP_DTYPES` (or a torch dtype).

    Raises:
        BundleInputError: for an ``amp_dtype`` outside :data:`AMP_DTYPES`.
    """
    dtype = parse_amp_dtype(amp_dtype)
    kind = torch.device(device).type
    if dtype is None:
        dtype = {"cuda": torch.float16, "cpu": torch.bfloat16}.get(kind)
    if dtype == torch.float32:
        return None
    if kind == "cpu" and dtype == torch.bfloat16 and not cpu_supports_bf16():
        return None
    if dtype is not None and not torch.amp.is_autocast_available(kind):
        return None
    return dtype


def autocast(device: str | torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """``torch.autocast`` on ``device``'s type with ``dtype``, disabled when ``dtype`` is ``None``."""
    kind = torch.device(device).type
    if dtype is None:
        return torch.autocast(kind if torch.amp.is_autocast_available(kind) else "cpu", enabled=False)
    return torch.autocast(kind, dtype=dtype)


def needs_grad_scaler(device: str | torch.device, dtype: torch.dtype | None) -> bool:
    """A gradient scaler is needed for float16 on CUDA only (bfloat16 has float32's exponent range)."""
    return dtype == torch.float16 and torch.device(device).type == "cuda"


def describe_precision(device: str | torch.device, dtype: torch.dtype | None, amp_dtype: str | torch.dtype) -> str:
    """One line naming the precision that runs on ``device``, and why float32 when ``amp`` asked for less."""
    kind = torch.device(device).type
    if dtype is not None:
        return f"{str(dtype).removeprefix('torch.')} autocast on {kind} (amp_dtype={_name(amp_dtype)})"
    if parse_amp_dtype(amp_dtype) == torch.float32:
        return f"float32 on {kind} (amp_dtype=float32)"
    if kind == "cpu":
        return f"float32 on cpu: this CPU has no bfloat16 support (amp_dtype={_name(amp_dtype)})"
    return f"float32 on {kind}: no autocast for this device (amp_dtype={_name(amp_dtype)})"


def log_precision(
    device: str | torch.device, dtype: torch.dtype | None, amp_dtype: str | torch.dtype, who: str
) -> None:
    """Log, at INFO, which precision ``who`` (e.g. ``"training"``) runs."""
    _logger.info(f"{who} precision: {describe_precision(device, dtype, amp_dtype)}")


def _name(amp_dtype: str | torch.dtype) -> str:
    return str(amp_dtype).removeprefix("torch.")


class SmallMapSafeConv3d(nn.Conv3d):
    """:class:`torch.nn.Conv3d` that, under CPU autocast, runs in float32 on an input smaller than its kernel.

    The class :func:`guard_small_convolutions` gives existing ``nn.Conv3d`` modules (same parameters and state
    dict); outside CPU autocast, and on inputs at least the kernel's size, it is ``nn.Conv3d`` itself.
    """

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        small = any(s < k for s, k in zip(input.shape[2:], self.kernel_size))
        if small and input.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return super()._conv_forward(input.float(), weight.float(), None if bias is None else bias.float())
        return super()._conv_forward(input, weight, bias)


def guard_small_convolutions(*modules: nn.Module | None) -> int:
    """Make every plain ``nn.Conv3d`` in ``modules`` a :class:`SmallMapSafeConv3d` (in place; parameters kept).

    Returns:
        The number of convolutions converted.
    """
    count = 0
    for module in modules:
        for m in () if module is None else module.modules():
            if type(m) is nn.Conv3d:
                m.__class__ = SmallMapSafeConv3d
                count += 1
    return count
