from __future__ import annotations

import math

import pytest
import torch

from multicure_monai.networks.padding import crop_to, pad_to_multiple
from multicure_monai.networks.resnet_vnet import ResNetVNet
from multicure_monai.networks.vnet import VNet


def _small(**kwargs) -> VNet:
    torch.manual_seed(0)
    return VNet(**{"features": 4, "multicure_form": "paper", **kwargs})


def test_default_parameter_count_matches_uamt_vnet():
    n = sum(p.numel() for p in VNet().parameters())
    assert abs(n - 9.4e6) / 9.4e6 < 0.1


def test_geometry():
    net = VNet()
    convs = [len(stage) for stage in net.enc_stages]
    assert convs == [1, 2, 3, 3, 3]
    assert [len(stage) for stage in net.decoder.stages] == [1, 2, 3, 3]
    assert [stage[0].conv.out_channels for stage in net.enc_stages] == [16, 32, 64, 128, 256]
    assert isinstance(net.decoder.bottleneck_dropout, torch.nn.Dropout3d) and net.decoder.bottleneck_dropout.p == 0.5
    assert isinstance(net.out_dropout, torch.nn.Dropout3d)


@pytest.mark.parametrize("size,out_channels", [((16, 16, 16), 2), ((20, 24, 28), 3), ((17, 16, 33), 2)])
def test_logits_shape(size, out_channels):
    net = _small(out_channels=out_channels).eval()
    with torch.no_grad():
        y = net(torch.randn(1, 1, *size))
    assert isinstance(y, torch.Tensor)
    assert y.shape == (1, out_channels, *size)


@pytest.mark.parametrize("size", [(16, 16, 16), (20, 24, 28)])
@pytest.mark.parametrize("levels,embed_dim", [((0, 1, 2), 32), ((3,), 8), ((2, 0), 16)])
def test_feature_shapes(size, levels, embed_dim):
    net = _small(feature_levels=levels, embed_dim=embed_dim).eval()
    assert len(net.projections) == len(levels)
    with torch.no_grad():
        y, feats = net(torch.randn(2, 1, *size), return_features=True)
    assert y.shape == (2, 2, *size)
    assert len(feats) == len(levels)
    for f, lvl in zip(feats, levels):
        assert f.shape == (2, embed_dim, *(math.ceil(s / 2**lvl) for s in size))


def test_padding_equals_running_on_padded_input():
    net = _small().eval()
    x = torch.randn(1, 1, 20, 24, 28)
    with torch.no_grad():
        y, feats = net(x, return_features=True)
        yp, featsp = net(pad_to_multiple(x, 16), return_features=True)
    assert torch.allclose(y, crop_to(yp, x.shape[2:]), atol=1e-5)
    for f, fp in zip(feats, featsp):
        assert torch.allclose(f, crop_to(fp, f.shape[2:]), atol=1e-5)


@pytest.mark.parametrize("value", ["deferred", 1.0])
def test_return_features_accepts_booleans_only(value):
    with pytest.raises(ValueError, match="return_features"):
        _small().eval()(torch.randn(1, 1, 16, 16, 16), return_features=value)


def test_no_padding_rejects_odd_sizes():
    net = _small(pad_to_multiple=False).eval()
    assert net(torch.randn(1, 1, 16, 16, 32)).shape == (1, 2, 16, 16, 32)
    with pytest.raises(ValueError):
        net(torch.randn(1, 1, 20, 16, 16))


def test_gradients_from_features_reach_encoder():
    net = _small().train()
    _, feats = net(torch.randn(2, 1, 16, 16, 16), return_features=True)
    sum((f * torch.randn_like(f)).sum() for f in feats).backward()
    first = net.enc_stages[0][0].conv.weight.grad
    bottleneck = net.enc_stages[4][0].conv.weight.grad
    assert first is not None and first.abs().sum() > 0
    assert bottleneck is not None and bottleneck.abs().sum() > 0
    assert net.out_conv.weight.grad is None  # features do not depend on the classifier


def test_eval_is_deterministic_and_traceable():
    net = _small().eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        y1, y2 = net(x), net(x)
        traced = torch.jit.trace(net, x)
        y3 = traced(x)
    assert torch.equal(y1, y2)
    assert torch.allclose(y1, y3, atol=1e-5)


@pytest.mark.parametrize("level,unc_size", [(0, (20, 24, 28)), (1, (20, 24, 28)), (2, (10, 12, 14))])
def test_multicure_uses_uncertainty(level, unc_size):
    net = _small(multicure=True, multicure_level=level, multicure_kwargs={"deformable": False}).eval()
    assert net.decoder.multicure.in_channels == 4 * 2**level
    x = torch.randn(1, 1, 20, 24, 28)
    torch.manual_seed(1)
    unc = torch.zeros(1, 1, *unc_size)
    unc[:, :, : unc_size[0] // 2] = 1.0  # first half of the volume uncertain
    with torch.no_grad():
        y0 = net(x)
        y_zero = net(x, torch.zeros_like(unc))
        y1 = net(x, unc)
        y2 = net(x, 1.0 - unc)
    assert y1.shape == y0.shape == (1, 2, 20, 24, 28)
    assert torch.allclose(y0, y_zero, atol=1e-5)
    assert not torch.allclose(y1, y0, atol=1e-4)
    assert not torch.allclose(y1, y2, atol=1e-4)


def test_uncertainty_ignored_without_multicure():
    net = _small().eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(net(x), net(x, torch.ones(1, 1, 16, 16, 16)))
    assert net.decoder.multicure is None


def test_2d():
    net = VNet(spatial_dims=2, features=4).eval()
    with torch.no_grad():
        y, feats = net(torch.randn(2, 1, 24, 40), return_features=True)
    assert y.shape == (2, 2, 24, 40)
    assert [f.shape[2:] for f in feats] == [(24, 40), (12, 20), (6, 10)]


@pytest.mark.parametrize("levels", [(0, 4), (1, 1), (-1,)])
def test_invalid_feature_levels(levels):
    with pytest.raises(ValueError):
        VNet(features=4, feature_levels=levels)


def test_deformable_multicure_in_decoder():
    net = _small(multicure=True, multicure_level=2).eval()
    assert net.decoder.multicure.deformable
    x = torch.randn(1, 1, 16, 16, 16)
    unc = torch.zeros(1, 1, 16, 16, 16)
    unc[..., :8] = 1.0
    with torch.no_grad():
        y0, y1 = net(x), net(x, unc)
    assert y1.shape == (1, 2, 16, 16, 16)
    assert not torch.allclose(y0, y1, atol=1e-4)
