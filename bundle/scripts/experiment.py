"""Run a protocol matrix of bundle trainings (arms x seeds), evaluate every run and write a report.

Examples::

    # four arms x two seeds on LA-half, seed-major; rerun the same command after a kill to continue
    python bundle/scripts/experiment.py run --dataset_dir /work/data/la_half_nii --output_dir /work/runs/x \\
        --arms "['sup','bn_control','mcf','full']" --seeds "[1337,2024]" --max_iterations 300 --val_interval 100 \\
        --extra="--num_workers 1"

    # an arm of your own (merged into ARMS)
    python bundle/scripts/experiment.py run ... --arms "['sup','no_reg']" --custom "{'no_reg': ['--lambda_reg', '0']}"

    # (re)write report.md, report.csv and curves.png from whatever runs are finished (experiment_report.py)
    python bundle/scripts/experiment.py report --output_dir /work/runs/x --baseline sup

``<output_dir>/<arm>_s<seed>/`` is the run's ``bundle_root`` (``models/``, ``ckpt/``, ``train.log``, ``eval.log``,
``eval/`` with MetricsSaver's CSVs, ``run.json``, ``timing.json``, markers ``done_train`` / ``done_eval``);
``<output_dir>/matrix.json`` keeps the planned arms and seeds, so that the report names the runs still missing.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # the report module next to this script, however this one was loaded
    sys.path.insert(0, _HERE)

import experiment_report  # noqa: E402
from experiment_report import METRICS, MODELS, parse_validation_log, read_raw_csv  # noqa: E402

__all__ = ["ARMS", "MODELS", "METRICS", "main", "run", "report", "train_command", "eval_command", "read_raw_csv",
           "parse_validation_log"]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_CONFIGS = ["bundle/configs/train.yaml", "bundle/configs/la.yaml", "bundle/configs/la_half.yaml"]
EVAL_CONFIGS = [*TRAIN_CONFIGS, "bundle/configs/evaluate.yaml"]
ARMS: dict[str, list[str]] = {
    "sup": ["--supervised_only", "True"],  # both nets on labelled crops only
    "bn_control": ["--lambda_u", "0", "--lambda_c", "0"],  # unlabelled crops in the batch, no unsupervised loss
    # MCF-style two-net baseline: no MultiCURE, no contrastive loss, the better net of each iteration teaches
    "mcf": ["--use_multicure", "False", "--use_contrastive", "False", "--teacher", "better"],
    "full": [],  # the full method, bundle defaults
    "band": ["--contrastive_anchors", "band"],  # eq. 5 anchored on the labelled boundary band (the default since v0.7)
    "labelled": ["--contrastive_anchors", "labelled"],  # eq. 5 on the uncertain labelled voxels (the v0.6 default)
    "authors": ["--multicure_form", "authors"],  # the authors' released MultiCURE block
    "level1": ["--multicure_level", "1"],  # the block on the half-resolution decoder stage (the paper's place)
    # the full method with the paper's reading of every switch (bundle/docs/README.md, "Method switches")
    "paper": ["--teacher", "predictive", "--reg_normalization", "xor", "--reg_confidence_threshold", "None",
              "--rampup_iterations", "@max_iterations", "--contrastive_anchors", "all"],  # fmt: skip
}


def _bracket(values: Any, quote: bool = False) -> str:
    return values if isinstance(values, str) else "[" + ",".join(f"'{v}'" if quote else str(v) for v in values) + "]"


def _bundle(run_id: str, configs: list[str], run_dir: str, dataset_dir: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", _bracket(configs, quote=True),
            "--dataset_dir", dataset_dir, "--bundle_root", run_dir, *args]  # fmt: skip


def train_command(run_dir: str, dataset_dir: str, seed: int, max_iterations: int, val_interval: int,
                  arm_args: Sequence[str] = (), stride: Any = (18, 18, 4),
                  extra: Sequence[str] = ()) -> list[str]:  # fmt: skip
    """The ``python -m monai.bundle run training`` command line of one run (``--resume auto``)."""
    return _bundle("training", TRAIN_CONFIGS, run_dir, dataset_dir, "--seed", str(seed), "--max_iterations",
                   str(max_iterations), "--val_interval", str(val_interval), "--sw_stride", _bracket(stride),
                   "--resume", "auto", *arm_args, *extra)  # fmt: skip


def eval_command(run_dir: str, dataset_dir: str, arm_args: Sequence[str] = (), stride: Any = (9, 9, 2),
                 extra: Sequence[str] = ()) -> list[str]:  # fmt: skip
    """The ``python -m monai.bundle run evaluating`` command line of one run; CSVs go to ``<run_dir>/eval``."""
    return _bundle("evaluating", EVAL_CONFIGS, run_dir, dataset_dir, "--output_dir", os.path.join(run_dir, "eval"),
                   "--sw_stride", _bracket(stride), *arm_args, *extra)  # fmt: skip


def run(dataset_dir: str, output_dir: str, arms: Any = ("sup", "bn_control", "mcf", "full"), seeds: Any = (1337,),
        max_iterations: int = 300, val_interval: int = 100, train_stride: Any = (18, 18, 4),
        eval_stride: Any = (9, 9, 2), extra: Any = "", custom: dict | None = None,
        baseline: str = "sup") -> str:  # fmt: skip
    """Train and evaluate every (seed, arm) run, seed-major, then write the report; returns the report path.

    Args:
        dataset_dir: folder with ``datalist.json`` (``--dataset_dir`` of the bundle).
        output_dir: one sub-folder ``<arm>_s<seed>`` per run, plus the report.
        arms: names in :data:`ARMS` (or in ``custom``), a list or a comma-separated string.
        seeds: training seeds, a list or one int.
        max_iterations: ``--max_iterations`` of every training.
        val_interval: ``--val_interval`` (validation, checkpoints and the x axis of the curves).
        train_stride: ``--sw_stride`` of the validation during training.
        eval_stride: ``--sw_stride`` of the final evaluation.
        extra: further bundle overrides for training and evaluation, e.g. ``"--num_workers 1"``.
        custom: extra arms ``{name: [override args]}``, merged into :data:`ARMS`.
        baseline: the arm the others are tested against in the report.

    A run with ``done_train`` skips training (otherwise ``--resume auto`` continues its checkpoint), one with
    ``done_eval`` skips evaluation. A failing subprocess is reported with its log tail and the matrix goes on.
    """
    table = {**ARMS, **{str(k): [str(a) for a in v] for k, v in (custom or {}).items()}}
    arms = [a.strip() for a in arms.split(",")] if isinstance(arms, str) else [str(a) for a in arms]
    seeds = [int(s) for s in (str(seeds).split(",") if isinstance(seeds, (int, str)) else seeds)]
    unknown = [a for a in arms if a not in table]
    if unknown:
        raise ValueError(f"unknown arms {unknown}; known: {sorted(table)} (add others with --custom)")
    extra = shlex.split(extra) if isinstance(extra, str) else [str(e) for e in extra]
    output_dir, dataset_dir = os.path.abspath(output_dir), os.path.abspath(dataset_dir)
    os.makedirs(output_dir, exist_ok=True)
    matrix = _read_json(os.path.join(output_dir, "matrix.json")) or {}
    matrix["arms"] = {**matrix.get("arms", {}), **{a: table[a] for a in arms}}
    matrix["seeds"] = list(dict.fromkeys([*matrix.get("seeds", []), *seeds]))
    matrix.update(val_interval=val_interval, max_iterations=max_iterations, dataset_dir=dataset_dir)
    _write_json(os.path.join(output_dir, "matrix.json"), matrix)
    plan = [(seed, arm) for seed in seeds for arm in arms]
    failed = []
    for i, (seed, arm) in enumerate(plan, 1):
        run_dir = os.path.join(output_dir, f"{arm}_s{seed}")
        cmds = {"train": train_command(run_dir, dataset_dir, seed, max_iterations, val_interval, table[arm],
                                       train_stride, extra),
                "eval": eval_command(run_dir, dataset_dir, table[arm], eval_stride, extra)}  # fmt: skip
        if not _run_one(run_dir, cmds, f"[{i}/{len(plan)}] {arm} seed {seed}",
                        {"arm": arm, "seed": seed, "arm_args": table[arm], "val_interval": val_interval}):  # fmt: skip
            failed.append(f"{arm}_s{seed}")
    if failed:
        print(f"failed runs: {failed}", file=sys.stderr)
    return report(output_dir, baseline)


def _run_one(run_dir: str, cmds: dict[str, list[str]], tag: str, info: dict) -> bool:
    os.makedirs(run_dir, exist_ok=True)
    if not os.path.exists(os.path.join(run_dir, "done_train")):  # what the (resumed) training runs with
        commands = {f"{step}_command": shlex.join(cmd) for step, cmd in cmds.items()}
        _write_json(os.path.join(run_dir, "run.json"), {**info, **commands})
    timing_path = os.path.join(run_dir, "timing.json")
    for step, cmd in cmds.items():
        if os.path.exists(os.path.join(run_dir, f"done_{step}")):
            print(f"{tag}: {step} already done, skipped", flush=True)
            continue
        print(f"{tag}: {step} ...", flush=True)
        log = os.path.join(run_dir, f"{step}.log")
        start = time.perf_counter()
        rc = _execute(cmd, log)
        seconds = time.perf_counter() - start
        timing = _read_json(timing_path) or {}
        # a resumed training continues: its wall time adds up; a repeated evaluation starts again
        timing[f"{step}_s"] = timing.get(f"{step}_s", 0.0) + seconds if step == "train" else seconds
        timing[f"{step}_attempts"] = timing.get(f"{step}_attempts", 0) + 1
        timing[f"{step}_rc"] = rc
        _write_json(timing_path, timing)
        if rc != 0:
            print(f"{tag}: {step} FAILED (exit {rc}); tail of {log}:\n{_tail(log)}", file=sys.stderr, flush=True)
            return False
        open(os.path.join(run_dir, f"done_{step}"), "w").close()
        print(f"{tag}: {step} done in {seconds / 60:.1f} min", flush=True)
    return True


def _execute(cmd: list[str], log_path: str) -> int:
    """Run ``cmd`` from the repository root, stdout and stderr appended to ``log_path``; returns the exit code."""
    with open(log_path, "a") as log:
        log.write(f"\n=== {datetime.now().isoformat(timespec='seconds')}: {shlex.join(cmd)}\n")
        log.flush()
        env = dict(os.environ, PYTHONUNBUFFERED="1")  # the log follows the run live
        return subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=False).returncode


def _tail(path: str, lines: int = 25) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 8000))
        text = f.read().decode(errors="replace").replace("\r", "\n")
    return "\n".join([ln for ln in text.splitlines() if ln.strip()][-lines:])


def report(output_dir: str, baseline: str = "sup") -> str:
    """Write ``report.md``, ``report.csv`` and ``curves.png`` into ``output_dir`` from its finished runs.

    :func:`experiment_report.report` with :data:`ARMS` as the known arms.

    Args:
        output_dir: the ``output_dir`` of :func:`run`.
        baseline: the arm every other arm is tested against (paired Wilcoxon over the same cases and seed).

    Returns:
        The path of ``report.md``.
    """
    return experiment_report.report(output_dir, baseline, known_arms=ARMS)


def _read_json(path: str) -> dict | None:
    return json.loads(open(path).read()) if os.path.exists(path) else None


def _write_json(path: str, data: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=2)
    os.replace(path + ".tmp", path)  # a kill never leaves half a file


def main(argv: Sequence[str] | None = None) -> None:
    """The CLI. ``--extra "--num_workers 1"`` becomes ``--extra=...``: fire would read it as a boolean flag."""
    import fire

    args: list[str] = []
    for arg in sys.argv[1:] if argv is None else argv:
        if args and args[-1] == "--extra":
            args[-1] = f"--extra={arg}"
        else:
            args.append(arg)
    # `kill <pid>` ends the running training too (subprocess.run kills its child on SystemExit); it resumes later
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    fire.Fire({"run": run, "report": report}, command=args)


if __name__ == "__main__":
    main()
