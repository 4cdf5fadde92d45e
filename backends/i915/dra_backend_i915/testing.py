"""Fake sysfs and devfs trees of Intel GPUs that behave like the kernel, for tests and demos.

:class:`FakeSysfs` lays out, in an ordinary directory, what the kernel shows under ``/sys``
and ``/dev`` for each GPU family: real directories under ``sys/devices/pci0000:00/...`` (behind a
PCIe bridge for discrete cards), relative symlinks for ``bus/pci/devices/<BDF>``, the ``driver``
link into ``bus/pci/drivers/{i915,xe}``, ``drm/cardN`` and ``drm/renderDM`` with their
``class/drm`` links, i915 GTs with error counters, xe tiles and GTs, memory files, the SR-IOV
files and quota trees (i915 ``prelim_iov``, xe ``sriov_admin``), and ``dev/dri`` nodes with
udev's relative ``by-path`` links (``dev/dri/by-path/pci-<BDF>-card`` -> ``../cardN``). Card and
render numbers are handed out separately, like the kernel's minors, so a ``simpledrm`` card0
without a render node shifts the Intel cards.

The ``dev/dri`` nodes are plain empty files by default, which needs no privileges. With
``FakeSysfs(base, char_devices=True)`` they are real character devices with the DRM major 226
and the minor of their name (``cardN`` -> 226:N, ``renderDM`` -> 226:M, as in ``drm/<node>/dev``),
for tests that hand them to a container runtime; this needs ``CAP_MKNOD`` (root). Every node
the tree makes is one: ``add_gpu``, ``add_simpledrm``, VFs created on demand through
:class:`FakeKernel` or ``add_vf``, and nodes made again on ``rebind``.

:meth:`FakeSysfs.add_mei` gives a GPU its management engine (MEI/GSC): the auxiliary device
``<function>/i915.mei-gscfi.<id>/mei/meiN``, ``class/mei/meiN`` and ``dev/meiN``.

Plain files cannot refuse a write with ``EBUSY``, so the kernel rules live behind the
backend's one write seam, :class:`dra_backend_i915.sysfs.SysfsWriter`. :class:`FakeKernel` is
a writer that enforces the PCI core's ``sriov_numvfs`` rules (``ERANGE`` past
``sriov_totalvfs``, ``EBUSY`` on changing a non-zero count, ``ENOENT`` when unbound) and i915's
per-GT quota limits (``EDQUOT`` past 240 doorbells or the GGTT of one tile), and
creates the VF functions, links and DRM nodes in a background thread after a short delay, so
the backend's bounded wait is exercised; ``materialise=False`` makes VFs never appear.

:class:`FakeDrmIoctl` answers the DRM memory-region queries like i915 and xe do.

Demo: ``python -m dra_backend_i915.testing [--char-devices] /tmp/fake-node`` builds a node with
a Flex 170 (SR-IOV), an Arc A770, an Arc B580 (xe), a Tiger Lake iGPU and a simpledrm card.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
import struct
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from dra_backend_i915.discovery import DRM_DRIVERS, vf_address
from dra_backend_i915.memory import (
    DRM_IOCTL_I915_QUERY,
    DRM_IOCTL_XE_DEVICE_QUERY,
    I915Query,
    I915QueryItem,
    XeDeviceQuery,
)
from dra_core import AllocatedClaim, AllocatedDevice, ClaimRef, NodeContext

__all__ = (
    "DRM_MAJOR",
    "GIB",
    "I915_GT_LIMITS",
    "MEI_MAJOR",
    "FakeDrmIoctl",
    "FakeKernel",
    "FakeSysfs",
    "allocated_claim",
    "build_demo",
    "main",
    "node_context",
)

I915_QUOTA_FILES = (
    "exec_quantum_ms",
    "preempt_timeout_us",
    "lmem_quota",
    "ggtt_quota",
    "doorbells_quota",
    "contexts_quota",
)
XE_PROFILE_FILES = ("exec_quantum_ms", "preempt_timeout_us", "sched_priority", "vram_quota")
FATAL_COUNTERS = ("fatal_guc", "fatal_l3_double", "fatal_eu_grf", "sgunit_fatal")
GIB = 1 << 30
#: What the VFs on one GT (one tile) of an i915 PF share at most: 240 doorbells and
#: 4026531840 bytes of GGTT (4 GiB less the PF's part), the figures the one-VF profile of every
#: i915 model gives. :class:`FakeKernel` refuses a quota write past them with ``EDQUOT``.
I915_GT_LIMITS = {"doorbells_quota": 240, "ggtt_quota": 4026531840}
#: The character-device major of DRM nodes (``/dev/dri/card*``, ``renderD*``).
DRM_MAJOR = 226
#: The major of the fake ``/dev/meiN`` nodes. The kernel gives MEI a dynamic major at boot
#: (``mei`` in ``/proc/devices``); 240 is in the range Linux keeps for local use.
MEI_MAJOR = 240


def _write(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{value}\n", encoding="utf-8")


def _link(link: Path, target: Path) -> None:
    """A relative symlink ``link`` -> ``target``, replacing what was there."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(os.path.relpath(target, link.parent))


@dataclass
class _GpuRecord:
    address: str
    path: Path
    device_id: str
    driver: str | None
    card: str | None
    render: str | None
    vf_gt_dirs: tuple[str, ...]
    #: What ``add_gpu`` put in the card directory, to make it again on rebind.
    has_render: bool = True
    lmem_total_bytes: int | None = None
    gts: int = 1
    error_counters: bool = False
    sriov_total: int = 0


class FakeSysfs:
    """A fake ``/sys`` (``<base>/sys``) and ``/dev`` (``<base>/dev``) built one GPU at a time.

    ``char_devices=False`` (the default) makes the ``dev/dri`` nodes plain empty files, which
    works without privileges. ``char_devices=True`` makes them character devices with the DRM
    major 226 and the node's own minor (``card1`` is 226:1, ``renderD128`` is 226:128), card
    nodes mode 0660 and render nodes 0666 as udev leaves them, so a container runtime accepts
    them as CDI host paths and creates them in the container with those numbers; making them
    needs ``CAP_MKNOD`` (root). The numbers are real DRM numbers: on a host with a DRM driver
    loaded they open that driver's devices, and on a host without one opening them fails with
    ``ENXIO``, so the DRM memory query finds nothing unless given an opener of its own.
    """

    def __init__(self, base: Path, *, char_devices: bool = False) -> None:
        self.base = base
        self.sys = base / "sys"
        self.dev = base / "dev"
        self.char_devices = char_devices
        for driver in ("i915", "xe", "vfio-pci", "xe-vfio-pci"):
            for name in ("bind", "unbind"):
                _write(self.sys / "bus/pci/drivers" / driver / name, "")
        (self.sys / "class/drm").mkdir(parents=True, exist_ok=True)
        (self.sys / "bus/pci/devices").mkdir(parents=True, exist_ok=True)
        (self.dev / "dri/by-path").mkdir(parents=True, exist_ok=True)
        self._next_card = 0
        self._next_render = 128
        self.gpus: dict[str, _GpuRecord] = {}
        self._lock = threading.Lock()

    # -- building ------------------------------------------------------------------------------

    def add_simpledrm(self) -> str:
        """A firmware framebuffer card (no render node, not PCI); returns its card name."""
        card = f"card{self._take_card()}"
        drm = self.sys / "devices/platform/simple-framebuffer.0/drm" / card
        _write(drm / "dev", f"{DRM_MAJOR}:{card[4:]}")
        _link(self.sys / "class/drm" / card, drm)
        self._dev_node(card)
        return card

    def _dev_node(self, name: str) -> Path:
        """Make ``dev/dri/<name>``: a plain file, or with ``char_devices`` the DRM device."""
        path = self.dev / "dri" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        if not self.char_devices:
            path.write_text("", encoding="utf-8")
            return path
        minor = int(name.removeprefix("renderD").removeprefix("card"))
        mode = 0o666 if name.startswith("renderD") else 0o660
        try:
            os.mknod(path, stat.S_IFCHR | mode, os.makedev(DRM_MAJOR, minor))
        except PermissionError as exc:
            msg = (
                f"cannot make the character device {path} ({DRM_MAJOR}:{minor}): "
                f"{exc.strerror}; FakeSysfs(char_devices=True) needs CAP_MKNOD (root)"
            )
            raise PermissionError(exc.errno, msg) from exc
        path.chmod(mode)  # mknod's mode is reduced by the umask
        return path

    def add_gpu(
        self,
        address: str,
        device_id: str,
        *,
        driver: str | None = "i915",
        render: bool = True,
        numa_node: int = 0,
        pcie_root: str = "pci0000:00",
        bridge: str | None = "0000:00:01.0",
        vendor: str = "0x8086",
        pci_class: str = "0x030000",
        lmem_total_bytes: int | None = None,
        xe_vram_per_tile: Sequence[int] = (),
        gts: int = 1,
        sriov_totalvfs: int = 0,
        vf_gt_dirs: Sequence[str] = ("gt",),
        error_counters: bool = False,
    ) -> Path:
        """Add a GPU function; returns its real directory under ``sys/devices``."""
        parent = self.sys / "devices" / pcie_root
        if bridge:
            parent = parent / bridge
            _write(parent / "class", "0x060400")
        path = parent / address
        _write(path / "vendor", vendor)
        _write(path / "device", device_id)
        _write(path / "class", pci_class)
        _write(path / "subsystem_vendor", vendor)
        _write(path / "numa_node", numa_node)
        _write(path / "driver_override", "")
        _link(self.sys / "bus/pci/devices" / address, path)
        record = _GpuRecord(
            address,
            path,
            device_id,
            driver,
            None,
            None,
            tuple(vf_gt_dirs),
            render,
            lmem_total_bytes,
            gts,
            error_counters,
            sriov_totalvfs,
        )
        self.gpus[address] = record
        if driver is not None:
            self._bind(record, render=render)
        self._card_files(record)
        if driver == "xe" or xe_vram_per_tile:
            for tile, size in enumerate(xe_vram_per_tile or [0]):
                if xe_vram_per_tile:
                    _write(path / f"tile{tile}/physical_vram_size_bytes", size)
                for gt in range(gts):
                    _write(path / f"tile{tile}/gt{tile * gts + gt}/id", tile * gts + gt)
        _write(path / "aer_dev_fatal", "Undefined 0\nTOTAL_ERR_FATAL 0")
        if sriov_totalvfs:
            self._sriov_pf(record, sriov_totalvfs)
        return path

    def _card_files(self, record: _GpuRecord) -> None:
        if record.card is None or record.driver != "i915":
            return
        card_dir = record.path / "drm" / record.card
        if record.lmem_total_bytes is not None:
            _write(card_dir / "lmem_total_bytes", record.lmem_total_bytes)
        for gt in range(record.gts):
            _write(card_dir / f"gt/gt{gt}/id", gt)
            if record.error_counters:
                for counter in FATAL_COUNTERS:
                    _write(card_dir / f"gt/gt{gt}/error_counter" / counter, 0)
        _write(card_dir / "error", "No error state collected")

    def _take_card(self) -> int:
        number = self._next_card
        self._next_card += 1
        return number

    def _bind(self, record: _GpuRecord, *, render: bool = True) -> None:
        driver = cast(str, record.driver)
        _link(record.path / "driver", self.sys / "bus/pci/drivers" / driver)
        _link(self.sys / "bus/pci/drivers" / driver / record.address, record.path)
        if render:  # before the card: a waiter that sees the card sees the render node too
            number = self._next_render
            self._next_render += 1
            node = f"renderD{number}"
            record.render = node
            _write(record.path / "drm" / node / "dev", f"{DRM_MAJOR}:{number}")
            _link(self.sys / "class/drm" / node, record.path / "drm" / node)
            self._dev_node(node)
            _link(self.dev / f"dri/by-path/pci-{record.address}-render", self.dev / "dri" / node)
        card = f"card{self._take_card()}"
        record.card = card
        self._dev_node(card)
        _link(self.dev / f"dri/by-path/pci-{record.address}-card", self.dev / "dri" / card)
        _write(record.path / "drm" / card / "dev", f"{DRM_MAJOR}:{card[4:]}")
        _link(record.path / "drm" / card / "device", record.path)
        _link(self.sys / "class/drm" / card, record.path / "drm" / card)

    def _sriov_pf(self, record: _GpuRecord, total: int) -> None:
        path = record.path
        _write(path / "sriov_totalvfs", total)
        _write(path / "sriov_numvfs", 0)
        _write(path / "sriov_offset", 1)
        _write(path / "sriov_stride", 1)
        _write(path / "sriov_drivers_autoprobe", 1)
        _write(path / "sriov_vf_device", record.device_id.removeprefix("0x"))
        self._iov_tree(record, total)

    def _iov_tree(self, record: _GpuRecord, total: int) -> None:
        path = record.path
        if record.driver == "i915" and record.card is not None:
            iov = path / "drm" / record.card / "prelim_iov"
            _write(iov / "mode", "SR-IOV PF")
            _write(iov / "pf/auto_provisioning", 1)
            for vf in range(1, total + 1):
                for gt in record.vf_gt_dirs:
                    for name in I915_QUOTA_FILES:
                        _write(iov / f"vf{vf}" / gt / name, 0)
            _link(path / "drm" / record.card / "iov", iov)
        elif record.driver == "xe":
            admin = path / "sriov_admin"
            for name in XE_PROFILE_FILES[:3]:
                _write(admin / "pf/profile" / name, "0" if name != "sched_priority" else "low")
            for vf in range(1, total + 1):
                for name in XE_PROFILE_FILES:
                    _write(admin / f"vf{vf}/profile" / name, 0)

    def add_vf(self, pf_address: str, index: int) -> str:
        """Create VF ``index`` of a PF like the PCI core does; returns its address."""
        with self._lock:
            pf = self.gpus[pf_address]
            offset = int((pf.path / "sriov_offset").read_text())
            stride = int((pf.path / "sriov_stride").read_text())
            address = vf_address(pf_address, offset, stride, index)
            path = pf.path.parent / address
            vf_id = (pf.path / "sriov_vf_device").read_text().strip()
            _write(path / "vendor", "0x8086")
            _write(path / "device", f"0x{vf_id}")
            _write(path / "class", "0x038000")
            _write(path / "numa_node", (pf.path / "numa_node").read_text().strip())
            _write(path / "driver_override", "")
            _link(path / "physfn", pf.path)
            _link(pf.path / f"virtfn{index}", path)
            _link(self.sys / "bus/pci/devices" / address, path)
            autoprobe = (pf.path / "sriov_drivers_autoprobe").read_text().strip() != "0"
            record = _GpuRecord(address, path, f"0x{vf_id}", None, None, None, ())
            self.gpus[address] = record
            if autoprobe and pf.driver is not None:
                record.driver = pf.driver
                self._bind(record)
            return address

    def remove_vfs(self, pf_address: str) -> None:
        """Remove every VF of a PF, as writing 0 to ``sriov_numvfs`` does."""
        with self._lock:
            pf = self.gpus[pf_address]
            for link in sorted(pf.path.glob("virtfn*")):
                address = link.readlink().name
                record = self.gpus.pop(address, None)
                link.unlink()
                (self.sys / "bus/pci/devices" / address).unlink(missing_ok=True)
                if record is None:
                    continue
                for node in (record.card, record.render):
                    if node:
                        (self.sys / "class/drm" / node).unlink(missing_ok=True)
                        (self.dev / "dri" / node).unlink(missing_ok=True)
                for kind in ("card", "render"):
                    (self.dev / f"dri/by-path/pci-{address}-{kind}").unlink(missing_ok=True)
                if record.driver:
                    (self.sys / "bus/pci/drivers" / record.driver / address).unlink(missing_ok=True)
                shutil.rmtree(record.path, ignore_errors=True)

    def add_mei(self, address: str, aux: str = "mei-gscfi") -> str:
        """Give a GPU its management engine as the kernel's ``mei_gsc`` does; returns ``meiN``.

        Makes the auxiliary device ``<function>/<driver>.<aux>.<id>/`` (``aux`` is
        ``mei-gscfi`` on Arc and xe GPUs, ``mei-gsc`` on Flex and Max; ``id`` is the PCI
        function's bus, device and function number) with its ``mei/meiN/dev``, the link
        ``class/mei/meiN`` and the node ``dev/meiN``: a plain file, or with ``char_devices``
        a character device :data:`MEI_MAJOR`:N (mode 0600, as udev leaves it).
        """
        record = self.gpus[address]
        number = len(list((self.sys / "class/mei").glob("mei*")))
        name = f"mei{number}"
        bus, devfn = address.split(":")[1], address.split(":")[2]
        dev, fn = devfn.split(".")
        aux_id = (int(bus, 16) << 8) | (int(dev, 16) << 3) | int(fn)
        node_dir = record.path / f"{record.driver or 'i915'}.{aux}.{aux_id}" / "mei" / name
        _write(node_dir / "dev", f"{MEI_MAJOR}:{number}")
        _link(self.sys / "class/mei" / name, node_dir)
        path = self.dev / name
        path.unlink(missing_ok=True)
        if not self.char_devices:
            path.write_text("", encoding="utf-8")
            return name
        try:
            os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(MEI_MAJOR, number))
        except PermissionError as exc:
            msg = (
                f"cannot make the character device {path} ({MEI_MAJOR}:{number}): "
                f"{exc.strerror}; FakeSysfs(char_devices=True) needs CAP_MKNOD (root)"
            )
            raise PermissionError(exc.errno, msg) from exc
        path.chmod(0o600)
        return name

    def add_admin_vfs(self, pf_address: str, count: int) -> list[str]:
        """VFs an administrator created before the agent started."""
        _write(self.gpus[pf_address].path / "sriov_numvfs", count)
        return [self.add_vf(pf_address, k) for k in range(count)]

    # -- changing ------------------------------------------------------------------------------

    def unbind(self, address: str) -> None:
        """Unbind the driver (the DRM nodes go away)."""
        record = self.gpus[address]
        (record.path / "driver").unlink(missing_ok=True)
        if record.driver:
            (self.sys / "bus/pci/drivers" / record.driver / address).unlink(missing_ok=True)
        record.driver = None
        self._drop_drm(record)

    def _drop_drm(self, record: _GpuRecord) -> None:
        for node in (record.card, record.render):
            if node:
                (self.sys / "class/drm" / node).unlink(missing_ok=True)
                (self.dev / "dri" / node).unlink(missing_ok=True)
        for kind in ("card", "render"):
            (self.dev / f"dri/by-path/pci-{record.address}-{kind}").unlink(missing_ok=True)
        shutil.rmtree(record.path / "drm", ignore_errors=True)
        record.card = record.render = None

    def rebind(self, address: str, driver: str) -> None:
        """Bind the function to ``driver`` (e.g. ``vfio-pci``), unbinding it first if bound.

        A DRM driver (``i915``, ``xe``) gets new DRM nodes (new numbers, as the kernel gives)
        and its card files as ``add_gpu`` made them (memory size, error counters at 0, SR-IOV
        quota tree); another driver leaves the function without DRM nodes.
        """
        record = self.gpus[address]
        if record.driver is not None and record.driver != driver:
            self.unbind(address)
        if record.driver == driver:
            return
        record.driver = driver
        if driver in DRM_DRIVERS:
            self._bind(record, render=record.has_render)
            self._card_files(record)
            if record.sriov_total:
                self._iov_tree(record, record.sriov_total)
        else:
            _link(record.path / "driver", self.sys / "bus/pci/drivers" / driver)
            _link(self.sys / "bus/pci/drivers" / driver / address, record.path)

    def remove(self, address: str) -> None:
        """The function vanishes (hot unplug, or fell off the bus)."""
        record = self.gpus.pop(address)
        (self.sys / "bus/pci/devices" / address).unlink(missing_ok=True)
        shutil.rmtree(record.path, ignore_errors=True)

    def bump_error(self, address: str, counter: str = "fatal_guc", gt: int = 0) -> None:
        """Increase an i915 error counter of a GPU by one."""
        record = self.gpus[address]
        path = record.path / "drm" / cast(str, record.card) / f"gt/gt{gt}/error_counter" / counter
        _write(path, int(path.read_text()) + 1)

    def kernel(self, *, delay: float = 0.05, materialise: bool = True) -> FakeKernel:
        """A writer that behaves like the kernel for this tree."""
        return FakeKernel(self, delay=delay, materialise=materialise)


class FakeKernel:
    """A :class:`~dra_backend_i915.sysfs.SysfsWriter` with the kernel's ``sriov_numvfs`` rules.

    Every write is recorded in :attr:`writes` as ``(path relative to sys, value)``. Writing N
    to a PF's ``sriov_numvfs`` creates its VFs in a thread after ``delay`` seconds (never, with
    ``materialise=False``); writing 0 removes them at once. ``fail`` maps a file name to an
    errno raised on writing it (e.g. ``{"lmem_quota": errno.EDQUOT}``). An i915 quota write that
    would give the VFs of one GT more doorbells or GGTT than the GT has (:attr:`gt_limits`)
    fails with ``EDQUOT``, as i915 refuses a quota over the available maximum.
    """

    def __init__(self, fs: FakeSysfs, *, delay: float = 0.05, materialise: bool = True) -> None:
        self.fs = fs
        self.delay = delay
        self.materialise = materialise
        self.fail: dict[str, int] = {}
        #: Per-GT limits of the i915 VF quotas (see :data:`I915_GT_LIMITS`).
        self.gt_limits: dict[str, int] = dict(I915_GT_LIMITS)
        self.writes: list[tuple[str, str]] = []
        self._threads: list[threading.Thread] = []

    def write(self, path: Path, value: str) -> None:
        """Write like the kernel; raises ``OSError`` with the kernel's errno."""
        try:
            shown = str(path.relative_to(self.fs.sys))
        except ValueError:
            shown = str(path)
        self.writes.append((shown, value))
        if path.name in self.fail:
            code = self.fail[path.name]
            raise OSError(code, os.strerror(code), str(path))
        if not path.exists():
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
        if path.name == "sriov_numvfs":
            self._numvfs(path, value)
            return
        iov = next((p for p in path.parents if p.name == "prelim_iov"), None)
        if iov is not None:
            auto = iov / "pf" / "auto_provisioning"
            if path == auto and value.strip() == "1" and self._quotas_set(iov):
                # i915: back to auto only once every VF quota is 0.
                raise OSError(errno.ESTALE, os.strerror(errno.ESTALE), str(path))
            if path.name in self.gt_limits:
                self._check_gt_limit(iov, path, value)
            if path.name in I915_QUOTA_FILES and value.strip() != "0":
                auto.write_text("0\n", encoding="utf-8")  # any quota switches to manual
        path.write_text(f"{value}\n", encoding="utf-8")

    def _check_gt_limit(self, iov: Path, path: Path, value: str) -> None:
        """``EDQUOT`` when the VFs of the GT would hold more of the quota than the GT has."""
        try:
            wanted = int(value.strip(), 0)
        except ValueError:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), str(path)) from None
        gt = path.parent.name
        held = sum(int(p.read_text()) for p in iov.glob(f"vf*/{gt}/{path.name}") if p != path)
        if held + wanted > self.gt_limits[path.name]:
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(path))

    @staticmethod
    def _quotas_set(iov: Path) -> bool:
        return any(
            p.read_text().strip() != "0"
            for name in I915_QUOTA_FILES
            for p in iov.glob(f"vf*/gt*/{name}")
        )

    def _numvfs(self, path: Path, value: str) -> None:
        pf_dir = path.parent
        try:
            wanted = int(value.strip(), 0)
        except ValueError:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), str(path)) from None
        current = int(path.read_text())
        total = int((pf_dir / "sriov_totalvfs").read_text())
        if wanted < 0 or wanted > total:
            raise OSError(errno.ERANGE, os.strerror(errno.ERANGE), str(path))
        if wanted == current:
            return
        if not (pf_dir / "driver").is_symlink():
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
        if wanted and current:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(path))
        path.write_text(f"{wanted}\n", encoding="utf-8")
        address = pf_dir.name
        if wanted == 0:
            self.fs.remove_vfs(address)
            return
        if self.materialise:
            thread = threading.Thread(
                target=self._create, args=(address, wanted), daemon=True, name="fake-kernel"
            )
            self._threads.append(thread)
            thread.start()

    def _create(self, address: str, count: int) -> None:
        threading.Event().wait(self.delay)
        for index in range(count):
            self.fs.add_vf(address, index)

    def join(self) -> None:
        """Wait for pending VF creations (tests call it before removing the tree)."""
        for thread in self._threads:
            thread.join()


class FakeDrmIoctl:
    """Answers the i915 and xe memory-region queries for cards named in ``regions``.

    ``regions`` maps a card node name (``card1``) to ``(memory class, bytes)`` pairs; class 1
    is device memory, 0 system memory. Other cards get ``ENOTTY`` like a non-DRM file.
    """

    def __init__(self, regions: dict[str, list[tuple[int, int]]]) -> None:
        self.regions = regions
        self.calls = 0

    def __call__(self, fd: int, request: int, arg: ctypes.Structure) -> None:
        """Fill ``arg`` (and the buffers it points to) like the kernel."""
        self.calls += 1
        name = Path(f"/proc/self/fd/{fd}").readlink().name
        regions = self.regions.get(name)
        if regions is None:
            raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))
        if request == DRM_IOCTL_I915_QUERY:
            query = cast(I915Query, arg)
            item = I915QueryItem.from_address(query.items_ptr)
            data = struct.pack("<I3I", len(regions), 0, 0, 0) + b"".join(
                struct.pack("<HHIQQ8Q", cls, i, 0, size, size, *([0] * 8))
                for i, (cls, size) in enumerate(regions)
            )
            if item.length == 0:
                item.length = len(data)
            else:
                ctypes.memmove(item.data_ptr, data, len(data))
        elif request == DRM_IOCTL_XE_DEVICE_QUERY:
            xe_query = cast(XeDeviceQuery, arg)
            data = struct.pack("<II", len(regions), 0) + b"".join(
                struct.pack("<HHIQQQQ6Q", cls, i, 4096, size, 0, size, 0, *([0] * 6))
                for i, (cls, size) in enumerate(regions)
            )
            if xe_query.size == 0:
                xe_query.size = len(data)
            else:
                ctypes.memmove(xe_query.data, data, len(data))
        else:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))


def node_context(
    fs: FakeSysfs,
    state_dir: Path | None = None,
    config: dict[str, Any] | None = None,
    **options: str | None,
) -> NodeContext:
    """A NodeContext for node ``node-1`` pointing the backend's options at the fake tree."""
    values: dict[str, str | None] = {"sysfs_root": str(fs.sys), "devfs_root": str(fs.dev)}
    values.update(options)
    return NodeContext(
        node_name="node-1",
        driver_name="gpu.intel.com",
        options=values,
        config=config or {},
        state_dir=state_dir,
    )


def allocated_claim(
    *devices: str,
    uid: str | None = None,
    configs: dict[str, tuple[object, ...]] | None = None,
    consumed: dict[str, str] | None = None,
    share_id: str | None = None,
    admin_access: bool = False,
) -> AllocatedClaim:
    """A claim allocated the named devices (requests ``r0``, ``r1``... in pool ``node-1``).

    ``admin_access`` marks every result as the scheduler does for a request with
    ``adminAccess: true`` (monitoring).
    """
    import uuid

    uid = uid or str(uuid.uuid4())
    allocated = tuple(
        AllocatedDevice(
            request=f"r{i}",
            pool="node-1",
            device=name,
            share_id=share_id,
            consumed_capacity=consumed or {},
            admin_access=admin_access,
        )
        for i, name in enumerate(devices)
    )
    return AllocatedClaim(ClaimRef("default", f"claim-{uid[:8]}", uid), allocated, configs or {})


def build_demo(base: Path, *, char_devices: bool = False) -> FakeSysfs:
    """A demo node: simpledrm card0, Flex 170 (SR-IOV), Arc A770, Arc B580 (xe), TGL iGPU.

    The Flex and the A770 have management engines (``mei0``, ``mei1``).

    ``char_devices`` as for :class:`FakeSysfs`.
    """
    fs = FakeSysfs(base, char_devices=char_devices)
    fs.add_simpledrm()
    fs.add_gpu(
        "0000:03:00.0",
        "0x56c0",
        lmem_total_bytes=16 * GIB,
        sriov_totalvfs=31,
        error_counters=True,
    )
    fs.add_mei("0000:03:00.0", "mei-gsc")
    fs.add_gpu("0000:08:00.0", "0x56a0", bridge="0000:00:1c.0", numa_node=0)
    fs.add_mei("0000:08:00.0")
    fs.add_gpu(
        "0000:0c:00.0",
        "0xe20b",
        driver="xe",
        bridge="0000:00:1d.0",
        pcie_root="pci0000:00",
        xe_vram_per_tile=[12 * GIB],
        gts=2,
    )
    fs.add_gpu("0000:00:02.0", "0x9a49", bridge=None, numa_node=-1)
    return fs


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dra_backend_i915.testing [--char-devices] DIR``: build the demo node in DIR.

    ``--char-devices`` makes the ``dev/dri`` nodes character devices (needs root).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    char_devices = "--char-devices" in args
    args = [a for a in args if a != "--char-devices"]
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m dra_backend_i915.testing [--char-devices] DIR", file=sys.stderr)
        return 2
    base = Path(args[0])
    if base.exists() and any(base.iterdir()):
        print(f"{base} is not empty; choose a new directory", file=sys.stderr)
        return 1
    try:
        fs = build_demo(base, char_devices=char_devices)
    except PermissionError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"fake sysfs: {fs.sys}\nfake devfs: {fs.dev}")
    print(
        f"try: dra-core discover --backend i915 --sysfs-root {fs.sys} --devfs-root {fs.dev}\n"
        f" or: python -m dra_backend_i915 --sysfs-root {fs.sys} --devfs-root {fs.dev}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
