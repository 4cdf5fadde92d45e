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
* without device taints: unhealthy devices (a NoSchedule or NoExecute taint) are left out;
* devices with more taints than the server takes are left out: 16, or 4 on a 1.34 server
  (discovery checks the backend's taints; the core's health taint comes on top of them);
* on a 1.34 server: the devices of a counter group (devices linked by counter sets, which
  1.34 wants in one slice with the sets) beyond one slice's limits are left out, in inventory
  order, so the rest still publish.

`release_features` says the same from a release and its gates, without asking a server
(``dra-core discover --kubernetes-version``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

from dra_core.kube.client import ApiError, KubeClient
from dra_core.model import (
    LIMITS,
    Capacity,
    CounterConsumption,
    CounterSet,
    Device,
    Inventory,
    RequestPolicy,
    Taint,
    ValidRange,
)
from dra_core.quantity import parse_quantity
from dra_core.releases import (
    ReleaseError,
    counter_sets_beside_devices,
    k8s_minor,
    shared_devices_first,
    taints_per_device,
)
from dra_core.slices.build import (
    API_VERSION,
    BESIDE_LIMITS,
    KIND,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    Layout,
    counter_groups,
    encode_device,
    fits_beside,
)
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
    "release_features",
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
    #: Why devices are left out and how to publish them, where not because the gate is off.
    cause: str = ""
    remedy: str = ""

    @property
    def gate(self) -> str:
        return FEATURE_GATES[self.fields[0]]

    @property
    def why(self) -> str:
        """What the API server lacks, for the warning about what is left out."""
        off = f"feature gate {self.gate} is off in the API server ({self.name} not kept)"
        return self.cause or off

    @property
    def fix(self) -> str:
        """What publishes the devices left out."""
        return self.remedy or (
            "Turn the gate on in kube-apiserver and kube-scheduler, then restart this agent, to "
            "publish them as the backend describes them"
        )


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
#: What Kubernetes 1.34 cannot take with the gates on: its limits are tighter than later ones.
BIG_COUNTER_GROUPS = replace(
    PARTITIONABLE,
    without="devices of a counter group beyond what one ResourceSlice holds are left out",
    cause=(
        "the API server (Kubernetes 1.34) wants devices that share counter sets in one "
        "ResourceSlice with the sets, within {} devices, {} counters in the sets and {} "
        "consumed counters".format(*BESIDE_LIMITS)
    ),
    remedy=(
        "Publish fewer partitions per device, or upgrade to Kubernetes 1.35 or later, which "
        "keeps counter sets in slices of their own"
    ),
)
MANY_TAINTS = replace(
    TAINTS,
    without="devices with more taints than it takes are left out",
    cause="the API server (Kubernetes 1.34) takes at most {} taints per device",
    remedy=f"Upgrade to Kubernetes 1.35 or later, which takes {LIMITS.taints_per_device}",
)
#: Past the API's own limit: discovery checks the backend's taints, the health taint comes later.
TAINTS_WITH_HEALTH = replace(
    TAINTS,
    without="unhealthy devices with more taints than it takes are left out",
    cause=(
        f"the API server takes at most {LIMITS.taints_per_device} taints per device, the "
        "health taint this agent adds included"
    ),
    remedy=(
        f"Make the backend report at most {LIMITS.taints_per_device - 1} taints per device, "
        "leaving room for the health taint"
    ),
)


@dataclass(frozen=True)
class ServerFeatures:
    """What one API server keeps of a ResourceSlice."""

    #: The optional fields it drops (their feature gate is off).
    dropped: frozenset[str] = frozenset()
    #: Counter sets go in the slice of the devices that consume them (1.34), not in their own.
    counters_beside_devices: bool = False
    #: The most taints it takes on one device, where fewer than the model allows (1.34: 4).
    taints_per_device: int | None = None
    #: Each shared device first in its slice, where the scheduler checks a share against the
    #: slice's first device (1.34).
    shared_devices_first: bool = False

    @property
    def layout(self) -> Layout:
        """The `dra_core.slices.build.build_slices` arguments of the layout this server wants."""
        return Layout(
            counters_beside_devices=self.counters_beside_devices,
            shared_devices_first=self.shared_devices_first,
        )

    def keeps(self, feature: Feature) -> bool:
        return not self.dropped & set(feature.fields)

    def dropping(self, fields: Iterable[str]) -> ServerFeatures:
        """These features, with ``fields`` and the others of their gates dropped as well."""
        gates = {FEATURE_GATES[f] for f in fields}
        more = {f for f, gate in FEATURE_GATES.items() if gate in gates}
        return replace(self, dropped=self.dropped | more)


#: A server that keeps every optional field, with counter sets in slices of their own (1.35+).
ALL_KEPT = ServerFeatures()


def release_features(version: str, gates: Mapping[str, bool]) -> ServerFeatures:
    """What an API server of ``version`` keeps with its DRA feature ``gates`` on or off (as
    `dra_core.releases.gates_on` gives them): for saying what the agent would publish there
    without asking a server. Raises `ReleaseError` for a version it cannot read."""
    server = ServerFeatures(
        counters_beside_devices=gates.get(PARTITIONABLE.gate, False)
        and counter_sets_beside_devices(version),
        taints_per_device=taints_per_device(version) if gates.get(TAINTS.gate) else None,
        shared_devices_first=gates.get(CONSUMABLE.gate, False) and shared_devices_first(version),
    )
    return server.dropping(f for f, gate in FEATURE_GATES.items() if not gates.get(gate, False))


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
    devices, and its version where it keeps taints or shares (their 1.34 limits). Raises
    `ApiError` when the server refuses both layouts or cannot be asked."""
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
    server = ServerFeatures(counters_beside_devices=beside).dropping(dropped)
    if not (server.keeps(TAINTS) or server.keeps(CONSUMABLE)):
        return server
    # The taint limit shows only as a refusal, the share check only in the scheduler: both
    # come from the release.
    version = str((client.get("/version") or {}).get("gitVersion", ""))
    try:
        k8s_minor(version)
    except ReleaseError:
        return server  # a build naming no release: take it for 1.35 or later
    return replace(
        server,
        taints_per_device=taints_per_device(version) if server.keeps(TAINTS) else None,
        shared_devices_first=server.keeps(CONSUMABLE) and shared_devices_first(version),
    )


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
    else:  # whatever the release: the health taint comes after discovery's check
        _within_taint_limit(selection, server.taints_per_device)
    if server.counters_beside_devices:
        counter_sets = _within_slice_limits(selection, counter_sets)
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


def _within_taint_limit(selection: _Selection, release_limit: int | None) -> None:
    """Leave out the devices with more taints than the server takes: ``release_limit`` where
    its release takes fewer than the model allows (1.34), else the model's limit."""
    limit = LIMITS.taints_per_device if release_limit is None else release_limit
    dropped = [d.name for d in selection.devices if len(d.taints) > limit]
    if dropped:
        selection.devices = [d for d in selection.devices if len(d.taints) <= limit]
        feature = (
            TAINTS_WITH_HEALTH
            if release_limit is None
            else replace(MANY_TAINTS, cause=MANY_TAINTS.cause.format(limit))
        )
        selection.left_out.append(LeftOut(feature, tuple(dropped)))


def _within_slice_limits(
    selection: _Selection, counter_sets: tuple[CounterSet, ...]
) -> tuple[CounterSet, ...]:
    """Leave out, per counter group too big for one slice, the devices beyond its limits in
    inventory order (a whole device before its partitions); the counter sets of a group whose
    sets alone are too big go as well. The counter sets kept."""
    inventory = Inventory(tuple(selection.devices), counter_sets)
    dropped: set[str] = set()
    dropped_sets: set[str] = set()
    for devices, sets in counter_groups(inventory):
        if fits_beside(devices, sets):
            continue
        if not fits_beside([], sets):
            dropped.update(d.name for d in devices)
            dropped_sets.update(s.name for s in sets)
            continue
        kept: list[Device] = []
        for device in devices:
            if fits_beside([*kept, device], sets):
                kept.append(device)
            else:
                dropped.add(device.name)
    if dropped:
        out = tuple(d.name for d in selection.devices if d.name in dropped)
        selection.left_out.append(LeftOut(BIG_COUNTER_GROUPS, out))
        selection.devices = [d for d in selection.devices if d.name not in dropped]
    return tuple(s for s in counter_sets if s.name not in dropped_sets)
