"""Run a protocol matrix of bundle trainings (arms x seeds), evaluate every run and write a report.

Examples::

    # four arms x two seeds on LA-half, seed-major; rerun the same command after a kill to continue
    python bundle/scripts/experiment.py run --dataset_dir /work/data/la_half_nii --output_dir /work/runs/x \\
        --arms "['sup','bn_control','mcf','full']" --seeds "[1337,2024]" --max_iterations 300 --val_interval 100 \\
        --extra="--num_workers 1"

    # an arm of your own (merged into ARMS)
    python bundle/scripts/experiment.py run ... --arms "['sup','no_reg']" --custom "{'no_reg': ['--lambda_reg', '0']}"

    # (re)write report.md, report.csv and curves.png from whatever runs are finished
    python bundle/scripts/experiment.py report --output_dir /work/runs/x --baseline sup

``<output_dir>/<arm>_s<seed>/`` is the run's ``bundle_root`` (``models/``, ``ckpt/``, ``train.log``, ``eval.log``,
``eval/`` with MetricsSaver's CSVs, ``run.json``, ``timing.json``, markers ``done_train`` / ``done_eval``);
``<output_dir>/matrix.json`` keeps the planned arms and seeds, so that the report names the runs still missing.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from datetime import datetime
from importlib import metadata
from typing import Any

import numpy as np

__all__ = ["ARMS", "main", "run", "report", "train_command", "eval_command", "read_raw_csv", "parse_validation_log"]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_CONFIGS = ["bundle/configs/train.yaml", "bundle/configs/la.yaml", "bundle/configs/la_half.yaml"]
EVAL_CONFIGS = [*TRAIN_CONFIGS, "bundle/configs/evaluate.yaml"]
ARMS: dict[str, list[str]] = {
    "sup": ["--supervised_only", "True"],  # both nets on labelled crops only
    "bn_control": ["--lambda_u", "0", "--lambda_c", "0"],  # unlabelled crops in the batch, no unsupervised loss
    "mcf": ["--use_multicure", "False", "--use_contrastive", "False"],  # MCF-style two-net baseline
    "full": [],  # the full method, bundle defaults
}
MODELS = {"ensemble": "val_", "predictive": "val_predictive_", "auxiliary": "val_auxiliary_"}
METRICS = {"dice": "mean_dice", "jaccard": "jaccard", "hd95": "hd95", "asd": "asd"}
LABELS = {"dice": "Dice", "jaccard": "Jaccard", "hd95": "95HD", "asd": "ASD"}
HIGHER_IS_BETTER = {"dice": True, "jaccard": True, "hd95": False, "asd": False}
TESTED = ("dice", "hd95")  # metrics with a paired test against the baseline
CSV_FIELDS = ["arm", "seed", "model", "metric", "mean", "std", "n", "n_nonfinite", "delta_vs_baseline", "p_value",
              "wins", "n_pairs"]  # fmt: skip


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


def read_raw_csv(path: str) -> dict[str, float]:
    """Per-case ``mean`` column of a MetricsSaver ``<metric>_raw.csv``: ``{filename: value}`` (nan/inf kept).

    The header is ``filename<d>class0<d>...<d>mean``; ``<d>`` is "," (MONAI's default) or a tab, detected from it.
    """
    with open(path) as f:
        header, *rows = [ln.rstrip("\n") for ln in f if ln.strip()]
    deli = "\t" if "\t" in header else ","
    cols = header.split(deli)
    col = cols.index("mean") if "mean" in cols else len(cols) - 1
    out = {}
    for row in rows:  # the filename may hold the delimiter: split from the right
        parts = row.rsplit(deli, len(cols) - 1)
        out[parts[0]] = float(parts[col])
    return out


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_METRICS = re.compile(r"(?:Epoch\[(\d+)\]\s*)?Metrics -- ")
_PAIR = re.compile(r"\s*([A-Za-z_][\w.\-/]*): ([-+]?(?:nan|inf|\d+(?:\.\d*)?(?:[eE][-+]?\d+)?))", re.IGNORECASE)


def parse_validation_log(text: str) -> dict[int, dict[str, float]]:
    """``{epoch: {metric: value}}`` from StatsHandler's ``Epoch[e] Metrics -- name: value ...`` lines.

    ANSI codes and progress-bar carriage returns are ignored; a repeated epoch (a resumed run) keeps the last values.
    """
    out: dict[int, dict[str, float]] = {}
    for line in _ANSI.sub("", text).replace("\r", "\n").splitlines():
        m = _METRICS.search(line)
        if m is None:
            continue
        pos, values = m.end(), {}
        while (pair := _PAIR.match(line, pos)) is not None:
            values[pair[1]] = float(pair[2])
            pos = pair.end()
        if values:
            out.setdefault(int(m[1]) if m[1] else len(out) + 1, {}).update(values)
    return out


def _load_run(run_dir: str, val_interval: int | None) -> tuple[dict, dict, dict, str]:
    """(values {model: {metric: {case: v}}}, curves {model: [(iteration, dice)]}, timing, missing reason or "")."""
    info = _read_json(os.path.join(run_dir, "run.json")) or {}
    timing = _read_json(os.path.join(run_dir, "timing.json")) or {}
    interval = info.get("val_interval", val_interval) or 1
    curves: dict[str, list] = {}
    if os.path.exists(log := os.path.join(run_dir, "train.log")):
        with open(log, errors="replace") as f:
            epochs = parse_validation_log(f.read())
        for model, prefix in MODELS.items():
            name = prefix + "mean_dice"
            points = [(epoch * interval, v[name]) for epoch, v in sorted(epochs.items()) if name in v]
            if points:
                curves[model] = points
    values: dict[str, dict] = {}
    for model, prefix in MODELS.items():
        for key, name in METRICS.items():
            if os.path.exists(path := os.path.join(run_dir, "eval", f"{prefix}{name}_raw.csv")):
                values.setdefault(model, {})[key] = read_raw_csv(path)
    done = {m: os.path.exists(os.path.join(run_dir, f"done_{m}")) for m in ("train", "eval")}
    if "dice" in values.get("ensemble", {}) and done["eval"]:
        return values, curves, timing, ""
    step, name = ("train", "training") if not done["train"] else ("eval", "evaluation")
    if not os.path.isdir(run_dir):
        return {}, curves, timing, "not started"
    rc = timing.get(step + "_rc")
    return {}, curves, timing, (f"{name} failed (exit {rc})" if rc else "no evaluation CSVs" if done["eval"]
                                else f"{name} not finished")  # fmt: skip


def _summary(values: Sequence[float], ddof: int) -> tuple[float, float, int, int]:
    a = np.asarray(values, dtype=float)
    fin = a[np.isfinite(a)]
    mean = float(fin.mean()) if fin.size else float("nan")
    std = float(fin.std(ddof=ddof)) if fin.size > ddof else float("nan")
    return mean, std, int(fin.size), int(a.size - fin.size)


def _paired(a: np.ndarray, b: np.ndarray, higher_is_better: bool) -> tuple[float, float, int, int]:
    """(mean difference a - b and Wilcoxon p on the finite pairs, wins and pairs among the non-NaN pairs)."""
    from scipy.stats import wilcoxon

    valid = ~(np.isnan(a) | np.isnan(b))
    wins = int(np.sum(a[valid] > b[valid]) if higher_is_better else np.sum(a[valid] < b[valid]))
    fin = np.isfinite(a) & np.isfinite(b)
    delta = p = float("nan")
    if fin.any():
        delta = float(np.mean(a[fin] - b[fin]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ties, zero differences, small n: scipy warns, the p stays
            try:  # older scipy raise on all-zero differences
                p = float(wilcoxon(a[fin], b[fin]).pvalue)
            except ValueError:
                pass
    return delta, p, wins, int(valid.sum())


def _stats(arms: list[str], seeds: list[int], values: dict, baseline: str) -> list[dict]:
    rows = []
    for arm in arms:
        for model in MODELS:
            for key in METRICS:
                per_seed, pooled = [], ([], [])
                for seed in seeds:
                    x = values.get((arm, seed), {}).get(model, {}).get(key)
                    if x is None:
                        continue
                    row = dict(zip(CSV_FIELDS[:8], (arm, seed, model, key, *_summary(list(x.values()), ddof=0))))
                    y = values.get((baseline, seed), {}).get(model, {}).get(key)
                    if key in TESTED and arm != baseline and y is not None:
                        cases = [c for c in x if c in y]
                        a, b = np.array([x[c] for c in cases], float), np.array([y[c] for c in cases], float)
                        row.update(zip(CSV_FIELDS[8:], _paired(a, b, HIGHER_IS_BETTER[key])))
                        pooled[0].append(a)
                        pooled[1].append(b)
                    per_seed.append(row)
                if not per_seed:
                    continue
                mean, std, n, _ = _summary([r["mean"] for r in per_seed], ddof=1)
                row = dict(arm=arm, seed="all", model=model, metric=key, mean=mean, std=std, n=n,
                           n_nonfinite=sum(r["n_nonfinite"] for r in per_seed))  # fmt: skip
                if pooled[0]:
                    row.update(zip(CSV_FIELDS[8:], _paired(np.concatenate(pooled[0]), np.concatenate(pooled[1]),
                                                           HIGHER_IS_BETTER[key])))  # fmt: skip
                rows += [*per_seed, row]
    return rows


def _collapse(points: list) -> tuple[float, float, float]:
    """(best, last, largest drop from the best so far) of a validation curve."""
    dice = np.array([v for _, v in points], dtype=float)
    return float(np.nanmax(dice)), float(dice[-1]), float(np.nanmax(np.fmax.accumulate(dice) - dice))


def _plot(curves: dict, arms: list[str], seeds: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MODELS), figsize=(5 * len(MODELS), 4), sharey=True)
    colours, styles = plt.get_cmap("tab10"), ["-", "--", ":", "-."]
    for ax, model in zip(axes, MODELS):
        for (arm, seed), by_model in curves.items():
            if model in by_model:
                x, y = zip(*by_model[model])
                ax.plot(x, y, color=colours(arms.index(arm) % 10), linestyle=styles[seeds.index(seed) % 4],
                        marker=".", label=f"{arm} s{seed}")  # fmt: skip
        ax.set(title=f"{model} net" if model != "ensemble" else "ensemble", xlabel="iteration")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation Dice")
    legend = {lab: h for ax in axes for h, lab in zip(*ax.get_legend_handles_labels())}
    if legend:
        fig.legend(legend.values(), legend.keys(), fontsize=7, loc="center right")
    fig.tight_layout(rect=(0, 0, 0.92 if legend else 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _f(v: Any, digits: int = 3, sign: bool = False) -> str:
    if v is None or v == "" or (isinstance(v, float) and np.isnan(v)):
        return "–"
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def _ms(row: dict | None, digits: int) -> str:
    if row is None:
        return "–"
    text = f"{_f(row['mean'], digits)} ± {_f(row['std'], digits)}"
    return text + (f" ({row['n_nonfinite']} non-finite)" if row["n_nonfinite"] else "")


def _test(row: dict | None, digits: int) -> str:
    if row is None or row.get("p_value") is None:
        return "–"
    return f"{_f(row['delta_vs_baseline'], digits, True)}, p={_p(row['p_value'])}, {row['wins']}/{row['n_pairs']}"


def _p(p: float | None) -> str:
    return "–" if p is None or np.isnan(p) else f"{p:.3g}"


def report(output_dir: str, baseline: str = "sup") -> str:
    """Write ``report.md``, ``report.csv`` and ``curves.png`` into ``output_dir`` from its finished runs.

    Args:
        output_dir: the ``output_dir`` of :func:`run`.
        baseline: the arm every other arm is tested against (paired Wilcoxon over the same cases and seed).

    Returns:
        The path of ``report.md``.
    """
    output_dir = os.path.abspath(output_dir)
    matrix = _read_json(os.path.join(output_dir, "matrix.json")) or {}
    found = [m for d in sorted(os.listdir(output_dir)) if (m := re.fullmatch(r"(.+)_s(-?\d+)", d))
             and os.path.isdir(os.path.join(output_dir, d))]  # fmt: skip
    planned = [*matrix.get("arms", {}), *(a for a in ARMS if a in {m[1] for m in found})]
    arms = list(dict.fromkeys([*planned, *sorted(m[1] for m in found)]))
    seeds = list(dict.fromkeys([*matrix.get("seeds", []), *sorted(int(m[2]) for m in found)]))
    values, curves, timings, missing = {}, {}, {}, {}
    for seed in seeds:
        for arm in arms:
            run_dir = os.path.join(output_dir, f"{arm}_s{seed}")
            vals, curve, timings[(arm, seed)], reason = _load_run(run_dir, matrix.get("val_interval"))
            values[(arm, seed)], curves[(arm, seed)] = vals, curve
            if reason:
                missing[(arm, seed)] = reason
    rows = _stats(arms, seeds, values, baseline)
    with open(os.path.join(output_dir, "report.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS, restval="")
        writer.writeheader()
        writer.writerows(rows)
    _plot({k: v for k, v in curves.items() if v}, arms, seeds, os.path.join(output_dir, "curves.png"))
    row = {(r["arm"], r["seed"], r["model"], r["metric"]): r for r in rows}
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "not installed"
    md = [f"# Protocol matrix: {', '.join(arms)} x seeds {', '.join(map(str, seeds))}", "",
          f"- command: `{shlex.join(sys.argv)}`", f"- date: {datetime.now().isoformat(timespec='seconds')}",
          f"- machine: {platform.processor() or '?'} / {platform.node()}, {os.cpu_count()} CPUs, torch {torch_version}",
          f"- baseline: `{baseline}`; arms: " + "; ".join(f"`{a}` {matrix.get('arms', ARMS).get(a, ARMS.get(a, '?'))}"
                                                         for a in arms), "",  # fmt: skip
          "Test metrics are per-case means over the foreground classes; `mean ± std` over cases per seed (std ddof 0, "
          "as MetricsSaver's summary), over seeds the mean ± std (ddof 1) of the per-seed means. Non-finite cases "
          "(a model predicting nothing) are kept in the CSVs and left out of means, Δ and p (wins count an infinite "
          "distance as worse). Δ = mean paired "
          f"difference vs `{baseline}` pooled over seeds, p = two-sided Wilcoxon signed-rank over those pairs, wins = "
          "cases better than the baseline / pairs. Validation Dice during training: best / last / largest drop "
          "from the best so far (collapse check), one value per seed.", ""]  # fmt: skip
    head = ["arm", "model", *(f"Dice s{s}" for s in seeds), "Dice (seeds)", f"ΔDice vs {baseline}", "p", "wins",
            "95HD", "ASD", "Jaccard", "train time", "val Dice best", "val Dice last", "max drop"]  # fmt: skip
    md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in arms:
        times = " / ".join(f"{timings[(arm, s)]['train_s'] / 60:.1f} min" if "train_s" in timings[(arm, s)] else "–"
                           for s in seeds)  # fmt: skip
        for model in MODELS:
            dice = row.get((arm, "all", model, "dice"))
            coll = [_collapse(curves[(arm, s)][model]) if model in curves[(arm, s)] else None for s in seeds]
            cells = [arm, model]
            cells += ["missing" if (arm, s) in missing else _ms(row.get((arm, s, model, "dice")), 3) for s in seeds]
            cells += [_ms(dice, 3), _f(dice and dice.get("delta_vs_baseline"), 3, True),
                      _p(dice and dice.get("p_value")), f"{dice['wins']}/{dice['n_pairs']}" if dice and "wins" in dice
                      else "–"]  # fmt: skip
            cells += [_ms(row.get((arm, "all", model, k)), n) for k, n in (("hd95", 2), ("asd", 2), ("jaccard", 3))]
            cells += [times if model == "ensemble" else ""]
            cells += [" / ".join(_f(c[i]) if c else "–" for c in coll) for i in range(3)]
            md.append("| " + " | ".join(cells) + " |")
    md += ["", f"## Paired tests vs `{baseline}` (Δ, Wilcoxon p, wins/pairs)", ""]
    head = ["arm", "model", "metric", *(f"s{s}" for s in seeds), "pooled"]
    md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in (a for a in arms if a != baseline):
        for model in MODELS:
            for key in TESTED:
                digits = 3 if key == "dice" else 2
                cells = [_test(row.get((arm, s, model, key)), digits) for s in [*seeds, "all"]]
                if any(c != "–" for c in cells):
                    md.append(f"| {arm} | {model} | {LABELS[key]} | " + " | ".join(cells) + " |")
    md += ["", "## Runs", "", "| run | status | train | eval |", "|---|---|---|---|"]
    for seed in seeds:
        for arm in arms:
            t = timings[(arm, seed)]
            md.append(f"| {arm}_s{seed} | {'missing: ' + missing[(arm, seed)] if (arm, seed) in missing else 'ok'} | "
                      + " | ".join(f"{t[k] / 60:.1f} min" if k in t else "–" for k in ("train_s", "eval_s")) + " |")
    md += ["", "![validation Dice](curves.png)", ""]
    path = os.path.join(output_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(md))
    return path


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
