"""Prepare and unprepare are serialized across threads and across agent processes."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from dra_core.node.lock import DriverLock

HOLDER = """
import sys, time
from pathlib import Path
from dra_core.node.lock import DriverLock
with DriverLock(Path(sys.argv[1])).held():
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_another_process_waits_for_the_lock(tmp_path: Path):
    path = tmp_path / "plugin" / "serialize.lock"
    with subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), "1.0"], stdout=subprocess.PIPE, text=True
    ) as holder:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with DriverLock(path).held():
            waited = time.monotonic() - started
    assert waited >= 0.5, "the second instance must wait while the first holds the lock"
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_threads_take_turns(tmp_path: Path):
    lock = DriverLock(tmp_path / "serialize.lock")
    inside = 0
    overlaps = 0

    def work() -> None:
        nonlocal inside, overlaps
        for _ in range(20):
            with lock.held():
                inside += 1
                if inside > 1:
                    overlaps += 1
                time.sleep(0.001)
                inside -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert overlaps == 0
