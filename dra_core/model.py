"""Plain data of the backend contract: devices, counters, taints, claims as the node sees them,
prepared devices and container edits.

Everything here is a frozen dataclass with no I/O, and this module imports neither grpc nor
kubernetes, so backends and tests can build and compare these values freely. `validate_device`
and `validate_inventory` check them against the ``resource.k8s.io/v1`` rules before anything
reaches the API server, so a backend bug is reported with the device and the rule it broke.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from dra_core.quantity import QuantityError, parse_quantity

__all__ = (
    "LIMITS",
    "AllocatedClaim",
    "AllocatedDevice",
    "AttributeValue",
    "BackendIdentity",
    "Capacity",
    "ClaimRef",
    "ClaimResult",
    "ContainerEdits",
    "CounterConsumption",
    "CounterSet",
    "Device",
    "DeviceClassSpec",
    "DeviceHealth",
    "DeviceNode",
    "Inventory",
    "ModelError",
    "Mount",
    "PreparedClaim",
    "PreparedClaims",
    "PreparedDevice",
    "RequestPolicy",
    "ResultDevice",
    "Taint",
    "ValidRange",
    "Version",
    "is_dns_label",
    "is_dns_subdomain",
    "validate_claim_ref",
    "validate_device",
    "validate_driver_name",
    "validate_inventory",
)


class ModelError(ValueError):
    """A value breaks a ``resource.k8s.io/v1`` rule; the message names the object and the rule."""


# ---------------------------------------------------------------------------------------------
# API limits (k8s.io/api/resource/v1 constants, 1.35 and later)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Limits:
    """The limits, one field each (a docstring spares dataclass making one at import)."""

    devices_per_slice: int = 128
    devices_per_slice_advanced: int = 64  # when any device has taints, counters or list attributes
    counter_sets_per_slice: int = 8
    counters_per_counter_set: int = 32
    consumptions_per_device: int = 2
    counters_per_consumption: int = 32
    attributes_and_capacities_per_device: int = 32
    attribute_value_length: int = 64
    taints_per_device: int = 16
    driver_name_length: int = 63
    pool_name_length: int = 253
    qualified_domain_length: int = 63
    identifier_length: int = 32
    valid_values: int = 10
    opaque_parameters_bytes: int = 10 * 1024


LIMITS = _Limits()

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_C_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_UID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


@functools.cache
def _semver() -> re.Pattern[str]:
    """Compiled when first needed: only version attributes use it, and it takes half a
    millisecond, as long as the other patterns together."""
    return re.compile(
        r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
        r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
        r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
    )


def _is_label_name(value: str) -> bool:
    """The name part of a label key, and a non-empty label value: what taints use."""
    return len(value) <= 63 and bool(_LABEL_NAME.fullmatch(value))


def is_dns_label(value: str) -> bool:
    """True for an RFC 1123 label: lower-case alphanumerics and '-', at most 63 characters."""
    return len(value) <= 63 and bool(_DNS_LABEL.fullmatch(value))


def is_dns_subdomain(value: str, max_length: int = 253) -> bool:
    """True for an RFC 1123 subdomain: dot-separated DNS labels, at most ``max_length`` long."""
    return 0 < len(value) <= max_length and all(_DNS_LABEL.fullmatch(p) for p in value.split("."))


def validate_driver_name(name: str) -> None:
    """A driver name is a lower-case DNS subdomain of at most 63 characters."""
    if not is_dns_subdomain(name, LIMITS.driver_name_length):
        msg = (
            f"driver name {name!r} is not a lower-case DNS subdomain of at most "
            f"{LIMITS.driver_name_length} characters (e.g. 'gpu.example.com')"
        )
        raise ModelError(msg)


def _check_qualified_name(owner: str, kind: str, name: str) -> None:
    domain, _, identifier = name.rpartition("/")
    if domain and not is_dns_subdomain(domain, LIMITS.qualified_domain_length):
        msg = (
            f"{owner}: {kind} {name!r}: domain {domain!r} is not a DNS subdomain of at most "
            f"{LIMITS.qualified_domain_length} characters"
        )
        raise ModelError(msg)
    if len(identifier) > LIMITS.identifier_length or not _C_IDENTIFIER.fullmatch(identifier):
        msg = (
            f"{owner}: {kind} {name!r}: {identifier!r} is not a C identifier of at most "
            f"{LIMITS.identifier_length} characters"
        )
        raise ModelError(msg)


# ---------------------------------------------------------------------------------------------
# Published devices
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Version:
    """A semantic-version attribute value (``version`` in the API), e.g. ``Version("1.2.3")``."""

    value: str

    def __str__(self) -> str:
        return self.value


#: One of the four scalar attribute types of the API: ``bool``, ``int``, ``string``, ``version``.
AttributeValue = bool | int | str | Version


@dataclass(frozen=True)
class ValidRange:
    """Allowed request sizes of a shared capacity: ``min`` + k * ``step``, up to ``max``."""

    min: str
    max: str | None = None
    step: str | None = None


@dataclass(frozen=True)
class RequestPolicy:
    """How much of a shared capacity one allocation takes (needs ``allow_multiple_allocations``).

    ``default`` is taken when a claim asks for nothing; ``valid_values`` or ``valid_range``
    (not both) round requests up.
    """

    default: str | None = None
    valid_values: tuple[str, ...] = ()
    valid_range: ValidRange | None = None


@dataclass(frozen=True)
class Capacity:
    """A capacity of a device, as a Kubernetes quantity string (``"16Gi"``, ``"1000"``)."""

    value: str
    request_policy: RequestPolicy | None = None


@dataclass(frozen=True)
class CounterConsumption:
    """What a device takes from a shared counter set while it is allocated."""

    counter_set: str
    counters: Mapping[str, str]


@dataclass(frozen=True)
class CounterSet:
    """Counters shared by the devices of one pool, e.g. one set per SR-IOV physical function."""

    name: str
    counters: Mapping[str, str]


TaintEffect = Literal["NoSchedule", "NoExecute", "None"]


@dataclass(frozen=True)
class Taint:
    """A device taint; the scheduler avoids NoSchedule and NoExecute devices unless tolerated."""

    key: str
    effect: TaintEffect
    value: str = ""


@dataclass(frozen=True)
class Device:
    """A device as published in a ResourceSlice.

    ``name`` is a DNS label, unique in the pool and stable across reboots (derive it from
    hardware identity such as the PCI address, never from enumeration order). Unqualified
    attribute and capacity names belong to the driver's domain.

    ``exclusive_without_sharing`` is the backend's choice for a shared device
    (``allow_multiple_allocations``) on an API server without consumable capacity (feature
    gate DRAConsumableCapacity off), which cannot share it: False (the default) leaves the
    device out; True publishes it as an ordinary device, one claim at a time, without request
    policies, so prepare then sees an allocation without ``share_id`` or consumed capacity.
    It is not published itself.
    """

    name: str
    attributes: Mapping[str, AttributeValue] = field(default_factory=dict)
    capacity: Mapping[str, Capacity] = field(default_factory=dict)
    consumes_counters: tuple[CounterConsumption, ...] = ()
    taints: tuple[Taint, ...] = ()
    allow_multiple_allocations: bool = False
    exclusive_without_sharing: bool = False

    @property
    def uses_advanced_features(self) -> bool:
        """Taints or counters halve the number of devices a slice may hold."""
        return bool(self.taints or self.consumes_counters)


@dataclass(frozen=True)
class Inventory:
    """What the backend publishes for this node: its devices and the counter sets they share."""

    devices: tuple[Device, ...] = ()
    counter_sets: tuple[CounterSet, ...] = ()

    def device(self, name: str) -> Device | None:
        """The device called ``name``, or None."""
        return self._by_name.get(name)

    @functools.cached_property
    def _by_name(self) -> dict[str, Device]:
        # A prepare looks up its devices by name: the same cost with 4 devices or 1,000.
        return {d.name: d for d in self.devices}


@dataclass(frozen=True)
class BackendIdentity:
    """Who a backend is: its default driver name and the CDI kind of the specs it writes."""

    driver_name: str
    cdi_vendor: str
    cdi_class: str

    @property
    def cdi_kind(self) -> str:
        return f"{self.cdi_vendor}/{self.cdi_class}"


@dataclass(frozen=True)
class DeviceClassSpec:
    """A DeviceClass the backend's users request, rendered into ``deploy/``."""

    name: str
    selectors: tuple[str, ...]
    description: str = ""
    config: Mapping[str, object] | None = None


@dataclass(frozen=True)
class DeviceHealth:
    """The health of one device as a backend sees it; ``message`` says why when unhealthy.

    An unhealthy device is published with the taint ``<driver>/<taint>=<reason>:<effect>``:
    ``taint`` names the taint within the driver's domain (``unhealthy`` unless the backend
    tells problems apart, e.g. ``thermal``), and ``reason`` is a short machine-readable cause
    (``Overheating``) a toleration can match; both follow the label rules the API server
    applies to taint keys and values, checked here (ModelError names the device and rule).
    ``message`` is free text for the operator: logs and the kubelet's health stream.
    """

    device: str
    healthy: bool
    message: str = ""
    #: NoExecute evicts running pods as well as keeping new ones away.
    effect: TaintEffect = "NoSchedule"
    reason: str = ""
    taint: str = "unhealthy"

    def __post_init__(self) -> None:
        owner = f"health of device {self.device!r}"
        if not _is_label_name(self.taint):
            msg = (
                f"{owner}: taint {self.taint!r} is not a name of at most 63 letters, digits, "
                "'-', '_' and '.', starting and ending with a letter or digit"
            )
            raise ModelError(msg)
        if self.reason and not _is_label_name(self.reason):
            msg = (
                f"{owner}: reason {self.reason!r} is not empty or at most 63 letters, digits, "
                "'-', '_' and '.', starting and ending with a letter or digit (put free text "
                "in message)"
            )
            raise ModelError(msg)


# ---------------------------------------------------------------------------------------------
# Claims as the node sees them
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClaimRef:
    """A ResourceClaim named in a kubelet request."""

    namespace: str
    name: str
    uid: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name} ({self.uid})"


def validate_claim_ref(claim: ClaimRef) -> None:
    """Reject a claim reference that could not come from the API server.

    The UID names files (CDI spec, checkpoint entries), so it must be a UUID before it is
    used in a path.
    """
    if not _UID.fullmatch(claim.uid):
        msg = f"claim UID {claim.uid!r} is not a UUID"
        raise ModelError(msg)
    if not is_dns_label(claim.namespace):
        msg = f"claim {claim.uid}: namespace {claim.namespace!r} is not a DNS label"
        raise ModelError(msg)
    if not is_dns_subdomain(claim.name):
        msg = f"claim {claim.uid}: name {claim.name!r} is not a DNS subdomain"
        raise ModelError(msg)


@dataclass(frozen=True)
class AllocatedDevice:
    """One allocation result of a claim for this driver and this node's pool."""

    request: str
    pool: str
    device: str
    share_id: str | None = None
    consumed_capacity: Mapping[str, str] = field(default_factory=dict)
    admin_access: bool = False

    @property
    def base_request(self) -> str:
        """The request name without a ``/subrequest`` suffix, as the kubelet matches it."""
        return self.request.split("/", 1)[0]


@dataclass(frozen=True)
class AllocatedClaim:
    """A claim's allocation on this node for this driver, with its decoded opaque config.

    ``configs`` maps each request name to the backend's decoded configs that apply to it, in
    precedence order (class configs first, then claim configs; later wins).
    """

    ref: ClaimRef
    devices: tuple[AllocatedDevice, ...]
    configs: Mapping[str, tuple[object, ...]] = field(default_factory=dict)

    def configs_for(self, device: AllocatedDevice) -> tuple[object, ...]:
        """The decoded configs that apply to one allocated device."""
        return self.configs.get(device.request, ())


# ---------------------------------------------------------------------------------------------
# Prepared devices and container edits
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceNode:
    """A device node to create in the container (``/dev/dri/renderD128``)."""

    path: str
    host_path: str | None = None
    type: Literal["c", "b", "u", "p", ""] = ""
    major: int | None = None
    minor: int | None = None
    permissions: str = ""


@dataclass(frozen=True)
class Mount:
    """A bind mount from the host into the container."""

    host_path: str
    container_path: str
    options: tuple[str, ...] = ("ro", "nosuid", "nodev", "bind")
    type: str | None = None


@dataclass(frozen=True)
class ContainerEdits:
    """What a container needs to use a device: environment, device nodes, mounts."""

    env: Mapping[str, str] = field(default_factory=dict)
    device_nodes: tuple[DeviceNode, ...] = ()
    mounts: tuple[Mount, ...] = ()

    @property
    def empty(self) -> bool:
        """No edit at all (CDI forbids empty edits, so such edits get no CDI device)."""
        return not (self.env or self.device_nodes or self.mounts)

    def merged(self, other: ContainerEdits) -> ContainerEdits:
        """These edits followed by ``other``'s (``other`` wins on an environment clash)."""
        return ContainerEdits(
            env={**self.env, **other.env},
            device_nodes=self.device_nodes + other.device_nodes,
            mounts=self.mounts + other.mounts,
        )


@dataclass(frozen=True)
class PreparedDevice:
    """One allocated device made usable: its container edits and what unprepare needs.

    ``state`` is backend-private, JSON-serialisable data kept in the checkpoint and handed back
    at unprepare (e.g. which VF was created), so unprepare works after a restart and after the
    claim is gone from the API.
    """

    allocation: AllocatedDevice
    edits: ContainerEdits = field(default_factory=ContainerEdits)
    state: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class PreparedClaim:
    """A claim prepared on this node, as recorded in the checkpoint.

    ``edits`` belong to the whole claim (from :func:`dra_core.hookspecs.dra_claim_edits`): the
    CDI spec holds them once, in a claim device every device of the claim names, so a
    container with several claims of one driver gets each claim's edits exactly once.
    """

    ref: ClaimRef
    devices: tuple[PreparedDevice, ...]
    edits: ContainerEdits = field(default_factory=ContainerEdits)

    @property
    def held_devices(self) -> frozenset[str]:
        """The devices this claim holds: all it was allocated but admin-access ones
        (monitoring beside the users holds nothing)."""
        return frozenset(d.allocation.device for d in self.devices if not d.allocation.admin_access)


class PreparedClaims:
    """The claims prepared on this node, from the checkpoint: a read-only view for
    :func:`dra_core.hookspecs.dra_check_allocation`, without the claim being checked.

    It includes claims whose prepare was started and not finished (a crash in between): their
    devices are held until they are undone.
    """

    def __init__(self, claims: Iterable[PreparedClaim] = ()) -> None:
        self._claims = tuple(claims)

    @property
    def claims(self) -> tuple[PreparedClaim, ...]:
        """Every claim of the view."""
        return self._claims

    def holding(self, device: str) -> tuple[PreparedClaim, ...]:
        """The claims with an allocation of ``device``, shared ones too; an admin-access
        allocation (monitoring beside the users) holds nothing, so it does not count."""
        return tuple(c for c in self.claims if device in c.held_devices)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PreparedClaims):
            return NotImplemented
        return self.claims == other.claims

    __hash__ = None  # type: ignore[assignment]  # a view of changing state

    def __repr__(self) -> str:
        return f"PreparedClaims({self.claims!r})"


@dataclass(frozen=True)
class ResultDevice:
    """One device of a prepared claim as the kubelet is told about it."""

    request_names: tuple[str, ...]
    pool_name: str
    device_name: str
    cdi_device_ids: tuple[str, ...]
    share_id: str | None = None


@dataclass(frozen=True)
class ClaimResult:
    """The outcome of preparing one claim: its devices, or an error a user can act on."""

    devices: tuple[ResultDevice, ...] = ()
    error: str = ""


# ---------------------------------------------------------------------------------------------
# Validation against the API rules
# ---------------------------------------------------------------------------------------------


def _check_quantity(owner: str, what: str, value: str) -> None:
    try:
        parse_quantity(value)
    except QuantityError as exc:
        msg = f"{owner}: {what}: {exc}"
        raise ModelError(msg) from None


def _check_attribute(owner: str, name: str, value: AttributeValue) -> None:
    _check_qualified_name(owner, "attribute", name)
    if isinstance(value, bool | int):
        if not isinstance(value, bool) and not -(2**63) <= value < 2**63:
            msg = f"{owner}: attribute {name!r}: {value} does not fit in int64"
            raise ModelError(msg)
        return
    if isinstance(value, Version):
        if len(value.value) > LIMITS.attribute_value_length or not _semver().fullmatch(value.value):
            msg = f"{owner}: attribute {name!r}: {value.value!r} is not a semantic version"
            raise ModelError(msg)
        return
    if isinstance(value, str):
        if len(value) > LIMITS.attribute_value_length:
            msg = (
                f"{owner}: attribute {name!r}: string of {len(value)} characters is longer "
                f"than {LIMITS.attribute_value_length}"
            )
            raise ModelError(msg)
        return
    msg = f"{owner}: attribute {name!r}: {type(value).__name__} is not bool, int, str or Version"
    raise ModelError(msg)


def _check_request_policy(owner: str, name: str, capacity: Capacity) -> None:
    policy = capacity.request_policy
    if policy is None:
        return
    where = f"capacity {name!r} requestPolicy"
    if policy.valid_values and policy.valid_range:
        msg = f"{owner}: {where}: validValues and validRange exclude each other"
        raise ModelError(msg)
    if (policy.valid_values or policy.valid_range) and policy.default is None:
        msg = f"{owner}: {where}: validValues or validRange need a default"
        raise ModelError(msg)
    total = parse_quantity(capacity.value)
    if policy.default is not None:
        _check_quantity(owner, f"{where} default", policy.default)
    if policy.valid_values:
        if len(policy.valid_values) > LIMITS.valid_values:
            msg = f"{owner}: {where}: more than {LIMITS.valid_values} validValues"
            raise ModelError(msg)
        values = [parse_quantity(v) for v in policy.valid_values]
        if values != sorted(set(values)) or values[-1] > total:
            msg = f"{owner}: {where}: validValues must be ascending, unique and <= {capacity.value}"
            raise ModelError(msg)
        if policy.default is not None and parse_quantity(policy.default) not in values:
            msg = f"{owner}: {where}: default {policy.default} is not one of validValues"
            raise ModelError(msg)
    if policy.valid_range:
        rng = policy.valid_range
        low = parse_quantity(rng.min)
        high = parse_quantity(rng.max) if rng.max is not None else total
        default = parse_quantity(policy.default) if policy.default is not None else low
        if not low <= default <= high <= total:
            msg = f"{owner}: {where}: need min <= default <= max <= {capacity.value}"
            raise ModelError(msg)
        if rng.step is not None:
            step = parse_quantity(rng.step)
            if step <= 0 or (default - low) % step or (high - low) % step:
                msg = f"{owner}: {where}: default - min and max - min must be multiples of step"
                raise ModelError(msg)


def validate_device(device: Device) -> None:
    """Check one device against the API rules; raise ModelError naming the device and rule."""
    owner = f"device {device.name!r}"
    if not is_dns_label(device.name):
        msg = f"{owner}: the name is not a DNS label (lower-case alphanumerics and '-', <= 63)"
        raise ModelError(msg)
    for name, value in device.attributes.items():
        _check_attribute(owner, name, value)
    for name, capacity in device.capacity.items():
        _check_qualified_name(owner, "capacity", name)
        _check_quantity(owner, f"capacity {name!r}", capacity.value)
        if capacity.request_policy is not None and not device.allow_multiple_allocations:
            msg = (
                f"{owner}: capacity {name!r} has a requestPolicy, "
                "which needs allowMultipleAllocations"
            )
            raise ModelError(msg)
        _check_request_policy(owner, name, capacity)
    total = len(device.attributes) + len(device.capacity)
    if total > LIMITS.attributes_and_capacities_per_device:
        msg = (
            f"{owner}: {total} attributes and capacities, more than "
            f"{LIMITS.attributes_and_capacities_per_device}"
        )
        raise ModelError(msg)
    if len(device.consumes_counters) > LIMITS.consumptions_per_device:
        msg = f"{owner}: consumes from more than {LIMITS.consumptions_per_device} counter sets"
        raise ModelError(msg)
    seen_sets: set[str] = set()
    for consumption in device.consumes_counters:
        if consumption.counter_set in seen_sets:
            msg = f"{owner}: counter set {consumption.counter_set!r} is consumed twice"
            raise ModelError(msg)
        seen_sets.add(consumption.counter_set)
        if len(consumption.counters) > LIMITS.counters_per_consumption:
            msg = f"{owner}: more than {LIMITS.counters_per_consumption} counters from one set"
            raise ModelError(msg)
        for counter, value in consumption.counters.items():
            _check_quantity(owner, f"counter {consumption.counter_set}/{counter}", value)
    if len(device.taints) > LIMITS.taints_per_device:
        msg = f"{owner}: more than {LIMITS.taints_per_device} taints"
        raise ModelError(msg)
    for taint in device.taints:
        _check_taint(owner, taint)


def _check_taint(owner: str, taint: Taint) -> None:
    """A taint key is a label key (``domain/name``), its value a label value."""
    domain, _, name = taint.key.rpartition("/")
    if (domain and not is_dns_subdomain(domain)) or not _is_label_name(name):
        msg = (
            f"{owner}: taint key {taint.key!r} is not a qualified name (an optional DNS "
            "subdomain and '/', then at most 63 letters, digits, '-', '_' and '.')"
        )
        raise ModelError(msg)
    if taint.value and not _is_label_name(taint.value):
        msg = f"{owner}: taint {taint.key!r}: value {taint.value!r} is not a label value"
        raise ModelError(msg)


def _validate_counter_set(counter_set: CounterSet) -> None:
    owner = f"counter set {counter_set.name!r}"
    if not is_dns_label(counter_set.name):
        msg = f"{owner}: the name is not a DNS label"
        raise ModelError(msg)
    if len(counter_set.counters) > LIMITS.counters_per_counter_set:
        msg = f"{owner}: more than {LIMITS.counters_per_counter_set} counters"
        raise ModelError(msg)
    for counter, value in counter_set.counters.items():
        if not is_dns_label(counter):
            msg = f"{owner}: counter name {counter!r} is not a DNS label"
            raise ModelError(msg)
        _check_quantity(owner, f"counter {counter!r}", value)


def validate_inventory(inventory: Inventory) -> None:
    """Check every device and counter set, unique names, and that counters referenced exist."""
    _check_unique("device", (d.name for d in inventory.devices))
    _check_unique("counter set", (s.name for s in inventory.counter_sets))
    sets = {s.name: s for s in inventory.counter_sets}
    for counter_set in inventory.counter_sets:
        _validate_counter_set(counter_set)
    for device in inventory.devices:
        validate_device(device)
        for consumption in device.consumes_counters:
            consumed_set = sets.get(consumption.counter_set)
            if consumed_set is None:
                msg = (
                    f"device {device.name!r}: consumes from counter set "
                    f"{consumption.counter_set!r}, which the inventory does not define"
                )
                raise ModelError(msg)
            missing = sorted(set(consumption.counters) - set(consumed_set.counters))
            if missing:
                msg = (
                    f"device {device.name!r}: counters {missing} are not in counter set "
                    f"{consumed_set.name!r}"
                )
                raise ModelError(msg)


def _check_unique(kind: str, names: Iterable[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            msg = f"{kind} name {name!r} is used twice in the pool"
            raise ModelError(msg)
        seen.add(name)
