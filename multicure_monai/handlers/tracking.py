"""``--tracking mlflow``: the MLflow run carries what the training log shows and never stays RUNNING.

``python -m monai.bundle run training ... --tracking mlflow`` appends the ``MLFlowHandler`` of MONAI's
``DEFAULT_MLFLOW_SETTINGS`` to ``train#handlers``. Its ``output_transform`` is fixed to the total loss
(``train_loss``), and it ends the run only on ``Events.COMPLETED``, so a run that raises stays RUNNING. The
settings are a constant of MONAI, not an id of the bundle, so :func:`track_training_terms` adjusts the handler
object in the list the trainer gets (``train#trainer_handlers`` in train.yaml):

* its ``output_transform`` becomes the bundle's ``diagnostics#log_terms`` (every ``loss*`` term and ``diag_*``
  diagnostic, as the training log and TensorBoard get them);
* :class:`MLflowFailedRun` goes first in the list and marks the run FAILED when the trainer raises (the error
  then propagates as before).

The validation metrics of every net (``val_mean_dice``, ``val_predictive_*``, ``val_auxiliary_*``) already
reach MLflow through the handler MONAI appends to ``validate#handlers`` (the evaluator's metrics at each of its
epochs), and the successful run ends FINISHED through the trainer handler's ``close_on_complete``. In
``evaluating`` MONAI appends its evaluator handler to evaluate.yaml's ``handlers``, the list of its ``evaluator``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ignite.engine import Engine, Events

__all__ = ["MLflowFailedRun", "track_training_terms"]

_logger = logging.getLogger(__name__)


class MLflowFailedRun:
    """Marks the MLflow run of ``handler`` FAILED when the engine raises, then re-raises the error.

    ignite runs ``EXCEPTION_RAISED`` handlers in the order they were attached and only the first one that
    raises is reached, so this handler has to be attached before the others (MONAI's ``StatsHandler`` logs
    and re-raises there).

    Args:
        handler: the ``monai.handlers.MLFlowHandler`` whose run to end.
    """

    def __init__(self, handler: Any) -> None:
        self.handler = handler

    def attach(self, engine: Engine) -> None:
        """Register on ``Events.EXCEPTION_RAISED`` of ``engine`` (the trainer)."""
        engine.add_event_handler(Events.EXCEPTION_RAISED, self)

    def __call__(self, engine: Engine, error: BaseException) -> None:
        """End the run as FAILED (a failure to do so is logged, never hides ``error``), then raise ``error``."""
        run = getattr(self.handler, "cur_run", None)
        if run is not None:
            try:
                self.handler.client.set_terminated(run.info.run_id, "FAILED")
                self.handler.cur_run = None
            except Exception as e:  # noqa: BLE001 - the training's error is the one to report
                _logger.warning(f"could not mark MLflow run {run.info.run_id} FAILED: {e}")
        raise error


def track_training_terms(handlers: list, output_transform: Callable[[Any], dict]) -> list:
    """Make the trainer's ``MLFlowHandler`` (if ``--tracking mlflow`` added one) log ``output_transform``'s terms.

    Args:
        handlers: the trainer's handler objects (``train#handlers`` after MONAI's tracking patch).
        output_transform: ``engine.state.output`` -> ``{name: float}`` (the bundle's ``diagnostics#log_terms``).

    Returns:
        ``handlers`` with, per ``MLFlowHandler`` found, an :class:`MLflowFailedRun` in front (a new list; the
        same list when there is none).
    """
    try:
        from monai.handlers import MLFlowHandler
    except ImportError:  # pragma: no cover - MONAI always has the class; mlflow itself is optional
        return handlers
    tracked = [h for h in handlers if isinstance(h, MLFlowHandler)]
    for h in tracked:
        h.output_transform = output_transform
    return [MLflowFailedRun(h) for h in tracked] + list(handlers) if tracked else handlers
