"""The nets' interface: the adapter for MONAI networks, network_forward, and the one two-net forward."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNet

from multicure_monai.networks.ensemble import DualNetworkEnsemble, split_members
from multicure_monai.networks.protocol import SegmentationNetworkAdapter, network_forward
from multicure_monai.networks.resnet_vnet import ResNetVNet
from multicure_monai.networks.two_nets import forward_two_nets
from multicure_monai.networks.vnet import VNet


def _unet() -> UNet:
    torch.manual_seed(0)
    return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=0)


class _DeepSupervision(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _unet()

    def forward(self, x):
        out = self.net(x)
        return [out, out[:, :, ::2, ::2, ::2]]


@pytest.mark.parametrize("inner", [_unet, _DeepSupervision])
def test_adapter_ignores_the_map_and_has_no_features(inner) -> None:
    net = SegmentationNetworkAdapter(inner())
    x = torch.randn(2, 1, 16, 16, 16)
    plain = net(x)
    assert plain.shape == (2, 2, 16, 16, 16)
    torch.testing.assert_close(net(x, uncertainty=torch.ones(2, 1, 16, 16, 16)), plain)
    logits, feats = net(x, return_features=True)
    torch.testing.assert_close(logits, plain)
    assert feats == [] and network_forward(net, x, features=True)[1] == []


def test_network_forward_returns_one_projected_map_per_level() -> None:
    torch.manual_seed(0)
    net, x = VNet(features=4, feature_levels=(0, 1)).eval(), torch.randn(1, 1, 16, 16, 16)
    _, feats = network_forward(net, x, features=True)
    assert [tuple(f.shape) for f in feats] == [(1, 32, 16, 16, 16), (1, 32, 8, 8, 8)]


@pytest.mark.parametrize("predictive_uses_uncertainty", [False, True])
def test_ensemble_and_trainer_couple_the_nets_the_same_way(predictive_uses_uncertainty: bool) -> None:
    """The deployed ensemble's member outputs are the log-softmax of the shared two-net forward's logits."""
    torch.manual_seed(0)
    pred = VNet(features=4, multicure=predictive_uses_uncertainty, multicure_level=1, multicure_form="paper")
    aux = ResNetVNet(features=(4, 8, 16, 32, 64), multicure=True, multicure_level=1, multicure_form="paper")
    ensemble = DualNetworkEnsemble(pred, aux, predictive_uses_uncertainty=predictive_uses_uncertainty).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        members = split_members(ensemble.forward_members(x), dim=1)
        out = forward_two_nets(pred, aux, x, 0.7, predictive_uses_uncertainty)
    torch.testing.assert_close(members["predictive"], torch.log_softmax(out.logits_p, dim=1), atol=1e-5, rtol=0)
    torch.testing.assert_close(members["auxiliary"], torch.log_softmax(out.logits_a, dim=1), atol=1e-5, rtol=0)


def test_ensemble_with_an_adapted_unet() -> None:
    ensemble = DualNetworkEnsemble(SegmentationNetworkAdapter(_unet()), SegmentationNetworkAdapter(_unet())).eval()
    with torch.no_grad():
        probs = ensemble(torch.randn(1, 1, 16, 16, 16)).exp()
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(1, 16, 16, 16))
