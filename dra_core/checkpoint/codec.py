"""Strict JSON encoding and decoding of claim records.

Decoding checks every field's type and, for the names that reach paths and API calls, the
rules the API server enforces on them (`dra_core.model`): a record whose namespace is
``../../etc`` or whose device name is ``../../tmp/x`` could not have been written by the agent
for a real claim, so it is refused as damage, naming the claim and the field.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, cast

from dra_core.checkpoint.records import _NODE_TYPES, _PHASES, ClaimRecord
from dra_core.model import (
    LIMITS,
    AllocatedDevice,
    ClaimRef,
    ContainerEdits,
    DeviceNode,
    ModelError,
    Mount,
    PreparedClaim,
    PreparedDevice,
    is_dns_label,
    is_dns_subdomain,
    validate_claim_ref,
    validate_driver_name,
)

__all__ = (
    "decode_record",
    "encode_record",
)

# ---------------------------------------------------------------------------------------------
# JSON codec
# ---------------------------------------------------------------------------------------------


def _encode_device(device: PreparedDevice) -> dict[str, Any]:
    a = device.allocation
    e = device.edits
    return {
        "allocation": {
            "request": a.request,
            "pool": a.pool,
            "device": a.device,
            "shareId": a.share_id,
            "consumedCapacity": dict(a.consumed_capacity),
            "adminAccess": a.admin_access,
        },
        "edits": {
            "env": dict(e.env),
            "deviceNodes": [
                {
                    "path": n.path,
                    "hostPath": n.host_path,
                    "type": n.type,
                    "major": n.major,
                    "minor": n.minor,
                    "permissions": n.permissions,
                }
                for n in e.device_nodes
            ],
            "mounts": [
                {
                    "hostPath": m.host_path,
                    "containerPath": m.container_path,
                    "options": list(m.options),
                    "type": m.type,
                }
                for m in e.mounts
            ],
        },
        "state": dict(device.state),
    }


def encode_record(record: ClaimRecord) -> dict[str, Any]:
    """The JSON object of one record (see the module docstring for the layout)."""
    ref = record.claim.ref
    return {
        "phase": record.phase,
        "bootId": record.boot_id,
        "driver": record.driver,
        "claim": {"namespace": ref.namespace, "name": ref.name, "uid": ref.uid},
        "devices": [_encode_device(d) for d in record.claim.devices],
    }


class _Bad(Exception):
    """A field of a record does not decode: ``where`` is its path, ``problem`` what is wrong."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    return {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
    }.get(type(value), type(value).__name__)


def _object(value: object, where: str, required: Iterable[str]) -> dict[str, Any]:
    """A JSON object with exactly the ``required`` keys."""
    if not isinstance(value, dict):
        raise _Bad(where, f"expected an object, got {_type_name(value)}")
    keys = set(required)
    missing = sorted(keys - value.keys())
    if missing:
        raise _Bad(where, f"missing field(s) {', '.join(missing)}")
    unknown = sorted(str(k) for k in value.keys() - keys)
    if unknown:
        raise _Bad(where, f"unknown field(s) {', '.join(unknown)}")
    return cast(dict[str, Any], value)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _str(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise _Bad(_join(where, key), f"expected a string, got {_type_name(value)}")
    return value


def _opt_str(obj: dict[str, Any], key: str, where: str) -> str | None:
    value = obj[key]
    if value is not None and not isinstance(value, str):
        raise _Bad(_join(where, key), f"expected a string or null, got {_type_name(value)}")
    return value


def _opt_int(obj: dict[str, Any], key: str, where: str) -> int | None:
    value = obj[key]
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise _Bad(_join(where, key), f"expected an integer or null, got {_type_name(value)}")
    return value


def _bool(obj: dict[str, Any], key: str, where: str) -> bool:
    value = obj[key]
    if not isinstance(value, bool):
        raise _Bad(_join(where, key), f"expected a boolean, got {_type_name(value)}")
    return value


def _str_map(obj: dict[str, Any], key: str, where: str) -> dict[str, str]:
    value = obj[key]
    here = _join(where, key)
    if not isinstance(value, dict):
        raise _Bad(here, f"expected an object of strings, got {_type_name(value)}")
    for k, v in value.items():
        if not isinstance(v, str):
            item = f"{here}.{k}"
            raise _Bad(item, f"expected a string, got {_type_name(v)}")
    return dict(value)


def _list(obj: dict[str, Any], key: str, where: str) -> list[Any]:
    value = obj[key]
    if not isinstance(value, list):
        raise _Bad(_join(where, key), f"expected an array, got {_type_name(value)}")
    return value


_DNS_LABEL_RULE = "lower-case letters, digits and '-', at most 63 characters"


def _is_request_name(name: str) -> bool:
    """A request name, or ``<request>/<subrequest>`` (each a DNS label)."""
    parts = name.split("/")
    return len(parts) <= 2 and all(is_dns_label(part) for part in parts)


def _is_pool_name(name: str) -> bool:
    """DNS subdomains joined by '/', at most 253 characters (as the API server requires)."""
    return 0 < len(name) <= LIMITS.pool_name_length and all(
        is_dns_subdomain(part) for part in name.split("/")
    )


def _require(valid: bool, where: str, value: str, rule: str) -> None:
    if not valid:
        raise _Bad(where, f"{value!r} is not {rule}")


def _check_allocation(allocation: AllocatedDevice, where: str) -> None:
    _require(
        _is_request_name(allocation.request),
        f"{where}.request",
        allocation.request,
        f"a request name (a DNS label, or two joined by '/': {_DNS_LABEL_RULE})",
    )
    _require(
        _is_pool_name(allocation.pool),
        f"{where}.pool",
        allocation.pool,
        f"a pool name (DNS subdomains joined by '/', at most {LIMITS.pool_name_length} characters)",
    )
    _require(
        is_dns_label(allocation.device),
        f"{where}.device",
        allocation.device,
        f"a device name (a DNS label: {_DNS_LABEL_RULE})",
    )
    if allocation.share_id is not None:
        _require(
            is_dns_label(allocation.share_id),
            f"{where}.shareId",
            allocation.share_id,
            f"a share ID (a DNS label such as the UUID the scheduler assigns: {_DNS_LABEL_RULE})",
        )


def _check_claim(ref: ClaimRef) -> None:
    _require(
        is_dns_label(ref.namespace),
        "claim.namespace",
        ref.namespace,
        f"a namespace name (a DNS label: {_DNS_LABEL_RULE})",
    )
    _require(
        is_dns_subdomain(ref.name),
        "claim.name",
        ref.name,
        "a ResourceClaim name (a DNS subdomain: dot-separated DNS labels, at most 253 characters)",
    )
    try:
        validate_claim_ref(ref)  # namespace and name are fine: only the UID is left
    except ModelError as exc:
        raise _Bad("claim.uid", str(exc)) from None


def _decode_device(raw: object, where: str) -> PreparedDevice:
    obj = _object(raw, where, ("allocation", "edits", "state"))
    here = _join(where, "allocation")
    a = _object(
        obj["allocation"],
        here,
        ("request", "pool", "device", "shareId", "consumedCapacity", "adminAccess"),
    )
    allocation = AllocatedDevice(
        request=_str(a, "request", here),
        pool=_str(a, "pool", here),
        device=_str(a, "device", here),
        share_id=_opt_str(a, "shareId", here),
        consumed_capacity=_str_map(a, "consumedCapacity", here),
        admin_access=_bool(a, "adminAccess", here),
    )
    _check_allocation(allocation, here)
    here = _join(where, "edits")
    e = _object(obj["edits"], here, ("env", "deviceNodes", "mounts"))
    nodes: list[DeviceNode] = []
    for i, item in enumerate(_list(e, "deviceNodes", here)):
        at = f"{here}.deviceNodes[{i}]"
        n = _object(item, at, ("path", "hostPath", "type", "major", "minor", "permissions"))
        node_type = _str(n, "type", at)
        if node_type not in _NODE_TYPES:
            item = f"{at}.type"
            raise _Bad(item, f"{node_type!r} is not one of c, b, u, p or empty")
        nodes.append(
            DeviceNode(
                path=_str(n, "path", at),
                host_path=_opt_str(n, "hostPath", at),
                type=cast(Literal["c", "b", "u", "p", ""], node_type),
                major=_opt_int(n, "major", at),
                minor=_opt_int(n, "minor", at),
                permissions=_str(n, "permissions", at),
            )
        )
    mounts: list[Mount] = []
    for i, item in enumerate(_list(e, "mounts", here)):
        at = f"{here}.mounts[{i}]"
        m = _object(item, at, ("hostPath", "containerPath", "options", "type"))
        options = _list(m, "options", at)
        for j, option in enumerate(options):
            if not isinstance(option, str):
                item = f"{at}.options[{j}]"
                raise _Bad(item, f"expected a string, got {_type_name(option)}")
        mounts.append(
            Mount(
                host_path=_str(m, "hostPath", at),
                container_path=_str(m, "containerPath", at),
                options=tuple(options),
                type=_opt_str(m, "type", at),
            )
        )
    edits = ContainerEdits(
        env=_str_map(e, "env", here), device_nodes=tuple(nodes), mounts=tuple(mounts)
    )
    state = obj["state"]
    if not isinstance(state, dict):
        raise _Bad(_join(where, "state"), f"expected an object, got {_type_name(state)}")
    return PreparedDevice(allocation=allocation, edits=edits, state=state)


def _decode(uid: str, raw: object) -> ClaimRecord:
    obj = _object(raw, "", ("phase", "bootId", "driver", "claim", "devices"))
    phase = _str(obj, "phase", "")
    if phase not in _PHASES:
        raise _Bad("phase", f"{phase!r} is not one of {', '.join(_PHASES)}")
    c = _object(obj["claim"], "claim", ("namespace", "name", "uid"))
    ref = ClaimRef(
        namespace=_str(c, "namespace", "claim"),
        name=_str(c, "name", "claim"),
        uid=_str(c, "uid", "claim"),
    )
    _check_claim(ref)
    if ref.uid != uid:
        raise _Bad("claim.uid", f"{ref.uid!r} differs from the record's key {uid!r}")
    driver = _str(obj, "driver", "")
    try:
        validate_driver_name(driver)
    except ModelError as exc:
        raise _Bad("driver", str(exc)) from None
    devices = tuple(
        _decode_device(d, f"devices[{i}]") for i, d in enumerate(_list(obj, "devices", ""))
    )
    return ClaimRecord(
        claim=PreparedClaim(ref=ref, devices=devices),
        phase=phase,
        boot_id=_str(obj, "bootId", ""),
        driver=driver,
    )


def decode_record(uid: str, raw: object) -> ClaimRecord:
    """Decode one record strictly; ValueError names the claim UID, the field and the problem."""
    try:
        return _decode(uid, raw)
    except _Bad as exc:
        msg = f"claim {uid}: field {exc.where or '(record)'}: {exc.problem}"
        raise ValueError(msg) from None
