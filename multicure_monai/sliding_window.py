"""Sliding-window inference parameterised by a voxel *stride*, as in the paper (section 3).

The paper states its inference windows as ``roi`` + ``stride`` (LA: ``112 x 112 x 80`` with stride
``18 x 18 x 4``; Pancreas: ``96^3`` with stride ``16^3``), whereas MONAI's
:class:`monai.inferers.SlidingWindowInferer` takes a fractional ``overlap`` and derives the scan interval as
``int(roi * (1 - overlap))`` (``monai.inferers.utils._get_scan_interval``). A "natural" conversion such as
``overlap = 1 - stride / roi`` is fragile under float rounding (``int(112 * (1 - (1 - 18 / 112)))`` may give
17), so :func:`stride_to_overlap` picks the overlap in the *middle* of the interval that maps onto the
requested stride (``1 - (stride + 0.5) / roi``, or exactly ``0`` when ``stride == roi``) and verifies the
round trip. :class:`StridedSlidingWindowInferer` is MONAI's inferer with that overlap, so bundle configs can
say ``"stride": [18, 18, 4]``; everything else (blending, padding, devices, batching) is MONAI's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.inferers import SlidingWindowInferer
from monai.utils import BlendMode, ensure_tuple

from multicure_monai.precision import parse_amp_dtype, autocast, log_precision, resolve_amp_dtype

__all__ = ["stride_to_overlap", "StridedSlidingWindowInferer"]


def _scan_interval(roi: int, overlap: float) -> int:
    """MONAI's scan-interval formula for one axis whose image is larger than the roi."""
    interval = int(roi * (1 - overlap))
    return interval if interval > 0 else 1


def stride_to_overlap(roi_size: Sequence[int] | int, stride: Sequence[int] | int) -> tuple[float, ...]:
    """Per-axis overlap for which MONAI's sliding window moves by exactly ``stride`` voxels.

    For every axis the returned ``overlap`` satisfies ``int(roi * (1 - overlap)) == stride`` (the formula of
    ``monai.inferers.utils._get_scan_interval`` for an image larger than the roi) and ``0 <= overlap < 1``
    (MONAI's admissible range). An integer ``roi_size`` or ``stride`` is broadcast to the length of the other
    argument (a 1-tuple when both are integers).

    Args:
        roi_size: window size per spatial axis, e.g. ``(112, 112, 80)``.
        stride: window step per spatial axis in voxels, e.g. ``(18, 18, 4)``; ``1 <= stride <= roi``.

    Returns:
        One overlap per spatial axis.

    Raises:
        ValueError: when the lengths differ, a size is not a positive integer, or ``stride`` is outside
            ``[1, roi]``.
    """
    rois, strides = ensure_tuple(roi_size), ensure_tuple(stride)
    if len(rois) == 1 and len(strides) > 1:
        rois = rois * len(strides)
    if len(strides) == 1 and len(rois) > 1:
        strides = strides * len(rois)
    if len(rois) != len(strides):
        raise ValueError(f"roi_size {tuple(rois)} and stride {tuple(strides)} must have the same length.")
    overlaps = []
    for axis, (roi, step) in enumerate(zip(rois, strides)):
        if int(roi) != roi or int(step) != step:
            raise ValueError(f"roi_size and stride must be integers, got roi={roi!r}, stride={step!r} (axis {axis}).")
        roi, step = int(roi), int(step)
        if roi < 1:
            raise ValueError(f"roi_size must be positive, got {roi} on axis {axis}.")
        if not 1 <= step <= roi:
            raise ValueError(
                f"stride must satisfy 1 <= stride <= roi_size, got stride={step}, roi={roi} (axis {axis})."
            )
        # int(roi * (1 - o)) == step  <=>  step <= roi * (1 - o) < step + 1: aim at the interval's middle.
        overlap = 0.0 if step == roi else 1.0 - (step + 0.5) / roi
        if _scan_interval(roi, overlap) != step:  # pragma: no cover - guarded against float surprises
            raise ValueError(f"could not represent stride {step} for roi {roi} as a MONAI overlap ({overlap!r}).")
        overlaps.append(overlap)
    return tuple(overlaps)


class StridedSlidingWindowInferer(SlidingWindowInferer):
    """:class:`monai.inferers.SlidingWindowInferer` configured by a voxel stride instead of an overlap.

    Example (LA, paper section 3)::

        inferer = StridedSlidingWindowInferer(roi_size=(112, 112, 80), stride=(18, 18, 4))
        logits = inferer(image, network)  # image: (B, C_in, H, W, D) -> logits: (B, C_out, H, W, D)

    Along an axis where the (padded) image is exactly the roi size MONAI uses a single window, whatever the
    stride; elsewhere windows start at ``0, stride, 2 * stride, ...`` and the last one is shifted to end at the
    image border (MONAI's ``dense_patch_slices``).

    Args:
        roi_size: window size per spatial axis (positive integers).
        stride: window step per spatial axis in voxels, ``1 <= stride <= roi_size``; an integer is broadcast.
        sw_batch_size: number of windows per network call.
        mode: blending of overlapping windows, ``"constant"`` (plain average, the authors' code) or
            ``"gaussian"``.
        amp: run the network under autocast in the precision of ``amp_dtype`` on the device the windows run on
            (see :mod:`multicure_monai.precision`); the blended output stays float32.
        amp_dtype: ``"auto"`` (float16 on CUDA, bfloat16 on a CPU with bf16, else float32), ``"bfloat16"``,
            ``"float16"`` or ``"float32"``.
        kwargs: any other :class:`monai.inferers.SlidingWindowInferer` argument except ``overlap``
            (``padding_mode``, ``sw_device``, ``device``, ``progress``, ...).

    Attributes:
        stride: the stride as a tuple of ints (one per spatial axis).
        overlap: the derived overlap passed to MONAI (see :func:`stride_to_overlap`).

    Raises:
        ValueError: for an invalid stride, or when ``overlap`` is passed as well.
    """

    def __init__(
        self,
        roi_size: Sequence[int] | int,
        stride: Sequence[int] | int,
        sw_batch_size: int = 1,
        mode: BlendMode | str = BlendMode.CONSTANT,
        amp: bool = False,
        amp_dtype: str | torch.dtype = "auto",
        **kwargs: Any,
    ) -> None:
        if "overlap" in kwargs:
            raise ValueError("StridedSlidingWindowInferer derives `overlap` from `stride`; do not pass both.")
        overlap = stride_to_overlap(roi_size, stride)
        rois, strides = ensure_tuple(roi_size), ensure_tuple(stride)
        n_axes = max(len(rois), len(strides))
        if len(rois) == 1 and len(strides) == 1:
            # both scalars: the number of spatial axes is unknown here, let MONAI broadcast the scalar overlap
            overlap_arg: Sequence[float] | float = overlap[0]
        else:
            overlap_arg = overlap
        super().__init__(roi_size=roi_size, sw_batch_size=sw_batch_size, overlap=overlap_arg, mode=mode, **kwargs)
        self.stride: tuple[int, ...] = tuple(int(s) for s in (strides * n_axes if len(strides) == 1 else strides))
        parse_amp_dtype(amp_dtype)  # a bad value fails at construction, not at the first image
        self.amp = bool(amp)
        self.amp_dtype = amp_dtype
        self._logged: set[str] = set()

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """MONAI's sliding window, the network calls under ``amp``'s autocast; the stitched output is float32.

        MONAI's evaluators autocast on CUDA only (``torch.autocast("cuda")``), so the autocast lives here, where
        validation, evaluation, inference and MONAI Label all pass; windows are blended in the input's dtype.
        """
        if not self.amp:
            return super().__call__(inputs, network, *args, **kwargs)
        device = self.sw_device if self.sw_device is not None else inputs.device
        dtype = resolve_amp_dtype(device, self.amp_dtype)
        if str(device) not in self._logged:
            self._logged.add(str(device))
            log_precision(device, dtype, self.amp_dtype, "sliding-window inference")
        with autocast(device, dtype):
            return super().__call__(inputs, network, *args, **kwargs)
