"""The i915 backend end to end: node agent, real API server and scheduler, kubelet socket.

One agent serves a fake node (a Flex 170 with SR-IOV, partitioned with its default profile
``flex170_m8``, and an Arc A770 shared through consumable capacity) for the whole module. The
real scheduler allocates from the slices the agent publishes, the claims are prepared and
unprepared through the agent's kubelet plugin socket as the kubelet would, and the
:class:`~dra_backend_i915.testing.FakeKernel` shows what the backend wrote to sysfs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dra_backend_i915 import plugin
from dra_backend_i915.memory import DrmMemoryQuery
from dra_backend_i915.testing import GIB, FakeDrmIoctl, FakeKernel, FakeSysfs

from dra_core import ClaimRef
from dra_core.kube.client import load_client
from dra_core.manifests import device_class_manifests
from dra_core.plugins import Hooks, from_objects
from dra_core.runtime import Agent, AgentSettings
from dra_core.testing.kubelet import FakeKubelet
from tests.controlplane import helpers

pytestmark = pytest.mark.controlplane
# ``control_plane``, ``kube_api`` and ``namespace``; tests/conftest.py registers the same plugin
# when the whole suite runs (registered once), this line when only this file or directory runs.
pytest_plugins = ["tests.controlplane.fixtures"]

DRIVER = "gpu.intel.com"
NODE = "i915-node"
FLEX = "0000:03:00.0"
A770 = "0000:08:00.0"
FLEX_DEVICE = "gpu-0000-03-00-0"
A770_DEVICE = "gpu-0000-08-00-0"
FLEX_VFS = [f"{FLEX_DEVICE}-vf{k}" for k in range(8)]  # flex170_m8
TAINT = f"{DRIVER}/unhealthy"


@pytest.fixture(scope="module")
def short_dir() -> Iterator[Path]:
    # Unix socket paths must stay under 108 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="dra-i915-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def fs(short_dir: Path) -> FakeSysfs:
    # As root, the /dev/dri entries are character devices, so the CDI specs the agent writes
    # are ones a container runtime accepts (tests/cdicheck.py injects them with the CDI library).
    fake = FakeSysfs(short_dir / "node", char_devices=os.geteuid() == 0)
    fake.add_gpu(FLEX, "0x56c0", lmem_total_bytes=16 * GIB, sriov_totalvfs=31, error_counters=True)
    fake.add_gpu(
        A770, "0x56a0", bridge="0000:00:1c.0", lmem_total_bytes=16 * GIB, error_counters=True
    )
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


def node_slices(api) -> list[dict[str, Any]]:
    return helpers.get(
        api,
        f"{helpers.RESOURCE_API}/resourceslices",
        query={"fieldSelector": f"spec.nodeName={NODE}"},
    )["items"]


def published_devices(api) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for s in node_slices(api) for d in s["spec"].get("devices") or []}


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
        backend_options={
            "sysfs_root": str(fs.sys),
            "devfs_root": str(fs.dev),
            "vf_profile": None,  # the model's default: flex170_m8
            "shared_gpus": A770,
        },
    )
    running = Agent(settings, hooks, client=load_client(str(control_plane.kubeconfig_path)))
    running.start()
    helpers.wait_for(lambda: published_devices(kube_api), 30, "the agent's ResourceSlices")
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


def claim_body(name: str, device_class: str, **exactly: Any) -> dict[str, Any]:
    body = helpers.resource_claim_body(name, device_class)
    body["spec"]["devices"]["requests"][0]["exactly"].update(exactly)
    return body


def claim_with_pod(api, namespace: str, body: dict[str, Any]) -> ClaimRef:
    """Create the claim and a pod using it pinned to the agent's node; no waiting."""
    name = body["metadata"]["name"]
    claim = helpers.create_resource_claim(api, namespace, body)
    pod = helpers.pod_body(f"pod-{name}", [{"name": "gpu", "resourceClaimName": name}])
    pod["spec"]["nodeSelector"] = {"kubernetes.io/hostname": NODE}
    helpers.create_pod(api, namespace, pod)
    return ClaimRef(namespace, name, claim["metadata"]["uid"])


def allocation(api, ref: ClaimRef) -> list[dict[str, Any]]:
    """The claim's allocation results, once the scheduler made them."""
    try:
        claim = helpers.wait_for_claim_allocated(api, ref.namespace, ref.name)
    except TimeoutError as exc:
        pod = helpers.get_pod(api, ref.namespace, f"pod-{ref.name}")
        conditions = json.dumps(pod.get("status", {}).get("conditions", []))
        raise TimeoutError(f"{exc}; pod conditions: {conditions}") from None
    assert claim["metadata"]["uid"] == ref.uid
    return claim["status"]["allocation"]["devices"]["results"]


def release(api, ref: ClaimRef) -> None:
    """Delete the claim's pod and the claim, and wait until the claim is gone."""
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

    helpers.wait_for(gone, 60, f"claim {ref.name} to be deleted (reservation and finalizer)")


def cdi_spec(short_dir: Path, ref: ClaimRef) -> dict[str, Any]:
    return json.loads((short_dir / "cdi" / f"intel.com-gpu_{ref.uid}.json").read_text())


def edits_of(spec: dict[str, Any], cdi_id: str) -> dict[str, Any]:
    name = cdi_id.split("=", 1)[1]
    (device,) = [d for d in spec["devices"] if d["name"] == name]
    return device["containerEdits"]


def numvfs(fs: FakeSysfs) -> int:
    return int((fs.gpus[FLEX].path / "sriov_numvfs").read_text())


def test_discovery_published_and_accepted(agent, kube_api):
    slices = node_slices(kube_api)
    assert all(s["spec"]["driver"] == DRIVER for s in slices)
    assert all(s["spec"]["pool"]["resourceSliceCount"] == len(slices) for s in slices)
    counter_slices = [s for s in slices if s["spec"].get("sharedCounters")]
    (counter_slice,) = counter_slices
    assert "devices" not in counter_slice["spec"], "a counter slice holds no devices"
    (counter_set,) = counter_slice["spec"]["sharedCounters"]
    assert counter_set["name"] == FLEX_DEVICE
    assert counter_set["counters"] == {"vfs": {"value": "8"}, "memory": {"value": "16Gi"}}

    devices = published_devices(kube_api)
    assert set(devices) == {A770_DEVICE, FLEX_DEVICE, *FLEX_VFS}
    attrs = {name: d["attributes"] for name, d in devices.items()}
    assert attrs[FLEX_DEVICE]["model"] == {"string": "Flex 170"}
    assert attrs[FLEX_DEVICE]["vfProfile"] == {"string": "flex170_m8"}
    assert attrs[A770_DEVICE]["model"] == {"string": "Arc A770"}
    assert devices[A770_DEVICE]["allowMultipleAllocations"] is True
    assert set(devices[A770_DEVICE]["capacity"]) == {"memory", "millicores"}
    vf0 = devices[FLEX_VFS[0]]
    assert vf0["attributes"]["type"] == {"string": "vf"}
    assert vf0["attributes"]["parent"] == {"string": FLEX_DEVICE}
    assert vf0["attributes"]["pciAddress"] == {"string": "0000:03:00.1"}
    assert vf0["consumesCounters"] == [
        {"counterSet": FLEX_DEVICE, "counters": {"vfs": {"value": "1"}, "memory": {"value": "2Gi"}}}
    ]
    assert devices[FLEX_DEVICE]["consumesCounters"][0]["counters"] == counter_set["counters"]
    assert not any(d.get("taints") for d in devices.values())


def test_vf_then_whole_gpu(agent, kubelet, kube_api, namespace, fs, kernel, short_dir):
    vf_ref = claim_with_pod(kube_api, namespace, claim_body("vf", f"vf.{DRIVER}"))
    (result,) = allocation(kube_api, vf_ref)
    assert (result["driver"], result["pool"]) == (DRIVER, NODE)
    assert result["device"] in FLEX_VFS
    index = FLEX_VFS.index(result["device"])
    assert numvfs(fs) == 0, "no VF exists before the prepare"

    writes_before = len(kernel.writes)
    prepared = kubelet.prepare([vf_ref])[vf_ref.uid]
    assert prepared.error == ""
    (device,) = prepared.devices
    assert device.device_name == result["device"]
    writes = kernel.writes[writes_before:]
    numvfs_writes = [i for i, (path, _) in enumerate(writes) if path.endswith("sriov_numvfs")]
    quota_writes = [i for i, (path, _) in enumerate(writes) if path.endswith("lmem_quota")]
    assert [writes[i] for i in numvfs_writes] == [
        (f"devices/pci0000:00/0000:00:01.0/{FLEX}/sriov_numvfs", "8")
    ]
    assert len(quota_writes) == 8 and max(quota_writes) < numvfs_writes[0], "quotas first"
    assert numvfs(fs) == 8

    vf_address = f"0000:03:00.{index + 1}"
    vf = fs.gpus[vf_address]
    assert vf.card and vf.render
    edits = edits_of(cdi_spec(short_dir, vf_ref), device.cdi_device_ids[0])
    paths = {n["path"]: n.get("hostPath") for n in edits["deviceNodes"]}
    assert paths[f"/dev/dri/{vf.card}"] == str(fs.dev / "dri" / vf.card)
    assert paths[f"/dev/dri/{vf.render}"] == str(fs.dev / "dri" / vf.render)
    # the udev by-path names, backed by the nodes themselves (a runtime refuses a symlink)
    assert paths[f"/dev/dri/by-path/pci-{vf_address}-card"] == str(fs.dev / "dri" / vf.card)
    assert paths[f"/dev/dri/by-path/pci-{vf_address}-render"] == str(fs.dev / "dri" / vf.render)
    if fs.char_devices:
        numbers = {(n["type"], n["major"], n["minor"]) for n in edits["deviceNodes"]}
        assert numbers == {("c", 226, int(vf.card[4:])), ("c", 226, int(vf.render[7:]))}
    assert f"DRI_RENDER_NODE=/dev/dri/{vf.render}" in edits["env"]
    assert f"DRI_CARD_NODE=/dev/dri/{vf.card}" in edits["env"]

    # The whole Flex cannot be allocated while a VF holds part of its counters.
    whole_ref = claim_with_pod(
        kube_api,
        namespace,
        claim_body(
            "whole",
            DRIVER,
            selectors=[
                {"cel": {"expression": f'device.attributes["{DRIVER}"].pciAddress == "{FLEX}"'}}
            ],
        ),
    )

    def unschedulable() -> bool:
        pod = helpers.get_pod(kube_api, namespace, "pod-whole")
        return any(
            c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable"
            for c in pod.get("status", {}).get("conditions", [])
        )

    helpers.wait_for(unschedulable, 30, "pod-whole to be unschedulable")
    time.sleep(3)
    claim = helpers.get_resource_claim(kube_api, namespace, "whole")
    assert not claim.get("status", {}).get("allocation"), "the Flex was given whole and split"
    assert not helpers.get_pod(kube_api, namespace, "pod-whole")["spec"].get("nodeName")

    # Release the VF: the node tears the VFs down, the scheduler frees the counters.
    writes_before = len(kernel.writes)
    assert kubelet.unprepare([vf_ref]) == {vf_ref.uid: ""}
    writes = kernel.writes[writes_before:]
    assert [v for p, v in writes if p.endswith("sriov_numvfs")] == ["0"]
    assert {v for p, v in writes if p.endswith("lmem_quota")} == {"0"}, "quotas reset"
    assert numvfs(fs) == 0 and vf_address not in fs.gpus
    release(kube_api, vf_ref)

    (whole,) = allocation(kube_api, whole_ref)
    assert whole["device"] == FLEX_DEVICE
    prepared = kubelet.prepare([whole_ref])[whole_ref.uid]
    assert prepared.error == ""
    flex = fs.gpus[FLEX]
    edits = edits_of(cdi_spec(short_dir, whole_ref), prepared.devices[0].cdi_device_ids[0])
    assert f"DRI_RENDER_NODE=/dev/dri/{flex.render}" in edits["env"]
    assert kubelet.unprepare([whole_ref]) == {whole_ref.uid: ""}
    assert numvfs(fs) == 0
    release(kube_api, whole_ref)


def test_shared_gpu(agent, kubelet, kube_api, namespace, short_dir):
    refs = [
        claim_with_pod(
            kube_api,
            namespace,
            claim_body(
                f"share-{i}",
                f"shared.{DRIVER}",
                capacity={"requests": {"memory": memory, "millicores": millicores}},
            ),
        )
        for i, (memory, millicores) in enumerate((("4Gi", "300"), ("2Gi", "500")))
    ]
    results = [allocation(kube_api, ref)[0] for ref in refs]
    assert [r["device"] for r in results] == [A770_DEVICE, A770_DEVICE]
    share_ids = [r["shareID"] for r in results]
    assert all(share_ids) and share_ids[0] != share_ids[1]
    assert [r["consumedCapacity"] for r in results] == [
        {"memory": "4Gi", "millicores": "300"},
        {"memory": "2Gi", "millicores": "500"},
    ]

    answers = kubelet.prepare(refs)
    assert all(a.error == "" for a in answers.values()), answers
    devices = [answers[ref.uid].devices[0] for ref in refs]
    assert [d.share_id for d in devices] == share_ids
    assert len({d.cdi_device_ids for d in devices}) == 2
    for ref, device, (memory, millicores) in zip(
        refs, devices, ((4 * GIB, 300), (2 * GIB, 500)), strict=True
    ):
        edits = edits_of(cdi_spec(short_dir, ref), device.cdi_device_ids[0])
        assert f"GPU_SHARE_MEMORY_BYTES={memory}" in edits["env"]
        assert f"GPU_SHARE_MILLICORES={millicores}" in edits["env"]
    assert set(kubelet.unprepare(refs).values()) == {""}
    for ref in refs:
        release(kube_api, ref)


def test_health_taint(agent, kube_api, fs):
    def taints() -> list[dict[str, Any]] | None:
        device = published_devices(kube_api).get(A770_DEVICE)
        return None if device is None else device.get("taints", [])

    assert taints() == []
    fs.bump_error(A770, "fatal_guc")
    (taint,) = helpers.wait_for(taints, 15, f"the {TAINT} taint on {A770_DEVICE}")
    assert taint["key"] == TAINT and taint["effect"] == "NoExecute"
    assert not any(
        d.get("taints") for name, d in published_devices(kube_api).items() if name != A770_DEVICE
    )

    # Rebinding the driver clears the (sticky) error: a new card, a new baseline.
    fs.unbind(A770)
    fs.rebind(A770, "i915")
    helpers.wait_for(lambda: taints() == [], 15, f"{A770_DEVICE} without a taint after rebind")

    # Unbinding keeps the A770 published (same device, same capacities), tainted NoExecute so
    # that its pods are evicted; rebinding clears the taint.
    before = published_devices(kube_api)[A770_DEVICE]
    fs.unbind(A770)
    (taint,) = helpers.wait_for(taints, 15, f"the {TAINT} taint on the unbound {A770_DEVICE}")
    assert taint["key"] == TAINT and taint["effect"] == "NoExecute"
    device = published_devices(kube_api)[A770_DEVICE]
    assert {k: v for k, v in device.items() if k != "taints"} == before
    assert not any(
        d.get("taints") for name, d in published_devices(kube_api).items() if name != A770_DEVICE
    )

    # Bound to vfio-pci (passed through): still published, NoExecute.
    fs.rebind(A770, "vfio-pci")
    helpers.wait_for(
        lambda: [t["effect"] for t in taints() or []] == ["NoExecute"],
        15,
        f"the NoExecute taint on {A770_DEVICE} bound to vfio-pci",
    )

    fs.rebind(A770, "i915")
    helpers.wait_for(lambda: taints() == [], 15, f"{A770_DEVICE} back without a taint")
    assert published_devices(kube_api)[A770_DEVICE] == before
