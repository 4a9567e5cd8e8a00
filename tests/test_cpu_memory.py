"""keep_freed_memory: glibc keeps a freed large block in the process; disabled or elsewhere it does nothing."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from multicure_monai import cpu_memory

# a child process (the setting is process-wide): RSS growth after a 256 MiB tensor is allocated, touched and freed
_CHILD = """
import json, os, sys, torch
from multicure_monai.cpu_memory import keep_freed_memory
applied = keep_freed_memory(sys.argv[1] == "kept")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
before = rss()
t = torch.ones(64 * 2**20)
del t
print(json.dumps({"applied": applied, "kept_bytes": rss() - before}))
"""

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="needs Linux with glibc")
@pytest.mark.parametrize("setting, applied, kept", [("default", False, False), ("kept", True, True)])
def test_freed_block_stays_in_the_process(setting, applied, kept):
    out = subprocess.run([sys.executable, "-c", _CHILD, setting], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["applied"] is applied
    # default glibc: the block was mmapped and is unmapped on free; kept: it stays in the heap (256 MiB)
    assert (result["kept_bytes"] > 200 * 2**20) is kept


def test_disabled_returns_false():
    assert cpu_memory.keep_freed_memory(False) is False


def test_not_glibc_returns_false(monkeypatch):
    cpu_memory._glibc.cache_clear()
    monkeypatch.setattr(cpu_memory.platform, "libc_ver", lambda: ("", ""))
    try:
        assert cpu_memory.keep_freed_memory() is False
    finally:
        cpu_memory._glibc.cache_clear()
