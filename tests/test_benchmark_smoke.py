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

from benchmarks.run import FIGURE_KEYS

pytestmark = pytest.mark.controlplane

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "run.py"


def test_benchmark_runs_with_tiny_sizes(control_plane, tmp_path):
    out = tmp_path / "figures.json"
    argv = [sys.executable, str(SCRIPT), "--claims", "5", "--gpus", "1", "--vfs", "2"]
    argv += ["--start-runs", "2", "--discovery-runs", "3", "--quiet", "1", "--held", "3"]
    argv += ["--kubeconfig", str(control_plane.kubeconfig_path), "--json", str(out)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    figures = json.loads(out.read_text())["figures"]
    assert set(FIGURE_KEYS) <= set(figures), sorted(set(FIGURE_KEYS) - set(figures))
    assert all(isinstance(figures[k], int | float) for k in FIGURE_KEYS)
    assert "prepare latency p99" in proc.stdout  # the table is printed
