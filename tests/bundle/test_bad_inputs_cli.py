"""Bad input through ``python -m monai.bundle run training|evaluating|inference``: the run stops in
``initialize``, before any work, with the error as the last lines of its output (the cases: ``test_bad_inputs``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_bad_inputs import EVALUATE, INFER, REPO, TRAIN, _good, _nii

_HINT = "The run stopped on a problem in its input (full traceback: MULTICURE_DEBUG=1 or --debug True):"


def _run_bundle(tmp_path: Path, workflow: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run <workflow>`` with tiny-geometry overrides; the bundle root under tmp_path."""
    configs = {"training": [TRAIN], "evaluating": [TRAIN, EVALUATE], "inference": [INFER]}[workflow]
    config_file = str(configs[0]) if len(configs) == 1 else str([str(c) for c in configs])
    cmd = [sys.executable, "-m", "monai.bundle", "run", workflow, "--config_file", config_file,
           "--bundle_root", str(tmp_path / "root"), "--roi_size", "[16,16,16]", "--sw_stride", "[16,16,16]",
           "--num_workers", "0", *args]  # fmt: skip
    if workflow != "inference":
        cmd += ["--max_iterations", "2", "--val_interval", "2"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def _last_error(proc: subprocess.CompletedProcess) -> str:
    """The error the run ended with: asserted to be the last lines of its output, with no traceback."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Failed to " not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.rstrip().splitlines()
    assert _HINT in lines, proc.stderr[-3000:]
    error = "\n".join(lines[lines.index(_HINT) + 1 :])
    assert error.startswith(("BundleInputError: ", "MissingFileError: ")), error
    assert "Engine run" not in proc.stdout + proc.stderr  # no training or inference iteration was started
    return error


def _datalist(tmp_path: Path, lists: dict) -> str:
    path = tmp_path / "data" / "datalist.json"
    path.write_text(json.dumps(lists))
    return str(path)


@pytest.mark.slow
def test_bundle_lists_every_datalist_problem_last(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    cases = [_good(tmp_path / "data", f"c{i}") for i in range(3)]
    Path(cases[0]["label"]).unlink()
    Path(cases[1]["image"]).unlink()
    _nii(Path(cases[2]["label"]), np.asarray(nib.load(cases[2]["label"]).dataobj), spacing=(5.0, 5.0, 5.0))
    lists = {"training": cases[:1], "unlabeled": [{"image": cases[1]["image"]}], "validation": cases[2:]}
    error = _last_error(_run_bundle(tmp_path, "training", "--datalist", _datalist(tmp_path, lists)))
    print(error)
    assert len(error.splitlines()) == 4  # the head and one line per problem: nothing after them
    assert error.startswith("BundleInputError: datalist check (training, unlabeled, validation) failed with 3 problems")
    assert f"training: {cases[0]['label']}: label file not found" in error
    assert f"unlabeled: {cases[1]['image']}: image file not found" in error
    assert f"validation: {cases[2]['label']}: label grid differs from image {cases[2]['image']}" in error
    assert not (tmp_path / "root" / "models").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "workflow, args, expected",
    [
        ("training", ["--multicure#us", "False"],
         ["--multicure#us: no config id 'multicure#us' in train.yaml; did you mean --multicure#use",
          "--checks#allowed_new_ids \"['loss_terms', 'multicure#us']\""]),
        ("evaluating", ["--datalist_keys#validaton", "test"], ["did you mean --datalist_keys#validation"]),
        ("training", ["--unlabelled#pseudo_label_threshold", "1.5", "--output_dir", "{blocker}/eval"],
         ["config check failed with 2 values out of range",
          "unlabelled#pseudo_label_threshold=1.5: must be a number in the open interval (0, 1) (override with "
          "--unlabelled#pseudo_label_threshold)",
          "output_dir={blocker}/eval: is under {blocker}, which is a regular file, not a folder (choose another "
          "folder with --output_dir)"]),
        ("inference", ["--output_dir", "{blocker}/masks"],
         ["output_dir={blocker}/masks: is under {blocker}, which is a regular file"]),
        ("inference", ["--input_dir", "{tmp}/no_images"], ["{tmp}/no_images: no image files"]),
    ],
    ids=["misspelled override", "evaluating: misspelled override", "config values and output folder",
         "inference: output folder", "inference: empty input folder"],
)  # fmt: skip
def test_bundle_stops_before_any_work(tmp_path: Path, workflow: str, args: list[str], expected: list[str]) -> None:
    blocker = tmp_path / "results.txt"
    blocker.write_text("a regular file")
    (tmp_path / "no_images").mkdir()
    fill = {"blocker": str(blocker), "tmp": str(tmp_path)}
    error = _last_error(_run_bundle(tmp_path, workflow, *(a.format(**fill) for a in args)))
    print(error)
    for fragment in expected:
        assert fragment.format(**fill) in error
    assert not (tmp_path / "root" / "data").exists()  # failed before the phantom set was generated


@pytest.mark.slow
@pytest.mark.parametrize("env, args", [({"MULTICURE_DEBUG": "1"}, []), ({}, ["--debug", "True"])], ids=["env", "flag"])
def test_debug_keeps_the_traceback(tmp_path: Path, env: dict, args: list[str]) -> None:
    proc = _run_bundle(tmp_path, "training", "--multicure#us", "False", *args, env=env)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "Failed to instantiate" in proc.stderr and _HINT not in proc.stderr
    assert "multicure_monai.errors.BundleInputError: unknown command-line override" in proc.stderr
