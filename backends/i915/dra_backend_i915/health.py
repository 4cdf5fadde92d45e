"""Device health from sysfs signals.

Per PCI function, in order of severity:

- the function is gone from ``bus/pci/devices`` (hot unplug, fell off the bus, a dangling
  link): NoExecute;
- its ``driver`` link is gone (unbound): NoExecute; points to another driver than the one
  published (e.g. ``vfio-pci``): NoExecute, since the containers' DRM nodes are gone with it;
  bound to it but without a DRM node (half way through a rebind): NoSchedule;
- xe ``survivability_mode`` is present (the device is wedged until its firmware is flashed):
  NoExecute;
- a fatal error counter rose since it was first seen: i915 ``<card>/gt/gtK/error_counter/``
  ``fatal_*``, ``*_fatal``, ``soc_fatal_*``, and the PCI ``aer_dev_fatal`` total: NoExecute.
  This is sticky until the driver is rebound (a new card, or a pass through unbound, resets
  the baseline), because the counters never go down.

VFs are unhealthy when their PF is; VFs not created yet take their PF's health.

A GPU that loses its driver stays published (see :class:`~dra_backend_i915.discovery.LastSeen`)
with the attributes it was last seen with, so these checks keep running on it and report it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dra_backend_i915.discovery import address_of, drm_nodes
from dra_backend_i915.sysfs import SysfsError, link_name, read_int, read_str
from dra_core import DeviceHealth, Inventory, logger

__all__ = ("FunctionHealth", "HealthMonitor")

TaintEffect = Literal["NoSchedule", "NoExecute", "None"]


@dataclass(frozen=True)
class FunctionHealth:
    """The health of one PCI function."""

    healthy: bool
    message: str = ""
    effect: TaintEffect = "NoSchedule"


_OK = FunctionHealth(True)


@dataclass
class _Baseline:
    card: str | None
    counters: dict[str, int]
    sticky: str = ""


def _fatal_counters(device_dir: Path, card: str | None) -> dict[str, int]:
    counters: dict[str, int] = {}
    if card is not None:
        card_dir = device_dir / "drm" / card
        for path in sorted(card_dir.glob("gt/gt*/error_counter/*")):
            name = path.name
            if name.startswith(("fatal_", "soc_fatal_")) or name.endswith("_fatal"):
                try:
                    counters[f"{path.parent.parent.name}/{name}"] = read_int(path)
                except SysfsError as exc:
                    logger.debug("{}", exc)
    aer = device_dir / "aer_dev_fatal"
    if aer.exists():
        try:
            for line in read_str(aer).splitlines():
                key, _, value = line.rpartition(" ")
                if key == "TOTAL_ERR_FATAL":
                    counters["aer_dev_fatal"] = int(value)
        except (SysfsError, ValueError) as exc:
            logger.debug("{}: {}", aer, exc)
    return counters


@dataclass
class HealthMonitor:
    """Remembers error-counter baselines between checks."""

    sysfs_root: Path
    _baselines: dict[str, _Baseline] = field(default_factory=dict)

    def function(self, address: str, expected_driver: str) -> FunctionHealth:
        """The health of the PCI function at ``address`` published as bound to the driver."""
        entry = self.sysfs_root / "bus" / "pci" / "devices" / address
        if not entry.exists():
            self._baselines.pop(address, None)
            return FunctionHealth(
                False, f"{address} is gone from sysfs (no longer on the PCI bus)", "NoExecute"
            )
        if not (entry / "driver").is_symlink():
            self._baselines.pop(address, None)
            return FunctionHealth(
                False, f"{address} is no longer bound to {expected_driver}", "NoExecute"
            )
        try:
            driver = link_name(entry / "driver")
        except SysfsError as exc:
            return FunctionHealth(False, str(exc), "NoSchedule")
        if driver != expected_driver:
            self._baselines.pop(address, None)
            return FunctionHealth(
                False, f"{address} is now bound to {driver}, not {expected_driver}", "NoExecute"
            )
        device_dir = entry.resolve()
        if (device_dir / "survivability_mode").exists():
            return FunctionHealth(
                False,
                f"{address} is in survivability mode (wedged): its firmware must be flashed",
                "NoExecute",
            )
        for name in ("vendor", "device", "class"):  # what discovery needs to know the GPU
            try:
                read_str(device_dir / name)
            except SysfsError as exc:
                return FunctionHealth(False, f"{address}: {exc}", "NoSchedule")
        card, render = drm_nodes(device_dir)
        if card is None and render is None:
            self._baselines.pop(address, None)
            return FunctionHealth(
                False, f"{address} is bound to {driver} but has no DRM node", "NoSchedule"
            )
        counters = _fatal_counters(device_dir, card)
        baseline = self._baselines.get(address)
        if baseline is None or baseline.card != card:
            self._baselines[address] = _Baseline(card, counters)
            return _OK
        if not baseline.sticky:
            for name, value in counters.items():
                before = baseline.counters.get(name, value)
                if value > before:
                    baseline.sticky = (
                        f"{address}: fatal error counter {name} rose from {before} to {value}; "
                        f"rebind the driver or reset the GPU to clear"
                    )
                    logger.bind(device=address).error("{}", baseline.sticky)
                    break
        if baseline.sticky:
            return FunctionHealth(False, baseline.sticky, "NoExecute")
        return _OK

    def report(self, inventory: Inventory) -> list[DeviceHealth]:
        """The health of every device of the inventory (PF health carried to its VFs)."""
        by_name = {d.name: d for d in inventory.devices}
        cache: dict[str, FunctionHealth] = {}

        def check(address: str, driver: str) -> FunctionHealth:
            if address not in cache:
                cache[address] = self.function(address, driver)
            return cache[address]

        result = []
        for device in inventory.devices:
            attrs = device.attributes
            address = str(attrs.get("pciAddress", ""))
            driver = str(attrs.get("driver", ""))
            health = _OK
            if attrs.get("type") == "vf":
                parent = by_name.get(str(attrs.get("parent", "")))
                pf_address = str(parent.attributes.get("pciAddress", "")) if parent else ""
                if not pf_address:
                    physfn = self.sysfs_root / "bus/pci/devices" / address / "physfn"
                    pf_address = link_name(physfn) if physfn.is_symlink() else ""
                if not pf_address:  # an admin VF whose PF (not published) is gone or unbound
                    pf_address = address_of(str(attrs.get("parent", ""))) or ""
                pf_health = check(pf_address, driver) if pf_address else _OK
                exists = (self.sysfs_root / "bus/pci/devices" / address).exists()
                planned = "profile" in attrs
                if not pf_health.healthy:
                    health = FunctionHealth(False, f"its PF: {pf_health.message}", pf_health.effect)
                elif exists or not planned:
                    health = check(address, driver)
            elif address:
                health = check(address, driver)
            result.append(DeviceHealth(device.name, health.healthy, health.message, health.effect))
        # A function not checked now is not published any more (unbound, bound to vfio-pci,
        # removed, VFs torn down): forget its baseline, so that when it comes back (the driver
        # rebound, often with the same card number) it starts afresh instead of staying stuck
        # on a sticky error it had before.
        for address in set(self._baselines) - set(cache):
            self._baselines.pop(address, None)
        return result
