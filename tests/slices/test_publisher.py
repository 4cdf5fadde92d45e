"""Unit tests of the ResourceSlice publisher against an in-memory API server."""

from __future__ import annotations

import dataclasses
import time

import pytest

from dra_core import metrics
from dra_core.kube.client import ApiError
from dra_core.kube.retry import Backoff
from dra_core.model import Capacity, Device, Inventory, ModelError, RequestPolicy, Taint
from dra_core.slices.publisher import PublisherSettings, SlicePublisher
from dra_core.testing.fakeapi import SLICES, FakeApi
from tests.slices.test_build import plain, sriov_inventory

DRIVER = "gpu.example.com"
NODE = "node-1"
FAST = PublisherSettings(
    resync_period=0.2, debounce=0.05, backoff=Backoff(delays=(0.01, 0.02)), watch=False
)


def publisher(api: FakeApi, settings: PublisherSettings = FAST, **kw) -> SlicePublisher:
    return SlicePublisher(api, DRIVER, NODE, settings=settings, **kw)  # type: ignore[arg-type]


def generations(api: FakeApi) -> set[int]:
    return {s["spec"]["pool"]["generation"] for s in api.slices.values()}


def names_in(api: FakeApi) -> list[list[str]]:
    return [[d["name"] for d in s["spec"].get("devices", ())] for s in api.pool_slices()]


@pytest.fixture
def api() -> FakeApi:
    fake = FakeApi()
    fake.nodes[NODE] = "node-uid-1"
    return fake


def test_nothing_before_the_first_update(api):
    pub = publisher(api)
    result = pub.sync_once()
    assert result.writes == 0
    assert api.log == []


def test_first_sync_creates_then_steady_state_writes_nothing(api):
    pub = publisher(api)
    pub.update(sriov_inventory(pfs=2, vfs=3))
    result = pub.sync_once()
    assert result.generation == 1
    assert len(result.created) == result.slices == 2
    assert pub.writes == 2
    for body in api.slices.values():
        assert body["metadata"]["ownerReferences"][0]["uid"] == "node-uid-1"
        assert body["spec"]["pool"] == {"name": NODE, "generation": 1, "resourceSliceCount": 2}
    again = pub.sync_once()
    assert again.writes == 0 and pub.writes == 2


def test_server_normalisation_is_not_a_change(api):
    device = Device(
        name="gpu0",
        capacity={"memory": Capacity("4096Mi", RequestPolicy(default="1024Mi"))},
        taints=(Taint("example.com/unhealthy", "NoSchedule"),),
        allow_multiple_allocations=True,
    )
    pub = publisher(api)
    pub.update(Inventory(devices=(device,)))
    pub.sync_once()
    (stored,) = api.slices.values()
    assert stored["spec"]["devices"][0]["capacity"]["memory"]["value"] == "4Gi"
    assert "timeAdded" in stored["spec"]["devices"][0]["taints"][0]
    assert pub.sync_once().writes == 0


def test_attribute_change_updates_in_place_same_generation(api):
    pub = publisher(api)
    inv = Inventory(devices=plain(200))
    pub.update(inv)
    pub.sync_once()
    devices = list(inv.devices)
    devices[150] = Device(name="dev150", attributes={"index": 999})
    pub.update(Inventory(devices=tuple(devices)))
    result = pub.sync_once()
    assert result.updated == ("node-1-gpu-example-com-00001",)
    assert result.created == result.deleted == ()
    assert result.generation == 1 and generations(api) == {1}


def test_taint_updates_in_place_when_membership_holds(api):
    pub = publisher(api)
    inv = sriov_inventory(pfs=1, vfs=3)
    pub.update(inv)
    pub.sync_once()
    tainted = tuple(
        dataclasses.replace(d, taints=(Taint("example.com/unhealthy", "NoExecute"),))
        if d.name == "card0"
        else d
        for d in inv.devices
    )
    pub.update(Inventory(devices=tainted, counter_sets=inv.counter_sets))
    result = pub.sync_once()
    assert result.writes == 1 and result.generation == 1
    pub.update(inv)  # recovered: the taint goes away
    assert pub.sync_once().writes == 1
    assert "taints" not in api.slices["node-1-gpu-example-com-00000"]["spec"]["devices"][-1]


def test_shape_change_bumps_generation_writes_all_then_deletes(api):
    pub = publisher(api)
    pub.update(Inventory(devices=plain(300)))  # 128 + 128 + 44
    pub.sync_once()
    assert len(api.slices) == 3
    api.log.clear()
    pub.update(Inventory(devices=plain(250)))  # 128 + 122
    result = pub.sync_once()
    assert result.generation == 2
    assert set(result.updated) == {"node-1-gpu-example-com-00000", "node-1-gpu-example-com-00001"}
    assert result.deleted == ("node-1-gpu-example-com-00002",)
    # Every new-generation write comes before the delete of the leftover.
    writes = api.writes()
    assert writes[-1] == ("DELETE", f"{SLICES}/node-1-gpu-example-com-00002")
    assert all(m == "PUT" for m, _ in writes[:-1])
    assert generations(api) == {2}
    assert all(s["spec"]["pool"]["resourceSliceCount"] == 2 for s in api.slices.values())


def test_device_moving_between_slices_bumps_generation(api):
    pub = publisher(api)
    pub.update(Inventory(devices=plain(200)))
    pub.sync_once()
    devices = [d for d in plain(200) if d.name != "dev3"]  # everything after shifts
    pub.update(Inventory(devices=tuple(devices)))
    result = pub.sync_once()
    assert result.generation == 2 and len(result.updated) == 2
    assert names_in(api)[1][0] == "dev129"


def test_deleted_slice_recreated_at_same_generation(api):
    pub = publisher(api)
    pub.update(Inventory(devices=plain(300)))
    pub.sync_once()
    del api.slices["node-1-gpu-example-com-00001"]
    result = pub.sync_once()
    assert result.created == ("node-1-gpu-example-com-00001",)
    assert result.writes == 1 and generations(api) == {1}


def test_kubelet_wipe_republishes_everything(api):
    pub = publisher(api)
    pub.update(Inventory(devices=plain(300)))
    pub.sync_once()
    api.slices.clear()
    result = pub.sync_once()
    assert len(result.created) == 3


def test_edited_slice_restored_keeping_foreign_labels(api):
    pub = publisher(api)
    pub.update(Inventory(devices=plain(2)))
    pub.sync_once()
    (name,) = api.slices
    edited = api.slices[name]
    edited["spec"]["devices"][0]["attributes"]["index"] = {"int": 42}
    edited["metadata"]["labels"]["someone"] = "else"
    api.put_raw(edited)
    assert pub.sync_once().updated == (name,)
    restored = api.slices[name]
    assert restored["spec"]["devices"][0]["attributes"]["index"] == {"int": 0}
    assert restored["metadata"]["labels"]["someone"] == "else"
    assert pub.sync_once().writes == 0


def test_restart_continues_generation_and_writes_nothing(api):
    first = publisher(api)
    first.update(Inventory(devices=plain(300)))
    first.sync_once()
    first.update(Inventory(devices=plain(200)))
    first.sync_once()  # generation 2
    second = publisher(api)
    second.update(Inventory(devices=plain(200)))
    result = second.sync_once()
    assert result.writes == 0 and result.generation == 2
    second.update(Inventory(devices=plain(10)))
    assert second.sync_once().generation == 3


def test_foreign_and_stale_slices_deleted(api):
    pub = publisher(api)
    api.put_raw(
        {
            "metadata": {"name": "old-pool-slice", "labels": {}},
            "spec": {
                "driver": DRIVER,
                "nodeName": NODE,
                "pool": {"name": "old-pool", "generation": 9, "resourceSliceCount": 1},
                "devices": [{"name": "x"}],
            },
        }
    )
    api.put_raw(
        {
            "metadata": {"name": "other-driver", "labels": {}},
            "spec": {
                "driver": "other.example.com",
                "nodeName": NODE,
                "pool": {"name": NODE, "generation": 1, "resourceSliceCount": 1},
            },
        }
    )
    pub.update(Inventory(devices=plain(1)))
    result = pub.sync_once()
    assert result.deleted == ("old-pool-slice",)
    assert "other-driver" in api.slices
    # Another pool's generation does not count for ours.
    assert result.generation == 1


def test_empty_inventory_deletes_all(api):
    pub = publisher(api)
    pub.update(Inventory(devices=plain(300)))
    pub.sync_once()
    pub.update(Inventory())
    result = pub.sync_once()
    assert len(result.deleted) == 3 and api.slices == {}
    assert pub.sync_once().writes == 0


def test_conflict_rereads_and_retries(api):
    pub = publisher(api)
    pub.update(Inventory(devices=plain(2)))
    pub.sync_once()
    (name,) = api.slices
    hits = []

    def concurrent_edit(method, slice_name):
        if method == "PUT" and not hits:
            hits.append(1)
            obj = api.slices[slice_name]
            obj["metadata"]["labels"]["touched"] = "yes"
            api.put_raw(obj)  # bumps the resourceVersion under the publisher's feet

    api.before_write = concurrent_edit
    pub.update(Inventory(devices=plain(3)))
    result = pub.sync_once()
    assert result.updated == (name,)
    assert [d["name"] for d in api.slices[name]["spec"]["devices"]] == ["dev0", "dev1", "dev2"]
    assert api.slices[name]["metadata"]["labels"]["touched"] == "yes"


def test_create_conflict_becomes_update(api):
    pub = publisher(api)
    pub.update(Inventory(devices=plain(2)))

    def racing_create(method, name):
        if method == "POST" and name not in api.slices:
            api.put_raw(
                {
                    "metadata": {"name": name, "labels": {}},
                    "spec": {"driver": DRIVER, "nodeName": NODE, "pool": {"name": NODE}},
                }
            )

    api.before_write = racing_create
    result = pub.sync_once()
    assert result.updated == ("node-1-gpu-example-com-00000",)
    assert len(api.slices["node-1-gpu-example-com-00000"]["spec"]["devices"]) == 2


def test_retriable_errors_retried_within_a_sync(api):
    pub = publisher(api)
    pub.update(Inventory(devices=plain(2)))
    api.failures = [ApiError("GET", SLICES, 503, "busy"), ApiError("POST", SLICES, 0, "down")]
    assert pub.sync_once().created == ("node-1-gpu-example-com-00000",)


def test_persistent_outage_raises_and_counts(api):
    pub = publisher(api)
    pub.update(Inventory(devices=plain(2)))
    before = metrics.PUBLISH_ERRORS._value.get()
    api.failures = [ApiError("GET", "/x", 0, "down")] * 10
    with pytest.raises(ApiError):
        pub.sync_once()
    assert metrics.PUBLISH_ERRORS._value.get() == before + 1


def test_missing_node_publishes_without_owner(api, caplog_loguru):
    api.nodes.clear()
    pub = publisher(api)
    pub.update(Inventory(devices=plain(1)))
    pub.sync_once()
    (body,) = api.slices.values()
    assert "ownerReferences" not in body["metadata"]
    assert any("without an owner reference" in m for m in caplog_loguru)


def test_fields_dropped_under_a_running_agent_are_learned_without_a_write_loop(caplog_loguru):
    """A gate turned off after the agent asked: the write's answer shows the loss, the
    publisher leaves out what needs the field and settles, without asking again."""
    api = FakeApi()
    api.nodes[NODE] = "uid"
    pub = publisher(api)
    inv = sriov_inventory(pfs=1, vfs=2)  # card0-vf0, card0-vf1, card0
    pub.update(inv)
    pub.sync_once()
    assert not pub.dropped_fields
    api.gates_off = {"DRAPartitionableDevices"}
    pub.update(Inventory(devices=inv.devices[:-1], counter_sets=inv.counter_sets))
    before = metrics.PUBLISH_ERRORS._value.get()
    pub.sync_once()  # the update comes back without consumesCounters
    assert pub.dropped_fields == {"consumesCounters", "sharedCounters"}
    assert metrics.PUBLISH_ERRORS._value.get() == before + 1
    assert any("although it kept them when asked" in m for m in caplog_loguru)
    pub.sync_once()  # now published as safe without counters: both VFs fit the PF's counters
    assert names_in(api) == [["card0-vf0", "card0-vf1"]]
    assert not any(s["spec"].get("sharedCounters") for s in api.slices.values())
    assert pub.sync_once().writes == 0
    assert pub.sync_once().writes == 0
    assert [m for m, _ in api.log].count("DRYRUN") == 1


def test_update_validates(api):
    pub = publisher(api)
    with pytest.raises(ModelError, match="device 'Bad_Name'"):
        pub.update(Inventory(devices=(Device(name="Bad_Name"),)))


def test_metrics_updated(api):
    pub = publisher(api)
    pub.update(sriov_inventory(pfs=2, vfs=3))
    creates = metrics.API_WRITES.labels("create")._value.get()
    pub.sync_once()
    assert metrics.PUBLISHED_DEVICES._value.get() == 8
    assert metrics.PUBLISHED_SLICES._value.get() == 2
    assert metrics.API_WRITES.labels("create")._value.get() == creates + 2
    assert b"dra_publish_seconds_bucket" in metrics.render()


def test_thread_debounces_bursts_and_repairs_drift(api):
    pub = publisher(api)
    pub.update(Inventory(devices=plain(1)))
    pub.start()
    try:
        assert pub.wait_synced(5)
        api.log.clear()
        for n in range(2, 12):  # a burst: only the last state is written
            pub.update(Inventory(devices=plain(n)))
        assert pub.wait_synced(5)
        assert [d["name"] for d in api.pool_slices()[0]["spec"]["devices"]][-1] == "dev10"
        assert len(api.writes()) == 1
        api.slices.clear()  # drift, found by the periodic resync (no watch here)
        deadline = time.monotonic() + 5
        while not api.slices and time.monotonic() < deadline:
            time.sleep(0.02)
        assert api.slices
    finally:
        pub.stop()


def test_thread_survives_an_outage(api):
    pub = publisher(api)
    api.failures = [ApiError("GET", SLICES, 0, "down")] * 30
    pub.update(Inventory(devices=plain(1)))
    pub.start()
    try:
        assert pub.wait_synced(10)
        assert api.slices
    finally:
        pub.stop()
    assert not any(t.is_alive() for t in pub._threads)


def test_start_twice_rejected(api):
    pub = publisher(api)
    pub.start()
    try:
        with pytest.raises(RuntimeError):
            pub.start()
    finally:
        pub.stop()
