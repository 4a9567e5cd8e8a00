"""class_feature_sums: the fused projected-form function equals the direct computation, values and gradients, for
any slab size, on a padded map read through its crop size, in 2D and 3D."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from multicure_monai.losses.class_feature_sums import class_feature_sums
from multicure_monai.networks.padding import crop_to
from multicure_monai.networks.projected_features import ProjectedFeatures


def _direct(f: torch.Tensor, cls: torch.Tensor, num_slots: int, idx: torch.Tensor):
    """The definition: normalise every voxel's feature, sum per slot, read the rows."""
    n = f.movedim(1, -1).reshape(-1, f.shape[1])
    inv = 1.0 / n.norm(dim=1)
    w = F.one_hot(cls, num_slots + 1)[:, :num_slots].to(n.dtype) * inv.unsqueeze(1)
    return w.t() @ n, w.sum(dim=0), n[idx], inv[idx]


def _inputs(hidden: int, bias: bool, channels_last: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, hidden, 5, 4, 3, generator=g, dtype=torch.float64)
    if channels_last:
        h = h.contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(6, hidden, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64) if bias else None
    n = h.numel() // hidden
    cls = torch.randint(0, 4, (n,), generator=g)  # slots 0..2, 3 = left out
    idx = torch.randperm(n, generator=g)[:7]
    return [t.requires_grad_() if t is not None else None for t in (h, w, b)], cls, idx


@pytest.mark.parametrize("hidden", [3, 8])  # narrower than E = 6 (fused function) / not (projected first)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_projected_form_equals_definition(hidden: int, bias: bool, channels_last: bool) -> None:
    (h, w, b), cls, idx = _inputs(hidden, bias, channels_last)
    feat = ProjectedFeatures(h, w, b)
    got = class_feature_sums(feat, cls, 3, idx)
    want = _direct(feat.materialize(), cls, 3, idx)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y)
    probe = [torch.randn_like(x) for x in got]  # an arbitrary upstream gradient for every output
    params = [p for p in (h, w, b) if p is not None]
    g_got = torch.autograd.grad(sum((x * p).sum() for x, p in zip(got, probe)), params)
    g_want = torch.autograd.grad(sum((x * p).sum() for x, p in zip(want, probe)), params)
    for x, y in zip(g_got, g_want):
        torch.testing.assert_close(x, y)


def test_gradcheck_fused_function() -> None:
    (h, w, b), cls, idx = _inputs(3, True, True, seed=1)
    def fn(hh, ww, bb):
        return class_feature_sums(ProjectedFeatures(hh, ww, bb), cls, 3, idx)

    torch.autograd.gradcheck(fn, (h, w, b))


def test_repeated_rows_accumulate() -> None:
    """A voxel sampled twice gets both rows' gradients (index_add, not assignment)."""
    (h, w, b), cls, _ = _inputs(3, True, False, seed=2)
    idx = torch.tensor([4, 4, 9])
    rows = class_feature_sums(ProjectedFeatures(h, w, b), cls, 3, idx)[2]
    (g,) = torch.autograd.grad(rows.sum(), h)
    want = torch.autograd.grad(_direct(ProjectedFeatures(h, w, b).materialize(), cls, 3, idx)[2].sum(), h)[0]
    torch.testing.assert_close(g, want)


def test_plain_features_follow_the_definition() -> None:
    f = torch.randn(2, 4, 3, 3, 3, dtype=torch.float64)
    cls = torch.randint(0, 3, (54,))
    idx = torch.arange(5)
    for x, y in zip(class_feature_sums(f, cls, 2, idx), _direct(f, cls, 2, idx)):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("chunk_rows", [1, 5, 13, 10_000])  # one row of the first axis per slab ... one slab
@pytest.mark.parametrize("spatial", [(5, 4, 3), (6, 7)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_padded_map_with_crop_size_equals_the_cropped_map(chunk_rows: int, spatial: tuple, channels_last: bool) -> None:
    """A padded map handed over with the crop's size gives the values of the cropped map, and its gradient is the
    cropped map's gradient padded with zeros, whatever the slab size."""
    g = torch.Generator().manual_seed(3)
    padded = torch.randn(2, 3, *(s + 2 for s in spatial), generator=g, dtype=torch.float64)
    if channels_last and len(spatial) == 3:
        padded = padded.contiguous(memory_format=torch.channels_last_3d)
    padded.requires_grad_()
    w = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    n = 2 * torch.Size(spatial).numel()
    cls = torch.randint(0, 4, (n,), generator=g)
    idx = torch.cat([torch.randperm(n, generator=g)[:6], torch.tensor([n - 1, n - 1])])  # last voxel twice
    got = class_feature_sums(ProjectedFeatures(padded, w, b, spatial), cls, 3, idx, chunk_rows=chunk_rows)
    want = _direct(ProjectedFeatures(crop_to(padded, spatial), w, b).materialize(), cls, 3, idx)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y)
    probe = [torch.randn(x.shape, generator=g, dtype=x.dtype) for x in got]
    g_got = torch.autograd.grad(sum((x * p).sum() for x, p in zip(got, probe)), (padded, w, b))
    g_want = torch.autograd.grad(sum((x * p).sum() for x, p in zip(want, probe)), (padded, w, b))
    for x, y in zip(g_got, g_want):
        torch.testing.assert_close(x, y)
    assert g_got[0].shape == padded.shape


def test_gradcheck_padded_map_in_slabs() -> None:
    g = torch.Generator().manual_seed(4)
    padded = torch.randn(2, 3, 4, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    cls = torch.randint(0, 3, (2 * 3 * 3 * 2,), generator=g)
    idx = torch.tensor([0, 7, 7, 35])

    def fn(hh, ww, bb):
        return class_feature_sums(ProjectedFeatures(hh, ww, bb, (3, 3, 2)), cls, 2, idx, chunk_rows=6)

    torch.autograd.gradcheck(fn, (padded, w, b))


def test_half_precision_map_is_summed_in_float32() -> None:
    """A bfloat16 map gives float32 sums equal to those of the same values in float32."""
    (h, w, b), cls, idx = _inputs(3, True, True, seed=5)
    h16 = h.detach().to(torch.bfloat16)
    w32, b32 = w.detach().float(), b.detach().float()
    got = class_feature_sums(ProjectedFeatures(h16, w32, b32), cls, 3, idx)
    want = class_feature_sums(ProjectedFeatures(h16.float(), w32, b32), cls, 3, idx)
    for x, y in zip(got, want):
        assert x.dtype == torch.float32
        torch.testing.assert_close(x, y)
