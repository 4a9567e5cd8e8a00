from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from multicure_monai.networks.ensemble import DualNetworkEnsemble
from multicure_monai.uncertainty import uncertainty_map
from multicure_monai.networks.resnet_vnet import ResNetVNet
from multicure_monai.networks.vnet import VNet


class _Fixed(nn.Module):
    """Returns pre-set logits; records the uncertainty argument it is called with."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.logits = logits
        self.calls: list[torch.Tensor | None] = []

    def forward(self, x: torch.Tensor, uncertainty: torch.Tensor | None = None) -> torch.Tensor:
        self.calls.append(uncertainty)
        return self.logits * self.scale


def _pair(seed: int = 0) -> tuple[_Fixed, _Fixed, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return _Fixed(3 * torch.randn(2, 3, 4, 5, 6, generator=g)), _Fixed(torch.randn(2, 3, 4, 5, 6, generator=g)), (
        torch.zeros(2, 1, 4, 5, 6)
    )


@pytest.mark.parametrize("weights", [(0.5, 0.5), (1.0, 0.0), (0.0, 1.0), (3.0, 1.0), (0.2, 0.2)])
def test_output_softmax_is_weighted_average(weights):
    pred, aux, x = _pair()
    ens = DualNetworkEnsemble(pred, aux, weights=weights)
    out = ens(x)
    w0, w1 = (w / sum(weights) for w in weights)
    expected = w0 * torch.softmax(pred.logits, 1) + w1 * torch.softmax(aux.logits, 1)
    assert out.shape == pred.logits.shape
    assert torch.allclose(torch.softmax(out, 1), expected, atol=1e-6)
    assert torch.allclose(out.exp(), expected, atol=1e-6)  # log-probabilities already
    assert torch.equal(out.argmax(1), expected.argmax(1))


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.9])
def test_auxiliary_receives_predictive_uncertainty(threshold):
    pred, aux, x = _pair()
    DualNetworkEnsemble(pred, aux, uncertainty_threshold=threshold, weights=(0.0, 1.0))(x)
    assert len(aux.calls) == 1
    unc = aux.calls[0]
    expected = (torch.softmax(pred.logits, 1).max(1, keepdim=True).values < threshold).float()
    assert unc.shape == (2, 1, 4, 5, 6)
    assert torch.equal(unc, expected)
    assert 0 < unc.sum() < unc.numel()
    assert torch.equal(uncertainty_map(torch.softmax(pred.logits, 1), threshold), expected)


def test_predictive_only_skips_auxiliary():
    pred, aux, x = _pair()
    DualNetworkEnsemble(pred, aux, weights=(1.0, 0.0))(x)
    assert aux.calls == [] and len(pred.calls) == 1


def test_state_dict_prefixes_and_gradients():
    pred, aux, x = _pair()
    ens = DualNetworkEnsemble(pred, aux)
    assert set(ens.state_dict()) == {"predictive.scale", "auxiliary.scale"}
    ens(x).sum().backward()
    assert pred.scale.grad is not None and aux.scale.grad is not None


@pytest.mark.parametrize("weights", [(-0.1, 1.0), (0.0, 0.0), (1.0,), (1.0, 1.0, 1.0)])
def test_invalid_weights(weights):
    pred, aux, _ = _pair()
    with pytest.raises(ValueError):
        DualNetworkEnsemble(pred, aux, weights=weights)


def test_with_real_networks():
    torch.manual_seed(0)
    pred = VNet(features=4).eval()
    aux = ResNetVNet(features=(4, 8, 8, 16, 16), layers=(1, 1, 1, 1), multicure_form="paper").eval()
    ens = DualNetworkEnsemble(pred, aux, uncertainty_threshold=0.99).eval()
    x = torch.randn(1, 1, 20, 16, 24)
    with torch.no_grad():
        out = ens(x)
        p = torch.softmax(pred(x), 1)
        a = torch.softmax(aux(x, uncertainty_map(p, 0.99)), 1)
    assert out.shape == (1, 2, 20, 16, 24)
    assert torch.allclose(torch.softmax(out, 1), 0.5 * (p + a), atol=1e-5)
    new = DualNetworkEnsemble(VNet(features=4), ResNetVNet(features=(4, 8, 8, 16, 16), layers=(1, 1, 1, 1), multicure_form="paper"))
    new.load_state_dict(ens.state_dict())
    new.predictive.load_state_dict(pred.state_dict())


@pytest.mark.parametrize("weights", [(0.5, 0.5), (1.0, 0.0), (0.0, 1.0)])
def test_members_output_holds_ensemble_and_each_net(weights):
    from multicure_monai.data.member_outputs import SplitMembersd
    from multicure_monai.networks.ensemble import EnsembleMembers, split_members

    pred, aux, x = _pair()
    ensemble = DualNetworkEnsemble(pred, aux, weights=weights)
    plain = ensemble(x)
    members = EnsembleMembers(ensemble)
    out = members(x)
    assert list(members.parameters()) == list(ensemble.parameters())  # the same module, the same weights
    assert out.shape == (2, 9, 4, 5, 6)
    parts = split_members(out, dim=1)
    torch.testing.assert_close(parts["ensemble"], plain)
    torch.testing.assert_close(parts["predictive"].exp(), torch.softmax(pred.logits, 1))
    # the auxiliary net always runs, fed with the predictive net's uncertainty map
    expected_unc = uncertainty_map(torch.softmax(pred.logits, 1), 0.7)
    torch.testing.assert_close(aux.calls[-1], expected_unc)
    torch.testing.assert_close(parts["auxiliary"].exp(), torch.softmax(aux.logits, 1))
    item = SplitMembersd(keys="pred")({"pred": out[0], "label": torch.zeros(1, 4, 5, 6)})
    torch.testing.assert_close(item["pred"], plain[0])
    torch.testing.assert_close(item["pred_auxiliary"], parts["auxiliary"][0])
    assert set(item) == {"pred", "pred_predictive", "pred_auxiliary", "label"}


def test_split_members_needs_three_parts():
    from multicure_monai.networks.ensemble import split_members

    with pytest.raises(ValueError, match="3N channels"):
        split_members(torch.zeros(4, 2, 2))


@pytest.mark.parametrize("uses", [False, True])
def test_predictive_gets_its_own_map_when_it_uses_uncertainty(uses):
    """The authors' placement: a first pass of the predictive net gives it its uncertainty map, as in training."""
    pred, aux, x = _pair()
    DualNetworkEnsemble(pred, aux, predictive_uses_uncertainty=uses)(x)
    expected = uncertainty_map(torch.softmax(pred.logits, 1), 0.7)
    if uses:
        assert len(pred.calls) == 2 and pred.calls[0] is None and torch.equal(pred.calls[1], expected)
    else:
        assert pred.calls == [None]


@pytest.mark.parametrize("members", [False, True])
def test_bf16_autocast_keeps_probabilities_float32(members):
    from multicure_monai.networks.ensemble import EnsembleMembers

    torch.manual_seed(0)
    pred = VNet(features=4).eval()
    aux = ResNetVNet(features=(4, 8, 8, 16, 16), layers=(1, 1, 1, 1), multicure_form="paper").eval()
    ens = DualNetworkEnsemble(pred, aux, uncertainty_threshold=0.7).eval()
    ens = EnsembleMembers(ens) if members else ens
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        ref = ens(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = ens(x)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    # bf16 keeps ~3 significant digits: the probabilities agree to a few hundredths
    torch.testing.assert_close(torch.softmax(low, 1), torch.softmax(ref, 1), atol=0.05, rtol=0)
