"""Distributed training and evaluation (bundle/configs/multi_gpu_*.yaml) with torchrun on CPU (gloo backend).

Two processes, tiny 32^3 phantoms and four iterations; the networks are the real ones. Checks that both ranks
finish, that only rank 0 writes checkpoints, that the ranks end with bit-identical weights (parameters and
BatchNorm buffers), and that multi-process evaluation writes the single-process metrics.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "bundle" / "configs"
NPROC = 2
TINY = {
    "max_iterations": "4",
    "val_interval": "2",
    "roi_size": "[32,32,32]",
    "sw_stride": "[16,16,16]",
    "sw_batch_size": "1",
    "num_workers": "0",
    "labeled_batch_size": "1",
    "unlabeled_batch_size": "1",
}
# test-only override: every rank saves its final deployed state dict (after the process group is gone, so
# the rank comes from torchrun's environment)
DUMP_YAML = """\
rank_dump_dir: null
+finalize:
  - "$torch.save({k: v.detach().cpu().contiguous() for k, v in @network.state_dict().items()}, \
os.path.join(@rank_dump_dir, 'rank' + os.environ['RANK'] + '.pt'))"
"""

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
        reason="needs torch.distributed with the gloo backend",
    ),
]


def _config(files: list[str | Path]) -> str:
    return "[" + ",".join(f"'{f if os.path.isabs(f) else CONFIGS / f}'" for f in files) + "]"


def _run(run_id: str, files: list[str | Path], overrides: dict[str, str], nproc: int | None = NPROC) -> str:
    """``monai.bundle run`` under ``torchrun --standalone --nproc_per_node=nproc`` (``None``: plain python)."""
    launcher = [sys.executable]
    if nproc is not None:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = launcher + ["-m", "monai.bundle", "run", run_id, "--config_file", _config(files)]
    for key, value in overrides.items():
        cmd += [f"--{key}", value]
    inherited = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in inherited}
    env["OMP_NUM_THREADS"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU/gloo path, also on a GPU machine
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, f"{run_id} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def ddp_run(make_phantoms) -> dict:
    # two validation cases: one per rank, so validation and evaluation are sharded
    datalist = make_phantoms("ddp_bundle", num_validation=2, shape=(32, 32, 32), seed=5)
    root = datalist.parent.parent
    dump_dir = root / "rank_states"
    dump_dir.mkdir()
    dump_yaml = root / "dump_rank_state.yaml"
    dump_yaml.write_text(DUMP_YAML)
    overrides = {"bundle_root": str(root), "datalist": str(datalist), **TINY}
    log = _run(
        "training",
        ["train.yaml", "multi_gpu_train.yaml", dump_yaml],
        {**overrides, "rank_dump_dir": str(dump_dir)},
    )
    return {"root": root, "dump_dir": dump_dir, "overrides": overrides, "log": log}


def test_both_ranks_finish_and_rank0_writes_the_model(ddp_run: dict) -> None:
    root = ddp_run["root"]
    # each rank writes its dump in `finalize`, i.e. after its training run returned
    assert sorted(p.name for p in ddp_run["dump_dir"].iterdir()) == [f"rank{r}.pt" for r in range(NPROC)]
    assert sorted(p.name for p in (root / "models").iterdir()) == ["model.architecture.json", "model.pt"]
    state = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
    state = state.get("model", state)
    dumped = torch.load(ddp_run["dump_dir"] / "rank0.pt", map_location="cpu", weights_only=True)
    # the deployed state dict, without DDP's `module.` prefix: loads into the single-process network_def
    assert set(state) == set(dumped)
    assert not any(k.startswith("module.") or ".module." in k for k in state)
    assert "loss_contrastive" in ddp_run["log"]
    assert ddp_run["log"].count("Got new best metric") >= 1


def test_ranks_end_with_identical_weights(ddp_run: dict) -> None:
    states = [
        torch.load(ddp_run["dump_dir"] / f"rank{r}.pt", map_location="cpu", weights_only=True) for r in range(NPROC)
    ]
    keys = set(states[0])
    assert any("running_mean" in k for k in keys)  # BatchNorm buffers are compared too
    for other in states[1:]:
        assert set(other) == keys
        different = [k for k in sorted(keys) if not torch.equal(states[0][k], other[k])]
        assert not different, f"{len(different)} tensors differ between ranks, e.g. {different[:5]}"


def _metrics(folder: Path) -> dict[str, float]:
    with open(folder / "metrics.csv") as f:
        return {row[0]: float(row[1]) for row in csv.reader(f) if row}


def _raw(folder: Path, name: str) -> list[list[str]]:
    with open(folder / f"{name}_raw.csv") as f:
        return [row for row in csv.reader(f)]


def test_multi_process_evaluation_matches_single_process(ddp_run: dict) -> None:
    root, overrides = ddp_run["root"], ddp_run["overrides"]
    single, multi = root / "eval_single", root / "eval_multi"
    _run("evaluating", ["train.yaml", "evaluate.yaml"], {**overrides, "output_dir": str(single)}, nproc=None)
    _run(
        "evaluating",
        ["train.yaml", "evaluate.yaml", "multi_gpu_evaluate.yaml"],
        {**overrides, "output_dir": str(multi)},
    )
    for name in ("val_mean_dice", "val_jaccard", "val_hd95", "val_asd"):
        rows_single, rows_multi = _raw(single, name), _raw(multi, name)
        assert len(rows_single) == 3  # header + the two validation cases, each exactly once
        assert sorted(rows_multi) == sorted(rows_single)
    m_single, m_multi = _metrics(single), _metrics(multi)
    assert m_single.keys() == m_multi.keys() and m_single
    for key, value in m_single.items():
        assert m_multi[key] == pytest.approx(value, rel=1e-6, abs=1e-6)
