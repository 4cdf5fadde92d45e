"""Health reports become taints: the backend's taint name and reason within the driver's
domain, checked against the label rules the API server applies, and gone on recovery."""

from __future__ import annotations

import pytest

from dra_core import Device, DeviceHealth, Inventory, ModelError, Taint
from dra_core.health import HealthTracker
from dra_core.kubelet.health import HealthBoard
from dra_core.model import validate_device

DRIVER = "gpu.example.com"
INVENTORY = Inventory(devices=(Device("gpu-0"), Device("gpu-1")))


def taints(inventory: Inventory) -> dict[str, tuple[Taint, ...]]:
    return {d.name: d.taints for d in inventory.devices}


def test_taint_carries_the_backends_name_reason_and_effect() -> None:
    board = HealthBoard()
    tracker = HealthTracker(DRIVER, "node-1", board)
    report = DeviceHealth(
        "gpu-0", False, "fan stopped at 95 C", "NoExecute", reason="Overheating", taint="thermal"
    )

    tainted = tracker.update(INVENTORY, [report, DeviceHealth("gpu-1", False, "wedged")])

    assert taints(tainted) == {
        "gpu-0": (Taint(f"{DRIVER}/thermal", "NoExecute", "Overheating"),),
        "gpu-1": (Taint(f"{DRIVER}/unhealthy", "NoSchedule"),),  # the defaults
    }
    for device in tainted.devices:
        validate_device(device)
    # the free text goes to the kubelet's health stream, not into the taint
    assert {s.device: s.message for s in board.snapshot()} == {
        "gpu-0": "fan stopped at 95 C",
        "gpu-1": "wedged",
    }
    assert taints(tracker.update(INVENTORY, [])) == {"gpu-0": (), "gpu-1": ()}


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"taint": "no/slash"}, "taint 'no/slash' is not a name"),
        ({"taint": "-edge"}, "taint '-edge' is not a name"),
        ({"taint": "x" * 64}, "is not a name of at most 63"),
        ({"reason": "fan on fire"}, "reason 'fan on fire' is not empty or"),
        ({"reason": "r" * 64}, "put free text in message"),
    ],
)
def test_bad_taint_name_or_reason_names_the_device(fields: dict[str, str], problem: str) -> None:
    with pytest.raises(ModelError, match=f"health of device 'gpu-0': .*{problem}"):
        DeviceHealth("gpu-0", False, "why", **fields)


def test_published_taints_follow_the_label_rules() -> None:
    validate_device(Device("d", taints=(Taint("example.com/driver-unbound.1", "NoSchedule"),)))
    for key, value in (("example.com/bad key", ""), ("example.com/ok", "not ok!")):
        with pytest.raises(ModelError, match="device 'd': taint"):
            validate_device(Device("d", taints=(Taint(key, "NoSchedule", value),)))
