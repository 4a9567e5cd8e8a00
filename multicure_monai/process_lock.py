"""File locks held by a live process: released by the operating system when the process dies, however it dies.

A lock *file* that marks "busy" by its existence (``torch.utils.file_baton.FileBaton``, used by the C++
kernel build) outlives a killed process and makes every later process wait forever. :class:`ProcessLock`
instead holds ``fcntl.flock`` on an open file: the kernel drops it when the holder exits, a ``SIGKILL``
included, so a lock can never be stale. The file also records the holder (pid, host, start time) for the
messages of the processes that find it held.

:func:`lock_training_folder` uses it so that a second training on the same ``bundle_root`` is refused
instead of overwriting the first one's checkpoints and ``model.pt``; the kernel build
(:mod:`multicure_monai.networks.deform_conv_extension`) uses it to tell a live builder from a dead one.
Where ``fcntl`` does not exist (Windows) the locks are no-ops.
"""

from __future__ import annotations

import logging
import os
import socket
import time

from multicure_monai.errors import BundleInputError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["ProcessLock", "TRAINING_LOCK_NAME", "lock_training_folder", "release_training_folder"]

#: The lock file a training holds in its ``bundle_root``.
TRAINING_LOCK_NAME = ".training.lock"

_logger = logging.getLogger("multicure_monai.process_lock")

# locks this process holds, by real path: a second acquisition from the same process (a workflow run twice in
# one interpreter) reuses the lock instead of blocking on itself (flock locks belong to an open file)
_HELD: dict[str, ProcessLock] = {}


class ProcessLock:
    """An exclusive ``fcntl.flock`` on ``path``, held until :meth:`release` or the end of the process.

    Args:
        path: the lock file (created; never deleted, so every process locks the same inode).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self._fd: int | None = None

    @property
    def locked(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def holder(self) -> str:
        """Who holds (or last held) the lock, as recorded in the file: ``"pid 123 on host since 13:05:01"``."""
        try:
            with open(self.path) as f:
                text = f.read().strip()
        except OSError:
            text = ""
        return text or "a process that recorded nothing"

    def acquire(self, blocking: bool = True, warn_after: float = 60.0, what: str = "", poll: float = 0.2) -> bool:
        """Take the lock.

        Args:
            blocking: wait until it is free; else return False at once when another process holds it.
            warn_after: while waiting, log a warning after this many seconds (and again every as many seconds)
                that names ``what``, the lock file and its holder.
            what: what the holder is doing, for the warning (e.g. "the C++ kernel build").
            poll: seconds between attempts while waiting.

        Returns:
            True when the lock is held (always, if ``blocking``); False when not blocking and it is taken.
        """
        if self._fd is not None or fcntl is None:
            return True
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        start, next_warning = time.monotonic(), warn_after
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not blocking:
                    os.close(fd)
                    return False
                waited = time.monotonic() - start
                if waited >= next_warning:
                    _logger.warning(
                        f"waited {waited:.0f} s for {what or 'a lock'}: {self.path} is held by {self.holder()} "
                        "(a live process; the lock is released when it ends)"
                    )
                    next_warning += warn_after
                time.sleep(poll)
        os.ftruncate(fd, 0)
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {since}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        """Release the lock (a no-op when not held)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> ProcessLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_training_folder(folder: str | os.PathLike) -> ProcessLock | None:
    """Refuse to train when another live training uses ``folder`` (the bundle root); else hold its lock.

    The lock is held until :func:`release_training_folder` or the end of the process. Only the first process
    of a distributed run (``RANK`` 0 or unset) takes it: the ranks of one torchrun share the folder.

    Args:
        folder: the training's ``bundle_root`` (created if missing).

    Returns:
        The held lock (None on ranks > 0).

    Raises:
        BundleInputError: another live process holds the lock; the message names it and the fix.
    """
    if int(os.environ.get("RANK", "0") or 0) > 0:
        return None
    lock = ProcessLock(os.path.join(os.fspath(folder), TRAINING_LOCK_NAME))
    key = os.path.realpath(lock.path)
    if key in _HELD:
        return _HELD[key]
    if not lock.acquire(blocking=False):
        raise BundleInputError(
            f"another training is running on bundle_root {os.path.abspath(os.fspath(folder))} ({lock.holder()}); "
            "two trainings there would overwrite each other's checkpoints and models/model.pt. Wait for it to end, "
            "or pass another --bundle_root."
        )
    _HELD[key] = lock
    return lock


def release_training_folder(folder: str | os.PathLike) -> None:
    """Release the lock :func:`lock_training_folder` took on ``folder`` in this process (a no-op otherwise).

    Args:
        folder: the training's ``bundle_root``.
    """
    lock = _HELD.pop(os.path.realpath(os.path.join(os.fspath(folder), TRAINING_LOCK_NAME)), None)
    if lock is not None:
        lock.release()
