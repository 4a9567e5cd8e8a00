"""The trainer's MLflow run gets the loss terms and ends FAILED when training raises
(multicure_monai/handlers/tracking.py); skipped where mlflow is not installed (the `tracking` extra)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ignite.engine import Engine
from monai.handlers import MLFlowHandler, StatsHandler
from monai.utils import path_to_sqlite_uri

from multicure_monai.handlers.progress_bar import scalar_terms
from multicure_monai.handlers.tracking import MLflowFailedRun, track_training_terms

mlflow = pytest.importorskip("mlflow", reason="mlflow is not installed (pip install -e '.[tracking]')")


def _terms(output):
    return scalar_terms(output, prefix=("loss", "diag_"))


def _run(tmp_path: Path, fail_at: int | None) -> tuple[str, dict]:
    uri = path_to_sqlite_uri(str(tmp_path / "mlruns.db"))
    handler = MLFlowHandler(tracking_uri=uri, experiment_name="t", tag_name="train_loss", close_on_complete=True,
                            output_transform=lambda out: out["loss"])  # fmt: skip  # as MONAI's default settings

    def step(engine, batch):
        if engine.state.iteration == fail_at:
            raise RuntimeError("boom")
        return {"loss": torch.tensor(1.0), "loss_sup": torch.tensor(0.5), "diag_fg_label": 0.2, "pred": None}

    engine = Engine(step)
    handlers = track_training_terms([StatsHandler(output_transform=_terms), handler], _terms)
    assert isinstance(handlers[0], MLflowFailedRun) and handlers[2] is handler
    for h in handlers:
        h.attach(engine)
    if fail_at is None:
        engine.run([0, 1, 2], max_epochs=1)
    else:
        with pytest.raises(RuntimeError, match="boom"):  # the error still reaches the caller
            engine.run([0, 1, 2], max_epochs=1)
    client = mlflow.tracking.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    return run.info.status, run.data.metrics


@pytest.mark.parametrize("fail_at, status", [(None, "FINISHED"), (2, "FAILED")])
def test_run_logs_terms_and_ends(tmp_path: Path, fail_at: int | None, status: str) -> None:
    final_status, metrics = _run(tmp_path, fail_at)
    assert final_status == status
    assert {"loss", "loss_sup", "diag_fg_label"} <= set(metrics)


def test_without_mlflow_handler_the_list_is_unchanged() -> None:
    handlers = [StatsHandler()]
    assert track_training_terms(handlers, _terms) is handlers
