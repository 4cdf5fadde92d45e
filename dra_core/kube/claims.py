"""Reading ResourceClaims: the allocation results and opaque configs that concern this node.

The claim is read as raw JSON (typed models would drop fields a newer server sends) and
checked with our own rules: same UID as the kubelet asked for, allocated, with results for
this driver in this node's pool. Every problem is a :class:`ClaimError` whose message a user
can act on.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dra_core.errors import ClaimError
from dra_core.kube.client import ApiError, KubeClient
from dra_core.model import LIMITS, AllocatedDevice, ClaimRef

__all__ = ("ClaimAllocation", "ClaimError", "OpaqueConfig", "fetch_claim", "parse_allocation")

RESOURCE_API = "/apis/resource.k8s.io/v1"


@dataclass(frozen=True)
class OpaqueConfig:
    """One opaque config entry addressed to this driver, in precedence order."""

    source: str  # "FromClass" or "FromClaim"
    requests: tuple[str, ...]  # empty: applies to every request
    parameters: Mapping[str, Any]

    def applies_to(self, request: str) -> bool:
        base = request.split("/", 1)[0]
        return not self.requests or request in self.requests or base in self.requests


@dataclass(frozen=True)
class ClaimAllocation:
    """What a claim's allocation holds for this driver and node."""

    devices: tuple[AllocatedDevice, ...]
    configs: tuple[OpaqueConfig, ...]


def claim_path(ref: ClaimRef) -> str:
    return f"{RESOURCE_API}/namespaces/{ref.namespace}/resourceclaims/{ref.name}"


def fetch_claim(
    client: KubeClient, ref: ClaimRef, *, timeout: float | None = None
) -> Mapping[str, Any]:
    """The ResourceClaim as JSON; ClaimError when it is gone, ApiError for other failures.

    ``timeout`` bounds the request in seconds (None: the client's own timeout).
    """
    try:
        claim = client.get(claim_path(ref), timeout=timeout)
    except ApiError as exc:
        if exc.not_found:
            msg = f"ResourceClaim {ref.namespace}/{ref.name} not found in the API server"
            raise ClaimError(msg) from None
        raise
    if not isinstance(claim, Mapping):
        msg = f"ResourceClaim {ref.namespace}/{ref.name}: the API server sent no object"
        raise ClaimError(msg)
    return claim


def _field(obj: Any, path: str, kind: type, default: Any) -> Any:
    value = obj
    for key in path.split("."):
        if not isinstance(value, Mapping):
            return default
        value = value.get(key)
        if value is None:
            return default
    if not isinstance(value, kind):
        msg = f"field {path} is {type(value).__name__}, expected {kind.__name__}"
        raise ClaimError(msg)
    return value


def parse_allocation(
    claim: Mapping[str, Any], ref: ClaimRef, driver: str, pools: Collection[str]
) -> ClaimAllocation:
    """Take the results for ``driver`` in ``pools`` and the configs for ``driver``."""
    uid = _field(claim, "metadata.uid", str, "")
    if uid != ref.uid:
        msg = (
            f"ResourceClaim {ref.namespace}/{ref.name} was replaced: the API server has UID "
            f"{uid or '(none)'}, the kubelet asked for {ref.uid}"
        )
        raise ClaimError(msg)
    allocation = _field(claim, "status.allocation", Mapping, None)
    if allocation is None:
        msg = f"ResourceClaim {ref.namespace}/{ref.name} is not allocated"
        raise ClaimError(msg)
    results: Sequence[Any] = _field(allocation, "devices.results", list, [])
    devices = []
    for index, result in enumerate(results):
        if not isinstance(result, Mapping):
            msg = f"status.allocation.devices.results[{index}] is not an object"
            raise ClaimError(msg)
        if result.get("driver") != driver or result.get("pool") not in pools:
            continue
        devices.append(_allocated_device(result, index))
    if not devices:
        msg = (
            f"ResourceClaim {ref.namespace}/{ref.name} has no device of driver {driver} in pool "
            f"{' or '.join(sorted(pools))} (is it allocated to another node or driver?)"
        )
        raise ClaimError(msg)
    configs = tuple(_configs(allocation, driver))
    return ClaimAllocation(devices=tuple(devices), configs=configs)


def _allocated_device(result: Mapping[str, Any], index: int) -> AllocatedDevice:
    where = f"status.allocation.devices.results[{index}]"
    request, pool, device = (result.get(k) for k in ("request", "pool", "device"))
    if not all(isinstance(v, str) and v for v in (request, pool, device)):
        msg = f"{where} lacks request, pool or device"
        raise ClaimError(msg)
    share_id = result.get("shareID")
    if share_id is not None and not isinstance(share_id, str):
        msg = f"{where}.shareID is not a string"
        raise ClaimError(msg)
    consumed = result.get("consumedCapacity") or {}
    if not isinstance(consumed, Mapping) or not all(isinstance(v, str) for v in consumed.values()):
        msg = f"{where}.consumedCapacity is not a map of quantities"
        raise ClaimError(msg)
    return AllocatedDevice(
        request=str(request),
        pool=str(pool),
        device=str(device),
        share_id=share_id,
        consumed_capacity=dict(consumed),
        admin_access=bool(result.get("adminAccess")),
    )


def _configs(allocation: Mapping[str, Any], driver: str) -> list[OpaqueConfig]:
    entries: Sequence[Any] = _field(allocation, "devices.config", list, [])
    configs = []
    for index, entry in enumerate(entries):
        opaque = entry.get("opaque") if isinstance(entry, Mapping) else None
        if not isinstance(opaque, Mapping) or opaque.get("driver") != driver:
            continue  # other drivers' configs are none of our business
        where = f"status.allocation.devices.config[{index}]"
        parameters = opaque.get("parameters")
        if not isinstance(parameters, Mapping):
            msg = f"{where}.opaque.parameters is not a JSON object"
            raise ClaimError(msg)
        size = len(json.dumps(parameters))
        if size > LIMITS.opaque_parameters_bytes:
            msg = (
                f"{where}.opaque.parameters is {size} bytes, over {LIMITS.opaque_parameters_bytes}"
            )
            raise ClaimError(msg)
        requests = entry.get("requests") or []
        if not isinstance(requests, list) or not all(isinstance(r, str) for r in requests):
            msg = f"{where}.requests is not a list of request names"
            raise ClaimError(msg)
        configs.append(
            OpaqueConfig(
                source=str(entry.get("source") or "FromClaim"),
                requests=tuple(requests),
                parameters=parameters,
            )
        )
    # Class configs first, then claim configs: later entries win.
    return sorted(configs, key=lambda c: c.source != "FromClass")
