"""Strict pydantic schemas of the fake backend's YAML: devices, inventories, the control file.

Every model forbids unknown fields and does not coerce types (``"4"`` is not an int), so a
typo in an inventory or control file is an error naming the field path
(``devices[1].capacity.memory.requestPolicy.default``) instead of a silently ignored key
(``dra_core.describe_validation_error`` turns pydantic's ``ValidationError`` into that
one-line message).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from dra_backend_fake import DRIVER_NAME
from dra_core import LIMITS, AttributeValue, QuantityError, Version, parse_quantity

__all__ = (
    "API_VERSION",
    "RESERVED_ATTRIBUTES",
    "CapacitySpec",
    "ControlSpec",
    "DeviceSpec",
    "InventorySpec",
    "PartitionsSpec",
    "RequestPolicySpec",
    "UnhealthySpec",
    "ValidRangeSpec",
    "is_dns_label",
    "partition_name",
)

#: ``apiVersion`` of inventory files and of the opaque configuration.
API_VERSION = f"{DRIVER_NAME}/v1"

#: Attributes the backend sets itself; an inventory may not define them.
RESERVED_ATTRIBUTES = frozenset({"type", "parent", "partition"})

#: The counter every partitioned device's counter set has: one slot per partition, so whole
#: device and partitions exclude each other exactly, whatever the other counters say.
PARTITIONS_COUNTER = "partitions"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_C_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?$"
)


def partition_name(device: str, index: int) -> str:
    """The stable name of partition ``index`` of ``device``: ``<device>-p<index>``."""
    return f"{device}-p{index}"


def is_dns_label(value: str) -> bool:
    """True for an RFC 1123 label: lower-case alphanumerics and '-', at most 63 characters."""
    return len(value) <= 63 and bool(_DNS_LABEL.fullmatch(value))


def _check_qualified_name(kind: str, name: str) -> None:
    domain, _, identifier = name.rpartition("/")
    labels = domain.split(".") if domain else []
    if domain and (
        len(domain) > LIMITS.qualified_domain_length or not all(map(is_dns_label, labels))
    ):
        msg = f"{kind} {name!r}: domain {domain!r} is not a DNS subdomain of at most 63 characters"
        raise ValueError(msg)
    if len(identifier) > LIMITS.identifier_length or not _C_IDENTIFIER.fullmatch(identifier):
        msg = (
            f"{kind} {name!r}: {identifier!r} must be a C identifier (letters, digits, '_') "
            f"of at most {LIMITS.identifier_length} characters"
        )
        raise ValueError(msg)


def _quantity(value: object) -> object:
    """A quantity given as a YAML number or string, as the string the API carries."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        return value  # the strict str check reports the wrong type
    text = str(value)
    try:
        parse_quantity(text)
    except QuantityError as exc:
        raise ValueError(str(exc)) from None
    return text


Quantity = Annotated[str, BeforeValidator(_quantity)]


def _attribute(name: str, value: object) -> AttributeValue:
    """An attribute in the API's typed form (``{int: 4}``) or as a plain YAML scalar."""
    if isinstance(value, dict):
        if len(value) != 1 or next(iter(value)) not in ("string", "int", "bool", "version"):
            msg = (
                f"attribute {name!r}: give exactly one of string, int, bool or version "
                f"(e.g. {{int: 4}}), not {sorted(map(str, value))}"
            )
            raise ValueError(msg)
        ((kind, raw),) = value.items()
        expected: type | tuple[type, ...] = {"string": str, "int": int, "bool": bool}.get(kind, str)
        if not isinstance(raw, expected) or (kind == "int" and isinstance(raw, bool)):
            msg = f"attribute {name!r}: {kind} value {raw!r} is a {type(raw).__name__}"
            raise ValueError(msg)
        if kind == "version":
            if not isinstance(raw, str) or not _SEMVER.fullmatch(raw):
                msg = f"attribute {name!r}: {raw!r} is not a semantic version such as '1.2.3'"
                raise ValueError(msg)
            return Version(raw)
        value = raw
    if isinstance(value, bool | int):
        if not isinstance(value, bool) and not -(2**63) <= value < 2**63:
            msg = f"attribute {name!r}: {value} does not fit in int64"
            raise ValueError(msg)
        return value
    if isinstance(value, str):
        if len(value) > LIMITS.attribute_value_length:
            msg = (
                f"attribute {name!r}: string of {len(value)} characters is longer than "
                f"{LIMITS.attribute_value_length}"
            )
            raise ValueError(msg)
        return value
    msg = (
        f"attribute {name!r}: {type(value).__name__} is not a string, int or bool "
        "(use {version: '1.2.3'} for versions)"
    )
    raise ValueError(msg)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ValidRangeSpec(_Strict):
    """``requestPolicy.validRange``: requests round up to ``min`` + k * ``step``, up to ``max``."""

    min: Quantity
    max: Quantity | None = None
    step: Quantity | None = None


class RequestPolicySpec(_Strict):
    """``requestPolicy`` of a shared capacity (``validValues`` or ``validRange``, not both)."""

    default: Quantity | None = None
    validValues: list[Quantity] = Field(default_factory=list, max_length=LIMITS.valid_values)
    validRange: ValidRangeSpec | None = None

    @model_validator(mode="after")
    def _one_policy(self) -> RequestPolicySpec:
        if self.validValues and self.validRange is not None:
            raise ValueError("validValues and validRange exclude each other; keep one")
        if (self.validValues or self.validRange is not None) and self.default is None:
            raise ValueError("validValues or validRange need a default")
        return self


class CapacitySpec(_Strict):
    """A capacity: ``{value: 16Gi, requestPolicy: ...}``, or just ``16Gi``."""

    value: Quantity
    requestPolicy: RequestPolicySpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, int | str) and not isinstance(data, bool):
            return {"value": data}
        return data


class PartitionsSpec(_Strict):
    """Split a device into ``count`` partitions sharing one counter set with the whole device.

    ``counters`` are the set's totals; when omitted, each capacity of the device whose name is
    a DNS label becomes a counter. A ``partitions`` counter of ``count`` slots is always added.
    Each partition takes ``1/count`` of every counter and of every capacity; the whole device
    takes everything, so whole-device and partition allocations exclude each other.
    """

    count: int = Field(ge=1, le=64)
    counters: dict[str, Quantity] | None = None

    @field_validator("counters")
    @classmethod
    def _counter_names(cls, counters: dict[str, str] | None) -> dict[str, str] | None:
        for name in counters or {}:
            if not is_dns_label(name):
                msg = f"counter name {name!r} is not a DNS label (lower-case, digits, '-')"
                raise ValueError(msg)
            if name == PARTITIONS_COUNTER:
                msg = f"counter {name!r} is added by the backend; do not list it"
                raise ValueError(msg)
        return counters


class DeviceSpec(_Strict):
    """One configured device (a plain, partitioned or shared device).

    ``name`` is a DNS label and becomes the device name; a partitioned device also publishes
    ``<name>-p0`` .. ``<name>-p<count-1>``.
    """

    name: str
    attributes: dict[str, Any] = Field(default_factory=dict)
    capacity: dict[str, CapacitySpec] = Field(default_factory=dict)
    partitions: PartitionsSpec | None = None
    shared: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not is_dns_label(name):
            msg = (
                f"{name!r} is not a DNS label: lower-case letters, digits and '-', starting and "
                "ending with a letter or digit, at most 63 characters"
            )
            raise ValueError(msg)
        return name

    @field_validator("attributes")
    @classmethod
    def _attributes(cls, attributes: dict[str, Any]) -> dict[str, Any]:
        converted: dict[str, Any] = {}
        for name, value in attributes.items():
            _check_qualified_name("attribute", name)
            if name in RESERVED_ATTRIBUTES:
                msg = (
                    f"attribute {name!r} is set by the backend "
                    f"(reserved: {', '.join(sorted(RESERVED_ATTRIBUTES))}); rename it"
                )
                raise ValueError(msg)
            converted[name] = _attribute(name, value)
        return converted

    @field_validator("capacity")
    @classmethod
    def _capacity_names(cls, capacity: dict[str, CapacitySpec]) -> dict[str, CapacitySpec]:
        for name in capacity:
            _check_qualified_name("capacity", name)
        return capacity

    @model_validator(mode="after")
    def _consistent(self) -> DeviceSpec:
        if self.shared and self.partitions is not None:
            msg = (
                f"device {self.name!r}: shared and partitions exclude each other in the fake "
                "backend; configure two devices instead"
            )
            raise ValueError(msg)
        for name, capacity in self.capacity.items():
            if capacity.requestPolicy is not None and not self.shared:
                msg = (
                    f"device {self.name!r}: capacity {name!r} has a requestPolicy, which only "
                    "a shared device may have; add 'shared: true' or drop the requestPolicy"
                )
                raise ValueError(msg)
        total = len(self.attributes) + len(self.capacity) + len(RESERVED_ATTRIBUTES)
        if total > LIMITS.attributes_and_capacities_per_device:
            msg = (
                f"device {self.name!r}: {total} attributes and capacities (with the backend's "
                f"own) are more than {LIMITS.attributes_and_capacities_per_device}"
            )
            raise ValueError(msg)
        if self.partitions is not None:
            last = partition_name(self.name, self.partitions.count - 1)
            if not is_dns_label(last):
                msg = (
                    f"device {self.name!r}: partition name {last!r} is longer than 63 "
                    "characters; shorten the device name"
                )
                raise ValueError(msg)
        return self

    def device_names(self) -> list[str]:
        """Every device name this spec publishes, in publishing order (partitions first)."""
        if self.partitions is None:
            return [self.name]
        return [partition_name(self.name, i) for i in range(self.partitions.count)] + [self.name]


def _unique_names(devices: list[DeviceSpec], field: str) -> None:
    seen: dict[str, int] = {}
    for index, spec in enumerate(devices):
        for name in spec.device_names():
            if name in seen:
                msg = (
                    f"{field}[{index}]: device name {name!r} is already used by "
                    f"{field}[{seen[name]}] ({devices[seen[name]].name!r}); names must be unique"
                )
                raise ValueError(msg)
            seen[name] = index


class InventorySpec(_Strict):
    """An inventory file: ``devices`` (and optionally ``apiVersion`` / ``kind`` for humans)."""

    apiVersion: Literal["fake.dra-core.dev/v1"] | None = None
    kind: Literal["FakeInventory"] | None = None
    devices: list[DeviceSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> InventorySpec:
        _unique_names(self.devices, "devices")
        return self


class UnhealthySpec(_Strict):
    """Why a device is unhealthy, and whether running pods are evicted (``NoExecute``);
    ``reason`` and ``taint`` become the taint's value and key name (`DeviceHealth`)."""

    message: str = Field(min_length=1)
    effect: Literal["NoSchedule", "NoExecute"] = "NoSchedule"
    reason: str = Field(default="", pattern=r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
    taint: str = Field(
        default="unhealthy", pattern=r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"message": data} if isinstance(data, str) else data


class ControlSpec(_Strict):
    """The control file: changes to the inventory, health and injected failures.

    Every entry holds until it is removed from the file ("until removed", not "once"), so a
    retried prepare keeps failing until the test says otherwise.
    """

    add: list[DeviceSpec] = Field(default_factory=list)
    remove: list[str] = Field(default_factory=list)
    unhealthy: dict[str, UnhealthySpec] = Field(default_factory=dict)
    failPrepare: dict[str, str] = Field(default_factory=dict)
    failUnprepare: dict[str, str] = Field(default_factory=dict)
    hangPrepare: dict[str, Annotated[float, Field(ge=0, le=3600)]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _unique(self) -> ControlSpec:
        _unique_names(self.add, "add")
        return self
