"""`python -m monai.bundle run training ... --tracking mlflow`: the MLflow run holds the validation Dice of every
net, the loss terms and diagnostics, and ends FINISHED; skipped where mlflow is not installed (the `tracking`
extra)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from monai.utils import path_to_sqlite_uri

mlflow = pytest.importorskip("mlflow", reason="mlflow is not installed (pip install -e '.[tracking]')")

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _run(run_id: str, configs: list[str], overrides: dict[str, str]) -> None:
    files = "[" + ",".join(f"'{REPO / 'bundle' / 'configs' / c}'" for c in configs) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", files]
    for key, value in overrides.items():
        cmd += [f"--{key}", value]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_tracking_mlflow_holds_what_the_log_shows(make_phantoms, tmp_path: Path) -> None:
    datalist = make_phantoms("tracking")
    uri = path_to_sqlite_uri(str(tmp_path / "mlruns.db"))
    client = mlflow.tracking.MlflowClient(uri)
    experiment = client.create_experiment("tiny", artifact_location=(tmp_path / "artifacts").as_uri())
    killed = client.create_run(experiment, run_name="killed").info.run_id  # left RUNNING by a killed training
    overrides = {"bundle_root": str(tmp_path / "bundle"), "datalist": str(datalist), "max_iterations": "4",
                 "val_interval": "2", "roi_size": "[16,16,16]", "sw_stride": "[16,16,16]", "sw_batch_size": "2",
                 "num_workers": "0", "tracking": "mlflow", "tracking_uri": uri, "experiment_name": "tiny"}  # fmt: skip
    _run("training", ["train.yaml"], overrides)
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    (run,) = [r for r in runs if r.info.run_id != killed]  # its own run, not the killed one continued
    assert run.info.status == "FINISHED"
    assert not client.get_run(killed).data.metrics
    metrics = set(run.data.metrics)
    for net in ("", "predictive_", "auxiliary_"):
        assert {f"val_{net}mean_dice", f"val_{net}hd95"} <= metrics, metrics
    assert {"loss", "loss_sup", "loss_pseudo", "loss_reg", "loss_contrastive"} <= metrics, metrics
    assert any(m.startswith("diag_") for m in metrics), metrics
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss_sup")]
    assert steps == [1, 2, 3, 4]  # every iteration

    # evaluating the trained model is one more run, FINISHED, with every net's evaluation metrics
    _run("evaluating", ["train.yaml", "evaluate.yaml"], overrides)
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    (evaluation,) = [r for r in runs if r.info.run_id not in (killed, run.info.run_id)]
    assert evaluation.info.status == "FINISHED"
    for net in ("", "predictive_", "auxiliary_"):
        assert {f"val_{net}mean_dice", f"val_{net}asd"} <= set(evaluation.data.metrics), evaluation.data.metrics
