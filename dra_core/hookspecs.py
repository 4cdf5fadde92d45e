"""The backend contract: every hook a dra-core backend or extension plugin may implement.

A *backend* (entry-point group ``dra_core.backends``) teaches the core one kind of hardware;
exactly one is active, chosen with ``--backend``. *Extension plugins* (group
``dra_core.plugins``) may add attributes, container edits or health sources to any backend.

Hooks come in the groups the product promises, in the order a node agent calls them:
lifecycle, discovery, allocation, prepare, health; and diagnostics, which ``dra-core doctor``
calls. Implement them with :data:`dra_core.hookimpl`, as methods of a class the entry point
names (the core makes one instance per agent) or functions of a module; the core calls them
only with keyword arguments (pluggy's rule). An implementation may accept a subset of
a spec's arguments, so new arguments never break an existing backend.

Raising from a hook is allowed and meaningful: the exception's kind says what happens next
(`dra_core.errors`: a ``ClaimError`` fails the claim, a ``TransientError`` fails it until the
kubelet retries, a ``FatalError`` stops the agent), and each spec says what raising means in
that hook. The message reaches users in the backend's name, without the hook's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import pluggy

from dra_core.model import (
    AllocatedClaim,
    AttributeValue,
    BackendIdentity,
    ContainerEdits,
    Device,
    DeviceClassSpec,
    DeviceHealth,
    Inventory,
    PreparedClaim,
    PreparedClaims,
    PreparedDevice,
)

__all__ = (
    "PROJECT",
    "BackendOption",
    "CheckStatus",
    "DoctorCheck",
    "NodeContext",
    "hookimpl",
    "hookspec",
)

#: The pluggy project name; hook functions are ``dra_*``.
PROJECT = "dra"

hookspec = pluggy.HookspecMarker(PROJECT)
#: Mark a backend's or plugin's function as the implementation of the hook of the same name.
hookimpl = pluggy.HookimplMarker(PROJECT)


@dataclass(frozen=True)
class BackendOption:
    """A command-line option a backend adds to ``dra-core run`` and ``dra-core discover``.

    ``name`` becomes ``--name`` and the value arrives in :attr:`NodeContext.options` under
    ``name`` with dashes turned into underscores. ``env`` names an environment variable that
    supplies the value when the flag is not given. ``path`` says the value is a file or
    directory: ``dra-core`` makes a relative one absolute (against its working directory) when
    it starts, and refuses an empty one.
    """

    name: str
    help: str
    default: str | None = None
    env: str | None = None
    path: bool = False


#: How a ``dra-core doctor`` check came out: ``ok``; ``warn``, the agent works but something
#: is missing or will bite later; ``fail``, the agent or some claims will not work; ``skip``, the
#: check could not run (its ``found`` says why).
CheckStatus = Literal["ok", "warn", "fail", "skip"]


@dataclass(frozen=True)
class DoctorCheck:
    """One check of ``dra-core doctor``: what was checked, how it came out, what to do.

    ``name`` says what was checked (``render node of 0000:03:00.0``), ``found`` what was
    found, and ``fix`` what the operator should do about a ``warn`` or ``fail`` (empty for
    ``ok``). The class methods build each status.
    """

    name: str
    status: CheckStatus
    found: str
    fix: str = ""

    def __post_init__(self) -> None:
        if self.status not in get_args(CheckStatus):
            known = ", ".join(get_args(CheckStatus))
            msg = f"check {self.name!r}: status {self.status!r} is not one of {known}"
            raise ValueError(msg)

    @classmethod
    def ok(cls, name: str, found: str) -> DoctorCheck:
        return cls(name, "ok", found)

    @classmethod
    def warn(cls, name: str, found: str, fix: str) -> DoctorCheck:
        return cls(name, "warn", found, fix)

    @classmethod
    def fail(cls, name: str, found: str, fix: str) -> DoctorCheck:
        return cls(name, "fail", found, fix)

    @classmethod
    def skip(cls, name: str, why: str) -> DoctorCheck:
        return cls(name, "skip", why)


def _no_rediscovery() -> None:
    """Outside a running agent (``dra-core discover``, tests) there is nothing to wake."""


@dataclass(frozen=True)
class NodeContext:
    """What a backend knows about where it runs. The same object is passed to every hook."""

    #: The Kubernetes node this agent serves.
    node_name: str
    #: The driver name in use (the backend's default unless the operator overrode it).
    driver_name: str
    #: The backend's options (see :func:`dra_backend_options`), keyed by option name.
    options: Mapping[str, str | None] = field(default_factory=dict)
    #: The backend's section of the agent's configuration file, as parsed YAML.
    config: Mapping[str, Any] = field(default_factory=dict)
    #: A directory the backend may keep files in; it survives agent restarts.
    state_dir: Path | None = None
    #: Call when the hardware changed, to rediscover and publish now instead of at the next poll.
    request_rediscovery: Callable[[], None] = _no_rediscovery


# ---------------------------------------------------------------------------------------------
# Lifecycle
# ---------------------------------------------------------------------------------------------


@hookspec
def dra_backend_options() -> Sequence[BackendOption]:
    """Declare the command-line options of a backend (``--sysfs-root`` and the like).

    Called once when the CLI builds its parser, before anything else; every plugin's options
    are collected.

    :returns: the options; their values reach every hook through :attr:`NodeContext.options`.

    Raising aborts the command with the plugin named.
    """


@hookspec
def dra_start(context: NodeContext) -> None:
    """Prepare to serve: open handles, check the environment, read configuration.

    Called once per agent run, before the first discovery, in every plugin.

    :param context: where the agent runs.

    Raising stops the agent from starting, with the message shown to the operator: say what
    is missing and how to fix it.
    """


@hookspec
def dra_stop(context: NodeContext) -> None:
    """Release what :func:`dra_start` acquired.

    Called once when the agent stops (SIGTERM or error), in every plugin. Prepared devices stay
    prepared: a restart must not disturb running pods.

    :param context: where the agent runs.

    Raising is logged; the remaining plugins still stop. A `FatalError` is raised after they
    all stopped, so ``dra-core run`` exits non-zero with its message.
    """


# ---------------------------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def dra_backend_identity() -> BackendIdentity:
    """Name the backend: its default driver name and the CDI vendor and class of its specs.

    Stops at the first non-None result. Called once at start; only the active backend should
    implement it.

    :returns: the identity. The driver name must be a lower-case DNS subdomain.

    Raising aborts the command or stops the agent from starting, with the plugin named.
    """


@hookspec(firstresult=True)
def dra_discover(context: NodeContext) -> Inventory:
    """Say what hardware is on this node and how the scheduler may allocate it.

    Stops at the first non-None result. Called at start and whenever the core rediscovers
    (periodically, and when a health change or the backend asks for it). It must be cheap
    enough to run every few seconds and must not change the hardware.

    Device names must be stable: derive them from hardware identity (a PCI address, a serial
    number), never from enumeration order. The inventory also carries the allocation model:
    counter sets shared by partitionable devices, consumable capacity with request policies
    and ``allow_multiple_allocations`` for shared devices.

    The order matters on an API server without these features (their feature gates off):
    without partitionable devices the core keeps devices in inventory order while the summed
    consumption of the kept ones fits every counter set, so list the device to keep first
    (a whole device before its partitions); without consumable capacity a shared device is
    left out unless ``Device.exclusive_without_sharing`` publishes it as an exclusive one;
    without device taints unhealthy devices are left out (docs/backend-guide.md).

    :param context: where the agent runs.
    :returns: the devices and counter sets to publish for this node.

    Raising keeps the previously published inventory and is retried; the error is logged and
    counted.
    """


@hookspec
def dra_device_attributes(device: Device, context: NodeContext) -> Mapping[str, AttributeValue]:
    """Add attributes to a discovered device (for extension plugins).

    Called for every device after :func:`dra_discover`, in every plugin; the results are merged
    into the device's attributes, later plugins winning on a clash.

    :param device: the device as the backend discovered it.
    :param context: where the agent runs.
    :returns: extra attributes, or None for none.

    Raising drops this plugin's attributes for the device and logs why.
    """


# ---------------------------------------------------------------------------------------------
# Allocation
# ---------------------------------------------------------------------------------------------


@hookspec
def dra_device_classes(
    identity: BackendIdentity, options: Mapping[str, str | None]
) -> Sequence[DeviceClassSpec]:
    """Declare the DeviceClasses users request devices of this backend with.

    Called when manifests are rendered (``dra-core render``, ``dra-core demo``); the results
    of every plugin are concatenated. The backend is not started.

    :param identity: the backend's identity, for the driver name in CEL selectors.
    :param options: the backend's options as the agent gets them (:attr:`NodeContext.options`;
        ``dra-core render`` takes the same flags and environment variables as ``run``), e.g.
        to declare a class per configured profile.
    :returns: the classes.

    Raising aborts ``dra-core render`` with the plugin named.
    """


@hookspec(firstresult=True)
def dra_decode_config(parameters: Mapping[str, Any], context: NodeContext) -> object:
    """Decode and validate one opaque configuration addressed to this driver.

    Stops at the first non-None result. Called at prepare for each class and claim config
    whose ``opaque.driver`` is this driver, and by the admission webhook when a claim or class
    is created. Decode strictly: unknown fields, wrong types and out-of-range values are errors.

    :param parameters: the ``opaque.parameters`` object as JSON.
    :param context: where the agent runs.
    :returns: the decoded configuration, passed back to :func:`dra_check_allocation` and
        :func:`dra_prepare` through :attr:`AllocatedClaim.configs`.

    Raise ``ValueError`` (or pydantic's ``ValidationError``) with a message naming the field:
    the claim fails to prepare with that message, and the webhook rejects the object.
    """


@hookspec
def dra_check_allocation(
    claim: AllocatedClaim, inventory: Inventory, prepared: PreparedClaims, context: NodeContext
) -> None:
    """Have the node's last word on an allocation before anything is touched.

    Called at prepare for each claim not prepared yet, in every plugin, after its opaque config
    is decoded. Check that each device exists, is healthy, is not held exclusively by another
    claim (``prepared.holding(device)``), and that any partition it needs can be created.

    :param claim: the claim's allocation on this node, with decoded configs.
    :param inventory: the current inventory.
    :param prepared: the other claims prepared on this node, as the checkpoint records them
        (so the view survives agent restarts); read only.
    :param context: where the agent runs.

    Raise ``dra_core.AllocationError`` (a ``ClaimError``) with a message a user can act on to
    refuse the claim; nothing has been changed, and the kubelet retries later.
    """


# ---------------------------------------------------------------------------------------------
# Prepare
# ---------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def dra_prepare(claim: AllocatedClaim, context: NodeContext) -> Sequence[PreparedDevice]:
    """Make a claim's devices usable by a container.

    Stops at the first non-None result. Called once per claim at ``NodePrepareResources``,
    serialized with every other prepare and unprepare of the driver. Do the side effects (e.g.
    create SR-IOV VFs) and return, per allocated device, the container edits and the state
    unprepare needs. The core writes the CDI spec and the checkpoint afterwards.

    Must be idempotent: after a crash the core may call it again for the same claim, with side
    effects partly done.

    :param claim: the claim's allocation on this node, with decoded configs.
    :param context: where the agent runs.
    :returns: one :class:`PreparedDevice` per allocated device, in any order.

    Raising fails this claim only; the message reaches the pod's events, so say what failed and
    what to do (``dra_core.PrepareError``; ``TransientError`` for what clears by itself). The
    core then calls :func:`dra_unprepare` to undo partial work.
    """


@hookspec
def dra_container_edits(
    device: PreparedDevice, claim: AllocatedClaim, context: NodeContext
) -> ContainerEdits:
    """Add container edits to a prepared device (for extension plugins).

    Called after :func:`dra_prepare` for every prepared device, in every plugin; the edits are
    merged after the backend's own.

    :param device: the prepared device with the backend's edits.
    :param claim: the claim it belongs to.
    :param context: where the agent runs.
    :returns: more edits, or None.

    Raising fails the claim's prepare like an error in :func:`dra_prepare`.
    """


@hookspec
def dra_claim_edits(
    claim: AllocatedClaim, devices: Sequence[PreparedDevice], context: NodeContext
) -> ContainerEdits:
    """Give container edits that belong to the whole claim rather than to one device.

    Called after :func:`dra_prepare` (and every plugin's :func:`dra_container_edits`) for each
    claim, in every plugin; the edits are merged as :func:`dra_container_edits`' are. The core
    writes them once in the claim's CDI spec, as a claim device whose CDI ID it adds to every
    device of the claim, so a container gets them once whichever devices it uses, and two
    claims of one driver in one container keep their own (give such variables claim-specific
    names, e.g. from the claim's name). The checkpoint records them with the claim.

    Use them for what describes the claim as a whole: the list of its devices, the claim's name,
    one mount every device shares. Per-device edits stay in :class:`PreparedDevice`.

    :param claim: the claim's allocation on this node, with decoded configs.
    :param devices: the prepared devices, one per allocation result in result order, with
        every plugin's edits.
    :param context: where the agent runs.
    :returns: the claim's edits, or None for none.

    Raising fails the claim's prepare like an error in :func:`dra_prepare`; the call counts
    against the same time limit.
    """


@hookspec(firstresult=True)
def dra_unprepare(claim: PreparedClaim, context: NodeContext) -> bool:
    """Undo what :func:`dra_prepare` did for a claim.

    Stops at the first non-None result. Called at ``NodeUnprepareResources``, after a failed
    prepare, and at start for claims whose prepare was interrupted. Works only from
    ``claim`` (recorded in the checkpoint): the ResourceClaim may be gone from the API. Must
    be idempotent, and must tolerate devices that were never fully prepared.

    :param claim: the claim as the checkpoint recorded it.
    :param context: where the agent runs.
    :returns: True (or None when the backend has nothing to undo).

    Raising fails the unprepare; the claim stays in the checkpoint and the kubelet retries.
    """


# ---------------------------------------------------------------------------------------------
# Health
# ---------------------------------------------------------------------------------------------


@hookspec
def dra_device_health(inventory: Inventory, context: NodeContext) -> Sequence[DeviceHealth]:
    """Report the health of devices.

    Called every few seconds, in every plugin; a device is unhealthy when any plugin says so.
    Devices not mentioned are healthy. An unhealthy device gets a taint in the ResourceSlice
    (NoSchedule, or NoExecute when asked) and is reported unhealthy on the kubelet's health
    stream; the taint goes away on recovery.

    :param inventory: the current inventory.
    :param context: where the agent runs.
    :returns: the health of the devices this plugin watches, or None.

    Raising is logged and counted; the previous health state stays.
    """


# ---------------------------------------------------------------------------------------------
# Diagnostics
# ---------------------------------------------------------------------------------------------


@hookspec
def dra_doctor_checks(context: NodeContext) -> Sequence[DoctorCheck]:
    """Check that this node has what the plugin needs, for ``dra-core doctor``.

    Called once per ``dra-core doctor`` run, in every plugin, before the backend is started, so
    a check can explain why starting would fail. Check what the agent cannot check for itself
    before it runs: hardware present and bound to the right driver, device nodes and their
    permissions, files the options name. Read only: change nothing on the node.

    :param context: where the agent would run, with the backend's options as given to
        ``doctor`` (the same flags and environment variables as ``run``).
    :returns: the checks, each with what was found and, unless ok, the fix; the core prints
        them under the plugin's name. None for none.

    Raising is reported as a failed check naming the plugin and the error; the other plugins'
    checks and the core's still run.
    """
