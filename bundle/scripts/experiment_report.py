"""Write the report of a protocol matrix run by ``experiment.py``: ``report.md``, ``report.csv`` and ``curves.png``.

It reads what every ``<arm>_s<seed>`` run folder holds (MetricsSaver's per-case CSVs under ``eval/``, the validation
lines of ``train.log``, ``timing.json``, the ``done_*`` markers) and ``matrix.json``, so the report can be (re)written
at any time from whatever runs are finished, apart from the runner that trains them, and names the runs still missing.

Example::

    python bundle/scripts/experiment_report.py --output_dir /work/runs/x --baseline sup
"""

from __future__ import annotations

import csv
import json
import os
import platform
import re
import shlex
import sys
import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime
from importlib import metadata
from typing import Any

import numpy as np

__all__ = ["MODELS", "METRICS", "CSV_FIELDS", "report", "read_raw_csv", "parse_validation_log", "main"]

MODELS = {"ensemble": "val_", "predictive": "val_predictive_", "auxiliary": "val_auxiliary_"}
METRICS = {"dice": "mean_dice", "jaccard": "jaccard", "hd95": "hd95", "asd": "asd"}
LABELS = {"dice": "Dice", "jaccard": "Jaccard", "hd95": "95HD", "asd": "ASD"}
HIGHER_IS_BETTER = {"dice": True, "jaccard": True, "hd95": False, "asd": False}
TESTED = ("dice", "hd95")  # metrics with a paired test against the baseline
CSV_FIELDS = ["arm", "seed", "model", "metric", "mean", "std", "n", "n_nonfinite", "delta_vs_baseline", "p_value",
              "wins", "n_pairs"]  # fmt: skip


def read_raw_csv(path: str) -> dict[str, float]:
    """Per-case ``mean`` column of a MetricsSaver ``<metric>_raw.csv``.

    The header is ``filename<d>class0<d>...<d>mean``; ``<d>`` is "," (MONAI's default) or a tab, detected from it.

    Args:
        path: the ``<metric>_raw.csv`` file.

    Returns:
        ``{filename: value}`` in file order; nan and inf are kept.
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
    """Validation metrics from StatsHandler's ``Epoch[e] Metrics -- name: value ...`` lines of a training log.

    ANSI codes and progress-bar carriage returns are ignored; a repeated epoch (a resumed run) keeps the last values.

    Args:
        text: the log's text.

    Returns:
        ``{epoch: {metric: value}}``.
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


def report(output_dir: str, baseline: str = "sup", known_arms: Mapping[str, Sequence[str]] | None = None) -> str:
    """Write ``report.md``, ``report.csv`` and ``curves.png`` into ``output_dir`` from its finished runs.

    Args:
        output_dir: the ``output_dir`` of ``experiment.py run``.
        baseline: the arm every other arm is tested against (paired Wilcoxon over the same cases and seed).
        known_arms: ``{arm: override args}`` that orders the arms found on disk but not in ``matrix.json`` and
            describes the arms ``matrix.json`` lacks; ``None`` takes ``experiment.ARMS``.

    Returns:
        The path of ``report.md``.
    """
    if known_arms is None:
        known_arms = _runner_arms()
    output_dir = os.path.abspath(output_dir)
    matrix = _read_json(os.path.join(output_dir, "matrix.json")) or {}
    found = [m for d in sorted(os.listdir(output_dir)) if (m := re.fullmatch(r"(.+)_s(-?\d+)", d))
             and os.path.isdir(os.path.join(output_dir, d))]  # fmt: skip
    planned = [*matrix.get("arms", {}), *(a for a in known_arms if a in {m[1] for m in found})]
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
          f"- baseline: `{baseline}`; arms: " + "; ".join(
              f"`{a}` {matrix.get('arms', known_arms).get(a, known_arms.get(a, '?'))}" for a in arms), "",
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


def _runner_arms() -> dict[str, list[str]]:
    """``experiment.ARMS``, the runner's arm table, from the script next to this one (the standalone CLI)."""
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    from experiment import ARMS

    return ARMS


def _read_json(path: str) -> dict | None:
    return json.loads(open(path).read()) if os.path.exists(path) else None


def main(argv: Sequence[str] | None = None) -> None:
    """The CLI: ``python bundle/scripts/experiment_report.py --output_dir OUT [--baseline sup]``.

    Args:
        argv: the command line without the program name; ``None`` takes ``sys.argv[1:]``.
    """
    import fire

    fire.Fire(report, command=list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
