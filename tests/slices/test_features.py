"""What is safe to publish on an API server lacking a feature, the 1.34 counter layout, and
how the publisher asks the server (against the in-memory API server)."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from dra_core import metrics
from dra_core.health import HealthTracker
from dra_core.kubelet.health import HealthBoard
from dra_core.model import (
    LIMITS,
    Capacity,
    CounterConsumption,
    CounterSet,
    Device,
    DeviceHealth,
    Inventory,
    ModelError,
    RequestPolicy,
    Taint,
    ValidRange,
    validate_inventory,
)
from dra_core.quantity import parse_quantity
from dra_core.releases import gates_on
from dra_core.slices.build import build_slices, split_beside
from dra_core.slices.features import (
    ALL_KEPT,
    BIG_COUNTER_GROUPS,
    CONSUMABLE,
    PARTITIONABLE,
    TAINTS,
    ServerFeatures,
    probe,
    release_features,
    safe_inventory,
    used_fields,
)
from dra_core.testing.fakeapi import FakeApi
from tests.slices.test_build import DRIVER, NODE, plain, sriov_inventory
from tests.slices.test_publisher import names_in, publisher

NO_COUNTERS = ALL_KEPT.dropping(["consumesCounters"])
NO_SHARING = ALL_KEPT.dropping(["allowMultipleAllocations"])
NO_TAINTS = ALL_KEPT.dropping(["taints"])
NOTHING = ALL_KEPT.dropping(["consumesCounters", "allowMultipleAllocations", "taints"])
#: Kubernetes 1.34 with the DRA gates on.
BESIDE = ServerFeatures(
    counters_beside_devices=True, taints_per_device=4, shared_devices_first=True
)
UNHEALTHY = (Taint("dra-core.dev/unhealthy", "NoSchedule"),)


def partitioned(name: str = "big-0", parts: int = 4, whole_first: bool = True) -> Inventory:
    """A device of 16Gi in ``parts`` partitions, as the fake backend models it."""
    total = {"memory": "16Gi", "partitions": str(parts)}
    each = {"memory": f"{16 * 1024 // parts}Mi", "partitions": "1"}
    whole = Device(name, consumes_counters=(CounterConsumption(name, total),))
    partitions = [
        Device(f"{name}-p{i}", consumes_counters=(CounterConsumption(name, each),))
        for i in range(parts)
    ]
    devices = [whole, *partitions] if whole_first else [*partitions, whole]
    return Inventory(tuple(devices), (CounterSet(name, total),))


def shared(name: str = "shared-0", exclusive: bool = False) -> Device:
    policy = RequestPolicy("1Gi", valid_range=ValidRange("512Mi", step="512Mi"))
    return Device(
        name,
        capacity={"memory": Capacity("8Gi", policy)},
        allow_multiple_allocations=True,
        exclusive_without_sharing=exclusive,
    )


def names(inventory: Inventory) -> list[str]:
    return [d.name for d in inventory.devices]


# ---------------------------------------------------------------------------- the rule


def test_a_server_keeping_everything_changes_nothing():
    inventory = Inventory(
        (*plain(2), shared(), Device("sick", taints=UNHEALTHY), *partitioned().devices),
        partitioned().counter_sets,
    )
    assert safe_inventory(inventory, ALL_KEPT) == (inventory, ())


def test_without_counters_the_whole_device_listed_first_stays_and_its_partitions_go():
    big = partitioned()
    inventory = Inventory((*plain(2), *big.devices), big.counter_sets)
    published, left_out = safe_inventory(inventory, NO_COUNTERS)
    assert names(published) == ["dev0", "dev1", "big-0"]
    assert published.counter_sets == ()
    assert all(not d.consumes_counters for d in published.devices)
    ((feature, out),) = [(e.feature, e.devices) for e in left_out]
    assert (feature, out) == (PARTITIONABLE, ("big-0-p0", "big-0-p1", "big-0-p2", "big-0-p3"))


def test_without_counters_the_order_decides_partitions_listed_first_stay():
    published, _ = safe_inventory(partitioned(whole_first=False), NO_COUNTERS)
    assert names(published) == ["big-0-p0", "big-0-p1", "big-0-p2", "big-0-p3"]


def test_without_counters_vfs_that_fit_together_stay_and_their_pf_goes():
    published, left_out = safe_inventory(sriov_inventory(pfs=2, vfs=3), NO_COUNTERS)
    assert names(published) == [f"card{p}-vf{v}" for p in range(2) for v in range(3)]
    assert left_out[0].devices == ("card0", "card1")


def test_without_counters_any_two_published_devices_can_be_allocated_together():
    """Whatever the order, the kept devices' summed consumption fits every counter set, so
    the scheduler (which no longer sees counters) cannot over-commit one."""
    base = partitioned(parts=2)
    vf_set = CounterSet("pf", {"vfs": "2", "memory": "4Gi"})
    two_sets = Device(
        "both",
        consumes_counters=(
            CounterConsumption("big-0", {"partitions": "1"}),
            CounterConsumption("pf", {"vfs": "1"}),
        ),
    )
    vfs = [
        Device(f"vf{i}", consumes_counters=(CounterConsumption("pf", {"vfs": "1", "memory": m}),))
        for i, m in enumerate(("1Gi", "3Gi"))
    ]
    sets = {s.name: s for s in (*base.counter_sets, vf_set)}
    for order in itertools.permutations([*base.devices, two_sets, *vfs]):
        original = {d.name: d for d in order}
        published, _ = safe_inventory(Inventory(tuple(order), tuple(sets.values())), NO_COUNTERS)
        used: dict[tuple[str, str], object] = {}
        for device in published.devices:
            for c in original[device.name].consumes_counters:
                for counter, value in c.counters.items():
                    key = (c.counter_set, counter)
                    used[key] = used.get(key, 0) + parse_quantity(value)  # type: ignore[operator]
        for (name, counter), amount in used.items():
            assert amount <= parse_quantity(sets[name].counters[counter]), (order, name)


def test_without_sharing_shared_devices_go_unless_the_backend_publishes_them_exclusive():
    inventory = Inventory((*plain(1), shared("s0"), shared("s1", exclusive=True)))
    published, left_out = safe_inventory(inventory, NO_SHARING)
    assert names(published) == ["dev0", "s1"]
    s1 = published.devices[1]
    assert not s1.allow_multiple_allocations
    assert s1.capacity == {"memory": Capacity("8Gi")}  # no request policy without sharing
    ((entry),) = left_out
    assert (entry.feature, entry.devices, entry.exclusive) == (CONSUMABLE, ("s0",), ("s1",))
    assert used_fields(published) == set()


def test_without_taints_unhealthy_devices_go_and_harmless_taints_are_dropped():
    inventory = Inventory(
        (
            Device("sick", taints=UNHEALTHY),
            Device("noted", taints=(Taint("example.com/note", "None"),)),
            *plain(1),
        )
    )
    published, left_out = safe_inventory(inventory, NO_TAINTS)
    assert names(published) == ["noted", "dev0"]
    assert used_fields(published) == set()
    assert [(e.feature, e.devices) for e in left_out] == [(TAINTS, ("sick",))]


def test_an_unhealthy_whole_device_still_keeps_its_partitions_out():
    """It may be in use: its partitions must not become allocatable beside it."""
    base = partitioned()
    sick = dataclasses.replace(base.devices[0], taints=UNHEALTHY)
    inventory = Inventory((sick, *base.devices[1:]), base.counter_sets)
    published, left_out = safe_inventory(inventory, NOTHING)
    assert names(published) == []
    assert {e.feature for e in left_out} == {PARTITIONABLE, TAINTS}


def test_dropping_one_field_drops_its_whole_gate():
    assert ALL_KEPT.dropping(["requestPolicy"]).dropped == {
        "allowMultipleAllocations",
        "requestPolicy",
    }
    assert not NO_COUNTERS.keeps(PARTITIONABLE) and NO_COUNTERS.keeps(TAINTS)


# ---------------------------------------------------------------------------- 1.34 layout


def test_counters_beside_devices_share_slices_with_the_devices_that_consume_them():
    inventory = Inventory(
        (*plain(2), *sriov_inventory(pfs=2, vfs=2).devices),
        sriov_inventory(pfs=2, vfs=2).counter_sets,
    )
    slices = build_slices(DRIVER, NODE, NODE, inventory, 1, counters_beside_devices=True)
    (body,) = slices  # everything fits one 1.34 slice
    assert [d["name"] for d in body["spec"]["devices"]] == names(inventory)
    assert [s["name"] for s in body["spec"]["sharedCounters"]] == ["card0", "card1"]


def test_counters_beside_devices_split_by_linked_units_within_the_limits():
    # 20 PFs of 3 VFs: 80 devices, 40 counters: 16 PFs fill a slice's 32 counters and 64
    # devices, the other 4 go in a second; never a PF apart from its VFs.
    inventory = sriov_inventory(pfs=20, vfs=3)
    chunks = split_beside(inventory)
    assert [len(devices) for devices, _ in chunks] == [64, 16]
    for devices, sets in chunks:
        consumed = {c.counter_set for d in devices for c in d.consumes_counters}
        assert consumed == {s.name for s in sets}
        assert len(devices) <= 64 and sum(len(s.counters) for s in sets) <= 32
    assert [d.name for devices, _ in chunks for d in devices] == names(inventory)


def test_a_device_consuming_two_sets_joins_their_units():
    a, b = partitioned("a", 2), partitioned("b", 2)
    bridge = Device(
        "bridge",
        consumes_counters=(
            CounterConsumption("a", {"partitions": "1"}),
            CounterConsumption("b", {"partitions": "1"}),
        ),
    )
    inventory = Inventory(
        (*a.devices, *plain(1), *b.devices, bridge), (*a.counter_sets, *b.counter_sets)
    )
    ((devices, sets),) = split_beside(inventory)
    # One unit where its first device is, then the plain device.
    assert [d.name for d in devices] == ["a", "a-p0", "a-p1", "b", "b-p0", "b-p1", "bridge", "dev0"]
    assert [s.name for s in sets] == ["a", "b"]


def test_a_unit_too_big_for_one_1_34_slice_is_a_clear_error():
    with pytest.raises(ModelError, match=r"share counter sets \['card0'\].*Kubernetes 1\.35"):
        split_beside(sriov_inventory(pfs=1, vfs=64))


@pytest.mark.parametrize("beside", [False, True])
def test_on_1_34_each_shared_device_starts_a_slice(beside):
    # The 1.34 scheduler checks a share against the first device of the slice: a shared device
    # anywhere else gets no share.
    big = partitioned()
    inventory = Inventory((*plain(2), shared("s0"), shared("s1"), *big.devices), big.counter_sets)
    slices = build_slices(
        DRIVER, NODE, NODE, inventory, 1, counters_beside_devices=beside, shared_devices_first=True
    )
    heads = [s["spec"]["devices"][0]["name"] for s in slices if s["spec"].get("devices")]
    assert heads == ["dev0", "s0", "s1"]
    placed = [d["name"] for s in slices for d in s["spec"].get("devices") or ()]
    assert placed == names(inventory)
    assert len(build_slices(DRIVER, NODE, NODE, inventory, 1, counters_beside_devices=beside)) < (
        len(slices)
    )


def test_on_1_34_the_devices_of_a_group_beyond_one_slice_are_left_out_the_rest_published():
    # A PF with 64 VFs and another with 2: 65 linked devices do not fit 1.34's 64, so the
    # last VF of the first group stays out; the other group is untouched.
    inventory = sriov_inventory(pfs=2, vfs=64)
    inventory = Inventory(inventory.devices[:67], inventory.counter_sets)
    published, left_out = safe_inventory(inventory, BESIDE)
    ((feature, out),) = [(e.feature, e.devices) for e in left_out]
    assert feature == BIG_COUNTER_GROUPS and feature.gate == "DRAPartitionableDevices"
    assert out == (inventory.devices[64].name,)
    assert names(published) == [d.name for d in inventory.devices if d.name not in out]
    slices = build_slices(DRIVER, NODE, NODE, published, 1, counters_beside_devices=True)
    assert [len(s["spec"]["devices"]) for s in slices] == [64, 2]
    assert safe_inventory(inventory, ALL_KEPT) == (inventory, ())  # 1.35+: slices of their own


def test_on_1_34_counter_sets_too_big_for_one_slice_go_with_their_devices():
    # Two sets of 20 counters one device consumes both of: 40 counters > 1.34's 32.
    sets = tuple(CounterSet(n, {f"c{i}": "1" for i in range(20)}) for n in ("a", "b"))
    both = Device(
        "both", consumes_counters=tuple(CounterConsumption(s.name, {"c0": "1"}) for s in sets)
    )
    published, left_out = safe_inventory(Inventory((*plain(1), both), sets), BESIDE)
    assert published == Inventory(plain(1))
    assert [e.devices for e in left_out] == [("both",)]


def test_on_1_34_devices_with_more_than_four_taints_are_left_out():
    many = tuple(Taint(f"dra-core.dev/t{i}", "NoSchedule") for i in range(5))
    inventory = Inventory((Device("many", taints=many), Device("four", taints=many[:4])))
    published, left_out = safe_inventory(inventory, BESIDE)
    assert names(published) == ["four"]
    ((entry),) = left_out
    assert entry.devices == ("many",) and entry.feature.gate == "DRADeviceTaints"
    assert "at most 4 taints" in entry.feature.why
    assert safe_inventory(inventory, ALL_KEPT) == (inventory, ())


@pytest.mark.parametrize("server", [ALL_KEPT, BESIDE], ids=["1.35+", "1.34"])
def test_the_health_taint_counts_against_the_taint_limit(server):
    # Discovery checks the backend's taints (16 pass); the core's health taint comes on top.
    limit = server.taints_per_device or LIMITS.taints_per_device
    backend = tuple(Taint(f"example.com/t{i}", "None") for i in range(limit))
    inventory = Inventory((Device("full", taints=backend), *plain(1)))
    validate_inventory(inventory)
    board = HealthBoard()
    sick = DeviceHealth("full", healthy=False, message="overheating")
    tainted = HealthTracker(DRIVER, NODE, board).update(inventory, [sick])
    assert len(tainted.devices[0].taints) == limit + 1
    published, left_out = safe_inventory(tainted, server)
    assert names(published) == ["dev0"]
    ((entry),) = left_out
    assert entry.devices == ("full",) and entry.feature.gate == "DRADeviceTaints"
    assert f"at most {limit} taints" in entry.feature.why
    assert safe_inventory(inventory, server) == (inventory, ())  # healthy: all published


# ---------------------------------------------------------------------------- asking


def test_probe_on_a_server_keeping_everything_costs_one_dry_run_and_a_version_read():
    api = FakeApi()
    assert probe(api, DRIVER, NODE) == ALL_KEPT  # type: ignore[arg-type]
    # The version says how many taints a device may carry (a limit, not a gate).
    assert api.log == [("DRYRUN", "/apis/resource.k8s.io/v1/resourceslices"), ("GET", "/version")]
    assert api.slices == {}


def test_probe_finds_what_the_server_drops():
    api = FakeApi(gates_off=("DRAPartitionableDevices", "DRAConsumableCapacity"))
    server = probe(api, DRIVER, NODE)  # type: ignore[arg-type]
    assert server.dropped == {
        "consumesCounters",
        "sharedCounters",
        "allowMultipleAllocations",
        "requestPolicy",
    }
    assert server.keeps(TAINTS)


def test_probe_finds_a_server_wanting_counters_beside_devices_in_two_dry_runs():
    api = FakeApi(counters_beside=True, version="v1.34.4")
    server = probe(api, DRIVER, NODE)  # type: ignore[arg-type]
    assert server == BESIDE
    assert [m for m, _ in api.log] == ["DRYRUN", "DRYRUN", "GET"]


@pytest.mark.parametrize(
    ("version", "overrides", "expected"),
    [
        ("v1.37.2", {}, ALL_KEPT),
        ("v1.35.4", {}, NOTHING),
        ("v1.34.4", {}, NOTHING),
        (
            "v1.34.4",
            {
                "DRAPartitionableDevices": True,
                "DRAConsumableCapacity": True,
                "DRADeviceTaints": True,
            },
            BESIDE,
        ),
        ("v1.35.4", {"DRAPartitionableDevices": True}, NO_SHARING.dropping(["taints"])),
    ],
)
def test_release_features_say_what_a_release_keeps_with_its_gates(version, overrides, expected):
    assert release_features(version, gates_on(version, overrides)) == expected


# ---------------------------------------------------------------------------- publishing


@pytest.fixture
def node_api():
    def make(**kw) -> FakeApi:
        api = FakeApi(**kw)
        api.nodes[NODE] = "uid"
        return api

    return make


def test_no_dry_run_while_the_inventory_uses_no_optional_field(node_api):
    api = node_api()
    pub = publisher(api)
    pub.update(Inventory(plain(2)))
    pub.sync_once()
    assert "DRYRUN" not in [m for m, _ in api.log]
    assert pub.server_features is None
    pub.update(Inventory((Device("dev0", taints=UNHEALTHY), plain(2)[1])))  # health: a taint
    pub.sync_once()
    pub.sync_once()
    assert [m for m, _ in api.log].count("DRYRUN") == 1


def test_gates_off_publish_only_the_safe_part_warn_once_and_count_it(node_api, caplog_loguru):
    api = node_api(
        gates_off=("DRAPartitionableDevices", "DRAConsumableCapacity", "DRADeviceTaints")
    )
    pub = publisher(api)
    big = partitioned()
    inventory = Inventory(
        (*plain(1), Device("sick", taints=UNHEALTHY), shared(), *big.devices), big.counter_sets
    )
    pub.update(inventory)
    result = pub.sync_once()
    assert names_in(api) == [["dev0", "big-0"]]
    assert result.devices == 2 and metrics.PUBLISHED_DEVICES._value.get() == 2
    kept = {f.gate: metrics.API_FEATURE_KEPT.labels(f.gate)._value.get() for f in (PARTITIONABLE,)}
    assert kept == {"DRAPartitionableDevices": 0}
    left = {
        gate: metrics.DEVICES_LEFT_OUT.labels(gate)._value.get()
        for gate in ("DRAPartitionableDevices", "DRAConsumableCapacity", "DRADeviceTaints")
    }
    assert left == {"DRAPartitionableDevices": 4, "DRAConsumableCapacity": 1, "DRADeviceTaints": 1}
    warnings = [m for m in caplog_loguru if "is off in the API server" in m]
    assert len(warnings) == 3
    partitions = next(m for m in warnings if "DRAPartitionableDevices" in m)
    assert "not published: big-0-p0, big-0-p1, big-0-p2, big-0-p3" in partitions
    assert "Turn the gate on in kube-apiserver and kube-scheduler" in partitions
    assert pub.sync_once().writes == 0
    pub.update(Inventory(inventory.devices[:1] + inventory.devices[2:], big.counter_sets))
    pub.sync_once()  # healthy again: published, and no new warning
    assert names_in(api) == [["dev0", "big-0"]]
    assert len([m for m in caplog_loguru if "is off in the API server" in m]) == 3
    assert metrics.DEVICES_LEFT_OUT.labels("DRADeviceTaints")._value.get() == 0


def test_a_1_34_server_gets_counters_beside_devices_and_accepts_them(node_api):
    api = node_api(counters_beside=True)
    pub = publisher(api)
    pub.update(sriov_inventory(pfs=2, vfs=2))
    assert pub.sync_once().slices == 1
    (body,) = api.slices.values()
    assert body["spec"]["sharedCounters"] and body["spec"]["devices"]
    assert pub.sync_once().writes == 0


def test_a_1_34_server_leaves_out_a_group_beyond_one_slice_warns_once_and_counts_it(
    node_api, caplog_loguru
):
    api = node_api(counters_beside=True, version="v1.34.4")
    pub = publisher(api)
    inventory = sriov_inventory(pfs=1, vfs=64)
    pub.update(inventory)
    assert pub.sync_once().devices == 64
    assert metrics.DEVICES_LEFT_OUT.labels("DRAPartitionableDevices")._value.get() == 1
    pub.sync_once()
    (warning,) = [m for m in caplog_loguru if "ResourceSlice with the sets" in m]
    last = inventory.devices[-1].name  # the backend lists the device to keep first
    assert f"not published: {last}." in warning and "Kubernetes 1.35 or later" in warning


def test_doctor_names_what_a_1_34_server_cannot_take(node_api):
    from dra_core.doctor.cluster import api_checks

    api = node_api(counters_beside=True, version="v1.34.4")
    inventory = sriov_inventory(pfs=1, vfs=64)
    checks = {c.name: c for c in api_checks(api, DRIVER, NODE, inventory)}  # type: ignore[arg-type]
    check = checks["partitionable devices within the API server's limits"]
    assert check.status == "warn"
    assert f"the agent leaves out {inventory.devices[-1].name}" in check.found
    assert "Kubernetes 1.35 or later" in check.fix


def test_a_refused_write_makes_the_next_sync_ask_again(node_api):
    """A server upgraded or downgraded between 1.34 and 1.35 under a running agent."""
    api = node_api()
    pub = publisher(api)
    pub.update(sriov_inventory(pfs=1, vfs=2))
    pub.sync_once()
    api.slices.clear()  # 1.34 after a downgrade: slices must be recreated, in its layout
    api.counters_beside = True
    with pytest.raises(Exception, match="must reference a counterSet"):
        pub.sync_once()
    assert pub.server_features is None
    pub.sync_once()
    assert pub.server_features == ServerFeatures(counters_beside_devices=True)
    (body,) = api.slices.values()
    assert body["spec"]["sharedCounters"]
