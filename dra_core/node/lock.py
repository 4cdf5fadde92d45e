"""Serialization of prepare and unprepare across threads and across agent instances.

During a rolling update two agents serve the same driver; the kubelet may call either. A
thread lock orders calls within one process, and an exclusive ``flock`` on a file in the
plugin data directory orders them between processes.

A kubelet call waits for the lock only until its deadline (`DriverLock.held`): the flock is
then tried without blocking every `_POLL_SECONDS`, since a blocking ``flock`` cannot be given
a timeout from a worker thread. The holder writes what it holds the lock for into the file,
so that a call that gives up can say which prepare or unprepare it waited for.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from dra_core.errors import TransientError
from dra_core.fileio import make_directories, read_regular_text

__all__ = ("DriverLock", "DriverLockBusy")

#: How often a waiter with a deadline tries the flock again: short beside a kubelet call.
_POLL_SECONDS: Final = 0.01
#: The most of a holder's description written to (and read from) the lock file.
_HOLDER_BYTES: Final = 1024


class DriverLockBusy(TransientError):
    """The driver lock was not free by the caller's deadline; the message says who holds it."""

    def __init__(self, path: Path, holder: str, waited: float) -> None:
        self.path = path
        self.holder = holder
        super().__init__(
            f"another prepare or unprepare of this driver holds the driver lock {path} "
            f"({holder}); it was not free within the {waited:.1f} s this call allows"
        )


class DriverLock:
    """One lock per driver, held for every prepare and unprepare."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._thread_lock = threading.Lock()
        #: What this process holds the lock for, while it does.
        self._purpose = ""

    @contextmanager
    def held(self, deadline: float | None = None, purpose: str = "") -> Iterator[None]:
        """Hold the lock for ``purpose`` ("prepare of claim default/a (uid)").

        ``deadline`` (a `time.monotonic` value) bounds the wait; None waits as long as it takes.
        The lock is tried at least once, so a free lock is taken even past the deadline.

        :raises DriverLockBusy: the lock was not free by ``deadline``.
        """
        started = time.monotonic()
        timeout = -1.0 if deadline is None else max(0.0, deadline - started)
        if not self._thread_lock.acquire(timeout=timeout):
            raise self.busy(time.monotonic() - started)
        try:
            fd = self._open()
            try:
                if not _flock(fd, deadline):
                    waited = time.monotonic() - started
                    raise DriverLockBusy(self.path, self._other_holder(), waited)
                self._purpose = purpose
                _describe_holder(fd, f"pid {os.getpid()}: {purpose or 'unnamed call'}")
                try:
                    yield
                finally:
                    self._purpose = ""
                    with contextlib.suppress(OSError):  # only the description is left behind
                        os.ftruncate(fd, 0)
            finally:
                os.close(fd)  # closing releases the flock
        finally:
            self._thread_lock.release()

    def _open(self) -> int:
        """The lock file, opened (and created, with its directory, when missing)."""
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        try:
            return os.open(self.path, flags, 0o600)
        except FileNotFoundError:  # the directory is not there (yet, or any more)
            make_directories(self.path.parent, 0o750)
            return os.open(self.path, flags, 0o600)

    def busy(self, waited: float) -> DriverLockBusy:
        """The error of a call of this agent that waited ``waited`` seconds in vain."""
        holder = f"{self._purpose or 'another call'} in this agent, pid {os.getpid()}"
        return DriverLockBusy(self.path, holder, waited)

    def _other_holder(self) -> str:
        """What another process holds the lock for, as it wrote it (if it did)."""
        try:
            text = read_regular_text(self.path, _HOLDER_BYTES, errors="replace").strip()
        except OSError:
            text = ""
        if not text:
            return "another process, which does not say what it does"
        return f"another agent instance, {text}"


def _flock(fd: int, deadline: float | None) -> bool:
    """Take the flock on ``fd``; False when it was not free by ``deadline``."""
    if deadline is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return True
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(_POLL_SECONDS, left))


def _describe_holder(fd: int, description: str) -> None:
    data = description.encode("utf-8", errors="replace")[:_HOLDER_BYTES]
    with contextlib.suppress(OSError):  # a description that cannot be written is only missing
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
