"""Discovery of Intel GPUs from sysfs: identity, DRM nodes, memory, NUMA, PCIe root, SR-IOV.

Walks ``<sysfs>/bus/pci/devices``, keeps vendor ``0x8086`` functions of display class
``0x03xxxx`` bound to ``i915`` or ``xe``, and reads everything from each function's own
directory: the card and render nodes are the entries of its ``drm/`` directory (never computed
from each other), the PCIe root is the first component of the resolved path under
``devices/``, SR-IOV relations come from ``sriov_*``, ``virtfnK`` and ``physfn``.

Devices that cannot be used are not published; they are returned as :class:`Skipped` with the
reason (unbound or bound to another driver such as ``vfio-pci``, unreadable identity files,
dangling links, no DRM node yet), and logged, so an operator sees why a GPU is missing. Each
function is read on its own: whatever is wrong in one function's directory (a file that is
missing, holds garbage, is a FIFO or a device, or cannot be listed) leaves out that function
only, never the others. A file that only adds a detail (``numa_node``, a memory size) leaves
out that detail, with a warning, and the GPU is published without it.

A GPU that *was* published earlier in this agent run and then loses its driver (unbound,
rebound to another driver, gone from sysfs) is different: :class:`LastSeen` keeps it in the
discovery as it was last seen, marked :attr:`Gpu.lost` with the reason, so it stays published
under the same name (the health check reports it unhealthy, which taints it) until its driver
is back or the agent restarts.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from dra_backend_i915.memory import MemoryQuery
from dra_backend_i915.pciids import ModelInfo, lookup, normalize_device_id
from dra_backend_i915.sysfs import SysfsError, link_name, read_int, read_str
from dra_core import logger

__all__ = (
    "DRM_DRIVERS",
    "Discoverer",
    "Discovery",
    "Gpu",
    "LastSeen",
    "Skipped",
    "SriovInfo",
    "address_of",
    "device_name",
    "drm_nodes",
    "mei_node",
    "vf_address",
    "vf_name",
    "vf_quota",
)

INTEL_VENDOR = 0x8086
#: The highest NUMA node number Linux can have (``CONFIG_NODES_SHIFT`` is at most 10).
MAX_NUMA_NODE = (1 << 10) - 1
#: More local memory than any GPU has (1 PiB): a larger size read from sysfs is not believed.
MAX_MEMORY_BYTES = 1 << 50
#: The kernel drivers whose GPUs this backend publishes.
DRM_DRIVERS = ("i915", "xe")
_ADDRESS = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
_CARD = re.compile(r"^card(\d+)$")
_RENDER = re.compile(r"^renderD(\d+)$")
_VIRTFN = re.compile(r"^virtfn(\d+)$")
_MEI = re.compile(r"^mei(\d+)$")
_NAME = re.compile(r"^gpu-([0-9a-f]{4})-([0-9a-f]{2})-([0-9a-f]{2})-([0-7])$")


def device_name(address: str) -> str:
    """The published name of the GPU at a PCI address: ``gpu-0000-03-00-0``."""
    return "gpu-" + address.replace(":", "-").replace(".", "-")


def address_of(name: str) -> str | None:
    """The PCI address a GPU's device name was made from (``gpu-0000-03-00-0``), or None."""
    match = _NAME.match(name)
    if match is None:
        return None
    domain, bus, dev, fn = match.groups()
    return f"{domain}:{bus}:{dev}.{fn}"


def vf_name(pf_address: str, index: int) -> str:
    """The published name of VF ``index`` (0-based, as ``virtfnK``) of a PF."""
    return f"{device_name(pf_address)}-vf{index}"


def vf_address(pf_address: str, offset: int, stride: int, index: int) -> str:
    """The PCI address of VF ``index`` from the PF's ``sriov_offset`` and ``sriov_stride``.

    Routing IDs are ``bus << 8 | device << 3 | function``; VF k has PF + offset + k * stride.
    """
    domain, bus, rest = pf_address.split(":")
    dev, fn = rest.split(".")
    rid = (int(bus, 16) << 8) | (int(dev, 16) << 3) | int(fn)
    rid += offset + stride * index
    bus_n, devfn = divmod(rid, 256)
    if bus_n > 0xFF:
        msg = f"VF {index} of {pf_address} would be past bus ff (offset {offset}, stride {stride})"
        raise ValueError(msg)
    return f"{domain}:{bus_n:02x}:{devfn >> 3:02x}.{devfn & 7}"


@dataclass(frozen=True)
class SriovInfo:
    """The SR-IOV state of a physical function."""

    total_vfs: int
    num_vfs: int
    offset: int
    stride: int
    autoprobe: bool
    #: The VFs' PCI device ID (``sriov_vf_device``), or None when not offered.
    vf_device_id: int | None = None
    #: Existing VFs as (virtfn index, PCI address), in index order.
    vfs: tuple[tuple[int, str], ...] = ()


@dataclass(frozen=True)
class Gpu:
    """One Intel GPU function (whole GPU, PF or VF) as discovered."""

    address: str
    device_id: int
    info: ModelInfo
    driver: str
    path: Path
    pcie_root: str
    numa_node: int | None
    card: str | None
    render: str | None
    #: Bytes of local memory; None when nothing said.
    memory_bytes: int | None
    #: Where ``memory_bytes`` came from: ``sysfs``, ``ioctl``, ``quota`` (a VF's, set on its
    #: PF), ``integrated`` or ``unknown``.
    memory_source: str
    sriov: SriovInfo | None = None
    #: For a VF: its PF's address and its virtfn index.
    physfn: str | None = None
    vf_index: int | None = None
    #: Non-empty when the function was published earlier in this run and is no longer usable
    #: (unbound, bound to another driver, gone from sysfs): why. Everything else is as it was
    #: last seen, so it stays published the same way (and unhealthy).
    lost: str = ""
    #: The management engine (MEI/GSC) character device of the GPU (``mei0``), when it has
    #: one: the ``mei`` child of the function's own ``*.mei-gsc*`` auxiliary device.
    mei: str | None = None

    @property
    def name(self) -> str:
        """The published device name (VFs named after their PF)."""
        if self.physfn is not None and self.vf_index is not None:
            return vf_name(self.physfn, self.vf_index)
        return device_name(self.address)

    @property
    def pci_id(self) -> str:
        """The PCI device ID as ``0x56c0``."""
        return f"0x{self.device_id:04x}"

    @property
    def is_vf(self) -> bool:
        """Whether this function is an SR-IOV virtual function."""
        return self.physfn is not None


@dataclass(frozen=True)
class Skipped:
    """An Intel display function that is not published, and why."""

    address: str
    reason: str


@dataclass(frozen=True)
class Discovery:
    """The result of one walk of sysfs."""

    gpus: tuple[Gpu, ...] = ()
    skipped: tuple[Skipped, ...] = ()
    #: Addresses of GPUs kept from an earlier discovery (see :class:`LastSeen`) -> why lost.
    lost: dict[str, str] = field(default_factory=dict)

    def by_address(self, address: str) -> Gpu | None:
        """The GPU at ``address``, or None."""
        return next((g for g in self.gpus if g.address == address), None)


def drm_nodes(device_dir: Path) -> tuple[str | None, str | None]:
    """The card and render node names in a PCI function's own ``drm/`` directory.

    When several match (it should not happen), the lowest number wins; ``controlD*`` is
    ignored. Either may be None: a GPU without a render node still works for display.
    """
    try:
        names = [p.name for p in (device_dir / "drm").iterdir()]
    except OSError:
        return None, None
    cards = sorted((int(m.group(1)), n) for n in names if (m := _CARD.match(n)))
    renders = sorted((int(m.group(1)), n) for n in names if (m := _RENDER.match(n)))
    return (cards[0][1] if cards else None, renders[0][1] if renders else None)


def mei_node(device_dir: Path) -> str | None:
    """The MEI device (``mei0``, node ``/dev/mei0``) of a PCI function, or None.

    The GPU's graphics system controller is an auxiliary device of the function
    (``i915.mei-gsc.<id>`` on Flex and Max, ``i915.mei-gscfi.<id>`` on Arc, ``xe.mei-gscfi.<id>``),
    whose ``mei/meiN`` child is the character device monitoring and firmware tools open. When
    several match (it should not happen), the lowest number wins.
    """
    found = sorted(
        (int(m.group(1)), p.name)
        for p in device_dir.glob("*mei*/mei/mei*")
        if (m := _MEI.match(p.name))
    )
    return found[0][1] if found else None


def _pcie_root(resolved: Path, sysfs_root: Path) -> str:
    """``pci0000:00`` from ``<sysfs>/devices/pci0000:00/.../0000:03:00.0`` (both resolved)."""
    try:
        parts = resolved.relative_to(sysfs_root).parts
    except ValueError:
        parts = resolved.parts
    if "devices" in parts:
        after = parts[parts.index("devices") + 1 :]
        if after and after[0].startswith("pci"):
            return after[0]
    raise SysfsError(resolved, "is not under devices/pci<domain>:<bus>, no PCIe root")


@dataclass
class Discoverer:
    """Walks one sysfs tree; keeps ioctl memory answers so rediscovery stays cheap."""

    sysfs_root: Path
    devfs_root: Path
    memory_query: MemoryQuery | None = None
    _memory_cache: dict[tuple[str, str], int | None] = field(default_factory=dict)
    #: Messages already logged at their level; repeats go to debug (discovery runs often).
    _said: set[str] = field(default_factory=set)
    #: GPUs published earlier in this run, kept (lost) when they lose their driver.
    last_seen: LastSeen = field(default_factory=lambda: LastSeen())
    #: The memory quota last read for each VF made outside this backend, by VF address.
    _quotas: dict[str, int | None] = field(default_factory=dict)
    _quota_lock: threading.Lock = field(default_factory=threading.Lock)

    def _once(self, level: str, address: str, message: str) -> None:
        first = message not in self._said
        self._said.add(message)
        logger.bind(device=address).log(level if first else "DEBUG", "{}", message)

    def discover(self, created: Collection[str] = ()) -> Discovery:
        """Every Intel GPU function bound to i915 or xe, and the ones skipped with a reason.

        GPUs published by an earlier call that lost their driver since are kept, marked lost
        (:class:`LastSeen`). ``created`` are the PFs whose VFs this backend made.
        """
        devices_dir = self.sysfs_root / "bus" / "pci" / "devices"
        try:
            entries = sorted(devices_dir.iterdir())
        except OSError as exc:
            raise SysfsError(devices_dir, f"cannot be listed ({exc.strerror or exc})") from None
        gpus: list[Gpu] = []
        skipped: list[Skipped] = []
        root = self.sysfs_root.resolve()
        for entry in entries:
            try:
                gpu = self._one(entry, root)
            except SysfsError as exc:
                skipped.append(Skipped(entry.name, str(exc)))
                continue
            except _Skip as skip:
                skipped.append(Skipped(entry.name, skip.reason))
                continue
            except (OSError, ValueError) as exc:  # a directory that cannot be listed, say
                skipped.append(Skipped(entry.name, f"{entry}: {exc}"))
                continue
            if gpu is not None:
                gpus.append(gpu)
        gpus = self._with_vf_quotas(gpus, created)
        result = self.last_seen.apply(Discovery(tuple(gpus), tuple(skipped)), created)
        result = replace(result, gpus=tuple(self._with_vf_indexes(result.gpus)))
        for item in result.skipped:
            self._once("WARNING", item.address, f"GPU {item.address} not published: {item.reason}")
        return result

    def _one(self, link: Path, root: Path) -> Gpu | None:
        address = link.name
        if not _ADDRESS.match(address):
            return None
        entry = Path(os.path.realpath(link))
        if not entry.is_dir():
            msg = f"{link} is a dangling link"
            raise _Skip(msg)
        vendor = read_int(entry / "vendor", 16)
        pci_class = read_int(entry / "class", 16)
        if vendor != INTEL_VENDOR or pci_class >> 16 != 0x03:
            return None
        try:
            device_id = normalize_device_id(read_str(entry / "device"))
        except ValueError as exc:
            raise SysfsError(entry / "device", str(exc)) from None
        info = lookup(device_id)
        driver_link = entry / "driver"
        if not driver_link.is_symlink():
            msg = (
                f"{info.model} (0x{device_id:04x}) is not bound to any driver; bind it to "
                f"{info.default_driver or 'i915 or xe'} to publish it"
            )
            raise _Skip(msg)
        driver = link_name(driver_link)
        if driver not in DRM_DRIVERS:
            msg = f"bound to {driver}, not i915 or xe (e.g. passed through to a VM)"
            raise _Skip(msg)
        resolved = entry
        card, render = drm_nodes(resolved)
        if card is None and render is None:
            msg = f"bound to {driver} but has no DRM node in {resolved / 'drm'} yet"
            raise _Skip(msg)
        physfn = None
        if (entry / "physfn").is_symlink():
            physfn = link_name(entry / "physfn")
        memory, source = self._memory(resolved, driver, card, info)
        return Gpu(
            address=address,
            device_id=device_id,
            info=info,
            driver=driver,
            path=resolved,
            pcie_root=_pcie_root(resolved, root),
            numa_node=self._numa(entry),
            card=card,
            render=render,
            memory_bytes=memory,
            memory_source=source,
            sriov=None if physfn else _sriov(entry),
            physfn=physfn,
            mei=mei_node(resolved),
        )

    def _numa(self, entry: Path) -> int | None:
        """The function's NUMA node; None when it has none (-1) or the file is not sound."""
        try:
            node = read_int(entry / "numa_node")
        except SysfsError as exc:
            if exc.problem != "missing":  # old kernels and fake trees may lack it
                self._once("WARNING", entry.name, f"{exc}; publishing {entry.name} without it")
            return None
        if not -1 <= node <= MAX_NUMA_NODE:
            self._once(
                "WARNING",
                entry.name,
                f"{entry / 'numa_node'}: {str(node)[:40]} is not a NUMA node (-1 to "
                f"{MAX_NUMA_NODE}); publishing {entry.name} without it",
            )
            return None
        return node if node >= 0 else None

    def _memory(
        self, device_dir: Path, driver: str, card: str | None, info: ModelInfo
    ) -> tuple[int | None, str]:
        sysfs = _sysfs_memory(device_dir, driver, card)
        if sysfs is not None:
            return sysfs, "sysfs"
        if not info.local_memory:
            return 0, "integrated"
        if card is not None and self.memory_query is not None:
            key = (device_dir.name, card)
            if key not in self._memory_cache:
                self._memory_cache[key] = self.memory_query.query(
                    driver, self.devfs_root / "dri" / card
                )
            value = self._memory_cache[key]
            if value is not None:
                return value, "ioctl"
        if not (device_dir / "physfn").is_symlink():  # a VF's quota may still say: see below
            self._unknown_memory(device_dir.name)
        return None, "unknown"

    def _unknown_memory(self, address: str) -> None:
        self._once(
            "INFO",
            address,
            f"local memory of {address} unknown (no sysfs size or VF quota, DRM query failed or "
            f"not privileged); publishing it without a memory capacity",
        )

    def _with_vf_quotas(self, gpus: list[Gpu], created: Collection[str]) -> list[Gpu]:
        """Give VFs made outside this backend the memory their PF's quota gives them.

        Only for VFs whose memory nothing else told (their own ``lmem_total_bytes``, the DRM
        query); the VFs of PFs in ``created`` are published from their profile instead. A VF
        whose PF is not usable now (no driver, so no quota tree) keeps the quota last read.
        """
        pfs = {g.address for g in gpus if g.sriov is not None}
        slot = {
            address: (pf, index)
            for pf in gpus
            if pf.sriov is not None and pf.address not in created
            for index, address in pf.sriov.vfs
        }
        result = []
        for gpu in gpus:
            if gpu.physfn is None or gpu.memory_bytes is not None or gpu.physfn in created:
                result.append(gpu)
                continue
            found = slot.get(gpu.address)
            if found is not None:
                quota = vf_quota(*found)
                with self._quota_lock:
                    self._quotas[gpu.address] = quota
            elif gpu.physfn not in pfs:
                with self._quota_lock:
                    quota = self._quotas.get(gpu.address)
            else:
                quota = None
            if quota is None:
                self._unknown_memory(gpu.address)
            else:
                gpu = replace(gpu, memory_bytes=quota, memory_source="quota")
            result.append(gpu)
        return result

    @staticmethod
    def _with_vf_indexes(gpus: Iterable[Gpu]) -> list[Gpu]:
        """Give each VF its index from its PF's ``virtfnK`` links."""
        index_of = {
            address: index
            for gpu in gpus
            if gpu.sriov is not None
            for index, address in gpu.sriov.vfs
        }
        result = []
        for gpu in gpus:
            if gpu.physfn is not None:
                index = index_of.get(gpu.address)
                if index is None:
                    logger.warning(
                        "VF {} has no virtfn link in its PF {}; naming it by its address",
                        gpu.address,
                        gpu.physfn,
                    )
                    gpu = Gpu(**{**gpu.__dict__, "physfn": None})
                else:
                    gpu = Gpu(**{**gpu.__dict__, "vf_index": index})
            result.append(gpu)
        return result


@dataclass
class LastSeen:
    """The GPUs published earlier in this run, kept published when they lose their driver.

    Every whole GPU or PF found bound to i915/xe is remembered as found (attributes, memory,
    SR-IOV layout), and so are the VFs of a PF whose VFs were made outside this backend (those
    VFs are what is published for it). When a remembered function is later missing from a
    discovery (unbound, bound to ``vfio-pci`` or another driver, a dangling link, gone from
    sysfs, or bound but without a DRM node), it is put back as it was last seen with
    :attr:`Gpu.lost` set to the reason, so the same devices stay published; the health check
    reports them unhealthy, the core taints them, and allocations and prepares are refused.
    When the function is bound again it is discovered afresh and replaces the remembered one.

    A lost GPU stays until it comes back or the agent restarts (a new process remembers
    nothing: GPUs unbound at start are not published, as before). GPUs never published in
    this run are never kept.
    """

    gpus: dict[str, Gpu] = field(default_factory=dict)
    #: Admin-made VFs by PF address (empty for PFs whose VFs this backend makes).
    vfs: dict[str, tuple[Gpu, ...]] = field(default_factory=dict)
    _lost: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def apply(self, found: Discovery, created: Collection[str] = ()) -> Discovery:
        """``found`` plus the remembered GPUs missing from it, marked lost."""
        with self._lock:
            return self._apply(found, created)

    def _apply(self, found: Discovery, created: Collection[str]) -> Discovery:
        present = {g.address: g for g in found.gpus}
        for gpu in found.gpus:
            if gpu.is_vf:
                continue
            self.gpus[gpu.address] = gpu
            admin = gpu.sriov is not None and gpu.sriov.num_vfs > 0 and gpu.address not in created
            self.vfs[gpu.address] = (
                tuple(g for g in found.gpus if g.physfn == gpu.address) if admin else ()
            )
        reasons = {s.address: s.reason for s in found.skipped}
        kept: list[Gpu] = []
        lost: dict[str, str] = {}
        for address, gpu in self.gpus.items():
            if address in present:
                if address in self._lost:
                    self._lost.discard(address)
                    logger.bind(device=address).info(
                        "GPU {} is bound to {} again; publishing it afresh", address, gpu.driver
                    )
                continue
            reason = reasons.get(address)
            reason = f"{address}: {reason}" if reason else f"{address} is gone from sysfs"
            lost[address] = reason
            if address not in self._lost:
                self._lost.add(address)
                logger.bind(device=address).warning(
                    "GPU {} was published and is no longer usable ({}); it stays published as "
                    "unhealthy until it is bound to {} again or the agent restarts",
                    address,
                    reason,
                    gpu.driver,
                )
            vfs = self.vfs.get(address, ())
            sriov = gpu.sriov
            if sriov is not None and not vfs:
                # VFs this backend makes: published from the profile whatever exists now (the
                # virtfn list stays, to name VFs that outlive their PF's driver).
                sriov = replace(sriov, num_vfs=0)
            kept.append(replace(gpu, sriov=sriov, lost=reason))
            for vf in vfs:
                if vf.address not in present:
                    lost[vf.address] = f"its PF: {reason}"
                    kept.append(replace(vf, lost=f"its PF: {reason}"))
        if not kept:
            return found
        gpus = sorted([*found.gpus, *kept], key=lambda g: g.address)
        skipped = tuple(s for s in found.skipped if s.address not in lost)
        return Discovery(tuple(gpus), skipped, lost)


class _Skip(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def vf_quota(pf: Gpu, index: int) -> int | None:
    """The local memory ``pf`` gives its VF ``index`` (``virtfnK``) by quota; None if unset.

    i915 ``<pf card>/prelim_iov/vf<K+1>/gt*/lmem_quota`` summed over the GTs (a per-tile
    figure on each tile), xe ``sriov_admin/vf<K+1>/profile/vram_quota``. A quota of 0 means the
    kernel provisioned the VF itself (a fair share it does not show), which is None too.
    """
    vf = f"vf{index + 1}"
    paths: list[Path] = []
    if pf.driver == "i915" and pf.card is not None:
        card = pf.path / "drm" / pf.card
        for tree in ("prelim_iov", "iov"):
            paths = sorted((card / tree / vf).glob("gt*/lmem_quota"))
            if paths:
                break
    elif pf.driver == "xe":
        paths = [pf.path / "sriov_admin" / vf / "profile" / "vram_quota"]
        paths = [p for p in paths if p.exists()]
    try:
        total = sum(_memory_bytes(p) for p in paths)
    except SysfsError as exc:
        logger.warning("{}; the memory of VF {} of {} is unknown", exc, index, pf.address)
        return None
    return total or None


def _memory_bytes(path: Path) -> int:
    """A memory size file: bytes, from 0 to :data:`MAX_MEMORY_BYTES`."""
    value = read_int(path)
    if not 0 <= value <= MAX_MEMORY_BYTES:
        raise SysfsError(path, f"holds {str(value)[:40]}, not a memory size in bytes")
    return value


def _sysfs_memory(device_dir: Path, driver: str, card: str | None) -> int | None:
    """i915 backports: ``drm/cardN/lmem_total_bytes`` (all tiles); xe: ``tile*/...vram...``."""
    try:
        if driver == "i915" and card is not None:
            path = device_dir / "drm" / card / "lmem_total_bytes"
            return _memory_bytes(path) if path.exists() else None
        if driver == "xe":
            sizes = sorted(device_dir.glob("tile[0-9]*/physical_vram_size_bytes"))
            return sum(_memory_bytes(p) for p in sizes) if sizes else None
    except SysfsError as exc:
        logger.warning("{}; trying the DRM memory query instead", exc)
    return None


def _pci_count(path: Path) -> int:
    """A 16-bit SR-IOV register shown in sysfs (``sriov_totalvfs``, ``sriov_offset``...)."""
    value = read_int(path)
    if not 0 <= value <= 0xFFFF:
        raise SysfsError(path, f"holds {str(value)[:40]}, not a 16-bit SR-IOV count")
    return value


def _sriov(entry: Path) -> SriovInfo | None:
    if not (entry / "sriov_totalvfs").exists():
        return None
    total = _pci_count(entry / "sriov_totalvfs")
    if total <= 0:
        return None
    vfs = []
    for link in entry.glob("virtfn*"):
        match = _VIRTFN.match(link.name)
        if match:
            vfs.append((int(match.group(1)), link_name(link)))
    autoprobe_path = entry / "sriov_drivers_autoprobe"
    vf_device_id = None
    if (entry / "sriov_vf_device").exists():
        try:  # "%x" today, "0x%04x" with a proposed patch: accept both
            vf_device_id = normalize_device_id(read_str(entry / "sriov_vf_device"))
        except ValueError as exc:
            logger.warning("{}: {}; VF PCI ID unknown", entry / "sriov_vf_device", exc)
    return SriovInfo(
        total_vfs=total,
        num_vfs=_pci_count(entry / "sriov_numvfs"),
        offset=_pci_count(entry / "sriov_offset"),
        stride=_pci_count(entry / "sriov_stride"),
        autoprobe=read_str(autoprobe_path) != "0" if autoprobe_path.exists() else True,
        vf_device_id=vf_device_id,
        vfs=tuple(sorted(vfs)),
    )
