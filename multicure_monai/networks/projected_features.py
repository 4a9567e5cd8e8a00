"""Projected decoder features kept in factored form: a feature map and the 1x1x1 projection head to apply to it.

The prototype contrastive loss needs, per voxel, the L2 norm of the projected feature and, per class, sums of the
normalised features; only the few thousand sampled uncertain voxels need their projected feature itself. At the
full-resolution level the projection writes ``embed_dim`` channels for every voxel (64 MB for 2+2 crops of
56x56x40, 0.5 GB per net at 112x112x80) from a map of fewer channels. Handing the loss the map and the head
instead lets it compute exactly those quantities from the map (see
:class:`~multicure_monai.losses.PrototypeContrastiveLoss`) without ever writing the projected map. Anything else
calls :meth:`ProjectedFeatures.materialize`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from multicure_monai.networks.padding import crop_to

__all__ = ["ProjectedFeatures"]


class ProjectedFeatures(NamedTuple):
    """``weight @ hidden + bias`` over the channel axis, not yet computed.

    Attributes:
        hidden: feature map ``(B, C, *P)`` (any memory format).
        weight: projection matrix ``(E, C)`` (a 1x1x1 convolution's weight, flattened).
        bias: ``(E,)`` or ``None``.
        size: spatial size ``S`` of the features, the first ``S`` voxels per axis of ``hidden`` (a net that pads
            its input hands over the padded map and the size of the crop that undoes the padding, so the loss
            reads the kept voxels in place and nothing copies or pads back the whole map); ``None``: ``S = P``.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    size: tuple[int, ...] | None = None

    @property
    def shape(self) -> torch.Size:
        """Shape of the projected map, ``(B, E, *S)``."""
        spatial = self.hidden.shape[2:] if self.size is None else self.size
        return torch.Size((self.hidden.shape[0], self.weight.shape[0], *spatial))

    @property
    def ndim(self) -> int:
        return self.hidden.ndim

    def materialize(self) -> torch.Tensor:
        """The projected map ``(B, E, *S)``, as the 1x1x1 convolution computes it (same memory format as ``hidden``).

        Outside autocast a reduced-precision map (from a forward pass under autocast) is projected in the head's
        wider dtype, so a loss computed after the forward pass gets float32 features."""
        hidden = self.hidden if self.size is None else crop_to(self.hidden, self.size)
        dtype = torch.promote_types(hidden.dtype, self.weight.dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        out = F.linear(hidden.movedim(1, -1).to(dtype), self.weight.to(dtype), bias)
        return out.movedim(-1, 1)
