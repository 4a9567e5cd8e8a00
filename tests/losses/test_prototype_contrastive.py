"""Tests for multicure_monai/losses/prototype_contrastive.py."""

from __future__ import annotations

import math

import pytest
import torch

from multicure_monai.losses.prototype_contrastive import PrototypeContrastiveLoss

TAU = 0.1


def _toy() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Five voxels, E=2, shaped (1, E, 5, 1) / (1, 1, 5, 1).

    v0: class 0 reliable (1, 0); v1: class 1 reliable (0, 1)  -> prototypes c0 = (1, 0), c1 = (0, 1)
    v2: class 0 uncertain (1, 1); v3: class 1 uncertain (0, 2); v4: class 0 uncertain (1, 0)
    """
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 2.0], [1.0, 0.0]]).t().reshape(1, 2, 5, 1)
    labels = torch.tensor([0, 1, 0, 1, 0]).reshape(1, 1, 5, 1)
    reliable = torch.tensor([True, True, False, False, False]).reshape(1, 1, 5, 1)
    return feats, labels, reliable, ~reliable


# "all": v2 -> log 2; v3, v4 -> log(1 + e^-10). Per-class means, then mean over classes.
_SHARP = math.log1p(math.exp(-1.0 / TAU))
ALL_HAND = ((math.log(2.0) + _SHARP) / 2 + _SHARP) / 2
# "negatives": v2 -> 0; v3, v4 -> -10 ; class 0 -> -5, class 1 -> -10
NEG_HAND = (-5.0 - 10.0) / 2
SEP_HAND = 0.5  # (1 + cos(c0, c1)) / 2 with orthogonal prototypes


@pytest.mark.parametrize("denominator, contrast", [("all", ALL_HAND), ("negatives", NEG_HAND)])
@pytest.mark.parametrize("separation_weight", [0.0, 1.0, 2.5])
def test_hand_computed(denominator: str, contrast: float, separation_weight: float) -> None:
    loss_fn = PrototypeContrastiveLoss(2, TAU, separation_weight=separation_weight, denominator=denominator)
    loss, stats = loss_fn(*_toy(), return_stats=True)
    assert float(loss) == pytest.approx(contrast + separation_weight * SEP_HAND, abs=1e-5)
    assert stats["num_uncertain"] == 3
    assert stats["num_prototypes"] == 2


def _clustered(num_classes: int, emb: int = 8, size: int = 6, seed: int = 0):
    """Reliable voxels sit near class centres; returns centres, labels, reliable, uncertain, features."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(num_classes, emb, generator=g), dim=1)
    labels = torch.randint(0, num_classes, (2, 1, size, size, size), generator=g)
    reliable = torch.rand(2, 1, size, size, size, generator=g) > 0.4
    feats = centres[labels[:, 0]].movedim(-1, 1) + 0.1 * torch.randn(2, emb, size, size, size, generator=g)
    return centres, labels, reliable, ~reliable, feats


@pytest.mark.parametrize("denominator", ["all", "negatives"])
@pytest.mark.parametrize("num_classes", [2, 3, 4])
def test_lower_on_own_prototype_than_on_other(denominator: str, num_classes: int) -> None:
    centres, labels, reliable, uncertain, feats = _clustered(num_classes)
    loss_fn = PrototypeContrastiveLoss(num_classes, TAU, max_uncertain_samples=None, denominator=denominator)
    own = feats.clone()
    other = feats.clone()
    unc = uncertain[:, 0]
    own.movedim(1, -1)[unc] = centres[labels[:, 0][unc]]
    other.movedim(1, -1)[unc] = centres[(labels[:, 0][unc] + 1) % num_classes]
    loss_own, loss_other = float(loss_fn(own, labels, reliable, uncertain)), float(
        loss_fn(other, labels, reliable, uncertain)
    )
    assert loss_own < loss_other
    if denominator == "all":
        assert loss_own >= 0.0


def test_separation_term_penalises_close_prototypes() -> None:
    feats, labels, reliable, uncertain = _toy()
    close = feats.clone()
    close[0, :, 1, 0] = torch.tensor([1.0, 0.1])  # class-1 prototype almost equal to class-0 prototype
    loss_fn = PrototypeContrastiveLoss(2, TAU, separation_weight=1.0)
    only_sep = PrototypeContrastiveLoss(2, TAU, separation_weight=0.0)
    sep_far = float(loss_fn(feats, labels, reliable, uncertain) - only_sep(feats, labels, reliable, uncertain))
    sep_close = float(loss_fn(close, labels, reliable, uncertain) - only_sep(close, labels, reliable, uncertain))
    assert sep_far == pytest.approx(0.5, abs=1e-6)
    assert sep_close == pytest.approx((1 + 1 / math.sqrt(1.01)) / 2, abs=1e-6)


def _loop_reference(feats, labels, reliable, uncertain, num_classes, denominator, separation_weight):
    """Eqs. 4-5 written voxel by voxel with Python loops (one level, no caps): the definition the loss vectorises."""
    emb = feats.shape[1]
    f = feats.movedim(1, -1).reshape(-1, emb)
    lab, rel, unc = labels.flatten().tolist(), reliable.flatten().tolist(), uncertain.flatten().tolist()
    protos = {}
    for k in range(num_classes):
        rows = [f[v] / f[v].norm().clamp_min(1e-12) for v in range(len(lab)) if rel[v] and lab[v] == k]
        if rows:
            mean = torch.stack(rows).mean(dim=0)
            protos[k] = mean / mean.norm().clamp_min(1e-8)
    classes = sorted(protos)
    per_class = []
    for k in classes:
        terms = []
        for v in range(len(lab)):
            if not (unc[v] and lab[v] == k):
                continue
            q = f[v] / f[v].norm().clamp_min(1e-12)
            s = {j: torch.dot(q, protos[j]) / TAU for j in classes}
            negatives = [s[j] for j in classes if denominator == "all" or j != k]
            terms.append(torch.logsumexp(torch.stack(negatives), dim=0) - s[k])
        if terms:
            per_class.append(torch.stack(terms).mean())
    pairs = [(1 + torch.dot(protos[a], protos[b])) / 2 for i, a in enumerate(classes) for b in classes[i + 1 :]]
    return torch.stack(per_class).mean() + separation_weight * torch.stack(pairs).mean()


@pytest.mark.parametrize("denominator", ["all", "negatives"])
@pytest.mark.parametrize("num_classes", [2, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_voxel_loop_reference_values_and_gradients(denominator: str, num_classes: int, channels_last: bool):
    _, labels, reliable, uncertain, feats = _clustered(num_classes, emb=4, size=3, seed=num_classes)
    feats = feats.double()
    if channels_last:
        feats = feats.contiguous(memory_format=torch.channels_last_3d)
    a = feats.clone().requires_grad_(True)
    b = feats.clone().requires_grad_(True)
    loss_fn = PrototypeContrastiveLoss(num_classes, TAU, None, separation_weight=0.7, denominator=denominator)
    got = loss_fn(a, labels, reliable, uncertain)
    want = _loop_reference(b, labels, reliable, uncertain, num_classes, denominator, 0.7)
    got.backward()
    want.backward()
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-10)


def test_gradcheck() -> None:
    _, labels, reliable, uncertain, feats = _clustered(3, emb=3, size=2, seed=1)
    loss_fn = PrototypeContrastiveLoss(3, TAU, None)
    feats = feats.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: loss_fn(f, labels, reliable, uncertain), (feats,))


@pytest.mark.parametrize("separation_weight", [0.0, 1.0])
@pytest.mark.parametrize("denominator", ["all", "negatives"])
def test_gradients_reach_uncertain_and_reliable_features(separation_weight: float, denominator: str) -> None:
    _, labels, reliable, uncertain, feats = _clustered(3, size=4)
    ignored = torch.zeros_like(reliable)
    ignored[..., 0, :, :] = True  # voxels neither reliable nor uncertain
    reliable, uncertain = reliable & ~ignored, uncertain & ~ignored
    feats = feats.clone().requires_grad_(True)
    loss = PrototypeContrastiveLoss(3, TAU, None, separation_weight=separation_weight, denominator=denominator)(
        feats, labels, reliable, uncertain
    )
    loss.backward()
    per_voxel = feats.grad.abs().sum(dim=1, keepdim=True)
    assert bool(torch.isfinite(feats.grad).all())
    assert float(per_voxel[uncertain].sum()) > 0  # through eq. 5's query features
    assert float(per_voxel[reliable].sum()) > 0  # through the prototypes
    assert float(per_voxel[ignored].sum()) == 0.0


def test_class_without_reliable_voxels_is_skipped() -> None:
    _, labels, reliable, uncertain, feats = _clustered(3)
    reliable = reliable & (labels != 2)  # class 2 has no prototype
    loss_fn = PrototypeContrastiveLoss(3, TAU, max_uncertain_samples=None)
    loss, stats = loss_fn(feats, labels, reliable, uncertain, return_stats=True)
    assert bool(torch.isfinite(loss))
    assert stats["num_prototypes"] == 2
    without, stats = loss_fn(feats, labels, reliable, uncertain & (labels != 2), return_stats=True)
    torch.testing.assert_close(loss, without)
    assert stats["num_uncertain"] == int((uncertain & (labels != 2)).sum())


@pytest.mark.parametrize("case", ["one_prototype", "no_uncertain", "no_reliable", "empty"])
def test_degenerate_levels_give_graph_connected_zero(case: str) -> None:
    _, labels, reliable, uncertain, feats = _clustered(2)
    if case == "one_prototype":
        reliable = reliable & (labels == 0)
    elif case == "no_uncertain":
        uncertain = torch.zeros_like(uncertain)
    elif case == "no_reliable":
        reliable = torch.zeros_like(reliable)
    else:
        reliable = uncertain = torch.zeros_like(reliable)
    feats = feats.clone().requires_grad_(True)
    loss = PrototypeContrastiveLoss(2, TAU)([feats, feats[..., ::2, ::2, ::2]], labels, reliable, uncertain)
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()
    assert float(feats.grad.abs().sum()) == 0.0


@pytest.mark.parametrize("denominator", ["all", "negatives"])
def test_zero_features_stay_finite(denominator: str) -> None:
    _, labels, reliable, uncertain, _ = _clustered(3, size=4)
    feats = torch.zeros(2, 5, 4, 4, 4, requires_grad=True)
    loss = PrototypeContrastiveLoss(3, TAU, denominator=denominator)(feats, labels, reliable, uncertain)
    loss.backward()
    assert bool(torch.isfinite(loss)) and bool(torch.isfinite(feats.grad).all())


@pytest.mark.parametrize("level_weights", [None, (1.0, 0.5, 2.0)])
def test_multilevel_is_weighted_sum_of_levels(level_weights: tuple[float, ...] | None) -> None:
    _, labels, reliable, uncertain, f0 = _clustered(3, size=8)
    torch.manual_seed(0)
    f1 = torch.randn(2, 6, 4, 4, 4)
    f2 = torch.randn(2, 12, 2, 2, 2)
    single = PrototypeContrastiveLoss(3, TAU, max_uncertain_samples=None)
    multi = PrototypeContrastiveLoss(3, TAU, max_uncertain_samples=None, level_weights=level_weights)
    weights = level_weights or (1.0, 1.0, 1.0)
    expected = sum(w * single(f, labels, reliable, uncertain) for w, f in zip(weights, (f0, f1, f2)))
    got, stats = multi([f0, f1, f2], labels, reliable, uncertain, return_stats=True)
    torch.testing.assert_close(got, expected)
    assert len(stats["level_stats"]) == 3


def test_coarse_level_uses_nearest_resized_masks() -> None:
    _, labels, reliable, uncertain, _ = _clustered(2, size=8)
    torch.manual_seed(0)
    coarse = torch.randn(2, 4, 4, 4, 4)
    loss_fn = PrototypeContrastiveLoss(2, TAU, max_uncertain_samples=None)
    sub = (slice(None), slice(None), slice(None, None, 2), slice(None, None, 2), slice(None, None, 2))
    torch.testing.assert_close(
        loss_fn(coarse, labels, reliable, uncertain), loss_fn(coarse, labels[sub], reliable[sub], uncertain[sub])
    )


@pytest.mark.parametrize("cap", [1, 5, 17])
def test_uncertain_sample_cap(cap: int) -> None:
    _, labels, reliable, uncertain, feats = _clustered(3, size=8)
    coarse = feats[..., ::2, ::2, ::2]
    loss_fn = PrototypeContrastiveLoss(3, TAU, max_uncertain_samples=cap)
    torch.manual_seed(3)
    first, stats = loss_fn([feats, coarse], labels, reliable, uncertain, return_stats=True)
    assert [s["num_uncertain"] for s in stats["level_stats"]] == [cap, cap]
    assert stats["num_uncertain"] == 2 * cap
    torch.manual_seed(3)
    torch.testing.assert_close(loss_fn([feats, coarse], labels, reliable, uncertain), first)  # reproducible


def test_cap_above_count_equals_no_cap() -> None:
    _, labels, reliable, uncertain, feats = _clustered(2, size=4)
    capped = PrototypeContrastiveLoss(2, TAU, max_uncertain_samples=10_000)(feats, labels, reliable, uncertain)
    full = PrototypeContrastiveLoss(2, TAU, max_uncertain_samples=None)(feats, labels, reliable, uncertain)
    torch.testing.assert_close(capped, full)


def test_reliable_sample_cap() -> None:
    _, labels, reliable, uncertain, feats = _clustered(2, size=8)
    loss_fn = PrototypeContrastiveLoss(2, TAU, max_reliable_samples=50)
    loss, stats = loss_fn(feats, labels, reliable, uncertain, return_stats=True)
    assert bool(torch.isfinite(loss))
    assert stats["level_stats"][0]["num_reliable"] == 50


def test_out_of_range_labels_ignored() -> None:
    _, labels, reliable, uncertain, feats = _clustered(2, size=4)
    marked = labels.clone()
    marked[..., 0, :, :] = 255
    loss_fn = PrototypeContrastiveLoss(2, TAU, max_uncertain_samples=None)
    keep = torch.ones_like(reliable)
    keep[..., 0, :, :] = False
    torch.testing.assert_close(
        loss_fn(feats, marked, reliable, uncertain), loss_fn(feats, labels, reliable & keep, uncertain & keep)
    )


def test_2d_features() -> None:
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 4, 6, 6, generator=g, requires_grad=True)
    labels = torch.randint(0, 2, (2, 1, 6, 6), generator=g)
    reliable = torch.rand(2, 1, 6, 6, generator=g) > 0.5
    loss = PrototypeContrastiveLoss(2)(feats, labels, reliable, ~reliable)
    loss.backward()
    assert bool(torch.isfinite(loss)) and float(feats.grad.abs().sum()) > 0


def test_validation() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        PrototypeContrastiveLoss(1)
    with pytest.raises(ValueError, match="temperature"):
        PrototypeContrastiveLoss(2, temperature=0.0)
    with pytest.raises(ValueError, match="all"):
        PrototypeContrastiveLoss(2, denominator="positives")
    feats, labels, reliable, uncertain = _toy()
    with pytest.raises(ValueError, match="level_weights"):
        PrototypeContrastiveLoss(2, level_weights=[1.0, 1.0])(feats, labels, reliable, uncertain)
    with pytest.raises(ValueError, match="share one shape"):
        PrototypeContrastiveLoss(2)(feats, labels, reliable[..., :3, :], uncertain)


@pytest.mark.parametrize("levels", [1, 2])
def test_learned_below_chance_on_a_separable_toy(levels: int) -> None:
    """A small conv net trained on the loss alone brings eq. 5 of the uncertain (boundary) voxels far below its
    chance value log(P) within a few steps, and the ``contrast`` / ``chance`` stats report it."""
    torch.manual_seed(0)
    size = 16
    zz, yy, xx = torch.meshgrid(*(torch.arange(size, dtype=torch.float32),) * 3, indexing="ij")
    r = ((zz - 7.5) ** 2 + (yy - 7.5) ** 2 + (xx - 7.5) ** 2).sqrt()
    labels = (r < 5.0).long()[None, None]
    image = labels.float() + 0.3 * torch.randn(1, 1, size, size, size)
    band = ((r - 5.0).abs() < 1.0)[None, None]  # the boundary: "uncertain"
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(8, 8, 1))
    loss_fn = PrototypeContrastiveLoss(num_classes=2, separation_weight=1.0)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)

    def step() -> tuple[float, float]:
        feat = net(image)
        feats = [feat] if levels == 1 else [feat, torch.nn.functional.avg_pool3d(feat, 2)]
        loss, stats = loss_fn(feats, labels, ~band, band, return_stats=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(stats["contrast"]), stats["chance"]

    first, chance = step()
    assert chance == pytest.approx(levels * math.log(2))
    for _ in range(30):
        last, _ = step()
    assert last < 0.25 * chance < first
