from __future__ import annotations

import math

import pytest
import torch

from multicure_monai.networks.multicure import MultiCURE
from multicure_monai.networks.padding import crop_to, pad_to_multiple
from multicure_monai.networks.resnet_vnet import BasicBlock, ResNetVNet

SMALL = {"features": (4, 8, 8, 16, 16), "layers": (1, 1, 2, 1), "multicure_form": "paper"}  # groups of 16 need wider maps


def _small(deformable: bool = False, **kwargs) -> ResNetVNet:
    """Tiny net; the (CPU-slow) deformable branch only where a test is about it."""
    torch.manual_seed(0)
    return ResNetVNet(**{**SMALL, "multicure_kwargs": {"deformable": deformable}, **kwargs})


def _count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_default_parameter_count():
    net = ResNetVNet()
    assert abs(_count(net) - 18e6) / 18e6 < 0.1
    assert isinstance(net.decoder.multicure, MultiCURE) and net.decoder.multicure.deformable
    assert net.decoder.multicure.in_channels == 64  # decoder level 2 (quarter resolution), the bundle default
    plain = ResNetVNet(multicure=False)
    assert plain.decoder.multicure is None
    assert _count(net) - _count(plain) == _count(net.decoder.multicure)


def test_resnet34_encoder_geometry():
    net = ResNetVNet(features=(2, 4, 4, 8, 8), multicure=False)
    assert [len(layer) for layer in net.res_layers] == [3, 4, 6, 3]
    for layer in net.res_layers:
        blocks = list(layer)
        assert all(isinstance(b, BasicBlock) for b in blocks)
        assert blocks[0].conv1.conv.stride == (2, 2, 2)
        assert blocks[0].shortcut.conv.kernel_size == (1, 1, 1) and blocks[0].shortcut.conv.stride == (2, 2, 2)
        assert all(isinstance(b.shortcut, torch.nn.Identity) for b in blocks[1:])
    with torch.no_grad():
        skips = net.eval().encode(torch.randn(1, 1, 32, 16, 16))
    assert [tuple(s.shape) for s in skips] == [
        (1, c, 32 // 2**lvl, 16 // 2**lvl, 16 // 2**lvl) for lvl, c in enumerate((2, 4, 4, 8, 8))
    ]


def test_basic_block_identity_shortcut_is_residual():
    block = BasicBlock(3, 4, 4, act="relu", norm=None).eval()
    with torch.no_grad():
        block.conv2.conv.weight.zero_()
        block.conv2.conv.bias.zero_()
        x = torch.randn(1, 4, 4, 4, 4)
        assert torch.allclose(block(x), torch.relu(x))


@pytest.mark.parametrize("size", [(16, 16, 16), (20, 24, 28)])
@pytest.mark.parametrize("levels", [(0, 1, 2), (3, 1)])
def test_shapes(size, levels):
    net = _small(feature_levels=levels, embed_dim=8).eval()
    x = torch.randn(1, 1, *size)
    with torch.no_grad():
        y = net(x)
        y2, feats = net(x, return_features=True)
    assert isinstance(y, torch.Tensor) and y.shape == (1, 2, *size)
    assert torch.equal(y, y2)
    assert len(feats) == len(levels) == len(net.projections)
    for f, lvl in zip(feats, levels):
        assert f.shape == (1, 8, *(math.ceil(s / 2**lvl) for s in size))


def test_padding_equals_running_on_padded_input():
    net = _small().eval()
    x = torch.randn(1, 1, 20, 24, 28)
    unc = torch.zeros(1, 1, 20, 24, 28)
    unc[..., 5:12, 3:9, :] = 1.0
    with torch.no_grad():
        y = net(x, unc)
        yp = net(pad_to_multiple(x, 16), pad_to_multiple(unc, 16))
    assert torch.allclose(y, crop_to(yp, x.shape[2:]), atol=1e-5)


@pytest.mark.parametrize("deformable", [True, False])
def test_uncertainty_changes_output(deformable):
    net = _small(deformable=deformable).eval()
    x = torch.randn(1, 1, 16, 16, 12)
    unc = torch.zeros(1, 1, 16, 16, 12)
    unc[:, :, :8] = 1.0
    with torch.no_grad():
        y0 = net(x)
        assert torch.allclose(net(x, torch.zeros_like(unc)), y0, atol=1e-5)
        y1 = net(x, unc)
        y2 = net(x, 1.0 - unc)
        y_half = net(x, unc[..., ::2, ::2, ::2])  # a half-resolution map covering the same field of view
    assert not torch.allclose(y1, y0, atol=1e-4)
    assert not torch.allclose(y1, y2, atol=1e-4)
    assert torch.allclose(y_half, y1, atol=1e-5)  # block boundary aligned: same map at level 1
    plain = _small(multicure=False).eval()
    with torch.no_grad():
        assert torch.equal(plain(x), plain(x, unc))


def test_training_batch_one_gradients():
    net = _small(deformable=True).train()
    x = torch.randn(1, 1, 32, 16, 16)  # bottleneck 2x1x1: BatchNorm needs > 1 value per channel
    unc = (torch.rand(1, 1, 32, 16, 16) > 0.8).float()
    logits, feats = net(x, unc, return_features=True)
    loss = logits.square().mean() + sum(f.square().mean() for f in feats)
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
    assert net.stem.conv.weight.grad.abs().sum() > 0
    assert net.decoder.multicure.branch_deform[0].conv_offset.weight.grad.abs().sum() > 0


def test_features_alone_reach_encoder():
    net = _small().train()
    _, feats = net(torch.randn(2, 1, 16, 16, 16), return_features=True)
    sum((f * torch.randn_like(f)).sum() for f in feats).backward()
    assert net.stem.conv.weight.grad.abs().sum() > 0
    assert net.res_layers[-1][0].conv1.conv.weight.grad.abs().sum() > 0


def test_validation():
    with pytest.raises(ValueError):
        ResNetVNet(features=(4, 8, 16), layers=(1, 1, 1), multicure=False)
    with pytest.raises(ValueError):
        ResNetVNet(**SMALL, multicure_level=4)
