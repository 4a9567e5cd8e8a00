"""MultiCURE: Multi-Branch Contextual Uncertainty Reduction block (Karimijafarbigloo et al., MIDL 2024, Sec. 2.1).

Three parallel branches look at the same feature map ``z`` (``B, C, H, W, D``) with different receptive fields:

* ``u1``: 3x3x3 conv - norm - act,
* ``u2``: 5x5x5 conv - norm - act (or, cheaper, a 3x3x3 conv with dilation 2, same 5x5x5 receptive field),
* ``u3``: 3x3x3 *deformable* conv - norm - act, to which the binary uncertainty map of the predictive network is
  **added** (broadcast over channels), so that uncertain voxels are accentuated where the deformable kernel samples.

The branches are fused with a selective-kernel style soft attention: ``q = [u1 || u2 || u3]`` is squeezed by
global average pooling to a ``3d`` vector, reduced by a linear layer to ``max(3d // r, min_hidden)`` (+ ReLU), and
expanded back by one linear layer per branch to ``d`` logits; a softmax across the three branches (per channel)
gives the weights ``K1, K2, K3`` and ``z' = u1 * K1 + u2 * K2 + u3 * K3``.

Two forms (:data:`MULTICURE_FORMS`, the bundle's ``multicure#form``):

=====================  =====================================  =============================================
                       ``paper`` (the text, default)          ``authors`` (their released ``SKLayer``)
=====================  =====================================  =============================================
static branches        dense 3x3x3 and 5x5x5                   grouped (16) 3x3x3, and 3x3x3 dilated 2
before the pooling     GAP of each branch, concatenated (3d)   branches concatenated, 1x1x1 conv to d, GAP
squeeze MLP            ``max(3d // 16, 16)``, ReLU             ``max(d // 16, 32)``, BatchNorm1d, ReLU
uncertainty map        adaptive max-pool to the feature size   max-pool 3, stride 2, padding 1 per halving
=====================  =====================================  =============================================

MONAI has selective-kernel style blocks only for 2D classification nets and no deformable convolution, so the
block is written here from MONAI ``Convolution``/``ADN`` pieces. The ``paper`` form has no BatchNorm in the
attention MLP; in the ``authors`` form's BatchNorm1d a training batch of one is normalised with the running
statistics (one sample has no batch variance).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import ADN, Convolution
from monai.networks.layers.factories import Act, Norm

from multicure_monai.networks.deform_conv import DeformConv3dPack

__all__ = ["MultiCURE", "MULTICURE_FORMS", "resize_uncertainty_map"]

#: What the arguments a form may set default to when neither they nor the form give a value (the paper's text).
_BASE_ARGUMENTS: dict = {"large_kernel": "5x5x5", "groups": 1, "mix_branches": False, "squeeze_norm": False,
                         "min_hidden": 16, "uncertainty_pool": "adaptive"}  # fmt: skip

#: Keyword arguments of :class:`MultiCURE` for each form (see the module docstring).
MULTICURE_FORMS: dict[str, dict] = {
    "paper": {},
    "authors": {
        "large_kernel": "dilated",
        "groups": 16,
        "mix_branches": True,
        "squeeze_norm": True,
        "min_hidden": 32,
        "uncertainty_pool": "strided",
    },
}


class _SqueezeBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d of the authors' attention MLP. A training batch of one has no batch variance, so it is normalised
    with the running statistics (left unchanged) instead of failing: MONAI Label trains from a single labelled
    image when a datastore has no unlabelled one. Same parameters and state-dict keys as ``nn.BatchNorm1d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


def resize_uncertainty_map(
    uncertainty: torch.Tensor, spatial_size: Sequence[int], pool: str = "adaptive"
) -> torch.Tensor:
    """Resize a binary uncertainty map to ``spatial_size`` without losing uncertain voxels.

    Axes that shrink are reduced with adaptive **max** pooling, so a feature voxel is marked uncertain as soon as any
    input voxel of the block it covers is uncertain (a nearest or average resize would drop thin uncertain
    boundaries, which are exactly the regions the block is meant to help). Axes that grow use nearest-neighbour
    upsampling, which keeps the map binary.

    ``pool="strided"`` (the authors' code) first halves the map with max-pooling (kernel 3, stride 2, padding 1)
    while every axis is at least twice the target, then resizes the rest as above.

    Args:
        uncertainty: map of shape ``(B, C, *spatial)`` (usually ``C = 1``, values in ``{0, 1}``).
        spatial_size: target spatial size, e.g. ``(H', W', D')``.
        pool: ``"adaptive"`` or ``"strided"``.

    Returns:
        Tensor of shape ``(B, C, *spatial_size)``, same dtype as ``uncertainty``.
    """
    src = tuple(int(s) for s in uncertainty.shape[2:])
    target = tuple(int(s) for s in spatial_size)
    if len(src) != len(target):
        raise ValueError(f"uncertainty has {len(src)} spatial dims, target size has {len(target)}.")
    if pool not in ("adaptive", "strided"):
        raise ValueError(f"pool must be 'adaptive' or 'strided', got {pool!r}.")
    if pool == "strided":
        strided = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[len(src)]
        while all(s >= 2 * t for s, t in zip(src, target)):
            uncertainty = strided(uncertainty, kernel_size=3, stride=2, padding=1)
            src = tuple(int(s) for s in uncertainty.shape[2:])
    if src == target:
        return uncertainty
    inter = tuple(min(s, t) for s, t in zip(src, target))
    if inter != src:
        pool = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}[len(src)]
        uncertainty = pool(uncertainty, inter)
    if inter != target:
        uncertainty = F.interpolate(uncertainty, size=target, mode="nearest")
    return uncertainty


class MultiCURE(nn.Module):
    """Multi-Branch Contextual Uncertainty Reduction block.

    Args:
        spatial_dims: number of spatial dimensions (the deformable branch requires 3).
        in_channels: channels of the input ``z``.
        out_channels: channels ``d`` of each branch and of the output; defaults to ``in_channels``.
        reduction: reduction ratio ``r`` of the attention MLP (hidden size ``3d / r``).
        min_hidden: lower bound of the hidden size, i.e. ``hidden = max(3 * d // r, min_hidden)``.
        large_kernel: ``"5x5x5"`` (``"5x5"`` in 2D) for a dense 5-wide kernel, or ``"dilated"`` for a 3-wide
            kernel with dilation 2 (same receptive field, ~5x fewer weights).
        norm: MONAI norm type for the branches.
        act: MONAI activation type for the branches.
        deformable: use a deformable 3x3x3 conv in branch 3; ``False`` uses a plain conv (ablation).
        use_uncertainty: add the uncertainty map to branch 3; ``False`` ignores any given map (ablation).
        offset_groups: offset groups of the deformable conv.
        bias: whether the branch convolutions have a bias.
        groups: groups of the two static branch convolutions (the authors' form: 16).
        mix_branches: concatenate the branches and mix them with a 1x1x1 conv to ``d`` channels before the
            global pooling (the authors' form), instead of pooling each branch (hidden size then from ``d``).
        squeeze_norm: BatchNorm1d in the attention MLP (the authors' form).
        uncertainty_pool: how the map is brought to the feature size, see :func:`resize_uncertainty_map`.
        form: ``"paper"`` or ``"authors"``: the arguments above that :data:`MULTICURE_FORMS` lists for the form
            take its values (passing another value for one of them is an error); ``None`` uses the arguments as
            given. Arguments left ``None`` take the form's value, else the paper's (``5x5x5``, ``groups=1``, no
            branch mixing or squeeze norm, ``min_hidden=16``, ``adaptive`` pooling).

    Example::

        block = MultiCURE(3, 32)
        z = torch.randn(2, 32, 16, 16, 16)
        u = (torch.rand(2, 1, 32, 32, 32) > 0.8).float()   # any resolution
        out, attn = block(z, u, return_attention=True)      # (2, 32, 16, 16, 16), (2, 3, 32)
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int | None = None,
        out_channels: int | None = None,
        reduction: int = 16,
        min_hidden: int | None = None,
        large_kernel: str | None = None,
        norm: str | tuple = Norm.BATCH,
        act: str | tuple = Act.RELU,
        deformable: bool = True,
        use_uncertainty: bool = True,
        offset_groups: int = 1,
        bias: bool = True,
        groups: int | None = None,
        mix_branches: bool | None = None,
        squeeze_norm: bool | None = None,
        uncertainty_pool: str | None = None,
        form: str | None = None,
    ) -> None:
        super().__init__()
        if form is not None and form not in MULTICURE_FORMS:
            raise ValueError(f"form must be one of {sorted(MULTICURE_FORMS)}, got {form!r}.")
        preset = MULTICURE_FORMS[form] if form is not None else {}
        given = {"large_kernel": large_kernel, "groups": groups, "mix_branches": mix_branches,
                 "squeeze_norm": squeeze_norm, "min_hidden": min_hidden, "uncertainty_pool": uncertainty_pool}  # fmt: skip
        clash = {k: v for k, v in given.items() if v is not None and k in preset and v != preset[k]}
        if clash:
            raise ValueError(f"form={form!r} sets {', '.join(f'{k}={preset[k]!r}' for k in clash)}, but "
                             f"{', '.join(f'{k}={v!r}' for k, v in clash.items())} was passed: drop the argument, "
                             "or pass form=None to give every argument yourself.")  # fmt: skip
        resolved = {k: v if v is not None else preset.get(k, _BASE_ARGUMENTS[k]) for k, v in given.items()}
        large_kernel, groups, min_hidden = resolved["large_kernel"], resolved["groups"], resolved["min_hidden"]
        mix_branches, squeeze_norm = resolved["mix_branches"], resolved["squeeze_norm"]
        uncertainty_pool = resolved["uncertainty_pool"]
        if in_channels is None or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels}.")
        if reduction < 1 or min_hidden < 1:
            raise ValueError("reduction and min_hidden must be >= 1.")
        if deformable and spatial_dims != 3:
            raise ValueError("the deformable branch is 3D only; use deformable=False for spatial_dims != 3.")
        d = in_channels if out_channels is None else out_channels
        if groups < 1 or in_channels % groups or d % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={d}.")
        if uncertainty_pool not in ("adaptive", "strided"):
            raise ValueError(f"uncertainty_pool must be 'adaptive' or 'strided', got {uncertainty_pool!r}.")
        self.uncertainty_pool = uncertainty_pool
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = d
        self.deformable = deformable
        self.use_uncertainty = use_uncertainty
        pooled = d if mix_branches else 3 * d
        self.hidden = max(pooled // reduction, min_hidden)

        def conv(kernel: int, dilation: int = 1, conv_groups: int = 1) -> Convolution:
            return Convolution(
                spatial_dims,
                in_channels,
                d,
                kernel_size=kernel,
                dilation=dilation,
                padding=dilation * (kernel - 1) // 2,
                act=act,
                norm=norm,
                bias=bias,
                groups=conv_groups,
            )

        self.branch_small = conv(3, conv_groups=groups)
        kind = large_kernel.lower()
        if kind in ("5x5x5", "5x5", "5"):
            self.branch_large = conv(5, conv_groups=groups)
        elif kind == "dilated":
            self.branch_large = conv(3, dilation=2, conv_groups=groups)
        else:
            raise ValueError(f"large_kernel must be '5x5x5' or 'dilated', got {large_kernel!r}.")

        if deformable:
            self.branch_deform: nn.Module = nn.Sequential(
                DeformConv3dPack(in_channels, d, kernel_size=3, padding=1, offset_groups=offset_groups, bias=bias),
                ADN(ordering="NA", in_channels=d, act=act, norm=norm, norm_dim=spatial_dims),
            )
        else:
            self.branch_deform = conv(3)

        conv_type = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]
        self.mix: nn.Module | None = conv_type(3 * d, d, kernel_size=1) if mix_branches else None
        squeeze: list[nn.Module] = [nn.Linear(pooled, self.hidden)]
        if squeeze_norm:
            squeeze.append(_SqueezeBatchNorm1d(self.hidden))
        self.squeeze = nn.Sequential(*squeeze, nn.ReLU())
        self.excite = nn.ModuleList([nn.Linear(self.hidden, d) for _ in range(3)])

    def forward(
        self,
        x: torch.Tensor,
        uncertainty: torch.Tensor | None = None,
        return_attention: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Apply the block.

        Args:
            x: features ``z`` of shape ``(B, C_in, H, W, D)``.
            uncertainty: optional binary uncertainty map ``(B, 1, H_u, W_u, D_u)`` (or ``(B, d, ...)``) at any
                resolution; it is resized to ``(H, W, D)`` with :func:`resize_uncertainty_map` (max-pool when
                shrinking, nearest when growing) and added to the deformable branch output.
            return_attention: also return the branch attention weights.

        Returns:
            ``z'`` of shape ``(B, d, H, W, D)``; with ``return_attention`` a tuple ``(z', K)`` where ``K`` has shape
            ``(B, 3, d)`` and sums to 1 over dim 1.
        """
        u1 = self.branch_small(x)
        u2 = self.branch_large(x)
        u3 = self.branch_deform(x)
        if uncertainty is not None and self.use_uncertainty:
            if uncertainty.shape[0] != x.shape[0] or uncertainty.shape[1] not in (1, self.out_channels):
                raise ValueError(
                    f"uncertainty must have shape (B={x.shape[0]}, 1, ...), got {tuple(uncertainty.shape)}."
                )
            unc = uncertainty.to(dtype=u3.dtype, device=u3.device)
            u3 = u3 + resize_uncertainty_map(unc, u3.shape[2:], self.uncertainty_pool)
        branches = (u1, u2, u3)
        if self.mix is not None:  # the authors' form: mix [u1 || u2 || u3] to d channels, then pool
            s = self.mix(torch.cat(branches, dim=1)).flatten(2).mean(dim=2)  # (B, d)
        else:  # global average pooling of q = [u1 || u2 || u3], per branch: q itself is never materialised
            s = torch.cat([u.flatten(2).mean(dim=2) for u in branches], dim=1)  # (B, 3d)
        k = self.squeeze(s)  # (B, hidden)
        logits = torch.stack([fc(k) for fc in self.excite], dim=1)  # (B, 3, d)
        attn = torch.softmax(logits, dim=1)
        shape = (x.shape[0], self.out_channels) + (1,) * self.spatial_dims
        out = attn[:, 0].reshape(shape) * u1 + attn[:, 1].reshape(shape) * u2 + attn[:, 2].reshape(shape) * u3
        if return_attention:
            return out, attn
        return out
