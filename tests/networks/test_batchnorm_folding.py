from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from multicure_monai.networks.batchnorm_folding import FoldedCopy, fold_batch_norm
from multicure_monai.networks.ensemble import DualNetworkEnsemble
from multicure_monai.networks.resnet_vnet import ResNetVNet
from multicure_monai.networks.vnet import VNet



def _randomise_norms(net: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorms with non-trivial statistics and affine parameters (fresh ones are the identity map)."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, _BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return net


def _aux() -> ResNetVNet:
    return ResNetVNet(features=(8, 8, 16, 16, 32), layers=(1, 1, 1, 1))  # MultiCURE (authors' form) at level 2


def _nets() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "vnet": VNet(features=4),
        "resnet_vnet_multicure": _aux(),
    }


def _count_norms(net: nn.Module) -> int:
    return sum(isinstance(m, _BatchNorm) for m in net.modules())


@pytest.mark.parametrize("name", ["vnet", "resnet_vnet_multicure"])
def test_folded_copy_computes_the_eval_function(name):
    net = _randomise_norms(_nets()[name]).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    unc = (torch.rand(2, 1, 16, 16, 16) > 0.5).float()
    before = copy.deepcopy(net.state_dict())
    folded = fold_batch_norm(net)
    with torch.no_grad():
        args = (x, unc) if name.startswith("resnet") else (x,)
        expected, got = net(*args), folded(*args)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
    assert _count_norms(folded) < _count_norms(net)  # the conv-BN pairs are gone (the attention BatchNorm1d stays)
    assert _count_norms(folded) <= 1
    assert not folded.training
    for k, v in net.state_dict().items():  # the original is untouched
        assert torch.equal(v, before[k])


def test_transposed_and_deformable_convolutions_fold():
    net = _randomise_norms(_nets()["resnet_vnet_multicure"]).eval()
    folded = fold_batch_norm(net)
    kinds = {type(m).__name__ for m in folded.modules() if hasattr(m, "weight") and isinstance(m, nn.Module)}
    assert {"ConvTranspose3d", "DeformConv3dPack"} <= kinds
    norms_before_deform = [s[1].N for s in net.modules() if isinstance(s, nn.Sequential) and len(s) == 2
                           and type(s[0]).__name__ == "DeformConv3dPack"]  # fmt: skip
    assert norms_before_deform and all(isinstance(n, _BatchNorm) for n in norms_before_deform)
    assert all(isinstance(s[1].N, nn.Identity) for s in folded.modules() if isinstance(s, nn.Sequential)
               and len(s) == 2 and type(s[0]).__name__ == "DeformConv3dPack")  # fmt: skip


@pytest.mark.parametrize("mode", ["grad", "train", "inference_tensors", "tracing"])
def test_cache_returns_the_module_where_folding_would_change_it(mode):
    net = _nets()["vnet"].eval()
    cache = FoldedCopy()
    if mode == "grad":
        assert cache.get(net) is net
        return
    if mode == "tracing":  # a traced graph must hold the module's own parameters (TorchScript export)
        seen = []
        net.register_forward_pre_hook(lambda m, i: seen.append(cache.get(m) is m))
        with torch.no_grad():
            torch.jit.trace(net, torch.randn(2, 1, 16, 16, 16), check_trace=False)
        assert seen and all(seen)
        return
    if mode == "train":
        net.train()
    if mode == "inference_tensors":
        with torch.inference_mode():
            net = VNet(features=4).eval()
    with torch.no_grad():
        assert cache.get(net) is net


def test_cache_follows_parameter_and_attribute_changes():
    net = _randomise_norms(_nets()["vnet"]).eval()
    cache = FoldedCopy()
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.inference_mode():
        first = cache.get(net)
        assert first is not net and cache.get(net) is first  # reused while nothing changes
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net.train()
    net(x).mean().backward()
    opt.step()  # in-place update of the weights and (train mode) of the BN statistics
    net.eval()
    with torch.inference_mode():
        second = cache.get(net)
        assert second is not first
        assert torch.allclose(second(x), net(x), atol=1e-5, rtol=1e-4)
        next(m for m in net.modules() if isinstance(m, nn.Dropout3d)).p = 0.3  # a submodule's plain attribute
        assert cache.get(net) is not second


def test_ensemble_folds_only_for_inference_and_drops_the_copy_when_pickled():
    nets = _nets()
    pred = _randomise_norms(nets["vnet"], seed=1)
    aux = _randomise_norms(_aux(), seed=2)
    folded = DualNetworkEnsemble(pred, aux).eval()
    plain = DualNetworkEnsemble(pred, aux, fold_batch_norm=False).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.inference_mode():
        out, ref = folded(x), plain(x)
        members, members_ref = folded.forward_members(x), plain.forward_members(x)
    assert folded._folded[0]._copy is not None and folded._folded[1]._copy is not None
    assert torch.allclose(out.exp(), ref.exp(), atol=1e-5)
    assert torch.allclose(members.exp(), members_ref.exp(), atol=1e-5)
    out = folded(x)  # gradients enabled: the original nets run, and they get the gradient
    out.mean().backward()
    for net, cache in zip((pred, aux), folded._folded):
        assert next(net.parameters()).grad is not None  # the first convolution's weight
        assert all(p.grad is None for p in cache._copy.parameters())
    clone = pickle.loads(pickle.dumps(folded))
    assert clone._folded[0]._copy is None and clone._folded[1]._copy is None
    assert copy.deepcopy(folded)._folded[1]._copy is None
