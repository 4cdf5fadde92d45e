"""The model's validation against the resource.k8s.io/v1 rules, and quantities."""

from __future__ import annotations

from decimal import Decimal

import pytest

from dra_core import (
    Capacity,
    ClaimRef,
    CounterConsumption,
    CounterSet,
    Device,
    Inventory,
    ModelError,
    RequestPolicy,
    Taint,
    ValidRange,
    Version,
    format_bytes,
    parse_quantity,
)
from dra_core.model import (
    validate_claim_ref,
    validate_device,
    validate_driver_name,
    validate_inventory,
)
from dra_core.quantity import QuantityError

UID = "0b7f0c7e-4a55-4f0e-9d5e-0123456789ab"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("16Gi", 16 * 2**30),
        ("4000Mi", 4000 * 2**20),
        ("250m", Decimal("0.25")),
        ("1000", 1000),
        ("1e3", 1000),
        ("1.5k", 1500),
        ("2M", 2_000_000),
    ],
)
def test_parse_quantity(text, value):
    assert parse_quantity(text) == value


@pytest.mark.parametrize("text", ["", "Gi", "16GiB", "1..2", "abc", "--1"])
def test_parse_quantity_rejects(text):
    with pytest.raises(QuantityError, match="is not a Kubernetes quantity"):
        parse_quantity(text)


def test_format_bytes():
    assert format_bytes(4000 * 2**20) == "4000Mi"
    assert format_bytes(16 * 2**30) == "16Gi"
    assert format_bytes(1000) == "1000"


def test_valid_device_passes():
    validate_device(
        Device(
            "gpu-0000-03-00-0",
            attributes={
                "model": "Flex 170",
                "numa": 0,
                "sriov": True,
                "driverVersion": Version("1.2.3"),
                "resource.kubernetes.io/pcieRoot": "pci0000:00",
            },
            capacity={"memory": Capacity("16Gi")},
        )
    )


@pytest.mark.parametrize(
    ("device", "message"),
    [
        (Device("GPU_0"), "device 'GPU_0': the name is not a DNS label"),
        (Device("d", attributes={"bad name": 1}), "attribute 'bad name'"),
        (Device("d", attributes={"x" * 33: 1}), "is not a C identifier of at most 32"),
        (Device("d", attributes={"Bad_Domain/x": 1}), "domain 'Bad_Domain' is not a DNS subdomain"),
        (Device("d", attributes={"model": "x" * 65}), "string of 65 characters is longer than 64"),
        (Device("d", attributes={"v": Version("1.2")}), "'1.2' is not a semantic version"),
        (Device("d", attributes={"n": 2**63}), "does not fit in int64"),
        (Device("d", capacity={"memory": Capacity("lots")}), "'lots' is not a Kubernetes quantity"),
        (Device("d", attributes={f"a{i}": i for i in range(33)}), "33 attributes and capacities"),
        (
            Device("d", taints=tuple(Taint(f"k{i}", "NoSchedule") for i in range(17))),
            "more than 16 taints",
        ),
        (
            Device("d", capacity={"memory": Capacity("1Gi", RequestPolicy(default="1Gi"))}),
            "needs allowMultipleAllocations",
        ),
        (
            Device(
                "d",
                consumes_counters=(
                    CounterConsumption("a", {}),
                    CounterConsumption("b", {}),
                    CounterConsumption("c", {}),
                ),
            ),
            "more than 2 counter sets",
        ),
    ],
)
def test_invalid_device_names_device_and_rule(device, message):
    with pytest.raises(ModelError, match=r"device '(d|GPU_0)'") as info:
        validate_device(device)
    assert message in str(info.value)


def shared(policy: RequestPolicy, value: str = "16Gi") -> Device:
    return Device(
        "d", capacity={"memory": Capacity(value, policy)}, allow_multiple_allocations=True
    )


def test_request_policy_rules():
    validate_device(shared(RequestPolicy("16Gi", valid_range=ValidRange("512Mi", "16Gi", "512Mi"))))
    validate_device(shared(RequestPolicy("4Gi", valid_values=("2Gi", "4Gi", "8Gi"))))
    with pytest.raises(ModelError, match="multiples of step"):
        validate_device(
            shared(RequestPolicy("1000Mi", valid_range=ValidRange("512Mi", None, "512Mi")))
        )
    with pytest.raises(ModelError, match="ascending, unique"):
        validate_device(shared(RequestPolicy("4Gi", valid_values=("4Gi", "2Gi"))))
    with pytest.raises(ModelError, match="is not one of validValues"):
        validate_device(shared(RequestPolicy("3Gi", valid_values=("2Gi", "4Gi"))))
    with pytest.raises(ModelError, match="exclude each other"):
        validate_device(shared(RequestPolicy("2Gi", ("2Gi",), ValidRange("1Gi"))))
    with pytest.raises(ModelError, match="need min <= default <= max"):
        validate_device(shared(RequestPolicy("32Gi", valid_range=ValidRange("1Gi"))))


def test_inventory_counter_references():
    counters = CounterSet("gpu-0", {"memory": "16Gi", "vfs": "4"})
    vf = Device("gpu-0-vf0", consumes_counters=(CounterConsumption("gpu-0", {"memory": "4Gi"}),))
    validate_inventory(Inventory(devices=(vf,), counter_sets=(counters,)))
    with pytest.raises(
        ModelError, match="counter set 'gpu-9', which the inventory does not define"
    ):
        validate_inventory(
            Inventory(
                devices=(
                    Device("x", consumes_counters=(CounterConsumption("gpu-9", {"memory": "1"}),)),
                )
            )
        )
    with pytest.raises(ModelError, match=r"counters \['cores'\] are not in counter set 'gpu-0'"):
        validate_inventory(
            Inventory(
                devices=(
                    Device("x", consumes_counters=(CounterConsumption("gpu-0", {"cores": "1"}),)),
                ),
                counter_sets=(counters,),
            )
        )
    with pytest.raises(ModelError, match="device name 'a' is used twice"):
        validate_inventory(Inventory(devices=(Device("a"), Device("a"))))


def test_claim_ref_is_checked_before_it_names_a_file():
    validate_claim_ref(ClaimRef("default", "my-claim", UID))
    with pytest.raises(ModelError, match="is not a UUID"):
        validate_claim_ref(ClaimRef("default", "c", "../../etc/passwd"))
    with pytest.raises(ModelError, match="namespace 'Bad/NS' is not a DNS label"):
        validate_claim_ref(ClaimRef("Bad/NS", "c", UID))


def test_driver_name():
    validate_driver_name("gpu.intel.com")
    with pytest.raises(ModelError, match="is not a lower-case DNS subdomain"):
        validate_driver_name("GPU.Intel.com")
