"""What counts as a change to a published ResourceSlice, and how a slice set may change.

The API server canonicalises quantities (``4096Mi`` comes back as ``4Gi``), stamps
``timeAdded`` on taints, drops fields whose feature gate is off, and others may add labels:
none of that is a change of ours. These pure functions compare only the fields the publisher
owns, normalised, so that steady state costs no writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

from dra_core.quantity import QuantityError, parse_quantity

__all__ = (
    "gated_fields",
    "generation_of",
    "members",
    "merge_metadata",
    "owned_fields_equal",
    "pool_of",
    "same_shape",
)


def pool_of(body: Mapping[str, Any]) -> Mapping[str, Any]:
    pool: Mapping[str, Any] = body.get("spec", {}).get("pool") or {}
    return pool


def generation_of(body: Mapping[str, Any]) -> int:
    return int(pool_of(body).get("generation") or 0)


def members(body: Mapping[str, Any], dropped: set[str]) -> tuple[tuple[str, ...], ...]:
    """What a slice holds: its device names and its counter-set names (both in one slice
    where the server wants counters beside devices)."""
    spec = body.get("spec", {})
    devices = tuple(d.get("name", "") for d in spec.get("devices") or ())
    if "sharedCounters" in dropped:
        return (devices,)
    return devices, tuple(s.get("name", "") for s in spec.get("sharedCounters") or ())


def same_shape(
    desired: list[dict[str, Any]], current: list[dict[str, Any]], dropped: set[str]
) -> bool:
    """Whether ``current`` (the slices at the highest generation) can be updated in place.

    True when every current slice is a desired one with the same members and the same
    slice count, so consumers never see a device twice or a pool complete with stale
    membership; desired slices missing from the API are simply recreated.
    """
    wanted = {b["metadata"]["name"]: b for b in desired}
    for body in current:
        want = wanted.get(body.get("metadata", {}).get("name", ""))
        if want is None or members(want, dropped) != members(body, dropped):
            return False
        if pool_of(body).get("resourceSliceCount") != len(desired):
            return False
    return True


def merge_metadata(desired: Mapping[str, Any], actual: Mapping[str, Any]) -> dict[str, Any]:
    """The update body: ours, keeping others' labels and annotations and the resourceVersion."""
    have = actual.get("metadata", {})
    want = desired["metadata"]
    metadata = {
        **{k: v for k, v in have.items() if k in ("annotations", "finalizers")},
        **want,
        "labels": {**(have.get("labels") or {}), **(want.get("labels") or {})},
        "resourceVersion": have.get("resourceVersion"),
    }
    if "ownerReferences" not in want and have.get("ownerReferences"):
        metadata["ownerReferences"] = have["ownerReferences"]
    return {**desired, "metadata": metadata}


def _owner_key(ref: Mapping[str, Any]) -> tuple[Any, ...]:
    return (
        ref.get("apiVersion"),
        ref.get("kind"),
        ref.get("name"),
        ref.get("uid"),
        bool(ref.get("controller")),
    )


def gated_fields(spec: Mapping[str, Any]) -> set[str]:
    """The gated fields present in a slice spec."""
    found: set[str] = set()
    if spec.get("sharedCounters"):
        found.add("sharedCounters")
    for device in spec.get("devices") or ():
        for key in ("consumesCounters", "taints", "allowMultipleAllocations"):
            if device.get(key):
                found.add(key)
        if any("requestPolicy" in c for c in (device.get("capacity") or {}).values()):
            found.add("requestPolicy")
    return found


def _quantity(value: Any) -> Any:
    """A quantity compared by value ("4096Mi" == "4Gi"), anything else as it is."""
    try:
        return parse_quantity(value)
    except (QuantityError, TypeError):
        return value


def _counters(counters: Mapping[str, Any] | None) -> dict[str, Decimal | Any]:
    return {k: _quantity((v or {}).get("value")) for k, v in (counters or {}).items()}


def _request_policy(policy: Mapping[str, Any] | None) -> Any:
    if not policy:
        return None
    rng = policy.get("validRange")
    return (
        _quantity(policy.get("default")) if policy.get("default") is not None else None,
        tuple(_quantity(v) for v in policy.get("validValues") or ()),
        None
        if not rng
        else tuple(
            _quantity(rng[k]) if rng.get(k) is not None else None for k in ("min", "max", "step")
        ),
    )


def _norm_device(device: Mapping[str, Any], dropped: set[str]) -> dict[str, Any]:
    norm: dict[str, Any] = {
        "name": device.get("name"),
        "attributes": {
            k: {t: v for t, v in (a or {}).items() if t in ("int", "bool", "string", "version")}
            for k, a in (device.get("attributes") or {}).items()
        },
        "capacity": {
            k: (
                _quantity((c or {}).get("value")),
                None
                if "requestPolicy" in dropped
                else _request_policy((c or {}).get("requestPolicy")),
            )
            for k, c in (device.get("capacity") or {}).items()
        },
    }
    if "consumesCounters" not in dropped:
        norm["consumesCounters"] = [
            (c.get("counterSet"), _counters(c.get("counters")))
            for c in device.get("consumesCounters") or ()
        ]
    if "taints" not in dropped:
        norm["taints"] = [
            (t.get("key"), t.get("value") or "", t.get("effect"))
            for t in device.get("taints") or ()
        ]
    if "allowMultipleAllocations" not in dropped:
        norm["allowMultipleAllocations"] = bool(device.get("allowMultipleAllocations"))
    return norm


def _norm_spec(spec: Mapping[str, Any], dropped: Iterable[str]) -> dict[str, Any]:
    """The fields of a slice spec we own, in a form where server defaults compare equal."""
    gone = set(dropped)
    pool = spec.get("pool") or {}
    norm: dict[str, Any] = {
        "driver": spec.get("driver"),
        "nodeName": spec.get("nodeName"),
        "pool": (pool.get("name"), pool.get("generation"), pool.get("resourceSliceCount")),
        "devices": [_norm_device(d, gone) for d in spec.get("devices") or ()],
    }
    if "sharedCounters" not in gone:
        norm["sharedCounters"] = [
            (s.get("name"), _counters(s.get("counters"))) for s in spec.get("sharedCounters") or ()
        ]
    return norm


def owned_fields_equal(
    desired: Mapping[str, Any], actual: Mapping[str, Any], dropped: set[str]
) -> bool:
    """Whether ``actual`` already holds everything of ``desired`` that the publisher owns."""
    want, have = desired.get("metadata", {}), actual.get("metadata", {})
    labels = have.get("labels") or {}
    if any(labels.get(k) != v for k, v in (want.get("labels") or {}).items()):
        return False
    if want.get("ownerReferences") and [_owner_key(r) for r in want["ownerReferences"]] != [
        _owner_key(r) for r in have.get("ownerReferences") or []
    ]:
        return False
    return _norm_spec(desired.get("spec", {}), dropped) == _norm_spec(
        actual.get("spec", {}), dropped
    )
