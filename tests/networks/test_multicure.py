from __future__ import annotations

import pytest
import torch

from multicure_monai.networks.multicure import MULTICURE_FORMS, MultiCURE, resize_uncertainty_map


@pytest.mark.parametrize(
    "src,dst",
    [((16, 16, 16), (8, 8, 8)), ((16, 12, 10), (5, 3, 7)), ((4, 4, 4), (8, 8, 8)), ((8, 4, 8), (4, 8, 4))],
)
def test_resize_keeps_uncertain_voxels_and_stays_binary(src, dst):
    torch.manual_seed(0)
    u = torch.zeros(2, 1, *src)
    u[0, 0, 3, 1, 2] = 1.0  # a single uncertain voxel must survive down-sampling
    u[1] = (torch.rand(1, *src) > 0.7).float()
    r = resize_uncertainty_map(u, dst)
    assert r.shape == (2, 1, *dst)
    assert set(r.unique().tolist()) <= {0.0, 1.0}
    assert r[0].sum() >= 1
    assert torch.all(resize_uncertainty_map(torch.zeros(1, 1, *src), dst) == 0)


def test_resize_is_block_max_for_integer_factors():
    torch.manual_seed(0)
    u = (torch.rand(1, 1, 8, 8, 8) > 0.9).float()
    expected = torch.nn.functional.max_pool3d(u, 2)
    assert torch.equal(resize_uncertainty_map(u, (4, 4, 4)), expected)
    assert resize_uncertainty_map(u, (8, 8, 8)) is u


@pytest.mark.parametrize("deformable", [False, True])
@pytest.mark.parametrize(
    "large_kernel,out_channels,unc_size",
    [("5x5x5", None, None), ("dilated", 6, (8, 8, 8)), ("5x5x5", 6, (16, 16, 16)), ("dilated", None, (4, 4, 4))],
)
def test_shapes_and_attention(deformable, large_kernel, out_channels, unc_size):
    torch.manual_seed(0)
    block = MultiCURE(3, 4, out_channels, large_kernel=large_kernel, deformable=deformable)
    x = torch.randn(2, 4, 8, 8, 8)
    unc = None if unc_size is None else (torch.rand(2, 1, *unc_size) > 0.5).float()
    out, attn = block(x, unc, return_attention=True)
    d = out_channels or 4
    assert out.shape == (2, d, 8, 8, 8)
    assert attn.shape == (2, 3, d)
    assert torch.all(attn >= 0)
    assert torch.allclose(attn.sum(dim=1), torch.ones(2, d), atol=1e-6)
    assert torch.equal(block(x, unc), out)  # return_attention only adds the weights


@pytest.mark.parametrize("reduction,min_hidden,d,expected", [(16, 16, 32, 16), (4, 4, 32, 24), (16, 2, 64, 12)])
def test_hidden_size(reduction, min_hidden, d, expected):
    block = MultiCURE(3, d, reduction=reduction, min_hidden=min_hidden, deformable=False)
    assert block.hidden == expected
    assert block.squeeze[0].in_features == 3 * d and block.squeeze[0].out_features == expected
    assert all(fc.out_features == d for fc in block.excite)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in block.modules())


@pytest.mark.parametrize("deformable", [False, True])
def test_batch_size_one_trains(deformable):
    block = MultiCURE(3, 4, deformable=deformable).train()
    x = torch.randn(1, 4, 6, 6, 6)
    out = block(x, (torch.rand(1, 1, 12, 12, 12) > 0.5).float())
    out.square().mean().backward()
    assert out.shape == (1, 4, 6, 6, 6)


def test_authors_form_trains_with_a_batch_of_one():
    """A batch of one uses the squeeze BatchNorm's running statistics, leaves them unchanged and still trains it."""
    torch.manual_seed(0)
    block = MultiCURE(3, 16, form="authors").train()
    block(torch.randn(4, 16, 4, 4, 4))  # batches of 2+ update the running statistics
    norm = block.squeeze[1]
    before = (norm.running_mean.clone(), norm.running_var.clone())
    x = torch.randn(1, 16, 4, 4, 4)
    out, attn = block(x, return_attention=True)
    out.square().mean().backward()
    assert torch.equal(norm.running_mean, before[0]) and torch.equal(norm.running_var, before[1])
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0
    # the attention equals the eval-mode attention (the branches' own BatchNorm3d still use the batch)
    s = block.mix(torch.cat([block.branch_small(x), block.branch_large(x), block.branch_deform(x)], 1)).mean((2, 3, 4))
    expected = torch.softmax(torch.stack([fc(block.squeeze.eval()(s)) for fc in block.excite], 1), dim=1)
    torch.testing.assert_close(attn, expected)


@pytest.mark.parametrize("deformable", [False, True])
def test_uncertainty_only_enters_branch_three(deformable):
    torch.manual_seed(0)
    block = MultiCURE(3, 4, deformable=deformable).eval()
    x = torch.randn(2, 4, 8, 8, 8)
    unc = (torch.rand(2, 1, 8, 8, 8) > 0.5).float()
    seen: dict[str, list[torch.Tensor]] = {"small": [], "large": [], "deform": []}
    hooks = [
        getattr(block, f"branch_{k}").register_forward_hook(lambda m, i, o, k=k: seen[k].append(o.detach()))
        for k in seen
    ]
    with torch.no_grad():
        out_none = block(x)
        out_zero = block(x, torch.zeros_like(unc))
        out_unc = block(x, unc)
    for h in hooks:
        h.remove()
    for k in seen:  # the map is added after the branch modules, which therefore never see it
        assert all(torch.equal(seen[k][0], t) for t in seen[k])
    assert torch.allclose(out_none, out_zero, atol=1e-6)
    assert not torch.allclose(out_none, out_unc, atol=1e-4)
    block.use_uncertainty = False
    with torch.no_grad():
        assert torch.allclose(block(x, unc), out_none, atol=1e-6)


def test_uncertainty_map_is_added_to_branch_three():
    """With attention forced onto branch 3 and a linear identity-like branch, z' moves by exactly the map."""
    torch.manual_seed(0)
    block = MultiCURE(3, 2, deformable=False, norm=None, act=None).eval()
    with torch.no_grad():
        for fc, bias in zip(block.excite, (-50.0, -50.0, 50.0)):
            fc.weight.zero_()
            fc.bias.fill_(bias)
    x = torch.randn(1, 2, 4, 4, 4)
    unc = (torch.rand(1, 1, 4, 4, 4) > 0.5).float()
    with torch.no_grad():
        diff = block(x, unc) - block(x)
    assert torch.allclose(diff, unc.expand_as(diff), atol=1e-5)


@pytest.mark.parametrize("deformable", [False, True])
def test_gradients_reach_all_branches(deformable):
    torch.manual_seed(0)
    block = MultiCURE(3, 4, deformable=deformable).train()
    x = torch.randn(2, 4, 6, 6, 6)
    out = block(x, (torch.rand(2, 1, 6, 6, 6) > 0.5).float())
    (out * torch.randn_like(out)).sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None, name
    for branch in ("branch_small", "branch_large", "branch_deform", "excite", "squeeze"):
        grads = [p.grad.abs().sum() for n, p in block.named_parameters() if n.startswith(branch)]
        assert sum(grads) > 0, branch
    if deformable:
        offset = [p for n, p in block.branch_deform.named_parameters() if "offset" in n]
        assert offset, "deformable conv exposes no offset parameters"
        assert sum(p.grad.abs().sum() for p in offset) > 0


def test_2d_and_validation():
    block = MultiCURE(2, 4, large_kernel="5x5", deformable=False)
    assert block(torch.randn(2, 4, 8, 8), torch.ones(2, 1, 16, 16)).shape == (2, 4, 8, 8)
    with pytest.raises(ValueError):
        MultiCURE(2, 4, deformable=True)
    with pytest.raises(ValueError):
        MultiCURE(3, 4, large_kernel="7x7x7", deformable=False)
    with pytest.raises(ValueError):
        MultiCURE(3, None)
    with pytest.raises(ValueError):
        MultiCURE(3, 4, deformable=False)(torch.randn(2, 4, 4, 4, 4), torch.ones(1, 1, 4, 4, 4))


def _parameters(form: str, d: int) -> int:
    """Hand count of the block's parameters for ``in_channels = out_channels = d`` (3x3x3 kernels: 27 taps)."""
    bn = 2 * d
    deform = (d * d * 27 + d) + (d * 81 * 27 + 81) + bn  # weight + bias, offset conv (3 x 27 outputs), norm
    if form == "paper":
        hidden = max(3 * d // 16, 16)
        static = (d * d * 27 + d + bn) + (d * d * 125 + d + bn)
        attention = (3 * d * hidden + hidden) + 3 * (hidden * d + d)
    else:
        hidden = max(d // 16, 32)
        static = 2 * (d * (d // 16) * 27 + d + bn)  # grouped (16) 3x3x3, plain and dilated
        attention = (3 * d * d + d) + (d * hidden + hidden + 2 * hidden) + 3 * (hidden * d + d)  # mix, squeeze+BN
    return static + deform + attention


@pytest.mark.parametrize("form", ["paper", "authors"])
@pytest.mark.parametrize("d", [32, 64])
def test_forms_parameter_counts_and_shapes(form, d):
    block = MultiCURE(3, d, **MULTICURE_FORMS[form])
    assert sum(p.numel() for p in block.parameters()) == _parameters(form, d)
    out, attn = block(torch.randn(2, d, 6, 6, 6), (torch.rand(2, 1, 12, 12, 12) > 0.8).float(), return_attention=True)
    assert out.shape == (2, d, 6, 6, 6) and attn.shape == (2, 3, d)
    torch.testing.assert_close(attn.sum(dim=1), torch.ones(2, d))


@pytest.mark.parametrize("form", ["paper", "authors"])
@pytest.mark.parametrize("deformable, use_uncertainty", [(True, True), (False, True), (True, False)])
def test_forms_gradients_reach_every_branch_and_the_ablations_work(form, deformable, use_uncertainty):
    torch.manual_seed(0)
    block = MultiCURE(3, 16, deformable=deformable, use_uncertainty=use_uncertainty, **MULTICURE_FORMS[form])
    x = torch.randn(2, 16, 6, 6, 6, requires_grad=True)
    u = (torch.rand(2, 1, 12, 12, 12) > 0.7).float()
    block(x, u).square().mean().backward()
    for name in ("branch_small", "branch_large", "branch_deform", "squeeze", "excite"):
        grads = [p.grad for p in getattr(block, name).parameters()]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), name
    if form == "authors":
        assert block.mix is not None and block.mix.weight.grad.abs().sum() > 0
    zero_map = block(x, torch.zeros_like(u))
    assert torch.equal(block(x, u), zero_map) != use_uncertainty  # the map matters only when used


def test_strided_resize_is_the_authors_max_pool():
    """Halving with max-pool (3, stride 2, padding 1); an exact factor of 4 halves twice."""
    torch.manual_seed(0)
    u = (torch.rand(1, 1, 16, 16, 8) > 0.9).float()
    pool = lambda t: torch.nn.functional.max_pool3d(t, 3, stride=2, padding=1)  # noqa: E731
    assert torch.equal(resize_uncertainty_map(u, (8, 8, 4), pool="strided"), pool(u))
    assert torch.equal(resize_uncertainty_map(u, (4, 4, 2), pool="strided"), pool(pool(u)))
    assert not torch.equal(pool(u), resize_uncertainty_map(u, (8, 8, 4)))  # the forms differ
    with pytest.raises(ValueError):
        resize_uncertainty_map(u, (8, 8, 4), pool="nearest")
