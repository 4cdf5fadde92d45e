"""The side-by-side benchmark (benchmarks/compare.py) keeps working: tiny sizes, every figure
reported for dra-core, the Go reference driver and the floor.

No timing is asserted (shared CI machines make timed tests flaky); the figures are measured
with ``python3 benchmarks/compare.py`` (benchmarks/README.md). The Go programs are built once
by benchmarks/goref/build.sh and cached, like the other Go helpers of the tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dra_core.testing.controlplane import ControlPlane

pytestmark = pytest.mark.controlplane

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "compare.py"
PER_ROUND = (
    "start_ms",
    "rss_mib",
    "prepare_p50_ms",
    "prepare_p99_ms",
    "unprepare_p50_ms",
    "unprepare_p99_ms",
    "parallel_ms",
    "parallel_errors",
    "cpu_per_100_ms",
    "checkpoint_kb",
)
WITH_FLOOR = set(PER_ROUND) - {"start_ms", "rss_mib"}
FSYNC = ("fsync_per_prepare", "fsync_per_unprepare")


@pytest.mark.timeout(900)  # a first build of benchmarks/goref takes about a minute
def test_compare_runs_with_tiny_sizes(control_plane: ControlPlane) -> None:
    argv = [sys.executable, str(SCRIPT), "--rounds", "2", "--claims", "2", "--parallel", "3"]
    argv += ["--fsync-claims", "1", "--kubeconfig", str(control_plane.kubeconfig_path), "--json"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=840, cwd=ROOT)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}"
    document = json.loads(proc.stdout)
    figures = document["figures"]
    assert set(PER_ROUND) | set(FSYNC) <= set(figures)
    for key in PER_ROUND:
        for side in ("dra-core", "goref"):
            entry = figures[key][side]
            assert len(entry["rounds"]) == 2, (key, side, entry)
            assert all(isinstance(v, int | float) for v in entry["rounds"]), (key, side)
        if key in WITH_FLOOR:
            assert len(figures[key]["floor"]["rounds"]) == 2, key
    for side in ("dra-core", "goref", "floor"):
        assert figures["parallel_errors"][side]["value"] == 0, side
    assert figures["checkpoint_kb"]["goref"]["value"] > 0
    for key in FSYNC:  # counted with strace where it can trace, else a note says why not
        entry = figures[key]
        if "note" in entry:
            assert "strace" in entry["note"], entry
        else:
            assert all(entry[side]["value"] >= 0 for side in ("dra-core", "goref", "floor"))
    assert document["info"]["rounds"] == 2
    assert "prepare p50, one claim per call" in proc.stderr  # the table
