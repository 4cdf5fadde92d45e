"""Publishing only what the API server can enforce, against real API servers and schedulers
(``-m controlplane``): the session's (``DRA_K8S_VERSION``, ``DRA_TEST_GATES``) and one
started here, of the same release, with partitionable devices, consumable capacity and device
taints turned off. The same assertions hold on both: the slices are accepted, and the
scheduler never gives a whole device and one of its partitions to two claims, nor allocates
an unhealthy device.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
from dra_backend_fake.inventory import build, default_specs

from dra_core.kube.client import KubeClient
from dra_core.model import Inventory, Taint
from dra_core.slices.features import ServerFeatures, release_features, safe_inventory
from dra_core.slices.publisher import SlicePublisher
from dra_core.testing.controlplane import ControlPlane
from dra_core.testing.scenario import create_ready_node
from tests.controlplane import helpers as h
from tests.slices.test_publish_controlplane import SETTINGS, SLICES, complete

pytestmark = pytest.mark.controlplane

#: The three features' gates, and the one that needs device taints (1.35 and later).
GATES_OFF = {
    "DRAPartitionableDevices": False,
    "DRAConsumableCapacity": False,
    "DRADeviceTaints": False,
    "DRADeviceTaintRules": False,
}


@dataclass
class Server:
    control_plane: ControlPlane
    api: Any
    namespace: str

    def gate_on(self, gate: str) -> bool:
        """Whether ``gate`` is on, as the running API server reports it."""
        return self.control_plane.enabled_gates().get(gate, False)

    def expected(self) -> ServerFeatures:
        """What the agent should find: what the release table says of the server's gates."""
        cp = self.control_plane
        return release_features(cp.k8s_version, cp.enabled_gates())


@pytest.fixture(scope="module", params=["harness gates", "features off"])
def server(request, control_plane, kube_api) -> Iterator[Server]:
    if request.param == "harness gates":
        namespace = h.create_namespace(kube_api, h.unique_name("features"))
        h.wait_for_default_service_account(kube_api, namespace)
        yield Server(control_plane, kube_api, namespace)
        h.delete_namespace(kube_api, namespace)
        return
    cp = ControlPlane(
        binaries=control_plane.binaries,
        k8s_version=control_plane.k8s_version,
        gates=control_plane.gates,
        feature_gates=GATES_OFF,
    )
    cp.start()
    api = cp.api_client()
    try:
        namespace = h.create_namespace(api, h.unique_name("features"))
        h.wait_for_default_service_account(api, namespace)
        yield Server(cp, api, namespace)
    finally:
        api.close()
        cp.stop()


@pytest.fixture
def publish(server) -> Iterator[Any]:
    """Publish an inventory for a new Node and driver; stopped and cleaned up afterwards."""
    made: list[tuple[SlicePublisher, str]] = []

    def start(inventory: Inventory) -> SlicePublisher:
        node = create_ready_node(h.requester(server.api), h.unique_name("node"))["metadata"]["name"]
        driver = f"{h.unique_name('drv')}.example.com"
        pub = SlicePublisher(KubeClient(server.api), driver, node, settings=SETTINGS)
        made.append((pub, node))
        pub.update(inventory)
        pub.start()
        assert pub.wait_synced(15)
        return pub

    yield start
    for pub, node in made:
        pub.stop()
        for body in slices_of(server, pub):
            h.delete_resource_slice(server.api, body["metadata"]["name"])
        h.delete_node(server.api, node)


def slices_of(server: Server, pub: SlicePublisher) -> list[dict[str, Any]]:
    found = h.get(server.api, SLICES, query={"fieldSelector": pub.field_selector})["items"]
    return sorted(found, key=lambda s: s["metadata"]["name"])


def published_names(server: Server, pub: SlicePublisher) -> list[str]:
    return [d["name"] for s in slices_of(server, pub) for d in s["spec"].get("devices") or ()]


def fake_default() -> Inventory:
    return build(default_specs())


def test_the_agent_finds_what_the_server_keeps_and_publishes_what_is_safe(server, publish):
    inventory = fake_default()
    pub = publish(inventory)
    expected = server.expected()
    assert pub.server_features == expected
    safe, _ = safe_inventory(inventory, expected)
    slices = slices_of(server, pub)
    assert complete(slices), "accepted, all at one generation"
    assert published_names(server, pub) == [d.name for d in safe.devices]
    if not expected.dropped:  # every feature on: nothing changes
        assert safe == inventory
    if "consumesCounters" in expected.dropped:
        names = published_names(server, pub)
        assert "big-0" in names and not any(n.startswith("big-0-p") for n in names)
    dry_runs = 2 if expected.counters_beside_devices else 1
    assert pub.client.request_count("create") == len(slices) + dry_runs


def _claim_and_pod(server: Server, name: str, device_class: str, selectors: list[str]) -> None:
    body = h.resource_claim_body(name, device_class, selectors=selectors)
    h.create_resource_claim(server.api, server.namespace, body)
    pod = h.pod_body(name, [{"name": "dev", "resourceClaimName": name}])
    h.create_pod(server.api, server.namespace, pod)


def _allocated(server: Server, name: str) -> list[str]:
    claim = h.get_resource_claim(server.api, server.namespace, name)
    results = claim.get("status", {}).get("allocation", {}).get("devices", {}).get("results", [])
    return [r["device"] for r in results]


def _stays_unallocated(server: Server, *names: str, seconds: float = 4.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for name in names:
            assert _allocated(server, name) == [], f"{name} allocated"
        time.sleep(0.5)


def test_two_claims_never_get_a_whole_device_and_its_partition(server, publish):
    pub = publish(fake_default())
    device_class = h.unique_name("class")
    h.create_device_class(server.api, device_class, pub.driver)
    model = f'device.attributes["{pub.driver}"].model == "fake-partitionable"'
    partition = f'device.attributes["{pub.driver}"].type == "partition"'
    a, b, part = (h.unique_name(n) for n in ("a", "b", "part"))
    try:
        _claim_and_pod(server, a, device_class, [model])
        h.wait_for_claim_allocated(server.api, server.namespace, a, timeout=60)
        assert _allocated(server, a) == ["big-0"]  # the whole device, listed first
        # Another claim for any part of it, or for a partition, finds nothing free.
        _claim_and_pod(server, b, device_class, [model])
        _claim_and_pod(server, part, device_class, [partition])
        _stays_unallocated(server, b, part)
    finally:
        h.delete_device_class(server.api, device_class)


def test_an_unhealthy_device_is_never_allocated(server, publish):
    inventory = fake_default()
    sick = replace(inventory.devices[0], taints=(Taint("dra-core.dev/unhealthy", "NoSchedule"),))
    pub = publish(replace(inventory, devices=(sick, *inventory.devices[1:])))
    assert (sick.name in published_names(server, pub)) == server.gate_on("DRADeviceTaints")
    device_class = h.unique_name("class")
    h.create_device_class(server.api, device_class, pub.driver)
    claim = h.unique_name("sick")
    try:
        _claim_and_pod(
            server, claim, device_class, [f'device.attributes["{pub.driver}"].index == 0']
        )
        _stays_unallocated(server, claim)
    finally:
        h.delete_device_class(server.api, device_class)
