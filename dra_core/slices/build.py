"""ResourceSlice bodies from an inventory: pure functions, no I/O.

One node's pool is published as device slices followed by counter slices:

* devices, in inventory order, fill slices of at most 128 devices, or 64 once any device in
  the slice has taints or consumes counters (`Device.uses_advanced_features`);
* shared counter sets go in slices of their own (at most 8 sets each): since Kubernetes 1.35
  a slice holds ``sharedCounters`` or ``devices``, never both, and a counter slice has no
  ``devices`` key at all (an empty list counts as "set");
* except on a server that wants counter sets beside the devices consuming them (Kubernetes
  1.34 with DRAPartitionableDevices on, see `dra_core.slices.features`): there devices that
  share a counter set, directly or through another device, go in one slice together with the
  sets, within 1.34's per-slice limits (64 devices, 32 counters in all the sets, 1024
  consumed counters);
* on a server whose scheduler checks a share against the first device of its slice
  (Kubernetes 1.34 with DRAConsumableCapacity on), each shared device starts a slice;
* every slice carries the same ``pool.generation`` and ``resourceSliceCount`` = the number
  of slices of both kinds, because consumers treat a pool as complete only when that many
  slices exist at its highest generation.

Slice names are ``<node>-<driver with dots as dashes>-<5-digit index>``: stable across
restarts, so an unchanged pool is updated in place, and sorted in publishing order, which the
1.36+ allocator follows (it sorts a pool's slices by name and takes the first fit).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

from dra_core.model import (
    LIMITS,
    AttributeValue,
    Capacity,
    CounterSet,
    Device,
    Inventory,
    ModelError,
    Version,
    is_dns_subdomain,
    validate_driver_name,
    validate_inventory,
)

__all__ = (
    "API_VERSION",
    "BESIDE_LIMITS",
    "KIND",
    "MANAGED_BY",
    "MANAGED_BY_LABEL",
    "NAME_INDEX_DIGITS",
    "Layout",
    "build_slices",
    "counter_groups",
    "encode_attribute",
    "encode_capacity",
    "encode_device",
    "fits_beside",
    "slice_name",
    "split_beside",
    "split_devices",
)

API_VERSION = "resource.k8s.io/v1"
KIND = "ResourceSlice"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "dra-core"
#: Width of the zero-padded index in slice names; 100000 slices is far beyond any node.
NAME_INDEX_DIGITS = 5
_NAME_MAX = 253
_HASH_LENGTH = 8


def slice_name(node_name: str, driver: str, index: int) -> str:
    """The name of slice ``index`` of ``driver`` on ``node_name``.

    For example ``node-1-gpu-intel-com-00000`` for driver ``gpu.intel.com``. Names of one
    node and driver differ only in the zero-padded index, so they sort in index order. When
    node and driver would make the name longer than 253 characters, their prefix is
    shortened and a hash of the full prefix keeps it unique.
    """
    if not 0 <= index < 10**NAME_INDEX_DIGITS:
        msg = f"slice index {index} does not fit in {NAME_INDEX_DIGITS} digits"
        raise ModelError(msg)
    prefix = f"{node_name}-{driver.replace('.', '-')}"
    suffix = f"-{index:0{NAME_INDEX_DIGITS}d}"
    if len(prefix) + len(suffix) > _NAME_MAX:
        digest = hashlib.sha256(prefix.encode()).hexdigest()[:_HASH_LENGTH]
        keep = _NAME_MAX - len(suffix) - _HASH_LENGTH - 1
        prefix = f"{prefix[:keep].rstrip('-.')}-{digest}"
    name = prefix + suffix
    if not is_dns_subdomain(name):
        msg = f"slice name {name!r} from node {node_name!r} is not a DNS subdomain"
        raise ModelError(msg)
    return name


def encode_attribute(value: AttributeValue) -> dict[str, Any]:
    """One attribute value in the API's one-of form (``{"int": 3}``, ``{"version": "1.2.3"}``)."""
    if isinstance(value, bool):  # before int: bool is an int subclass
        return {"bool": value}
    if isinstance(value, int):
        return {"int": value}
    if isinstance(value, Version):
        return {"version": value.value}
    return {"string": value}


def encode_capacity(capacity: Capacity) -> dict[str, Any]:
    """A capacity as ``{value, requestPolicy?}``."""
    body: dict[str, Any] = {"value": capacity.value}
    policy = capacity.request_policy
    if policy is not None:
        encoded: dict[str, Any] = {}
        if policy.default is not None:
            encoded["default"] = policy.default
        if policy.valid_values:
            encoded["validValues"] = list(policy.valid_values)
        if policy.valid_range is not None:
            rng: dict[str, str] = {"min": policy.valid_range.min}
            if policy.valid_range.max is not None:
                rng["max"] = policy.valid_range.max
            if policy.valid_range.step is not None:
                rng["step"] = policy.valid_range.step
            encoded["validRange"] = rng
        body["requestPolicy"] = encoded
    return body


def _counters(counters: Mapping[str, str]) -> dict[str, dict[str, str]]:
    return {name: {"value": value} for name, value in counters.items()}


def encode_device(device: Device) -> dict[str, Any]:
    """One device of ``spec.devices``; empty fields are left out, as the server returns them."""
    body: dict[str, Any] = {"name": device.name}
    if device.attributes:
        body["attributes"] = {k: encode_attribute(v) for k, v in device.attributes.items()}
    if device.capacity:
        body["capacity"] = {k: encode_capacity(v) for k, v in device.capacity.items()}
    if device.consumes_counters:
        body["consumesCounters"] = [
            {"counterSet": c.counter_set, "counters": _counters(c.counters)}
            for c in device.consumes_counters
        ]
    if device.taints:
        # timeAdded is left to the server, which stamps it on create.
        body["taints"] = [
            {"key": t.key, **({"value": t.value} if t.value else {}), "effect": t.effect}
            for t in device.taints
        ]
    if device.allow_multiple_allocations:
        body["allowMultipleAllocations"] = True
    return body


def split_devices(devices: Sequence[Device], shared_first: bool = False) -> list[list[Device]]:
    """Devices in order, cut into slices within the per-slice limits (128, or 64 if advanced);
    with ``shared_first``, each shared device starts a slice."""
    chunks: list[list[Device]] = []
    current: list[Device] = []
    advanced = False
    for device in devices:
        would_be_advanced = advanced or device.uses_advanced_features
        limit = LIMITS.devices_per_slice_advanced if would_be_advanced else LIMITS.devices_per_slice
        starts = shared_first and device.allow_multiple_allocations
        if current and (starts or len(current) + 1 > limit):
            chunks.append(current)
            current, would_be_advanced = [], device.uses_advanced_features
        current.append(device)
        advanced = would_be_advanced
    if current:
        chunks.append(current)
    return chunks


def _split_counter_sets(sets: Sequence[CounterSet]) -> list[list[CounterSet]]:
    size = LIMITS.counter_sets_per_slice
    return [list(sets[i : i + size]) for i in range(0, len(sets), size)]


#: Kubernetes 1.34's limits of a slice holding counter sets and devices: counters in all the
#: sets (ResourceSliceMaxSharedCounters), counters consumed by all the devices
#: (ResourceSliceMaxDeviceCountersPerSlice).
BESIDE_COUNTERS_PER_SLICE = 32
BESIDE_DEVICE_COUNTERS_PER_SLICE = 1024
#: Devices (those consuming counters), counters of the sets, consumed counters: for messages.
BESIDE_LIMITS = (
    LIMITS.devices_per_slice_advanced,
    BESIDE_COUNTERS_PER_SLICE,
    BESIDE_DEVICE_COUNTERS_PER_SLICE,
)

_Chunk = tuple[list[Device], list[CounterSet]]


class Layout(TypedDict):
    """How a server wants a pool laid out in slices (`build_slices`' arguments of that name)."""

    counters_beside_devices: bool
    shared_devices_first: bool


def _size(devices: Sequence[Device], sets: Sequence[CounterSet]) -> tuple[int, int, int]:
    """Devices, counters of the sets, counters consumed by the devices."""
    consumed = sum(len(c.counters) for d in devices for c in d.consumes_counters)
    return len(devices), sum(len(s.counters) for s in sets), consumed


def fits_beside(devices: Sequence[Device], sets: Sequence[CounterSet]) -> bool:
    """Whether ``devices`` and the counter ``sets`` fit in one slice of Kubernetes 1.34."""
    count, counters, consumed = _size(devices, sets)
    advanced = any(d.uses_advanced_features for d in devices)
    limit = LIMITS.devices_per_slice_advanced if advanced else LIMITS.devices_per_slice
    return (
        count <= limit
        and counters <= BESIDE_COUNTERS_PER_SLICE
        and consumed <= BESIDE_DEVICE_COUNTERS_PER_SLICE
    )


def counter_groups(inventory: Inventory) -> list[_Chunk]:
    """The inventory's devices in groups linked by counter sets (directly or through other
    devices), each with its sets, in inventory order; a device consuming no counters is a
    group of its own, and counter sets no device consumes follow, one group each."""
    units: list[tuple[list[Device], set[str]]] = []
    for device in inventory.devices:
        names = {c.counter_set for c in device.consumes_counters}
        linked = [u for u in units if u[1] & names] if names else []
        if not linked:
            units.append(([device], names))
            continue
        first = linked[0]
        for other in linked[1:]:
            first[0].extend(other[0])
            first[1].update(other[1])
            units.remove(other)
        first[0].append(device)
        first[1].update(names)
    used = set().union(*(u[1] for u in units)) if units else set()
    units.extend(([], {s.name}) for s in inventory.counter_sets if s.name not in used)
    order = {d.name: i for i, d in enumerate(inventory.devices)}
    return [
        (
            # Devices stay in inventory order inside a merged group.
            sorted(devices, key=lambda d: order[d.name]),
            [s for s in inventory.counter_sets if s.name in names],
        )
        for devices, names in units
    ]


def split_beside(inventory: Inventory, shared_first: bool = False) -> list[_Chunk]:
    """Devices with the counter sets they consume, in slices within 1.34's limits.

    Each counter group (`counter_groups`) is placed where its first device is; groups fill
    slices in order, and with ``shared_first`` a group led by a shared device starts a slice.
    Raises `ModelError` when one group does not fit in a slice
    (`dra_core.slices.features.safe_inventory` leaves such devices out first).
    """
    chunks: list[_Chunk] = []
    for devices, sets in counter_groups(inventory):
        if not fits_beside(devices, sets):
            members = ", ".join(d.name for d in devices)
            msg = (
                f"devices {members} share counter sets {sorted(s.name for s in sets)}, which "
                f"this API server wants in one ResourceSlice, but {_size(devices, sets)} "
                f"(devices, counters, consumed counters) exceed its limits {BESIDE_LIMITS}: "
                "publish fewer partitions per device, or upgrade to Kubernetes 1.35 or later, "
                "which keeps counter sets in slices of their own"
            )
            raise ModelError(msg)
        starts = shared_first and bool(devices) and devices[0].allow_multiple_allocations
        if chunks and not starts and fits_beside(chunks[-1][0] + devices, chunks[-1][1] + sets):
            chunks[-1] = (chunks[-1][0] + devices, chunks[-1][1] + sets)
        else:
            chunks.append((devices, sets))
    return chunks


def _owner_reference(owner: Mapping[str, Any]) -> dict[str, Any]:
    try:
        name, uid = owner["name"], owner["uid"]
    except KeyError as exc:
        msg = f"the slice owner needs a name and a uid, got {dict(owner)!r}"
        raise ModelError(msg) from exc
    return {
        "apiVersion": owner.get("apiVersion", "v1"),
        "kind": owner.get("kind", "Node"),
        "name": name,
        "uid": uid,
        "controller": bool(owner.get("controller", True)),
    }


def build_slices(
    driver: str,
    node_name: str,
    pool: str,
    inventory: Inventory,
    generation: int,
    *,
    owner: Mapping[str, Any] | None = None,
    counters_beside_devices: bool = False,
    shared_devices_first: bool = False,
    validated: bool = False,
) -> list[dict[str, Any]]:
    """The ResourceSlice bodies (``resource.k8s.io/v1``) publishing ``inventory`` as one pool.

    ``owner`` is the Node (``{"name", "uid"}``, optionally ``apiVersion``/``kind``), so the
    slices are garbage-collected with it. ``counters_beside_devices`` puts counter sets in
    the slices of the devices that consume them (Kubernetes 1.34), not in their own;
    ``shared_devices_first`` starts a slice with each shared device (the 1.34 scheduler checks
    a share against the first device of its slice). An empty
    inventory gives no slices. The inventory is validated first, unless the caller did
    (``validated``): a rule it breaks raises `ModelError` naming the device and the rule.
    """
    validate_driver_name(driver)
    if not is_dns_subdomain(node_name):
        msg = f"node name {node_name!r} is not a DNS subdomain"
        raise ModelError(msg)
    if not 0 < len(pool) <= LIMITS.pool_name_length or not all(
        is_dns_subdomain(part) for part in pool.split("/")
    ):
        msg = f"pool name {pool!r} is not DNS subdomains joined by '/' (at most 253 characters)"
        raise ModelError(msg)
    if generation < 1:
        msg = f"pool generation must be at least 1, got {generation}"
        raise ModelError(msg)
    if not validated:
        validate_inventory(inventory)

    chunks: list[_Chunk]
    if counters_beside_devices:
        chunks = split_beside(inventory, shared_devices_first)
    else:
        chunks = [(d, []) for d in split_devices(inventory.devices, shared_devices_first)]
        chunks += [([], sets) for sets in _split_counter_sets(inventory.counter_sets)]
    count = len(chunks)
    metadata_extra: dict[str, Any] = {"labels": {MANAGED_BY_LABEL: MANAGED_BY}}
    if owner is not None:
        metadata_extra["ownerReferences"] = [_owner_reference(owner)]

    def skeleton(index: int) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": slice_name(node_name, driver, index), **_copy(metadata_extra)},
            "spec": {
                "driver": driver,
                "nodeName": node_name,
                "pool": {"name": pool, "generation": generation, "resourceSliceCount": count},
            },
        }

    slices: list[dict[str, Any]] = []
    for devices, sets in chunks:
        body = skeleton(len(slices))
        # A counter slice has no devices key at all: 1.35+ count an empty list as set.
        if devices:
            body["spec"]["devices"] = [encode_device(d) for d in devices]
        if sets:
            body["spec"]["sharedCounters"] = [
                {"name": s.name, "counters": _counters(s.counters)} for s in sets
            ]
        slices.append(body)
    return slices


def _copy(value: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of plain nested dicts and lists, so no two bodies share a mutable part."""
    out: dict[str, Any] = {}
    for key, item in value.items():
        if isinstance(item, dict):
            out[key] = _copy(item)
        elif isinstance(item, list):
            out[key] = [_copy(x) if isinstance(x, dict) else x for x in item]
        else:
            out[key] = item
    return out
