"""The fake inventory: device specs from configuration turned into the published model.

Sources, in order: an inventory YAML file (``--inventory``), else the ``backend`` section of
the agent's configuration file, plus ``--devices N`` plain devices ``dev-0`` .. ``dev-<N-1>``;
with none of them, :data:`DEFAULT_INVENTORY`. :func:`build` turns specs into
:class:`dra_core.Inventory`: plain devices, shared devices (``allowMultipleAllocations`` and
request policies) and partitioned devices (the whole device then its partitions, consuming one
counter set named after the device: on an API server without partitionable devices the core
keeps devices in this order while the counters allow, so the whole device stays there).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import yaml
from pydantic import ValidationError

from dra_backend_fake.files import load_yaml_file
from dra_backend_fake.schema import (
    PARTITIONS_COUNTER,
    CapacitySpec,
    DeviceSpec,
    InventorySpec,
    is_dns_label,
    partition_name,
)
from dra_core import (
    AttributeValue,
    Capacity,
    CounterConsumption,
    CounterSet,
    Device,
    Inventory,
    RequestPolicy,
    ValidRange,
    describe_validation_error,
    format_bytes,
    parse_quantity,
)

__all__ = (
    "DEFAULT_INVENTORY",
    "MAX_BYTES",
    "InventoryError",
    "build",
    "config_specs",
    "default_specs",
    "load_file",
    "parse_inventory",
    "simple_devices",
)

#: The built-in inventory: what ``dra-core discover --backend fake`` shows with no options.
DEFAULT_INVENTORY = """\
apiVersion: fake.dra-core.dev/v1
kind: FakeInventory
devices:
  # Four plain devices: one claim each.
  - {name: dev-0, attributes: {model: fake-basic, index: 0}, capacity: {memory: 1Gi}}
  - {name: dev-1, attributes: {model: fake-basic, index: 1}, capacity: {memory: 1Gi}}
  - {name: dev-2, attributes: {model: fake-basic, index: 2}, capacity: {memory: 1Gi}}
  - {name: dev-3, attributes: {model: fake-basic, index: 3}, capacity: {memory: 1Gi}}
  # A device shared by several claims through consumable capacity.
  - name: shared-0
    shared: true
    attributes: {model: fake-shared}
    capacity:
      memory:
        value: 8Gi
        requestPolicy: {default: 1Gi, validRange: {min: 512Mi, max: 8Gi, step: 512Mi}}
      millicores:
        value: 1000
        requestPolicy: {default: 100, validRange: {min: 100, max: 1000, step: 100}}
  # A partitionable device: big-0-p0 .. big-0-p3, or the whole big-0, never both.
  - name: big-0
    attributes: {model: fake-partitionable, firmware: {version: 1.2.3}}
    capacity: {memory: 16Gi}
    partitions: {count: 4}
"""


#: The most bytes read of an inventory file (1024 devices take about 200 KiB).
MAX_BYTES: Final = 4 << 20


class InventoryError(ValueError):
    """An inventory (file, configuration section or control-file addition) is invalid."""


def parse_inventory(data: object, source: str) -> list[DeviceSpec]:
    """Decode an inventory mapping strictly; ``source`` names it in the error."""
    if data is None:
        data = {}
    try:
        spec = InventorySpec.model_validate(data)
    except ValidationError as exc:
        msg = f"{source}: {describe_validation_error(exc)}"
        raise InventoryError(msg) from None
    return list(spec.devices)


def load_file(path: Path) -> list[DeviceSpec]:
    """The device specs of an inventory YAML file; InventoryError names the file and field.

    The file is one document: any error in it (a FIFO or device in its place, more than
    :data:`MAX_BYTES`, bad YAML, a bad field) fails the whole file, and the agent does not
    start.
    """
    try:
        data = load_yaml_file(path, "inventory file", MAX_BYTES, InventoryError)
    except FileNotFoundError:
        msg = f"inventory file {path}: cannot be read: it does not exist"
        raise InventoryError(msg) from None
    return parse_inventory(data, f"inventory file {path}")


def default_specs() -> list[DeviceSpec]:
    """The device specs of :data:`DEFAULT_INVENTORY`."""
    return parse_inventory(yaml.safe_load(DEFAULT_INVENTORY), "the built-in inventory")


def simple_devices(count: int, taken: Iterable[str] = ()) -> list[DeviceSpec]:
    """``count`` plain devices ``dev-0`` .. ``dev-<count-1>``, each with 1Gi of memory."""
    taken = set(taken)
    specs = []
    for index in range(count):
        name = f"dev-{index}"
        if name in taken:
            msg = (
                f"--devices {count}: device {name!r} is also in the inventory; rename it there "
                "or lower --devices"
            )
            raise InventoryError(msg)
        specs.append(
            DeviceSpec(
                name=name,
                attributes={"model": "fake-basic", "index": index},
                capacity={"memory": CapacitySpec(value="1Gi")},
            )
        )
    return specs


def _format(value: Decimal) -> str:
    return format_bytes(int(value)) if value == value.to_integral_value() else str(value)


def _divide(device: str, what: str, total: str, count: int) -> str:
    """``total / count`` as a quantity, which must come out whole."""
    value = parse_quantity(total)
    share = value / count
    if share != share.to_integral_value():
        msg = (
            f"device {device!r}: {what} {total} does not divide into {count} whole partitions; "
            "choose a partition count or a total that divides evenly"
        )
        raise InventoryError(msg)
    return _format(share)


def _capacity(spec: CapacitySpec) -> Capacity:
    policy = spec.requestPolicy
    if policy is None:
        return Capacity(value=spec.value)
    valid_range = None
    if policy.validRange is not None:
        rng = policy.validRange
        valid_range = ValidRange(min=rng.min, max=rng.max, step=rng.step)
    return Capacity(
        value=spec.value,
        request_policy=RequestPolicy(
            default=policy.default, valid_values=tuple(policy.validValues), valid_range=valid_range
        ),
    )


def _devices(spec: DeviceSpec) -> tuple[list[Device], CounterSet | None]:
    attributes: dict[str, AttributeValue] = {**spec.attributes, "type": "device"}
    capacity = {name: _capacity(c) for name, c in spec.capacity.items()}
    if spec.partitions is None:
        device = Device(
            name=spec.name,
            attributes=attributes,
            capacity=capacity,
            allow_multiple_allocations=spec.shared,
        )
        return [device], None
    count = spec.partitions.count
    counters = spec.partitions.counters
    if counters is None:
        counters = {n: c.value for n, c in spec.capacity.items() if is_dns_label(n)}
    totals = {**counters, PARTITIONS_COUNTER: str(count)}
    counter_set = CounterSet(name=spec.name, counters=totals)
    each = {n: _divide(spec.name, f"counter {n!r}", v, count) for n, v in totals.items()}
    part_capacity = {
        n: Capacity(value=_divide(spec.name, f"capacity {n!r}", c.value, count))
        for n, c in spec.capacity.items()
    }
    devices = [
        Device(
            name=partition_name(spec.name, index),
            attributes={
                **spec.attributes,
                "type": "partition",
                "parent": spec.name,
                "partition": index,
            },
            capacity=part_capacity,
            consumes_counters=(CounterConsumption(counter_set=spec.name, counters=each),),
        )
        for index in range(count)
    ]
    whole = Device(
        name=spec.name,
        attributes=attributes,
        capacity=capacity,
        consumes_counters=(CounterConsumption(counter_set=spec.name, counters=dict(totals)),),
    )
    return [whole, *devices], counter_set


def build(specs: Sequence[DeviceSpec], *, hidden: Iterable[str] = ()) -> Inventory:
    """The published inventory of ``specs``, leaving out the device names in ``hidden``.

    Counter sets no remaining device consumes are left out too.
    """
    hidden = set(hidden)
    devices: list[Device] = []
    counter_sets: list[CounterSet] = []
    for spec in specs:
        generated, counter_set = _devices(spec)
        devices.extend(d for d in generated if d.name not in hidden)
        if counter_set is not None:
            counter_sets.append(counter_set)
    used = {c.counter_set for d in devices for c in d.consumes_counters}
    return Inventory(
        devices=tuple(devices), counter_sets=tuple(s for s in counter_sets if s.name in used)
    )


def config_specs(config: Mapping[str, Any]) -> list[DeviceSpec] | None:
    """The device specs of the agent configuration's ``backend`` section, if it has devices."""
    if not config:
        return None
    return parse_inventory(dict(config), "the 'backend' section of the configuration file")
