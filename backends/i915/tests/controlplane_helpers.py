"""What the i915 tests against the control plane share: a fake node served by one agent.

A test module makes its own ``fs`` (the fake GPUs of its node) and takes the rest from
:func:`agent_fixtures`, which returns module-scoped fixtures (a short directory, the fake
kernel, the i915 backend and hooks bound to it, the DeviceClasses, the agent) and a kubelet
per test::

    short_dir, kernel, backend, hooks, classes, agent, kubelet = agent_fixtures("dra-x-", NODE)

The plain functions make claims with pods pinned to a node, wait for their allocation, release
them and read the CDI specs the agent wrote.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dra_backend_i915 import plugin
from dra_backend_i915.memory import DrmMemoryQuery
from dra_backend_i915.testing import FakeDrmIoctl, FakeKernel, FakeSysfs

from dra_core import ClaimRef
from dra_core.kube.client import load_client
from dra_core.manifests import device_class_manifests
from dra_core.plugins import Hooks, from_objects
from dra_core.runtime import Agent, AgentSettings
from dra_core.testing.kubelet import FakeKubelet
from dra_core.testing.scenario import create_ready_node
from tests.controlplane import helpers

DRIVER = "gpu.intel.com"
FLEX = "0000:03:00.0"
A770 = "0000:08:00.0"
FLEX_DEVICE = "gpu-0000-03-00-0"
A770_DEVICE = "gpu-0000-08-00-0"
FLEX_VFS = [f"{FLEX_DEVICE}-vf{k}" for k in range(8)]  # flex170_m8


def agent_fixtures(
    prefix: str, node: str, ready: Callable[[dict[str, Any]], bool] = bool, **options: Any
) -> tuple[Any, ...]:
    """``short_dir``, ``kernel``, ``backend``, ``hooks``, ``classes``, ``agent`` and ``kubelet``.

    The agent serves ``node`` from the module's ``fs`` with the backend ``options`` beside the
    fake roots, and is ready once ``ready`` holds for the devices it published.
    """

    @pytest.fixture(scope="module")
    def short_dir() -> Iterator[Path]:
        # Unix socket paths must stay under 108 bytes; pytest's tmp_path can be longer.
        path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        yield path
        shutil.rmtree(path, ignore_errors=True)

    @pytest.fixture(scope="module")
    def kernel(fs: FakeSysfs) -> Iterator[FakeKernel]:
        fake = fs.kernel(delay=0.05)
        yield fake
        fake.join()

    @pytest.fixture(scope="module")
    def backend(kernel: FakeKernel) -> plugin.I915Backend:
        return plugin.I915Backend(
            writer=kernel, memory_query=DrmMemoryQuery(ioctl=FakeDrmIoctl({})), poll=0.01
        )

    @pytest.fixture(scope="module")
    def hooks(backend: plugin.I915Backend) -> Hooks:
        return from_objects("i915", backend)

    @pytest.fixture(scope="module")
    def classes(control_plane, kube_api, hooks: Hooks) -> Iterator[None]:
        bodies = device_class_manifests(
            hooks.device_classes(hooks.backend_identity()), control_plane.enabled_gates()
        )
        for body in bodies:
            helpers.delete_device_class(kube_api, body["metadata"]["name"])
            helpers.create(kube_api, f"{helpers.RESOURCE_API}/deviceclasses", body)
        yield
        for body in bodies:
            helpers.delete_device_class(kube_api, body["metadata"]["name"])

    @pytest.fixture(scope="module")
    def agent(
        control_plane, kube_api, dra_kube_client, classes, short_dir, fs, hooks
    ) -> Iterator[Agent]:
        create_ready_node(dra_kube_client, node)
        settings = AgentSettings.below(
            short_dir,
            node,
            poll_interval=0.5,
            backend_options={"sysfs_root": str(fs.sys), "devfs_root": str(fs.dev), **options},
        )
        running = Agent(settings, hooks, client=load_client(str(control_plane.kubeconfig_path)))
        running.start()
        helpers.wait_for(lambda: ready(published(kube_api, node)), 30, "the agent's ResourceSlices")
        yield running
        running.stop()
        helpers.delete_node(kube_api, node)

    @pytest.fixture
    def kubelet(agent: Agent) -> Iterator[FakeKubelet]:
        assert agent.plugin is not None
        with FakeKubelet(agent.plugin.registration_socket) as peer:
            peer.register()
            yield peer

    return short_dir, kernel, backend, hooks, classes, agent, kubelet


def node_slices(api, node: str) -> list[dict[str, Any]]:
    return helpers.get(
        api,
        f"{helpers.RESOURCE_API}/resourceslices",
        query={"fieldSelector": f"spec.nodeName={node}"},
    )["items"]


def published(api, node: str) -> dict[str, dict[str, Any]]:
    """The devices the slices of ``node`` publish, by name."""
    return {d["name"]: d for s in node_slices(api, node) for d in s["spec"].get("devices") or []}


def on(address: str) -> str:
    """The selector of the device with this PCI address."""
    return f'device.attributes["{DRIVER}"].pciAddress == "{address}"'


def claim_body(
    name: str, device_class: str, *, count: int = 1, selectors: Iterable[str] = (), **exactly: Any
) -> dict[str, Any]:
    """A claim of one request; ``exactly`` adds to it (``allocationMode="All"`` drops the count)."""
    body = helpers.resource_claim_body(name, device_class, count=count, selectors=selectors)
    request = body["spec"]["devices"]["requests"][0]["exactly"]
    request.update(exactly)
    if request["allocationMode"] == "All":
        del request["count"]
    return body


def claim_with_pod(api, namespace: str, body: dict[str, Any], node: str) -> ClaimRef:
    """Create the claim and a pod using it pinned to ``node``; no waiting."""
    name = body["metadata"]["name"]
    claim = helpers.create_resource_claim(api, namespace, body)
    pod = helpers.pod_body(f"pod-{name}", [{"name": "gpu", "resourceClaimName": name}])
    pod["spec"]["nodeSelector"] = {"kubernetes.io/hostname": node}
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


def allocated_devices(api, ref: ClaimRef) -> list[str]:
    """The devices the scheduler allocated to the claim, sorted."""
    return sorted(r["device"] for r in allocation(api, ref))


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


def cdi_spec_path(root: Path, ref: ClaimRef) -> Path:
    """Where the agent rooted at ``root`` writes the claim's CDI spec."""
    return root / "cdi" / f"intel.com-gpu_{ref.uid}.json"


def cdi_spec(root: Path, ref: ClaimRef) -> dict[str, Any]:
    return json.loads(cdi_spec_path(root, ref).read_text())


def edits_of(spec: dict[str, Any], cdi_id: str) -> dict[str, Any]:
    """The container edits of the spec's device named by ``cdi_id``."""
    name = cdi_id.split("=", 1)[1]
    (device,) = [d for d in spec["devices"] if d["name"] == name]
    return device["containerEdits"]


def numvfs(fs: FakeSysfs, address: str = FLEX) -> int:
    return int((fs.gpus[address].path / "sriov_numvfs").read_text())
