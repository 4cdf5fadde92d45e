"""The dra-core command as a user runs it: a real subprocess of the installed package."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from dra_core import __version__


def dra_core(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "dra_core", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_version():
    assert dra_core("--version").stdout.strip() == f"dra-core {__version__}"


@pytest.mark.parametrize(
    "command", ["run", "discover", "backends", "render", "demo", "webhook", "checkpoint"]
)
def test_every_command_has_useful_help(command):
    text = dra_core(command, "--help").stdout
    assert text.startswith("usage: dra-core")
    assert len(text.split()) > 25, "help explains the command, not just its syntax"


def test_run_help_shows_the_backends_own_options():
    text = dra_core("run", "--backend", "fake", "--help").stdout
    assert "backend options" in text
    assert "--sysfs-root" not in text
    assert "--sysfs-root" in dra_core("run", "--backend", "i915", "--help").stdout


def test_discover_fake_prints_valid_resource_slices():
    result = dra_core("discover", "--backend", "fake", "--node-name", "node-a")
    assert result.stdout.startswith("# driver ")
    slices = list(yaml.safe_load_all(result.stdout))
    assert slices, "at least one ResourceSlice"
    for body in slices:
        assert body["apiVersion"] == "resource.k8s.io/v1" and body["kind"] == "ResourceSlice"
        assert body["spec"]["nodeName"] == "node-a"
        assert body["spec"]["pool"]["resourceSliceCount"] == len(slices)
    devices = [d["name"] for s in slices for d in s["spec"].get("devices", [])]
    assert len(devices) == len(set(devices)) > 0


def test_render_prints_device_classes():
    classes = list(yaml.safe_load_all(dra_core("render", "--backend", "fake").stdout))
    assert classes and all(c["kind"] == "DeviceClass" for c in classes)
    for body in classes:
        assert body["spec"]["selectors"][0]["cel"]["expression"]


def test_no_backend_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("DRA_BACKEND", raising=False)
    result = dra_core("discover", check=False)
    assert result.returncode == 2
    assert "no backend chosen: pass --backend NAME or set DRA_BACKEND" in result.stderr


def test_checkpoint_inspect_and_repair(tmp_path):
    path = tmp_path / "checkpoint.json"
    path.write_text(
        '{"kind": "dra-core-checkpoint", "version": 1, "checksum": "sha256:00", '
        '"data": {"claims": {}}}'
    )
    inspected = dra_core("checkpoint", "inspect", "--path", str(path), check=False)
    assert inspected.returncode == 1
    assert "checksum" in inspected.stdout
    repaired = dra_core("checkpoint", "repair", "--path", str(path))
    assert "corrupt-" in repaired.stdout
    assert dra_core("checkpoint", "inspect", "--path", str(path)).returncode == 0
    assert list(tmp_path.glob("checkpoint.json.corrupt-*")), "the damaged file is kept"


def test_run_refuses_a_corrupt_checkpoint(tmp_path):
    plugins = tmp_path / "plugins"
    checkpoint = plugins / "fake.dra-core.dev" / "checkpoint.json"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_text('{"kind": "dra-core-checkpoint", "version": 1, "data": {"claims"')
    before = checkpoint.read_bytes()
    result = dra_core(
        "run",
        "--backend",
        "fake",
        "--no-publish",
        "--http-port",
        "0",
        "--registration-dir",
        str(tmp_path / "reg"),
        "--plugins-dir",
        str(plugins),
        "--cdi-dir",
        str(tmp_path / "cdi"),
        check=False,
    )
    assert result.returncode == 2
    assert str(checkpoint) in result.stderr
    assert "dra-core checkpoint repair" in result.stderr
    assert checkpoint.read_bytes() == before, "a corrupt checkpoint is never reset"
    assert not (tmp_path / "reg").exists() or not list((tmp_path / "reg").iterdir())
