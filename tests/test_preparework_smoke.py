"""benchmarks/preparework.py counts the instructions of prepares and unprepares, and of the
kubelet's calls, under callgrind; the work it counts is checked here without callgrind: the
claims are prepared and unprepared through a started agent's claim service and leave nothing
behind, and the calls are answered. The figures are measured with
``python3 benchmarks/preparework.py``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from dra_core.checkpoint import FILE_NAME, Checkpoint

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "preparework.py"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """benchmarks/preparework.py with ``args``, as it runs itself under callgrind."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_the_counted_work_prepares_and_unprepares_each_claim(tmp_path: Path) -> None:
    done = run("--child", "3", str(tmp_path))
    claims = 3 + 20  # and the warm-up's
    assert done.stderr.count("] prepared claim default/claim-") == claims
    assert done.stderr.count("] unprepared claim default/claim-") == claims
    checkpoint = Checkpoint.open(tmp_path / "plugins" / "fake.dra-core.dev" / FILE_NAME)
    assert len(checkpoint) == 0
    assert not list((tmp_path / "cdi").glob("*.json")), "a CDI spec was left behind"


def test_the_counted_calls_are_answered_and_the_server_exits(tmp_path: Path) -> None:
    path = tmp_path / "dra.sock"
    caller = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--calls", "3", str(path)], stderr=subprocess.PIPE
    )
    run("--serve", "3", str(path))
    _, errors = caller.communicate(timeout=60)
    assert caller.returncode == 0, errors.decode()[-3000:]
