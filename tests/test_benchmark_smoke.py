"""The benchmark (benchmarks/run.py) keeps working: tiny sizes, every figure reported.

No timing is asserted: shared CI machines make timed tests flaky. The figures themselves are
measured with ``python benchmarks/run.py`` (benchmarks/README.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.controlplane

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "run.py"
FIGURES = (
    "start_to_registered_ms_median",
    "start_to_registered_ms_max",
    "agent_rss_mib",
    "discovery_devices",
    "discovery_ms_median",
    "discovery_ms_max",
    "publish_devices",
    "publish_slices",
    "publish_ms",
    "publish_quiet_writes",
    "publish_quiet_syncs",
    "prepare_claims",
    "prepare_ms_p50",
    "prepare_ms_p99",
    "unprepare_ms_p50",
    "unprepare_ms_p99",
    "concurrent_claims",
    "concurrent_errors",
    "concurrent_seconds",
    "concurrent_claims_per_s",
    "concurrent_call_ms_p50",
    "concurrent_call_ms_p99",
    "held_claims",
    "prepare_held0_ms_p50",
    "prepare_held0_ms_p99",
    "unprepare_held0_ms_p50",
    "unprepare_held0_ms_p99",
    "prepare_heldn_ms_p50",
    "prepare_heldn_ms_p99",
    "unprepare_heldn_ms_p50",
    "unprepare_heldn_ms_p99",
    "prepare_held_ratio_p50",
    "fsyncs_per_prepare",
    "fsyncs_per_unprepare",
)


def test_benchmark_runs_with_tiny_sizes(control_plane, tmp_path):
    out = tmp_path / "figures.json"
    argv = [sys.executable, str(SCRIPT), "--claims", "5", "--gpus", "1", "--vfs", "2"]
    argv += ["--start-runs", "2", "--discovery-runs", "3", "--quiet", "1", "--held", "3"]
    argv += ["--kubeconfig", str(control_plane.kubeconfig_path), "--json", str(out)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    figures = json.loads(out.read_text())["figures"]
    assert set(FIGURES) <= set(figures), sorted(set(FIGURES) - set(figures))
    assert all(isinstance(figures[k], int | float) for k in FIGURES)
    assert "prepare latency p99" in proc.stdout  # the table is printed
