"""Auxiliary network: 3D ResNet-34 encoder with a V-Net decoder and (by default) a MultiCURE block.

Following MCF (Wang et al., 2023), the paper pairs the predictive V-Net with a ResNet-based auxiliary network, and
puts the MultiCURE block into the auxiliary network, which receives the predictive network's uncertainty map.
MONAI's ``ResNet`` is a classifier (no skip outputs, 7x7x7 stride-2 stem, 64..512 channels -> ~63M parameters
in 3D for ResNet-34), so a slimmer segmentation encoder is written here:

* stem: one 3x3x3 conv - norm - act at full resolution (``features[0]`` channels, level 0),
* four ResNet layers of ``layers = (3, 4, 6, 3)`` BasicBlocks at ``features[1:]`` channels; the first block of
  each layer halves the resolution with a stride-2 3x3x3 conv and a stride-2 1x1x1 projection shortcut
  (levels 1..4),
* the V-Net decoder of :class:`multicure_monai.networks.vnet.VNetDecoder` (2x2x2 transposed conv up, additive
  skips, 3, 3, 2, 1 conv layers), dropout at the bottleneck and before the 1x1x1 classifier.

With the default widths ``(16, 32, 64, 128, 256)`` this has ~18M parameters (MultiCURE included).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Act, Norm
from monai.networks.layers.utils import get_act_layer

from multicure_monai.networks.vnet import VNetBase

__all__ = ["BasicBlock", "ResNetVNet"]


class BasicBlock(nn.Module):
    """ResNet basic block: conv3-norm-act, conv3-norm, plus (projected) shortcut, then act.

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the first conv (and of the 1x1x1 projection shortcut).
        act: MONAI activation type.
        norm: MONAI norm type.

    Shapes: ``(B, in_channels, *S) -> (B, out_channels, *S / stride)``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        act: str | tuple = Act.RELU,
        norm: str | tuple | None = Norm.BATCH,
    ) -> None:
        super().__init__()
        self.conv1 = Convolution(
            spatial_dims, in_channels, out_channels, strides=stride, kernel_size=3, act=act, norm=norm
        )
        self.conv2 = Convolution(spatial_dims, out_channels, out_channels, kernel_size=3, act=None, norm=norm)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = Convolution(
                spatial_dims, in_channels, out_channels, strides=stride, kernel_size=1, padding=0, act=None, norm=norm
            )
        self.act: nn.Module = get_act_layer(act) if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, *S) -> (B, C_out, *S / stride)``."""
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNetVNet(VNetBase):
    """ResNet-34 encoder + V-Net decoder (auxiliary network), with a MultiCURE block in the decoder by default.

    Args:
        spatial_dims: number of spatial dimensions (2 or 3; MultiCURE's deformable branch needs 3).
        in_channels: input channels.
        out_channels: number of classes.
        features: channels at levels 0..4 (stem, then one per ResNet layer).
        layers: BasicBlocks per ResNet layer (ResNet-34: ``(3, 4, 6, 3)``).
        act: MONAI activation type.
        norm: MONAI norm type.
        dropout: dropout probability at the bottleneck and before the classifier.
        feature_levels: decoder levels (0 = full resolution, 1 = 1/2, 2 = 1/4, 3 = 1/8) returned, projected to
            ``embed_dim`` channels, by ``forward(..., return_features=True)``.
        embed_dim: channels of the projected features.
        multicure: apply a :class:`MultiCURE` block to the decoder stage output at ``multicure_level``
            (``False``: plain ResNet-VNet, for ablation).
        multicure_level: decoder level of the MultiCURE block (0..3; 2: quarter resolution, the bundle's; 1: half,
            the paper's).
        multicure_form: :class:`MultiCURE` form, ``"authors"`` (the bundle's) or ``"paper"``.
        multicure_kwargs: extra keyword arguments of :class:`MultiCURE` (a ``form`` there wins).
        pad_to_multiple: pad inputs not divisible by 16 at the end of each axis and crop the outputs back.

    Forward: see :meth:`VNetBase.forward` (``x (B, C_in, H, W, D)``, optional ``uncertainty (B, 1, ...)``).

    Example::

        net = ResNetVNet(in_channels=1, out_channels=2)
        unc = (torch.rand(1, 1, 56, 56, 40) > 0.9).float()
        logits = net(torch.randn(1, 1, 56, 56, 40), unc)    # (1, 2, 56, 56, 40)
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        features: Sequence[int] = (16, 32, 64, 128, 256),
        layers: Sequence[int] = (3, 4, 6, 3),
        act: str | tuple = Act.RELU,
        norm: str | tuple | None = Norm.BATCH,
        dropout: float = 0.5,
        feature_levels: Sequence[int] = (0, 1, 2),
        embed_dim: int = 32,
        multicure: bool = True,
        multicure_level: int = 2,
        multicure_form: str | None = "authors",
        multicure_kwargs: dict | None = None,
        pad_to_multiple: bool = True,
    ) -> None:
        if len(features) != len(layers) + 1:
            raise ValueError(f"features needs len(layers) + 1 = {len(layers) + 1} entries, got {len(features)}.")
        super().__init__(
            spatial_dims,
            out_channels,
            tuple(features),
            decoder_convs=tuple(min(lvl + 1, 3) for lvl in range(len(layers))),  # (1, 2, 3, 3) for 4 levels
            act=act,
            norm=norm,
            dropout=dropout,
            feature_levels=feature_levels,
            embed_dim=embed_dim,
            multicure=multicure,
            multicure_level=multicure_level,
            multicure_form=multicure_form,
            multicure_kwargs=multicure_kwargs,
            pad_to_multiple=pad_to_multiple,
        )
        self.in_channels = in_channels
        self.stem = Convolution(spatial_dims, in_channels, features[0], kernel_size=3, act=act, norm=norm)
        res_layers = []
        for i, n_blocks in enumerate(layers):
            blocks = [
                BasicBlock(
                    spatial_dims,
                    features[i] if b == 0 else features[i + 1],
                    features[i + 1],
                    stride=2 if b == 0 else 1,
                    act=act,
                    norm=norm,
                )
                for b in range(n_blocks)
            ]
            res_layers.append(nn.Sequential(*blocks))
        self.res_layers = nn.ModuleList(res_layers)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder outputs ``(B, features[l], *S / 2**l)`` for levels ``l = 0..len(layers)``."""
        x = self.stem(x)
        skips = [x]
        for layer in self.res_layers:
            x = layer(x)
            skips.append(x)
        return skips
