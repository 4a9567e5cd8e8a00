"""Student views: what each student sees of an unlabelled crop, and the targets that go with it."""

from __future__ import annotations

import pytest
import torch

from multicure_monai.engines.student_views import CopyPasteView, PerturbedView, copy_paste_mask, student_view

SHAPE = (2, 1, 6, 9, 12)


def _inputs(b_u: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x_l = torch.rand(*SHAPE, generator=g) + 10.0  # labelled intensities > 10, unlabelled < 1
    y_l = (torch.rand(SHAPE[0], 1, *SHAPE[2:], generator=g) > 0.5).float()
    x_u = torch.rand(b_u, *SHAPE[1:], generator=g)
    fg = torch.rand(b_u, 1, *SHAPE[2:], generator=g) * 0.2 + 0.4
    return x_l, y_l, x_u, {"predictive": torch.cat([1 - fg, fg], 1)}


@pytest.mark.parametrize("ratio", [0.5, 2 / 3])
def test_copy_paste_mask_hides_one_cube_of_the_ratio(ratio: float) -> None:
    mask = copy_paste_mask(3, SHAPE[2:], ratio, torch.device("cpu"))
    expected = 1
    for s in SHAPE[2:]:
        expected *= round(ratio * s)
    assert mask.shape == (3, 1, *SHAPE[2:])
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    for i in range(3):
        zeros = (mask[i, 0] == 0).nonzero()
        assert len(zeros) == expected
        extent = zeros.max(0).values - zeros.min(0).values + 1
        assert extent.tolist() == [round(ratio * s) for s in SHAPE[2:]]  # one box


@pytest.mark.parametrize("b_u", [1, 2, 3])
def test_copy_paste_targets_are_the_truth_where_the_labelled_crop_shows(b_u: int) -> None:
    torch.manual_seed(1)
    x_l, y_l, x_u, targets = _inputs(b_u)
    images, out = CopyPasteView(ratio=0.5)(x_l, y_l, x_u, targets)
    assert images.shape == x_u.shape and out["predictive"].shape == targets["predictive"].shape
    for i in range(b_u):
        shows_l = images[i, 0] > 5  # labelled intensities
        pair = i % SHAPE[0]
        fraction = float(shows_l.float().mean())
        assert fraction == pytest.approx(1 - 0.5**3 if i % 2 == 0 else 0.5**3, abs=0.03)  # the two directions
        torch.testing.assert_close(images[i, 0][shows_l], x_l[pair, 0][shows_l])
        torch.testing.assert_close(images[i, 0][~shows_l], x_u[i, 0][~shows_l])
        torch.testing.assert_close(out["predictive"][i, 1][shows_l], y_l[pair, 0][shows_l])  # one-hot truth
        torch.testing.assert_close(out["predictive"][i, 1][~shows_l], targets["predictive"][i, 1][~shows_l])
    torch.testing.assert_close(out["predictive"].sum(1), torch.ones(b_u, *SHAPE[2:]))


def test_copy_paste_rejects_crops_of_different_shapes() -> None:
    x_l, y_l, x_u, targets = _inputs()
    with pytest.raises(ValueError, match="one shape"):
        CopyPasteView()(x_l, y_l, x_u[..., :-1], {k: v[..., :-1] for k, v in targets.items()})


def test_perturbed_view_flips_the_targets_with_the_image() -> None:
    x_l, y_l, x_u, targets = _inputs()
    images, out = PerturbedView(noise_std=0.0, intensity_scale=0.0, flip_prob=1.0)(x_l, y_l, x_u, targets)
    torch.testing.assert_close(images, x_u.flip([2, 3, 4]))
    torch.testing.assert_close(out["predictive"], targets["predictive"].flip([2, 3, 4]))


def test_perturbed_view_noise_and_scale_stay_in_bounds_and_leave_targets() -> None:
    torch.manual_seed(0)
    x_l, y_l, x_u, targets = _inputs()
    images, out = PerturbedView(noise_std=0.1, intensity_scale=0.1, flip_prob=0.0)(x_l, y_l, x_u, targets)
    assert float((images - x_u).abs().max()) <= 0.1 * float(x_u.abs().max()) + 0.2 + 1e-6
    assert not torch.equal(images, x_u)
    torch.testing.assert_close(out["predictive"], targets["predictive"])


@pytest.mark.parametrize("name, cls", [("none", type(None)), ("perturb", PerturbedView), ("copy_paste", CopyPasteView)])
def test_student_view_by_name(name: str, cls: type) -> None:
    assert isinstance(student_view(name), cls)


@pytest.mark.parametrize("kwargs", [{"name": "cutmix"}, {"name": "copy_paste", "ratio": 1.0}])
def test_student_view_rejects_bad_settings(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        student_view(**kwargs)
