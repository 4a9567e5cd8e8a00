"""bundle/scripts/experiment.py: command lines, resumability and the report; subprocesses mocked, no training."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import wilcoxon

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("experiment", REPO / "bundle" / "scripts" / "experiment.py")
experiment = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(experiment)

CASES = [f"/data/la/case{i:02d}.nii.gz" for i in range(8)]


class FakeRunner:
    """Stands in for ``subprocess.run``: records the commands, writes a log line, fails the named runs' steps."""

    def __init__(self, fail: tuple[str, ...] = ()) -> None:
        self.calls: list[tuple[str, str]] = []  # (bundle run id, run folder name)
        self.cmds: list[list[str]] = []
        self.fail = fail

    def __call__(self, cmd, cwd=None, env=None, stdout=None, stderr=None, check=False):
        assert cwd == experiment.REPO_ROOT and stderr == subprocess.STDOUT and env["PYTHONUNBUFFERED"] == "1"
        assert env["PYTHONPATH"].split(os.pathsep)[0] == cwd  # the frozen package wins over an installed one
        step = cmd[cmd.index("run") + 1]
        run_name = Path(cmd[cmd.index("--bundle_root") + 1]).name
        self.calls.append((step, run_name))
        self.cmds.append(cmd)
        stdout.write(f"{step} log of {run_name}\nTraceback: boom\n")
        return subprocess.CompletedProcess(cmd, 1 if f"{step}:{run_name}" in self.fail else 0)


def _value_after(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def _contains(cmd: list[str], seq: list[str]) -> bool:
    return any(cmd[i : i + len(seq)] == seq for i in range(len(cmd) - len(seq) + 1))


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> FakeRunner:
    fake = FakeRunner()
    monkeypatch.setattr(experiment.subprocess, "run", fake)
    monkeypatch.setattr(experiment, "report", lambda output_dir, baseline=None: "report.md")
    return fake


def _run(*args, **kwargs) -> str:
    """``experiment.run`` on the checkout itself (no frozen copy: the commands are what is tested)."""
    return experiment.run(*args, code=experiment.REPO_ROOT, **kwargs)


@pytest.mark.parametrize("arm, spec", [*experiment.ARMS.items(), ("mine", ["--unlabelled#lambda_reg", "0"])])
def test_arm_command_lines(tmp_path: Path, runner: FakeRunner, arm: str, spec) -> None:
    _run(str(tmp_path / "data"), str(tmp_path / "out"), arms=[arm], seeds=[7], max_iterations=30, val_interval=10,
         train_stride="[18,18,4]", eval_stride=[9, 9, 2], extra="--num_workers 1",
         custom={"mine": ["--unlabelled#lambda_reg", 0]})  # fmt: skip
    (train, eval_), run_dir = runner.cmds, str(tmp_path / "out" / f"{arm}_s7")
    flags, configs = experiment._arm(spec)["args"], experiment._arm(spec)["configs"]
    assert train[:5] == [sys.executable, "-m", "monai.bundle", "run", "training"]
    assert eval_[:5] == [sys.executable, "-m", "monai.bundle", "run", "evaluating"]
    assert _value_after(train, "--config_file") == str([*experiment.TRAIN_CONFIGS, *configs]).replace(" ", "")
    assert _value_after(eval_, "--config_file").endswith(",'bundle/configs/evaluate.yaml']")
    for path in configs:
        assert (REPO / path).is_file() and f"'{path}'" in _value_after(eval_, "--config_file")
    for flag, value in [("--seed", "7"), ("--resume", "auto"), ("--sw_stride", "[18,18,4]"), ("--max_iterations", "30"),
                        ("--val_interval", "10"), ("--bundle_root", run_dir), ("--dataset_dir", str(tmp_path / "data")),
                        ("--optim#lr_policy", "poly"), ("--model_selection", "final")]:  # fmt: skip
        assert _value_after(train, flag) == value
    for flag, value in [("--sw_stride", "[9,9,2]"), ("--bundle_root", run_dir), ("--output_dir", run_dir + "/eval")]:
        assert _value_after(eval_, flag) == value
    assert "--seed" not in eval_ and "--resume" not in eval_
    for cmd in (train, eval_):
        assert cmd[-2:] == ["--num_workers", "1"]
        assert not flags or _contains(cmd, flags)
    for marker in ("done_train", "done_eval"):
        assert (tmp_path / "out" / f"{arm}_s7" / marker).exists()
    timing = json.loads((tmp_path / "out" / f"{arm}_s7" / "timing.json").read_text())
    assert timing["train_rc"] == timing["eval_rc"] == 0 and timing["train_s"] >= 0


def test_paper_arm_is_the_paper_overlay() -> None:
    """The paper preset exists once (paper.yaml); every id it sets is a switch of train.yaml."""
    from monai.bundle import ConfigParser

    paper = ConfigParser.load_config_file(str(REPO / "bundle" / "configs" / "paper.yaml"))
    train = ConfigParser(ConfigParser.load_config_file(str(REPO / "bundle" / "configs" / "train.yaml")))
    assert experiment.ARMS["paper"] == {"configs": ["bundle/configs/paper.yaml"], "args": []}
    assert all(cid in train for cid in paper), [cid for cid in paper if cid not in train]
    assert {"unlabelled#teacher", "multicure#form", "contrastive#anchors"} <= set(paper)


def test_protocol_is_written_before_the_first_run(tmp_path: Path, runner: FakeRunner, monkeypatch) -> None:
    seen = []
    real = runner.__call__

    def spy(cmd, **kwargs):
        seen.append(json.loads((tmp_path / "out" / experiment.PROTOCOL_FILE).read_text()))
        return real(cmd, **kwargs)

    monkeypatch.setattr(experiment.subprocess, "run", spy)
    _run(str(tmp_path), str(tmp_path / "out"), arms="sup,full", seeds=[1, 2], max_iterations=40, val_interval=20)
    first = seen[0]
    assert first["arms"] == {"sup": {"configs": [], "args": ["--supervised#only", "True"]},
                             "full": {"configs": [], "args": []}}  # fmt: skip
    assert first["budget_ids"] == {"lr_policy": "optim#lr_policy"}
    assert first["seeds"] == [1, 2] and first["endpoint"] == "final" and first["baseline"] == "sup"
    assert first["budget"] == {"max_iterations": 40, "val_interval": 20, "lr_policy": "poly",
                               "train_stride": [18, 18, 4], "eval_stride": [9, 9, 2]}  # fmt: skip
    # another budget in the same table is refused before any run
    runner.calls.clear()
    with pytest.raises(ValueError, match="same budget"):
        _run(str(tmp_path), str(tmp_path / "out"), arms="sup,full", seeds=[1, 2], max_iterations=80, val_interval=20)
    assert runner.calls == []


def test_add_seeds_continues_the_table(tmp_path: Path, runner: FakeRunner) -> None:
    out = tmp_path / "out"
    _run(str(tmp_path / "data"), str(out), arms="sup,full", seeds=[1], max_iterations=40, val_interval=20,
         extra="--num_workers 1")  # fmt: skip
    first = list(runner.cmds)
    runner.cmds.clear()
    runner.calls.clear()
    experiment.add_seeds(str(out), seeds="2,3")
    assert runner.calls == [(step, f"{arm}_s{seed}") for seed in (2, 3) for arm in ("sup", "full")
                            for step in ("training", "evaluating")]  # fmt: skip
    strip = {"--seed": None, "--bundle_root": None, "--output_dir": None}
    for old, new in zip(first, runner.cmds):  # the same commands but for the seed and the run folder
        assert [a for i, a in enumerate(old) if i == 0 or old[i - 1] not in strip] == [
            a for i, a in enumerate(new) if i == 0 or new[i - 1] not in strip]
    protocol = json.loads((out / experiment.PROTOCOL_FILE).read_text())
    assert protocol["seeds"] == [1, 2, 3] and [h["seeds"] for h in protocol["history"]] == [[1], [2, 3]]


def test_a_table_frozen_before_the_groups_continues_on_its_own_ids(tmp_path: Path, runner: FakeRunner) -> None:
    """A protocol.json of version 0.11 (no budget_ids): its frozen code takes the flat ids; its arms run as stored."""
    out = tmp_path / "out"
    _run(str(tmp_path / "data"), str(out), arms="sup", seeds=[1], max_iterations=40, val_interval=20)
    protocol = json.loads((out / experiment.PROTOCOL_FILE).read_text())
    del protocol["budget_ids"]
    protocol["arms"] = {"sup": {"configs": [], "args": ["--supervised_only", "True"]},
                        "mutual": {"configs": [], "args": ["--teacher", "mutual"]}}  # fmt: skip
    (out / experiment.PROTOCOL_FILE).write_text(json.dumps(protocol))
    runner.cmds.clear()
    experiment.add_seeds(str(out), seeds=[2])
    train = [c for c in runner.cmds if "training" in c]
    assert [_value_after(c, "--lr_policy") for c in train] == ["poly", "poly"]
    assert not any("--optim#lr_policy" in c for c in train)
    assert _contains(train[0], ["--supervised_only", "True"]) and _contains(train[1], ["--teacher", "mutual"])
    # an arm of this script (today's ids) is refused there; one given in the code's own ids is not
    with pytest.raises(ValueError, match="frozen before the switches were grouped"):
        _run(str(tmp_path / "data"), str(out), arms="sup,level1", seeds=[1], max_iterations=40, val_interval=20)
    _run(str(tmp_path / "data"), str(out), arms="sup,flat", seeds=[1], max_iterations=40, val_interval=20,
         custom={"flat": ["--multicure_level", "1"]})  # fmt: skip
    assert _contains(runner.cmds[-2], ["--multicure_level", "1"])


def test_freeze_code_copies_the_working_tree(tmp_path: Path) -> None:
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    frozen = experiment.freeze_code(str(tmp_path / "code"))
    for path in ("multicure_monai/__init__.py", "bundle/configs/train.yaml", "bundle/configs/paper.yaml",
                 "bundle/scripts/experiment.py"):  # fmt: skip
        assert (tmp_path / "code" / path).read_bytes() == (REPO / path).read_bytes()
    assert not (tmp_path / "code" / "tests").exists() and len(frozen["tree"]) == 40


def test_unknown_arm_is_refused(tmp_path: Path, runner: FakeRunner) -> None:
    with pytest.raises(ValueError, match="unknown arms"):
        _run(str(tmp_path), str(tmp_path / "out"), arms="sup,nope")
    assert runner.calls == []


def test_seed_major_order_and_resume(tmp_path: Path, runner: FakeRunner) -> None:
    out = tmp_path / "out"
    for name, markers in {"sup_s1": ["done_train", "done_eval"], "full_s1": ["done_train"], "sup_s2": []}.items():
        (out / name).mkdir(parents=True)
        for m in markers:
            (out / name / m).touch()
    runner.fail = ("training:full_s2",)
    _run(str(tmp_path), str(out), arms="sup,full", seeds=[1, 2])
    assert runner.calls == [("evaluating", "full_s1"), ("training", "sup_s2"), ("evaluating", "sup_s2"),
                            ("training", "full_s2")]  # fmt: skip
    assert all(_value_after(c, "--resume") == "auto" for c in runner.cmds if "training" in c)
    assert not (out / "full_s2" / "done_train").exists()
    assert json.loads((out / "full_s2" / "timing.json").read_text())["train_rc"] == 1
    # the same command again: only the failed run goes on, from its checkpoint (--resume auto)
    runner.calls.clear()
    runner.fail = ()
    _run(str(tmp_path), str(out), arms="sup,full", seeds=[1, 2])
    assert runner.calls == [("training", "full_s2"), ("evaluating", "full_s2")]
    timing = json.loads((out / "full_s2" / "timing.json").read_text())
    assert timing["train_attempts"] == 2 and timing["train_rc"] == 0
    assert (out / "full_s2" / "train.log").read_text().count("training log of full_s2") == 2  # appended


def test_failed_step_prints_log_tail(tmp_path: Path, runner: FakeRunner, capsys: pytest.CaptureFixture) -> None:
    runner.fail = ("evaluating:sup_s3",)
    _run(str(tmp_path), str(tmp_path / "out"), arms=["sup"], seeds=3)
    err = capsys.readouterr().err
    assert "sup seed 3: eval FAILED (exit 1)" in err and "Traceback: boom" in err and "sup_s3" in err


@pytest.mark.parametrize("argv, extra", [(["--extra", "--num_workers 1 --amp False"], "--num_workers 1 --amp False"),
                                         (["--extra=--num_workers 1"], "--num_workers 1"), ([], "")])
def test_cli_passes_extra_through_fire(monkeypatch: pytest.MonkeyPatch, argv: list[str], extra: str) -> None:
    seen = {}
    monkeypatch.setattr(experiment, "run", lambda **kw: seen.update(kw))
    monkeypatch.setattr(experiment.signal, "signal", lambda *args: None)  # leave pytest's SIGTERM alone
    experiment.main(["run", "--dataset_dir", "d", "--output_dir", "o", "--seeds", "[1337,2024]", *argv])
    assert seen == {"dataset_dir": "d", "output_dir": "o", "seeds": [1337, 2024], **({"extra": extra} if argv else {})}


# ----------------------------------------------------------------------------------------------- the report
def _write_raw(folder: Path, name: str, per_case: np.ndarray, deli: str) -> None:
    """A ``<name>_raw.csv`` through MONAI's own writer (two foreground classes, so the ``mean`` column matters)."""
    from monai.handlers.utils import write_metrics_reports

    per_class = np.stack([per_case + 0.01, per_case - 0.01], axis=1)  # their nanmean is per_case
    write_metrics_reports(str(folder), CASES, metrics={name: float(np.nanmean(per_case))},
                          metric_details={name: per_class}, summary_ops="*", deli=deli)  # fmt: skip


def _log(curve: list[float], interval_prefixes: tuple[str, ...]) -> str:
    lines = ["\x1b[32mstarting\x1b[0m"]
    for epoch, dice in enumerate(curve, 1):
        pairs = " ".join(f"{p}mean_dice: {dice - 0.01 * k:.4f}" for k, p in enumerate(interval_prefixes))
        lines.append(f"Epoch [{epoch}/9]: [100/100] 100%|###, loss=0.3\r\x1b[1m2024-01-01 10:00:00,000 - INFO - "
                     f"Epoch[{epoch}] Metrics -- val_asd: 2.0000 val_hd95: inf {pairs} \x1b[0m")  # fmt: skip
    return "\n".join(lines) + "\n"


@pytest.fixture(params=[",", "\t"], ids=["comma", "tab"])
def fabricated(request: pytest.FixtureRequest, tmp_path: Path) -> dict:
    """sup and full x seeds 1 and 2 evaluated; mcf planned but never started; full_s3 trained, not evaluated."""
    rng = np.random.default_rng(0)
    out, truth = tmp_path / "out", {}
    out.mkdir()
    (out / "matrix.json").write_text(json.dumps({"arms": {a: experiment.ARMS[a] for a in ("sup", "full", "mcf")},
                                                 "seeds": [1, 2], "val_interval": 50}))  # fmt: skip
    for arm, shift in (("sup", 0.0), ("full", 0.05)):
        for seed in (1, 2):
            run = out / f"{arm}_s{seed}"
            (run / "eval").mkdir(parents=True)
            (run / "done_train").touch()
            (run / "done_eval").touch()
            (run / "timing.json").write_text(json.dumps({"train_s": 600.0 * seed, "eval_s": 60.0}))
            models = ["ensemble", "predictive"] + (["auxiliary"] if (arm, seed) != ("full", 2) else [])
            for model in models:
                for key, name in experiment.METRICS.items():
                    base = 0.8 if key in ("dice", "jaccard") else 5.0
                    v = np.round(base + shift * (1 if key in ("dice", "jaccard") else -20) + rng.normal(0, 0.05, 8), 4)
                    if key == "hd95" and arm == "full" and model == "ensemble":
                        v[3] = np.inf  # a model that predicts nothing on one case
                    _write_raw(run / "eval", experiment.MODELS[model] + name, v, request.param)
                    truth[(arm, seed, model, key)] = np.array([float(f"{x:.4f}") for x in v])
            curve = [0.5, 0.7, 0.6, 0.65] if arm == "full" else [0.4, 0.6, 0.62, 0.64]
            (run / "train.log").write_text(_log(curve, ("val_", "val_predictive_", "val_auxiliary_")))
    (out / "full_s3").mkdir()
    (out / "full_s3" / "done_train").touch()
    (out / "full_s3" / "train.log").write_text(_log([0.3, 0.5], ("val_",)))
    return {"out": out, "truth": truth}


def test_read_raw_csv_uses_the_mean_column(tmp_path: Path) -> None:
    _write_raw(tmp_path, "val_mean_dice", np.array([0.5, np.nan, np.inf, 0.25, 0.1, 0.2, 0.3, 0.4]), ",")
    got = experiment.read_raw_csv(str(tmp_path / "val_mean_dice_raw.csv"))
    assert list(got) == CASES and got[CASES[0]] == 0.5 and np.isnan(got[CASES[1]]) and got[CASES[2]] == np.inf


def test_parse_validation_log() -> None:
    epochs = experiment.parse_validation_log(_log([0.5, 0.7], ("val_", "val_predictive_")) + "Epoch[2] Metrics -- "
                                             "val_mean_dice: 0.7100 Key metric: val_mean_dice best\n")  # fmt: skip
    assert epochs[1] == {"val_asd": 2.0, "val_hd95": np.inf, "val_mean_dice": 0.5, "val_predictive_mean_dice": 0.49}
    assert epochs[2]["val_mean_dice"] == 0.71 and epochs[2]["val_predictive_mean_dice"] == 0.69  # repeat: last wins


def test_report_statistics(fabricated: dict) -> None:
    from scipy import stats

    out, truth = fabricated["out"], fabricated["truth"]
    md = Path(experiment.report(str(out), baseline="sup")).read_text()
    with open(out / "report.csv") as f:
        rows = {(r["arm"], r["seed"], r["model"], r["metric"]): r for r in csv.DictReader(f)}
    assert ("full", "2", "auxiliary", "dice") not in rows and ("full", "1", "auxiliary", "dice") in rows
    for model in ("ensemble", "predictive"):
        for key in ("dice", "hd95", "asd"):
            per_seed_means, per_seed_deltas = [], []
            for seed in (1, 2):
                x, y = truth[("full", seed, model, key)], truth[("sup", seed, model, key)]
                row = rows[("full", str(seed), model, key)]
                fin = np.isfinite(x)
                assert float(row["mean"]) == pytest.approx(x[fin].mean())
                assert float(row["std"]) == pytest.approx(x[fin].std())
                assert int(row["n"]) == fin.sum() and int(row["n_nonfinite"]) == (~fin).sum()
                per_seed_means.append(x[fin].mean())
                if key == "asd":
                    assert row["p_value"] == ""  # tested: Dice and 95HD only
                    continue
                both = np.isfinite(x) & np.isfinite(y)
                per_seed_deltas.append(np.mean(x[both] - y[both]))
                assert float(row["delta_vs_baseline"]) == pytest.approx(per_seed_deltas[-1])
                assert float(row["p_value"]) == pytest.approx(wilcoxon(x[both], y[both]).pvalue)
                assert int(row["wins"]) == ((x > y) if key == "dice" else (x < y)).sum() and row["n_pairs"] == "8"
            over = rows[("full", "all", model, key)]
            assert float(over["mean"]) == pytest.approx(np.mean(per_seed_means))
            assert float(over["std"]) == pytest.approx(np.std(per_seed_means, ddof=1))
            if key == "asd":
                continue
            # the seed is the unit: the mean per-seed difference, its t interval and test over two seeds
            d = np.array(per_seed_deltas)
            half = stats.t.ppf(0.975, 1) * d.std(ddof=1) / np.sqrt(2)
            assert float(over["delta_vs_baseline"]) == pytest.approx(d.mean()) and over["n_pairs"] == "2"
            assert (float(over["ci_low"]), float(over["ci_high"])) == pytest.approx((d.mean() - half, d.mean() + half))
            assert float(over["p_value"]) == pytest.approx(stats.ttest_1samp(d, 0).pvalue)
            assert int(over["wins"]) == int(np.sum(d > 0) if key == "dice" else np.sum(d < 0))
    assert rows[("sup", "all", "ensemble", "dice")]["delta_vs_baseline"] == ""
    assert rows[("full", "1", "ensemble", "hd95")]["n_nonfinite"] == "1"
    # markdown: the headline first, then the tables, the collapse check and the missing runs
    lines = md.splitlines()
    assert lines.index(next(ln for ln in lines if ln.startswith("## Headline"))) < lines.index("## Per arm and net")
    head = next(ln for ln in lines if ln.startswith("| full | ensemble | 2 |"))
    d = rows[("full", "all", "ensemble", "dice")]
    assert head.startswith(f"| full | ensemble | 2 | {float(d['delta_vs_baseline']):+.3f} [{float(d['ci_low']):+.3f}, ")
    assert ("| arm | model | Dice s1 | Dice s2 | Dice s3 | Dice (seeds) | 95HD | ASD | Jaccard | train time "
            "| val Dice best | val Dice last | max drop |") in md
    ens = next(ln for ln in lines if ln.startswith("| full | ensemble | 0."))
    assert "(2 non-finite)" in ens and "10.0 min / 20.0 min" in ens
    assert ens.endswith("| 0.700 / 0.700 / 0.500 | 0.650 / 0.650 / 0.500 | 0.100 / 0.100 / 0.000 |")  # best/last/drop
    assert next(ln for ln in lines if ln.startswith("| sup | predictive | 0.")).endswith(
        "| 0.630 / 0.630 / – | 0.630 / 0.630 / – | 0.000 / 0.000 / – |")
    assert "| mcf_s1 | missing: not started |" in md and "| full_s3 | missing: evaluation not finished |" in md
    assert next(ln for ln in lines if ln.startswith("| mcf | ensemble |")).startswith(
        "| mcf | ensemble | missing | missing | missing |")
    assert "| full | ensemble | 95HD |" in md and "command: `" in md and "torch " in md
    assert "selected on the reported cases" in md  # matrix.json of an older table: no endpoint, best model
    assert (out / "curves.png").stat().st_size > 1000


def test_report_lists_gradient_norms(fabricated: dict) -> None:
    out = fabricated["out"]
    for seed, value in ((1, 0.5), (2, 1.5)):
        with open(out / f"full_s{seed}" / "train.log", "a") as f:
            for it in (10, 20):
                f.write(f"INFO - Epoch: 1/3, Iter: {it}/100 -- loss: 0.3 diag_grad_contrastive_predictive: {value} "
                        f"diag_grad_supervised_predictive: {value * it}\n")  # fmt: skip
    md = Path(experiment.report(str(out))).read_text()
    assert "| arm | contrastive_predictive | supervised_predictive |" in md
    assert "| full | 1.000 | 15.000 |" in md


def test_report_of_an_empty_matrix(tmp_path: Path) -> None:
    (tmp_path / "sup_s5").mkdir()
    md = Path(experiment.report(str(tmp_path))).read_text()
    assert "| sup_s5 | missing: training not finished |" in md and (tmp_path / "curves.png").exists()
