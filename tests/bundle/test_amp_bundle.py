"""``--precision#amp True`` through the bundle on CPU: training and validation run and say which precision runs
(inference.yaml hands the same precision ids to the same inferer)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from multicure_monai.precision import cpu_supports_bf16

CONFIGS = Path(__file__).resolve().parents[2] / "bundle" / "configs"
TINY = {"max_iterations": "2", "val_interval": "2", "roi_size": "[32,32,32]", "sw_stride": "[16,16,16]",
        "sw_batch_size": "2", "num_workers": "0", "precision#amp": "True", "device": "$torch.device('cpu')"}

pytestmark = pytest.mark.slow


def _run(run_id: str, config_file: str, overrides: dict[str, str]) -> str:
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", str(CONFIGS / config_file)]
    for key, value in overrides.items():
        cmd += [f"--{key}", value]
    proc = subprocess.run(cmd, cwd=CONFIGS.parents[1], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{run_id} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def test_amp_training_on_cpu(make_phantoms) -> None:
    datalist = make_phantoms("bundle_root")
    root = datalist.parent.parent
    paths = {"bundle_root": str(root), "datalist": str(datalist)}
    expected = "bfloat16 autocast on cpu" if cpu_supports_bf16() else "float32 on cpu: this CPU has no bfloat16"
    log = _run("training", "train.yaml", {**paths, **TINY})
    assert f"training precision: {expected}" in log
    assert f"sliding-window inference precision: {expected}" in log  # validation
    assert (root / "models" / "model.pt").is_file()
