"""Serialization of prepare and unprepare across threads and across agent instances.

During a rolling update two agents serve the same driver; the kubelet may call either. A
thread lock orders calls within one process, and an exclusive ``flock`` on a file in the
plugin data directory orders them between processes.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dra_core.fileio import make_directories

__all__ = ("DriverLock",)


class DriverLock:
    """One lock per driver, held for every prepare and unprepare."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._thread_lock = threading.Lock()

    @contextmanager
    def held(self) -> Iterator[None]:
        with self._thread_lock:
            make_directories(self.path.parent, 0o750)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # closing releases the flock
