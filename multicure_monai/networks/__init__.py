"""Networks: the predictive V-Net, the auxiliary ResNet-VNet, the MultiCURE block and 3D deformable convolution."""

from __future__ import annotations

from .deform_conv import DeformConv3d, DeformConv3dPack, deform_conv3d
from .ensemble import DualNetworkEnsemble, EnsembleMembers
from .multicure import MultiCURE
from .resnet_vnet import ResNetVNet
from .vnet import VNet

__all__ = [
    "DeformConv3d",
    "DeformConv3dPack",
    "deform_conv3d",
    "DualNetworkEnsemble",
    "EnsembleMembers",
    "MultiCURE",
    "ResNetVNet",
    "VNet",
]
