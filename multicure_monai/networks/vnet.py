"""Predictive V-Net (the UA-MT / MCF flavour) with multi-level projection heads and optional MultiCURE.

``monai.networks.nets.VNet`` follows the original V-Net (5x5x5 residual stages, PReLU, ELU, concatenation
skips, ~45M parameters). The semi-supervised LA/Pancreas literature that this paper builds on (UA-MT, MC-Net,
MCF) uses a much lighter variant: 3x3x3 conv-norm-act stages with 1, 2, 3, 3, 3 layers at 16..256 channels,
2x2x2 strided (transposed) convolutions for down/up-sampling, *additive* encoder-decoder skips and Dropout3d at
the bottleneck and before the classifier (~9.4M parameters). That network, plus what this project needs
(decoder features for deep contrastive supervision, a MultiCURE block fed with an uncertainty map, arbitrary ROI
sizes), is written here.

This module also holds :class:`VNetDecoder` and :class:`VNetBase`, shared with
:class:`multicure_monai.networks.resnet_vnet.ResNetVNet`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Act, Conv, Dropout, Norm

from multicure_monai.networks.multicure import MultiCURE, resize_uncertainty_map
from multicure_monai.networks.padding import crop_to, level_size, pad_to_multiple

SCRIPT_UNSUPPORTED = (
    "these networks cannot be compiled with torch.jit.script (the deformable convolution is a custom autograd "
    "function and the decoder indexes its levels at run time); export them by tracing at the sliding-window "
    "size instead: python -m monai.bundle ckpt_export network_def --config_file bundle/configs/inference.yaml "
    "--ckpt_file bundle/models/model.pt --filepath model.ts --use_trace True --input_shape \"[1, 1, *roi_size]\""
)

__all__ = ["ConvStage", "VNetDecoder", "VNetBase", "VNet", "SCRIPT_UNSUPPORTED"]


class ConvStage(nn.Sequential):
    """``num_convs`` stacked 3x3x3 conv - norm - act layers (the first maps ``in_channels`` to ``out_channels``).

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: input channels.
        out_channels: output channels.
        num_convs: number of conv layers (>= 1).
        act: MONAI activation type.
        norm: MONAI norm type.

    Shapes: ``(B, in_channels, *S) -> (B, out_channels, *S)``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        num_convs: int,
        act: str | tuple = Act.RELU,
        norm: str | tuple | None = Norm.BATCH,
    ) -> None:
        if num_convs < 1:
            raise ValueError(f"num_convs must be >= 1, got {num_convs}.")
        layers = [
            Convolution(
                spatial_dims, in_channels if i == 0 else out_channels, out_channels, kernel_size=3, act=act, norm=norm
            )
            for i in range(num_convs)
        ]
        super().__init__(*layers)


class VNetDecoder(nn.Module):
    """V-Net style decoder: transposed-conv up, additive skip, conv stage; optional MultiCURE at one level.

    Args:
        spatial_dims: number of spatial dimensions.
        channels: channels of the encoder outputs per level, ``(c_0, ..., c_L)`` (level ``L`` is the bottleneck).
        num_convs: conv layers of the decoder stage at each level ``0 .. L-1``.
        act: MONAI activation type.
        norm: MONAI norm type.
        dropout: Dropout3d/2d probability applied to the bottleneck features.
        multicure_level: decoder level whose stage output goes through a :class:`MultiCURE` block, or ``None``.
        multicure_kwargs: extra keyword arguments of :class:`MultiCURE` (its ``norm``/``act`` default to ours).

    Forward: ``skips`` (``skips[l]`` of shape ``(B, c_l, *S / 2**l)``, ``l = 0..L``) and an optional uncertainty
    map (``(B, 1, *S)``) -> list of decoder stage outputs, ``out[l]`` of shape ``(B, c_l, *S / 2**l)``,
    ``l = 0..L-1``.
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: Sequence[int],
        num_convs: Sequence[int],
        act: str | tuple = Act.RELU,
        norm: str | tuple | None = Norm.BATCH,
        dropout: float = 0.0,
        multicure_level: int | None = None,
        multicure_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        num_levels = len(channels) - 1
        if len(num_convs) != num_levels:
            raise ValueError(f"num_convs needs {num_levels} entries (one per decoder level), got {len(num_convs)}.")
        if multicure_level is not None and not 0 <= multicure_level < num_levels:
            raise ValueError(f"multicure_level must be in [0, {num_levels - 1}], got {multicure_level}.")
        self.num_levels = num_levels
        self.multicure_level = multicure_level
        self.bottleneck_dropout = Dropout[Dropout.DROPOUT, spatial_dims](dropout)
        self.ups = nn.ModuleList(
            [
                Convolution(
                    spatial_dims,
                    channels[lvl + 1],
                    channels[lvl],
                    strides=2,
                    kernel_size=2,
                    padding=0,
                    output_padding=0,
                    is_transposed=True,
                    act=act,
                    norm=norm,
                )
                for lvl in range(num_levels)
            ]
        )
        self.stages = nn.ModuleList(
            [
                ConvStage(spatial_dims, channels[lvl], channels[lvl], num_convs[lvl], act, norm)
                for lvl in range(num_levels)
            ]
        )
        self.multicure: MultiCURE | None = None
        if multicure_level is not None:
            kwargs = {"norm": norm, "act": act}
            kwargs.update(multicure_kwargs or {})
            c = channels[multicure_level]
            self.multicure = MultiCURE(spatial_dims, c, c, **kwargs)

    def forward(self, skips: Sequence[torch.Tensor], uncertainty: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Decode.

        Args:
            skips: encoder outputs per level (``L + 1`` tensors, finest first).
            uncertainty: optional binary map ``(B, 1, *spatial)``; used only by the MultiCURE block.

        Returns:
            Decoder stage outputs per level ``0 .. L-1`` (finest first).
        """
        if len(skips) != self.num_levels + 1:
            raise ValueError(f"expected {self.num_levels + 1} skip tensors, got {len(skips)}.")
        x = self.bottleneck_dropout(skips[-1])
        outs: list[torch.Tensor] = [x] * self.num_levels
        for lvl in range(self.num_levels - 1, -1, -1):
            x = self.ups[lvl](x) + skips[lvl]
            x = self.stages[lvl](x)
            if self.multicure is not None and lvl == self.multicure_level:
                x = self.multicure(x, uncertainty)
            outs[lvl] = x
        return outs


class VNetBase(nn.Module):
    """Shared machinery of the V-Net style networks: padding, decoder, classifier, projection heads.

    Subclasses call ``super().__init__`` and then build their encoder, implementing :meth:`encode`, which maps the
    (padded) input ``(B, C_in, *S)`` to ``len(channels)`` feature maps, level ``l`` of shape
    ``(B, channels[l], *S / 2**l)``.

    Args:
        spatial_dims: number of spatial dimensions.
        out_channels: number of output classes.
        channels: channels per resolution level, finest first (``len - 1`` = number of down-samplings).
        decoder_convs: conv layers of the decoder stage at each level ``0 .. len(channels) - 2``.
        act: MONAI activation type.
        norm: MONAI norm type.
        dropout: dropout probability at the bottleneck and before the 1x1x1 classifier.
        feature_levels: decoder levels returned by ``forward(..., return_features=True)``.
        embed_dim: channels of each projected feature map.
        multicure: insert a :class:`MultiCURE` block after the decoder stage at ``multicure_level``.
        multicure_level: decoder level of the MultiCURE block (2: quarter resolution, the bundle's; 1: the paper's).
        multicure_form: :class:`MultiCURE` form, ``"authors"`` (the bundle's), ``"paper"`` or ``None`` (as given).
        multicure_kwargs: extra keyword arguments of :class:`MultiCURE` (a ``form`` there wins).
        pad_to_multiple: pad inputs whose size is not divisible by ``2 ** (len(channels) - 1)`` and crop back.
    """

    def __init__(
        self,
        spatial_dims: int,
        out_channels: int,
        channels: Sequence[int],
        decoder_convs: Sequence[int],
        act: str | tuple = Act.RELU,
        norm: str | tuple | None = Norm.BATCH,
        dropout: float = 0.5,
        feature_levels: Sequence[int] = (0, 1, 2),
        embed_dim: int = 32,
        multicure: bool = False,
        multicure_level: int = 2,
        multicure_form: str | None = "authors",
        multicure_kwargs: dict | None = None,
        pad_to_multiple: bool = True,
    ) -> None:
        super().__init__()
        num_levels = len(channels) - 1
        levels = tuple(int(lvl) for lvl in feature_levels)
        if len(set(levels)) != len(levels) or any(not 0 <= lvl < num_levels for lvl in levels):
            raise ValueError(f"feature_levels must be distinct values in [0, {num_levels - 1}], got {feature_levels}.")
        self.spatial_dims = spatial_dims
        self.out_channels = out_channels
        self.channels = tuple(channels)
        self.feature_levels = levels
        self.embed_dim = embed_dim
        self.divisor = 2**num_levels
        self.pad_to_multiple = pad_to_multiple
        self.use_multicure = multicure
        self.decoder = VNetDecoder(
            spatial_dims,
            channels,
            decoder_convs,
            act=act,
            norm=norm,
            dropout=dropout,
            multicure_level=multicure_level if multicure else None,
            multicure_kwargs={"form": multicure_form, **(multicure_kwargs or {})},
        )
        self.out_dropout = Dropout[Dropout.DROPOUT, spatial_dims](dropout)
        conv_type = Conv[Conv.CONV, spatial_dims]
        self.out_conv = conv_type(channels[0], out_channels, kernel_size=1)
        self.projections = nn.ModuleList([conv_type(channels[lvl], embed_dim, kernel_size=1) for lvl in levels])

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder outputs per level, finest first (see class docstring); implemented by subclasses."""
        raise NotImplementedError

    def __prepare_scriptable__(self) -> VNetBase:
        """``torch.jit.script`` stops here with what to do: the nets export by tracing, not scripting."""
        raise RuntimeError(SCRIPT_UNSUPPORTED)

    def forward(
        self,
        x: torch.Tensor,
        uncertainty: torch.Tensor | None = None,
        return_features: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Segment ``x``.

        Args:
            x: image of shape ``(B, C_in, H, W, D)``; any size if ``pad_to_multiple`` (else divisible by 16).
            uncertainty: optional binary uncertainty map ``(B, 1, H_u, W_u, D_u)`` for the MultiCURE block; a map
                at another resolution than ``x`` is taken to cover the same field of view and resized to
                ``(H, W, D)`` first (max-pool / nearest). Ignored when the net has no MultiCURE block.
            return_features: also return the projected decoder features (for
                :class:`~multicure_monai.losses.PrototypeContrastiveLoss`).

        Returns:
            logits ``(B, out_channels, H, W, D)``; or, with ``return_features``, ``(logits, features)`` where
            ``features[i]`` (level ``l = feature_levels[i]``) has shape
            ``(B, embed_dim, ceil(H / 2**l), ceil(W / 2**l), ceil(D / 2**l))``.
        """
        spatial = tuple(x.shape[2:])
        if self.pad_to_multiple:
            x = pad_to_multiple(x, self.divisor)
        elif any(s % self.divisor for s in spatial):
            raise ValueError(
                f"input spatial size {spatial} is not divisible by {self.divisor}; use pad_to_multiple=True."
            )
        if uncertainty is not None and self.use_multicure:
            if tuple(uncertainty.shape[2:]) != spatial:
                uncertainty = resize_uncertainty_map(uncertainty, spatial)
            uncertainty = pad_to_multiple(uncertainty, self.divisor) if self.pad_to_multiple else uncertainty
        else:
            uncertainty = None
        decoded = self.decoder(self.encode(x), uncertainty)
        logits = crop_to(self.out_conv(self.out_dropout(decoded[0])), spatial)
        if not return_features:
            return logits
        if return_features is not True:
            raise ValueError(f"return_features must be False or True, got {return_features!r}.")
        sizes = [level_size(spatial, lvl) for lvl in self.feature_levels]
        # crop, then project: the 1x1x1 projection commutes with the crop and runs on the kept voxels only
        levels = zip(self.feature_levels, self.projections, sizes)
        return logits, [proj(crop_to(decoded[lvl], s)) for lvl, proj, s in levels]


class VNet(VNetBase):
    """Predictive network: the light V-Net of UA-MT / MCF (~9.4M parameters at default settings).

    Encoder stages have 1, 2, 3, 3, 3 conv(3x3x3)-norm-act layers at ``features * (1, 2, 4, 8, 16)`` channels,
    joined by 2x2x2 stride-2 conv-norm-act; the decoder upsamples with 2x2x2 stride-2 transposed conv-norm-act,
    adds the encoder skip and runs 3, 3, 2, 1 conv layers at ``features * (8, 4, 2, 1)`` channels. Dropout is
    applied to the bottleneck and before the 1x1x1 classifier.

    Args:
        spatial_dims: number of spatial dimensions (2 or 3).
        in_channels: input channels.
        out_channels: number of classes.
        features: channels of the first stage (doubled at each of the 4 down-samplings).
        act: MONAI activation type.
        norm: MONAI norm type.
        dropout: dropout probability.
        feature_levels: decoder levels (0 = full resolution, 1 = 1/2, 2 = 1/4, 3 = 1/8) whose stage outputs are
            projected (one 1x1x1 conv per level) to ``embed_dim`` channels and returned with
            ``return_features=True``.
        embed_dim: channels of the projected features.
        multicure: apply a :class:`MultiCURE` block to the decoder stage output at ``multicure_level``.
        multicure_level: decoder level of the MultiCURE block (0..3; 2: quarter resolution, the bundle's; 1: half,
            the paper's).
        multicure_form: :class:`MultiCURE` form, ``"authors"`` (the bundle's) or ``"paper"``.
        multicure_kwargs: extra keyword arguments of :class:`MultiCURE` (a ``form`` there wins).
        pad_to_multiple: pad inputs not divisible by 16 at the end of each axis and crop the outputs back.

    Example::

        net = VNet(in_channels=1, out_channels=2)
        logits = net(torch.randn(1, 1, 56, 56, 40))                         # (1, 2, 56, 56, 40)
        logits, feats = net(torch.randn(1, 1, 56, 56, 40), return_features=True)
        # feats: (1, 32, 56, 56, 40), (1, 32, 28, 28, 20), (1, 32, 14, 14, 10)
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        features: int = 16,
        act: str | tuple = Act.RELU,
        norm: str | tuple | None = Norm.BATCH,
        dropout: float = 0.5,
        feature_levels: Sequence[int] = (0, 1, 2),
        embed_dim: int = 32,
        multicure: bool = False,
        multicure_level: int = 2,
        multicure_form: str | None = "authors",
        multicure_kwargs: dict | None = None,
        pad_to_multiple: bool = True,
    ) -> None:
        channels = tuple(features * 2**i for i in range(5))
        super().__init__(
            spatial_dims,
            out_channels,
            channels,
            decoder_convs=(1, 2, 3, 3),
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
        encoder_convs = (1, 2, 3, 3, 3)
        self.enc_stages = nn.ModuleList(
            [
                ConvStage(spatial_dims, in_channels if lvl == 0 else channels[lvl], channels[lvl], n, act, norm)
                for lvl, n in enumerate(encoder_convs)
            ]
        )
        self.downs = nn.ModuleList(
            [
                Convolution(
                    spatial_dims,
                    channels[lvl],
                    channels[lvl + 1],
                    strides=2,
                    kernel_size=2,
                    padding=0,
                    act=act,
                    norm=norm,
                )
                for lvl in range(4)
            ]
        )

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder outputs ``(B, features * 2**l, *S / 2**l)`` for levels ``l = 0..4``."""
        skips: list[torch.Tensor] = []
        for lvl, stage in enumerate(self.enc_stages):
            if lvl > 0:
                x = self.downs[lvl - 1](x)
            x = stage(x)
            skips.append(x)
        return skips
