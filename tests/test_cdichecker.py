"""The CDI checker (tests/cdichecker, the official CDI Go library) and the plugin that runs it
on every spec a test writes (tests/cdicheck.py): both refuse what a container runtime refuses
and accept what it accepts."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from dra_core.cdi import CdiSpecs
from dra_core.model import (
    AllocatedDevice,
    BackendIdentity,
    ClaimRef,
    ContainerEdits,
    DeviceNode,
    Mount,
    PreparedClaim,
    PreparedDevice,
)
from tests.cdicheck import CdiChecker, CheckResult

UID = "c0ffee00-1111-2222-3333-444455556666"
IDENTITY = BackendIdentity(
    driver_name="gpu.example.com", cdi_vendor="k8s.gpu.example.com", cdi_class="gpu"
)
REPO = Path(__file__).resolve().parents[1]


def _claim(edits: ContainerEdits, device: str = "gpu-0") -> PreparedClaim:
    return PreparedClaim(
        ref=ClaimRef("default", "claim", UID),
        devices=(
            PreparedDevice(
                allocation=AllocatedDevice(request="gpu", pool="node-1", device=device),
                edits=edits,
            ),
        ),
    )


def _null_node(path: Path) -> Path:
    """A character device 1:3 (the numbers of /dev/null), mode 0666; skips without mknod."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating a device node needs CAP_MKNOD (root)")
    path.chmod(0o666)
    return path


@pytest.fixture
def devfs(tmp_path: Path) -> tuple[Path, Path]:
    """``(node, link)``: a real character device and a udev-style relative symlink to it."""
    node = _null_node(tmp_path / "dev" / "dri" / "card1")
    link = tmp_path / "dev" / "dri" / "by-path" / "pci-0000:03:00.0-card"
    link.parent.mkdir()
    link.symlink_to("../card1")
    return node, link


@pytest.fixture
def specs(tmp_path: Path) -> CdiSpecs:
    return CdiSpecs(tmp_path / "cdi", IDENTITY)


def _check(checker: CdiChecker, specs: CdiSpecs, *device_ids: str) -> tuple[CheckResult, Any]:
    result = checker.check(
        [{"name": "t", "specDir": str(specs.directory), "devices": list(device_ids)}]
    )
    assert len(result.cases) == 1
    return result, result.cases[0]


@pytest.mark.cdi_unchecked(reason="writes a symlink hostPath to show the checker refuses it")
def test_symlink_host_path_is_refused(
    cdi_checker: CdiChecker, specs: CdiSpecs, devfs: tuple[Path, Path]
) -> None:
    _, link = devfs
    node = DeviceNode(path="/dev/dri/by-path/pci-0000:03:00.0-card", host_path=str(link))
    ids = specs.write(_claim(ContainerEdits(device_nodes=(node,))))
    (device_id,) = ids[("gpu-0", None)]

    result, case = _check(cdi_checker, specs, device_id)

    assert not result.ok and not case["ok"]
    error = case["deviceErrors"][device_id]
    assert f'failed to stat CDI host device "{link}": not a device node' in error
    assert device_id in case["error"]
    assert "container-device-interface" in result.library


def test_device_node_host_path_is_accepted(
    cdi_checker: CdiChecker, specs: CdiSpecs, devfs: tuple[Path, Path]
) -> None:
    node, _ = devfs
    edits = ContainerEdits(
        device_nodes=(
            DeviceNode(path="/dev/dri/card1", host_path=str(node), permissions="rw"),
            # the by-path name in the container, backed by the node itself
            DeviceNode(path="/dev/dri/by-path/pci-0000:03:00.0-card", host_path=str(node)),
        )
    )
    (device_id,) = specs.write(_claim(edits))[("gpu-0", None)]

    result, case = _check(cdi_checker, specs, device_id)

    assert result.ok and case["ok"], case
    assert case["edits"]["devices"] == [
        {"path": "/dev/dri/card1", "type": "c", "major": 1, "minor": 3, "fileMode": "0666"},
        {
            "path": "/dev/dri/by-path/pci-0000:03:00.0-card",
            "type": "c",
            "major": 1,
            "minor": 3,
            "fileMode": "0666",
        },
    ]
    assert case["edits"]["deviceRules"] == [
        {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rw"},
        {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
    ]


def test_explicit_type_major_minor_with_symlink_host_path(
    cdi_checker: CdiChecker, specs: CdiSpecs, devfs: tuple[Path, Path]
) -> None:
    _, link = devfs
    node = DeviceNode(
        path="/dev/dri/by-path/pci-0000:03:00.0-card",
        host_path=str(link),
        type="c",
        major=226,
        minor=1,
    )
    (device_id,) = specs.write(_claim(ContainerEdits(device_nodes=(node,))))[("gpu-0", None)]

    result, case = _check(cdi_checker, specs, device_id)

    # given type and major, the library trusts them and does not need lstat to succeed
    assert result.ok and case["ok"], case
    (device,) = case["edits"]["devices"]
    assert (device["type"], device["major"], device["minor"]) == ("c", 226, 1)


@pytest.mark.cdi_unchecked(reason="writes a hostPath that does not exist, which is refused")
def test_missing_host_path_is_refused_unless_numbers_are_given(
    cdi_checker: CdiChecker, specs: CdiSpecs, tmp_path: Path
) -> None:
    missing = tmp_path / "dev" / "nothing"
    bare = specs.write(_claim(ContainerEdits(device_nodes=(DeviceNode("/dev/x", str(missing)),))))
    result, case = _check(cdi_checker, specs, *bare[("gpu-0", None)])
    assert not case["ok"]
    assert f'"{missing}": no such file or directory' in case["error"]

    given = DeviceNode("/dev/x", str(missing), type="c", major=1, minor=3)
    ids = specs.write(_claim(ContainerEdits(device_nodes=(given,))))
    result, case = _check(cdi_checker, specs, *ids[("gpu-0", None)])
    assert result.ok, case


def test_unknown_device_id_is_refused(cdi_checker: CdiChecker, specs: CdiSpecs) -> None:
    specs.write(_claim(ContainerEdits(env={"A": "1"})))
    unknown = f"{specs.kind}={UID}-gpu-9"

    result, case = _check(cdi_checker, specs, unknown)

    assert not result.ok
    assert case["deviceErrors"] == {unknown: f"unresolvable CDI devices {unknown}"}


def test_env_and_mounts_are_carried_over(
    cdi_checker: CdiChecker, specs: CdiSpecs, tmp_path: Path
) -> None:
    edits = ContainerEdits(
        env={"GPU": "0", "B": "x=y", "EMPTY": ""},
        mounts=(
            Mount(host_path=str(tmp_path), container_path="/data", options=("ro", "bind")),
            Mount(host_path="tmpfs", container_path="/scratch", options=(), type="tmpfs"),
        ),
    )
    (device_id,) = specs.write(_claim(edits))[("gpu-0", None)]

    result, case = _check(cdi_checker, specs, device_id)

    assert result.ok, case
    assert case["edits"]["env"] == ["GPU=0", "B=x=y", "EMPTY="]
    assert case["edits"]["devices"] == []
    assert {m["destination"]: m for m in case["edits"]["mounts"]} == {
        "/data": {"destination": "/data", "source": str(tmp_path), "options": ["ro", "bind"]},
        "/scratch": {"destination": "/scratch", "source": "tmpfs", "type": "tmpfs"},
    }


def test_a_broken_spec_in_the_directory_fails(cdi_checker: CdiChecker, specs: CdiSpecs) -> None:
    (device_id,) = specs.write(_claim(ContainerEdits(env={"A": "1"})))[("gpu-0", None)]
    broken = specs.directory / "other.json"
    # hostPath needs cdiVersion 0.5.0: the library refuses the file, whatever is requested
    broken.write_text(
        json.dumps(
            {
                "cdiVersion": "0.3.0",
                "kind": "other.example.com/x",
                "devices": [
                    {
                        "name": "a",
                        "containerEdits": {"deviceNodes": [{"path": "/a", "hostPath": "/a"}]},
                    }
                ],
            }
        )
    )

    result, case = _check(cdi_checker, specs, device_id)

    assert not result.ok
    assert list(case["specErrors"]) == [str(broken)]
    assert "0.5.0" in case["specErrors"][str(broken)][0]
    assert "deviceErrors" not in case  # the requested device itself was fine


def test_the_checker_takes_one_case_on_the_command_line(
    cdi_checker: CdiChecker, specs: CdiSpecs
) -> None:
    (device_id,) = specs.write(_claim(ContainerEdits(env={"A": "1"})))[("gpu-0", None)]
    ok = subprocess.run(
        [str(cdi_checker.binary), "-spec-dir", str(specs.directory), device_id],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["cases"][0]["edits"]["env"] == ["A=1"]
    bad = subprocess.run(
        [str(cdi_checker.binary), "-spec-dir", str(specs.directory), f"{device_id}x"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 1
    assert f"unresolvable CDI devices {device_id}x" in bad.stderr


# --- the plugin, run on a test module of its own -------------------------------------------

_PLUGIN_TESTS = """
import os
import stat
from pathlib import Path

import pytest

from dra_core.cdi import CdiSpecs
from dra_core.model import (
    AllocatedDevice, BackendIdentity, ClaimRef, ContainerEdits, DeviceNode, PreparedClaim,
    PreparedDevice,
)

UID = "c0ffee00-1111-2222-3333-444455556666"
IDENTITY = BackendIdentity(
    driver_name="gpu.example.com", cdi_vendor="k8s.gpu.example.com", cdi_class="gpu"
)


def write(tmp_path, *nodes, env=None):
    specs = CdiSpecs(tmp_path / "cdi", IDENTITY)
    claim = PreparedClaim(
        ref=ClaimRef("default", "claim", UID),
        devices=(
            PreparedDevice(
                allocation=AllocatedDevice(request="gpu", pool="node-1", device="gpu-0"),
                edits=ContainerEdits(env=env or {}, device_nodes=nodes),
            ),
        ),
    )
    specs.write(claim)
    return specs


@pytest.fixture
def devfs(tmp_path):
    node = tmp_path / "card1"
    os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    link = tmp_path / "pci-0000:03:00.0-card"
    link.symlink_to("card1")
    return node, link


def test_symlink(tmp_path, devfs):
    write(tmp_path, DeviceNode("/dev/dri/by-path/card", str(devfs[1])))


def test_device_node(tmp_path, devfs):
    write(tmp_path, DeviceNode("/dev/dri/by-path/card", str(devfs[0])))


@pytest.mark.cdi_unchecked(reason="on purpose")
def test_opted_out(tmp_path, devfs):
    write(tmp_path, DeviceNode("/dev/dri/by-path/card", str(devfs[1])))


def test_node_removed_after_write(tmp_path, devfs):
    specs = write(tmp_path, DeviceNode("/dev/dri/card1", str(devfs[0])))
    devfs[0].unlink()  # as an unprepare would; the runtime used the spec before that
    specs.remove(UID)


def test_no_spec(tmp_path):
    write(tmp_path, env={})


def test_own_failure_comes_first(tmp_path, devfs):
    write(tmp_path, DeviceNode("/dev/dri/by-path/card", str(devfs[1])))
    raise AssertionError("the test's own failure")
"""


def test_plugin_fails_only_the_tests_whose_specs_are_refused(
    cdi_checker: CdiChecker, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("the generated tests create device nodes, which needs root")
    (tmp_path / "test_generated.py").write_text(textwrap.dedent(_PLUGIN_TESTS))
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    junit = tmp_path / "junit.xml"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.cdicheck",
            "-p",
            "no:cacheprovider",
            "-q",
            f"--junitxml={junit}",
            f"--basetemp={tmp_path / 'base'}",
            "test_generated.py",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert junit.exists(), f"{proc.stdout}\n{proc.stderr}"
    outcome: dict[str, str] = {}
    messages: dict[str, str] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        failure = case.find("failure")
        outcome[case.attrib["name"]] = "failed" if failure is not None else "passed"
        if failure is not None:
            messages[case.attrib["name"]] = failure.attrib.get("message", "") + (failure.text or "")
    assert outcome == {
        "test_symlink": "failed",
        "test_device_node": "passed",
        "test_opted_out": "passed",
        "test_node_removed_after_write": "passed",
        "test_no_spec": "passed",
        "test_own_failure_comes_first": "failed",
    }, f"{proc.stdout}\n{proc.stderr}"
    symlink = messages["test_symlink"]
    spec = tmp_path / "base" / "test_symlink0" / "cdi" / f"k8s.gpu.example.com-gpu_{UID}.json"
    assert f"CDI spec {spec} written by this test is refused by" in symlink
    assert f"device k8s.gpu.example.com/gpu={UID}-gpu-0: " in symlink
    assert "pci-0000:03:00.0-card" in symlink and "not a device node" in symlink
    assert "the test's own failure" in messages["test_own_failure_comes_first"]
    assert "refused" not in messages["test_own_failure_comes_first"]
    assert "[cdicheck] 3 CDI specs of 3 tests checked with the CDI library" in proc.stdout


def test_claim_edits_reach_a_container_once_per_claim(
    cdi_checker: CdiChecker, specs: CdiSpecs
) -> None:
    """Two claims of one driver in one container, two devices each, with claim edits: the
    IDs the kubelet gets (each device's list, as it concatenates them) give every claim's
    variable once, the claims' own variables side by side, and each device's own edits."""
    uids = ("c0ffee00-1111-2222-3333-000000000001", "c0ffee00-1111-2222-3333-000000000002")
    ids: list[str] = []
    for index, uid in enumerate(uids):
        claim = PreparedClaim(
            ref=ClaimRef("default", f"claim-{index}", uid),
            devices=tuple(
                PreparedDevice(
                    allocation=AllocatedDevice(request="gpu", pool="node-1", device=device),
                    edits=ContainerEdits(env={f"GPU_{index}_{n}": device})
                    if n
                    else ContainerEdits(),
                )
                for n, device in enumerate(("gpu-0", "gpu-1"))
            ),
            edits=ContainerEdits(env={f"CLAIM_{index}": "gpu-0,gpu-1", "SHARED": str(index)}),
        )
        for device_ids in specs.write(claim).values():
            ids.extend(device_ids)

    kind = "k8s.gpu.example.com/gpu"
    assert ids == [
        f"{kind}=claim-{uids[0]}",  # gpu-0 has no edits of its own: only the claim device
        f"{kind}={uids[0]}-gpu-1",
        f"{kind}=claim-{uids[0]}",
        f"{kind}=claim-{uids[1]}",
        f"{kind}={uids[1]}-gpu-1",
        f"{kind}=claim-{uids[1]}",
    ]
    result, case = _check(cdi_checker, specs, *ids)

    assert result.ok, case
    env = case["edits"]["env"]
    assert sorted(env) == [
        "CLAIM_0=gpu-0,gpu-1",
        "CLAIM_1=gpu-0,gpu-1",
        "GPU_0_1=gpu-1",
        "GPU_1_1=gpu-1",
        "SHARED=1",  # one variable both claims set: the last claim's
    ]
