"""`dra-core demo`, the README's main job, runs the whole flow and cleans up after itself."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.controlplane


def test_demo_runs_end_to_end(control_plane):  # the fixture provides the built binaries
    result = subprocess.run(
        [sys.executable, "-m", "dra_core", "demo"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for step in range(1, 8):
        assert f"[{step}/7]" in out
    assert "allocated device" in out and "CDI devices dra-core.dev/fake=" in out
    assert '"kind": "dra-core.dev/fake"' in out
    assert out.rstrip().endswith("done: control plane stopped, temporary files removed")
