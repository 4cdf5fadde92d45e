"""Admin-access (monitoring) claims with the real scheduler, beside normal workloads.

One agent serves a fake node (a Flex 170 partitioned with its default profile ``flex170_m8``,
with its management engine ``mei0``, and an Arc A770 with ``mei1``) through its kubelet
socket. Monitoring claims (``adminAccess: true``, in a namespace labelled for admin access)
are allocated by the real scheduler from the slices the agent publishes; the CDI specs say
exactly which device nodes they get, and the :class:`~dra_backend_i915.testing.FakeKernel`
shows that they never create or remove VFs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dra_backend_i915.testing import DRM_MAJOR, GIB, MEI_MAJOR, FakeKernel, FakeSysfs

from backends.i915.tests import controlplane_helpers as cp
from dra_core import ClaimRef
from tests.controlplane import helpers

pytestmark = pytest.mark.controlplane
pytest_plugins = ["tests.controlplane.fixtures"]

NODE = "i915-monitor-node"
ADMIN_LABEL = "resource.kubernetes.io/admin-access"


@pytest.fixture(scope="module")
def fs(short_dir: Path) -> FakeSysfs:
    fake = FakeSysfs(short_dir / "node", char_devices=os.geteuid() == 0)
    fake.add_gpu(cp.FLEX, "0x56c0", lmem_total_bytes=16 * GIB, sriov_totalvfs=31)  # card0
    fake.add_mei(cp.FLEX, "mei-gsc")  # mei0
    fake.add_gpu(cp.A770, "0x56a0", bridge="0000:00:1c.0", lmem_total_bytes=16 * GIB)  # card1
    fake.add_mei(cp.A770)  # mei1
    return fake


short_dir, kernel, backend, hooks, classes, agent, kubelet = cp.agent_fixtures(
    # Both GPUs; their VFs made on demand too only where partitionable devices are on.
    "dra-i915-mon-",
    NODE,
    ready=lambda devices: {cp.FLEX_DEVICE, cp.A770_DEVICE} <= set(devices),
)


@pytest.fixture
def admin_namespace(kube_api, namespace) -> Iterator[str]:
    """A namespace labelled for admin access (the API server refuses adminAccess elsewhere)."""
    name = helpers.create_namespace(kube_api, helpers.unique_name("monitor"), {ADMIN_LABEL: "true"})
    try:
        yield name
    finally:
        helpers.delete_namespace(kube_api, name)


def granted(short_dir: Path, ref: ClaimRef, device) -> dict[str, tuple[str, int, int] | str]:
    """Container path -> host path (and type, major, minor on char devices) of one device."""
    if not device.cdi_device_ids:
        return {}
    (cdi_id,) = device.cdi_device_ids
    return {
        n["path"]: (n["hostPath"], n["major"], n["minor"]) if "major" in n else n["hostPath"]
        for n in cp.edits_of(cp.cdi_spec(short_dir, ref), cdi_id).get("deviceNodes", [])
    }


def expected_nodes(fs: FakeSysfs, address: str, mei: str | None = None) -> dict[str, Any]:
    """The nodes of the function at ``address`` as the fake tree made them."""
    gpu = fs.gpus[address]
    assert gpu.card and gpu.render
    dri = fs.dev / "dri"

    def node(host: Path, major: int, minor: int) -> tuple[str, int, int] | str:
        return (str(host), major, minor) if fs.char_devices else str(host)

    card = node(dri / gpu.card, DRM_MAJOR, int(gpu.card[4:]))
    render = node(dri / gpu.render, DRM_MAJOR, int(gpu.render[7:]))
    nodes = {
        f"/dev/dri/{gpu.card}": card,
        f"/dev/dri/{gpu.render}": render,
        f"/dev/dri/by-path/pci-{address}-card": card,
        f"/dev/dri/by-path/pci-{address}-render": render,
    }
    if mei is not None:
        nodes[f"/dev/{mei}"] = node(fs.dev / mei, MEI_MAJOR, int(mei[3:]))
    return nodes


def sriov_writes(kernel: FakeKernel, since: int) -> list[tuple[str, str]]:
    return [w for w in kernel.writes[since:] if "sriov" in w[0] or "prelim_iov" in w[0]]


@pytest.mark.all_mode_over_counters
def test_monitor_beside_workloads_on_the_same_gpus(
    agent, kubelet, kube_api, namespace, admin_namespace, fs, kernel, short_dir
):
    writes = len(kernel.writes)
    workload = cp.claim_with_pod(
        kube_api, namespace, cp.claim_body("work", cp.DRIVER, selectors=[cp.on(cp.A770)]), NODE
    )
    assert [r["device"] for r in cp.allocation(kube_api, workload)] == [cp.A770_DEVICE]
    assert kubelet.prepare([workload])[workload.uid].error == ""

    monitor = cp.claim_with_pod(
        kube_api,
        admin_namespace,
        cp.claim_body("monitor", f"monitoring.{cp.DRIVER}", allocationMode="All", adminAccess=True),
        NODE,
    )
    results = cp.allocation(kube_api, monitor)
    # every GPU of the node, the Flex as its PF (not its VFs), the A770 although it is in use
    assert sorted(r["device"] for r in results) == [cp.FLEX_DEVICE, cp.A770_DEVICE]
    assert all(r["adminAccess"] is True for r in results)
    answer = kubelet.prepare([monitor])[monitor.uid]
    assert answer.error == ""
    devices = {d.device_name: d for d in answer.devices}
    assert granted(short_dir, monitor, devices[cp.A770_DEVICE]) == expected_nodes(
        fs, cp.A770, "mei1"
    )
    assert granted(short_dir, monitor, devices[cp.FLEX_DEVICE]) == expected_nodes(
        fs, cp.FLEX, "mei0"
    )

    # The next normal claims on both GPUs are allocated and prepared beside the monitor.
    assert kubelet.unprepare([workload]) == {workload.uid: ""}
    cp.release(kube_api, workload)
    again = cp.claim_with_pod(
        kube_api, namespace, cp.claim_body("again", cp.DRIVER, selectors=[cp.on(cp.A770)]), NODE
    )
    assert [r["device"] for r in cp.allocation(kube_api, again)] == [cp.A770_DEVICE]
    whole = cp.claim_with_pod(
        kube_api, namespace, cp.claim_body("whole", cp.DRIVER, selectors=[cp.on(cp.FLEX)]), NODE
    )
    assert [r["device"] for r in cp.allocation(kube_api, whole)] == [cp.FLEX_DEVICE]
    answers = kubelet.prepare([again, whole])
    assert {uid: a.error for uid, a in answers.items()} == {again.uid: "", whole.uid: ""}
    assert granted(short_dir, whole, answers[whole.uid].devices[0]) == expected_nodes(fs, cp.FLEX)

    assert set(kubelet.unprepare([monitor, again, whole]).values()) == {""}
    for ref in (monitor, again, whole):
        cp.release(kube_api, ref)
    assert sriov_writes(kernel, writes) == [] and cp.numvfs(fs) == 0


@pytest.mark.requires_feature("DRAPartitionableDevices")
@pytest.mark.all_mode_over_counters
def test_monitor_over_vfs_creates_and_removes_none(
    agent, kubelet, kube_api, namespace, admin_namespace, fs, kernel, short_dir
):
    writes = len(kernel.writes)
    before = cp.claim_with_pod(
        kube_api,
        admin_namespace,
        cp.claim_body("vfs-before", f"vf.{cp.DRIVER}", allocationMode="All", adminAccess=True),
        NODE,
    )
    assert sorted(r["device"] for r in cp.allocation(kube_api, before)) == sorted(cp.FLEX_VFS)
    answer = kubelet.prepare([before])[before.uid]
    assert answer.error == ""
    assert sorted(d.device_name for d in answer.devices) == sorted(cp.FLEX_VFS)
    assert all(d.cdi_device_ids == () for d in answer.devices), "no VF exists: no nodes"
    assert not cp.cdi_spec_path(short_dir, before).exists()
    assert sriov_writes(kernel, writes) == [] and cp.numvfs(fs) == 0

    # A workload's VF: the scheduler does not count the admin allocation, the node makes VFs.
    workload = cp.claim_with_pod(
        kube_api, namespace, cp.claim_body("vf-work", f"vf.{cp.DRIVER}"), NODE
    )
    (result,) = cp.allocation(kube_api, workload)
    assert kubelet.prepare([workload])[workload.uid].error == ""
    assert cp.numvfs(fs) == 8
    index = cp.FLEX_VFS.index(result["device"])

    # A monitor of that VF now gets the VF's nodes (a VF has no management engine).
    during = cp.claim_with_pod(
        kube_api,
        admin_namespace,
        cp.claim_body(
            "vf-during",
            f"vf.{cp.DRIVER}",
            adminAccess=True,
            selectors=[f'device.attributes["{cp.DRIVER}"].vfIndex == {index}'],
        ),
        NODE,
    )
    assert [r["device"] for r in cp.allocation(kube_api, during)] == [result["device"]]
    answer = kubelet.prepare([during])[during.uid]
    assert answer.error == ""
    vf_address = f"0000:03:00.{index + 1}"
    assert granted(short_dir, during, answer.devices[0]) == expected_nodes(fs, vf_address)

    writes = len(kernel.writes)
    assert kubelet.unprepare([before]) == {before.uid: ""}
    assert sriov_writes(kernel, writes) == [] and cp.numvfs(fs) == 8
    # The monitor does not keep the VFs: the workload's release removes them.
    assert kubelet.unprepare([workload]) == {workload.uid: ""}
    assert cp.numvfs(fs) == 0
    writes = len(kernel.writes)
    assert kubelet.unprepare([during]) == {during.uid: ""}
    assert sriov_writes(kernel, writes) == []
    for ref in (before, workload, during):
        cp.release(kube_api, ref)
