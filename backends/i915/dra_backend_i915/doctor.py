"""The i915 backend's ``dra-core doctor`` checks: GPUs bound to i915 or xe, SR-IOV, render nodes.

Read from the sysfs and devfs roots the backend uses (``--sysfs-root``, ``--devfs-root``), as
discovery reads them, and change nothing. Per Intel display function (vendor 0x8086, PCI class
0x03): the kernel driver it is bound to; for a GPU bound to i915 or xe that can make SR-IOV
virtual functions, how many and whether ``sriov_numvfs`` can be written (VFs are made on
demand); and its render node in ``<devfs>/dri``: there, a character device of the numbers
sysfs gives, and who may open it.
"""

from __future__ import annotations

import grp
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from dra_backend_i915.config import NodeSettings
from dra_backend_i915.discovery import DRM_DRIVERS, INTEL_VENDOR, drm_nodes
from dra_backend_i915.pciids import ModelInfo, lookup, normalize_device_id
from dra_backend_i915.sysfs import SysfsError, link_name, read_int, read_str
from dra_core import DoctorCheck

__all__ = ("Function", "checks", "intel_display_functions")

#: What sysfs and devfs must be inside the agent's container.
_SYSFS_FIX = (
    "set --sysfs-root (SYSFS_ROOT) to the host's /sys as mounted in the agent's container "
    "(the i915 overlay mounts it at /sys)"
)
_DEVFS_FIX = (
    "set --devfs-root (DEVFS_ROOT) to the host's /dev as mounted in the agent's container, so "
    "the CDI specs name the host's device nodes"
)
_PCI_ADDRESS = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
#: Permission bits that let any user read and write a device node.
_OTHERS_RW = stat.S_IROTH | stat.S_IWOTH


@dataclass(frozen=True)
class Function:
    """An Intel display PCI function as sysfs shows it."""

    address: str
    path: Path
    info: ModelInfo
    pci_id: str
    #: The bound kernel driver, or None.
    driver: str | None
    is_vf: bool

    @property
    def label(self) -> str:
        kind = "VF" if self.is_vf else self.info.model
        return f"{self.address} ({kind}, {self.pci_id})"


def intel_display_functions(sysfs_root: Path) -> list[Function]:
    """Every Intel display-class function under ``<sysfs>/bus/pci/devices``, by address.

    Raises :class:`SysfsError` when the directory cannot be listed.
    """
    devices = sysfs_root / "bus" / "pci" / "devices"
    try:
        entries = sorted(devices.iterdir())
    except OSError as exc:
        raise SysfsError(devices, f"cannot be listed ({exc.strerror or exc})") from None
    found = []
    for link in entries:
        if not _PCI_ADDRESS.match(link.name):
            continue
        entry = Path(os.path.realpath(link))
        try:
            if read_int(entry / "vendor", 16) != INTEL_VENDOR:
                continue
            if read_int(entry / "class", 16) >> 16 != 0x03:
                continue
            device_id = normalize_device_id(read_str(entry / "device"))
            driver = link_name(entry / "driver") if (entry / "driver").is_symlink() else None
        except (SysfsError, ValueError):
            continue  # discovery reports unreadable functions; doctor looks at GPUs it can read
        found.append(
            Function(
                address=link.name,
                path=entry,
                info=lookup(device_id),
                pci_id=f"0x{device_id:04x}",
                driver=driver,
                is_vf=(entry / "physfn").is_symlink(),
            )
        )
    return found


def checks(settings: NodeSettings) -> list[DoctorCheck]:
    """Every check of the node's Intel GPUs."""
    devices = settings.sysfs_root / "bus" / "pci" / "devices"
    if not devices.is_dir():
        return [DoctorCheck.fail("sysfs", f"{devices} does not exist", _SYSFS_FIX)]
    try:
        functions = intel_display_functions(settings.sysfs_root)
    except SysfsError as exc:
        return [DoctorCheck.fail("sysfs", str(exc), _SYSFS_FIX)]
    if not functions:
        fix = (
            "run the agent only on nodes with Intel GPUs: the i915 overlay selects nodes by "
            "Node Feature Discovery labels, or by the label gpu.intel.com/dra-core=true"
        )
        found = f"no Intel display device (vendor 0x8086, PCI class 0x03) under {devices}"
        return [DoctorCheck.fail("Intel GPUs", found, fix)]
    result: list[DoctorCheck] = []
    bound = [f for f in functions if f.driver in DRM_DRIVERS]
    if bound:
        result.append(
            DoctorCheck.ok(
                "Intel GPUs",
                f"{len(bound)} of {len(functions)} Intel display functions bound to i915 or xe",
            )
        )
    else:
        fix = (
            "load the kernel driver (modprobe i915, or xe for Arc B-Series and newer) and read "
            "the kernel log (dmesg) for why it did not bind; the agent publishes nothing until "
            "then"
        )
        found = f"none of the {len(functions)} Intel display functions is bound to i915 or xe"
        result.append(DoctorCheck.fail("Intel GPUs", found, fix))
    for function in functions:
        result.append(_driver_check(function))
        if function.driver not in DRM_DRIVERS:
            continue
        if not function.is_vf:
            sriov = _sriov_check(function)
            if sriov is not None:
                result.append(sriov)
        result.append(_render_node_check(function, settings.devfs_root))
    return result


def _driver_check(function: Function) -> DoctorCheck:
    name = f"driver of {function.label}"
    wanted = function.info.default_driver or "i915 or xe"
    if function.driver in DRM_DRIVERS:
        return DoctorCheck.ok(name, f"bound to {function.driver}")
    bind = (
        f"echo {function.address} > /sys/bus/pci/drivers/"
        f"{function.info.default_driver or 'i915'}/bind"
    )
    if function.driver is None:
        found = "bound to no driver, so it is not published"
        fix = f"bind it to {wanted} (modprobe {function.info.default_driver or 'i915'}, or {bind})"
        return DoctorCheck.warn(name, found, fix)
    found = (
        f"bound to {function.driver}, not i915 or xe, so it is not published (given to a "
        f"virtual machine?)"
    )
    fix = f"to publish it, unbind it from {function.driver} and bind it to {wanted} ({bind})"
    return DoctorCheck.warn(name, found, fix)


def _sriov_check(function: Function) -> DoctorCheck | None:
    """SR-IOV of a physical function; None for a GPU that neither has nor should have it."""
    name = f"SR-IOV of {function.label}"
    total_path = function.path / "sriov_totalvfs"
    try:
        total = read_int(total_path) if total_path.exists() else 0
    except SysfsError as exc:
        return DoctorCheck.warn(name, str(exc), "check the kernel log (dmesg) for the PCI core")
    if total <= 0:
        if not function.info.profile_key:
            return None  # a model without SR-IOV: whole GPUs only, as expected
        found = (
            f"the model supports SR-IOV but the kernel offers no VFs ({total_path.name} is "
            f"{'0' if total_path.exists() else 'missing'}), so it is published whole only"
        )
        fix = (
            "enable SR-IOV (and VT-d) in the firmware setup, and in the kernel driver "
            f"(for example {function.driver}.max_vfs=N on the kernel command line)"
        )
        return DoctorCheck.warn(name, found, fix)
    numvfs = function.path / "sriov_numvfs"
    try:
        enabled = read_int(numvfs)
    except SysfsError as exc:
        return DoctorCheck.fail(name, str(exc), "check the kernel log (dmesg) for the PCI core")
    found = f"up to {total} VFs, {enabled} enabled now"
    if not os.access(numvfs, os.W_OK):
        fix = (
            "VFs are made on demand by writing sriov_numvfs: run the agent as root with the "
            "host's /sys mounted read-write (the i915 overlay does)"
        )
        return DoctorCheck.fail(name, f"{found}; {numvfs} is not writable here", fix)
    return DoctorCheck.ok(name, found)


def _render_node_check(function: Function, devfs_root: Path) -> DoctorCheck:
    name = f"render node of {function.label}"
    _, render = drm_nodes(function.path)
    if render is None:
        found = "none in sysfs (drm/renderD*): the GPU serves display only, no compute or media"
        fix = "check the kernel log (dmesg) for why the driver made no render node"
        return DoctorCheck.warn(name, found, fix)
    node = devfs_root / "dri" / render
    try:
        info = node.stat()
    except FileNotFoundError:
        found = f"{node} does not exist, though sysfs lists {render}"
        return DoctorCheck.fail(name, found, _DEVFS_FIX)
    except OSError as exc:
        return DoctorCheck.fail(name, f"{node} cannot be read: {exc.strerror or exc}", _DEVFS_FIX)
    if not stat.S_ISCHR(info.st_mode):
        return DoctorCheck.warn(name, f"{node} is not a character device", _DEVFS_FIX)
    expected = _sysfs_numbers(function.path / "drm" / render / "dev")
    actual = (os.major(info.st_rdev), os.minor(info.st_rdev))
    if expected is not None and actual != expected:
        found = (
            f"{node} is device {actual[0]}:{actual[1]}, but sysfs gives {render} as "
            f"{expected[0]}:{expected[1]}"
        )
        return DoctorCheck.fail(name, found, _DEVFS_FIX)
    mode = stat.filemode(info.st_mode)
    owner = f"{mode} owned by {info.st_uid}:{_group(info.st_gid)}"
    if info.st_mode & _OTHERS_RW == _OTHERS_RW:
        return DoctorCheck.ok(name, f"{node} ({owner})")
    found = (
        f"{node} is {owner}: containers that run neither as root nor in group "
        f"{_group(info.st_gid)} cannot open it"
    )
    fix = (
        "let the runtime give device nodes to the container's user "
        "(device_ownership_from_security_context = true in containerd's CRI runtime section "
        "or in CRI-O's [crio.runtime]), run such workloads with supplementalGroups: "
        f"[{info.st_gid}], or make render nodes mode 0666 with a udev rule"
    )
    return DoctorCheck.warn(name, found, fix)


def _sysfs_numbers(path: Path) -> tuple[int, int] | None:
    """``(226, 128)`` from a ``dev`` attribute (``226:128``); None when it is not there."""
    try:
        major, _, minor = read_str(path).partition(":")
        return int(major), int(minor)
    except (SysfsError, ValueError):
        return None


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
