"""Admin-access (monitoring) claims with the real scheduler, beside normal workloads.

One agent serves a fake node (a Flex 170 partitioned with its default profile ``flex170_m8``,
with its management engine ``mei0``, and an Arc A770 with ``mei1``) through its kubelet
socket. Monitoring claims (``adminAccess: true``, in a namespace labelled for admin access)
are allocated by the real scheduler from the slices the agent publishes; the CDI specs say
exactly which device nodes they get, and the :class:`~dra_backend_i915.testing.FakeKernel`
shows that they never create or remove VFs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dra_backend_i915 import plugin
from dra_backend_i915.memory import DrmMemoryQuery
from dra_backend_i915.testing import (
    DRM_MAJOR,
    GIB,
    MEI_MAJOR,
    FakeDrmIoctl,
    FakeKernel,
    FakeSysfs,
)

from dra_core import ClaimRef
from dra_core.kube.client import load_client
from dra_core.manifests import device_class_manifests
from dra_core.plugins import Hooks, from_objects
from dra_core.runtime import Agent, AgentSettings
from dra_core.testing.kubelet import FakeKubelet
from tests.controlplane import helpers

pytestmark = pytest.mark.controlplane
pytest_plugins = ["tests.controlplane.fixtures"]

DRIVER = "gpu.intel.com"
NODE = "i915-monitor-node"
FLEX = "0000:03:00.0"
A770 = "0000:08:00.0"
FLEX_DEVICE = "gpu-0000-03-00-0"
A770_DEVICE = "gpu-0000-08-00-0"
FLEX_VFS = [f"{FLEX_DEVICE}-vf{k}" for k in range(8)]  # flex170_m8
ADMIN_LABEL = "resource.kubernetes.io/admin-access"


@pytest.fixture(scope="module")
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="dra-i915-mon-", dir="/tmp"))  # socket paths < 108 B
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def fs(short_dir: Path) -> FakeSysfs:
    fake = FakeSysfs(short_dir / "node", char_devices=os.geteuid() == 0)
    fake.add_gpu(FLEX, "0x56c0", lmem_total_bytes=16 * GIB, sriov_totalvfs=31)  # card0
    fake.add_mei(FLEX, "mei-gsc")  # mei0
    fake.add_gpu(A770, "0x56a0", bridge="0000:00:1c.0", lmem_total_bytes=16 * GIB)  # card1
    fake.add_mei(A770)  # mei1
    return fake


@pytest.fixture(scope="module")
def kernel(fs: FakeSysfs) -> Iterator[FakeKernel]:
    fake = fs.kernel(delay=0.05)
    yield fake
    fake.join()


@pytest.fixture(scope="module")
def hooks(kernel: FakeKernel) -> Iterator[Hooks]:
    instance = plugin.I915Backend(
        writer=kernel, memory_query=DrmMemoryQuery(ioctl=FakeDrmIoctl({})), poll=0.01
    )
    previous = plugin.use(instance)
    yield from_objects("i915", plugin)
    plugin.use(previous)


def published_devices(api) -> dict[str, dict[str, Any]]:
    slices = helpers.get(
        api,
        f"{helpers.RESOURCE_API}/resourceslices",
        query={"fieldSelector": f"spec.nodeName={NODE}"},
    )["items"]
    return {d["name"]: d for s in slices for d in s["spec"].get("devices") or []}


@pytest.fixture(scope="module")
def agent(control_plane, kube_api, short_dir, fs, hooks) -> Iterator[Agent]:
    helpers.create_node(kube_api, NODE)
    classes = device_class_manifests(hooks.device_classes(hooks.backend_identity()))
    for body in classes:
        helpers.delete_device_class(kube_api, body["metadata"]["name"])
        helpers.create(kube_api, f"{helpers.RESOURCE_API}/deviceclasses", body)
    settings = AgentSettings(
        node_name=NODE,
        registration_dir=short_dir / "registry",
        plugins_dir=short_dir / "plugins",
        cdi_dir=short_dir / "cdi",
        http_port=0,
        poll_interval=0.5,
        backend_options={"sysfs_root": str(fs.sys), "devfs_root": str(fs.dev)},
    )
    running = Agent(settings, hooks, client=load_client(str(control_plane.kubeconfig_path)))
    running.start()
    helpers.wait_for(
        lambda: len(published_devices(kube_api)) == 10, 30, "the agent's ResourceSlices"
    )
    yield running
    running.stop()
    helpers.delete_node(kube_api, NODE)
    for body in classes:
        helpers.delete_device_class(kube_api, body["metadata"]["name"])


@pytest.fixture
def kubelet(agent) -> Iterator[FakeKubelet]:
    with FakeKubelet(agent.plugin.registration_socket) as peer:
        peer.register()
        yield peer


@pytest.fixture
def admin_namespace(kube_api, namespace) -> Iterator[str]:
    """A namespace labelled for admin access (the API server refuses adminAccess elsewhere)."""
    name = helpers.create_namespace(kube_api, helpers.unique_name("monitor"), {ADMIN_LABEL: "true"})
    try:
        yield name
    finally:
        helpers.delete_namespace(kube_api, name)


def claim_body(name: str, device_class: str, **exactly: Any) -> dict[str, Any]:
    request = {"deviceClassName": device_class, "allocationMode": "ExactCount", "count": 1}
    request.update(exactly)
    if request["allocationMode"] == "All":
        del request["count"]
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": name},
        "spec": {"devices": {"requests": [{"name": "gpus", "exactly": request}]}},
    }


def on(address: str) -> list[dict[str, Any]]:
    return [{"cel": {"expression": f'device.attributes["{DRIVER}"].pciAddress == "{address}"'}}]


def claim_with_pod(api, namespace: str, body: dict[str, Any]) -> ClaimRef:
    name = body["metadata"]["name"]
    claim = helpers.create_resource_claim(api, namespace, body)
    pod = helpers.pod_body(f"pod-{name}", [{"name": "gpus", "resourceClaimName": name}])
    pod["spec"]["nodeSelector"] = {"kubernetes.io/hostname": NODE}
    helpers.create_pod(api, namespace, pod)
    return ClaimRef(namespace, name, claim["metadata"]["uid"])


def allocation(api, ref: ClaimRef) -> list[dict[str, Any]]:
    try:
        claim = helpers.wait_for_claim_allocated(api, ref.namespace, ref.name)
    except TimeoutError as exc:
        pod = helpers.get_pod(api, ref.namespace, f"pod-{ref.name}")
        conditions = json.dumps(pod.get("status", {}).get("conditions", []))
        raise TimeoutError(f"{exc}; pod conditions: {conditions}") from None
    return claim["status"]["allocation"]["devices"]["results"]


def release(api, ref: ClaimRef) -> None:
    from kubernetes.client.exceptions import ApiException

    helpers.delete_pod(api, ref.namespace, f"pod-{ref.name}")
    path = f"{helpers.RESOURCE_API}/namespaces/{ref.namespace}/resourceclaims/{ref.name}"
    helpers.delete(api, path)

    def gone() -> bool:
        try:
            helpers.get(api, path)
        except ApiException as exc:
            return exc.status == 404
        return False

    helpers.wait_for(gone, 60, f"claim {ref.name} to be deleted")


def granted(short_dir: Path, ref: ClaimRef, device) -> dict[str, tuple[str, int, int] | str]:
    """Container path -> host path (and type, major, minor on char devices) of one device."""
    path = short_dir / "cdi" / f"intel.com-gpu_{ref.uid}.json"
    if not device.cdi_device_ids:
        return {}
    spec = json.loads(path.read_text())
    (cdi_id,) = device.cdi_device_ids
    (entry,) = [d for d in spec["devices"] if d["name"] == cdi_id.split("=", 1)[1]]
    return {
        n["path"]: (n["hostPath"], n["major"], n["minor"]) if "major" in n else n["hostPath"]
        for n in entry["containerEdits"].get("deviceNodes", [])
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


def numvfs(fs: FakeSysfs) -> int:
    return int((fs.gpus[FLEX].path / "sriov_numvfs").read_text())


def sriov_writes(kernel: FakeKernel, since: int) -> list[tuple[str, str]]:
    return [w for w in kernel.writes[since:] if "sriov" in w[0] or "prelim_iov" in w[0]]


def test_monitor_beside_workloads_on_the_same_gpus(
    agent, kubelet, kube_api, namespace, admin_namespace, fs, kernel, short_dir
):
    writes = len(kernel.writes)
    workload = claim_with_pod(kube_api, namespace, claim_body("work", DRIVER, selectors=on(A770)))
    assert [r["device"] for r in allocation(kube_api, workload)] == [A770_DEVICE]
    assert kubelet.prepare([workload])[workload.uid].error == ""

    monitor = claim_with_pod(
        kube_api,
        admin_namespace,
        claim_body("monitor", f"monitoring.{DRIVER}", allocationMode="All", adminAccess=True),
    )
    results = allocation(kube_api, monitor)
    # every GPU of the node, the Flex as its PF (not its VFs), the A770 although it is in use
    assert sorted(r["device"] for r in results) == [FLEX_DEVICE, A770_DEVICE]
    assert all(r["adminAccess"] is True for r in results)
    answer = kubelet.prepare([monitor])[monitor.uid]
    assert answer.error == ""
    devices = {d.device_name: d for d in answer.devices}
    assert granted(short_dir, monitor, devices[A770_DEVICE]) == expected_nodes(fs, A770, "mei1")
    assert granted(short_dir, monitor, devices[FLEX_DEVICE]) == expected_nodes(fs, FLEX, "mei0")

    # The next normal claims on both GPUs are allocated and prepared beside the monitor.
    assert kubelet.unprepare([workload]) == {workload.uid: ""}
    release(kube_api, workload)
    again = claim_with_pod(kube_api, namespace, claim_body("again", DRIVER, selectors=on(A770)))
    assert [r["device"] for r in allocation(kube_api, again)] == [A770_DEVICE]
    whole = claim_with_pod(kube_api, namespace, claim_body("whole", DRIVER, selectors=on(FLEX)))
    assert [r["device"] for r in allocation(kube_api, whole)] == [FLEX_DEVICE]
    answers = kubelet.prepare([again, whole])
    assert {uid: a.error for uid, a in answers.items()} == {again.uid: "", whole.uid: ""}
    assert granted(short_dir, whole, answers[whole.uid].devices[0]) == expected_nodes(fs, FLEX)

    assert set(kubelet.unprepare([monitor, again, whole]).values()) == {""}
    for ref in (monitor, again, whole):
        release(kube_api, ref)
    assert sriov_writes(kernel, writes) == [] and numvfs(fs) == 0


def test_monitor_over_vfs_creates_and_removes_none(
    agent, kubelet, kube_api, namespace, admin_namespace, fs, kernel, short_dir
):
    writes = len(kernel.writes)
    before = claim_with_pod(
        kube_api,
        admin_namespace,
        claim_body("vfs-before", f"vf.{DRIVER}", allocationMode="All", adminAccess=True),
    )
    assert sorted(r["device"] for r in allocation(kube_api, before)) == sorted(FLEX_VFS)
    answer = kubelet.prepare([before])[before.uid]
    assert answer.error == ""
    assert sorted(d.device_name for d in answer.devices) == sorted(FLEX_VFS)
    assert all(d.cdi_device_ids == () for d in answer.devices), "no VF exists: no nodes"
    assert not (short_dir / "cdi" / f"intel.com-gpu_{before.uid}.json").exists()
    assert sriov_writes(kernel, writes) == [] and numvfs(fs) == 0

    # A workload's VF: the scheduler does not count the admin allocation, the node makes VFs.
    workload = claim_with_pod(kube_api, namespace, claim_body("vf-work", f"vf.{DRIVER}"))
    (result,) = allocation(kube_api, workload)
    assert kubelet.prepare([workload])[workload.uid].error == ""
    assert numvfs(fs) == 8
    index = FLEX_VFS.index(result["device"])

    # A monitor of that VF now gets the VF's nodes (a VF has no management engine).
    during = claim_with_pod(
        kube_api,
        admin_namespace,
        claim_body(
            "vf-during",
            f"vf.{DRIVER}",
            adminAccess=True,
            selectors=[
                {"cel": {"expression": f'device.attributes["{DRIVER}"].vfIndex == {index}'}}
            ],
        ),
    )
    assert [r["device"] for r in allocation(kube_api, during)] == [result["device"]]
    answer = kubelet.prepare([during])[during.uid]
    assert answer.error == ""
    vf_address = f"0000:03:00.{index + 1}"
    assert granted(short_dir, during, answer.devices[0]) == expected_nodes(fs, vf_address)

    writes = len(kernel.writes)
    assert kubelet.unprepare([before]) == {before.uid: ""}
    assert sriov_writes(kernel, writes) == [] and numvfs(fs) == 8
    # The monitor does not keep the VFs: the workload's release removes them.
    assert kubelet.unprepare([workload]) == {workload.uid: ""}
    assert numvfs(fs) == 0
    writes = len(kernel.writes)
    assert kubelet.unprepare([during]) == {during.uid: ""}
    assert sriov_writes(kernel, writes) == []
    for ref in (before, workload, during):
        release(kube_api, ref)
