"""The inventory: the built-in default, YAML files feature by feature, flags, strict errors."""

from __future__ import annotations

import textwrap

import pytest
import yaml
from dra_backend_fake.inventory import (
    DEFAULT_INVENTORY,
    InventoryError,
    build,
    default_specs,
    load_file,
    parse_inventory,
)

from dra_core import Capacity, RequestPolicy, ValidRange, Version
from dra_core.model import validate_inventory


def inventory_of(text: str):
    inventory = build(parse_inventory(yaml.safe_load(textwrap.dedent(text)), "test"))
    validate_inventory(inventory)
    return inventory


def error_of(text: str) -> str:
    with pytest.raises(InventoryError) as info:
        inventory_of(text)
    return str(info.value)


# ------------------------------------------------------------------ the built-in default
def test_default_inventory_is_valid_and_has_every_kind_of_device():
    inventory = build(default_specs())
    validate_inventory(inventory)
    names = [d.name for d in inventory.devices]
    assert names[:4] == ["dev-0", "dev-1", "dev-2", "dev-3"]
    assert "shared-0" in names
    assert names[-5:] == ["big-0", "big-0-p0", "big-0-p1", "big-0-p2", "big-0-p3"]
    assert inventory.device("shared-0").allow_multiple_allocations
    assert [s.name for s in inventory.counter_sets] == ["big-0"]


def test_default_inventory_text_is_an_inventory_file(tmp_path):
    path = tmp_path / "inventory.yaml"
    path.write_text(DEFAULT_INVENTORY)
    assert load_file(path) == default_specs()


# ------------------------------------------------------------------ features
def test_typed_attributes_in_api_form_and_as_scalars():
    inventory = inventory_of(
        """
        devices:
          - name: a
            attributes:
              model: {string: x1}
              cores: {int: 8}
              fast: {bool: true}
              firmware: {version: 1.2.3-rc.1}
              plain: hello
              count: 3
              flag: false
              example.com/vendor: acme
        """
    )
    attrs = inventory.device("a").attributes
    assert attrs == {
        "model": "x1",
        "cores": 8,
        "fast": True,
        "firmware": Version("1.2.3-rc.1"),
        "plain": "hello",
        "count": 3,
        "flag": False,
        "example.com/vendor": "acme",
        "type": "device",
    }
    assert isinstance(attrs["fast"], bool) and isinstance(attrs["cores"], int)


def test_capacity_shorthand_and_value_form():
    inventory = inventory_of(
        """
        devices:
          - name: a
            capacity: {memory: 16Gi, cores: 8, bandwidth: {value: "100"}}
        """
    )
    assert inventory.device("a").capacity == {
        "memory": Capacity("16Gi"),
        "cores": Capacity("8"),
        "bandwidth": Capacity("100"),
    }


def test_shared_device_with_request_policies():
    inventory = inventory_of(
        """
        devices:
          - name: s
            shared: true
            capacity:
              memory:
                value: 16Gi
                requestPolicy: {default: 1Gi, validRange: {min: 1Gi, max: 16Gi, step: 1Gi}}
              slots:
                value: 4
                requestPolicy: {default: 1, validValues: [1, 2, 4]}
              plain: 3
        """
    )
    device = inventory.device("s")
    assert device.allow_multiple_allocations
    assert device.capacity["memory"] == Capacity(
        "16Gi", RequestPolicy(default="1Gi", valid_range=ValidRange("1Gi", "16Gi", "1Gi"))
    )
    assert device.capacity["slots"].request_policy == RequestPolicy(
        default="1", valid_values=("1", "2", "4")
    )
    assert device.capacity["plain"] == Capacity("3")


def test_partitions_share_a_counter_set_with_the_whole_device_listed_first():
    inventory = inventory_of(
        """
        devices:
          - name: big
            attributes: {model: m}
            capacity: {memory: 16Gi, cores: 8}
            partitions: {count: 4}
        """
    )
    names = [d.name for d in inventory.devices]
    assert names == ["big", "big-p0", "big-p1", "big-p2", "big-p3"]
    (counter_set,) = inventory.counter_sets
    assert counter_set.name == "big"
    assert counter_set.counters == {"memory": "16Gi", "cores": "8", "partitions": "4"}
    part = inventory.device("big-p2")
    assert part.attributes == {"model": "m", "type": "partition", "parent": "big", "partition": 2}
    assert part.capacity == {"memory": Capacity("4Gi"), "cores": Capacity("2")}
    (consumed,) = part.consumes_counters
    assert consumed.counter_set == "big"
    assert consumed.counters == {"memory": "4Gi", "cores": "2", "partitions": "1"}
    whole = inventory.device("big")
    assert whole.attributes["type"] == "device"
    assert whole.consumes_counters[0].counters == counter_set.counters


def test_partitions_with_explicit_counters():
    inventory = inventory_of(
        """
        devices:
          - name: big
            capacity: {memory: 8Gi}
            partitions: {count: 2, counters: {engines: 6}}
        """
    )
    assert inventory.counter_sets[0].counters == {"engines": "6", "partitions": "2"}
    assert inventory.device("big-p1").consumes_counters[0].counters == {
        "engines": "3",
        "partitions": "1",
    }
    assert inventory.device("big-p1").capacity == {"memory": Capacity("4Gi")}


def test_optional_api_version_and_kind():
    inventory_of("apiVersion: fake.dra-core.dev/v1\nkind: FakeInventory\ndevices: []\n")
    assert "kind" in error_of("kind: Inventory\ndevices: []\n")


def test_empty_file_is_an_empty_inventory(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_file(path) == []


# ------------------------------------------------------------------ errors name the field
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("devices: [{name: a, colour: red}]", "devices[0].colour: unknown field"),
        ("devices: [{name: a}]\nextra: 1", "extra: unknown field"),
        ("devices: [{name: a, partitions: {count: '4'}}]", "devices[0].partitions.count"),
        ("devices: [{name: a, partitions: {count: 0}}]", "devices[0].partitions.count"),
        ("devices: [{name: a, shared: 'yes'}]", "devices[0].shared"),
        ("devices: [{name: Dev_0}]", "devices[0].name: 'Dev_0' is not a DNS label"),
        ("devices: [{name: a, capacity: {memory: lots}}]", "devices[0].capacity.memory"),
        (
            "devices: [{name: a, capacity: {memory: {value: 1Gi, max: 2}}}]",
            "devices[0].capacity.memory.max: unknown field",
        ),
        (
            "devices: [{name: a, capacity: {memory: {value: 4, requestPolicy: {default: 1}}}}]",
            "capacity 'memory' has a requestPolicy, which only a shared device may have",
        ),
        (
            "devices: [{name: a, shared: true, capacity: {m: {value: 4, requestPolicy: "
            "{validValues: [1]}}}}]",
            "need a default",
        ),
        (
            "devices: [{name: a, attributes: {v: {version: '1.2'}}}]",
            "attribute 'v': '1.2' is not a semantic version",
        ),
        ("devices: [{name: a, attributes: {v: {int: '1'}}}]", "attribute 'v': int value '1'"),
        ("devices: [{name: a, attributes: {v: {float: 1.5}}}]", "exactly one of string"),
        ("devices: [{name: a, attributes: {v: 1.5}}]", "attribute 'v': float"),
        ("devices: [{name: a, attributes: {type: gpu}}]", "attribute 'type' is set by the backend"),
        ("devices: [{name: a, attributes: {bad-name: 1}}]", "must be a C identifier"),
        ("devices: [{name: a}, {name: a}]", "devices[1]: device name 'a' is already used"),
        (
            "devices: [{name: a-p0}, {name: a, partitions: {count: 2}}]",
            "device name 'a-p0' is already used by devices[0]",
        ),
        (
            "devices: [{name: a, shared: true, partitions: {count: 2}}]",
            "shared and partitions exclude each other",
        ),
        (
            "devices: [{name: a, partitions: {count: 2, counters: {Mem: 2}}}]",
            "devices[0].partitions.counters: counter name 'Mem' is not a DNS label",
        ),
        (
            "devices: [{name: a, partitions: {count: 2, counters: {partitions: 2}}}]",
            "counter 'partitions' is added by the backend",
        ),
        ("devices: {name: a}", "devices: "),
    ],
)
def test_bad_inventory_is_an_error_naming_the_field(text, expected):
    message = error_of(text)
    assert message.startswith("test: ")
    assert expected in message


def test_counters_that_do_not_divide_are_an_error():
    message = error_of("devices: [{name: a, capacity: {memory: 10}, partitions: {count: 3}}]")
    assert "device 'a'" in message and "does not divide into 3" in message


def test_bad_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("devices: [\n")
    with pytest.raises(InventoryError, match=r"inventory file .*broken.yaml: not valid YAML"):
        load_file(path)
    with pytest.raises(InventoryError, match=r"inventory file .*missing.yaml: cannot be read"):
        load_file(tmp_path / "missing.yaml")
    path.write_text("devices: [{name: a, nmae: b}]")
    with pytest.raises(InventoryError, match=r"broken.yaml: devices\[0\]\.nmae: unknown field"):
        load_file(path)


# ------------------------------------------------------------------ sources: file, flags, config
def test_file_flags_and_config_section(start, tmp_path):
    path = tmp_path / "inv.yaml"
    path.write_text("devices: [{name: only}]")
    assert start(inventory=path).names() == ["only"]
    assert start(devices=2).names() == ["dev-0", "dev-1"]
    assert start(inventory=path, devices=1).names() == ["only", "dev-0"]
    assert start(devices=0).names() == []
    assert start(config={"devices": [{"name": "from-config"}]}).names() == ["from-config"]
    default = start().discover()
    validate_inventory(default)
    assert len(default.devices) == 10


def test_environment_variables_supply_options(start, tmp_path, monkeypatch):
    path = tmp_path / "inv.yaml"
    path.write_text("devices: [{name: env-dev}]")
    monkeypatch.setenv("DRA_FAKE_INVENTORY", str(path))
    monkeypatch.setenv("DRA_FAKE_DEVICES", "1")
    assert start().names() == ["env-dev", "dev-0"]


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"devices": "many"}, "--devices (env DRA_FAKE_DEVICES): 'many' is not a count"),
        ({"devices": "-1"}, "is not a count"),
        ({"control_interval": "0"}, "--control-interval: '0' is not a positive number"),
        ({"inventory": "/nonexistent/inv.yaml"}, "inventory file /nonexistent/inv.yaml"),
    ],
)
def test_bad_options_stop_the_start_with_a_clear_error(start, options, expected):
    from dra_core.plugins import HookError

    with pytest.raises(HookError) as info:
        start(**options)
    assert expected in str(info.value.__cause__)
    assert "fake backend cannot start" in str(info.value)


def test_devices_flag_clashing_with_the_inventory(start, tmp_path):
    from dra_core.plugins import HookError

    path = tmp_path / "inv.yaml"
    path.write_text("devices: [{name: dev-1}]")
    with pytest.raises(HookError, match="--devices 2: device 'dev-1' is also in the inventory"):
        start(inventory=path, devices=2)
