"""Locks held by a live process: refused while held, free when the holder dies (multicure_monai/process_lock.py)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from multicure_monai.errors import BundleInputError
from multicure_monai.process_lock import (
    TRAINING_LOCK_NAME,
    ProcessLock,
    lock_training_folder,
    release_training_folder,
)

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="fcntl locks (no-ops on Windows)")

HOLDER = textwrap.dedent(
    """
    import sys, time
    from multicure_monai.process_lock import lock_training_folder
    lock_training_folder(sys.argv[1])
    print("held", flush=True)
    time.sleep(600)
    """
)


def _hold(folder: Path) -> subprocess.Popen:
    """A second process that takes the training lock of ``folder`` and sleeps."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("RANK", None)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_training_is_refused_until_the_first_dies(tmp_path: Path) -> None:
    proc = _hold(tmp_path)
    try:
        with pytest.raises(BundleInputError) as err:
            lock_training_folder(tmp_path)
        message = str(err.value)
        assert f"pid {proc.pid}" in message and str(tmp_path) in message and "--bundle_root" in message
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    lock = lock_training_folder(tmp_path)  # a killed holder does not hold it forever
    try:
        assert lock is not None and lock.locked and f"pid {os.getpid()}" in lock.holder()
    finally:
        release_training_folder(tmp_path)
    assert not lock.locked and (tmp_path / TRAINING_LOCK_NAME).is_file()


@pytest.mark.parametrize("rank, held", [(None, True), ("0", True), ("1", False)])
def test_same_process_reuses_its_lock_and_other_ranks_skip_it(tmp_path: Path, monkeypatch, rank, held) -> None:
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    first = lock_training_folder(tmp_path)
    try:
        assert (first is not None) == held
        assert lock_training_folder(tmp_path) is first  # a workflow run twice in one interpreter
    finally:
        release_training_folder(tmp_path)


def test_a_long_wait_says_what_it_waits_for(tmp_path: Path, caplog) -> None:
    proc = _hold(tmp_path)
    lock = ProcessLock(tmp_path / TRAINING_LOCK_NAME)
    try:
        assert not lock.acquire(blocking=False)
        killer = subprocess.Popen([sys.executable, "-c", f"import os, time; time.sleep(1.5); os.kill({proc.pid}, 9)"])
        start = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="multicure_monai.process_lock"):
            assert lock.acquire(blocking=True, warn_after=0.5, what="the test's holder")
        assert time.monotonic() - start >= 0.5
        killer.wait()
        text = caplog.text
        assert "the test's holder" in text and f"pid {proc.pid}" in text and TRAINING_LOCK_NAME in text
    finally:
        lock.release()
        proc.kill()
        proc.wait()


def test_train_yaml_takes_the_lock_before_training(tmp_path: Path) -> None:
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundle" / "configs" / "train.yaml"))
    parser["bundle_root"] = str(tmp_path)
    # the lock is taken first, before the trainer (and its data) is built
    assert parser["training"][0] == "$multicure_monai.process_lock.lock_training_folder(@bundle_root)"
    proc = _hold(tmp_path)
    try:
        with pytest.raises(Exception) as err:  # the config parser may wrap the expression's error
            parser.get_parsed_content("training#0")
        chain, e = [], err.value
        while e is not None:
            chain.append(e)
            e = e.__cause__ or e.__context__
        assert any(isinstance(x, BundleInputError) and "another training" in str(x) for x in chain)
    finally:
        proc.kill()
        proc.wait()
