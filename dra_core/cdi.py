"""CDI (Container Device Interface) spec files for prepared claims.

One transient spec per claim, named like the Go helpers name them:
``<dir>/<vendor>-<class>_<claim UID>.json``. Each prepared device with container edits becomes
one CDI device named ``<claim UID>-<device>`` (plus ``-<share ID>`` for a shared allocation, so
several shares of one device in one claim stay distinct), and the kubelet is handed the fully
qualified IDs ``<vendor>/<class>=<name>``. A device without any edits gets no CDI device (the
CDI schema forbids empty edits) and no ID; a claim with none of them gets no spec at all.

Edits of the whole claim (`PreparedClaim.edits`) are written once, as the claim device
``claim-<claim UID>``, and its ID is added to every device's IDs, as the NVIDIA DRA driver does:
a container gets them once whichever of the claim's devices it uses, and two claims of one
driver in one container each bring their own. Device names start with the claim UID, so the
claim device's name never clashes with one of them.

Specs are written atomically through `dra_core.fileio` with mode 0644 (container runtimes read
them) at the lowest ``cdiVersion`` their content needs (`minimum_version`), since runtimes
refuse versions they do not know. They are not flushed to disk: a runtime never sees a torn
spec (the rename is atomic), and a spec is derived state, rebuilt from the checkpoint, which
is flushed: a power cut means a reboot, after which every claim is prepared again and its spec
rewritten, and start-up reconciliation writes missing specs and removes orphaned ones (the
dynamic CDI directory is usually a tmpfs anyway).

Claim UIDs are checked to be UUIDs before they reach a path, and every name against the CDI
rules, so a bad value is a `CdiError` naming the claim and device instead of a spec the
runtime rejects at container start.
"""

from __future__ import annotations

import contextlib
import json
import re
import stat
from pathlib import Path
from typing import Any

from dra_core.errors import ClaimError
from dra_core.fileio import (
    BoundedReadError,
    atomic_write,
    make_directories,
    read_regular_file,
    remove_stale_temps,
)
from dra_core.lazylog import logger
from dra_core.model import (
    BackendIdentity,
    ContainerEdits,
    DeviceNode,
    Mount,
    PreparedClaim,
    PreparedDevice,
)

__all__ = (
    "BASE_VERSION",
    "MAX_SPEC_BYTES",
    "SPEC_MODE",
    "CdiError",
    "CdiSpecs",
    "minimum_version",
)

#: The earliest ``cdiVersion`` runtimes accept.
BASE_VERSION = "0.3.0"
#: Container runtimes read the specs, so they are world-readable (and only root-writable).
SPEC_MODE = 0o644
_DIR_MODE = 0o755
#: The most read of an existing spec file: a claim's spec (32 devices at most, as the API
#: allows in one allocation) takes a few kilobytes, so a larger file is not one this agent wrote.
MAX_SPEC_BYTES = 1 << 20

_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_UUID_PART = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
# vendor and class: a letter first, a letter or digit last, [A-Za-z0-9_.-] between.
_VENDOR_OR_CLASS = re.compile(r"^[A-Za-z](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?$")
# device names: alphanumeric at both ends, [A-Za-z0-9_.:-] between.
_DEVICE_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_.:-]*[A-Za-z0-9])?$")
_PERMISSIONS = re.compile(r"^(?:none|r?w?m?|r?m?w?|w?r?m?|w?m?r?|m?r?w?|m?w?r?)$")
_NODE_TYPES = ("", "b", "c", "u", "p")
_INT64 = (-(2**63), 2**63 - 1)


class CdiError(ClaimError):
    """A CDI spec cannot be built, written, read or removed; the message says which and why.

    Only the claim the spec is for fails: the other claims of a call, and the other steps of a
    reconciliation, go on.
    """


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def _edits_of(holder: object) -> list[dict[str, Any]]:
    if not isinstance(holder, dict):
        return []
    edits = holder.get("containerEdits")
    return [edits] if isinstance(edits, dict) else []


def minimum_version(spec: dict[str, Any]) -> str:
    """The lowest ``cdiVersion`` that allows everything ``spec`` uses.

    0.3.0 is the base; a mount ``type`` needs 0.4.0; a device node ``hostPath`` or a device
    name starting with a digit 0.5.0; ``annotations`` (spec or device) or a ``.`` in the class
    part of ``kind`` 0.6.0; ``additionalGids`` or ``intelRdt`` 0.7.0; ``netDevices`` or
    ``intelRdt.schemata`` / ``enableMonitoring`` 1.1.0.
    """
    needed = BASE_VERSION

    def need(version: str) -> None:
        nonlocal needed
        if _version_tuple(version) > _version_tuple(needed):
            needed = version

    kind = spec.get("kind")
    if isinstance(kind, str) and "." in kind.partition("/")[2]:
        need("0.6.0")
    if spec.get("annotations"):
        need("0.6.0")
    edits = _edits_of(spec)
    devices = spec.get("devices")
    for device in devices if isinstance(devices, list) else []:
        if not isinstance(device, dict):
            continue
        name = device.get("name")
        if isinstance(name, str) and name[:1].isdigit():
            need("0.5.0")
        if device.get("annotations"):
            need("0.6.0")
        edits.extend(_edits_of(device))
    for e in edits:
        for mount in e.get("mounts") or ():
            if isinstance(mount, dict) and mount.get("type"):
                need("0.4.0")
        for node in e.get("deviceNodes") or ():
            if isinstance(node, dict) and node.get("hostPath"):
                need("0.5.0")
        if e.get("additionalGids"):
            need("0.7.0")
        rdt = e.get("intelRdt")
        if rdt is not None:
            need("0.7.0")
            if isinstance(rdt, dict) and (rdt.get("schemata") or rdt.get("enableMonitoring")):
                need("1.1.0")
        if e.get("netDevices"):
            need("1.1.0")
    return needed


class CdiSpecs:
    """The CDI specs of one backend (one vendor/class) in one directory.

    ``directory`` is normally the dynamic CDI directory ``/var/run/cdi``; ``identity`` gives
    the CDI vendor and class. Raises CdiError if they break the CDI name rules.
    """

    def __init__(self, directory: Path, identity: BackendIdentity) -> None:
        self._directory = Path(directory)
        self._identity = identity
        vendor, cls = identity.cdi_vendor, identity.cdi_class
        if len(vendor) > 253 or not _VENDOR_OR_CLASS.fullmatch(vendor):
            msg = (
                f"CDI vendor {vendor!r} of driver {identity.driver_name!r} is invalid: it must "
                f"start with a letter, end with a letter or digit, contain only letters, "
                f"digits, '_', '.' and '-', and be at most 253 characters"
            )
            raise CdiError(msg)
        if len(cls) > 63 or not _VENDOR_OR_CLASS.fullmatch(cls):
            msg = (
                f"CDI class {cls!r} of driver {identity.driver_name!r} is invalid: it must "
                f"start with a letter, end with a letter or digit, contain only letters, "
                f"digits, '_', '.' and '-', and be at most 63 characters"
            )
            raise CdiError(msg)
        self._prefix = f"{vendor}-{cls}_"
        self._file_re = re.compile(rf"^{re.escape(self._prefix)}({_UUID_PART})\.json$")

    @property
    def directory(self) -> Path:
        return self._directory

    @property
    def kind(self) -> str:
        """``<vendor>/<class>``."""
        return self._identity.cdi_kind

    # --- names -----------------------------------------------------------------------------

    def _check_uid(self, claim_uid: str) -> None:
        if not isinstance(claim_uid, str) or not _UUID.fullmatch(claim_uid):
            msg = (
                f"claim UID {claim_uid!r} is not a UUID, so it is not used in a CDI spec file "
                f"name under {self._directory}; the request did not come from a real claim"
            )
            raise CdiError(msg)

    def device_name(self, claim_uid: str, device: PreparedDevice) -> str:
        """The CDI device name: ``<uid>-<device>``, plus ``-<share id>`` for a shared one."""
        self._check_uid(claim_uid)
        a = device.allocation
        name = f"{claim_uid}-{a.device}"
        if a.share_id:
            name = f"{name}-{a.share_id}"
        if not _DEVICE_NAME.fullmatch(name):
            msg = (
                f"claim {claim_uid}: device {a.device!r}"
                + (f" share {a.share_id!r}" if a.share_id else "")
                + f": CDI device name {name!r} is invalid: it must start and end with a letter "
                "or digit and contain only letters, digits, '_', '.', ':' and '-'"
            )
            raise CdiError(msg)
        return name

    def device_id(self, claim_uid: str, device: PreparedDevice) -> str:
        """The fully qualified CDI device ID ``<vendor>/<class>=<name>``."""
        return f"{self.kind}={self.device_name(claim_uid, device)}"

    def claim_device_name(self, claim_uid: str) -> str:
        """The CDI device holding the edits of the whole claim: ``claim-<uid>``."""
        self._check_uid(claim_uid)
        return f"claim-{claim_uid}"

    def spec_path(self, claim_uid: str) -> Path:
        """``<dir>/<vendor>-<class>_<uid>.json``; CdiError if the UID is not a UUID."""
        self._check_uid(claim_uid)
        return self._directory / f"{self._prefix}{claim_uid}.json"

    # --- building --------------------------------------------------------------------------

    def _problem(self, claim_uid: str, device: PreparedDevice | None, problem: str) -> CdiError:
        if device is None:
            whose = "the claim's own edits"
        else:
            a = device.allocation
            whose = f"device {a.device!r}" + (f" share {a.share_id!r}" if a.share_id else "")
        msg = (
            f"CDI spec {self.spec_path(claim_uid)}: claim {claim_uid}: {whose}: {problem}; "
            "the backend's container edits must be fixed"
        )
        return CdiError(msg)

    def _node(self, uid: str, device: PreparedDevice | None, node: DeviceNode) -> dict[str, Any]:
        if not node.path.startswith("/"):
            raise self._problem(uid, device, f"device node path {node.path!r} is not absolute")
        if node.host_path is not None and not node.host_path.startswith("/"):
            raise self._problem(
                uid, device, f"device node hostPath {node.host_path!r} is not absolute"
            )
        if node.type not in _NODE_TYPES:
            raise self._problem(uid, device, f"device node type {node.type!r} is not b, c, u or p")
        if node.permissions and not _PERMISSIONS.fullmatch(node.permissions):
            raise self._problem(
                uid,
                device,
                f"device node permissions {node.permissions!r} are not a subset of 'rwm' or 'none'",
            )
        out: dict[str, Any] = {"path": node.path}
        if node.host_path:
            out["hostPath"] = node.host_path
        if node.type:
            out["type"] = node.type
        for key, value in (("major", node.major), ("minor", node.minor)):
            if value is None:
                continue
            if isinstance(value, bool) or not _INT64[0] <= value <= _INT64[1]:
                raise self._problem(uid, device, f"device node {key} {value!r} is not an int64")
            out[key] = value
        if node.permissions:
            out["permissions"] = node.permissions
        return out

    def _mount(self, uid: str, device: PreparedDevice | None, mount: Mount) -> dict[str, Any]:
        if not mount.host_path or not mount.container_path:
            raise self._problem(uid, device, "a mount needs both hostPath and containerPath")
        out: dict[str, Any] = {"hostPath": mount.host_path, "containerPath": mount.container_path}
        if mount.options:
            out["options"] = list(mount.options)
        if mount.type:
            out["type"] = mount.type
        return out

    def _edits(
        self, uid: str, device: PreparedDevice | None, edits: ContainerEdits
    ) -> dict[str, Any]:
        """``edits`` in CDI form; ``device`` names their owner in errors (None: the claim)."""
        env: list[str] = []
        for key, value in edits.env.items():
            if not key or "=" in key or "\0" in key:
                raise self._problem(
                    uid, device, f"environment variable name {key!r} is empty or has '=' or NUL"
                )
            if "\0" in value:
                raise self._problem(uid, device, f"environment variable {key!r} contains NUL")
            env.append(f"{key}={value}")
        out: dict[str, Any] = {}
        if env:
            out["env"] = env
        if edits.device_nodes:
            out["deviceNodes"] = [self._node(uid, device, n) for n in edits.device_nodes]
        if edits.mounts:
            out["mounts"] = [self._mount(uid, device, m) for m in edits.mounts]
        return out

    def build(self, claim: PreparedClaim) -> dict[str, Any] | None:
        """The CDI spec of ``claim``, or None when no device has container edits.

        Devices without edits are left out (CDI forbids empty edits); they get no CDI device.
        The claim's own edits, if any, come last as the claim device.
        """
        uid = claim.ref.uid
        self._check_uid(uid)
        devices: list[dict[str, Any]] = []
        seen: set[str] = set()
        for device in claim.devices:
            name = self.device_name(uid, device)
            if name in seen:
                raise self._problem(
                    uid, device, f"CDI device name {name!r} is used twice in the claim"
                )
            seen.add(name)
            edits = self._edits(uid, device, device.edits)
            if edits:
                devices.append({"name": name, "containerEdits": edits})
        claim_edits = self._edits(uid, None, claim.edits)
        if claim_edits:
            devices.append({"name": self.claim_device_name(uid), "containerEdits": claim_edits})
        if not devices:
            return None
        spec: dict[str, Any] = {"cdiVersion": BASE_VERSION, "kind": self.kind, "devices": devices}
        spec["cdiVersion"] = minimum_version(spec)
        return spec

    def minimum_version(self, spec: dict[str, Any]) -> str:
        """See the module function `minimum_version`."""
        return minimum_version(spec)

    def cdi_ids(self, claim: PreparedClaim) -> dict[tuple[str, str | None], tuple[str, ...]]:
        """(device, share ID) -> CDI IDs of each device of ``claim``, without touching files.

        A device's own ID comes first when it has container edits, then the claim device's
        when the claim has edits of its own. Gives the same answer as `write`.
        """
        uid = claim.ref.uid
        shared = () if claim.edits.empty else (f"{self.kind}={self.claim_device_name(uid)}",)
        result: dict[tuple[str, str | None], tuple[str, ...]] = {}
        for device in claim.devices:
            a = device.allocation
            own = () if device.edits.empty else (self.device_id(uid, device),)
            result[(a.device, a.share_id)] = own + shared
        return result

    # --- files -----------------------------------------------------------------------------

    def write(self, claim: PreparedClaim) -> dict[tuple[str, str | None], tuple[str, ...]]:
        """Write the spec of ``claim`` atomically (mode 0644) and return its CDI IDs.

        The result maps (device name, share ID) of each allocation to its fully qualified CDI
        IDs. When no device has edits, no spec is needed and any old one is removed. Writing
        the same content again leaves the file alone.
        """
        uid = claim.ref.uid
        spec = self.build(claim)
        ids = self.cdi_ids(claim)
        path = self.spec_path(uid)
        if spec is None:
            self.remove(uid)
            return ids
        data = (json.dumps(spec, indent=2) + "\n").encode("utf-8")
        try:
            # Anything but a regular file of this content (a FIFO, a larger file) is replaced.
            with contextlib.suppress(FileNotFoundError, BoundedReadError):
                same = read_regular_file(path, len(data)) == data
                if same and stat.S_IMODE(path.stat().st_mode) == SPEC_MODE:
                    return ids
            try:
                atomic_write(path, data, SPEC_MODE, durable=False)
            except FileNotFoundError:  # the directory is not there (yet, or any more)
                make_directories(self._directory, _DIR_MODE)
                atomic_write(path, data, SPEC_MODE, durable=False)
        except OSError as exc:
            msg = (
                f"CDI spec {path}: claim {uid}: cannot write it: {exc}; check that "
                f"{self._directory} exists, is writable by the agent and has free space"
            )
            raise CdiError(msg) from exc
        logger.debug("wrote CDI spec {} for claim {}", path, uid)
        return ids

    def remove(self, claim_uid: str) -> bool:
        """Delete the spec of ``claim_uid``; False when there was none."""
        path = self.spec_path(claim_uid)
        try:
            path.unlink()
            removed = True
        except FileNotFoundError:
            removed = False
        except OSError as exc:
            msg = (
                f"CDI spec {path}: claim {claim_uid}: cannot remove it: {exc}; check the "
                f"permissions of {self._directory}"
            )
            raise CdiError(msg) from exc
        if removed:
            logger.debug("removed CDI spec {} of claim {}", path, claim_uid)
        return removed

    def exists(self, claim_uid: str) -> bool:
        """Whether the spec of ``claim_uid`` is on disk."""
        return self.spec_path(claim_uid).is_file()

    def read(self, claim_uid: str) -> dict[str, Any] | None:
        """The spec of ``claim_uid`` as written, or None; CdiError if it is not a JSON object."""
        path = self.spec_path(claim_uid)
        try:
            raw = read_regular_file(path, MAX_SPEC_BYTES)
        except FileNotFoundError:
            return None
        except OSError as exc:
            msg = f"CDI spec {path}: claim {claim_uid}: cannot read it: {exc}"
            raise CdiError(msg) from exc
        try:
            spec = json.loads(raw)
        except ValueError as exc:
            msg = (
                f"CDI spec {path}: claim {claim_uid}: not valid JSON ({exc}); remove it and "
                f"prepare the claim again, or let startup reconciliation regenerate it"
            )
            raise CdiError(msg) from exc
        if not isinstance(spec, dict):
            msg = f"CDI spec {path}: claim {claim_uid}: the top level is not a JSON object"
            raise CdiError(msg)
        return spec

    def claim_uids(self) -> set[str]:
        """The claim UIDs that have a spec of this vendor/class in the directory.

        Other drivers' specs, temp files and files whose ``kind`` is not ours are ignored (a
        file that cannot be parsed but has our name pattern counts as ours).
        """
        try:
            names = [p.name for p in self._directory.iterdir()]
        except FileNotFoundError:
            return set()
        except OSError as exc:
            msg = f"CDI directory {self._directory}: cannot list it: {exc}"
            raise CdiError(msg) from exc
        uids: set[str] = set()
        for name in names:
            match = self._file_re.fullmatch(name)
            if match is None:
                continue
            try:
                content = json.loads(read_regular_file(self._directory / name, MAX_SPEC_BYTES))
            except FileNotFoundError:
                continue
            except (OSError, ValueError):
                content = None
            if isinstance(content, dict) and content.get("kind") != self.kind:
                logger.debug("{} has kind {!r}, not ours", name, content.get("kind"))
                continue
            uids.add(match.group(1))
        return uids

    def remove_stale_temp_files(self, older_than: float = 60.0) -> list[Path]:
        """Delete our temp files left by a crash mid-write, older than ``older_than`` seconds."""

        def ours(target: str) -> bool:
            return self._file_re.fullmatch(target) is not None

        removed = remove_stale_temps(self._directory, ours, older_than)
        for path in removed:
            logger.info("removed stale CDI temp file {}", path)
        return removed
