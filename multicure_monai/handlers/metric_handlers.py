"""Evaluator wiring: the paper's four metrics (Dice, Jaccard, 95HD, ASD) as ignite metrics for a MONAI evaluator.

The distance metrics and their empty-mask convention live in :mod:`multicure_monai.metrics.surface_distance`;
this module only chooses their settings and feeds them one-hot ``(y_pred, y)`` (:class:`LabelToOneHot`); the
calibration and uncertainty metrics of :mod:`multicure_monai.metrics.calibration` are wired the same way. The
bundle's validation scores each member net next to the ensemble (:func:`member_metric_handlers`) and reports
every metric but the key metric as an additional one (:func:`additional_metric_handlers`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from ignite.metrics import Metric
from monai.handlers import IgniteMetricHandler, from_engine
from monai.metrics import DiceMetric, MeanIoU
from monai.networks.utils import one_hot

from multicure_monai.metrics.calibration import QUANTITIES, REGIONS, UncertaintyMetric
from multicure_monai.metrics.surface_distance import (
    EMPTY_DIAGONAL,
    EmptyAwareHausdorffDistanceMetric,
    EmptyAwareSurfaceDistanceMetric,
    SpacingArg,
)

__all__ = [
    "LabelToOneHot",
    "additional_metric_handlers",
    "calibration_metric_handlers",
    "member_metric_handlers",
    "segmentation_metric_handlers",
]


class LabelToOneHot:
    """Wrap an ``output_transform`` so that label maps become one-hot before metric computation.

    ``y_pred`` / ``y`` may each be a batch ``(B, C, ...)`` or a list of ``(C, ...)`` tensors. A tensor with a
    single channel is read as a label map and one-hot encoded to ``num_classes`` channels (MetaTensor metadata
    kept); a tensor with ``num_classes`` channels is passed through; anything else raises ``ValueError``.

    Not :class:`monai.transforms.AsDiscrete` ``(to_onehot=...)``: it reads dim 0 as the channel (a batch of one
    label map would become ``(num_classes, 1, ...)``, larger batches raise), rejects input that is already
    one-hot, and turns a plain tensor into a :class:`monai.data.MetaTensor` with an identity affine, so
    ``unit="mm"`` would silently measure at 1 mm instead of asking for a spacing.

    Args:
        output_transform: maps ``engine.state.output`` to ``(y_pred, y)``.
        num_classes: number of classes including background (>= 2).
    """

    def __init__(self, output_transform: Callable, num_classes: int) -> None:
        if int(num_classes) != num_classes or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}.")
        self.output_transform = output_transform
        self.num_classes = int(num_classes)

    def _convert(self, x: Any, batched: bool) -> Any:
        if isinstance(x, (list, tuple)):
            return [self._convert(i, batched=False) for i in x]
        if not isinstance(x, torch.Tensor):
            return x
        channels = x.shape[1 if batched else 0]
        if channels == self.num_classes:
            return x
        if channels == 1:
            return one_hot(x, self.num_classes, dim=1 if batched else 0)
        raise ValueError(
            f"expected 1 (label map) or {self.num_classes} (one-hot) channels, got shape {tuple(x.shape)}."
        )

    def __call__(self, output: Any) -> tuple[Any, Any]:
        y_pred, y = self.output_transform(output)
        return self._convert(y_pred, batched=True), self._convert(y, batched=True)


def segmentation_metric_handlers(
    num_classes: int = 2,
    include_background: bool = False,
    unit: str = "voxel",
    prefix: str = "val_",
    output_transform: Callable = from_engine(["pred", "label"]),
    spacing: SpacingArg = None,
    empty_value: float | str = EMPTY_DIAGONAL,
    save_details: bool = True,
) -> dict[str, Metric]:
    """The paper's four evaluation metrics as ignite metrics for a MONAI evaluator.

    Returns ``{prefix + "mean_dice", prefix + "jaccard", prefix + "hd95", prefix + "asd"}`` (insertion order;
    the first is the natural ``key_val_metric``, the rest ``additional_metrics``)::

        metrics = segmentation_metric_handlers()
        evaluator = SupervisedEvaluator(..., postprocessing=AsDiscreted(keys="pred", argmax=True, to_onehot=2),
                                        key_val_metric={"val_mean_dice": metrics.pop("val_mean_dice")},
                                        additional_metrics=metrics)

    Dice and Jaccard use ``ignore_empty=False`` (1.0 when both masks of a class are empty, 0.0 when only one
    is), via :class:`monai.handlers.IgniteMetricHandler` because monai 1.6.1's ``MeanDice`` /
    ``MeanIoUHandler`` do not expose ``ignore_empty``. 95HD / ASD (symmetric) are
    :class:`EmptyAwareHausdorffDistanceMetric` / :class:`EmptyAwareSurfaceDistanceMetric`. With
    ``save_details=True`` per-case values land in ``engine.state.metric_details`` for
    :class:`monai.handlers.MetricsSaver`.

    Args:
        num_classes: classes including background; single-channel (label-map) ``pred`` / ``label`` are one-hot
            encoded to this many channels (:class:`LabelToOneHot`).
        include_background: whether channel 0 is scored.
        unit: ``"voxel"`` (paper) or ``"mm"`` for the distances.
        prefix: prepended to every metric name.
        output_transform: maps ``engine.state.output`` to ``(y_pred, y)``; the default reads MONAI's decollated
            output (list of per-case dicts with binarised one-hot ``"pred"`` and ``"label"`` ``(C, H, W, D)``).
        spacing: explicit spacing for ``unit="mm"`` (else read from MetaTensor labels).
        empty_value: value for a class empty in exactly one of prediction / ground truth.
        save_details: keep per-case values for :class:`monai.handlers.MetricsSaver`.

    Returns:
        Metric name -> ignite metric (attach with ``metric.attach(engine, name)`` or pass to an evaluator).
    """
    transform = LabelToOneHot(output_transform, num_classes)
    distance_kwargs: dict[str, Any] = {
        "include_background": include_background,
        "empty_value": empty_value,
        "unit": unit,
        "spacing": spacing,
    }
    return {
        prefix + "mean_dice": IgniteMetricHandler(
            metric_fn=DiceMetric(include_background=include_background, ignore_empty=False),
            output_transform=transform,
            save_details=save_details,
        ),
        prefix + "jaccard": IgniteMetricHandler(
            metric_fn=MeanIoU(include_background=include_background, ignore_empty=False),
            output_transform=transform,
            save_details=save_details,
        ),
        prefix + "hd95": IgniteMetricHandler(
            metric_fn=EmptyAwareHausdorffDistanceMetric(percentile=95, **distance_kwargs),
            output_transform=transform,
            save_details=save_details,
        ),
        prefix + "asd": IgniteMetricHandler(
            metric_fn=EmptyAwareSurfaceDistanceMetric(symmetric=True, **distance_kwargs),
            output_transform=transform,
            save_details=save_details,
        ),
    }


def calibration_metric_handlers(
    prefix: str = "val_",
    output_transform: Callable = from_engine(["prob", "label"]),
    threshold: float = 0.7,
    band_width: int = 2,
    num_bins: int = 15,
    save_details: bool = True,
) -> dict[str, Metric]:
    """Calibration and uncertainty of the foreground probability as evaluator metrics.

    The quantities are those of :mod:`multicure_monai.metrics.calibration`.

    One handler per quantity and region: ``{prefix}ece``, ``{prefix}brier``, ``{prefix}entropy``,
    ``{prefix}uncertain_fraction`` (all voxels), the same with ``_band`` / ``_rest`` (within ``band_width``
    voxels of the ground-truth surface / outside), and ``{prefix}error_auroc``.

    Args:
        prefix: prepended to every metric name.
        output_transform: maps ``engine.state.output`` to ``(probabilities, label)``; the probabilities must be
            the softmax output **before** the argmax (the bundle's postprocessing keeps them as ``"prob"``).
        threshold, band_width, num_bins: see :func:`.calibration.uncertainty_scores`.
        save_details: keep per-case values for :class:`monai.handlers.MetricsSaver`.
    """
    handlers: dict[str, Metric] = {}
    for quantity in QUANTITIES:
        for region in ("all",) if quantity == "error_auroc" else REGIONS:
            metric = UncertaintyMetric(quantity, region, threshold, band_width, num_bins)
            handlers[prefix + metric.key] = IgniteMetricHandler(
                metric_fn=metric, output_transform=output_transform, save_details=save_details
            )
    return handlers


def member_metric_handlers(
    num_classes: int = 2, members: Sequence[str] = ("predictive", "auxiliary"), prefix: str = "val_"
) -> dict[str, Metric]:
    """:func:`segmentation_metric_handlers` of each member net's prediction, next to the ensemble's.

    For each member ``m`` (in order) the four metrics are named ``{prefix}{m}_mean_dice``, ``{prefix}{m}_jaccard``,
    ``{prefix}{m}_hd95``, ``{prefix}{m}_asd`` and read ``(pred_{m}, label)`` from the decollated output (the
    bundle's postprocessing splits the members' predictions off with
    :class:`~multicure_monai.data.member_outputs.SplitMembersd`).

    Args:
        num_classes: classes including background.
        members: names of the member nets.
        prefix: prepended to every metric name, before the member's name.

    Returns:
        Metric name -> ignite metric, member by member.
    """
    return {
        name: metric
        for member in members
        for name, metric in segmentation_metric_handlers(
            num_classes=num_classes,
            prefix=prefix + member + "_",
            output_transform=from_engine(["pred_" + member, "label"]),
        ).items()
    }


def additional_metric_handlers(
    metrics: Mapping[str, Metric], extra: Iterable[Mapping[str, Metric]] = (), key_metric: str = "val_mean_dice"
) -> dict[str, Metric]:
    """An evaluator's ``additional_metrics``: ``metrics`` without the key metric, then each mapping of ``extra``.

    The key metric goes to the evaluator's ``key_val_metric`` instead (a metric must not be attached twice).
    Merged as ``{**metrics_without_key, **extra[0], **extra[1], ...}``: the first insertion fixes a name's
    position, a later mapping's value wins.

    Args:
        metrics: e.g. :func:`segmentation_metric_handlers`'s result, key metric included.
        extra: further metric mappings, e.g. :func:`member_metric_handlers` and
            :func:`calibration_metric_handlers`.
        key_metric: the name left out of ``metrics``.

    Returns:
        A new dict of the same metric objects.
    """
    handlers = {name: metric for name, metric in metrics.items() if name != key_metric}
    for more in extra:
        handlers.update(more)
    return handlers
