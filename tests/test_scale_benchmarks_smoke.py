"""The cluster-scale benchmarks keep working: benchmarks/agents.py (N agents on one API
server) and benchmarks/storm.py (a prepare storm), at tiny sizes.

No timing is asserted (shared CI machines make timed tests flaky). Request counts are not
timings: a dra-core agent's start must cost the API server one LIST of its slices and one read
of its Node, as the API server itself counts them. The figures are measured with the commands
of benchmarks/README.md.
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
ROW = (
    "start_requests_per_node",
    "idle_requests_per_node_per_min",
    "watches_per_node",
    "connections_started_max",
    "connections_idle_max",
    "start_cpu_ms_median",
    "idle_cpu_ms_per_min_median",
)


def _run(argv: list[str], timeout: float) -> None:
    proc = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}"


@pytest.mark.timeout(900)  # a first build of benchmarks/goref takes about a minute
def test_agents_benchmark_with_two_agents(control_plane: ControlPlane, tmp_path: Path) -> None:
    out = tmp_path / "agents.json"
    argv = ["benchmarks/agents.py", "--agents", "2", "--idle", "3", "--background", "1"]
    argv += ["--kubeconfig", str(control_plane.kubeconfig_path), "--json", str(out)]
    _run(argv, timeout=840)
    document = json.loads(out.read_text())
    rows = {row["side"]: row for row in document["rows"]}
    assert set(rows) == {"dra-core", "goref"}
    for row in rows.values():
        assert row["agents"] == 2
        assert all(isinstance(row[key], int | float) for key in ROW), row
        assert row["connections_started_max"] >= 1
        assert row["watches_per_node"] >= 1
    dra_core = next(d for d in document["details"] if d["side"] == "dra-core")
    assert dra_core["start_requests"]["LIST resourceslices"] == 1
    assert dra_core["start_requests"]["GET nodes"] == 1


def test_storm_benchmark_with_five_claims(control_plane: ControlPlane, tmp_path: Path) -> None:
    out = tmp_path / "storm.json"
    argv = ["benchmarks/storm.py", "--claims", "5"]
    argv += ["--kubeconfig", str(control_plane.kubeconfig_path), "--json", str(out)]
    _run(argv, timeout=240)
    figures = json.loads(out.read_text())["figures"]
    assert figures["concurrent_errors"] == 0
    assert figures["storm_claim_reads"] == 5, "each claim read once, by the agent"
    for key in ("concurrent_seconds", "storm_reads_per_s_mean", "storm_reads_per_s_max"):
        assert figures[key] > 0
