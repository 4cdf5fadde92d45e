"""Intel GPUs reach real containers: kubelet, containerd (CDI) and runc on a fake sysfs tree
whose ``/dev/dri`` entries are real character devices (DRM major 226) with udev's by-path links.

The agent runs in this process (its writes to sysfs go through :class:`FakeKernel`, which makes
VFs appear as the kernel would); the kubelet of the real node calls its sockets, and containerd
injects the CDI devices it wrote. Each pod reports its environment and character devices.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from dra_backend_i915 import plugin
from dra_backend_i915.memory import DrmMemoryQuery
from dra_backend_i915.testing import DRM_MAJOR, GIB, FakeDrmIoctl, FakeKernel, FakeSysfs

from dra_core.kube.client import load_client
from dra_core.manifests import device_class_manifests
from dra_core.plugins import from_objects
from dra_core.runtime import Agent, AgentSettings
from tests.controlplane import helpers
from tests.realnode import pods

pytestmark = [pytest.mark.controlplane, pytest.mark.realnode]
pytest_plugins = ["tests.controlplane.fixtures", "tests.realnode.fixtures"]

FLEX = "0000:03:00.0"  # Flex 170, SR-IOV (default profile flex170_m8)
A770 = "0000:08:00.0"  # Arc A770, shared through consumable capacity
B580 = "0000:0a:00.0"  # Arc B580 on xe, whole GPU


@pytest.fixture(scope="module")
def fs() -> Iterator[FakeSysfs]:
    if os.geteuid() != 0:
        pytest.skip("character devices for the fake GPUs need root")
    base = Path(tempfile.mkdtemp(prefix="dra-i915-node-", dir="/tmp"))
    fake = FakeSysfs(base, char_devices=True)
    fake.add_simpledrm()  # card0 without render node: the Intel cards are shifted, as on hosts
    fake.add_gpu(FLEX, "0x56c0", lmem_total_bytes=16 * GIB, sriov_totalvfs=31)
    fake.add_gpu(A770, "0x56a0", bridge="0000:00:1c.0", lmem_total_bytes=16 * GIB)
    fake.add_gpu(B580, "0xe20b", bridge="0000:00:1d.0", driver="xe", lmem_total_bytes=12 * GIB)
    for address, aux in ((FLEX, "mei-gsc"), (A770, "mei-gscfi"), (B580, "mei-gscfi")):
        fake.add_mei(address, aux)  # mei0, mei1, mei2: the GPUs' management engines
    yield fake
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def i915_agent(real_node, control_plane, kube_api, fs) -> Iterator[Agent]:
    kernel: FakeKernel = fs.kernel(delay=0.05)
    backend = plugin.I915Backend(
        writer=kernel, memory_query=DrmMemoryQuery(ioctl=FakeDrmIoctl({})), poll=0.01
    )
    hooks = from_objects("i915", backend)
    classes = device_class_manifests(
        hooks.device_classes(hooks.backend_identity()), control_plane.enabled_gates()
    )
    for body in classes:
        helpers.delete_device_class(kube_api, body["metadata"]["name"])
        helpers.create(kube_api, f"{helpers.RESOURCE_API}/deviceclasses", body)
    settings = AgentSettings(
        node_name=real_node.name,
        registration_dir=real_node.registration_dir,
        plugins_dir=real_node.plugins_dir,
        cdi_dir=real_node.cdi_dir,
        http_port=0,
        poll_interval=0.5,
        backend_options={
            "sysfs_root": str(fs.sys),
            "devfs_root": str(fs.dev),
            "vf_profile": None,
            "shared_gpus": A770,
        },
    )
    agent = Agent(settings, hooks, client=load_client(str(control_plane.kubeconfig_path)))
    agent.start()
    try:
        yield agent
    finally:
        agent.stop()
        kernel.join()
        for body in classes:
            helpers.delete_device_class(kube_api, body["metadata"]["name"])


def dri_numbers(fs: FakeSysfs, address: str) -> dict[str, tuple[int, int]]:
    """by-path name in the container -> the major:minor of the host node it names."""
    numbers = {}
    for kind in ("card", "render"):
        link = fs.dev / "dri" / "by-path" / f"pci-{address}-{kind}"
        st = os.stat(link)  # follows the link to the node
        numbers[f"/dev/dri/by-path/pci-{address}-{kind}"] = (
            os.major(st.st_rdev),
            os.minor(st.st_rdev),
        )
        numbers[f"/dev/dri/{os.readlink(link).rsplit('/', 1)[1]}"] = numbers[
            f"/dev/dri/by-path/pci-{address}-{kind}"
        ]
    return numbers


def run(api, namespace: str, node, name: str, device_class: str, **request) -> pods.ContainerView:
    pods.create_template(
        api, namespace, pods.claim_template(name, device_class, request_name="gpu", **request)
    )
    pods.start(api, namespace, node, name, pods.from_template(name, "gpu"))
    (uid,) = pods.claim_uids(api, namespace, name).values()
    view = pods.container_view(node, namespace, name)
    pods.assert_sees(view, pods.cdi_edits(node.cdi_dir, uid))
    return view


def assert_gpu(view: pods.ContainerView, fs: FakeSysfs, address: str) -> None:
    expected = dri_numbers(fs, address)
    for path, numbers in expected.items():
        assert view.devices.get(path) == numbers, f"{path}: {view.devices.get(path)} != {numbers}"
        assert numbers[0] == DRM_MAJOR
    others = {p for p in view.devices if p.startswith("/dev/dri/")} - set(expected)
    assert not others, f"the container sees DRM nodes of other GPUs: {sorted(others)}"


def test_whole_gpu(i915_agent, real_node, fs, kube_api, namespace):
    selectors = [
        {"cel": {"expression": f'device.attributes["gpu.intel.com"].pciAddress == "{B580}"'}}
    ]
    view = run(kube_api, namespace, real_node, "whole", "gpu.intel.com", selectors=selectors)
    assert_gpu(view, fs, B580)


@pytest.mark.requires_feature("DRAPartitionableDevices")
def test_vf_created_on_demand(i915_agent, real_node, fs, kube_api, namespace):
    assert int((fs.gpus[FLEX].path / "sriov_numvfs").read_text()) == 0
    view = run(kube_api, namespace, real_node, "vf", "vf.gpu.intel.com")
    assert int((fs.gpus[FLEX].path / "sriov_numvfs").read_text()) == 8
    (address,) = {p.split("pci-", 1)[1].rsplit("-", 1)[0] for p in view.devices if "by-path" in p}
    assert address != FLEX and address.startswith("0000:03:00."), address
    assert_gpu(view, fs, address)


@pytest.mark.requires_feature("DRAConsumableCapacity")
def test_shared_gpu(i915_agent, real_node, fs, kube_api, namespace):
    capacity = {"requests": {"memory": "2Gi", "millicores": "500"}}
    first = run(
        kube_api, namespace, real_node, "share-a", "shared.gpu.intel.com", capacity=capacity
    )
    second = run(
        kube_api, namespace, real_node, "share-b", "shared.gpu.intel.com", capacity=capacity
    )
    for view in (first, second):
        assert_gpu(view, fs, A770)


@pytest.mark.all_mode_over_counters
def test_monitoring_sees_every_gpu_beside_a_workload(
    i915_agent, real_node, control_plane, fs, kube_api, namespace
):
    from dra_backend_i915.testing import MEI_MAJOR

    admin = helpers.create_namespace(
        kube_api, helpers.unique_name("monitor"), {"resource.kubernetes.io/admin-access": "true"}
    )
    try:
        monitor = run(
            kube_api,
            admin,
            real_node,
            "monitor",
            "monitoring.gpu.intel.com",
            allocationMode="All",
            adminAccess=True,
        )
        # A normal pod on a GPU the monitor has: scheduled, prepared and running beside it.
        selectors = [
            {"cel": {"expression": f'device.attributes["gpu.intel.com"].pciAddress == "{B580}"'}}
        ]
        workload = run(
            kube_api, namespace, real_node, "beside", "gpu.intel.com", selectors=selectors
        )
        assert_gpu(workload, fs, B580)
        assert pods.phase(kube_api, admin, "monitor")[0] == "Running"

        # The shared A770 is published (and monitored) only with consumable capacity on; the
        # agent leaves it out otherwise. Each GPU keeps its management engine's number.
        gpus = {FLEX: 0, A770: 1, B580: 2}
        if control_plane.missing_gates("DRAConsumableCapacity"):
            del gpus[A770]
        expected = {
            path: numbers for address in gpus for path, numbers in dri_numbers(fs, address).items()
        }
        dri = {p: n for p, n in monitor.devices.items() if p.startswith("/dev/dri/")}
        assert dri == expected, f"the card and render nodes of {sorted(gpus)}, and no VF's"
        meis = {p: n for p, n in monitor.devices.items() if p.startswith("/dev/mei")}
        assert meis == {f"/dev/mei{k}": (MEI_MAJOR, k) for k in gpus.values()}
        for address, k in gpus.items():
            assert monitor.env[f"MEI_NODE_{address.replace(':', '_').replace('.', '_')}"] == (
                f"/dev/mei{k}"
            )
        assert not {p for p in workload.devices if p.startswith("/dev/mei")}
    finally:
        helpers.delete_namespace(kube_api, admin)
