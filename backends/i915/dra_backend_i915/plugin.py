"""The i915 backend (entry point ``i915`` in ``dra_core.backends``: :class:`I915Backend`).

The core creates one :class:`I915Backend` per agent and registers it with pluggy; its methods
marked ``@hookimpl`` are the hooks. It holds the seams (sysfs writer, DRM memory query) and the
caches, so tests register one made with fakes:
``from_objects("i915", I915Backend(writer=fs.kernel()))``.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dra_backend_i915 import CDI_CLASS, CDI_VENDOR, DRIVER_NAME
from dra_backend_i915.config import GpuConfig, NodeSettings, decode_opaque, settings_from
from dra_backend_i915.discovery import Discoverer, Discovery, Gpu, drm_nodes, vf_name
from dra_backend_i915.edits import drm_edits, mei_edits
from dra_backend_i915.health import HealthMonitor
from dra_backend_i915.inventory import Built, DeviceRecord, build
from dra_backend_i915.memory import DrmMemoryQuery, MemoryQuery
from dra_backend_i915.profiles import Profile
from dra_backend_i915.sriov import VfProvisioner
from dra_backend_i915.state import CreatedVfs, State, StateStore
from dra_backend_i915.sysfs import FileWriter, SysfsError, SysfsWriter, read_int
from dra_core import (
    AllocatedClaim,
    AllocatedDevice,
    AllocationError,
    BackendIdentity,
    BackendOption,
    ContainerEdits,
    DeviceClassSpec,
    DeviceHealth,
    DoctorCheck,
    Inventory,
    NodeContext,
    PreparedClaim,
    PreparedDevice,
    PrepareError,
    hookimpl,
    logger,
)

__all__ = ("OPTIONS", "I915Backend", "device_classes")


class I915Backend:
    """The backend: one per agent, its hook methods registered with pluggy."""

    def __init__(
        self,
        *,
        writer: SysfsWriter | None = None,
        memory_query: MemoryQuery | None = None,
        poll: float = 0.05,
    ) -> None:
        self.writer: SysfsWriter = writer or FileWriter()
        self.memory_query: MemoryQuery = memory_query or DrmMemoryQuery()
        self.poll = poll
        self._lock = threading.RLock()
        self._discoverers: dict[tuple[Path, Path], Discoverer] = {}
        self._monitors: dict[Path, HealthMonitor] = {}
        self._stores: dict[Path | None, StateStore] = {}
        #: What `build` last gave, and what it was given: a discovery poll that finds the node
        #: as it was reuses it rather than building and validating every device again.
        self._last_built: tuple[tuple[object, ...], Built] | None = None

    # -- helpers -------------------------------------------------------------------------------

    @staticmethod
    def settings(context: NodeContext) -> NodeSettings:
        """The node settings from the context's options and config section."""
        return settings_from(context.options, context.config)

    def _discovery(self, settings: NodeSettings, state: State) -> Discovery:
        key = (settings.sysfs_root, settings.devfs_root)
        with self._lock:
            discoverer = self._discoverers.get(key)
            if discoverer is None:
                discoverer = Discoverer(key[0], key[1], self.memory_query)
                self._discoverers[key] = discoverer
        return discoverer.discover(created=set(state.created))

    def monitor(self, settings: NodeSettings) -> HealthMonitor:
        """The health monitor of a sysfs root (it keeps error-counter baselines)."""
        with self._lock:
            return self._monitors.setdefault(
                settings.sysfs_root, HealthMonitor(settings.sysfs_root)
            )

    def store(self, context: NodeContext) -> StateStore:
        """The state store of the context's state directory (memory when it has none)."""
        with self._lock:
            key = context.state_dir
            if key not in self._stores:
                if key is None:
                    logger.debug("no state directory: VF bookkeeping is kept in memory only")
                self._stores[key] = StateStore(key)
            return self._stores[key]

    def built(self, context: NodeContext) -> tuple[Built, NodeSettings, State]:
        """Discovery, state and the inventory built from them."""
        settings = self.settings(context)
        state = self.store(context).load()
        discovery = self._discovery(settings, state)
        # All `build` reads: on a node with 8 GPUs of 63 VFs it takes about 20 ms, most of it
        # validating the 512 devices, and it runs at every poll and every allocation check.
        created = {a: (c.profile, c.num_vfs, c.complete) for a, c in state.created.items()}
        inputs = (discovery, settings, created)
        with self._lock:
            last = self._last_built
        if last is not None and last[0] == inputs:
            return last[1], settings, state
        result = build(discovery, settings, state)
        with self._lock:
            self._last_built = (inputs, result)
        return result, settings, state

    # -- hooks ---------------------------------------------------------------------------------

    @hookimpl
    def dra_backend_identity(self) -> BackendIdentity:
        """Driver ``gpu.intel.com``; CDI devices ``intel.com/gpu=...``."""
        return BackendIdentity(driver_name=DRIVER_NAME, cdi_vendor=CDI_VENDOR, cdi_class=CDI_CLASS)

    @hookimpl
    def dra_backend_options(self) -> Sequence[BackendOption]:
        """``--sysfs-root``, ``--devfs-root``, ``--vf-profile``, ``--shared-gpus``."""
        return OPTIONS

    @hookimpl
    def dra_device_classes(self, identity: BackendIdentity) -> Sequence[DeviceClassSpec]:
        """Whole GPUs, VFs, shared GPUs, and every GPU for monitoring (admin access)."""
        return device_classes(identity.driver_name)

    @hookimpl
    def dra_decode_config(self, parameters: Mapping[str, Any]) -> object:
        """Strict ``GpuConfig`` decoding; ``ValueError`` naming the field."""
        return decode_opaque(parameters)

    @hookimpl
    def dra_doctor_checks(self, context: NodeContext) -> Sequence[DoctorCheck]:
        """GPUs bound to i915 or xe, SR-IOV capable functions, render nodes and their modes."""
        from dra_backend_i915 import doctor

        try:
            settings = self.settings(context)
        except ValueError as exc:
            return [DoctorCheck.fail("options", str(exc), "correct the option the message names")]
        return doctor.checks(settings)

    @hookimpl(specname="dra_start")
    def start(self, context: NodeContext) -> None:
        """Check the settings and the sysfs root before the first discovery."""
        settings = self.settings(context)
        devices = settings.sysfs_root / "bus" / "pci" / "devices"
        if not devices.is_dir():
            msg = (
                f"{devices} does not exist: set --sysfs-root (SYSFS_ROOT) to the host's /sys "
                f"as mounted in this container"
            )
            raise RuntimeError(msg)
        self.store(context).load()

    @hookimpl(specname="dra_discover")
    def discover(self, context: NodeContext) -> Inventory:
        """The inventory of this node."""
        built, _, _ = self.built(context)
        return built.inventory

    @hookimpl(specname="dra_check_allocation")
    def check_allocation(self, claim: AllocatedClaim, context: NodeContext) -> None:
        """Refuse an allocation the node cannot honour, before anything changes."""
        with self._lock:
            built, settings, state = self.built(context)
            uid = claim.ref.uid
            for allocated in claim.devices:
                record = built.records.get(allocated.device)
                if record is None:
                    msg = (
                        f"device {allocated.device} is not on node {context.node_name} any more "
                        f"(unplugged, unbound or re-partitioned); the claim must be re-allocated"
                    )
                    raise AllocationError(msg)
                if allocated.admin_access:
                    continue  # monitoring: unhealthy GPUs too, beside any claim
                self._check_health(record, settings)
                self._check_exclusive(record, allocated, state, uid)
                self._check_profile(record, claim.configs_for(allocated))

    def _check_health(self, record: DeviceRecord, settings: NodeSettings) -> None:
        monitor = self.monitor(settings)
        targets = [g for g in (record.pf, record.gpu) if g is not None]
        for gpu in targets:
            health = monitor.function(gpu.address, gpu.driver)
            if not health.healthy:
                whose = "its PF: " if gpu is record.pf else ""
                msg = f"device {record.name} is unhealthy: {whose}{health.message}"
                raise AllocationError(msg)
        lost = _lost(record)
        if lost:
            msg = f"device {record.name} is unhealthy: {lost}"
            raise AllocationError(msg)

    @staticmethod
    def _check_exclusive(
        record: DeviceRecord, allocated: AllocatedDevice, state: State, uid: str
    ) -> None:
        if record.kind == "shared":
            return
        others = state.others(record.name, uid)
        if others:
            msg = f"device {record.name} is already prepared for claim {others[0]}"
            raise AllocationError(msg)
        if record.kind == "pf" and record.gpu is not None:
            created = state.created.get(record.gpu.address)
            if created is not None:
                msg = (
                    f"whole GPU {record.name} is split into {created.num_vfs} VFs "
                    f"({created.profile}) for other claims; it is available again once they "
                    f"are released (the kubelet retries)"
                )
                raise AllocationError(msg)
        if record.kind == "planned-vf" and record.pf is not None:
            pf = record.pf
            whole = state.others(pf.name, uid)
            if whole:
                msg = (
                    f"VF {record.name} cannot be created: its PF {pf.name} is held whole "
                    f"by claim {whole[0]}"
                )
                raise AllocationError(msg)
            numvfs = pf.sriov.num_vfs if pf.sriov else 0
            if numvfs and pf.address not in state.created:
                msg = (
                    f"VF {record.name} cannot be created: {pf.address} already has {numvfs} VFs "
                    f"made outside this driver"
                )
                raise AllocationError(msg)
        del allocated

    @staticmethod
    def _check_profile(record: DeviceRecord, configs: Sequence[object]) -> None:
        wanted = None
        for config in configs:
            if isinstance(config, GpuConfig) and config.vf_profile is not None:
                wanted = config.vf_profile
        if wanted is None:
            return
        if record.kind != "planned-vf" or record.profile is None:
            msg = f"vfProfile {wanted} was asked for, but {record.name} is not a VF made by profile"
            raise AllocationError(msg)
        if record.profile.name != wanted:
            msg = (
                f"vfProfile {wanted} was asked for, but {record.name}'s PF is published with "
                f"{record.profile.name}; change the node's --vf-profile or the claim"
            )
            raise AllocationError(msg)

    @hookimpl(specname="dra_prepare")
    def prepare(self, claim: AllocatedClaim, context: NodeContext) -> list[PreparedDevice]:
        """Create VFs if needed and return each device's container edits and state."""
        with self._lock:
            built, settings, state = self.built(context)
            store = self.store(context)
            uid = claim.ref.uid
            result: list[PreparedDevice] = []
            try:
                for allocated in claim.devices:
                    record = built.records.get(allocated.device)
                    if record is None:
                        msg = f"device {allocated.device} is not on node {context.node_name}"
                        raise PrepareError(msg)
                    if allocated.admin_access:
                        result.append(self._prepare_admin(record, allocated, settings, uid))
                        continue
                    lost = _lost(record)
                    if lost:
                        msg = f"device {allocated.device} cannot be prepared: {lost}"
                        raise PrepareError(msg)
                    for config in claim.configs_for(allocated):
                        if isinstance(config, GpuConfig) and config.vf_profile is not None:
                            try:
                                self._check_profile(record, [config])
                            except AllocationError as exc:
                                raise PrepareError(str(exc)) from None
                    result.append(
                        self._prepare_one(record, allocated, settings, state, store, context)
                    )
                    state.hold(allocated.device, uid)
                    store.save(state)
            except BaseException:
                held = [d.device for d in claim.devices if not d.admin_access]
                try:
                    if held:  # admin access holds nothing: nothing to undo, no VF to remove
                        self._release(uid, held, context)
                except RuntimeError as undo:  # the core's unprepare of the claim tries again
                    logger.bind(claim=uid).error("undoing the failed prepare: {}", undo)
                raise
            return result

    @staticmethod
    def _prepare_admin(
        record: DeviceRecord, allocated: AllocatedDevice, settings: NodeSettings, uid: str
    ) -> PreparedDevice:
        """Admin access (monitoring): the device's nodes now, plus its management engine.

        Nothing is held, so normal claims are never refused because of it, and nothing is
        created: a VF that does not exist (its PF's VFs are made for the first normal claim
        of one) gets no edits, and neither does a GPU that lost its driver (its nodes are
        gone), so one missing device does not keep a monitoring pod from the others. A
        shared GPU's share variables are not given.
        """
        gpu = record.gpu
        state: dict[str, object] = {"kind": record.kind, "adminAccess": True}
        log = logger.bind(claim=uid, device=record.name)
        if gpu is None:
            log.info(
                "admin access to VF {} of {}: it does not exist (VFs are created for normal "
                "claims only), so the container gets no node for it",
                record.name,
                record.pf_address,
            )
            return PreparedDevice(allocated, ContainerEdits(), state)
        lost = _lost(record)
        if lost:
            log.warning(
                "admin access to {}: {}; the container gets no node for it", record.name, lost
            )
            return PreparedDevice(allocated, ContainerEdits(), state)
        devfs = settings.devfs_root
        edits = drm_edits(gpu.address, gpu.card, gpu.render, devfs).merged(
            mei_edits(gpu.address, gpu.mei, devfs)
        )
        state["address"] = gpu.address
        return PreparedDevice(allocated, edits, state)

    def _prepare_one(
        self,
        record: DeviceRecord,
        allocated: AllocatedDevice,
        settings: NodeSettings,
        state: State,
        store: StateStore,
        context: NodeContext,
    ) -> PreparedDevice:
        devfs = settings.devfs_root
        if record.kind in ("gpu", "shared", "pf"):
            gpu = record.gpu
            assert gpu is not None
            created = state.created.get(gpu.address)
            if record.kind == "pf" and created is not None:
                msg = (
                    f"whole GPU {record.name} cannot be prepared while {created.num_vfs} VFs "
                    f"made for other claims exist; the kubelet retries after they are released"
                )
                raise PrepareError(msg)
            consumed = allocated.consumed_capacity if record.kind == "shared" else None
            edits = drm_edits(gpu.address, gpu.card, gpu.render, devfs, consumed)
            return PreparedDevice(allocated, edits, {"kind": record.kind, "address": gpu.address})
        if record.kind == "vf":
            vf = record.gpu
            assert vf is not None
            edits = drm_edits(vf.address, vf.card, vf.render, devfs)
            state_data: dict[str, object] = {
                "kind": "vf",
                "address": vf.address,
                "createdByBackend": False,
            }
            return PreparedDevice(allocated, edits, state_data)
        address, card, render = self._ensure_vf(record, settings, state, store, context)
        edits = drm_edits(address, card, render, devfs)
        assert record.pf is not None and record.profile is not None
        return PreparedDevice(
            allocated,
            edits,
            {
                "kind": "vf",
                "address": address,
                "pf": record.pf.address,
                "vfIndex": record.vf_index,
                "profile": record.profile.name,
                "createdByBackend": True,
            },
        )

    def _ensure_vf(
        self,
        record: DeviceRecord,
        settings: NodeSettings,
        state: State,
        store: StateStore,
        context: NodeContext,
    ) -> tuple[str, str | None, str | None]:
        pf, profile, index = record.pf, record.profile, record.vf_index
        assert pf is not None and profile is not None and index is not None
        self._ensure_vfs(record.name, pf, profile, settings, state, store, context)
        link = pf.path / f"virtfn{index}"
        if not link.exists():
            msg = (
                f"VF {record.name} (virtfn{index} of {pf.address}) does not exist although "
                f"its VFs were created; unprepare the PF's VF claims to reset it"
            )
            raise PrepareError(msg)
        target = link.resolve()
        card, render = drm_nodes(target)
        return target.name, card, render

    def _ensure_vfs(
        self,
        device: str,
        pf: Gpu,
        profile: Profile,
        settings: NodeSettings,
        state: State,
        store: StateStore,
        context: NodeContext,
    ) -> None:
        """Make the PF's VFs exist, once for every VF of every claim that needs one of them.

        Idempotent per PF, whatever the shape of the claims (several VFs in one claim, several
        claims in one call, calls one after the other): the state says whether this backend
        made the PF's VFs or was making them, and ``sriov_numvfs`` read now (not the discovery
        the claim started from, which predates VFs made for an earlier device of the same
        claim) says whether they exist. The intent is saved before ``sriov_numvfs`` is written
        and forgotten only once the PF has no VFs again, so VFs this backend made are never
        taken for an administrator's.
        """
        numvfs = pf.path / "sriov_numvfs"
        try:
            current = read_int(numvfs)
        except SysfsError as exc:
            msg = (
                f"VF {device} cannot be prepared: the VF count of GPU {pf.address} cannot be "
                f"read ({exc}); check that the GPU is still bound to {pf.driver}"
            )
            raise PrepareError(msg) from None
        provisioner = VfProvisioner(self.writer, timeout=settings.vf_timeout, poll=self.poll)
        log = logger.bind(device=pf.name)
        created = state.created.get(pf.address)
        if created is not None and created.complete:
            if current == created.num_vfs:
                return
            if current != 0:
                msg = (
                    f"VF {device} cannot be prepared: GPU {pf.address} has {current} VFs where "
                    f"this driver made {created.num_vfs} ({created.profile}), so sriov_numvfs was "
                    f"changed outside the driver; release the claims on its VFs (the driver "
                    f"then removes them) or write 0 to {numvfs}, and the kubelet retries"
                )
                raise PrepareError(msg)
            log.warning(
                "the VFs made on {} are gone (sriov_numvfs is 0); creating them again", pf.address
            )
        elif created is not None:
            # The agent stopped between saving the intent and recording the VFs as made.
            if current == created.num_vfs and self._finish_interrupted(
                pf, created, provisioner, state, store, context
            ):
                return
            if current != 0:
                log.warning(
                    "an earlier VF creation on {} was interrupted with {} VFs; starting over",
                    pf.address,
                    current,
                )
                try:
                    provisioner.teardown(pf)
                except (OSError, TimeoutError) as exc:
                    msg = (
                        f"VF {device} cannot be prepared: removing the VFs of an interrupted "
                        f"creation on GPU {pf.address} failed ({exc}); they stay recorded as "
                        f"this driver's. Write 0 to {numvfs} (see the kernel log if it "
                        f"refuses), and the kubelet retries"
                    )
                    raise PrepareError(msg) from exc
        else:
            if current != 0:
                msg = (
                    f"VF {device} cannot be prepared: GPU {pf.address} got {current} VFs from "
                    f"outside this driver since the claim was allocated; the driver never "
                    f"changes such VFs, and the kubelet's retry gets them as they are"
                )
                raise PrepareError(msg)
            whole = state.holders.get(pf.name)
            if whole:
                msg = (
                    f"VF {device} cannot be created: GPU {pf.address} ({pf.name}) is held whole "
                    f"by claim {whole[0]}; the kubelet retries once it is released"
                )
                raise PrepareError(msg)
        state.created[pf.address] = CreatedVfs(profile.name, profile.num_vfs)
        store.save(state)  # durable before sriov_numvfs is written: a crash keeps them ours
        try:
            provisioner.create(pf, profile)
        except PrepareError:
            self._forget_unless_vfs_remain(pf, state, store)
            raise
        state.created[pf.address].complete = True
        store.save(state)
        context.request_rediscovery()

    def _finish_interrupted(
        self,
        pf: Gpu,
        created: CreatedVfs,
        provisioner: VfProvisioner,
        state: State,
        store: StateStore,
        context: NodeContext,
    ) -> bool:
        """Use the VFs of a creation whose ``sriov_numvfs`` write went through; False if unusable.

        The quotas were written before ``sriov_numvfs``, so VFs of the recorded count are the
        ones the profile asked for; they only need to appear with their DRM nodes.
        """
        try:
            provisioner.wait_created(pf, created.num_vfs)
        except TimeoutError as exc:
            logger.bind(device=pf.name).warning(
                "the VFs of an interrupted creation on {} are not usable: {}", pf.address, exc
            )
            return False
        created.complete = True
        store.save(state)
        context.request_rediscovery()
        logger.bind(device=pf.name).info(
            "the {} VFs ({}) whose creation on {} was interrupted are there; using them",
            created.num_vfs,
            created.profile,
            pf.address,
        )
        return True

    @staticmethod
    def _forget_unless_vfs_remain(pf: Gpu, state: State, store: StateStore) -> None:
        """After a failed creation: forget the intent only once the PF reads 0 VFs."""
        try:
            remaining = read_int(pf.path / "sriov_numvfs")
        except SysfsError as exc:
            logger.bind(device=pf.name).error(
                "{}; the VFs of {} stay recorded as this driver's", exc, pf.address
            )
            return
        if remaining == 0:
            del state.created[pf.address]
            store.save(state)
            return
        logger.bind(device=pf.name).error(
            "the rollback left {} VFs on {}; they stay recorded as this driver's and are removed "
            "when no claim uses them",
            remaining,
            pf.address,
        )

    @hookimpl(specname="dra_unprepare")
    def unprepare(self, claim: PreparedClaim, context: NodeContext) -> bool:
        """Release the claim's devices; tear down backend-made VFs nobody holds."""
        if claim.devices and all(d.allocation.admin_access for d in claim.devices):
            return True  # admin access held nothing and never removes VFs
        with self._lock:
            self._release(claim.ref.uid, [d.allocation.device for d in claim.devices], context)
        return True

    def _release(self, uid: str, devices: Sequence[str], context: NodeContext) -> None:
        store = self.store(context)
        state = store.load()
        for name in list(devices) + list(state.holders):
            state.release(name, uid)
        store.save(state)
        self._teardown_unused(state, store, context)

    def _teardown_unused(self, state: State, store: StateStore, context: NodeContext) -> None:
        unused = [
            address
            for address, created in state.created.items()
            if not any(vf_name(address, k) in state.holders for k in range(created.num_vfs))
        ]
        if not unused:
            return
        settings = self.settings(context)
        discovery = self._discovery(settings, state)
        provisioner = VfProvisioner(self.writer, timeout=settings.vf_timeout, poll=self.poll)
        for address in unused:
            pf: Gpu | None = discovery.by_address(address)
            if pf is None:
                logger.warning("PF {} is gone; forgetting the VFs made on it", address)
            elif pf.lost:
                self._teardown_lost(provisioner, pf)
            else:
                try:
                    provisioner.teardown(pf)
                except (OSError, TimeoutError) as exc:
                    msg = (
                        f"removing the VFs of {address} failed: {exc}; the kubelet retries the "
                        f"unprepare"
                    )
                    raise RuntimeError(msg) from exc
            del state.created[address]
            store.save(state)
        context.request_rediscovery()

    @staticmethod
    def _teardown_lost(provisioner: VfProvisioner, pf: Gpu) -> None:
        """Best effort on a PF that lost its driver: nothing to do when its VFs are gone."""
        if not any(pf.path.glob("virtfn*")):
            logger.bind(device=pf.name).info(
                "{}; its VFs are gone with it, nothing to tear down", pf.lost
            )
            return
        try:
            provisioner.teardown(pf)
        except (OSError, TimeoutError) as exc:
            logger.bind(device=pf.name).warning(
                "{}; removing its remaining VFs failed ({}), leaving them to the administrator",
                pf.lost,
                exc,
            )

    @hookimpl(specname="dra_device_health")
    def health(self, inventory: Inventory, context: NodeContext) -> list[DeviceHealth]:
        """Health of every published device from sysfs."""
        return self.monitor(self.settings(context)).report(inventory)


def _lost(record: DeviceRecord) -> str:
    """Why the record's GPU or its PF lost its driver (kept published as unhealthy), or ""."""
    for gpu in (record.pf, record.gpu):
        if gpu is not None and gpu.lost:
            return gpu.lost
    return ""


OPTIONS = (
    BackendOption("sysfs-root", "root of the host's sysfs", "/sys", "SYSFS_ROOT", path=True),
    BackendOption(
        "devfs-root", "root of the host's /dev (CDI host paths)", "/dev", "DEVFS_ROOT", path=True
    ),
    BackendOption(
        "vf-profile",
        "VF profile per model, e.g. flex170=flex170_m4,max_48g=none",
        None,
        "I915_VF_PROFILE",
    ),
    BackendOption(
        "shared-gpus",
        "GPUs shared by several claims: none, all, or PCI addresses / PCI IDs (comma list)",
        None,
        "I915_SHARED_GPUS",
    ),
)


def device_classes(d: str) -> tuple[DeviceClassSpec, ...]:
    """The DeviceClasses of driver ``d``."""
    return (
        DeviceClassSpec(
            name=d,
            selectors=(f'device.driver == "{d}" && device.attributes["{d}"].type == "gpu"',),
            description="Intel GPUs, whole (a shared GPU without a capacity request is whole)",
        ),
        DeviceClassSpec(
            name=f"vf.{d}",
            selectors=(f'device.driver == "{d}" && device.attributes["{d}"].type == "vf"',),
            description="SR-IOV virtual functions of Intel GPUs, created on demand",
        ),
        DeviceClassSpec(
            name=f"shared.{d}",
            selectors=(f'device.driver == "{d}" && device.allowMultipleAllocations == true',),
            description="Shares of Intel GPUs by memory and millicores (accounting only)",
        ),
        DeviceClassSpec(
            name=f"monitoring.{d}",
            # Not the VFs this backend makes on demand (they have a profile): their PF is
            # selected, and one claim cannot take a PF and its VFs' counters twice.
            selectors=(f'device.driver == "{d}" && !("profile" in device.attributes["{d}"])',),
            description="Every Intel GPU of a node, for monitoring (adminAccess, allocationMode "
            "All): whole, shared and partitionable GPUs and VFs an administrator made, with "
            "their management engines (/dev/meiN)",
        ),
    )
