"""multicure_monai/metrics/handlers.py: the member nets' metrics and an evaluator's additional metrics."""

from __future__ import annotations

import pytest
import torch

from multicure_monai.metrics import (
    additional_metric_handlers,
    calibration_metric_handlers,
    member_metric_handlers,
    segmentation_metric_handlers,
)

METRICS = ("mean_dice", "jaccard", "hd95", "asd")


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
