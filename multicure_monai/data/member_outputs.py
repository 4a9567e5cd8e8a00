"""Post-transform that takes a member-scoring ensemble output apart, so one validation pass scores three models.

:meth:`~multicure_monai.networks.ensemble.DualNetworkEnsemble.forward_members` stacks the ensemble's, the
predictive net's and the auxiliary net's log-probabilities along the channels. MONAI's
``SplitDimd`` splits into single channels only, so this transform splits into the three ``N``-channel parts.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from monai.config import KeysCollection
from monai.transforms import MapTransform

from multicure_monai.networks.ensemble import MEMBER_NAMES, split_members

__all__ = ["SplitMembersd"]


class SplitMembersd(MapTransform):
    """Split ``data[key]`` ``(3N, *S)`` into ``data[key]`` (ensemble) and ``data[key + "_predictive"]``,
    ``data[key + "_auxiliary"]`` (each ``(N, *S)``).

    Args:
        keys: keys of the stacked outputs (usually ``"pred"``).
        allow_missing_keys: do not raise on missing keys.
    """

    def __init__(self, keys: KeysCollection = "pred", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            parts = split_members(d[key], dim=0)
            d[key] = parts[MEMBER_NAMES[0]]
            for name in MEMBER_NAMES[1:]:
                d[f"{key}_{name}"] = parts[name]
        return d
