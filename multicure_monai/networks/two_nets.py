"""The two nets run together: the predictive net, its uncertainty map, the auxiliary net fed with that map.

One function for the trainer and for the deployed :class:`~multicure_monai.networks.DualNetworkEnsemble`, so
training and inference couple the nets the same way (written by hand: MONAI ensembles combine independent nets).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from multicure_monai.networks.protocol import Features, network_forward
from multicure_monai.uncertainty import uncertainty_map

__all__ = ["TwoNetOutput", "forward_two_nets"]


class TwoNetOutput(NamedTuple):
    """Both nets' outputs on one input ``(B, C, H, W, D)``.

    ``logits_p`` / ``logits_a`` ``(B, N, H, W, D)``; ``probs_p`` the predictive net's float32 softmax (the
    uncertainty map's source); ``feats_p`` / ``feats_a`` the nets' features when asked, else ``None``;
    ``logits_a`` is ``None`` when the auxiliary net was not run.
    """

    logits_p: torch.Tensor
    probs_p: torch.Tensor
    feats_p: Features | None
    logits_a: torch.Tensor | None
    feats_a: Features | None


def forward_two_nets(
    predictive: nn.Module,
    auxiliary: nn.Module,
    x: torch.Tensor,
    uncertainty_threshold: float = 0.7,
    predictive_uses_uncertainty: bool = False,
    features: tuple[bool, bool] = (False, False),
    run_auxiliary: bool = True,
) -> TwoNetOutput:
    """Run the predictive net, build its binary uncertainty map, run the auxiliary net on it.

    Args:
        predictive: the predictive :class:`~multicure_monai.networks.protocol.SegmentationNetwork`.
        auxiliary: the auxiliary one.
        x: image ``(B, C, H, W, D)``.
        uncertainty_threshold: confidence below which a voxel is uncertain.
        predictive_uses_uncertainty: the predictive net holds a MultiCURE block (the authors' placement): it gets
            the map of a first, gradient-free pass of itself.
        features: whether each net (predictive, auxiliary) also returns its features.
        run_auxiliary: ``False`` skips the auxiliary net (a deployment that weights it zero).

    Returns:
        :class:`TwoNetOutput`.
    """
    own_map = None
    if predictive_uses_uncertainty:
        with torch.no_grad():
            first = torch.softmax(predictive(x).float(), dim=1)
            own_map = uncertainty_map(first, uncertainty_threshold)
    logits_p, feats_p = network_forward(predictive, x, own_map, features[0])
    probs_p = torch.softmax(logits_p.float(), dim=1)
    if not run_auxiliary:
        return TwoNetOutput(logits_p, probs_p, feats_p, None, None)
    unc = uncertainty_map(probs_p, uncertainty_threshold)  # detached inside
    logits_a, feats_a = network_forward(auxiliary, x, unc, features[1])
    return TwoNetOutput(logits_p, probs_p, feats_p, logits_a, feats_a)
