"""No text file of the repository names a path of the machine it was written on.

Docs, examples and comments use placeholders (``<runs>/...``, ``<la_half_nii>``) or paths relative to the
repository instead, so that they hold on any machine and leak nothing of the one they were written on.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# an absolute path into a home, scratch or workspace folder; the path part of a URL (after its host) does not count
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:(?:work|root|Users|tmp)/|home/[\w.-]+)")
# what a walk skips when there is no git to list the files: git's own folder, caches, virtual environments, build
# outputs, installed packages and the bundle's run outputs (all ignored by .gitignore)
SKIPPED_PREFIXES = (".git", ".venv", "__pycache__")
SKIPPED_SUFFIXES = ("_cache", ".egg-info")
SKIPPED_DIRS = {"build", "dist", "site-packages", ".tox"}
SKIPPED_PATHS = {"bundle/data", "bundle/eval", "bundle/logs", "bundle/ckpt", "bundle/output", "bundle/runs"}


def _has_git() -> bool:
    return (ROOT / ".git").exists() and shutil.which("git") is not None


def _repo_files(use_git: bool = True) -> list[Path]:
    """Tracked and untracked-but-not-ignored files (``git ls-files``), else every file of a walk of the tree."""
    if use_git and _has_git():
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT, capture_output=True, check=True,
        ).stdout.decode()
        return [ROOT / name for name in out.split("\0") if name and (ROOT / name).is_file()]
    files = []
    for folder, dirs, names in os.walk(ROOT):
        rel = Path(folder).relative_to(ROOT)
        dirs[:] = [
            d
            for d in dirs
            if not d.startswith(SKIPPED_PREFIXES) and not d.endswith(SKIPPED_SUFFIXES) and d not in SKIPPED_DIRS
            and (rel / d).as_posix() not in SKIPPED_PATHS
        ]
        files += [Path(folder) / n for n in names if n != ".git"]  # a worktree's .git file names its main checkout
    return files


def _text(path: Path) -> str | None:
    """The file's text, or ``None`` for a binary file (a NUL byte or not UTF-8)."""
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _ROOTED(*parts: str) -> str:  # noqa: N802 - the examples are built, so this file holds no such path itself
    return "/" + "/".join(parts)


def machine_paths(text: str) -> list[tuple[int, str]]:
    """``(line number, line)`` of every line of ``text`` that names a machine path."""
    return [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1) if MACHINE_PATH.search(line)]


@pytest.mark.parametrize(
    "line, found",
    [
        ("python prepare_la.py --output_dir " + _ROOTED("work", "data", "la_half_nii"), True),
        ("cp " + _ROOTED("tmp", "phantoms", "a.nii.gz") + " studies/", True),
        ("see " + _ROOTED("home", "alice", "notes.md"), True),
        ("`" + _ROOTED("root", ".cache", "torch") + "`", True),
        ("open " + _ROOTED("Users", "bob", "LA"), True),
        ("--output_dir <runs>/m13/mx --dataset_dir <la_half_nii>", False),
        ("python bundle/scripts/make_phantoms.py --root phantoms", False),
        ("https://example.org" + _ROOTED("work", "tmp", "page") + " and ../data", False),
        ("a temporary folder (tempfile.mkdtemp) or ~/tmp", False),
    ],
    ids=["workspace", "scratch", "home", "root", "users", "placeholders", "relative", "url", "tilde"],
)
def test_machine_path_pattern(line: str, found: bool) -> None:
    assert bool(machine_paths(line)) is found


@pytest.mark.skipif(not _has_git(), reason="needs a git checkout to compare with")
def test_walk_lists_every_tracked_file() -> None:
    """The walk that replaces ``git ls-files`` outside a checkout (e.g. an sdist) misses no tracked file."""
    assert set(_repo_files(use_git=True)) <= set(_repo_files(use_git=False))


def test_no_machine_path_in_the_repository() -> None:
    files = _repo_files()
    assert len(files) > 50, "the file listing found almost nothing: is ROOT the repository root?"
    hits = []
    for path in files:  # this file too: its examples are built from parts
        text = _text(path)
        if text is not None:
            hits += [f"{path.relative_to(ROOT)}:{i}: {line[:120]}" for i, line in machine_paths(text)]
    assert not hits, "machine paths (use a placeholder such as <runs>/... or a relative path):\n" + "\n".join(hits)
