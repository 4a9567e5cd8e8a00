"""multicure_monai/handlers/metric_handlers.py: the paper's four metrics in a MONAI evaluator (empty cases, mm), the
member nets' metrics and an evaluator's additional metrics."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from monai.data import DataLoader, Dataset, MetaTensor
from monai.engines import SupervisedEvaluator
from monai.metrics import HausdorffDistanceMetric, SurfaceDistanceMetric

from multicure_monai.handlers.metric_handlers import (
    LabelToOneHot,
    additional_metric_handlers,
    calibration_metric_handlers,
    member_metric_handlers,
    segmentation_metric_handlers,
)
from multicure_monai.metrics import grid_diagonal

METRICS = ("mean_dice", "jaccard", "hd95", "asd")
SHAPE = (12, 12, 12)


def _box(lo: tuple[int, ...], hi: tuple[int, ...]) -> torch.Tensor:
    """(2, *SHAPE) one-hot of the box ``[lo, hi)``; ``lo == hi`` gives an empty foreground."""
    fg = torch.zeros(SHAPE)
    fg[tuple(slice(a, b) for a, b in zip(lo, hi))] = 1.0
    return torch.stack([1 - fg, fg])


def _quiet(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` without MONAI's warnings about empty masks."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.mark.parametrize("members", [("predictive", "auxiliary"), ("auxiliary",), ()])
@pytest.mark.parametrize("prefix", ["val_", ""])
def test_member_metric_names_and_order(members: tuple[str, ...], prefix: str) -> None:
    handlers = member_metric_handlers(num_classes=2, members=members, prefix=prefix)
    assert list(handlers) == [f"{prefix}{m}_{metric}" for m in members for metric in METRICS]
    assert len({id(h) for h in handlers.values()}) == len(handlers)


@pytest.mark.parametrize("member, other", [("predictive", "auxiliary"), ("auxiliary", "predictive")])
def test_member_metric_reads_its_own_prediction(member: str, other: str) -> None:
    cube = torch.zeros(1, 4, 4, 4)
    cube[:, 1:3, 1:3, 1:3] = 1
    truth, wrong = torch.cat([1 - cube, cube]), torch.cat([cube, 1 - cube])
    output = [{"pred_" + member: truth, "pred_" + other: wrong, "label": truth}]
    handlers = member_metric_handlers(num_classes=2)
    for net, expected in ((member, truth), (other, wrong)):
        for metric in METRICS:
            y_pred, y = handlers[f"val_{net}_{metric}"]._output_transform(output)
            assert y_pred[0] is expected and y[0] is truth


def _named(*names: str) -> dict[str, object]:
    return {name: object() for name in names}


@pytest.mark.parametrize(
    "metrics, extra, key_metric, names",
    [
        (_named("val_mean_dice", "val_hd95"), (), "val_mean_dice", ["val_hd95"]),
        (_named("val_mean_dice", "val_hd95"), (_named("m_a", "m_b"),), "val_mean_dice", ["val_hd95", "m_a", "m_b"]),
        (_named("val_mean_dice", "b"), (_named("m_a"), _named("c_a")), "val_mean_dice", ["b", "m_a", "c_a"]),
        (_named("d", "val_mean_dice", "e"), (), "val_mean_dice", ["d", "e"]),
        (_named("val_mean_dice", "x"), (), "x", ["val_mean_dice"]),
        (_named("a"), [_named("b"), _named("a")], "k", ["a", "b"]),  # a repeated name keeps its first place
    ],
)
def test_additional_metric_handlers(metrics: dict, extra, key_metric: str, names: list[str]) -> None:
    before = dict(metrics)
    merged = {k: v for k, v in metrics.items() if k != key_metric}
    for more in extra:
        merged = {**merged, **more}
    result = additional_metric_handlers(metrics, extra, key_metric=key_metric)
    assert list(result) == names
    assert all(result[k] is merged[k] for k in names)  # the same metric objects; a later mapping wins
    assert key_metric not in result
    assert metrics == before  # the input is left alone


def test_additional_metric_handlers_as_the_bundle_wires_them() -> None:
    metrics = segmentation_metric_handlers(num_classes=2)
    members = member_metric_handlers(num_classes=2)
    calibration = calibration_metric_handlers()
    result = additional_metric_handlers(metrics, [members, calibration])
    assert list(result) == [k for k in metrics if k != "val_mean_dice"] + list(members) + list(calibration)


@pytest.mark.parametrize("batched", [True, False])
def test_label_to_one_hot(batched: bool) -> None:
    labels = torch.randint(0, 3, (2, 1, 4, 4, 4))
    onehot = torch.nn.functional.one_hot(labels[:, 0], 3).permute(0, 4, 1, 2, 3).float()
    transform = LabelToOneHot(lambda out: out, num_classes=3)
    y_pred, y = transform((labels, onehot) if batched else (list(labels), list(onehot)))
    y_pred = y_pred if batched else torch.stack(y_pred)
    y = y if batched else torch.stack(y)
    torch.testing.assert_close(y_pred.float(), onehot)
    torch.testing.assert_close(y, onehot)
    with pytest.raises(ValueError):
        transform((torch.zeros(2, 2, 4, 4, 4), onehot))


def _run_evaluator(cases: list[dict], **handler_kwargs) -> tuple[dict, dict]:
    """Run a SupervisedEvaluator whose 'network' returns the one-hot 'image' unchanged."""
    handlers = segmentation_metric_handlers(**handler_kwargs)
    key = next(iter(handlers))
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(Dataset(cases), batch_size=1),
        network=torch.nn.Identity(),
        key_val_metric={key: handlers.pop(key)},
        additional_metrics=handlers,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluator.run()
    return evaluator.state.metrics, evaluator.state.metric_details


def test_handlers_in_a_supervised_evaluator() -> None:
    gt = _box((4, 4, 4), (8, 8, 8))
    pred = _box((6, 4, 4), (10, 8, 8))  # shifted by 2 voxels: Dice 1/2, Jaccard 1/3
    metrics, details = _run_evaluator([{"image": pred, "label": gt}])
    assert set(metrics) == {"val_mean_dice", "val_jaccard", "val_hd95", "val_asd"}
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["val_mean_dice"] == pytest.approx(0.5)
    assert metrics["val_jaccard"] == pytest.approx(1 / 3)
    hd95 = _quiet(HausdorffDistanceMetric(percentile=95), pred[None], gt[None]).item()
    asd = _quiet(SurfaceDistanceMetric(symmetric=True), pred[None], gt[None]).item()
    assert metrics["val_hd95"] == pytest.approx(hd95)
    assert metrics["val_asd"] == pytest.approx(asd)
    assert 0 < metrics["val_hd95"] <= 2 and 0 < metrics["val_asd"] < 2
    assert set(details) == set(metrics) and all(d.shape == (1, 1) for d in details.values())  # for MetricsSaver


def test_handlers_with_empty_cases_and_label_maps_in_mm() -> None:
    spacing = (2.0, 1.0, 1.0)
    affine = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
    gt = _box((4, 4, 4), (8, 8, 8))
    empty = _box((0, 0, 0), (0, 0, 0))
    cases = [
        {"image": gt[1:], "label": MetaTensor(gt[1:], affine=affine)},  # label maps (1, H, W, D), perfect
        {"image": empty[1:], "label": MetaTensor(gt[1:], affine=affine)},  # missed organ
        {"image": empty[1:], "label": MetaTensor(empty[1:], affine=affine)},  # nothing to find, nothing found
    ]
    metrics, details = _run_evaluator(cases, unit="mm", prefix="test_")
    diagonal = grid_diagonal(SHAPE, spacing)
    torch.testing.assert_close(details["test_mean_dice"][:, 0], torch.tensor([1.0, 0.0, 1.0]))
    torch.testing.assert_close(details["test_jaccard"][:, 0], torch.tensor([1.0, 0.0, 1.0]))
    for name in ("test_hd95", "test_asd"):
        torch.testing.assert_close(details[name][:, 0], torch.tensor([0.0, diagonal, 0.0]))
        assert metrics[name] == pytest.approx(diagonal / 3)
    assert all(math.isfinite(v) for v in metrics.values())
