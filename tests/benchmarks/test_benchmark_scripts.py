"""Smoke tests of the benchmark scripts at tiny sizes: they run from the repository root and print their ratios."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CASES = [
    (["benchmarks/deform_conv3d.py", "--shape", "1", "4", "6", "6", "5", "--out-channels", "4", "--repeats", "1",
      "--no-memory", "--grid-sample", "--device", "cpu"], ["gather / conv: time x", "compiled / conv: time x", "grid_sample / conv: time x",
       "compiled / gather: time x"]),
    (["benchmarks/deform_conv3d.py", "--shape", "1", "4", "6", "6", "5", "--out-channels", "4", "--repeats", "1",
      "--no-gather", "--against", "HEAD", "--device", "cpu"], ["compiled / compiled@", "compiled@"]),
    (["benchmarks/train_step.py", "--roi", "16", "16", "16", "--labelled", "1", "--unlabelled", "2", "--repeats", "1",
      "--warmup", "0", "--device", "cpu", "--split"],
     ["ratio paper/reference (total):", "ratio authors/reference (total, fastest steps):",
      "authors floor of the ratio", "loss fwd+bwd: sup=", "contrastive=", "split of the paper step's extra time"]),
    (["benchmarks/train_step.py", "--roi", "16", "16", "16", "--labelled", "1", "--unlabelled", "2", "--repeats", "1",
      "--warmup", "0", "--device", "cpu", "--forms", "authors", "--amp"],
     ["ratio reference+amp/reference (total,", "ratio authors+amp/authors (total,"]),
    (["benchmarks/inference.py", "--shape", "20", "18", "16", "--roi", "16", "16", "16", "--stride", "4", "2", "16",
      "--sw-batch-sizes", "1", "2", "--repeats", "1", "--device", "cpu", "--threads", "1", "--amp"],
     ["fastest ensemble on", "fg Dice"]),
    (["benchmarks/inference.py", "--la", "--shape", "20", "18", "16", "--roi", "16", "16", "16", "--stride", "4", "2",
      "16", "--repeats", "1", "--device", "cpu", "--threads", "1", "--models", "ensemble", "predictive",
      "ensemble-unfolded"],
     ["fastest predictive on", "ensemble / predictive on", "ensemble / ensemble-unfolded on", "one-window loop", "the loop; labels equal on",
      "fastest float32"]),
    (["benchmarks/cpu_memory.py", "--roi", "16", "16", "16", "--batch", "2", "--repeats", "1", "--passes", "1",
      "--no-step"],
     ["V-Net fwd+bwd: default", "ResNet-VNet+MultiCURE fwd+bwd: default", "kept / default", "peak resident memory"]),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, expected", CASES,
    ids=["deform_conv3d", "deform_conv3d_against", "train_step", "train_step_amp", "inference", "inference_la",
         "cpu_memory"],
)
def test_benchmark_runs_and_reports(args: list[str], expected: list[str]) -> None:
    if "--against" in args and subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("not a git checkout: no other revision's kernels to build")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    for text in expected:
        assert text in out.stdout, out.stdout[-2000:]
