"""Write the report of a protocol matrix run by ``experiment.py``: ``report.md``, ``report.csv`` and ``curves.png``.

It reads what every ``<arm>_s<seed>`` run folder holds (MetricsSaver's per-case CSVs under ``eval/``, the validation
and ``diag_grad_*`` lines of ``train.log``, ``timing.json``, the ``done_*`` markers) and ``protocol.json``, so the
report can be (re)written at any time from whatever runs are finished, and names the runs still missing.

The seed is the unit of training randomness: the headline is each arm's mean per-seed paired difference against the
baseline (same seed, same cases) with its 95% t interval over the seeds. Case-level Wilcoxon tests within one seed
are secondary; cases of different seeds are never pooled into one test (pseudo-replication).

Example::

    python bundle/scripts/experiment_report.py --output_dir <runs>/default_vs_sup
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
from collections.abc import Sequence
from datetime import datetime
from importlib import metadata
from typing import Any

import numpy as np
from experiment_curves import collapse, plot_curves

__all__ = ["MODELS", "METRICS", "CSV_FIELDS", "report", "read_raw_csv", "parse_validation_log", "main"]

MODELS = {"ensemble": "val_", "predictive": "val_predictive_", "auxiliary": "val_auxiliary_"}
METRICS = {"dice": "mean_dice", "jaccard": "jaccard", "hd95": "hd95", "asd": "asd"}
LABELS = {"dice": "Dice", "jaccard": "Jaccard", "hd95": "95HD", "asd": "ASD"}
HIGHER_IS_BETTER = {"dice": True, "jaccard": True, "hd95": False, "asd": False}
TESTED = ("dice", "hd95")  # metrics with a paired test against the baseline
CSV_FIELDS = ["arm", "seed", "model", "metric", "mean", "std", "n", "n_nonfinite", "delta_vs_baseline", "p_value",
              "wins", "n_pairs", "ci_low", "ci_high"]  # fmt: skip
_GRAD = re.compile(r"(diag_grad_[A-Za-z0-9_]+): ([-+]?(?:nan|inf|\d+(?:\.\d*)?(?:[eE][-+]?\d+)?))", re.IGNORECASE)


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


def _load_run(run_dir: str, val_interval: int | None) -> tuple[dict, dict, dict, dict, str]:
    """(values {model: {metric: {case: v}}}, curves {model: [(iteration, dice)]}, timing, mean diag_grad_* values,
    missing reason or "")."""
    info = _read_json(os.path.join(run_dir, "run.json")) or {}
    timing = _read_json(os.path.join(run_dir, "timing.json")) or {}
    interval = info.get("val_interval", val_interval) or 1
    curves: dict[str, list] = {}
    grads: dict[str, float] = {}
    if os.path.exists(log := os.path.join(run_dir, "train.log")):
        with open(log, errors="replace") as f:
            text = f.read()
        epochs = parse_validation_log(text)
        for model, prefix in MODELS.items():
            name = prefix + "mean_dice"
            points = [(epoch * interval, v[name]) for epoch, v in sorted(epochs.items()) if name in v]
            if points:
                curves[model] = points
        seen: dict[str, list[float]] = {}
        for name, value in _GRAD.findall(_ANSI.sub("", text)):
            seen.setdefault(name, []).append(float(value))
        grads = {k: float(np.nanmean(v)) for k, v in seen.items()}
    values: dict[str, dict] = {}
    for model, prefix in MODELS.items():
        for key, name in METRICS.items():
            if os.path.exists(path := os.path.join(run_dir, "eval", f"{prefix}{name}_raw.csv")):
                values.setdefault(model, {})[key] = read_raw_csv(path)
    done = {m: os.path.exists(os.path.join(run_dir, f"done_{m}")) for m in ("train", "eval")}
    if "dice" in values.get("ensemble", {}) and done["eval"]:
        return values, curves, timing, grads, ""
    step, name = ("train", "training") if not done["train"] else ("eval", "evaluation")
    if not os.path.isdir(run_dir):
        return {}, curves, timing, grads, "not started"
    rc = timing.get(step + "_rc")
    return {}, curves, timing, grads, (f"{name} failed (exit {rc})" if rc else "no evaluation CSVs" if done["eval"]
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


def _over_seeds(deltas: Sequence[float], higher_is_better: bool) -> dict:
    """Mean of the per-seed paired differences, its 95% t interval and one-sample t-test p (n >= 2), seeds better."""
    from scipy import stats

    d = np.asarray([x for x in deltas if np.isfinite(x)], dtype=float)
    out = {"delta_vs_baseline": float(d.mean()) if d.size else float("nan"), "n_pairs": int(d.size),
           "wins": int(np.sum(d > 0) if higher_is_better else np.sum(d < 0))}  # fmt: skip
    if d.size >= 2:
        half = float(stats.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size))
        out.update(ci_low=out["delta_vs_baseline"] - half, ci_high=out["delta_vs_baseline"] + half)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # identical differences: scipy warns, p is nan
            out["p_value"] = float(stats.ttest_1samp(d, 0.0).pvalue)
    return out


def _stats(arms: list[str], seeds: list[int], values: dict, baseline: str) -> list[dict]:
    """Per seed: the case summary and the case-level test against the baseline's run of the same seed; over the
    seeds (``seed == "all"``): the mean and std of the per-seed means and the seed-level paired statistics."""
    rows = []
    for arm in arms:
        for model in MODELS:
            for key in METRICS:
                per_seed = []
                for seed in seeds:
                    x = values.get((arm, seed), {}).get(model, {}).get(key)
                    if x is None:
                        continue
                    row = dict(zip(CSV_FIELDS[:8], (arm, seed, model, key, *_summary(list(x.values()), ddof=0))))
                    y = values.get((baseline, seed), {}).get(model, {}).get(key)
                    if key in TESTED and arm != baseline and y is not None:
                        cases = [c for c in x if c in y]
                        a, b = np.array([x[c] for c in cases], float), np.array([y[c] for c in cases], float)
                        row.update(zip(CSV_FIELDS[8:12], _paired(a, b, HIGHER_IS_BETTER[key])))
                    per_seed.append(row)
                if not per_seed:
                    continue
                mean, std, n, _ = _summary([r["mean"] for r in per_seed], ddof=1)
                row = dict(arm=arm, seed="all", model=model, metric=key, mean=mean, std=std, n=n,
                           n_nonfinite=sum(r["n_nonfinite"] for r in per_seed))  # fmt: skip
                deltas = [r["delta_vs_baseline"] for r in per_seed if "delta_vs_baseline" in r]
                if deltas:
                    row.update(_over_seeds(deltas, HIGHER_IS_BETTER[key]))
                rows += [*per_seed, row]
    return rows


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


def _ci(row: dict | None, digits: int) -> str:
    """``+d [lo, hi]`` of a seed-level row (the interval needs two seeds)."""
    if not row or "delta_vs_baseline" not in row:
        return "–"
    text = _f(row["delta_vs_baseline"], digits, True)
    return text + (f" [{_f(row['ci_low'], digits, True)}, {_f(row['ci_high'], digits, True)}]" if "ci_low" in row
                   else " (1 seed)")  # fmt: skip


def _protocol_lines(protocol: dict, baseline: str) -> list[str]:
    budget, code = protocol.get("budget", {}), protocol.get("code", {})
    endpoint = protocol.get("endpoint", "best")
    ends = {"final": "the model at the last iteration (`--model_selection final`): nothing is selected on the "
                     "reported cases",
            "best": "the best validation Dice: **selected on the reported cases** (optimistic for every arm)"}
    lines = [f"- endpoint: {ends.get(endpoint, endpoint)}"]
    if budget:
        lines.append("- budget: " + ", ".join(f"{k} {v}" for k, v in budget.items()))
    if code.get("tree"):
        dirty = ", with uncommitted edits" if code["dirty"] else ""
        lines.append(f"- code: frozen at `{code['tree']}` (HEAD `{code['commit']}`{dirty})")
    if protocol.get("extra"):
        lines.append(f"- extra overrides: `{shlex.join(protocol['extra'])}`")
    for h in protocol.get("history", []):
        lines.append(f"- protocol written {h['date']}: arms {h['arms']}, seeds {h['seeds']}")
    return lines


def report(output_dir: str, baseline: str | None = None) -> str:
    """Write ``report.md``, ``report.csv`` and ``curves.png`` into ``output_dir`` from its finished runs.

    Args:
        output_dir: the ``output_dir`` of ``experiment.py run``.
        baseline: the arm every other arm is compared with; ``None`` takes the protocol's (else ``sup``).

    Returns:
        The path of ``report.md``.
    """
    output_dir = os.path.abspath(output_dir)
    protocol = _read_json(os.path.join(output_dir, "protocol.json")) or _read_json(
        os.path.join(output_dir, "matrix.json")) or {}  # fmt: skip
    baseline = baseline or protocol.get("baseline", "sup")
    known = protocol.get("arms", {})
    found = [m for d in sorted(os.listdir(output_dir)) if (m := re.fullmatch(r"(.+)_s(-?\d+)", d))
             and os.path.isdir(os.path.join(output_dir, d))]  # fmt: skip
    arms = list(dict.fromkeys([*known, *sorted(m[1] for m in found)]))
    seeds = list(dict.fromkeys([*protocol.get("seeds", []), *sorted(int(m[2]) for m in found)]))
    values, curves, timings, grads, missing = {}, {}, {}, {}, {}
    for seed in seeds:
        for arm in arms:
            run_dir = os.path.join(output_dir, f"{arm}_s{seed}")
            loaded = _load_run(run_dir, protocol.get("budget", protocol).get("val_interval"))
            values[(arm, seed)], curves[(arm, seed)], timings[(arm, seed)], grads[(arm, seed)], reason = loaded
            if reason:
                missing[(arm, seed)] = reason
    rows = _stats(arms, seeds, values, baseline)
    with open(os.path.join(output_dir, "report.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS, restval="")
        writer.writeheader()
        writer.writerows(rows)
    finished = {k: v for k, v in curves.items() if v}
    plot_curves(finished, arms, seeds, os.path.join(output_dir, "curves.png"), list(MODELS))
    row = {(r["arm"], r["seed"], r["model"], r["metric"]): r for r in rows}
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "not installed"
    md = [f"# Protocol table: {', '.join(arms)} x seeds {', '.join(map(str, seeds))}", "",
          f"- command: `{shlex.join(sys.argv)}`", f"- date: {datetime.now().isoformat(timespec='seconds')}",
          f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch_version}",
          f"- baseline: `{baseline}`; arms: " + "; ".join(f"`{a}` {known.get(a, '?')}" for a in arms),
          *_protocol_lines(protocol, baseline), "",
          f"## Headline: paired differences against `{baseline}`, the seed as the unit", "",
          "Δ = the mean over seeds of (arm - baseline) per seed, each the mean paired difference over the same "
          "cases; [95% t interval over the seeds]; p = one-sample t-test over the seeds; seeds better / seeds. "
          "Non-finite cases (a model predicting nothing) are left out of the means.", ""]  # fmt: skip
    head = ["arm", "model", "seeds", *(f"Δ{LABELS[k]} [95% CI]" for k in TESTED), "p (Dice)", "seeds better (Dice)",
            "SD of per-seed ΔDice"]  # fmt: skip
    md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in (a for a in arms if a != baseline):
        for model in MODELS:
            d = row.get((arm, "all", model, "dice"))
            if not d or "delta_vs_baseline" not in d:
                continue
            per_seed = [row[(arm, s, model, "dice")]["delta_vs_baseline"] for s in seeds
                        if "delta_vs_baseline" in row.get((arm, s, model, "dice"), {})]  # fmt: skip
            sd = _f(float(np.std(per_seed, ddof=1)), 3) if len(per_seed) > 1 else "–"
            cells = [arm, model, str(d["n_pairs"]), *(_ci(row.get((arm, "all", model, k)), 3 if k == "dice" else 2)
                                                      for k in TESTED),
                     _p(d.get("p_value")), f"{d['wins']}/{d['n_pairs']}", sd]  # fmt: skip
            md.append("| " + " | ".join(cells) + " |")
    md += ["", "## Per arm and net", "", "Test metrics are per-case means over the foreground classes; `mean ± std` "
           "over cases per seed (std ddof 0, as MetricsSaver's summary), over seeds the mean ± std (ddof 1) of the "
           "per-seed means. Validation Dice during training: best / last / largest drop from the best so far, one "
           "value per seed.", ""]  # fmt: skip
    head = ["arm", "model", *(f"Dice s{s}" for s in seeds), "Dice (seeds)", "95HD", "ASD", "Jaccard", "train time",
            "val Dice best", "val Dice last", "max drop"]  # fmt: skip
    md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in arms:
        times = " / ".join(f"{timings[(arm, s)]['train_s'] / 60:.1f} min" if "train_s" in timings[(arm, s)] else "–"
                           for s in seeds)  # fmt: skip
        for model in MODELS:
            coll = [collapse(curves[(arm, s)][model]) if model in curves[(arm, s)] else None for s in seeds]
            cells = [arm, model]
            cells += ["missing" if (arm, s) in missing else _ms(row.get((arm, s, model, "dice")), 3) for s in seeds]
            cells += [_ms(row.get((arm, "all", model, k)), n) for k, n in (("dice", 3), ("hd95", 2), ("asd", 2),
                                                                          ("jaccard", 3))]  # fmt: skip
            cells += [times if model == "ensemble" else ""]
            cells += [" / ".join(_f(c[i]) if c else "–" for c in coll) for i in range(3)]
            md.append("| " + " | ".join(cells) + " |")
    md += ["", f"## Within each seed: case-level tests against `{baseline}` (secondary; Δ, Wilcoxon p, wins/cases)",
           ""]  # fmt: skip
    head = ["arm", "model", "metric", *(f"s{s}" for s in seeds)]
    md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in (a for a in arms if a != baseline):
        for model in MODELS:
            for key in TESTED:
                cells = [_test(row.get((arm, s, model, key)), 3 if key == "dice" else 2) for s in seeds]
                if any(c != "–" for c in cells):
                    md.append(f"| {arm} | {model} | {LABELS[key]} | " + " | ".join(cells) + " |")
    md += _grad_table(arms, seeds, grads)
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


def _grad_table(arms: list[str], seeds: list[int], grads: dict) -> list[str]:
    """Mean ``diag_grad_<term>_<net>`` of each arm (gradient norm a weighted loss term sends into a net), over the
    logged iterations and the seeds: which term steers which net, next to the net's own supervised term."""
    names = sorted({k for g in grads.values() for k in g})
    if not names:
        return []
    md = ["", "## Gradient norm of each weighted loss term into each net (mean over the logged iterations and seeds)",
          "", "| arm | " + " | ".join(n.removeprefix("diag_grad_") for n in names) + " |",
          "|" + "---|" * (len(names) + 1)]  # fmt: skip
    for arm in arms:
        means = [[grads[(arm, s)][n] for s in seeds if n in grads.get((arm, s), {})] for n in names]
        if any(means):
            md.append(f"| {arm} | " + " | ".join(_f(float(np.mean(m)), 3) if m else "–" for m in means) + " |")
    return md


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
