"""The i915 backend's ``dra-core doctor`` checks on fake sysfs and devfs trees."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
from dra_backend_i915 import doctor, plugin
from dra_backend_i915.config import NodeSettings
from dra_backend_i915.testing import DRM_MAJOR, FakeSysfs, build_demo, node_context

from dra_core import DoctorCheck
from dra_core.plugins import from_objects

FLEX = "0000:03:00.0"
A770 = "0000:08:00.0"
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="character devices need CAP_MKNOD (root)")


def settings(fs: FakeSysfs) -> NodeSettings:
    return NodeSettings(sysfs_root=fs.sys, devfs_root=fs.dev)


def by_name(checks: list[DoctorCheck]) -> dict[str, DoctorCheck]:
    return {c.name: c for c in checks}


@needs_root
def test_demo_node_has_everything(tmp_path):
    fs = build_demo(tmp_path / "node", char_devices=True)
    fs.add_admin_vfs(FLEX, 2)
    checks = by_name(doctor.checks(settings(fs)))
    assert {c.status for c in checks.values()} == {"ok"}, list(checks.values())
    assert checks["Intel GPUs"].found == "6 of 6 Intel display functions bound to i915 or xe"
    assert checks[f"driver of {FLEX} (Flex 170, 0x56c0)"].found == "bound to i915"
    assert checks[f"SR-IOV of {FLEX} (Flex 170, 0x56c0)"].found == "up to 31 VFs, 2 enabled now"
    render = checks[f"render node of {FLEX} (Flex 170, 0x56c0)"]
    assert render.found == f"{fs.dev / 'dri' / 'renderD128'} (crw-rw-rw- owned by 0:root)"
    assert "driver of 0000:03:00.1 (VF, 0x56c0)" in checks  # VFs: driver and render node only
    assert "SR-IOV of 0000:03:00.1 (VF, 0x56c0)" not in checks
    assert "SR-IOV of 0000:08:00.0 (Arc A770, 0x56a0)" not in checks  # no SR-IOV on that model


def test_the_hook_checks_the_tree_its_options_name_and_refuses_bad_options(tmp_path):
    fs = build_demo(tmp_path / "node")
    hooks = from_objects("i915", plugin.I915Backend)
    checks = [c for _, c in hooks.doctor_checks(node_context(fs))]
    assert checks[0] == DoctorCheck.ok(
        "Intel GPUs", "4 of 4 Intel display functions bound to i915 or xe"
    )
    bad = node_context(fs, vf_profile="flex170=no_such_profile")
    (check,) = [c for _, c in hooks.doctor_checks(bad)]
    assert (check.name, check.status) == ("options", "fail")
    assert "no_such_profile" in check.found


def test_no_gpu_bound_fails_and_says_how_to_bind(tmp_path):
    fs = FakeSysfs(tmp_path / "node")
    fs.add_gpu(FLEX, "0x56c0", driver=None, sriov_totalvfs=31)
    fs.add_gpu(A770, "0x56a0", driver="vfio-pci", bridge="0000:00:1c.0")
    checks = by_name(doctor.checks(settings(fs)))
    summary = checks["Intel GPUs"]
    assert summary.status == "fail"
    assert summary.found == "none of the 2 Intel display functions is bound to i915 or xe"
    assert "modprobe i915" in summary.fix
    unbound = checks[f"driver of {FLEX} (Flex 170, 0x56c0)"]
    assert (unbound.status, unbound.found) == ("warn", "bound to no driver, so it is not published")
    assert unbound.fix == (
        f"bind it to i915 (modprobe i915, or echo {FLEX} > /sys/bus/pci/drivers/i915/bind)"
    )
    passed_through = checks[f"driver of {A770} (Arc A770, 0x56a0)"]
    assert passed_through.status == "warn"
    assert passed_through.found.startswith("bound to vfio-pci, not i915 or xe")
    assert not any(name.startswith(("render node", "SR-IOV")) for name in checks)


def test_a_node_without_intel_gpus_fails(tmp_path):
    fs = FakeSysfs(tmp_path / "node")
    (check,) = doctor.checks(settings(fs))
    assert (check.name, check.status) == ("Intel GPUs", "fail")
    assert "gpu.intel.com/dra-core=true" in check.fix


def test_a_wrong_sysfs_root_fails(tmp_path):
    (check,) = doctor.checks(NodeSettings(sysfs_root=tmp_path / "nothing", devfs_root=tmp_path))
    assert (check.name, check.status) == ("sysfs", "fail")
    assert check.found == f"{tmp_path / 'nothing' / 'bus' / 'pci' / 'devices'} does not exist"
    assert "--sysfs-root (SYSFS_ROOT)" in check.fix


@needs_root
def test_render_node_only_its_group_may_open_warns(tmp_path):
    fs = FakeSysfs(tmp_path / "node", char_devices=True)
    fs.add_gpu(A770, "0x56a0")
    node = fs.dev / "dri" / "renderD128"
    node.chmod(0o660)
    os.chown(node, 0, 0)
    check = by_name(doctor.checks(settings(fs)))[f"render node of {A770} (Arc A770, 0x56a0)"]
    assert check.status == "warn"
    assert check.found == (
        f"{node} is crw-rw---- owned by 0:root: containers that run neither as root nor in "
        f"group root cannot open it"
    )
    assert "device_ownership_from_security_context = true" in check.fix
    assert "supplementalGroups: [0]" in check.fix


def test_render_node_missing_from_devfs_fails(tmp_path):
    fs = FakeSysfs(tmp_path / "node")
    fs.add_gpu(A770, "0x56a0")
    (fs.dev / "dri" / "renderD128").unlink()
    check = by_name(doctor.checks(settings(fs)))[f"render node of {A770} (Arc A770, 0x56a0)"]
    assert check.status == "fail"
    assert (
        check.found
        == f"{fs.dev / 'dri' / 'renderD128'} does not exist, though sysfs lists renderD128"
    )
    assert "--devfs-root (DEVFS_ROOT)" in check.fix


def test_render_node_that_is_a_plain_file_warns(tmp_path):
    fs = FakeSysfs(tmp_path / "node")  # plain files stand in for device nodes
    fs.add_gpu(A770, "0x56a0")
    check = by_name(doctor.checks(settings(fs)))[f"render node of {A770} (Arc A770, 0x56a0)"]
    assert (check.status, check.found) == (
        "warn",
        f"{fs.dev / 'dri' / 'renderD128'} is not a character device",
    )


@needs_root
def test_render_node_of_other_numbers_fails(tmp_path):
    fs = FakeSysfs(tmp_path / "node", char_devices=True)
    fs.add_gpu(A770, "0x56a0")
    node = fs.dev / "dri" / "renderD128"
    node.unlink()
    os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(DRM_MAJOR, 200))
    check = by_name(doctor.checks(settings(fs)))[f"render node of {A770} (Arc A770, 0x56a0)"]
    assert check.status == "fail"
    assert check.found == f"{node} is device 226:200, but sysfs gives renderD128 as 226:128"


def test_sriov_model_without_vfs_in_the_kernel_warns(tmp_path):
    fs = FakeSysfs(tmp_path / "node")
    fs.add_gpu(FLEX, "0x56c0")  # no sriov_totalvfs: SR-IOV off in firmware or driver
    check = by_name(doctor.checks(settings(fs)))[f"SR-IOV of {FLEX} (Flex 170, 0x56c0)"]
    assert check.status == "warn"
    assert check.found == (
        "the model supports SR-IOV but the kernel offers no VFs (sriov_totalvfs is missing), "
        "so it is published whole only"
    )
    assert "i915.max_vfs=N" in check.fix


@pytest.mark.skipif(ROOT and not shutil.which("unshare"), reason="needs unshare")
def test_read_only_sysfs_fails_sriov(tmp_path):
    """/sys mounted read-only in the agent's pod: VFs cannot be made on demand."""
    fs = FakeSysfs(tmp_path / "node")
    fs.add_gpu(FLEX, "0x56c0", sriov_totalvfs=31)
    argv = [
        sys.executable, "-m", "dra_core", "doctor", "--backend", "i915", "--output", "json",
        "--sysfs-root", str(fs.sys), "--devfs-root", str(fs.dev),
    ]  # fmt: skip
    env = {
        k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")
    }
    if ROOT:  # permissions do not stop root: a read-only bind mount in a namespace of its own
        script = 'mount --bind -o ro "$0" "$0" && exec "$@"'
        argv = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            str(fs.sys),
            *argv,
        ]
    else:
        (fs.gpus[FLEX].path / "sriov_numvfs").chmod(0o444)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, check=False)
    report = json.loads(result.stdout)
    checks = {c["name"]: c for s in report["sections"] for c in s["checks"]}
    sriov = checks[f"SR-IOV of {FLEX} (Flex 170, 0x56c0)"]
    numvfs = fs.gpus[FLEX].path / "sriov_numvfs"
    assert sriov["status"] == "fail"
    assert sriov["found"] == f"up to 31 VFs, 0 enabled now; {numvfs} is not writable here"
    assert "read-write" in sriov["fix"]
    assert result.returncode == 1
