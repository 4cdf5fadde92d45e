"""Device health: backend reports become ResourceSlice taints and the kubelet's health stream.

A device is unhealthy while any plugin reports it so; it gets the taint
``<driver>/<taint>=<reason>`` (``<driver>/unhealthy`` by default) with the effect the report
asks for, which goes away on recovery. The driver's domain is the core's: a backend names the
taint within it, so a taint the agent publishes is always recognisably its driver's. The same
state feeds the kubelet's ``DRAResourceHealth`` stream, so pods see it in their status.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from dra_core import metrics
from dra_core.kubelet.health import DeviceHealthState, HealthBoard
from dra_core.lazylog import logger
from dra_core.model import Device, DeviceHealth, Inventory, Taint

__all__ = ("HealthTracker", "unhealthy_taint_key")


def unhealthy_taint_key(driver: str, taint: str = "unhealthy") -> str:
    """The key of the taint ``taint`` (a `DeviceHealth.taint`) an unhealthy device carries."""
    return f"{driver}/{taint}"


class HealthTracker:
    """Keeps the latest health of every device and applies it to the published inventory."""

    def __init__(self, driver: str, pool: str, board: HealthBoard) -> None:
        self.driver = driver
        self.pool = pool
        self.board = board
        self._unhealthy: dict[str, DeviceHealth] = {}

    def update(self, inventory: Inventory, reports: Sequence[DeviceHealth]) -> Inventory:
        """Record ``reports`` and return ``inventory`` with health taints applied."""
        names = {d.name for d in inventory.devices}
        unhealthy: dict[str, DeviceHealth] = {}
        for report in reports:
            if report.device not in names:
                logger.bind(device=report.device).debug("health report for an unknown device")
            elif not report.healthy:
                current = unhealthy.get(report.device)
                # NoExecute is the stronger verdict when two sources disagree.
                if current is None or report.effect == "NoExecute":
                    unhealthy[report.device] = report
        for name in sorted(set(unhealthy) - set(self._unhealthy)):
            logger.bind(device=name).warning(
                "device {} is unhealthy: {}", name, unhealthy[name].message or "no reason given"
            )
        for name in sorted(set(self._unhealthy) - set(unhealthy)):
            logger.bind(device=name).info("device {} is healthy again", name)
        self._unhealthy = unhealthy
        self.board.set(
            [
                DeviceHealthState(
                    pool=self.pool,
                    device=d.name,
                    healthy=d.name not in unhealthy,
                    message=unhealthy[d.name].message if d.name in unhealthy else "",
                )
                for d in inventory.devices
            ]
        )
        for device in inventory.devices:
            metrics.DEVICE_HEALTHY.labels(device=device.name).set(device.name not in unhealthy)
        return replace(inventory, devices=tuple(self._tainted(d) for d in inventory.devices))

    def _tainted(self, device: Device) -> Device:
        report = self._unhealthy.get(device.name)
        if report is None:
            return device
        taint = Taint(
            key=unhealthy_taint_key(self.driver, report.taint),
            effect=report.effect,
            value=report.reason,
        )
        return replace(device, taints=(*device.taints, taint))
