"""Unit tests of the pure ResourceSlice builder."""

from __future__ import annotations

import pytest

from dra_core.model import (
    Capacity,
    CounterConsumption,
    CounterSet,
    Device,
    Inventory,
    ModelError,
    RequestPolicy,
    Taint,
    ValidRange,
    Version,
)
from dra_core.slices.build import (
    MANAGED_BY,
    MANAGED_BY_LABEL,
    build_slices,
    encode_attribute,
    slice_name,
    split_devices,
)

DRIVER = "gpu.example.com"
NODE = "node-1"


def plain(n: int, prefix: str = "dev") -> tuple[Device, ...]:
    return tuple(Device(name=f"{prefix}{i}", attributes={"index": i}) for i in range(n))


def sriov_inventory(pfs: int, vfs: int) -> Inventory:
    """``pfs`` PFs with ``vfs`` VFs each, as partitionable devices (VFs first, then the PF)."""
    devices: list[Device] = []
    sets: list[CounterSet] = []
    for p in range(pfs):
        sets.append(CounterSet(name=f"card{p}", counters={"memory": "16Gi", "vfs": str(vfs)}))
        for v in range(vfs):
            devices.append(
                Device(
                    name=f"card{p}-vf{v}",
                    attributes={"type": "vf", "parent": f"card{p}"},
                    capacity={"memory": Capacity("256Mi")},
                    consumes_counters=(
                        CounterConsumption(f"card{p}", {"memory": "256Mi", "vfs": "1"}),
                    ),
                )
            )
        devices.append(
            Device(
                name=f"card{p}",
                attributes={"type": "gpu"},
                capacity={"memory": Capacity("16Gi")},
                consumes_counters=(
                    CounterConsumption(f"card{p}", {"memory": "16Gi", "vfs": str(vfs)}),
                ),
            )
        )
    return Inventory(devices=tuple(devices), counter_sets=tuple(sets))


def device_names(body: dict) -> list[str]:
    return [d["name"] for d in body["spec"].get("devices", ())]


def test_single_small_slice_shape():
    inv = Inventory(devices=plain(3))
    owner = {"name": NODE, "uid": "1234"}
    (body,) = build_slices(DRIVER, NODE, NODE, inv, 7, owner=owner)
    assert body["apiVersion"] == "resource.k8s.io/v1"
    assert body["kind"] == "ResourceSlice"
    assert body["metadata"]["name"] == "node-1-gpu-example-com-00000"
    assert body["metadata"]["labels"] == {MANAGED_BY_LABEL: MANAGED_BY}
    assert body["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Node", "name": NODE, "uid": "1234", "controller": True}
    ]
    spec = body["spec"]
    assert spec["driver"] == DRIVER
    assert spec["nodeName"] == NODE
    assert spec["pool"] == {"name": NODE, "generation": 7, "resourceSliceCount": 1}
    assert device_names(body) == ["dev0", "dev1", "dev2"]
    assert "sharedCounters" not in spec


def test_no_owner_no_owner_references():
    (body,) = build_slices(DRIVER, NODE, "pool-a", Inventory(devices=plain(1)), 1)
    assert "ownerReferences" not in body["metadata"]
    assert body["spec"]["pool"]["name"] == "pool-a"


def test_empty_inventory_gives_no_slices():
    assert build_slices(DRIVER, NODE, NODE, Inventory(), 1) == []


@pytest.mark.parametrize(
    ("n", "sizes"), [(128, [128]), (129, [128, 1]), (300, [128, 128, 44]), (1, [1])]
)
def test_split_plain_devices_at_128(n, sizes):
    bodies = build_slices(DRIVER, NODE, NODE, Inventory(devices=plain(n)), 1)
    assert [len(device_names(b)) for b in bodies] == sizes
    assert all(b["spec"]["pool"]["resourceSliceCount"] == len(sizes) for b in bodies)
    # Devices stay in order across slices.
    assert [n for b in bodies for n in device_names(b)] == [f"dev{i}" for i in range(n)]


def test_split_at_64_when_tainted():
    devices = list(plain(200))
    devices[10] = Device(name="dev10", taints=(Taint("example.com/unhealthy", "NoSchedule"),))
    chunks = split_devices(devices)
    assert [len(c) for c in chunks] == [64, 128, 8]
    # The advanced device sits in the first slice, which is therefore capped at 64.
    assert any(d.uses_advanced_features for d in chunks[0])
    assert not any(d.uses_advanced_features for d in chunks[1])


def test_split_closes_a_big_plain_slice_before_an_advanced_device():
    devices = [*plain(100), Device(name="tainted", taints=(Taint("k", "NoExecute"),))]
    chunks = split_devices(devices)
    assert [len(c) for c in chunks] == [100, 1]


def test_counter_sets_in_their_own_slices_never_with_devices():
    inv = sriov_inventory(pfs=8, vfs=63)  # 512 devices, all consuming counters
    bodies = build_slices(DRIVER, NODE, NODE, inv, 3)
    device_slices = [b for b in bodies if "devices" in b["spec"]]
    counter_slices = [b for b in bodies if "sharedCounters" in b["spec"]]
    assert [len(device_names(b)) for b in device_slices] == [64] * 8
    assert len(counter_slices) == 1
    assert len(counter_slices[0]["spec"]["sharedCounters"]) == 8
    for body in bodies:
        spec = body["spec"]
        assert ("devices" in spec) != ("sharedCounters" in spec)
        assert spec["pool"] == {"name": NODE, "generation": 3, "resourceSliceCount": 9}
    # Counter slices come after the device slices.
    assert bodies[-1] is counter_slices[0]


def test_more_than_eight_counter_sets_split():
    inv = sriov_inventory(pfs=17, vfs=1)
    bodies = build_slices(DRIVER, NODE, NODE, inv, 1)
    counter_slices = [b for b in bodies if "sharedCounters" in b["spec"]]
    assert [len(b["spec"]["sharedCounters"]) for b in counter_slices] == [8, 8, 1]
    assert all("devices" not in b["spec"] for b in counter_slices)
    assert bodies[0]["spec"]["pool"]["resourceSliceCount"] == len(bodies) == 4


def test_counter_slice_body():
    inv = sriov_inventory(pfs=1, vfs=2)
    counter = build_slices(DRIVER, NODE, NODE, inv, 1)[-1]
    assert counter["spec"]["sharedCounters"] == [
        {"name": "card0", "counters": {"memory": {"value": "16Gi"}, "vfs": {"value": "2"}}}
    ]


def test_names_stable_sorted_and_dns():
    inv = Inventory(devices=plain(128 * 11 + 1))
    first = build_slices(DRIVER, NODE, NODE, inv, 1)
    second = build_slices(DRIVER, NODE, NODE, inv, 2)
    names = [b["metadata"]["name"] for b in first]
    assert names == [b["metadata"]["name"] for b in second]
    assert names == sorted(names)
    assert len(set(names)) == len(names) == 12
    assert names[11] == "node-1-gpu-example-com-00011"


def test_long_names_are_shortened_uniquely():
    node_a = ("a" * 60 + ".") * 4
    node_a = node_a[:240].rstrip(".")
    node_b = node_a[:-1] + "b"
    a = slice_name(node_a, DRIVER, 3)
    b = slice_name(node_b, DRIVER, 3)
    assert len(a) <= 253 and len(b) <= 253
    assert a != b
    assert a.endswith("-00003")
    assert slice_name(node_a, DRIVER, 2) < a


def test_attribute_and_capacity_encoding():
    device = Device(
        name="gpu0",
        attributes={
            "model": "Arc A770",
            "index": 3,
            "sriov": False,
            "driverVersion": Version("1.2.3"),
            "resource.kubernetes.io/pcieRoot": "pci0000:00",
        },
        capacity={
            "memory": Capacity(
                "16Gi",
                RequestPolicy(default="16Gi", valid_range=ValidRange("512Mi", "16Gi", "512Mi")),
            ),
            "millicores": Capacity(
                "1000", RequestPolicy(default="1000", valid_values=("500", "1000"))
            ),
        },
        taints=(Taint("example.com/unhealthy", "NoExecute", "wedged"), Taint("k", "NoSchedule")),
        allow_multiple_allocations=True,
    )
    (body,) = build_slices(DRIVER, NODE, NODE, Inventory(devices=(device,)), 1)
    (dev,) = body["spec"]["devices"]
    assert dev["attributes"] == {
        "model": {"string": "Arc A770"},
        "index": {"int": 3},
        "sriov": {"bool": False},
        "driverVersion": {"version": "1.2.3"},
        "resource.kubernetes.io/pcieRoot": {"string": "pci0000:00"},
    }
    assert dev["capacity"] == {
        "memory": {
            "value": "16Gi",
            "requestPolicy": {
                "default": "16Gi",
                "validRange": {"min": "512Mi", "max": "16Gi", "step": "512Mi"},
            },
        },
        "millicores": {
            "value": "1000",
            "requestPolicy": {"default": "1000", "validValues": ["500", "1000"]},
        },
    }
    assert dev["taints"] == [
        {"key": "example.com/unhealthy", "value": "wedged", "effect": "NoExecute"},
        {"key": "k", "effect": "NoSchedule"},
    ]
    assert dev["allowMultipleAllocations"] is True


def test_plain_device_leaves_optional_fields_out():
    (body,) = build_slices(DRIVER, NODE, NODE, Inventory(devices=(Device(name="d"),)), 1)
    assert body["spec"]["devices"] == [{"name": "d"}]


def test_consumes_counters_encoding():
    inv = sriov_inventory(pfs=1, vfs=1)
    vf = build_slices(DRIVER, NODE, NODE, inv, 1)[0]["spec"]["devices"][0]
    assert vf["consumesCounters"] == [
        {"counterSet": "card0", "counters": {"memory": {"value": "256Mi"}, "vfs": {"value": "1"}}}
    ]


def test_encode_attribute_bool_before_int():
    assert encode_attribute(True) == {"bool": True}
    assert encode_attribute(0) == {"int": 0}


def test_bodies_share_no_mutable_parts():
    bodies = build_slices(
        DRIVER, NODE, NODE, Inventory(devices=plain(200)), 1, owner={"name": NODE, "uid": "u"}
    )
    bodies[0]["metadata"]["labels"]["x"] = "y"
    bodies[0]["metadata"]["ownerReferences"][0]["uid"] = "changed"
    assert "x" not in bodies[1]["metadata"]["labels"]
    assert bodies[1]["metadata"]["ownerReferences"][0]["uid"] == "u"


def test_validation_error_names_device_and_rule():
    bad = Device(name="gpu0", capacity={"memory": Capacity("16Gi", RequestPolicy(default="1Gi"))})
    with pytest.raises(ModelError, match=r"device 'gpu0'.*allowMultipleAllocations"):
        build_slices(DRIVER, NODE, NODE, Inventory(devices=(bad,)), 1)


def test_validation_missing_counter_set_names_device():
    bad = Device(name="vf0", consumes_counters=(CounterConsumption("card9", {"memory": "1Gi"}),))
    with pytest.raises(ModelError, match=r"device 'vf0'.*'card9'"):
        build_slices(DRIVER, NODE, NODE, Inventory(devices=(bad,)), 1)


@pytest.mark.parametrize(
    ("driver", "node", "pool", "generation", "match"),
    [
        ("Bad_Driver", NODE, NODE, 1, "driver name"),
        (DRIVER, "Node_1", NODE, 1, "node name"),
        (DRIVER, NODE, "a//b", 1, "pool name"),
        (DRIVER, NODE, NODE, 0, "generation"),
    ],
)
def test_bad_arguments(driver, node, pool, generation, match):
    with pytest.raises(ModelError, match=match):
        build_slices(driver, node, pool, Inventory(devices=plain(1)), generation)


def test_owner_needs_uid():
    with pytest.raises(ModelError, match="uid"):
        build_slices(DRIVER, NODE, NODE, Inventory(devices=plain(1)), 1, owner={"name": NODE})
