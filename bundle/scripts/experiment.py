"""Run a protocol table of bundle trainings (arms x seeds) on frozen code, evaluate every run and write a report.

The protocol (``protocol.json`` in the output folder) is written before the first run: the arms and their
overrides, the seeds, the budget (iterations, validation interval, learning-rate policy, strides), the endpoint
and the code. Every run of the table trains from one frozen copy of the code (``<output_dir>/code``, a
``git archive`` of the working tree at the first call), so arms and seeds added later run the same code. The
endpoint ``final`` compares the models at the last iteration (``--model_selection final``); ``best`` selects each
model on the validation cases, which are then the reported cases (the report says so).

Examples::

    # supervised-only against the default, six seeds; rerun the same command after a kill to continue
    python bundle/scripts/experiment.py run --dataset_dir <la_half_nii> --output_dir <runs>/default_vs_sup \\
        --arms "['sup','full']" --seeds "[1,2,3,4,5,6]" --max_iterations 300 --val_interval 100 \\
        --extra="--num_workers 1"

    # the same table with two more seeds, later (same code, arms and budget)
    python bundle/scripts/experiment.py add_seeds --output_dir <runs>/default_vs_sup --seeds "[7,8]"

    # an arm of your own: override arguments, or {'configs': [overlay files], 'args': [...]}
    python bundle/scripts/experiment.py run ... --arms "['sup','no_reg']" \
        --custom "{'no_reg': ['--unlabelled#lambda_reg', '0']}"

    # (re)write report.md, report.csv and curves.png from whatever runs are finished (experiment_report.py)
    python bundle/scripts/experiment.py report --output_dir <runs>/default_vs_sup

``<output_dir>/<arm>_s<seed>/`` is the run's ``bundle_root`` (``models/``, ``ckpt/``, ``train.log``, ``eval.log``,
``eval/`` with MetricsSaver's CSVs, ``run.json``, ``timing.json``, markers ``done_train`` / ``done_eval``).

A table continues on the code it froze, with the arms' override arguments as ``protocol.json`` stores them. The
config ids of the budget's overrides are those of that code: ``protocol.json`` records them (:data:`BUDGET_IDS`);
a table frozen before version 0.12.0, whose code takes the flat ids of then (``--lr_policy``), has no record
(:data:`FLAT_BUDGET_IDS`), and an arm of today's :data:`ARMS` is refused there (give it with ``--custom`` in
that code's ids).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # the report module next to this script, however this one was loaded
    sys.path.insert(0, _HERE)

import experiment_report  # noqa: E402
from experiment_report import METRICS, MODELS, parse_validation_log, read_raw_csv  # noqa: E402

__all__ = ["ARMS", "BUDGET_IDS", "FLAT_BUDGET_IDS", "MODELS", "METRICS", "PROTOCOL_FILE", "main", "run",
           "add_seeds", "report", "freeze_code", "train_command", "eval_command", "read_raw_csv",
           "parse_validation_log"]  # fmt: skip

REPO_ROOT = os.path.dirname(os.path.dirname(_HERE))
PROTOCOL_FILE = "protocol.json"
TRAIN_CONFIGS = ["bundle/configs/train.yaml", "bundle/configs/la.yaml", "bundle/configs/la_half.yaml"]
EVAL_CONFIG = "bundle/configs/evaluate.yaml"
FROZEN_PATHS = ("multicure_monai", "bundle/configs", "bundle/scripts", "setup.cfg", "pyproject.toml")
ENDPOINTS = ("final", "best")
# the config ids of the budget's overrides that are not top-level ids; FLAT_BUDGET_IDS: those of the code before
# version 0.12.0 (a table frozen then)
BUDGET_IDS = {"lr_policy": "optim#lr_policy"}
FLAT_BUDGET_IDS = {"lr_policy": "lr_policy"}
_TEACHER, _VIEW = "--unlabelled#teacher", "--unlabelled#student_view"
ARMS: dict[str, Any] = {
    "sup": ["--supervised#only", "True"],  # both nets on labelled crops only
    # unlabelled crops in the batch, no unsupervised loss
    "bn_control": ["--unlabelled#lambda_u", "0", "--contrastive#lambda_c", "0"],
    # MCF-style two-net baseline: no MultiCURE, no contrastive loss, the better net of each iteration teaches
    "mcf": ["--multicure#use", "False", "--contrastive#use", "False", _TEACHER, "better", _VIEW, "none"],
    "full": [],  # the full method, bundle defaults (since 0.15.0 the mutual teacher on the copy-paste view)
    "labelled": ["--contrastive#anchors", "labelled"],  # eq. 5 on the uncertain labelled voxels
    "level1": ["--multicure#level", "1"],  # the block on the half-resolution decoder stage (the paper's place)
    "paper": {"configs": ["bundle/configs/paper.yaml"], "args": []},  # the paper's reading of every switch
    "mutual": [_TEACHER, "mutual", _VIEW, "none"],  # CPS: each net's confident argmax trains the other
    "perturb": [_TEACHER, "mutual", _VIEW, "perturb"],  # ... the students on a noisy, flipped view
    "cp": [_TEACHER, "mutual", _VIEW, "copy_paste"],  # ... on BCP's copy-paste mix
    "bcp": [_TEACHER, "ema", _VIEW, "copy_paste"],  # BCP: an EMA teacher and the copy-paste mix
    "mistake": ["--supervised#lambda_mistake", "0.5"],  # MCF's correction on labelled voxels where the nets disagree
}


def _arm(spec: Any) -> dict[str, list[str]]:
    """An arm as ``{"configs": [overlay files], "args": [override arguments]}`` (a plain list is the args)."""
    if isinstance(spec, dict):
        return {"configs": [str(c) for c in spec.get("configs", [])], "args": [str(a) for a in spec.get("args", [])]}
    return {"configs": [], "args": [str(a) for a in spec]}


def _bracket(values: Any, quote: bool = False) -> str:
    return values if isinstance(values, str) else "[" + ",".join(f"'{v}'" if quote else str(v) for v in values) + "]"


def _list(values: Any, kind: type = str) -> list:
    """A list from a list, a tuple, one value or a comma-separated string (fire passes any of them)."""
    if isinstance(values, (list, tuple)):
        return [kind(v) for v in values]
    return [kind(v.strip()) for v in str(values).strip("[]()").split(",") if v.strip()]


def _bundle(run_id: str, configs: list[str], run_dir: str, dataset_dir: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", _bracket(configs, quote=True),
            "--dataset_dir", dataset_dir, "--bundle_root", run_dir, *args]  # fmt: skip


def train_command(run_dir: str, dataset_dir: str, seed: int, protocol: dict, arm: Any = ()) -> list[str]:
    """The ``python -m monai.bundle run training`` command line of one run (``--resume auto``)."""
    arm, budget, ids = _arm(arm), protocol["budget"], protocol.get("budget_ids", FLAT_BUDGET_IDS)
    return _bundle("training", [*TRAIN_CONFIGS, *arm["configs"]], run_dir, dataset_dir, "--seed", str(seed),
                   "--max_iterations", str(budget["max_iterations"]), "--val_interval", str(budget["val_interval"]),
                   f"--{ids['lr_policy']}", budget["lr_policy"], "--model_selection", protocol["endpoint"],
                   "--sw_stride", _bracket(budget["train_stride"]), "--resume", "auto", *arm["args"],
                   *protocol["extra"])  # fmt: skip


def eval_command(run_dir: str, dataset_dir: str, protocol: dict, arm: Any = ()) -> list[str]:
    """The ``python -m monai.bundle run evaluating`` command line of one run; CSVs go to ``<run_dir>/eval``."""
    arm = _arm(arm)
    return _bundle("evaluating", [*TRAIN_CONFIGS, *arm["configs"], EVAL_CONFIG], run_dir, dataset_dir,
                   "--output_dir", os.path.join(run_dir, "eval"), "--sw_stride",
                   _bracket(protocol["budget"]["eval_stride"]), *arm["args"], *protocol["extra"])  # fmt: skip


def freeze_code(dest: str, repo_root: str = REPO_ROOT) -> dict[str, Any]:
    """Copy the code that trains (:data:`FROZEN_PATHS` of the working tree, uncommitted edits included) to ``dest``.

    ``git stash create`` names the working tree's tracked state without touching it (``HEAD`` when clean), and
    ``git archive`` writes that tree, so every run of a table trains the same code whatever happens to the
    checkout later. Untracked files are not copied.

    Returns:
        ``{"commit": HEAD, "tree": the archived commit, "dirty": bool, "dir": dest}``.
    """
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", repo_root, *args], capture_output=True, text=True, check=True)
        return done.stdout.strip()

    head = git("rev-parse", "HEAD")
    tree = git("stash", "create") or head
    os.makedirs(dest, exist_ok=True)
    archive = os.path.join(dest, ".code.tar")
    paths = [p for p in FROZEN_PATHS if os.path.exists(os.path.join(repo_root, p))]
    subprocess.run(["git", "-C", repo_root, "archive", "--format=tar", "-o", archive, tree, *paths], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    os.remove(archive)
    return {"commit": head, "tree": tree, "dirty": tree != head, "dir": dest}


def _protocol(output_dir: str, dataset_dir: str, budget: dict, endpoint: str, extra: list[str], baseline: str,
              code: str) -> dict:  # fmt: skip
    """The table's protocol: read from ``protocol.json``, or frozen and written there on the first call."""
    path = os.path.join(output_dir, PROTOCOL_FILE)
    if (protocol := _read_json(path)) is not None:
        mine = {"budget": protocol["budget"], "endpoint": protocol["endpoint"], "extra": protocol["extra"]}
        asked = {"budget": budget, "endpoint": endpoint, "extra": extra}
        if mine != asked:
            raise ValueError(f"{path} fixes {mine}; this call asks for {asked}. Every arm and seed of a table runs "
                             "the same budget: use another --output_dir for another protocol.")  # fmt: skip
        return protocol
    if endpoint not in ENDPOINTS:
        raise ValueError(f"endpoint must be one of {list(ENDPOINTS)}, got {endpoint!r}.")
    frozen = (freeze_code(os.path.join(output_dir, "code")) if code == "freeze"
              else {"commit": None, "tree": None, "dirty": None, "dir": os.path.abspath(code)})  # fmt: skip
    return {"created": datetime.now().isoformat(timespec="seconds"), "dataset_dir": dataset_dir, "budget": budget,
            "budget_ids": BUDGET_IDS, "endpoint": endpoint, "extra": extra, "baseline": baseline, "code": frozen,
            "arms": {}, "seeds": [], "history": []}  # fmt: skip


def run(dataset_dir: str, output_dir: str, arms: Any = ("sup", "full"), seeds: Any = (1337,),
        max_iterations: int = 300, val_interval: int = 100, lr_policy: str = "poly", endpoint: str = "final",
        train_stride: Any = (18, 18, 4), eval_stride: Any = (9, 9, 2), extra: Any = "", custom: dict | None = None,
        baseline: str = "sup", code: str = "freeze") -> str:  # fmt: skip
    """Write the protocol, then train and evaluate every (seed, arm) run, seed-major; returns the report path.

    Args:
        dataset_dir: folder with ``datalist.json`` (``--dataset_dir`` of the bundle).
        output_dir: the protocol, the frozen code, one sub-folder ``<arm>_s<seed>`` per run, and the report.
        arms: names in :data:`ARMS` (or in ``custom``), a list or a comma-separated string.
        seeds: training seeds, a list or one int.
        max_iterations: ``--max_iterations`` of every training.
        val_interval: ``--val_interval`` (validation, checkpoints and the x axis of the curves).
        lr_policy: ``--optim#lr_policy``: ``poly`` anneals the learning rate to zero by ``max_iterations``.
        endpoint: ``final`` (the model at the last iteration) or ``best`` (selected on the validation cases).
        train_stride: ``--sw_stride`` of the validation during training.
        eval_stride: ``--sw_stride`` of the final evaluation.
        extra: further bundle overrides for training and evaluation, e.g. ``"--num_workers 1"``.
        custom: extra arms ``{name: [override args] | {"configs": [...], "args": [...]}}``.
        baseline: the arm the others are compared with in the report.
        code: ``freeze`` (copy the working tree into ``<output_dir>/code`` on the first call) or a folder holding
            the code to run as is.

    A run with ``done_train`` skips training (otherwise ``--resume auto`` continues its checkpoint), one with
    ``done_eval`` skips evaluation. A failing subprocess is reported with its log tail and the table goes on.
    """
    table = {**ARMS, **{str(k): v for k, v in (custom or {}).items()}}
    arms, seeds = _list(arms), _list(seeds, int)
    unknown = [a for a in arms if a not in table]
    if unknown:
        raise ValueError(f"unknown arms {unknown}; known: {sorted(table)} (add others with --custom)")
    extra = shlex.split(extra) if isinstance(extra, str) else [str(e) for e in extra]
    budget = {"max_iterations": int(max_iterations), "val_interval": int(val_interval), "lr_policy": lr_policy,
              "train_stride": _list(train_stride, int), "eval_stride": _list(eval_stride, int)}  # fmt: skip
    output_dir, dataset_dir = os.path.abspath(output_dir), os.path.abspath(dataset_dir)
    os.makedirs(output_dir, exist_ok=True)
    protocol = _protocol(output_dir, dataset_dir, budget, endpoint, extra, baseline, code)
    new_arms = {a: _arm(table[a]) for a in arms if a not in protocol["arms"]}
    if "budget_ids" not in protocol and (today := [a for a in new_arms if a not in (custom or {})]):
        raise ValueError(f"{output_dir} runs code frozen before the switches were grouped (0.12.0); the arms {today} "
                         "of this script use today's ids. Give them with --custom in that code's flat ids.")
    new_seeds = [s for s in seeds if s not in protocol["seeds"]]
    if new_arms or new_seeds or not protocol["history"]:  # written before the runs it adds
        protocol["arms"].update(new_arms)
        protocol["seeds"] += new_seeds
        protocol["history"].append({"date": datetime.now().isoformat(timespec="seconds"), "arms": list(new_arms),
                                    "seeds": new_seeds, "command": shlex.join(sys.argv)})  # fmt: skip
        _write_json(os.path.join(output_dir, PROTOCOL_FILE), protocol)
    return _run_table(output_dir, protocol, arms, seeds)


def add_seeds(output_dir: str, seeds: Any) -> str:
    """Continue a table with more seeds: every arm of its protocol, the same frozen code and budget.

    Args:
        output_dir: the ``output_dir`` of an earlier :func:`run`.
        seeds: the seeds to add, a list or one int.

    Returns:
        The path of the report.
    """
    output_dir = os.path.abspath(output_dir)
    protocol = _read_json(os.path.join(output_dir, PROTOCOL_FILE))
    if protocol is None:
        raise ValueError(f"{output_dir} has no {PROTOCOL_FILE}: start the table with `experiment.py run`.")
    return run(protocol["dataset_dir"], output_dir, arms=list(protocol["arms"]), seeds=_list(seeds, int),
               endpoint=protocol["endpoint"], extra=protocol["extra"], custom=protocol["arms"],
               baseline=protocol["baseline"], code=protocol["code"]["dir"], **protocol["budget"])  # fmt: skip


def _run_table(output_dir: str, protocol: dict, arms: list[str], seeds: list[int]) -> str:
    plan = [(seed, arm) for seed in seeds for arm in arms]
    code_dir, failed = protocol["code"]["dir"], []
    for i, (seed, arm) in enumerate(plan, 1):
        run_dir = os.path.join(output_dir, f"{arm}_s{seed}")
        spec, data = protocol["arms"][arm], protocol["dataset_dir"]
        cmds = {"train": train_command(run_dir, data, seed, protocol, spec),
                "eval": eval_command(run_dir, data, protocol, spec)}  # fmt: skip
        info = {"arm": arm, "seed": seed, "arm_spec": spec, "val_interval": protocol["budget"]["val_interval"]}
        if not _run_one(run_dir, cmds, f"[{i}/{len(plan)}] {arm} seed {seed}", info, code_dir):
            failed.append(f"{arm}_s{seed}")
    if failed:
        print(f"failed runs: {failed}", file=sys.stderr)
    return report(output_dir, protocol["baseline"])


def _run_one(run_dir: str, cmds: dict[str, list[str]], tag: str, info: dict, code_dir: str) -> bool:
    os.makedirs(run_dir, exist_ok=True)
    if not os.path.exists(os.path.join(run_dir, "done_train")):  # what the (resumed) training runs with
        commands = {f"{step}_command": shlex.join(cmd) for step, cmd in cmds.items()}
        _write_json(os.path.join(run_dir, "run.json"), {**info, **commands, "cwd": code_dir})
    timing_path = os.path.join(run_dir, "timing.json")
    for step, cmd in cmds.items():
        if os.path.exists(os.path.join(run_dir, f"done_{step}")):
            print(f"{tag}: {step} already done, skipped", flush=True)
            continue
        print(f"{tag}: {step} ...", flush=True)
        log = os.path.join(run_dir, f"{step}.log")
        start = time.perf_counter()
        rc = _execute(cmd, log, code_dir)
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


def _execute(cmd: list[str], log_path: str, code_dir: str) -> int:
    """Run ``cmd`` in ``code_dir`` with its package first on the path, output appended to ``log_path``."""
    with open(log_path, "a") as log:
        log.write(f"\n=== {datetime.now().isoformat(timespec='seconds')}: {shlex.join(cmd)}\n")
        log.flush()
        path = os.pathsep.join(p for p in (code_dir, os.environ.get("PYTHONPATH")) if p)
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path)  # the log follows the run live
        return subprocess.run(cmd, cwd=code_dir, env=env, stdout=log, stderr=subprocess.STDOUT, check=False).returncode


def _tail(path: str, lines: int = 25) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 8000))
        text = f.read().decode(errors="replace").replace("\r", "\n")
    return "\n".join([ln for ln in text.splitlines() if ln.strip()][-lines:])


def report(output_dir: str, baseline: str | None = None) -> str:
    """Write ``report.md``, ``report.csv`` and ``curves.png`` into ``output_dir`` (:func:`experiment_report.report`).

    Args:
        output_dir: the ``output_dir`` of :func:`run`.
        baseline: the arm the others are compared with; ``None`` takes the protocol's.

    Returns:
        The path of ``report.md``.
    """
    return experiment_report.report(output_dir, baseline)


def _read_json(path: str) -> dict | None:
    return json.loads(open(path).read()) if os.path.exists(path) else None


def _write_json(path: str, data: dict) -> None:
    from multicure_monai.atomic_files import atomic_write

    atomic_write(path, lambda f: f.write(json.dumps(data, indent=2).encode()))  # a kill never leaves half a file


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
    fire.Fire({"run": run, "add_seeds": add_seeds, "report": report}, command=args)


if __name__ == "__main__":
    main()
