"""The DeviceClasses in deploy/ are what `dra-core render` prints for each backend."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

DEPLOY = Path(__file__).parent.parent.parent / "deploy"


@pytest.mark.parametrize("backend", ["fake", "i915"])
def test_rendered_device_classes_are_current(backend):
    rendered = subprocess.run(
        [sys.executable, "-m", "dra_core", "render", "--backend", backend],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    committed = (DEPLOY / "overlays" / backend / "deviceclasses.yaml").read_text()
    assert committed == rendered, (
        f"deploy/overlays/{backend}/deviceclasses.yaml is stale: run "
        f"`dra-core render --backend {backend} > deploy/overlays/{backend}/deviceclasses.yaml`"
    )
