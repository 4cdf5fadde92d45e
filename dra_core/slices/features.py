"""What the API server keeps of a ResourceSlice, and the part of an inventory safe to publish.

Optional fields of a slice exist only while their feature gate is on in kube-apiserver; with
the gate off the server drops them silently, and the scheduler then allocates as if they had
never been there: a whole device and one of its partitions to two claims (counters gone), a
shared device to one claim without its request policy, an unhealthy device (taints gone). The
node refuses such an allocation at prepare, and the pod waits for ever.

`probe` asks the server, not its version: one dry-run create (``dryRun=All``, nothing is
stored) of a slice carrying every optional field shows which come back. A server that wants
counter sets beside the devices consuming them (Kubernetes 1.34 with DRAPartitionableDevices
on: "must reference a counterSet defined in the ResourceSlice sharedCounters") refuses that
slice, and a second dry run with the counter set inside tells the rest. From 1.35 a slice
holds devices or counter sets, never both.

`safe_inventory` then keeps only what the server can enforce:

* without partitionable devices: the counters go, so devices are kept in inventory order
  while the sum of what the kept ones consume fits every counter set (a backend lists the
  device to keep first: whole devices before their partitions, existing VFs before their
  PF); the others are left out, so any two published devices can be allocated together;
* without consumable capacity: shared devices are left out, or published as ordinary
  exclusive devices when the backend sets ``Device.exclusive_without_sharing``;
* without device taints: unhealthy devices (a NoSchedule or NoExecute taint) are left out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

from dra_core.kube.client import ApiError, KubeClient
from dra_core.model import (
    Capacity,
    CounterConsumption,
    Device,
    Inventory,
    RequestPolicy,
    Taint,
    ValidRange,
)
from dra_core.quantity import parse_quantity
from dra_core.slices.build import API_VERSION, KIND, MANAGED_BY, MANAGED_BY_LABEL, encode_device
from dra_core.slices.compare import gated_fields
from dra_core.slices.watch import SLICES_PATH

__all__ = (
    "ALL_KEPT",
    "FEATURES",
    "FEATURE_GATES",
    "Feature",
    "LeftOut",
    "ServerFeatures",
    "probe",
    "safe_inventory",
    "used_fields",
)

#: The feature gate that makes the API server keep each optional field of a slice.
FEATURE_GATES: Mapping[str, str] = {
    "consumesCounters": "DRAPartitionableDevices",
    "sharedCounters": "DRAPartitionableDevices",
    "allowMultipleAllocations": "DRAConsumableCapacity",
    "requestPolicy": "DRAConsumableCapacity",
    "taints": "DRADeviceTaints",
}


@dataclass(frozen=True)
class Feature:
    """An optional API feature the agent publishes with."""

    name: str
    #: The slice fields it adds (see `dra_core.slices.compare.gated_fields`).
    fields: tuple[str, ...]
    #: What the agent leaves out while the API server drops the fields, and why.
    without: str
    #: Whether the core uses it whatever the inventory (device taints mark unhealthy devices).
    used_by_core: bool = False

    @property
    def gate(self) -> str:
        return FEATURE_GATES[self.fields[0]]


PARTITIONABLE = Feature(
    "partitionable devices",
    ("sharedCounters", "consumesCounters"),
    "devices whose exclusivity depends on shared counters (partitions, VFs not made yet) are "
    "left out, as the scheduler could give a device and one of its parts to two pods",
)
CONSUMABLE = Feature(
    "consumable capacity",
    ("allowMultipleAllocations", "requestPolicy"),
    "shared devices are left out, or published as exclusive devices where the backend chose "
    "so, as the scheduler cannot share them",
)
TAINTS = Feature(
    "device taints",
    ("taints",),
    "unhealthy devices are left out, as no taint can keep the scheduler away from them",
    used_by_core=True,
)
FEATURES = (PARTITIONABLE, CONSUMABLE, TAINTS)


@dataclass(frozen=True)
class ServerFeatures:
    """What one API server keeps of a ResourceSlice."""

    #: The optional fields it drops (their feature gate is off).
    dropped: frozenset[str] = frozenset()
    #: Counter sets go in the slice of the devices that consume them (1.34), not in their own.
    counters_beside_devices: bool = False

    def keeps(self, feature: Feature) -> bool:
        return not self.dropped & set(feature.fields)

    def dropping(self, fields: Iterable[str]) -> ServerFeatures:
        """These features, with ``fields`` and the others of their gates dropped as well."""
        gates = {FEATURE_GATES[f] for f in fields}
        more = {f for f, gate in FEATURE_GATES.items() if gate in gates}
        return replace(self, dropped=self.dropped | more)


#: A server that keeps every optional field, with counter sets in slices of their own (1.35+).
ALL_KEPT = ServerFeatures()


def used_fields(inventory: Inventory) -> set[str]:
    """The optional ResourceSlice fields the inventory's slices carry."""
    used: set[str] = {"sharedCounters"} if inventory.counter_sets else set()
    for device in inventory.devices:
        if device.consumes_counters:
            used.add("consumesCounters")
        if device.taints:
            used.add("taints")
        if device.allow_multiple_allocations:
            used.add("allowMultipleAllocations")
        if any(c.request_policy for c in device.capacity.values()):
            used.add("requestPolicy")
    return used


# ---------------------------------------------------------------------------------------------
# Asking the server
# ---------------------------------------------------------------------------------------------

_PROBE = "dra-core-probe"
_PROBE_COUNTERS = {"n": {"value": "1"}}
#: One device with every optional field; the counter set it consumes is defined only in the
#: second probe (the one with counters beside devices).
_PROBE_DEVICE = Device(
    _PROBE,
    capacity={"memory": Capacity("1Gi", RequestPolicy("1Mi", valid_range=ValidRange("1Mi")))},
    consumes_counters=(CounterConsumption(_PROBE, {"n": "1"}),),
    taints=(Taint("dra-core.dev/probe", "NoSchedule"),),
    allow_multiple_allocations=True,
)


def _probe_body(driver: str, node_name: str, counters_beside: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "driver": driver,
        "nodeName": node_name,
        "pool": {"name": node_name, "generation": 1, "resourceSliceCount": 1},
        "devices": [encode_device(_PROBE_DEVICE)],
    }
    if counters_beside:
        spec["sharedCounters"] = [{"name": _PROBE, "counters": _PROBE_COUNTERS}]
    metadata = {"generateName": f"{_PROBE}-", "labels": {MANAGED_BY_LABEL: MANAGED_BY}}
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": spec}


def probe(client: KubeClient, driver: str, node_name: str) -> ServerFeatures:
    """What the API server keeps: one dry-run create, two on a server wanting counters beside
    devices. Raises `ApiError` when the server refuses both layouts or cannot be asked."""
    beside = False
    body = _probe_body(driver, node_name, counters_beside=False)
    try:
        returned = client.request("POST", SLICES_PATH, body=body, query={"dryRun": "All"})
    except ApiError as exc:
        if exc.status != 422:
            raise
        # Refused: perhaps a server that wants the counter set in the same slice (1.34).
        beside = True
        body = _probe_body(driver, node_name, counters_beside=True)
        try:
            returned = client.request("POST", SLICES_PATH, body=body, query={"dryRun": "All"})
        except ApiError as second:
            if second.status == 422:
                raise exc from second  # the first refusal names the problem of the usual layout
            raise
    dropped = gated_fields(body["spec"]) - gated_fields((returned or {}).get("spec") or {})
    return ServerFeatures(counters_beside_devices=beside).dropping(dropped)


# ---------------------------------------------------------------------------------------------
# What is safe to publish
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LeftOut:
    """Devices left out (or changed) because the server lacks one feature."""

    feature: Feature
    #: Devices not published at all.
    devices: tuple[str, ...] = ()
    #: Shared devices published as exclusive ones.
    exclusive: tuple[str, ...] = ()


@dataclass
class _Selection:
    devices: list[Device]
    left_out: list[LeftOut] = field(default_factory=list)


def safe_inventory(
    inventory: Inventory, server: ServerFeatures
) -> tuple[Inventory, tuple[LeftOut, ...]]:
    """The part of ``inventory`` the server can enforce, without the fields it drops, and
    what was left out per feature (only features the server lacks and the inventory uses)."""
    selection = _Selection(list(inventory.devices))
    counter_sets = inventory.counter_sets
    # Sharing first: a shared device left out reserves no counters. Health last: an
    # unhealthy device keeps its counters, so its parts do not appear while it may be in use.
    if not server.keeps(CONSUMABLE):
        _without_sharing(selection)
    if not server.keeps(PARTITIONABLE):
        _without_counters(selection, {s.name: s.counters for s in counter_sets})
        counter_sets = ()
    if not server.keeps(TAINTS):
        _without_taints(selection)
    return Inventory(tuple(selection.devices), counter_sets), tuple(selection.left_out)


def _without_sharing(selection: _Selection) -> None:
    kept: list[Device] = []
    dropped: list[str] = []
    exclusive: list[str] = []
    for device in selection.devices:
        if not device.allow_multiple_allocations:
            kept.append(device)
        elif device.exclusive_without_sharing:
            capacity = {k: Capacity(c.value) for k, c in device.capacity.items()}
            kept.append(replace(device, capacity=capacity, allow_multiple_allocations=False))
            exclusive.append(device.name)
        else:
            dropped.append(device.name)
    selection.devices = kept
    if dropped or exclusive:
        selection.left_out.append(LeftOut(CONSUMABLE, tuple(dropped), tuple(exclusive)))


def _without_counters(selection: _Selection, counter_sets: Mapping[str, Mapping[str, str]]) -> None:
    left: dict[tuple[str, str], Decimal] = {
        (name, counter): parse_quantity(value)
        for name, counters in counter_sets.items()
        for counter, value in counters.items()
    }
    kept: list[Device] = []
    dropped: list[str] = []
    for device in selection.devices:
        wanted = {
            (c.counter_set, counter): parse_quantity(value)
            for c in device.consumes_counters
            for counter, value in c.counters.items()
        }
        if all(amount <= left[key] for key, amount in wanted.items()):
            for key, amount in wanted.items():
                left[key] -= amount
            kept.append(replace(device, consumes_counters=()) if wanted else device)
        else:
            dropped.append(device.name)
    selection.devices = kept
    if dropped:
        selection.left_out.append(LeftOut(PARTITIONABLE, tuple(dropped)))


def _without_taints(selection: _Selection) -> None:
    kept: list[Device] = []
    dropped: list[str] = []
    for device in selection.devices:
        if any(t.effect != "None" for t in device.taints):
            dropped.append(device.name)
        else:
            kept.append(replace(device, taints=()) if device.taints else device)
    selection.devices = kept
    if dropped:
        selection.left_out.append(LeftOut(TAINTS, tuple(dropped)))
