"""Per-voxel confidence, entropy and binary uncertainty maps of a prediction, as dictionary items to save.

The deployed model's softmax says where it is unsure; :class:`UncertaintyMapsd` turns it into three
single-channel images next to the prediction, carrying its metadata (so ``SaveImaged`` writes them on the input
image's grid): ``<key>_confidence`` (max class probability), ``<key>_entropy`` (normalised to ``[0, 1]``) and
``<key>_uncertain`` (1 where the confidence is below the threshold of training, the map MultiCURE receives).
MONAI has no transform for these maps; they reuse :mod:`multicure_monai.uncertainty`. :func:`uncertainty_map_savers`
writes them.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, SaveImaged

from multicure_monai.uncertainty import confidence, entropy, uncertainty_map

__all__ = ["UncertaintyMapsd", "MAP_NAMES", "uncertainty_map_savers"]

#: Suffixes of the written items, in order.
MAP_NAMES = ("confidence", "entropy", "uncertain")


class UncertaintyMapsd(MapTransform):
    """Add ``<key>_confidence``, ``<key>_entropy`` and ``<key>_uncertain`` ``(1, *S)`` maps from probabilities.

    Args:
        keys: items holding softmax probabilities ``(C, *S)`` (one decollated case; apply before the argmax).
        threshold: confidence below which a voxel is uncertain.
        maps: which of :data:`MAP_NAMES` to add.
        allow_missing_keys: don't raise for missing keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        threshold: float = 0.7,
        maps: Sequence[str] = MAP_NAMES,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        unknown = set(maps) - set(MAP_NAMES)
        if unknown:
            raise ValueError(f"maps must be among {MAP_NAMES}, got {sorted(unknown)}.")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}.")
        self.threshold = float(threshold)
        self.maps = tuple(maps)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            probs = d[key]
            plain = probs.as_tensor() if isinstance(probs, MetaTensor) else torch.as_tensor(probs)
            batch = plain.unsqueeze(0).float()  # (1, C, *S)
            values = {
                "confidence": lambda: confidence(batch),
                "entropy": lambda: entropy(batch, normalize=True),
                "uncertain": lambda: uncertainty_map(batch, self.threshold),
            }
            for name in self.maps:
                image = values[name]()[0]  # (1, *S)
                if isinstance(probs, MetaTensor):
                    image = MetaTensor(image, meta=dict(probs.meta), applied_operations=list(probs.applied_operations))
                d[f"{key}_{name}"] = image
        return d


def uncertainty_map_savers(
    maps: Sequence[str], output_dir: str, writer: Any = None, key: str = "pred"
) -> list[SaveImaged]:
    """One :class:`monai.transforms.SaveImaged` per map of :class:`UncertaintyMapsd`, next to the mask.

    Map ``m`` is read from ``<key>_<m>`` and written as ``<image>_<m>`` to ``output_dir`` on the item's own grid
    (no resampling, no per-case folder, no log line): ``uncertain`` as uint8, the others as float32.

    Args:
        maps: which of :data:`MAP_NAMES` to write, in order.
        output_dir: folder of the written images.
        writer: image writer class or name passed to ``SaveImaged`` (e.g. the bundle's atomic NIfTI writer);
            ``None``: MONAI's choice by extension.
        key: the probabilities' key that :class:`UncertaintyMapsd` was applied to.

    Returns:
        The transforms, in the order of ``maps``.
    """
    return [
        SaveImaged(
            keys=f"{key}_{m}",
            output_dir=output_dir,
            output_postfix=m,
            output_dtype=np.uint8 if m == "uncertain" else np.float32,
            resample=False,
            separate_folder=False,
            print_log=False,
            writer=writer,
        )
        for m in maps
    ]
