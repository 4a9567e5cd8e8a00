"""The kernel build never waits forever on a lock left by a killed build (networks/deform_conv_extension.py)."""

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

from multicure_monai.networks import deform_conv_extension as ext
from multicure_monai.process_lock import ProcessLock

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="fcntl locks (no-ops on Windows)")


def _fake_load(build_dir: Path, seen: list):
    """Stands in for torch's ``load``: like torch, it would wait forever while its ``lock`` file exists."""

    def load(**kwargs):
        seen.append((kwargs["name"], (build_dir / "lock").exists()))
        return "module"

    return load


def test_stale_torch_lock_is_removed(tmp_path: Path, caplog) -> None:
    (tmp_path / "lock").write_text("")  # left by a build that was killed
    seen: list = []
    with caplog.at_level(logging.WARNING, logger=ext.__name__):
        assert ext._load_locked(_fake_load(tmp_path, seen), name="k", build_directory=str(tmp_path)) == "module"
    assert seen == [("k", False)] and "killed" in caplog.text
    assert not ProcessLock(tmp_path / "multicure_build.lock").locked  # released after the load


HOLDER = textwrap.dedent(
    """
    import sys, time
    from multicure_monai.process_lock import ProcessLock
    ProcessLock(sys.argv[1]).acquire()
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
    """
)


def test_a_live_builder_is_waited_for_and_named(tmp_path: Path, monkeypatch, caplog) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    (tmp_path / "lock").write_text("")  # a live builder's torch lock: must not be removed while it builds
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "multicure_build.lock"), "2"],
                              stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    monkeypatch.setattr(ext, "BUILD_WAIT_WARNING_S", 0.5)
    seen: list = []
    try:
        with caplog.at_level(logging.WARNING):
            ext._load_locked(_fake_load(tmp_path, seen), name="k", build_directory=str(tmp_path))
    finally:
        holder.wait()
    assert f"pid {holder.pid}" in caplog.text and "the C++ kernel build of k" in caplog.text
    assert seen == [("k", False)]  # the holder exited without deleting torch's lock: removed, then loaded


LOADER = "from multicure_monai.networks.deform_conv_extension import load_cpu_extension as f; print(f() is not None)"


@pytest.mark.slow
def test_build_killed_midway_does_not_hang_the_next_load(tmp_path: Path) -> None:
    """SIGKILL during the real build (torch's lock file stays behind), then load: builds and returns the module."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TORCH_EXTENSIONS_DIR": str(tmp_path), ext.EXTENSION_ENV: "1"}  # fmt: skip
    first = subprocess.Popen([sys.executable, "-c", LOADER], env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob("*/lock")) and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.1)
    assert first.poll() is None, "the build finished before it could be killed"
    time.sleep(3)  # the compiler is running
    os.killpg(first.pid, signal.SIGKILL)  # the build's ninja / g++ too
    first.wait()
    assert list(tmp_path.glob("*/lock")), "a killed build leaves torch's lock file (the hang this guards against)"
    second = subprocess.run([sys.executable, "-c", LOADER], env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and second.stdout.strip().endswith("True"), second.stderr[-3000:]
    assert "left by a kernel build that was killed" in second.stderr
