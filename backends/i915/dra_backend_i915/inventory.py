"""Turning discovered GPUs into the published dra_core Inventory.

Four shapes of device, published in this order (the scheduler takes the first that fits, so
plain GPUs come before the partitionable ones):

1. **Whole GPUs** (``type: gpu``): capacity ``memory`` when known.
2. **Shared GPUs** (selected by ``--shared-gpus``): ``allow_multiple_allocations`` with
   consumable ``memory`` (512Mi steps, default all of it) and ``millicores`` (100 steps up to
   1000, default 1000), so a claim without a request still gets the whole GPU. This is
   *accounting*: nothing in the hardware keeps one share from using more than it asked for.
3. **VFs an administrator made** (``sriov_numvfs`` > 0 before this backend touched the PF):
   each VF as it is (``type: vf``), no counters; the PF itself is not published, since whole-GPU
   use would break the VFs' users.
4. **Partitionable PFs** (SR-IOV capable, model with a profile, no admin VFs): the PF and the
   profile's VFs, all consuming from one counter set per PF (``memory`` when known, and
   ``vfs``). The PF takes everything, each VF its share, so whole-GPU and VF use exclude
   each other. VFs need not exist yet: they are created at the first VF's prepare. The PF
   comes first: on an API server without partitionable devices the core keeps devices in
   order while the counters allow, so there the whole GPU stays and the VFs go.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from dra_backend_i915.config import NodeSettings
from dra_backend_i915.discovery import Discovery, Gpu, device_name, vf_address, vf_name
from dra_backend_i915.profiles import PROFILES, Profile, choose, profiles_for
from dra_backend_i915.state import State
from dra_core import (
    AttributeValue,
    Capacity,
    CounterConsumption,
    CounterSet,
    Device,
    Inventory,
    ModelError,
    RequestPolicy,
    ValidRange,
    format_bytes,
    logger,
    validate_inventory,
)

__all__ = (
    "MEMORY_STEP",
    "MILLICORES",
    "MILLICORES_STEP",
    "Built",
    "DeviceRecord",
    "build",
    "detect_ecc",
)

MEMORY_STEP = 512 << 20
MILLICORES = 1000
MILLICORES_STEP = 100
STANDARD = "resource.kubernetes.io"

Kind = Literal["gpu", "shared", "pf", "planned-vf", "vf"]


@dataclass(frozen=True)
class DeviceRecord:
    """What the backend knows about one published device, beyond what is published."""

    name: str
    kind: Kind
    #: The PCI function, when it exists now (a planned VF does not until created).
    gpu: Gpu | None
    #: For VFs: the PF.
    pf: Gpu | None = None
    vf_index: int | None = None
    profile: Profile | None = None
    #: For VFs: the PCI address (computed for planned ones).
    address: str | None = None

    @property
    def pf_address(self) -> str | None:
        """The PF's address for a VF or PF, else None."""
        if self.pf is not None:
            return self.pf.address
        return self.gpu.address if self.kind == "pf" and self.gpu else None


@dataclass(frozen=True)
class Built:
    """The inventory and the backend's records of its devices, by name."""

    inventory: Inventory
    records: Mapping[str, DeviceRecord]


def detect_ecc(gpu: Gpu, key: str) -> bool:
    """ECC is on when the memory is below the one-VF non-ECC quota (or when unknown: safe)."""
    smallest = profiles_for(key)
    if not smallest or gpu.memory_bytes is None:
        return True
    return gpu.memory_bytes < smallest[0].vf_memory(ecc=False)


def _common(gpu: Gpu, kind: str) -> dict[str, AttributeValue]:
    attributes: dict[str, AttributeValue] = {
        "type": kind,
        "model": gpu.info.model,
        "family": gpu.info.family,
        "driver": gpu.driver,
        "pciId": gpu.pci_id,
        "pciAddress": gpu.address,
        "sriov": gpu.sriov is not None,
        "memoryKnown": gpu.memory_bytes is not None,
        f"{STANDARD}/pcieRoot": gpu.pcie_root,
        f"{STANDARD}/pciBusID": gpu.address,
    }
    if gpu.numa_node is not None:
        attributes["numa"] = gpu.numa_node
    return attributes


def _memory(gpu: Gpu) -> dict[str, Capacity]:
    if gpu.memory_bytes is None:
        return {}
    return {"memory": Capacity(format_bytes(gpu.memory_bytes))}


def _whole(gpu: Gpu) -> Device:
    return Device(name=gpu.name, attributes=_common(gpu, "gpu"), capacity=_memory(gpu))


def _shared(gpu: Gpu) -> Device:
    capacity: dict[str, Capacity] = {}
    memory = gpu.memory_bytes or 0
    if memory >= MEMORY_STEP:
        top = MEMORY_STEP + (memory - MEMORY_STEP) // MEMORY_STEP * MEMORY_STEP
        capacity["memory"] = Capacity(
            format_bytes(memory),
            RequestPolicy(
                default=format_bytes(top),
                valid_range=ValidRange(
                    min=format_bytes(MEMORY_STEP),
                    max=format_bytes(top),
                    step=format_bytes(MEMORY_STEP),
                ),
            ),
        )
    elif gpu.memory_bytes is not None:
        capacity["memory"] = Capacity(format_bytes(memory))
    capacity["millicores"] = Capacity(
        str(MILLICORES),
        RequestPolicy(
            default=str(MILLICORES),
            valid_range=ValidRange(
                min=str(MILLICORES_STEP), max=str(MILLICORES), step=str(MILLICORES_STEP)
            ),
        ),
    )
    attributes = _common(gpu, "gpu")
    attributes["shared"] = True
    return Device(
        name=gpu.name, attributes=attributes, capacity=capacity, allow_multiple_allocations=True
    )


def _admin_vf(vf: Gpu, pf: Gpu | None) -> Device:
    attributes = _common(vf, "vf")
    attributes["sriov"] = False
    attributes["parent"] = device_name(vf.physfn or "")
    if vf.vf_index is not None:
        attributes["vfIndex"] = vf.vf_index
    if pf is not None and vf.info.model == "unknown":
        attributes["model"] = pf.info.model
        attributes["family"] = pf.info.family
    return Device(name=vf.name, attributes=attributes, capacity=_memory(vf))


def _partitioned(
    pf: Gpu, profile: Profile, existing: Mapping[int, Gpu]
) -> tuple[CounterSet, list[Device], list[DeviceRecord]]:
    assert pf.sriov is not None
    count = profile.num_vfs
    set_name = pf.name
    ecc = detect_ecc(pf, profile.key)
    vf_memory = profile.vf_memory(ecc=ecc)
    counters = {"vfs": str(count)}
    share: dict[str, str] = {"vfs": "1"}
    if pf.memory_bytes is not None:
        counters["memory"] = format_bytes(pf.memory_bytes)
        share["memory"] = format_bytes(pf.memory_bytes // count)
    devices, records = [], []
    for index in range(count):
        address = vf_address(pf.address, pf.sriov.offset, pf.sriov.stride, index)
        name = vf_name(pf.address, index)
        attributes = _common(pf, "vf")
        attributes.update(
            {
                "sriov": False,
                "memoryKnown": True,
                "pciAddress": address,
                f"{STANDARD}/pciBusID": address,
                "parent": pf.name,
                "profile": profile.name,
                "vfIndex": index,
            }
        )
        if pf.sriov.vf_device_id is not None:
            attributes["pciId"] = f"0x{pf.sriov.vf_device_id:04x}"
        devices.append(
            Device(
                name=name,
                attributes=attributes,
                capacity={"memory": Capacity(format_bytes(vf_memory))},
                consumes_counters=(CounterConsumption(set_name, share),),
            )
        )
        records.append(
            DeviceRecord(name, "planned-vf", existing.get(index), pf, index, profile, address)
        )
    pf_attributes = _common(pf, "gpu")
    pf_attributes["vfProfile"] = profile.name
    devices.append(
        Device(
            name=pf.name,
            attributes=pf_attributes,
            capacity=_memory(pf),
            consumes_counters=(CounterConsumption(set_name, dict(counters)),),
        )
    )
    records.append(DeviceRecord(pf.name, "pf", pf, None, None, profile, pf.address))
    # The whole GPU first (see the module docstring).
    devices.insert(0, devices.pop())
    records.insert(0, records.pop())
    return CounterSet(set_name, counters), devices, records


#: Why GPUs were left out, as logged: discovery runs every few seconds, a warning once is enough.
_said: set[str] = set()


def _left_out(address: str, reason: str) -> None:
    message = f"GPU {address} not published: {reason}"
    level = "DEBUG" if message in _said else "WARNING"
    _said.add(message)
    logger.bind(device=address).log(level, "{}", message)


def _publishable(
    record: DeviceRecord, devices: Sequence[Device], counter_set: CounterSet | None = None
) -> bool:
    """Whether one GPU's devices pass the ResourceSlice rules; when not, say so and why.

    Checked per GPU so that a value no API server would take (read from a broken sysfs tree)
    leaves out that GPU, not the whole inventory the core would refuse.
    """
    try:
        validate_inventory(Inventory(tuple(devices), (counter_set,) if counter_set else ()))
    except ModelError as exc:
        _left_out(record.address or (record.gpu.address if record.gpu else record.name), str(exc))
        return False
    return True


def build(discovery: Discovery, settings: NodeSettings, state: State) -> Built:
    """The inventory for this node, and a record per published device.

    A GPU whose devices would break the ResourceSlice rules is left out, with a warning.
    """
    vfs_of: dict[str, dict[int, Gpu]] = {}
    orphans: list[Gpu] = []
    pfs = {g.address: g for g in discovery.gpus if not g.is_vf}
    for gpu in discovery.gpus:
        if gpu.is_vf and gpu.physfn is not None and gpu.vf_index is not None:
            vfs_of.setdefault(gpu.physfn, {})[gpu.vf_index] = gpu
            if gpu.physfn not in pfs:
                orphans.append(gpu)
    first: list[tuple[Device, DeviceRecord]] = []
    admin: list[tuple[Device, DeviceRecord]] = []
    groups: list[tuple[CounterSet, list[Device], list[DeviceRecord]]] = []
    for gpu in pfs.values():
        created = state.created.get(gpu.address)
        sriov = gpu.sriov
        if sriov is not None and sriov.num_vfs > 0 and created is None:
            logger.bind(device=gpu.name).debug(
                "{} has {} VFs made outside this driver; publishing them, not the PF",
                gpu.address,
                sriov.num_vfs,
            )
            for vf in vfs_of.get(gpu.address, {}).values():
                admin.append(
                    (
                        _admin_vf(vf, gpu),
                        DeviceRecord(vf.name, "vf", vf, gpu, vf.vf_index, None, vf.address),
                    )
                )
            continue
        if created is None and settings.shared.selects(gpu.address, gpu.pci_id):
            first.append((_shared(gpu), DeviceRecord(gpu.name, "shared", gpu)))
            continue
        profile: Profile | None = None
        if created is not None:
            profile = PROFILES.get(created.profile)
        elif sriov is not None and sriov.autoprobe and gpu.info.profile_key:
            profile = choose(gpu.info.profile_key, settings.vf_profiles, sriov.total_vfs)
        if profile is not None and sriov is not None:
            try:
                groups.append(_partitioned(gpu, profile, vfs_of.get(gpu.address, {})))
            except ValueError as exc:  # VF addresses past the bus, say: this GPU only
                _left_out(gpu.address, str(exc))
            continue
        first.append((_whole(gpu), DeviceRecord(gpu.name, "gpu", gpu)))
    for vf in orphans:
        admin.append(
            (
                _admin_vf(vf, None),
                DeviceRecord(vf.name, "vf", vf, None, vf.vf_index, None, vf.address),
            )
        )
    first = [(d, r) for d, r in first if _publishable(r, [d])]
    admin = [(d, r) for d, r in admin if _publishable(r, [d])]
    devices = [d for d, _ in first] + [d for d, _ in admin]
    records = {r.name: r for _, r in first} | {r.name: r for _, r in admin}
    counter_sets = []
    for counter_set, group_devices, group_records in groups:
        pf_record = next(r for r in group_records if r.kind == "pf")
        if not _publishable(pf_record, group_devices, counter_set):
            continue
        counter_sets.append(counter_set)
        devices.extend(group_devices)
        records.update({r.name: r for r in group_records})
    return Built(Inventory(tuple(devices), tuple(counter_sets)), records)
