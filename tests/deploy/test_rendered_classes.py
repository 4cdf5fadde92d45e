"""The DeviceClasses in deploy/ (the kustomize overlays and the Helm chart's files) are what
`dra-core render` prints for each backend."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).parent.parent.parent / "deploy"
#: Where each backend's rendered classes are kept: {backend} is the backend's name.
TARGETS = [
    "overlays/{backend}/deviceclasses.yaml",
    "helm/dra-core/files/deviceclasses-{backend}.yaml",
]
BACKENDS = ["fake", "i915"]


def render(backend: str, *args: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "dra_core", "render", "--backend", backend, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_rendered_device_classes_are_current(backend, target):
    path = target.format(backend=backend)
    committed = (DEPLOY / path).read_text()
    assert committed == render(backend), (
        f"deploy/{path} is stale: run `dra-core render --backend {backend} > deploy/{path}`"
    )


def test_every_backend_of_the_chart_has_its_classes():
    files = {p.name for p in (DEPLOY / "helm/dra-core/files").glob("deviceclasses-*.yaml")}
    assert files == {f"deviceclasses-{b}.yaml" for b in BACKENDS}


@pytest.mark.parametrize("backend", BACKENDS)
def test_render_names_another_driver(backend):
    """--driver-name renders the classes for that driver (the chart relies on it)."""
    default = [d for d in yaml.safe_load_all(render(backend)) if d]
    other = [d for d in yaml.safe_load_all(render(backend, "--driver-name", "x.example.com")) if d]
    assert len(other) == len(default)
    for mine, theirs in zip(other, default, strict=True):
        text = yaml.safe_dump(mine)
        assert "x.example.com" in mine["metadata"]["name"]
        assert 'device.driver == "x.example.com"' in text
        assert yaml.safe_dump(theirs).count("x.example.com") == 0
