"""Batch-level pad-to-multiple / crop-back helpers shared by the encoder-decoder networks.

The V-Net style networks of this package halve the resolution four times, so their input spatial size has to
be divisible by 16. MONAI's ``DivisiblePad`` is a (channel-first, un-batched) data transform that pads
symmetrically and records the operation in the meta dict; inside ``forward`` we need the reverse operation on
*batched* tensors, padding only at the end of each axis so that voxel ``(0, 0, 0)`` keeps its position and
cropping back is a plain slice (cheap and traceable). These few lines therefore live here instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["padded_size", "pad_to_multiple", "crop_to", "level_size"]


def padded_size(spatial_size: Sequence[int], multiple: int) -> tuple[int, ...]:
    """Smallest size ``>= spatial_size`` (per axis) that is divisible by ``multiple``.

    Args:
        spatial_size: spatial sizes, e.g. ``(H, W, D)``.
        multiple: the divisor (``2 ** num_downsamplings``).

    Returns:
        The padded spatial size.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}.")
    return tuple(int(math.ceil(s / multiple)) * multiple for s in spatial_size)


def pad_to_multiple(x: torch.Tensor, multiple: int, value: float = 0.0) -> torch.Tensor:
    """Pad the spatial axes of a batched tensor at their end up to the next multiple of ``multiple``.

    Args:
        x: tensor of shape ``(B, C, *spatial)``.
        multiple: the divisor.
        value: constant padding value.

    Returns:
        Tensor of shape ``(B, C, *padded_size(spatial, multiple))``; ``x`` itself if no padding is needed.
    """
    spatial = tuple(x.shape[2:])
    target = padded_size(spatial, multiple)
    if target == spatial:
        return x
    pads: list[int] = []
    # F.pad takes (last_axis_begin, last_axis_end, second_last_begin, ...)
    for s, t in zip(reversed(spatial), reversed(target)):
        pads.extend([0, t - s])
    return F.pad(x, pads, mode="constant", value=value)


def crop_to(x: torch.Tensor, spatial_size: Sequence[int]) -> torch.Tensor:
    """Crop the spatial axes of ``x`` to ``spatial_size``, keeping the origin (inverse of :func:`pad_to_multiple`).

    Args:
        x: tensor of shape ``(B, C, *spatial)`` with ``spatial >= spatial_size`` per axis.
        spatial_size: target spatial size.

    Returns:
        Tensor of shape ``(B, C, *spatial_size)`` in ``x``'s memory format: ``x`` itself when nothing is cropped,
        else one copy made by a negative constant pad. Its backward is a single pad of the gradient; slicing the
        axes one by one would return a view but chain one backward node per axis, each allocating and
        zero-filling a full-size gradient (and the convolution reading the view copies it anyway).

    Raises:
        ValueError: when ``spatial_size`` has another length than the spatial axes or exceeds them.
    """
    size = tuple(int(s) for s in x.shape[2:])
    target = tuple(int(s) for s in spatial_size)
    if size == target:
        return x
    if len(size) != len(target) or any(t > s for s, t in zip(size, target)):
        raise ValueError(f"cannot crop spatial size {size} to {target}.")
    pads: list[int] = []
    for s, t in zip(reversed(size), reversed(target)):  # F.pad lists the last axis first
        pads += [0, t - s]
    return F.pad(x, pads)


def level_size(spatial_size: Sequence[int], level: int) -> tuple[int, ...]:
    """Spatial size of a level-``level`` feature map for an (unpadded) input of size ``spatial_size``.

    A level-``l`` feature map covers the input at stride ``2 ** l``, so it keeps ``ceil(size / 2 ** l)``
    voxels per axis (the last voxel may straddle the padded border).

    Args:
        spatial_size: input spatial size.
        level: resolution level (0 = full resolution).

    Returns:
        The feature-map spatial size.
    """
    return tuple(int(math.ceil(s / (2**level))) for s in spatial_size)
