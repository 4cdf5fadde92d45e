"""benchmarks/preparework.py counts the instructions of prepares and unprepares under callgrind;
the work it counts is checked here without callgrind: the claims are prepared and unprepared
through a started agent's claim service, and leave nothing behind. The figures are measured
with ``python3 benchmarks/preparework.py``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from dra_core.checkpoint import FILE_NAME, Checkpoint

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "preparework.py"


def test_the_counted_work_prepares_and_unprepares_each_claim(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--child", "3", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    claims = 3 + 20  # and the warm-up's
    assert done.stderr.count("] prepared claim default/claim-") == claims
    assert done.stderr.count("] unprepared claim default/claim-") == claims
    checkpoint = Checkpoint.open(tmp_path / "plugins" / "fake.dra-core.dev" / FILE_NAME)
    assert len(checkpoint) == 0
    assert not list((tmp_path / "cdi").glob("*.json")), "a CDI spec was left behind"
