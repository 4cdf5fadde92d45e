"""The fake backend (entry point ``fake`` in ``dra_core.backends``: :class:`FakePlugin`).

The core creates one :class:`FakePlugin` per agent and registers it with pluggy; its
``dra_start`` builds a :class:`FakeBackend` from the node's settings (so a process may run
several agents side by side, each with its own), and the other hooks use it. Hooks called
without a started backend (``dra-core render``, the webhook) need none, or get one built from
their context on first use.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dra_backend_fake import CDI_CLASS, CDI_VENDOR, DRIVER_NAME, devnodes
from dra_core import (
    AllocatedClaim,
    AllocatedDevice,
    AllocationError,
    BackendIdentity,
    BackendOption,
    ContainerEdits,
    Device,
    DeviceClassSpec,
    DeviceHealth,
    DeviceNode,
    DoctorCheck,
    Inventory,
    NodeContext,
    PreparedClaim,
    PreparedClaims,
    PreparedDevice,
    PrepareError,
    hookimpl,
    logger,
    validate_inventory,
)

if TYPE_CHECKING:
    from dra_backend_fake.control import ControlFile
    from dra_backend_fake.schema import ControlSpec, DeviceSpec

# The inventory, control file and opaque config modules (pydantic models) are imported when
# first used, so loading the backend to name its driver stays cheap.

__all__ = ("OPTIONS", "FakeBackend", "FakePlugin", "Settings", "device_classes", "doctor_checks")

#: The backend's command-line options; each also reads the environment variable named.
OPTIONS: tuple[BackendOption, ...] = (
    BackendOption(
        "inventory",
        "YAML file of fake devices (schema in backends/fake/README.md); without it and "
        "without --devices, a built-in inventory is published",
        env="DRA_FAKE_INVENTORY",
        path=True,
    ),
    BackendOption(
        "devices",
        "publish N plain devices dev-0 .. dev-<N-1> (besides the --inventory devices; "
        "instead of the built-in inventory)",
        env="DRA_FAKE_DEVICES",
    ),
    BackendOption(
        "control-file",
        "YAML file to add, remove, fail or mark devices unhealthy while running; re-read "
        "when it changes",
        env="DRA_FAKE_CONTROL",
        path=True,
    ),
    BackendOption(
        "control-interval",
        "seconds between checks of the control file for changes",
        default="1",
        env="DRA_FAKE_CONTROL_INTERVAL",
    ),
    BackendOption(
        "device-nodes-dir",
        "host directory in which prepare creates a /dev/null-like character device per "
        "device (needs CAP_MKNOD), mapped to /dev/fake/<device> in the container",
        env="DRA_FAKE_DEVICE_NODES_DIR",
        path=True,
    ),
)

_UID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


def _env_name(text: str) -> str:
    """``gpu/vf-0`` -> ``GPU_VF_0``: a fragment usable in an environment variable name."""
    return re.sub(r"[^A-Za-z0-9]", "_", text).upper()


@dataclass(frozen=True)
class Settings:
    """The backend's options, resolved (flag, then environment variable, then default)."""

    inventory: Path | None = None
    devices: int | None = None
    control_file: Path | None = None
    control_interval: float = 1.0
    device_nodes_dir: Path | None = None

    @classmethod
    def from_context(cls, context: NodeContext) -> Settings:
        """Read the options from ``context``; ValueError names a bad option."""
        values: dict[str, str | None] = {}
        for option in OPTIONS:
            value = context.options.get(option.name)
            if value is None:
                value = context.options.get(option.name.replace("-", "_"))
            if value is None and option.env:
                value = os.environ.get(option.env) or None
            values[option.name] = value if value is not None else option.default
        devices = values["devices"]
        count: int | None = None
        if devices is not None:
            try:
                count = int(devices)
            except ValueError:
                count = -1
            if not 0 <= count <= 1024:
                msg = f"--devices (env DRA_FAKE_DEVICES): {devices!r} is not a count from 0 to 1024"
                raise ValueError(msg)
        interval = values["control-interval"] or "1"
        try:
            seconds = float(interval)
        except ValueError:
            seconds = 0.0
        if not seconds > 0:
            msg = f"--control-interval: {interval!r} is not a positive number of seconds"
            raise ValueError(msg)

        def path(name: str) -> Path | None:
            value = values[name]
            return Path(value) if value else None

        return cls(
            inventory=path("inventory"),
            devices=count,
            control_file=path("control-file"),
            control_interval=seconds,
            device_nodes_dir=path("device-nodes-dir"),
        )


class FakeBackend:
    """One running fake backend: its inventory, control file, device nodes and holds."""

    def __init__(self, context: NodeContext) -> None:
        self.context = context
        self.settings = Settings.from_context(context)
        self.base = self._base_specs()
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        from dra_backend_fake.control import ControlFile
        from dra_backend_fake.schema import ControlSpec

        self.control: ControlFile | None = (
            ControlFile(self.settings.control_file, check=self._compose)
            if self.settings.control_file is not None
            else None
        )
        self._built_from = ControlSpec()
        self._inventory = self._compose(self._built_from)
        #: The health reports last made, and the control spec and inventory they describe.
        self._last_health: tuple[ControlSpec, Inventory, tuple[DeviceHealth, ...]] | None = None

    # -- configuration -------------------------------------------------------------------------

    def _base_specs(self) -> list[DeviceSpec]:
        from dra_backend_fake.inventory import (
            config_specs,
            default_specs,
            load_file,
            simple_devices,
        )

        settings = self.settings
        specs: list[DeviceSpec] | None = None
        if settings.inventory is not None:
            specs = load_file(settings.inventory)
        else:
            specs = config_specs(self.context.config)
        if settings.devices is not None:
            taken = [n for s in specs or () for n in s.device_names()]
            specs = [*(specs or ()), *simple_devices(settings.devices, taken)]
        return default_specs() if specs is None else specs

    def _compose(self, control: ControlSpec) -> Inventory:
        """The inventory with ``control``'s additions and removals; ValueError on a clash or
        a device that breaks the ResourceSlice rules."""
        from dra_backend_fake.inventory import InventoryError, build

        removed = set(control.remove)
        kept = [s for s in self.base if s.name not in removed]
        taken = {n: s.name for s in kept for n in s.device_names() if n not in removed}
        for index, spec in enumerate(control.add):
            for name in spec.device_names():
                if name in taken:
                    msg = (
                        f"add[{index}] ({spec.name!r}): device name {name!r} is already in the "
                        f"inventory (from {taken[name]!r}); list {taken[name]!r} under remove "
                        "to replace it, or choose another name"
                    )
                    raise InventoryError(msg)
        configured = build(kept, hidden=removed)  # removal applies to configured devices only
        added = build(control.add)
        inventory = Inventory(
            devices=configured.devices + added.devices,
            counter_sets=configured.counter_sets + added.counter_sets,
        )
        # A device the API server would refuse fails the whole spec here (ModelError), so a
        # control file is never half applied and the core never gets an unpublishable one.
        validate_inventory(inventory)
        return inventory

    def _refresh(self) -> None:
        """Re-read the control file if it changed; rebuild the inventory from a new spec."""
        if self.control is None:
            return
        self.control.poll()
        with self._lock:
            spec = self.control.spec
            if spec is self._built_from:
                return
            self._inventory = self._compose(spec)
            self._built_from = spec
            known = {n for s in self.base for n in s.device_names()}
            unknown = sorted(set(spec.remove) - known)
            if unknown:
                logger.warning(
                    "control file {}: remove names {} not in the configured inventory",
                    self.control.path,
                    unknown,
                )

    @property
    def control_spec(self) -> ControlSpec:
        # Without a control file, the empty spec the inventory was built from, for ever.
        return self.control.spec if self.control is not None else self._built_from

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        nodes_dir = self.settings.device_nodes_dir
        if nodes_dir is not None:
            try:
                devnodes.check_mknod(nodes_dir)
            except OSError as exc:
                msg = f"fake backend: --device-nodes-dir {nodes_dir}: {exc}"
                raise RuntimeError(msg) from None
        self._refresh()
        if self.control is not None:
            from dra_backend_fake.control import watch

            self._thread = watch(
                self.control,
                self._on_control_change,
                self._stop,
                self.settings.control_interval,
            )
        inventory = self._inventory
        logger.info(
            "fake backend started: {} devices, {} counter sets{}",
            len(inventory.devices),
            len(inventory.counter_sets),
            f", control file {self.control.path}" if self.control is not None else "",
        )

    def _on_control_change(self) -> None:
        self._refresh()
        self.context.request_rediscovery()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # -- discovery and health ------------------------------------------------------------------

    def inventory(self) -> Inventory:
        """The current inventory (the control file re-read if it changed)."""
        self._refresh()
        return self._inventory

    def health(self, inventory: Inventory) -> list[DeviceHealth]:
        """A report per device of ``inventory``: unhealthy when the control file says so.

        A partition is unhealthy with its whole device.
        """
        self._refresh()
        spec = self.control_spec
        last = self._last_health
        # The agent asks every few seconds: the same spec and inventory give the same reports.
        if last is None or last[0] is not spec or last[1] is not inventory:
            last = (spec, inventory, tuple(self._health_of(d, spec) for d in inventory.devices))
            self._last_health = last
        return list(last[2])

    @staticmethod
    def _health_of(device: Device, spec: ControlSpec) -> DeviceHealth:
        unhealthy = spec.unhealthy
        parent = device.attributes.get("parent")
        entry = unhealthy.get(device.name)
        message = entry.message if entry is not None else ""
        if entry is None and isinstance(parent, str) and parent in unhealthy:
            entry = unhealthy[parent]
            message = f"whole device {parent}: {entry.message}"
        if entry is None:
            return DeviceHealth(device=device.name, healthy=True)
        return DeviceHealth(
            device=device.name,
            healthy=False,
            message=message,
            effect=entry.effect,
            reason=entry.reason,
            taint=entry.taint,
        )

    # -- allocation ----------------------------------------------------------------------------

    def check_allocation(self, claim: AllocatedClaim, prepared: PreparedClaims) -> None:
        """Refuse devices that are gone, unhealthy, or held by another prepared claim."""
        inventory = self.inventory()
        for allocated in claim.devices:
            name = allocated.device
            device = inventory.device(name)
            if device is None:
                msg = (
                    f"claim {claim.ref}: device {name!r} is not in this node's fake inventory "
                    "(removed through the control file?); the claim must be allocated again"
                )
                raise AllocationError(msg)
            # Only the claim's devices: a prepare's cost must not grow with the inventory.
            health = self._health_of(device, self.control_spec)
            if not health.healthy:
                msg = (
                    f"claim {claim.ref}: device {name!r} is unhealthy ({health.message}); clear "
                    "its 'unhealthy' entry in the control file or allocate another device"
                )
                raise AllocationError(msg)
            if allocated.admin_access or device.allow_multiple_allocations:
                continue
            for other in self._conflicting(device, inventory):
                holders = prepared.holding(other)
                if holders:
                    what = "is" if other == name else f"conflicts with {other!r}, which is"
                    msg = (
                        f"claim {claim.ref}: device {name!r} {what} held by claim "
                        f"{holders[0].ref}; wait until that claim is released"
                    )
                    raise AllocationError(msg)

    @staticmethod
    def _conflicting(device: Device, inventory: Inventory) -> list[str]:
        """The device itself, and for partitioned devices the whole device or its partitions."""
        names = [device.name]
        sets = {c.counter_set for c in device.consumes_counters}
        if not sets:
            return names
        is_partition = device.attributes.get("type") == "partition"
        for other in inventory.devices:
            if other.name == device.name:
                continue
            if not sets & {c.counter_set for c in other.consumes_counters}:
                continue
            if is_partition != (other.attributes.get("type") == "partition"):
                names.append(other.name)
        return names

    # -- prepare -------------------------------------------------------------------------------

    def _sleep(self, seconds: float, why: str) -> None:
        if seconds > 0:
            logger.info("{}: sleeping {} s", why, seconds)
            self._stop.wait(seconds)

    def prepare(self, claim: AllocatedClaim) -> list[PreparedDevice]:
        """Container edits (and device nodes) for every allocated device; idempotent."""
        from dra_backend_fake import config

        uid = claim.ref.uid
        if not _UID.fullmatch(uid):
            msg = f"claim {claim.ref}: UID {uid!r} is not a UUID"
            raise PrepareError(msg)
        self._refresh()
        control = self.control_spec
        where = f"control file {self.control.path}" if self.control is not None else ""
        effective = {id(d): config.merge(claim.configs_for(d)) for d in claim.devices}
        # Injected delays and failures first, before any side effect.
        for allocated in claim.devices:
            name = allocated.device
            cfg = effective[id(allocated)]
            if name in control.hangPrepare:
                self._sleep(control.hangPrepare[name], f"device {name!r}: hangPrepare ({where})")
            if cfg is not None:
                self._sleep(cfg.sleepSeconds, f"device {name!r}: sleepSeconds in FakeConfig")
            if name in control.failPrepare:
                msg = (
                    f"device {name!r}: prepare failed as injected by failPrepare in {where}: "
                    f"{control.failPrepare[name]} (remove the entry to let prepare succeed)"
                )
                raise PrepareError(msg)
            if cfg is not None and cfg.failPrepare:
                msg = (
                    f"device {name!r}: prepare failed because the claim's FakeConfig sets "
                    "failPrepare: true (set it to false to let prepare succeed)"
                )
                raise PrepareError(msg)
        prepared = []
        for allocated in claim.devices:
            cfg = effective[id(allocated)]
            env = {**self._device_env(allocated), **(cfg.env if cfg else {})}
            nodes: tuple[DeviceNode, ...] = ()
            state: dict[str, object] = {}
            if self.settings.device_nodes_dir is not None:
                try:
                    host = devnodes.create(self.settings.device_nodes_dir, uid, allocated.device)
                except devnodes.DeviceNodeError as exc:
                    msg = f"device {allocated.device!r}: {exc}"
                    raise PrepareError(msg) from None
                nodes = (devnodes.container_node(allocated.device, host),)
                state["deviceNode"] = str(host)
            prepared.append(
                PreparedDevice(
                    allocation=allocated,
                    edits=ContainerEdits(env=env, device_nodes=nodes),
                    state=state,
                )
            )
            logger.bind(claim=uid, device=allocated.device).debug("prepared")
        return prepared

    @staticmethod
    def claim_edits(claim: AllocatedClaim, devices: Sequence[PreparedDevice]) -> ContainerEdits:
        """The claim's environment, written once for the claim rather than per device.

        ``DRA_FAKE_CLAIM_<NAME>`` is the claim's own, so a container with two claims sees
        both; the others are the last claim's there. A variable a device's opaque config
        sets is left to the device, so the config still wins.
        """
        by_request: dict[str, list[str]] = {}
        for allocated in claim.devices:
            by_request.setdefault(allocated.base_request, []).append(allocated.device)
        names = ",".join(d.device for d in claim.devices)
        env = {
            "DRA_FAKE_CLAIM": f"{claim.ref.namespace}/{claim.ref.name}",
            "DRA_FAKE_DEVICES": names,
            f"DRA_FAKE_CLAIM_{_env_name(claim.ref.name)}": names,
        }
        for request, requested in by_request.items():
            env[f"DRA_FAKE_DEVICE_{_env_name(request)}"] = ",".join(requested)
        configured = {key for d in devices for key in d.edits.env}
        return ContainerEdits(env={k: v for k, v in env.items() if k not in configured})

    @staticmethod
    def _device_env(allocated: AllocatedDevice) -> dict[str, str]:
        """Share information of one allocation of a shared device."""
        if allocated.share_id is None:
            return {}
        key = _env_name(allocated.device)
        env = {f"DRA_FAKE_SHARE_ID_{key}": allocated.share_id}
        for capacity, value in allocated.consumed_capacity.items():
            env[f"DRA_FAKE_CONSUMED_{key}_{_env_name(capacity.rpartition('/')[2])}"] = value
        return env

    def unprepare(self, claim: PreparedClaim) -> bool:
        """Remove the claim's device nodes and holds; idempotent, tolerates partial prepares."""
        uid = claim.ref.uid
        self._refresh()
        control = self.control_spec
        for prepared in claim.devices:
            name = prepared.allocation.device
            if name in control.failUnprepare:
                where = self.control.path if self.control is not None else ""
                msg = (
                    f"device {name!r}: unprepare failed as injected by failUnprepare in control "
                    f"file {where}: {control.failUnprepare[name]} (remove the entry to let "
                    "unprepare succeed)"
                )
                raise PrepareError(msg)
        nodes_dir = self.settings.device_nodes_dir
        for prepared in claim.devices:
            recorded = prepared.state.get("deviceNode")
            if isinstance(recorded, str):
                path = Path(recorded)
                directory = nodes_dir if nodes_dir is not None else path.parent.parent
                if path.parent.name == uid:
                    devnodes.remove_node(directory, path)
        if nodes_dir is not None and _UID.fullmatch(uid):
            devnodes.remove_claim(nodes_dir, uid)
        logger.bind(claim=uid).debug("unprepared")
        return True


# ---------------------------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------------------------


class FakePlugin:
    """The fake backend as the core loads it (the entry point names this class): one per agent,
    holding the :class:`FakeBackend` that ``dra_start`` builds from the node's settings."""

    def __init__(self) -> None:
        self._backend: FakeBackend | None = None

    def backend(self, context: NodeContext) -> FakeBackend:
        """The started backend; hooks called without ``dra_start`` (a test's discovery) get one
        built from their context."""
        if self._backend is None:
            self._backend = FakeBackend(context)
        return self._backend

    @hookimpl
    def dra_backend_identity(self) -> BackendIdentity:
        """Driver ``fake.dra-core.dev``, CDI kind ``dra-core.dev/fake``."""
        return BackendIdentity(driver_name=DRIVER_NAME, cdi_vendor=CDI_VENDOR, cdi_class=CDI_CLASS)

    @hookimpl
    def dra_backend_options(self) -> Sequence[BackendOption]:
        """``--inventory``, ``--devices``, ``--control-file``, ``--control-interval``,
        ``--device-nodes-dir``."""
        return OPTIONS

    @hookimpl
    def dra_start(self, context: NodeContext) -> None:
        """Build the backend from the options, check device nodes work, watch the control file."""
        try:
            backend = FakeBackend(context)
        except ValueError as exc:  # InventoryError and bad options
            msg = f"fake backend cannot start: {exc}"
            raise RuntimeError(msg) from None
        backend.start()
        self._backend = backend

    @hookimpl
    def dra_stop(self) -> None:
        """Stop the control-file watcher; prepared devices (and their nodes) stay."""
        if self._backend is not None:
            self._backend.stop()

    @hookimpl
    def dra_discover(self, context: NodeContext) -> Inventory:
        """The configured devices with the control file's additions and removals."""
        return self.backend(context).inventory()

    @hookimpl
    def dra_device_classes(self, identity: BackendIdentity) -> Sequence[DeviceClassSpec]:
        """All fake devices; partitions only; shared devices only."""
        return device_classes(identity.driver_name)

    @hookimpl
    def dra_decode_config(self, parameters: Mapping[str, Any]) -> object:
        """Decode a ``FakeConfig`` strictly; ValueError names each bad field."""
        from dra_backend_fake import config

        return config.decode(parameters)

    @hookimpl
    def dra_check_allocation(
        self, claim: AllocatedClaim, prepared: PreparedClaims, context: NodeContext
    ) -> None:
        """Devices must exist in the current inventory (the control file re-read), be healthy
        and not held by another prepared claim."""
        self.backend(context).check_allocation(claim, prepared)

    @hookimpl
    def dra_prepare(self, claim: AllocatedClaim, context: NodeContext) -> Sequence[PreparedDevice]:
        """Environment (and device nodes) per device, after injected delays and failures."""
        return self.backend(context).prepare(claim)

    @hookimpl
    def dra_claim_edits(
        self, claim: AllocatedClaim, devices: Sequence[PreparedDevice]
    ) -> ContainerEdits:
        """The claim's name and devices, once for the claim."""
        return FakeBackend.claim_edits(claim, devices)

    @hookimpl
    def dra_unprepare(self, claim: PreparedClaim, context: NodeContext) -> bool:
        """Remove the claim's device nodes; idempotent."""
        return self.backend(context).unprepare(claim)

    @hookimpl
    def dra_device_health(
        self, inventory: Inventory, context: NodeContext
    ) -> Sequence[DeviceHealth]:
        """Devices listed under ``unhealthy`` in the control file (and their partitions)."""
        return self.backend(context).health(inventory)

    @hookimpl
    def dra_doctor_checks(self, context: NodeContext) -> Sequence[DoctorCheck]:
        """The options, the inventory and the control file valid, device nodes possible."""
        return doctor_checks(context)


def device_classes(driver: str) -> tuple[DeviceClassSpec, ...]:
    """The fake backend's DeviceClasses for ``driver``."""
    on_driver = f'device.driver == "{driver}"'
    return (
        DeviceClassSpec(
            name=driver,
            selectors=(on_driver,),
            description="any fake device (plain, partition, whole partitionable or shared)",
        ),
        DeviceClassSpec(
            name=f"partition.{driver}",
            selectors=(f'{on_driver} && device.attributes["{driver}"].type == "partition"',),
            description="a partition of a partitionable fake device",
        ),
        DeviceClassSpec(
            name=f"shared.{driver}",
            selectors=(f"{on_driver} && device.allowMultipleAllocations == true",),
            description="a share of a fake device, sized by consumable capacity",
        ),
    )


def doctor_checks(context: NodeContext) -> list[DoctorCheck]:
    """The options, the inventory and the control file valid, device nodes possible."""
    try:
        backend = FakeBackend(context)
    except ValueError as exc:  # InventoryError and bad options
        fix = "correct the option or the file the message names; the agent does not start"
        return [DoctorCheck.fail("inventory", str(exc), fix)]
    settings = backend.settings
    source = (
        f"file {settings.inventory}"
        if settings.inventory is not None
        else "the configuration file"
        if context.config
        else "the built-in inventory"
    )
    extra = f" and {settings.devices} plain devices" if settings.devices is not None else ""
    specs = f"{len(backend.base)} device spec" + ("" if len(backend.base) == 1 else "s")
    checks = [DoctorCheck.ok("inventory", f"{specs} from {source}{extra}")]
    if backend.control is not None:
        checks.append(_control_file_check(backend.control))
    if settings.device_nodes_dir is not None:
        checks.append(_device_nodes_check(settings.device_nodes_dir))
    return checks


def _control_file_check(control: ControlFile) -> DoctorCheck:
    from dra_backend_fake.control import ControlError

    name, path = "control file", control.path
    if not path.exists():
        return DoctorCheck.ok(
            name, f"{path} does not exist yet: no changes (write it to make some)"
        )
    try:
        control._read()  # the agent's own read: the same limits and checks
    except (ControlError, ValueError) as exc:
        fix = "correct the file: the agent keeps the previous state while it is invalid"
        return DoctorCheck.fail(name, str(exc), fix)
    return DoctorCheck.ok(name, f"{path} is valid")


def _device_nodes_check(directory: Path) -> DoctorCheck:
    name = "device nodes directory"
    if not directory.exists():
        return DoctorCheck.ok(
            name, f"{directory} does not exist yet; the backend makes it at start"
        )
    try:
        devnodes.check_mknod(directory)  # a probe node, removed at once
    except OSError as exc:
        fix = "run the agent with CAP_MKNOD (as root), or drop --device-nodes-dir"
        return DoctorCheck.fail(name, str(exc), fix)
    return DoctorCheck.ok(name, f"device nodes can be made in {directory}")
