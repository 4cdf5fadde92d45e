"""The publisher against the real API server and scheduler (``-m controlplane``).

Every test uses its own fake Node and its own driver name, so the scheduler cannot pick
devices published by another test.
"""

from __future__ import annotations

import time

import pytest

from dra_core.kube.client import KubeClient
from dra_core.kube.retry import Backoff
from dra_core.model import Capacity, Device, Inventory, RequestPolicy, Taint, ValidRange, Version
from dra_core.slices.build import build_slices
from dra_core.slices.features import (
    ALL_KEPT,
    CONSUMABLE,
    PARTITIONABLE,
    TAINTS,
    Feature,
    safe_inventory,
)
from dra_core.slices.publisher import PublisherSettings, SlicePublisher
from dra_core.testing.scenario import create_ready_node
from tests.controlplane import helpers as h
from tests.slices.test_build import sriov_inventory

pytestmark = pytest.mark.controlplane

SETTINGS = PublisherSettings(resync_period=30.0, debounce=0.05, backoff=Backoff(delays=(0.1, 0.5)))
SLICES = f"{h.RESOURCE_API}/resourceslices"


@pytest.fixture
def node(kube_api, dra_kube_client):
    obj = create_ready_node(dra_kube_client, h.unique_name("node"))
    yield obj
    h.delete_node(kube_api, obj["metadata"]["name"])


@pytest.fixture
def driver() -> str:
    return f"{h.unique_name('drv')}.example.com"


@pytest.fixture
def publishers(kube_api, node, driver):
    """Make publishers for the test's node and driver; stopped and cleaned up afterwards."""
    made: list[SlicePublisher] = []

    def make(start: bool = True, settings: PublisherSettings = SETTINGS) -> SlicePublisher:
        pub = SlicePublisher(
            KubeClient(kube_api), driver, node["metadata"]["name"], settings=settings
        )
        made.append(pub)
        if start:
            pub.start()
        return pub

    yield make
    for pub in made:
        pub.stop()
    for s in published(kube_api, node, driver):
        h.delete_resource_slice(kube_api, s["metadata"]["name"])


def published(kube_api, node, driver) -> list[dict]:
    selector = f"spec.nodeName={node['metadata']['name']},spec.driver={driver}"
    items = h.get(kube_api, SLICES, query={"fieldSelector": selector})["items"]
    return sorted(items, key=lambda s: s["metadata"]["name"])


def needs(pub: SlicePublisher, *features: Feature) -> None:
    """Skip a test of a feature the session's API server lacks (its default gates)."""
    server = pub.server_features
    lacking = [f.gate for f in features if server is not None and not server.keeps(f)]
    if lacking:
        pytest.skip(
            f"the API server runs without {', '.join(lacking)}; "
            "tests/slices/test_features_controlplane.py covers publishing there"
        )


def expected_slices(pub: SlicePublisher, inventory: Inventory) -> list[dict]:
    """The slices the publisher should write for ``inventory`` on the session's API server."""
    server = pub.server_features or ALL_KEPT
    safe, _ = safe_inventory(inventory, server)
    return build_slices(
        pub.driver,
        pub.node_name,
        pub.pool_name,
        safe,
        1,
        **server.layout,
    )


def complete(slices: list[dict]) -> bool:
    """Consumers' view: all slices at one generation, as many as resourceSliceCount says."""
    if not slices:
        return False
    pools = {
        (s["spec"]["pool"]["generation"], s["spec"]["pool"]["resourceSliceCount"]) for s in slices
    }
    return len(pools) == 1 and next(iter(pools))[1] == len(slices)


def device_names(slices: list[dict]) -> list[str]:
    # A slice of counter sets only has `devices: null` (the server's JSON), not no key.
    return [d["name"] for s in slices for d in s["spec"].get("devices") or ()]


def small_inventory() -> Inventory:
    return Inventory(
        devices=(
            Device(
                name="gpu-0",
                attributes={
                    "type": "gpu",
                    "index": 0,
                    "sriov": False,
                    "driverVersion": Version("1.2.3"),
                    "resource.kubernetes.io/pciBusID": "0000:03:00.0",
                },
                capacity={"memory": Capacity("4096Mi")},
            ),
            Device(
                name="gpu-1",
                attributes={"type": "gpu", "index": 1},
                capacity={
                    "memory": Capacity(
                        "16Gi",
                        RequestPolicy(
                            default="16Gi", valid_range=ValidRange("512Mi", "16Gi", "512Mi")
                        ),
                    ),
                    "millicores": Capacity(
                        "1000", RequestPolicy(default="1000", valid_values=("500", "1000"))
                    ),
                },
                allow_multiple_allocations=True,
            ),
        )
    )


def test_small_inventory_accepted_and_steady(kube_api, node, driver, publishers):
    pub = publishers(start=False)
    pub.update(small_inventory())
    result = pub.sync_once()
    needs(pub, CONSUMABLE)
    assert result.created and result.generation == 1
    slices = published(kube_api, node, driver)
    # One slice; two where the shared device must head its own (the 1.34 scheduler).
    assert len(slices) == len(expected_slices(pub, small_inventory()))
    for body in slices:
        assert body["metadata"]["ownerReferences"][0]["uid"] == node["metadata"]["uid"]
        assert body["spec"]["pool"] == {
            "name": node["metadata"]["name"],
            "generation": 1,
            "resourceSliceCount": len(slices),
        }
    gpu0, gpu1 = [d for body in slices for d in body["spec"]["devices"]]
    assert gpu0["attributes"]["driverVersion"] == {"version": "1.2.3"}
    assert gpu0["capacity"]["memory"]["value"] == "4Gi"  # canonicalised by the server
    assert gpu1["allowMultipleAllocations"] is True
    assert gpu1["capacity"]["memory"]["requestPolicy"]["validRange"]["step"] == "512Mi"
    # The server's canonical quantities are not a difference.
    assert pub.sync_once().writes == 0


def test_512_devices_published_quickly_then_quiet(kube_api, node, driver, publishers, capsys):
    inventory = sriov_inventory(pfs=8, vfs=63)
    assert len(inventory.devices) == 512
    pub = publishers(start=False)
    pub.update(inventory)
    started = time.monotonic()
    pub.start()
    assert pub.wait_synced(30)
    slices = published(kube_api, node, driver)
    elapsed = time.monotonic() - started
    with capsys.disabled():
        print(
            f"\n[slices] 512 devices in {len(slices)} ResourceSlices: "
            f"start to all slices accepted in {elapsed:.3f} s"
        )
    assert complete(slices)
    expected = expected_slices(pub, inventory)
    assert device_names(slices) == device_names(expected)
    assert len(slices) == len(expected)
    server = pub.server_features
    assert server is not None
    if server == ALL_KEPT:
        assert len(slices) == 9  # 8 device slices of 64, 1 counter slice of 8 sets
        assert [len(s["spec"]["sharedCounters"]) for s in slices[-1:]] == [8]
        assert "devices" not in slices[-1]["spec"]
    # Steady state with the watch running: no writes at all.
    writes = pub.writes
    time.sleep(3)
    assert pub.writes == writes
    assert [s["metadata"]["resourceVersion"] for s in published(kube_api, node, driver)] == [
        s["metadata"]["resourceVersion"] for s in slices
    ]


def test_device_removed_and_added(kube_api, node, driver, publishers):
    full = sriov_inventory(pfs=2, vfs=40)  # 82 devices: 2 slices of 64 + 18, 1 counter slice
    pub = publishers()
    pub.update(full)
    assert pub.wait_synced(10)
    before = published(kube_api, node, driver)
    assert complete(before) and len(before) == len(expected_slices(pub, full))
    generation = before[0]["spec"]["pool"]["generation"]

    smaller = Inventory(
        devices=tuple(d for d in full.devices if d.name != "card0-vf5"),
        counter_sets=full.counter_sets,
    )
    pub.update(smaller)
    assert pub.wait_synced(10)
    after = published(kube_api, node, driver)
    assert complete(after)
    assert "card0-vf5" not in device_names(after)
    assert after[0]["spec"]["pool"]["generation"] == generation + 1  # membership moved

    pub.update(full)
    assert pub.wait_synced(10)
    again = published(kube_api, node, driver)
    assert complete(again)
    assert device_names(again) == device_names(expected_slices(pub, full))


def test_slice_deleted_or_edited_behind_our_back_is_restored(kube_api, node, driver, publishers):
    pub = publishers()
    pub.update(sriov_inventory(pfs=2, vfs=40))
    assert pub.wait_synced(10)
    slices = published(kube_api, node, driver)
    victim = slices[-1]["metadata"]["name"]
    if not slices[-1]["spec"].get("devices"):  # a counter slice: take the one before
        victim = slices[-2]["metadata"]["name"]

    h.delete_resource_slice(kube_api, victim)
    started = time.monotonic()
    h.wait_for(
        lambda: complete(published(kube_api, node, driver)), timeout=5, description="restored slice"
    )
    restored_in = time.monotonic() - started
    assert restored_in < 3, restored_in

    path = f"{SLICES}/{victim}"
    edited = h.get(kube_api, path)
    edited["spec"]["devices"][0]["attributes"]["type"] = {"string": "tampered"}
    h.request(kube_api, "PUT", path, edited)
    h.wait_for(
        lambda: (
            h.get(kube_api, path)["spec"]["devices"][0]["attributes"]["type"] == {"string": "vf"}
        ),
        timeout=5,
        description="edited slice repaired",
    )

    # The kubelet's wipe at its start: every slice of the node goes.
    for s in published(kube_api, node, driver):
        h.delete_resource_slice(kube_api, s["metadata"]["name"])
    h.wait_for(
        lambda: (
            len(published(kube_api, node, driver)) == len(slices)
            and complete(published(kube_api, node, driver))
        ),
        timeout=5,
        description="slices republished after a wipe",
    )


def test_tainted_devices_published(kube_api, node, driver, publishers):
    pub = publishers(start=False)
    pub.update(
        Inventory(
            devices=(
                Device(
                    name="gpu-0", taints=(Taint("example.com/unhealthy", "NoSchedule", "wedged"),)
                ),
                Device(name="gpu-1"),
            )
        )
    )
    pub.sync_once()
    needs(pub, TAINTS)
    (body,) = published(kube_api, node, driver)
    taint = body["spec"]["devices"][0]["taints"][0]
    assert (taint["key"], taint["value"], taint["effect"]) == (
        "example.com/unhealthy",
        "wedged",
        "NoSchedule",
    )
    assert taint.get("timeAdded")  # stamped by the server; not a difference for us
    assert pub.sync_once().writes == 0
    assert not pub.dropped_fields


def _claim_and_pod(kube_api, namespace, name, device_class, selectors=()):
    h.create_resource_claim(
        kube_api, namespace, h.resource_claim_body(name, device_class, selectors=selectors)
    )
    h.create_pod(
        kube_api, namespace, h.pod_body(name, [{"name": "dev", "resourceClaimName": name}])
    )


def _allocated(kube_api, namespace, name) -> list[str]:
    claim = h.get_resource_claim(kube_api, namespace, name)
    results = claim.get("status", {}).get("allocation", {}).get("devices", {}).get("results", [])
    return [r["device"] for r in results]


def test_scheduler_allocates_but_not_tainted_devices(kube_api, namespace, node, driver, publishers):
    device_class = h.unique_name("class")
    h.create_device_class(kube_api, device_class, driver)
    try:
        pub = publishers()
        pub.update(
            Inventory(
                devices=(  # the tainted one first: first fit would take it if taints were ignored
                    Device(name="gpu-0", taints=(Taint("example.com/unhealthy", "NoSchedule"),)),
                    Device(name="gpu-1"),
                )
            )
        )
        assert pub.wait_synced(10)
        _claim_and_pod(kube_api, namespace, "first", device_class)
        h.wait_for_claim_allocated(kube_api, namespace, "first", timeout=30)
        assert _allocated(kube_api, namespace, "first") == ["gpu-1"]
        pod = h.wait_for_pod_scheduled(kube_api, namespace, "first", timeout=30)
        assert pod["spec"]["nodeName"] == node["metadata"]["name"]

        # Only the tainted device is left: the next claim stays unallocated.
        _claim_and_pod(kube_api, namespace, "second", device_class)
        time.sleep(3)
        assert _allocated(kube_api, namespace, "second") == []

        # Health recovers: the taint goes away and the waiting claim gets the device.
        pub.update(Inventory(devices=(Device(name="gpu-0"), Device(name="gpu-1"))))
        assert pub.wait_synced(10)
        h.wait_for_claim_allocated(kube_api, namespace, "second", timeout=60)
        assert _allocated(kube_api, namespace, "second") == ["gpu-0"]
    finally:
        h.delete_device_class(kube_api, device_class)


def test_partitionable_device_counters_enforced(kube_api, namespace, node, driver, publishers):
    device_class = h.unique_name("class")
    h.create_device_class(kube_api, device_class, driver)
    try:
        pub = publishers()
        pub.update(sriov_inventory(pfs=1, vfs=2))  # card0-vf0, card0-vf1, card0 (the whole PF)
        assert pub.wait_synced(10)
        needs(pub, PARTITIONABLE)
        slices = published(kube_api, node, driver)
        beside = pub.server_features is not None and pub.server_features.counters_beside_devices
        assert complete(slices) and len(slices) == (1 if beside else 2)
        assert not pub.dropped_fields

        whole = [f'device.attributes["{driver}"].type == "gpu"']
        vf = [f'device.attributes["{driver}"].type == "vf"']
        _claim_and_pod(kube_api, namespace, "whole", device_class, whole)
        h.wait_for_claim_allocated(kube_api, namespace, "whole", timeout=30)
        assert _allocated(kube_api, namespace, "whole") == ["card0"]

        # The PF took every counter: no VF can be allocated.
        _claim_and_pod(kube_api, namespace, "vf", device_class, vf)
        time.sleep(3)
        assert _allocated(kube_api, namespace, "vf") == []
    finally:
        h.delete_device_class(kube_api, device_class)


# ---------------------------------------------------------------------------- request counts


def apiserver_requests(kube_api) -> dict[tuple[str, str], int]:
    """``apiserver_request_total`` from the API server's own /metrics, by (verb, resource)."""
    _, url, headers, _, _ = kube_api.param_serialize(
        method="GET",
        resource_path="/metrics",
        header_params={"Accept": "text/plain"},
        auth_settings=["BearerToken"],
    )
    response = kube_api.call_api("GET", url, header_params=headers, _request_timeout=30)
    text = response.read().decode()
    totals: dict[tuple[str, str], int] = {}
    for line in text.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels_text, value = line[len("apiserver_request_total{") :].rsplit("} ", 1)
        labels = dict(item.split("=", 1) for item in labels_text.split('",') if "=" in item)
        labels = {k: v.strip('"') for k, v in labels.items()}
        if labels.get("subresource"):
            continue
        key = (labels.get("verb", ""), labels.get("resource", ""))
        totals[key] = totals.get(key, 0) + int(float(value))
    return totals


def delta(after: dict, before: dict, verb: str, resource: str) -> int:
    return after.get((verb, resource), 0) - before.get((verb, resource), 0)


def test_start_costs_one_list_and_one_node_read_then_nothing_at_rest(
    kube_api, node, driver, publishers, capsys
):
    """Start: one LIST of the node's slices, one GET of the Node, the watch, the creates, and
    (as the inventory uses counters) one dry-run create asking what the server keeps (two on
    1.34 with partitionable devices on, whose first refuses counters apart from devices).
    At rest (here five periods of the comparison timer): no request at all."""
    settings = PublisherSettings(
        resync_period=1.0, debounce=0.05, backoff=Backoff(delays=(0.1, 0.5))
    )
    pub = publishers(start=False, settings=settings)
    client = pub.client
    before = apiserver_requests(kube_api)
    pub.update(sriov_inventory(pfs=2, vfs=7))
    pub.start()
    assert pub.wait_synced(30.0)
    h.wait_for(lambda: pub.syncs >= 1 and client.request_count("watch") == 1, 10, "watch")
    time.sleep(1.0)  # the echoes of our own writes arrive
    started = client.requests_by_verb()
    mid = apiserver_requests(kube_api)
    slices = len(published(kube_api, node, driver))  # one LIST of the test's own
    server = pub.server_features
    assert server is not None
    dry_runs = 2 if server.counters_beside_devices else 1
    # The Node, and the version where the server keeps taints or shares (their 1.34 limits).
    gets = 1 + (server.keeps(TAINTS) or server.keeps(CONSUMABLE))
    assert started == {"list": 1, "get": gets, "watch": 1, "create": slices + dry_runs}, started
    assert client.request_count("get", "nodes") == 1
    time.sleep(5.0)
    assert client.requests_by_verb() == started, "requests at rest"
    after = apiserver_requests(kube_api)
    server_start = {
        "LIST resourceslices": delta(mid, before, "LIST", "resourceslices"),
        "GET nodes": delta(mid, before, "GET", "nodes"),
        "POST resourceslices": delta(mid, before, "POST", "resourceslices"),
    }
    server_idle = {
        "LIST resourceslices": delta(after, mid, "LIST", "resourceslices") - 1,
        "GET nodes": delta(after, mid, "GET", "nodes"),
        "PUT resourceslices": delta(after, mid, "PUT", "resourceslices"),
    }
    with capsys.disabled():
        print(f"\n[slices] start, API server's count: {server_start}; idle 5 s: {server_idle}")
    # The API server counts every client; nobody else lists this node's slices or reads it.
    assert server_start["LIST resourceslices"] == 1
    assert server_start["GET nodes"] == 1
    assert server_start["POST resourceslices"] == slices + dry_runs
    assert server_idle == {"LIST resourceslices": 0, "GET nodes": 0, "PUT resourceslices": 0}
    assert pub.writes == slices
