"""The durable record of the claims prepared on this node.

Unprepare works from this record alone (the claim may be gone from the API server), so it must
survive crashes and never be lost quietly:

- every change rewrites the whole file through `dra_core.fileio.atomic_write` (temp file,
  fsync, rename, fsync of the directory), mode 0600 in a 0700 directory;
- the file carries a kind, a schema version and a SHA-256 checksum of its data, and every
  field is decoded strictly; anything unexpected raises `CheckpointError`, which names the file
  and the problem and points at ``dra-core checkpoint inspect`` / ``repair``. The checkpoint is
  never reset silently;
- each claim is recorded in two phases: ``started`` before the backend touches anything (the
  allocations only), ``completed`` once the CDI spec is written (the full prepared devices),
  so a crash mid-prepare is visible and can be rolled back or completed;
- each record carries the boot ID of the node when it was written, so prepared state from
  before a reboot (which the reboot destroyed) is recognised.

File format (JSON)::

    {
      "kind": "dra-core-checkpoint",
      "version": 1,
      "checksum": "sha256:<hex of the canonical JSON of data>",
      "data": {"claims": {"<uid>": <record>, ...}}
    }

where a record is ``{"phase", "bootId", "driver", "claim": {"namespace", "name", "uid"},
"devices": [{"allocation": {"request", "pool", "device", "shareId", "consumedCapacity",
"adminAccess"}, "edits": {"env", "deviceNodes", "mounts"}, "state": {...}}]}``. The canonical
JSON is ``json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`` in
UTF-8.

Several instances of the agent may share the file during a rolling update (they serialise
prepare with a file lock); a `Checkpoint` notices when the file was replaced by someone else
and reloads it before answering.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import stat
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, cast

from loguru import logger

from dra_core.fileio import atomic_write, remove_stale_temps
from dra_core.model import (
    AllocatedDevice,
    ClaimRef,
    ContainerEdits,
    DeviceNode,
    Mount,
    PreparedClaim,
    PreparedDevice,
)

__all__ = (
    "BOOT_ID_PATH",
    "DIR_MODE",
    "FILE_MODE",
    "KIND",
    "VERSION",
    "Checkpoint",
    "CheckpointError",
    "ClaimRecord",
    "InspectReport",
    "Phase",
    "RepairReport",
    "current_boot_id",
    "decode_record",
    "encode_record",
    "inspect",
    "render_inspect",
    "render_repair",
    "repair",
)

KIND = "dra-core-checkpoint"
VERSION = 1
FILE_MODE = 0o600
DIR_MODE = 0o700
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")

Phase = Literal["started", "completed"]
_PHASES: tuple[Phase, ...] = ("started", "completed")
_NODE_TYPES = ("c", "b", "u", "p", "")


class CheckpointError(Exception):
    """The checkpoint cannot be read or written; the message names the file and the problem."""


def _damaged(path: Path, problem: str) -> CheckpointError:
    msg = (
        f"checkpoint {path}: {problem}. The agent will not reset it (that would forget "
        f"prepared claims). Run `dra-core checkpoint inspect --path {path}` to see what is "
        f"damaged and `dra-core checkpoint repair --path {path}` to keep every record that "
        f"can be decoded (the damaged file is backed up first)."
    )
    return CheckpointError(msg)


# ---------------------------------------------------------------------------------------------
# Records and boot ID
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClaimRecord:
    """One prepared (or half-prepared) claim as the checkpoint keeps it.

    ``phase`` is ``started`` while prepare is in progress (``claim.devices`` carry only their
    allocations) and ``completed`` once the CDI spec is written (full edits and state).
    ``boot_id`` is the node's boot ID when the record was written, ``driver`` the driver name
    that prepared it.
    """

    claim: PreparedClaim
    phase: Phase
    boot_id: str
    driver: str

    @property
    def uid(self) -> str:
        return self.claim.ref.uid

    @classmethod
    def started(
        cls,
        ref: ClaimRef,
        allocations: Iterable[AllocatedDevice],
        *,
        boot_id: str,
        driver: str,
    ) -> ClaimRecord:
        """The record written before the backend's prepare: allocations, no edits or state."""
        devices = tuple(PreparedDevice(allocation=a) for a in allocations)
        return cls(PreparedClaim(ref=ref, devices=devices), "started", boot_id, driver)

    @classmethod
    def completed(cls, claim: PreparedClaim, *, boot_id: str, driver: str) -> ClaimRecord:
        """The record written once the claim's CDI spec is on disk."""
        return cls(claim, "completed", boot_id, driver)


def current_boot_id(path: Path = BOOT_ID_PATH) -> str:
    """The kernel's boot ID (changes at every boot); "" with a warning when it is unreadable.

    An empty boot ID never matches a real one, so records written with it are treated as
    being from another boot only if the ID later becomes readable.
    """
    try:
        return Path(path).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        logger.warning("cannot read the boot ID from {}: {}; reboot detection is off", path, exc)
        return ""


# ---------------------------------------------------------------------------------------------
# JSON codec
# ---------------------------------------------------------------------------------------------


def _encode_device(device: PreparedDevice) -> dict[str, Any]:
    a = device.allocation
    e = device.edits
    return {
        "allocation": {
            "request": a.request,
            "pool": a.pool,
            "device": a.device,
            "shareId": a.share_id,
            "consumedCapacity": dict(a.consumed_capacity),
            "adminAccess": a.admin_access,
        },
        "edits": {
            "env": dict(e.env),
            "deviceNodes": [
                {
                    "path": n.path,
                    "hostPath": n.host_path,
                    "type": n.type,
                    "major": n.major,
                    "minor": n.minor,
                    "permissions": n.permissions,
                }
                for n in e.device_nodes
            ],
            "mounts": [
                {
                    "hostPath": m.host_path,
                    "containerPath": m.container_path,
                    "options": list(m.options),
                    "type": m.type,
                }
                for m in e.mounts
            ],
        },
        "state": dict(device.state),
    }


def encode_record(record: ClaimRecord) -> dict[str, Any]:
    """The JSON object of one record (see the module docstring for the layout)."""
    ref = record.claim.ref
    return {
        "phase": record.phase,
        "bootId": record.boot_id,
        "driver": record.driver,
        "claim": {"namespace": ref.namespace, "name": ref.name, "uid": ref.uid},
        "devices": [_encode_device(d) for d in record.claim.devices],
    }


class _Bad(Exception):
    """A field of a record does not decode: ``where`` is its path, ``problem`` what is wrong."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    return {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
    }.get(type(value), type(value).__name__)


def _object(value: object, where: str, required: Iterable[str]) -> dict[str, Any]:
    """A JSON object with exactly the ``required`` keys."""
    if not isinstance(value, dict):
        raise _Bad(where, f"expected an object, got {_type_name(value)}")
    keys = set(required)
    missing = sorted(keys - value.keys())
    if missing:
        raise _Bad(where, f"missing field(s) {', '.join(missing)}")
    unknown = sorted(str(k) for k in value.keys() - keys)
    if unknown:
        raise _Bad(where, f"unknown field(s) {', '.join(unknown)}")
    return cast(dict[str, Any], value)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _str(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise _Bad(_join(where, key), f"expected a string, got {_type_name(value)}")
    return value


def _opt_str(obj: dict[str, Any], key: str, where: str) -> str | None:
    value = obj[key]
    if value is not None and not isinstance(value, str):
        raise _Bad(_join(where, key), f"expected a string or null, got {_type_name(value)}")
    return value


def _opt_int(obj: dict[str, Any], key: str, where: str) -> int | None:
    value = obj[key]
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise _Bad(_join(where, key), f"expected an integer or null, got {_type_name(value)}")
    return value


def _bool(obj: dict[str, Any], key: str, where: str) -> bool:
    value = obj[key]
    if not isinstance(value, bool):
        raise _Bad(_join(where, key), f"expected a boolean, got {_type_name(value)}")
    return value


def _str_map(obj: dict[str, Any], key: str, where: str) -> dict[str, str]:
    value = obj[key]
    here = _join(where, key)
    if not isinstance(value, dict):
        raise _Bad(here, f"expected an object of strings, got {_type_name(value)}")
    for k, v in value.items():
        if not isinstance(v, str):
            item = f"{here}.{k}"
            raise _Bad(item, f"expected a string, got {_type_name(v)}")
    return dict(value)


def _list(obj: dict[str, Any], key: str, where: str) -> list[Any]:
    value = obj[key]
    if not isinstance(value, list):
        raise _Bad(_join(where, key), f"expected an array, got {_type_name(value)}")
    return value


def _decode_device(raw: object, where: str) -> PreparedDevice:
    obj = _object(raw, where, ("allocation", "edits", "state"))
    here = _join(where, "allocation")
    a = _object(
        obj["allocation"],
        here,
        ("request", "pool", "device", "shareId", "consumedCapacity", "adminAccess"),
    )
    allocation = AllocatedDevice(
        request=_str(a, "request", here),
        pool=_str(a, "pool", here),
        device=_str(a, "device", here),
        share_id=_opt_str(a, "shareId", here),
        consumed_capacity=_str_map(a, "consumedCapacity", here),
        admin_access=_bool(a, "adminAccess", here),
    )
    here = _join(where, "edits")
    e = _object(obj["edits"], here, ("env", "deviceNodes", "mounts"))
    nodes: list[DeviceNode] = []
    for i, item in enumerate(_list(e, "deviceNodes", here)):
        at = f"{here}.deviceNodes[{i}]"
        n = _object(item, at, ("path", "hostPath", "type", "major", "minor", "permissions"))
        node_type = _str(n, "type", at)
        if node_type not in _NODE_TYPES:
            item = f"{at}.type"
            raise _Bad(item, f"{node_type!r} is not one of c, b, u, p or empty")
        nodes.append(
            DeviceNode(
                path=_str(n, "path", at),
                host_path=_opt_str(n, "hostPath", at),
                type=cast(Literal["c", "b", "u", "p", ""], node_type),
                major=_opt_int(n, "major", at),
                minor=_opt_int(n, "minor", at),
                permissions=_str(n, "permissions", at),
            )
        )
    mounts: list[Mount] = []
    for i, item in enumerate(_list(e, "mounts", here)):
        at = f"{here}.mounts[{i}]"
        m = _object(item, at, ("hostPath", "containerPath", "options", "type"))
        options = _list(m, "options", at)
        for j, option in enumerate(options):
            if not isinstance(option, str):
                item = f"{at}.options[{j}]"
                raise _Bad(item, f"expected a string, got {_type_name(option)}")
        mounts.append(
            Mount(
                host_path=_str(m, "hostPath", at),
                container_path=_str(m, "containerPath", at),
                options=tuple(options),
                type=_opt_str(m, "type", at),
            )
        )
    edits = ContainerEdits(
        env=_str_map(e, "env", here), device_nodes=tuple(nodes), mounts=tuple(mounts)
    )
    state = obj["state"]
    if not isinstance(state, dict):
        raise _Bad(_join(where, "state"), f"expected an object, got {_type_name(state)}")
    return PreparedDevice(allocation=allocation, edits=edits, state=state)


def _decode(uid: str, raw: object) -> ClaimRecord:
    obj = _object(raw, "", ("phase", "bootId", "driver", "claim", "devices"))
    phase = _str(obj, "phase", "")
    if phase not in _PHASES:
        raise _Bad("phase", f"{phase!r} is not one of {', '.join(_PHASES)}")
    c = _object(obj["claim"], "claim", ("namespace", "name", "uid"))
    ref = ClaimRef(
        namespace=_str(c, "namespace", "claim"),
        name=_str(c, "name", "claim"),
        uid=_str(c, "uid", "claim"),
    )
    if ref.uid != uid:
        raise _Bad("claim.uid", f"{ref.uid!r} differs from the record's key {uid!r}")
    devices = tuple(
        _decode_device(d, f"devices[{i}]") for i, d in enumerate(_list(obj, "devices", ""))
    )
    return ClaimRecord(
        claim=PreparedClaim(ref=ref, devices=devices),
        phase=phase,
        boot_id=_str(obj, "bootId", ""),
        driver=_str(obj, "driver", ""),
    )


def decode_record(uid: str, raw: object) -> ClaimRecord:
    """Decode one record strictly; ValueError names the claim UID, the field and the problem."""
    try:
        return _decode(uid, raw)
    except _Bad as exc:
        msg = f"claim {uid}: field {exc.where or '(record)'}: {exc.problem}"
        raise ValueError(msg) from None


# ---------------------------------------------------------------------------------------------
# File level
# ---------------------------------------------------------------------------------------------


def _canonical(data: object) -> bytes:
    return json.dumps(
        data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _checksum(data: object) -> str:
    return "sha256:" + hashlib.sha256(_canonical(data)).hexdigest()


def _document(records: Mapping[str, dict[str, Any]]) -> bytes:
    data = {"claims": dict(records)}
    doc = {"kind": KIND, "version": VERSION, "checksum": _checksum(data), "data": data}
    text = json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False)
    return (text + "\n").encode("utf-8")


@dataclass
class _Parsed:
    version: int | None = None
    problems: list[str] = field(default_factory=list)
    records: dict[str, ClaimRecord] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    #: False when the content cannot be read as a checkpoint at all (no records to salvage).
    structured: bool = False


def _reject_constant(name: str) -> float:
    msg = f"{name} is not valid JSON"
    raise ValueError(msg)


def _parse(raw: bytes) -> _Parsed:
    """Read a checkpoint leniently: every problem is listed, every decodable record kept."""
    out = _Parsed()
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        if not raw.strip():
            out.problems.append("the file is empty (truncated?)")
        else:
            out.problems.append(f"not valid JSON (truncated or overwritten?): {exc}")
        return out
    if not isinstance(doc, dict):
        out.problems.append(f"the top level is {_type_name(doc)}, not an object")
        return out
    if doc.get("kind") != KIND:
        out.problems.append(f"kind is {doc.get('kind')!r}, not {KIND!r}")
    version = doc.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        out.problems.append(f"version is {version!r}, not an integer")
    else:
        out.version = version
        if version != VERSION:
            out.problems.append(
                f"version {version} is unknown to this dra-core, which reads version {VERSION}"
                + (" (written by a newer release?)" if version > VERSION else "")
            )
    unknown = sorted(str(k) for k in doc.keys() - {"kind", "version", "checksum", "data"})
    if unknown:
        out.problems.append(f"unknown top-level field(s) {', '.join(unknown)}")
    data = doc.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("claims"), dict):
        out.problems.append("data.claims is missing or not an object")
        return out
    extra = sorted(str(k) for k in data.keys() - {"claims"})
    if extra:
        out.problems.append(f"unknown field(s) in data: {', '.join(extra)}")
    checksum = doc.get("checksum")
    if not isinstance(checksum, str):
        out.problems.append(f"checksum is {checksum!r}, not a string")
    elif checksum != _checksum(data):
        out.problems.append(
            "checksum mismatch: the data was changed or partly overwritten after it was written"
        )
    out.structured = True
    for uid, raw_record in data["claims"].items():
        try:
            out.records[uid] = _decode(uid, raw_record)
        except _Bad as exc:
            out.problems.append(f"claim {uid}: field {exc.where or '(record)'}: {exc.problem}")
            out.dropped.append(uid)
    return out


def _file_id(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class Checkpoint:
    """The checkpoint file of one agent: a thread-safe map from claim UID to `ClaimRecord`.

    Build it with `Checkpoint.open`. Reads are answered from memory after a ``stat`` that
    reloads the file if another process replaced it; `put` and `remove` rewrite the whole file
    atomically and durably before they return.
    """

    def __init__(self, path: Path, boot_id: str, records: dict[str, ClaimRecord]) -> None:
        self._path = path
        self._boot_id = boot_id
        self._records = records
        self._encoded = {uid: encode_record(r) for uid, r in records.items()}
        self._lock = threading.RLock()
        self._file_id = _file_id(path)

    @classmethod
    def open(cls, path: Path, *, boot_id: str | None = None) -> Checkpoint:
        """Load the checkpoint at ``path``, creating an empty one (directory 0700) if absent.

        ``boot_id`` is this boot's ID (read from the kernel when None). Raises CheckpointError
        when the file is unreadable, corrupt or of an unknown version; it is never reset.
        """
        path = Path(path)
        if not path.parent.is_dir():
            try:
                path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            except OSError as exc:
                msg = (
                    f"checkpoint {path}: cannot create the directory {path.parent}: {exc}; "
                    f"create it (mode 0700) or choose another plugin data directory"
                )
                raise CheckpointError(msg) from exc
        with contextlib.suppress(OSError):
            remove_stale_temps(path.parent, lambda name: name == path.name, older_than=600)
        records = cls._load(path)
        if records is None:
            cls._write(path, {})
            logger.info("created an empty checkpoint at {}", path)
            records = {}
        else:
            with contextlib.suppress(OSError):
                if stat.S_IMODE(path.stat().st_mode) & ~FILE_MODE:
                    path.chmod(FILE_MODE)
        resolved = current_boot_id() if boot_id is None else boot_id
        return cls(path, resolved, records)

    @staticmethod
    def _load(path: Path) -> dict[str, ClaimRecord] | None:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _damaged(path, f"cannot be read: {exc}") from exc
        parsed = _parse(raw)
        if parsed.problems:
            raise _damaged(path, "; ".join(parsed.problems))
        return parsed.records

    @staticmethod
    def _write(path: Path, encoded: Mapping[str, dict[str, Any]]) -> None:
        try:
            data = _document(encoded)
            atomic_write(path, data, FILE_MODE)
        except OSError as exc:
            msg = (
                f"checkpoint {path}: cannot write it: {exc}; check free space and "
                f"permissions of {path.parent} (the previous content is unchanged)"
            )
            raise CheckpointError(msg) from exc

    @property
    def path(self) -> Path:
        """The checkpoint file."""
        return self._path

    @property
    def boot_id(self) -> str:
        """This boot's ID, to record in new records and compare with old ones."""
        return self._boot_id

    def _refresh(self) -> None:
        """Reload when another process replaced the file since we last read or wrote it."""
        current = _file_id(self._path)
        if current == self._file_id:
            return
        records = self._load(self._path)
        if records is None:
            msg = (
                f"checkpoint {self._path}: the file disappeared while the agent was running; "
                f"the prepared claims it recorded are unknown now. Restore it from a backup "
                f"or restart the agent, which will create an empty one"
            )
            raise CheckpointError(msg)
        logger.debug("checkpoint {} changed on disk; reloaded", self._path)
        self._records = records
        self._encoded = {uid: encode_record(r) for uid, r in records.items()}
        self._file_id = current

    def records(self) -> dict[str, ClaimRecord]:
        """A copy of every record, by claim UID."""
        with self._lock:
            self._refresh()
            return dict(self._records)

    def get(self, uid: str) -> ClaimRecord | None:
        """The record of claim ``uid``, or None."""
        with self._lock:
            self._refresh()
            return self._records.get(uid)

    def from_previous_boot(self) -> dict[str, ClaimRecord]:
        """The records written before the current boot (their device state is gone)."""
        return {u: r for u, r in self.records().items() if r.boot_id != self._boot_id}

    def put(self, record: ClaimRecord) -> None:
        """Add or replace the record of ``record.uid`` durably."""
        uid = record.uid
        if record.phase not in _PHASES:
            msg = f"checkpoint {self._path}: claim {uid}: phase {record.phase!r} is not valid"
            raise CheckpointError(msg)
        encoded = encode_record(record)
        try:
            normalised = json.loads(_canonical(encoded))
        except (TypeError, ValueError) as exc:
            msg = (
                f"checkpoint {self._path}: claim {uid}: the record is not JSON-serialisable "
                f"({exc}); a backend's device state must hold only JSON values (objects with "
                f"string keys, arrays, strings, finite numbers, booleans, null)"
            )
            raise CheckpointError(msg) from exc
        try:
            # What a reload would give: readers see the same value before and after a restart.
            decoded = _decode(uid, normalised)
        except _Bad as exc:
            msg = (
                f"checkpoint {self._path}: claim {uid}: field {exc.where or '(record)'}: "
                f"{exc.problem}; the record was not written (a backend returned a value the "
                f"model does not allow)"
            )
            raise CheckpointError(msg) from None
        with self._lock:
            self._refresh()
            updated = {**self._encoded, uid: encoded}
            self._write(self._path, updated)
            self._records[uid] = decoded
            self._encoded = updated
            self._file_id = _file_id(self._path)

    def remove(self, uid: str) -> None:
        """Forget claim ``uid`` durably; unknown UIDs are fine."""
        with self._lock:
            self._refresh()
            if uid not in self._encoded:
                return
            updated = {u: r for u, r in self._encoded.items() if u != uid}
            self._write(self._path, updated)
            del self._records[uid]
            self._encoded = updated
            self._file_id = _file_id(self._path)

    def __len__(self) -> int:
        with self._lock:
            self._refresh()
            return len(self._records)

    def __repr__(self) -> str:
        return f"Checkpoint({str(self._path)!r})"


# ---------------------------------------------------------------------------------------------
# Inspect and repair (the `dra-core checkpoint` command)
# ---------------------------------------------------------------------------------------------


def _describe(record: ClaimRecord) -> str:
    devices = ", ".join(
        d.allocation.device + (f"#{d.allocation.share_id}" if d.allocation.share_id else "")
        for d in record.claim.devices
    )
    return (
        f"{record.claim.ref} {record.phase} driver={record.driver} "
        f"boot={record.boot_id[:8] or '?'} devices=[{devices}]"
    )


@dataclass(frozen=True)
class InspectReport:
    """What `inspect` found: ``ok`` when the agent would load the file as it is.

    ``records`` are the records that decode (all of them when ok); ``dropped`` the UIDs of
    those that do not; ``problems`` every problem found, in file order.
    """

    path: Path
    ok: bool
    version: int | None
    problems: list[str]
    records: list[ClaimRecord]
    dropped: list[str] = field(default_factory=list)
    exists: bool = True

    def render(self) -> str:
        """A short human-readable summary for the CLI."""
        lines = [f"checkpoint {self.path}"]
        if not self.exists:
            lines.append("  the file does not exist (the agent creates an empty one on start)")
            return "\n".join(lines)
        lines.append(f"  version: {self.version if self.version is not None else 'unknown'}")
        lines.append(f"  status: {'OK' if self.ok else 'DAMAGED'}")
        lines.extend(f"  problem: {p}" for p in self.problems)
        lines.append(f"  records: {len(self.records)} decodable, {len(self.dropped)} not")
        lines.extend(f"    {_describe(r)}" for r in self.records)
        if not self.ok:
            lines.append(
                f"  to salvage the decodable records: dra-core checkpoint repair --path {self.path}"
            )
        return "\n".join(lines)


@dataclass(frozen=True)
class RepairReport:
    """What `repair` did: the backup it made, the records it kept and those it dropped."""

    path: Path
    changed: bool
    backup: Path | None
    kept: list[ClaimRecord]
    dropped: list[str]
    problems: list[str]
    #: False when the damaged file could not be parsed at all, so no record could be kept.
    parsed: bool = True

    def render(self) -> str:
        """A short human-readable summary for the CLI."""
        if not self.changed:
            return f"checkpoint {self.path}: nothing to repair"
        lines = [f"checkpoint {self.path}: repaired"]
        lines.extend(f"  problem: {p}" for p in self.problems)
        lines.append(f"  damaged file kept as {self.backup}")
        lines.append(f"  kept {len(self.kept)} record(s)")
        lines.extend(f"    {_describe(r)}" for r in self.kept)
        lines.append(f"  dropped {len(self.dropped)} record(s)")
        lines.extend(f"    {uid}" for uid in self.dropped)
        if not self.parsed:
            lines.append(
                "  the damaged file could not be parsed, so none of its records were kept; "
                "read the backup to find the claims it held"
            )
        if self.dropped or not self.parsed:
            lines.append(
                "  dropped claims may still hold devices or CDI specs; startup reconciliation "
                "removes CDI specs without a record, check the devices of the dropped claims"
            )
        return "\n".join(lines)


def inspect(path: Path) -> InspectReport:
    """Read the checkpoint at ``path`` without changing it and list every problem."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return InspectReport(path, False, None, ["the file does not exist"], [], exists=False)
    except OSError as exc:
        return InspectReport(path, False, None, [f"cannot be read: {exc}"], [])
    parsed = _parse(raw)
    return InspectReport(
        path=path,
        ok=not parsed.problems,
        version=parsed.version,
        problems=parsed.problems,
        records=list(parsed.records.values()),
        dropped=parsed.dropped,
    )


def render_inspect(report: InspectReport) -> str:
    """`InspectReport.render`, as a function for the CLI."""
    return report.render()


def render_repair(report: RepairReport) -> str:
    """`RepairReport.render`, as a function for the CLI."""
    return report.render()


def _backup_path(path: Path) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    candidate = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        n += 1
    return candidate


def repair(path: Path, *, force: bool = False) -> RepairReport:
    """Make the checkpoint at ``path`` loadable again, losing nothing silently.

    The damaged file is first copied to ``<path>.corrupt-<UTC timestamp>`` (mode 0600); then
    every record that decodes is written into a fresh, valid checkpoint (after a checksum
    mismatch the decodable records are kept; unparsable JSON leaves none). A file written by a
    newer release (higher version) is refused unless ``force``, since rewriting it as version
    1 could lose what that release recorded. A healthy file is left untouched.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        msg = f"checkpoint {path}: the file does not exist; there is nothing to repair"
        raise CheckpointError(msg) from None
    except OSError as exc:
        msg = f"checkpoint {path}: cannot be read: {exc}; fix its permissions and retry"
        raise CheckpointError(msg) from exc
    parsed = _parse(raw)
    if not parsed.problems:
        return RepairReport(path, False, None, list(parsed.records.values()), [], [])
    if parsed.version is not None and parsed.version > VERSION and not force:
        msg = (
            f"checkpoint {path}: version {parsed.version} was written by a newer dra-core "
            f"(this one reads version {VERSION}); run that release, or repair with --force "
            f"to rewrite it as version {VERSION} and drop what this release cannot read"
        )
        raise CheckpointError(msg)
    backup = _backup_path(path)
    try:
        atomic_write(backup, raw, FILE_MODE)
        encoded = {uid: encode_record(r) for uid, r in parsed.records.items()}
        atomic_write(path, _document(encoded), FILE_MODE)
    except OSError as exc:
        msg = f"checkpoint {path}: repair failed: {exc}; the file was not changed"
        raise CheckpointError(msg) from exc
    logger.warning(
        "repaired checkpoint {}: kept {} record(s), dropped {}, backup {}",
        path,
        len(parsed.records),
        parsed.dropped,
        backup,
    )
    return RepairReport(
        path=path,
        changed=True,
        backup=backup,
        kept=list(parsed.records.values()),
        dropped=parsed.dropped,
        problems=parsed.problems,
        parsed=parsed.structured,
    )
