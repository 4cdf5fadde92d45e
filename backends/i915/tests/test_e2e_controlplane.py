"""The i915 backend end to end: node agent, real API server and scheduler, kubelet socket.

One agent serves a fake node (a Flex 170 with SR-IOV, partitioned with its default profile
``flex170_m8``, and an Arc A770 shared through consumable capacity) for the whole module. The
real scheduler allocates from the slices the agent publishes, the claims are prepared and
unprepared through the agent's kubelet plugin socket as the kubelet would, and the
:class:`~dra_backend_i915.testing.FakeKernel` shows what the backend wrote to sysfs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from dra_backend_i915.testing import GIB, FakeSysfs

from backends.i915.tests import controlplane_helpers as cp
from dra_core.slices.features import release_features
from tests.controlplane import helpers

pytestmark = pytest.mark.controlplane
# ``control_plane``, ``kube_api`` and ``namespace``; tests/conftest.py registers the same plugin
# when the whole suite runs (registered once), this line when only this file or directory runs.
pytest_plugins = ["tests.controlplane.fixtures"]

NODE = "i915-node"
TAINT = f"{cp.DRIVER}/unhealthy"


@pytest.fixture(scope="module")
def fs(short_dir: Path) -> FakeSysfs:
    # As root, the /dev/dri entries are character devices, so the CDI specs the agent writes
    # are ones a container runtime accepts (tests/cdicheck.py injects them with the CDI library).
    fake = FakeSysfs(short_dir / "node", char_devices=os.geteuid() == 0)
    fake.add_gpu(
        cp.FLEX, "0x56c0", lmem_total_bytes=16 * GIB, sriov_totalvfs=31, error_counters=True
    )
    fake.add_gpu(
        cp.A770, "0x56a0", bridge="0000:00:1c.0", lmem_total_bytes=16 * GIB, error_counters=True
    )
    return fake


short_dir, kernel, backend, hooks, classes, agent, kubelet = cp.agent_fixtures(
    "dra-i915-",
    NODE,
    vf_profile=None,  # the model's default: flex170_m8
    shared_gpus=cp.A770,
)


@pytest.mark.requires_feature("DRAPartitionableDevices", "DRAConsumableCapacity")
def test_discovery_published_and_accepted(agent, kube_api, control_plane):
    slices = cp.node_slices(kube_api, NODE)
    assert all(s["spec"]["driver"] == cp.DRIVER for s in slices)
    assert all(s["spec"]["pool"]["resourceSliceCount"] == len(slices) for s in slices)
    counter_slices = [s for s in slices if s["spec"].get("sharedCounters")]
    (counter_slice,) = counter_slices
    server = release_features(control_plane.k8s_version, control_plane.enabled_gates())
    if server.counters_beside_devices:  # 1.34: in the slice of the devices consuming it
        consumers = {
            d["name"] for d in counter_slice["spec"]["devices"] if d.get("consumesCounters")
        }
        assert consumers == {cp.FLEX_DEVICE, *cp.FLEX_VFS}
    else:
        assert "devices" not in counter_slice["spec"], "a counter slice holds no devices"
    (counter_set,) = counter_slice["spec"]["sharedCounters"]
    assert counter_set["name"] == cp.FLEX_DEVICE
    assert counter_set["counters"] == {"vfs": {"value": "8"}, "memory": {"value": "16Gi"}}

    devices = cp.published(kube_api, NODE)
    assert set(devices) == {cp.A770_DEVICE, cp.FLEX_DEVICE, *cp.FLEX_VFS}
    attrs = {name: d["attributes"] for name, d in devices.items()}
    assert attrs[cp.FLEX_DEVICE]["model"] == {"string": "Flex 170"}
    assert attrs[cp.FLEX_DEVICE]["vfProfile"] == {"string": "flex170_m8"}
    assert attrs[cp.A770_DEVICE]["model"] == {"string": "Arc A770"}
    assert devices[cp.A770_DEVICE]["allowMultipleAllocations"] is True
    assert set(devices[cp.A770_DEVICE]["capacity"]) == {"memory", "millicores"}
    vf0 = devices[cp.FLEX_VFS[0]]
    assert vf0["attributes"]["type"] == {"string": "vf"}
    assert vf0["attributes"]["parent"] == {"string": cp.FLEX_DEVICE}
    assert vf0["attributes"]["pciAddress"] == {"string": "0000:03:00.1"}
    assert vf0["consumesCounters"] == [
        {
            "counterSet": cp.FLEX_DEVICE,
            "counters": {"vfs": {"value": "1"}, "memory": {"value": "2Gi"}},
        }
    ]
    assert devices[cp.FLEX_DEVICE]["consumesCounters"][0]["counters"] == counter_set["counters"]
    assert not any(d.get("taints") for d in devices.values())


@pytest.mark.requires_feature("DRAPartitionableDevices")
def test_vf_then_whole_gpu(agent, kubelet, kube_api, namespace, fs, kernel, short_dir):
    vf_ref = cp.claim_with_pod(kube_api, namespace, cp.claim_body("vf", f"vf.{cp.DRIVER}"), NODE)
    (result,) = cp.allocation(kube_api, vf_ref)
    assert (result["driver"], result["pool"]) == (cp.DRIVER, NODE)
    assert result["device"] in cp.FLEX_VFS
    index = cp.FLEX_VFS.index(result["device"])
    assert cp.numvfs(fs) == 0, "no VF exists before the prepare"

    writes_before = len(kernel.writes)
    prepared = kubelet.prepare([vf_ref])[vf_ref.uid]
    assert prepared.error == ""
    (device,) = prepared.devices
    assert device.device_name == result["device"]
    writes = kernel.writes[writes_before:]
    numvfs_writes = [i for i, (path, _) in enumerate(writes) if path.endswith("sriov_numvfs")]
    quota_writes = [i for i, (path, _) in enumerate(writes) if path.endswith("lmem_quota")]
    assert [writes[i] for i in numvfs_writes] == [
        (f"devices/pci0000:00/0000:00:01.0/{cp.FLEX}/sriov_numvfs", "8")
    ]
    assert len(quota_writes) == 8 and max(quota_writes) < numvfs_writes[0], "quotas first"
    assert cp.numvfs(fs) == 8

    vf_address = f"0000:03:00.{index + 1}"
    vf = fs.gpus[vf_address]
    assert vf.card and vf.render
    edits = cp.edits_of(cp.cdi_spec(short_dir, vf_ref), device.cdi_device_ids[0])
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
    whole_ref = cp.claim_with_pod(
        kube_api, namespace, cp.claim_body("whole", cp.DRIVER, selectors=[cp.on(cp.FLEX)]), NODE
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
    assert cp.numvfs(fs) == 0 and vf_address not in fs.gpus
    cp.release(kube_api, vf_ref)

    (whole,) = cp.allocation(kube_api, whole_ref)
    assert whole["device"] == cp.FLEX_DEVICE
    prepared = kubelet.prepare([whole_ref])[whole_ref.uid]
    assert prepared.error == ""
    flex = fs.gpus[cp.FLEX]
    edits = cp.edits_of(cp.cdi_spec(short_dir, whole_ref), prepared.devices[0].cdi_device_ids[0])
    assert f"DRI_RENDER_NODE=/dev/dri/{flex.render}" in edits["env"]
    assert kubelet.unprepare([whole_ref]) == {whole_ref.uid: ""}
    assert cp.numvfs(fs) == 0
    cp.release(kube_api, whole_ref)


@pytest.mark.requires_feature("DRAConsumableCapacity")
def test_shared_gpu(agent, kubelet, kube_api, namespace, short_dir):
    refs = [
        cp.claim_with_pod(
            kube_api,
            namespace,
            cp.claim_body(
                f"share-{i}",
                f"shared.{cp.DRIVER}",
                capacity={"requests": {"memory": memory, "millicores": millicores}},
            ),
            NODE,
        )
        for i, (memory, millicores) in enumerate((("4Gi", "300"), ("2Gi", "500")))
    ]
    results = [cp.allocation(kube_api, ref)[0] for ref in refs]
    assert [r["device"] for r in results] == [cp.A770_DEVICE, cp.A770_DEVICE]
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
        edits = cp.edits_of(cp.cdi_spec(short_dir, ref), device.cdi_device_ids[0])
        assert f"GPU_SHARE_MEMORY_BYTES={memory}" in edits["env"]
        assert f"GPU_SHARE_MILLICORES={millicores}" in edits["env"]
    assert set(kubelet.unprepare(refs).values()) == {""}
    for ref in refs:
        cp.release(kube_api, ref)


@pytest.mark.requires_feature("DRADeviceTaints")
def test_health_taint(agent, kube_api, fs):
    def taints() -> list[dict[str, Any]] | None:
        device = cp.published(kube_api, NODE).get(cp.A770_DEVICE)
        return None if device is None else device.get("taints", [])

    assert taints() == []
    fs.bump_error(cp.A770, "fatal_guc")
    (taint,) = helpers.wait_for(taints, 15, f"the {TAINT} taint on {cp.A770_DEVICE}")
    assert taint["key"] == TAINT and taint["effect"] == "NoExecute"
    assert not any(
        d.get("taints")
        for name, d in cp.published(kube_api, NODE).items()
        if name != cp.A770_DEVICE
    )

    # Rebinding the driver clears the (sticky) error: a new card, a new baseline.
    fs.unbind(cp.A770)
    fs.rebind(cp.A770, "i915")
    helpers.wait_for(lambda: taints() == [], 15, f"{cp.A770_DEVICE} without a taint after rebind")

    # Unbinding keeps the A770 published (same device, same capacities), tainted NoExecute so
    # that its pods are evicted; rebinding clears the taint.
    before = cp.published(kube_api, NODE)[cp.A770_DEVICE]
    fs.unbind(cp.A770)
    (taint,) = helpers.wait_for(taints, 15, f"the {TAINT} taint on the unbound {cp.A770_DEVICE}")
    assert taint["key"] == TAINT and taint["effect"] == "NoExecute"
    device = cp.published(kube_api, NODE)[cp.A770_DEVICE]
    assert {k: v for k, v in device.items() if k != "taints"} == before
    assert not any(
        d.get("taints")
        for name, d in cp.published(kube_api, NODE).items()
        if name != cp.A770_DEVICE
    )

    # Bound to vfio-pci (passed through): still published, NoExecute.
    fs.rebind(cp.A770, "vfio-pci")
    helpers.wait_for(
        lambda: [t["effect"] for t in taints() or []] == ["NoExecute"],
        15,
        f"the NoExecute taint on {cp.A770_DEVICE} bound to vfio-pci",
    )

    fs.rebind(cp.A770, "i915")
    helpers.wait_for(lambda: taints() == [], 15, f"{cp.A770_DEVICE} back without a taint")
    assert cp.published(kube_api, NODE)[cp.A770_DEVICE] == before
