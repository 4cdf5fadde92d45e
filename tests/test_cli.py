"""The dra-core command as a user runs it: a real subprocess of the installed package."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dra_core import BackendIdentity, Device, Inventory, __version__, hookimpl
from dra_core.cli import main


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
    "command",
    ["run", "discover", "doctor", "backends", "render", "demo", "webhook", "checkpoint"],
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


ALL_DRA_GATES = "DRAPartitionableDevices=true,DRAConsumableCapacity=true,DRADeviceTaints=true"


@pytest.mark.parametrize(
    ("release", "slices", "left_out"),
    [
        ((), 2, set()),  # every field, counter sets in slices of their own
        (("--kubernetes-version", "v1.37.2"), 2, set()),
        # 1.34 with the gates on: counter sets beside their devices, shared-0 heading a slice.
        (("--kubernetes-version", "v1.34.4", "--feature-gates", ALL_DRA_GATES), 2, set()),
        (
            ("--kubernetes-version", "v1.34.4"),  # its default gates: the three features off
            1,
            {"big-0-p0", "big-0-p1", "big-0-p2", "big-0-p3", "shared-0", "dev-2"},
        ),
    ],
)
def test_discover_prints_what_the_agent_publishes_to_a_release(tmp_path, release, slices, left_out):
    control = tmp_path / "control.yaml"
    control.write_text("unhealthy: {dev-2: fan on fire}\n")
    out = dra_core(
        "discover", "--backend", "fake", "--node-name", "node-a",
        "--control-file", str(control), *release,
    ).stdout  # fmt: skip
    bodies = list(yaml.safe_load_all(out))
    assert len(bodies) == slices
    devices = {d["name"]: d for s in bodies for d in s["spec"].get("devices", [])}
    assert not left_out & set(devices)
    for name in left_out:
        assert re.search(rf"^# Left out: .*not published: .*\b{name}\b", out, re.MULTILINE), out
    if "dev-2" in devices:  # the health hook's verdict, as the agent publishes it
        (taint,) = devices["dev-2"]["taints"]
        assert taint == {"key": "fake.dra-core.dev/unhealthy", "effect": "NoSchedule"}
    if "v1.34.4" in release and not left_out:
        first, second = bodies
        assert second["spec"]["devices"][0]["name"] == "shared-0"
        assert [c["name"] for c in second["spec"]["sharedCounters"]] == ["big-0"]
        assert "sharedCounters" not in first["spec"]


def test_discover_names_a_release_it_cannot_use():
    result = dra_core(
        "discover", "--backend", "fake", "--node-name", "node-a",
        "--kubernetes-version", "v1.31.0", check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "dra-core needs 1.34 or later" in result.stderr


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


def _hostile_checkpoint(path: Path, kind: str) -> None:
    """Put a damaged or hostile file of ``kind`` at ``path``."""
    if kind == "deep":
        path.write_bytes(b"[" * 100_000)
    elif kind == "huge-number":
        path.write_bytes(b'{"data": ' + b"9" * 100_000 + b"}")
    elif kind == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()


@pytest.mark.parametrize(
    ("kind", "repair_status"),
    [("deep", 0), ("huge-number", 0), ("binary", 0), ("fifo", 2), ("directory", 2)],
)
def test_checkpoint_commands_answer_any_file_without_a_traceback(
    tmp_path: Path, kind: str, repair_status: int
) -> None:
    path = tmp_path / "checkpoint.json"
    _hostile_checkpoint(path, kind)
    inspected = dra_core("checkpoint", "inspect", "--path", str(path), check=False)
    assert inspected.returncode == 1, inspected.stderr
    assert "DAMAGED" in inspected.stdout or "problem:" in inspected.stdout
    repaired = dra_core("checkpoint", "repair", "--path", str(path), check=False)
    assert repaired.returncode == repair_status, repaired.stderr
    for result in (inspected, repaired):
        assert "Traceback" not in result.stdout + result.stderr
    if repair_status == 0:
        assert "repaired" in repaired.stdout
        assert dra_core("checkpoint", "inspect", "--path", str(path)).returncode == 0
    else:
        assert f"dra-core: error: checkpoint {path}: is a" in repaired.stderr


def test_checkpoint_repair_salvages_a_truncated_file(tmp_path: Path) -> None:
    from dra_core.checkpoint import Checkpoint, ClaimRecord
    from dra_core.model import AllocatedDevice, ClaimRef

    path = tmp_path / "checkpoint.json"
    checkpoint = Checkpoint.open(path, boot_id="boot")
    uids = [f"00000000-0000-0000-0000-00000000000{i}" for i in range(3)]
    for i, uid in enumerate(uids):
        ref = ClaimRef("default", f"claim-{i}", uid)
        device = AllocatedDevice(request="gpu", pool="node-1", device=f"gpu-{i}")
        checkpoint.put(ClaimRecord.started(ref, [device], boot_id="boot", driver="d.example.com"))
    checkpoint.compact()
    checkpoint.close()
    raw = path.read_bytes()
    path.write_bytes(raw[: raw.index(b"claim-2") + 3])
    repaired = dra_core("checkpoint", "repair", "--path", str(path))
    assert "kept 2 record(s)" in repaired.stdout
    assert f"{uids[2]}: its record is cut off" in repaired.stdout
    assert uids[0] in repaired.stdout and uids[1] in repaired.stdout
    assert dra_core("checkpoint", "inspect", "--path", str(path)).returncode == 0


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


def test_run_makes_relative_directories_absolute(tmp_path):
    import signal
    import time
    import uuid

    from dra_core import ClaimRef
    from dra_core.testing.kubelet import FakeKubelet

    (tmp_path / "control.yaml").write_text("unhealthy: {}\n")
    # Short names: unix socket paths stay under 108 bytes once made absolute.
    agent = subprocess.Popen(
        [sys.executable, "-m", "dra_core", "run", "--backend", "fake", "--no-publish",
         "--http-port", "0", "--registration-dir", "reg", "--plugins-dir", "./p/../plugins",
         "--cdi-dir", "cdi", "--control-file", "control.yaml"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not list((tmp_path / "reg").glob("*-reg.sock")):
            assert agent.poll() is None, agent.stdout.read() if agent.stdout else ""
            assert time.monotonic() < deadline, "no registration socket within 30 s"
            time.sleep(0.1)
        (socket,) = (tmp_path / "reg").glob("*-reg.sock")
        # The kubelet runs elsewhere: the endpoint it is given must not depend on our cwd.
        with FakeKubelet(socket) as kubelet:
            info = kubelet.register()
            assert info.endpoint == str(tmp_path / "plugins" / "fake.dra-core.dev" / "dra.sock")
            claim = ClaimRef("default", "gone", str(uuid.uuid4()))
            assert kubelet.unprepare([claim]) == {claim.uid: ""}
    finally:
        agent.send_signal(signal.SIGTERM)
        output, _ = agent.communicate(timeout=30)
    assert agent.returncode == 0, output
    assert (tmp_path / "plugins" / "fake.dra-core.dev" / "checkpoint.json").exists()
    assert not (tmp_path / "p").exists()
    assert f"control file {tmp_path / 'control.yaml'}\n" in output  # a backend path option


def test_relative_backend_paths_are_made_absolute(tmp_path):
    from dra_backend_i915.testing import build_demo

    build_demo(tmp_path / "node")
    result = subprocess.run(
        [sys.executable, "-m", "dra_core", "discover", "--backend", "i915",
         "--sysfs-root", "node/sys", "--devfs-root", "node/dev"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "gpu-0000-03-00-0-vf7" in result.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "dra_core", "discover", "--backend", "i915",
         "--sysfs-root", "nothing"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert missing.returncode == 2
    assert f"{tmp_path}/nothing/bus/pci/devices does not exist" in missing.stderr


@pytest.mark.parametrize("flag", ["--plugins-dir", "--cdi-dir", "--registration-dir"])
def test_run_refuses_an_empty_directory(tmp_path, flag):
    args = {"--plugins-dir": "plugins", "--cdi-dir": "cdi", "--registration-dir": "reg"}
    args[flag] = ""
    result = subprocess.run(
        [sys.executable, "-m", "dra_core", "run", "--backend", "fake", "--no-publish",
         "--http-port", "0", *(x for pair in args.items() for x in pair)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"dra-core: error: {flag} is empty" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("problem", ["socket path too long", "not a directory"])
def test_run_says_why_it_cannot_start(tmp_path, problem):
    if problem == "not a directory":
        plugins = "plugins"
        (tmp_path / plugins).write_text("a file where the plugins directory should be\n")
    else:
        plugins = "p" * 120  # a unix socket path holds at most 107 bytes
    result = subprocess.run(
        [sys.executable, "-m", "dra_core", "run", "--backend", "fake", "--no-publish",
         "--http-port", "0", "--registration-dir", "reg", "--plugins-dir", plugins,
         "--cdi-dir", "cdi"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "dra-core: error: the node agent cannot start" in result.stderr
    assert str(tmp_path / plugins) in result.stderr


class _OwnBackend:
    """A backend that exists only in the program that runs `main`."""

    @hookimpl
    def dra_backend_identity(self) -> BackendIdentity:
        return BackendIdentity("own.dra-core.dev", "dra-core.dev", "own")

    @hookimpl
    def dra_discover(self) -> Inventory:
        return Inventory(devices=(Device("own-0"),))


def test_main_runs_backend_objects_given_in_place_of_an_installed_backend(capsys):
    # A program that runs dra-core with a backend built in it (a test's agent process whose
    # backend writes to a fake kernel) hands its objects to `main` under a name.
    assert (
        main(["discover", "--backend", "own", "--node-name", "n"], backends={"own": _OwnBackend()})
        == 0
    )
    (body,) = yaml.safe_load_all(capsys.readouterr().out)
    assert body["spec"]["driver"] == "own.dra-core.dev"
    assert [d["name"] for d in body["spec"]["devices"]] == ["own-0"]
    # Without it, the name is looked up among the installed backends, and is not there.
    assert main(["discover", "--backend", "own", "--node-name", "n"]) == 2
    assert "own" in capsys.readouterr().err
