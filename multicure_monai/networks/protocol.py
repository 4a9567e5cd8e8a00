"""The interface each of the two nets offers the trainer and the deployed ensemble, and an adapter for others.

The two-network method calls a net as ``net(x, uncertainty=None, return_features=False)``: the auxiliary net (and
the predictive one in the authors' placement) takes the predictive net's binary uncertainty map for its MultiCURE
block, and the contrastive loss reads per-level decoder features. :class:`SegmentationNetwork` states that
interface; this package's :class:`~multicure_monai.networks.VNet` and :class:`~multicure_monai.networks.ResNetVNet`
implement it. :class:`SegmentationNetworkAdapter` lets any single-output MONAI segmentation network (``UNet``,
``SegResNet``, ...) stand in for either net: it ignores the map and has no features for the contrastive loss.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn as nn

__all__ = ["Features", "SegmentationNetwork", "SegmentationNetworkAdapter", "network_forward"]

#: What ``return_features`` hands over: one projected map ``(B, E, h, w, d)`` per decoder level.
Features = list[torch.Tensor]


@runtime_checkable
class SegmentationNetwork(Protocol):
    """A net of the two-network method.

    ``forward(x, uncertainty=None, return_features=False)``:

    * ``x``: image ``(B, C_in, H, W, D)``;
    * ``uncertainty``: binary map ``(B, 1, H, W, D)`` for a MultiCURE block, or ``None``; a net without a block
      ignores it;
    * ``return_features``: ``False`` returns logits ``(B, N, H, W, D)``; ``True`` returns ``(logits, features)``
      with :data:`Features` of projected tensors. An empty list means the net has no features for the contrastive
      loss.
    """

    def __call__(
        self, x: torch.Tensor, uncertainty: torch.Tensor | None = None, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, Features]: ...


def network_forward(
    net: nn.Module, x: torch.Tensor, uncertainty: torch.Tensor | None = None, features: bool = False
) -> tuple[torch.Tensor, Features | None]:
    """Call a :class:`SegmentationNetwork`: ``(logits, features or None)``."""
    kwargs: dict[str, Any] = {} if uncertainty is None else {"uncertainty": uncertainty}
    if not features:
        return net(x, **kwargs), None
    logits, feats = net(x, return_features=True, **kwargs)
    return logits, list(feats)


class SegmentationNetworkAdapter(nn.Module):
    """Any segmentation network ``net(x) -> logits`` as a :class:`SegmentationNetwork`.

    Args:
        network: e.g. ``monai.networks.nets.UNet(spatial_dims=3, in_channels=1, out_channels=2, ...)``; a net that
            returns a list or tuple (deep supervision) gives its first output.

    The uncertainty map is ignored (the net has no MultiCURE block) and ``return_features`` gives an empty feature
    list, so the contrastive loss skips this net. State dict keys are ``network.*``.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(
        self, x: torch.Tensor, uncertainty: torch.Tensor | None = None, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, Features]:
        """Logits ``(B, N, H, W, D)`` of the wrapped net; with ``return_features`` also ``[]``."""
        logits = self.network(x)
        if isinstance(logits, (list, tuple)):
            logits = logits[0]
        return (logits, []) if return_features else logits
