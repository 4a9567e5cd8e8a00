"""Files written whole or not at all: a temporary file in the target's folder, fsynced, renamed over the target.

The one temp-file-then-rename writer of the package (checkpoints, ``model.pt`` and its side-car, inference masks,
experiment records). :func:`os.replace` within one folder is atomic, so a process killed mid-write leaves the
previous file (or none) and at most a hidden ``.<name>.<random>.partial`` that :func:`remove_stale_partials`
clears. Python's standard library has no such writer, so it is written here.
"""

from __future__ import annotations

import glob
import os
import tempfile
from collections.abc import Callable
from typing import IO, Any

__all__ = ["TMP_SUFFIX", "atomic_write", "remove_stale_partials"]

#: Suffix of the temporary files written before the rename (never ``.pt``: MONAI Label offers ``models/*.pt``).
TMP_SUFFIX = ".partial"


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], mode: int = 0o644) -> str:
    """Write a file through ``write(f)`` so that ``path`` is never left partial: temp file, fsync, chmod, rename.

    The temporary file is ``.<name>.<random>.partial`` in the target's folder (same file system, so
    :func:`os.replace` is atomic); after a crash it is the only leftover and :func:`remove_stale_partials`
    (called by :class:`AtomicDiskSaver` at its start) removes it. Until the rename, ``path`` keeps its previous
    content; if ``write`` raises, the temporary file is removed and the error propagates.

    Args:
        path: the target file (its folder is created).
        write: called once with the temporary file opened for binary writing; writes the whole content.
        mode: permissions of the written file (``0o644``: readable by the group/others, like ``open``).

    Returns:
        The absolute path written.
    """
    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=TMP_SUFFIX, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(folder)
    return path


def _fsync_dir(folder: str) -> None:
    """Fsync a folder so a rename inside it is durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_partials(folder: str | os.PathLike) -> list[str]:
    """Delete temporary files left by a process killed inside :func:`atomic_write`.

    Args:
        folder: the folder to clean.

    Returns:
        The paths of the files found (sorted).
    """
    stale = sorted(glob.glob(os.path.join(os.fspath(folder), f".*{TMP_SUFFIX}")))
    for p in stale:
        try:
            os.remove(p)
        except OSError:
            pass
    return stale
