"""The checkpoint file's format: a snapshot line, then an append-only log of changes.

This module alone knows the file: its name, its lines and the JSON of its records; `store`
(the agent's view) and `repair` (the ``dra-core checkpoint`` command) read and write it through
the functions here.

Version 2, written by this release, is JSON Lines in UTF-8, every line canonical JSON (keys
sorted, no spaces, ``ensure_ascii=False``) ending with a newline::

    {"checksum":"sha256:<hex>","data":{"claims":{"<uid>":<record>,...}},"kind":"dra-core-checkpoint","version":2}
    {"checksum":"sha256:<hex>","op":"put","record":<record>,"seq":1,"uid":"<uid>"}
    {"checksum":"sha256:<hex>","op":"remove","seq":2,"uid":"<uid>"}

- The first line, the *snapshot*, is the whole state when it was written. Its checksum covers
  the canonical JSON of ``data``, as in version 1. It is only ever written whole, by an atomic
  replacement of the file (temp file, fsync, rename, fsync of the directory): when the file is
  created, when a version 1 file is converted, when the log is *compacted* into it, by repair.
- Every later line, an *entry*, is one change: ``put`` sets the record of a claim UID,
  ``remove`` forgets it. Its checksum covers the canonical JSON of the entry without the
  checksum; ``seq`` numbers the entries of the file from 1. An entry is appended with a single
  ``write`` and made durable with one ``fdatasync`` before the change is acknowledged.
- Reading applies the entries to the snapshot in order. A last line without its newline is an
  append that a crash cut short: it was never acknowledged, so it is ignored (and cut off
  before the next append). Anything else that does not verify (a complete line that is not
  JSON, a checksum or number that does not match, an unknown field, a record whose names
  break the API's rules) is damage, reported with its line number, claim and field; the agent
  refuses to start on it (one bad record makes the whole file invalid, as a checksum mismatch
  does: the agent never runs on a partial view of what is prepared) and ``dra-core
  checkpoint repair`` keeps what can be read.
- Reading is bounded: a file larger than `MAX_FILE_BYTES`, a line nested deeper than
  `MAX_DEPTH` or a number of more than `MAX_NUMBER_DIGITS` digits is damage, refused before
  the JSON decoder sees it. Writing keeps to the same bounds, so what is written can be read.
- A snapshot that is not valid JSON (a file cut short, or overwritten in the middle) is
  *salvaged*: every record that can still be read whole from its text (found by its claim
  UID key), and that decodes, is kept, and the log entries after the snapshot are applied as
  usual; the records cut off or damaged are listed with the reason. The agent still refuses
  such a file; `parse` gives ``repair`` what it keeps.

Version 1, written by earlier releases, is the snapshot alone, indented over several lines. It
is read as it is and rewritten as version 2 when the agent opens it.

A record is ``{"phase", "bootId", "driver", "claim": {"namespace", "name", "uid"}, "devices":
[{"allocation": {"request", "pool", "device", "shareId", "consumedCapacity", "adminAccess"},
"edits": {"env", "deviceNodes", "mounts"}, "state": {...}}], "claimEdits"?}``, where the
optional ``claimEdits`` (the claim's own edits, same form as ``edits``) is written only when
there are some.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from dra_core import strictjson
from dra_core.checkpoint.records import _PHASES, ClaimRecord
from dra_core.model import (
    LIMITS,
    AllocatedDevice,
    ClaimRef,
    ContainerEdits,
    DeviceNode,
    ModelError,
    Mount,
    PreparedClaim,
    PreparedDevice,
    is_dns_label,
    is_dns_subdomain,
    validate_claim_ref,
    validate_driver_name,
)

__all__ = (
    "FILE_NAME",
    "KIND",
    "MAX_DEPTH",
    "MAX_FILE_BYTES",
    "MAX_NUMBER_DIGITS",
    "NODE_TYPES",
    "READS",
    "RECORD_MAX_DEPTH",
    "VERSION",
    "RecordError",
    "State",
    "canonical",
    "checksum",
    "decode_record",
    "encode",
    "encode_record",
    "parse",
    "parse_entries",
    "put_line",
    "remove_line",
    "snapshot_line",
)

#: The file's name in the driver's plugin directory.
FILE_NAME = "checkpoint.json"
#: The ``kind`` of every checkpoint file.
KIND = "dra-core-checkpoint"
#: The version this release writes.
VERSION = 2
#: The versions this release reads (it writes `VERSION`).
READS = (1, 2)

#: The most bytes a checkpoint file may hold. The log is folded into the snapshot once it is
#: as long as the snapshot, so this allows about 8 MiB of records (thousands of claims) while
#: keeping what one read costs well inside the agent's memory limit.
MAX_FILE_BYTES = 16 * 1024 * 1024
#: How deeply one line of the file may nest (JSON objects and arrays).
MAX_DEPTH = 100
#: How many digits a number in the file may have.
MAX_NUMBER_DIGITS = 100
#: How deeply a record may nest: a snapshot holds its records three levels down.
RECORD_MAX_DEPTH = MAX_DEPTH - 3

#: The types of a device node in a record's edits: CDI's, and empty (taken from the host).
NODE_TYPES = ("c", "b", "u", "p", "")

_TOP_LEVEL = frozenset({"kind", "version", "checksum", "data"})
_PUT_FIELDS = frozenset({"op", "record", "seq", "uid"})
_REMOVE_FIELDS = frozenset({"op", "seq", "uid"})
_FIELDS = {"put": _PUT_FIELDS, "remove": _REMOVE_FIELDS}
_TORN = "the file ends with an incomplete line of"
_UUID = "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
# Where salvage looks for records: the claims object, then each "<claim UID>": key in it.
_CLAIMS_KEY = re.compile(r'"claims"\s*:\s*\{')
_UID_KEY = re.compile(rf'"({_UUID})"\s*:\s*')
_UID = re.compile(_UUID)
# Salvage finds where a record ends with it; `strictjson` then reads the record strictly.
_DECODER = json.JSONDecoder()
# Salvage scans at most this many times the damaged text (plus the slack, in characters).
_SALVAGE_PASSES = 8
_SALVAGE_SLACK = 1 << 20


# ---------------------------------------------------------------------------------------------
# Records: the JSON object of one claim record, decoded strictly
# ---------------------------------------------------------------------------------------------
#
# Decoding checks every field's type and, for the names that reach paths and API calls, the
# rules the API server enforces on them (`dra_core.model`): a record whose namespace is
# ``../../etc`` or whose device name is ``../../tmp/x`` could not have been written by the
# agent for a real claim, so it is refused as damage, naming the claim and the field.


def _encode_edits(e: ContainerEdits) -> dict[str, Any]:
    return {
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
    }


def _encode_device(device: PreparedDevice) -> dict[str, Any]:
    a = device.allocation
    return {
        "allocation": {
            "request": a.request,
            "pool": a.pool,
            "device": a.device,
            "shareId": a.share_id,
            "consumedCapacity": dict(a.consumed_capacity),
            "adminAccess": a.admin_access,
        },
        "edits": _encode_edits(device.edits),
        "state": dict(device.state),
    }


def encode_record(record: ClaimRecord) -> dict[str, Any]:
    """The JSON object of one record (see the module docstring for the layout)."""
    ref = record.claim.ref
    encoded = {
        "phase": record.phase,
        "bootId": record.boot_id,
        "driver": record.driver,
        "claim": {"namespace": ref.namespace, "name": ref.name, "uid": ref.uid},
        "devices": [_encode_device(d) for d in record.claim.devices],
    }
    # Only when there are some, so a record without them stays readable by older releases.
    if not record.claim.edits.empty:
        encoded["claimEdits"] = _encode_edits(record.claim.edits)
    return encoded


class RecordError(Exception):
    """A field of a record does not decode (or, written, would not): ``where`` is its path,
    ``problem`` what is wrong."""

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


def _object(
    value: object, where: str, required: Iterable[str], optional: Iterable[str] = ()
) -> dict[str, Any]:
    """A JSON object with the ``required`` keys, perhaps some ``optional`` ones, and no other."""
    if not isinstance(value, dict):
        raise RecordError(where, f"expected an object, got {_type_name(value)}")
    keys = set(required)
    missing = sorted(keys - value.keys())
    if missing:
        raise RecordError(where, f"missing field(s) {', '.join(missing)}")
    unknown = sorted(str(k) for k in value.keys() - keys - set(optional))
    if unknown:
        raise RecordError(where, f"unknown field(s) {', '.join(unknown)}")
    return cast(dict[str, Any], value)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _str(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise RecordError(_join(where, key), f"expected a string, got {_type_name(value)}")
    return value


def _opt_str(obj: dict[str, Any], key: str, where: str) -> str | None:
    value = obj[key]
    if value is not None and not isinstance(value, str):
        raise RecordError(_join(where, key), f"expected a string or null, got {_type_name(value)}")
    return value


def _opt_int(obj: dict[str, Any], key: str, where: str) -> int | None:
    value = obj[key]
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        msg = f"expected an integer or null, got {_type_name(value)}"
        raise RecordError(_join(where, key), msg)
    return value


def _bool(obj: dict[str, Any], key: str, where: str) -> bool:
    value = obj[key]
    if not isinstance(value, bool):
        raise RecordError(_join(where, key), f"expected a boolean, got {_type_name(value)}")
    return value


def _str_map(obj: dict[str, Any], key: str, where: str) -> dict[str, str]:
    value = obj[key]
    here = _join(where, key)
    if not isinstance(value, dict):
        raise RecordError(here, f"expected an object of strings, got {_type_name(value)}")
    for k, v in value.items():
        if not isinstance(v, str):
            item = f"{here}.{k}"
            raise RecordError(item, f"expected a string, got {_type_name(v)}")
    return dict(value)


def _list(obj: dict[str, Any], key: str, where: str) -> list[Any]:
    value = obj[key]
    if not isinstance(value, list):
        raise RecordError(_join(where, key), f"expected an array, got {_type_name(value)}")
    return value


_DNS_LABEL_RULE = "lower-case letters, digits and '-', at most 63 characters"


def _is_request_name(name: str) -> bool:
    """A request name, or ``<request>/<subrequest>`` (each a DNS label)."""
    parts = name.split("/")
    return len(parts) <= 2 and all(is_dns_label(part) for part in parts)


def _is_pool_name(name: str) -> bool:
    """DNS subdomains joined by '/', at most 253 characters (as the API server requires)."""
    return 0 < len(name) <= LIMITS.pool_name_length and all(
        is_dns_subdomain(part) for part in name.split("/")
    )


def _require(valid: bool, where: str, value: str, rule: str) -> None:
    if not valid:
        raise RecordError(where, f"{value!r} is not {rule}")


def _check_allocation(allocation: AllocatedDevice, where: str) -> None:
    _require(
        _is_request_name(allocation.request),
        f"{where}.request",
        allocation.request,
        f"a request name (a DNS label, or two joined by '/': {_DNS_LABEL_RULE})",
    )
    _require(
        _is_pool_name(allocation.pool),
        f"{where}.pool",
        allocation.pool,
        f"a pool name (DNS subdomains joined by '/', at most {LIMITS.pool_name_length} characters)",
    )
    _require(
        is_dns_label(allocation.device),
        f"{where}.device",
        allocation.device,
        f"a device name (a DNS label: {_DNS_LABEL_RULE})",
    )
    if allocation.share_id is not None:
        _require(
            is_dns_label(allocation.share_id),
            f"{where}.shareId",
            allocation.share_id,
            f"a share ID (a DNS label such as the UUID the scheduler assigns: {_DNS_LABEL_RULE})",
        )


def _check_claim(ref: ClaimRef) -> None:
    _require(
        is_dns_label(ref.namespace),
        "claim.namespace",
        ref.namespace,
        f"a namespace name (a DNS label: {_DNS_LABEL_RULE})",
    )
    _require(
        is_dns_subdomain(ref.name),
        "claim.name",
        ref.name,
        "a ResourceClaim name (a DNS subdomain: dot-separated DNS labels, at most 253 characters)",
    )
    try:
        validate_claim_ref(ref)  # namespace and name are fine: only the UID is left
    except ModelError as exc:
        raise RecordError("claim.uid", str(exc)) from None


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
    _check_allocation(allocation, here)
    edits = _decode_edits(obj["edits"], _join(where, "edits"))
    state = obj["state"]
    if not isinstance(state, dict):
        raise RecordError(_join(where, "state"), f"expected an object, got {_type_name(state)}")
    return PreparedDevice(allocation=allocation, edits=edits, state=state)


def _decode_edits(raw: object, here: str) -> ContainerEdits:
    e = _object(raw, here, ("env", "deviceNodes", "mounts"))
    nodes: list[DeviceNode] = []
    for i, item in enumerate(_list(e, "deviceNodes", here)):
        at = f"{here}.deviceNodes[{i}]"
        n = _object(item, at, ("path", "hostPath", "type", "major", "minor", "permissions"))
        node_type = _str(n, "type", at)
        if node_type not in NODE_TYPES:
            item = f"{at}.type"
            raise RecordError(item, f"{node_type!r} is not one of c, b, u, p or empty")
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
                raise RecordError(item, f"expected a string, got {_type_name(option)}")
        mounts.append(
            Mount(
                host_path=_str(m, "hostPath", at),
                container_path=_str(m, "containerPath", at),
                options=tuple(options),
                type=_opt_str(m, "type", at),
            )
        )
    return ContainerEdits(
        env=_str_map(e, "env", here), device_nodes=tuple(nodes), mounts=tuple(mounts)
    )


def _decode(uid: str, raw: object) -> ClaimRecord:
    obj = _object(raw, "", ("phase", "bootId", "driver", "claim", "devices"), ("claimEdits",))
    phase = _str(obj, "phase", "")
    if phase not in _PHASES:
        raise RecordError("phase", f"{phase!r} is not one of {', '.join(_PHASES)}")
    c = _object(obj["claim"], "claim", ("namespace", "name", "uid"))
    ref = ClaimRef(
        namespace=_str(c, "namespace", "claim"),
        name=_str(c, "name", "claim"),
        uid=_str(c, "uid", "claim"),
    )
    _check_claim(ref)
    if ref.uid != uid:
        raise RecordError("claim.uid", f"{ref.uid!r} differs from the record's key {uid!r}")
    driver = _str(obj, "driver", "")
    try:
        validate_driver_name(driver)
    except ModelError as exc:
        raise RecordError("driver", str(exc)) from None
    devices = tuple(
        _decode_device(d, f"devices[{i}]") for i, d in enumerate(_list(obj, "devices", ""))
    )
    edits = (
        _decode_edits(obj["claimEdits"], "claimEdits") if "claimEdits" in obj else ContainerEdits()
    )
    return ClaimRecord(
        claim=PreparedClaim(ref=ref, devices=devices, edits=edits),
        phase=phase,
        boot_id=_str(obj, "bootId", ""),
        driver=driver,
    )


def decode_record(uid: str, raw: object) -> ClaimRecord:
    """Decode one record strictly; ValueError names the claim UID, the field and the problem."""
    try:
        return _decode(uid, raw)
    except RecordError as exc:
        msg = f"claim {uid}: field {exc.where or '(record)'}: {exc.problem}"
        raise ValueError(msg) from None


_CANONICAL = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)


def canonical(value: object) -> str:
    """The canonical JSON of ``value``; TypeError or ValueError when it is not plain JSON."""
    return _CANONICAL.encode(value)


def checksum(value: object) -> str:
    """``sha256:<hex>`` of the canonical JSON of ``value``."""
    # A lone surrogate (a "\ud800" escape) cannot be UTF-8: hashed as it stands, it makes
    # the checksum differ instead of raising; the record holding it is refused on its own.
    text = canonical(value).encode("utf-8", "surrogatepass")
    return "sha256:" + hashlib.sha256(text).hexdigest()


def _shown(uid: str) -> str:
    """A claim UID for a message: as it is when it is a UUID, quoted when it is anything else."""
    return uid if _UID.fullmatch(uid) else repr(uid)


def _record_text(value: object) -> str:
    """The canonical JSON of a decoded record; RecordError when it is not valid UTF-8."""
    text = canonical(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        msg = "holds a string that is not valid Unicode (a lone surrogate)"
        raise RecordError("", msg) from None
    return text


def encode(record: ClaimRecord) -> tuple[str, ClaimRecord]:
    """The canonical JSON of ``record`` and the record a reload of that text gives.

    Readers see the same value before and after a restart. Raises ValueError (or TypeError)
    when the record is not plain JSON, is nested deeper than `RECORD_MAX_DEPTH` or has a
    longer number than the file allows, and RecordError when a field breaks the model's rules.
    """
    try:
        text = canonical(encode_record(record))
    except RecursionError:
        msg = "it is nested too deeply to encode (a cycle?)"
        raise ValueError(msg) from None
    raw = text.encode("utf-8")  # UnicodeEncodeError (a ValueError) for a lone surrogate
    strictjson.check_shape(raw, RECORD_MAX_DEPTH, MAX_NUMBER_DIGITS)
    return text, _decode(record.uid, strictjson.loads(raw))


def _string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _line(body: str) -> bytes:
    """The line of an object whose canonical JSON without its checksum is ``body``.

    ``checksum`` sorts before every other key, so the result is canonical JSON too.
    """
    digest = hashlib.sha256(body.encode("utf-8")).hexdigest()
    return f'{{"checksum":"sha256:{digest}",{body[1:]}\n'.encode()


def snapshot_line(records: Mapping[str, str]) -> bytes:
    """The snapshot of ``records`` (claim UID to the canonical JSON of its record)."""
    claims = ",".join(f"{_string(uid)}:{records[uid]}" for uid in sorted(records))
    data = f'{{"claims":{{{claims}}}}}'
    digest = hashlib.sha256(data.encode("utf-8")).hexdigest()
    text = (
        f'{{"checksum":"sha256:{digest}","data":{data},"kind":{_string(KIND)},'
        f'"version":{VERSION}}}\n'
    )
    return text.encode("utf-8")


def put_line(seq: int, uid: str, record: str) -> bytes:
    """Entry ``seq``: claim ``uid`` has the record whose canonical JSON is ``record``."""
    return _line(f'{{"op":"put","record":{record},"seq":{seq},"uid":{_string(uid)}}}')


def remove_line(seq: int, uid: str) -> bytes:
    """Entry ``seq``: claim ``uid`` has no record any more."""
    return _line(f'{{"op":"remove","seq":{seq},"uid":{_string(uid)}}}')


@dataclass
class State:
    """What a checkpoint file says, and where its reader stands in it.

    ``records`` are the records that decode and ``canon`` the canonical JSON of each (what a
    compaction writes); ``problems`` lists every damage found (empty: the agent loads it);
    ``reasons`` says why each record that does not decode was dropped (``dropped``); ``notes``
    what is worth telling but is not damage (an append cut short by a crash). ``end`` is the
    offset just after the last complete line, ``torn`` the bytes after it that are not a
    complete line yet, ``entries`` the entries read, ``snapshot_bytes`` the length of the
    snapshot.
    """

    version: int | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    records: dict[str, ClaimRecord] = field(default_factory=dict)
    canon: dict[str, str] = field(default_factory=dict)
    #: Why each record that does not decode was dropped, by claim UID, in file order.
    reasons: dict[str, str] = field(default_factory=dict)
    #: False when the content cannot be read as a checkpoint at all (no records to salvage).
    structured: bool = False
    entries: int = 0
    snapshot_bytes: int = 0
    end: int = 0
    torn: int = 0
    #: False when the content does not end with a newline (a snapshot written without one):
    #: the next entry must start with one.
    newline: bool = True
    #: True when entries may be appended: a version 2 snapshot on one line.
    appendable: bool = False
    #: The UIDs of the records holding each device (`PreparedClaim.held_devices`), in the
    #: order they took it: a prepare's check looks a device up here, not in every record.
    holders: dict[str, dict[str, None]] = field(default_factory=dict)

    def put(self, uid: str, record: ClaimRecord, canon: str) -> None:
        self._release(uid)
        self.records[uid] = record
        self.canon[uid] = canon
        for device in record.claim.held_devices:
            self.holders.setdefault(device, {})[uid] = None
        self._forget_drop(uid)

    def remove(self, uid: str) -> None:
        self._release(uid)
        self.records.pop(uid, None)
        self.canon.pop(uid, None)
        self._forget_drop(uid)

    def _release(self, uid: str) -> None:
        """Take ``uid`` off the holders of the devices its current record holds."""
        record = self.records.get(uid)
        if record is None:
            return
        for device in record.claim.held_devices:
            held = self.holders.get(device)
            if held is not None:
                held.pop(uid, None)
                if not held:
                    del self.holders[device]

    @property
    def dropped(self) -> list[str]:
        """The UIDs whose record does not decode, in file order."""
        return list(self.reasons)

    def _forget_drop(self, uid: str) -> None:
        self.reasons.pop(uid, None)

    def _drop(self, uid: str, reason: str) -> None:
        self._release(uid)
        self.records.pop(uid, None)
        self.canon.pop(uid, None)
        self.reasons[uid] = reason

    def _bad_record(self, uid: str, problem: str, where: str = "") -> None:
        """Drop ``uid``: "<where>: claim <uid>: <problem>" is the problem, the reason too."""
        prefix = f"{where}: " if where else ""
        self.problems.append(f"{prefix}claim {_shown(uid)}: {problem}")
        self._drop(uid, prefix + problem)


def _loads(raw: bytes) -> Any:
    """One line (or a version 1 document) decoded strictly, within the file's bounds."""
    strictjson.check_shape(raw, MAX_DEPTH, MAX_NUMBER_DIGITS)
    return strictjson.loads(raw.decode("utf-8"))


def _decode_record(uid: str, raw_record: object) -> tuple[ClaimRecord, str]:
    return _decode(uid, raw_record), _record_text(raw_record)


def _field_problem(exc: RecordError) -> str:
    return f"field {exc.where or '(record)'}: {exc.problem}"


def _snapshot(state: State, doc: object) -> None:
    """Read a snapshot document (either version) into ``state``."""
    if not isinstance(doc, dict):
        state.problems.append(f"the top level is {_type_name(doc)}, not an object")
        return
    if doc.get("kind") != KIND:
        state.problems.append(f"kind is {doc.get('kind')!r}, not {KIND!r}")
    version = doc.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        state.problems.append(f"version is {version!r}, not an integer")
    else:
        state.version = version
        if version not in READS:
            state.problems.append(
                f"version {version} is unknown to this dra-core, which reads versions "
                f"{READS[0]} to {READS[-1]}"
                + (" (written by a newer release?)" if version > VERSION else "")
            )
    unknown = sorted(str(k) for k in doc.keys() - _TOP_LEVEL)
    if unknown:
        state.problems.append(f"unknown top-level field(s) {', '.join(unknown)}")
    data = doc.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("claims"), dict):
        state.problems.append("data.claims is missing or not an object")
        return
    extra = sorted(str(k) for k in data.keys() - {"claims"})
    if extra:
        state.problems.append(f"unknown field(s) in data: {', '.join(extra)}")
    given = doc.get("checksum")
    if not isinstance(given, str):
        state.problems.append(f"checksum is {given!r}, not a string")
    elif given != checksum(data):
        state.problems.append(
            "checksum mismatch: the data was changed or partly overwritten after it was written"
        )
    state.structured = True
    for uid, raw_record in data["claims"].items():
        try:
            state.put(uid, *_decode_record(uid, raw_record))
        except RecordError as exc:
            state._bad_record(uid, _field_problem(exc))


def parse(raw: bytes, *, salvage: bool = True) -> State:
    """Read a whole checkpoint file leniently: every problem listed, every decodable record kept.

    Without ``salvage``, a snapshot that is not valid JSON is reported as such and nothing is
    searched for in its text (the agent refuses the file either way).
    """
    state = State()
    newline = raw.find(b"\n")
    first = raw if newline < 0 else raw[:newline]
    try:
        header = _loads(first)
    except (UnicodeDecodeError, ValueError):
        header = None
    if isinstance(header, dict):
        state.snapshot_bytes = state.end = len(first) if newline < 0 else newline + 1
        state.newline = newline >= 0
        _snapshot(state, header)
        state.appendable = state.version == VERSION
        if state.structured and newline >= 0:
            parse_entries(state, raw[newline + 1 :], newline + 1)
            if state.entries and state.version != VERSION:
                state.problems.append(
                    f"the version {state.version} snapshot is followed by entries, which only "
                    f"version {VERSION} has"
                )
        return state
    # Not a snapshot on one line: a version 1 document over several lines, or damage.
    try:
        doc = _loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        if not raw.strip():
            state.problems.append("the file is empty (truncated?)")
        elif salvage:
            _salvage(state, raw, exc)
        else:
            state.problems.append(f"not valid JSON (truncated or overwritten?): {exc}")
        return state
    state.snapshot_bytes = state.end = len(raw)
    state.newline = raw.endswith(b"\n")
    _snapshot(state, doc)
    return state


def _salvage(state: State, raw: bytes, error: Exception) -> None:
    """Keep what can be read of a file whose snapshot is not valid JSON."""
    newline = raw.find(b"\n")
    # A version 1 document opens with "{" on a line of its own; anything else is read as a
    # (damaged) version 2 snapshot line followed by log entries.
    whole = newline < 0 or raw[:newline].strip() == b"{"
    where = "the file" if whole else "the snapshot (line 1)"
    state.problems.append(f"{where} is not valid JSON (truncated or overwritten?): {error}")
    found = _salvage_records(state, raw if whole else raw[:newline])
    state.structured = found is not None
    if found:
        state.problems.append(
            f"{found} record(s) were read back from the damaged snapshot, whose checksum "
            f"cannot be verified; check them against the claims prepared on the node"
        )
    if not whole:
        state.snapshot_bytes = state.end = newline + 1
        parse_entries(state, raw[newline + 1 :], newline + 1)
        state.structured = state.structured or bool(state.records)


class _Budget:
    """The bytes salvage may still scan: a few times the text, so that no text, however
    irregular, makes it slower than reading the file a few times."""

    def __init__(self, text: str) -> None:
        self.left = _SALVAGE_PASSES * len(text) + _SALVAGE_SLACK

    def spend(self, size: int) -> bool:
        self.left -= size
        return self.left >= 0


def _salvage_records(state: State, raw: bytes) -> int | None:
    """Read every whole record of the snapshot text ``raw``; None when it has no claims."""
    # Bytes that are not UTF-8 stay visible (as surrogates) in what is read, so a record
    # holding them is refused rather than changed.
    text = raw.decode("utf-8", "surrogateescape")
    claims = _CLAIMS_KEY.search(text)
    if claims is None:
        return None
    keys = list(_UID_KEY.finditer(text, claims.end()))
    starts = [key.start() for key in keys]
    budget = _Budget(text)
    kept = 0
    read_to = claims.end()
    for index, key in enumerate(keys):
        if key.start() < read_to:
            continue  # inside a record already read (a UUID key in a device's state)
        uid = key.group(1)
        try:
            value, end = _salvage_value(text, starts, index, key.end(), budget)
        except _Unreadable as exc:
            if exc.budget_spent:
                state.problems.append(
                    f"salvage stopped at character {key.start()} of the snapshot: its text is "
                    f"too irregular to search further; records after it were not read"
                )
                break
            state._bad_record(uid, str(exc))
            continue
        read_to = end
        try:
            state.put(uid, *_decode_record(uid, value))
        except RecordError as exc:
            state._bad_record(uid, _field_problem(exc))
            continue
        kept += 1
    return kept


class _Unreadable(Exception):
    """A record salvage cannot read; ``budget_spent`` when it gave up searching instead."""

    def __init__(self, problem: str, *, budget_spent: bool = False) -> None:
        super().__init__(problem)
        self.budget_spent = budget_spent


def _salvage_value(
    text: str, starts: list[int], index: int, start: int, budget: _Budget
) -> tuple[object, int]:
    """The record at ``start`` (just after key ``index``) and where it ends.

    The record is read up to the next claim key; when the text stops there mid-record (a UUID
    key inside the record), it is read on, each time at least twice as far, so that a record
    costs a few times its length to find.
    """
    cut_off = "its record is cut off (the snapshot's text ends inside it)"
    following = index + 1
    while True:
        stop = starts[following] if following < len(starts) else len(text)
        chunk = text[start:stop]
        if not budget.spend(2 * len(chunk)):
            raise _Unreadable("salvage budget spent", budget_spent=True)
        try:
            strictjson.check_shape(
                chunk.encode("utf-8", "surrogateescape"), RECORD_MAX_DEPTH, MAX_NUMBER_DIGITS
            )
        except strictjson.JsonLimitError as exc:
            msg = f"its record cannot be read: {exc}"
            raise _Unreadable(msg) from None
        try:
            _, used = _DECODER.raw_decode(chunk)
        except json.JSONDecodeError as exc:
            at_end = exc.pos >= len(chunk.rstrip())
            if stop == len(text) and (at_end or exc.msg.startswith("Unterminated")):
                raise _Unreadable(cut_off) from None
            if not at_end:
                msg = f"its record is not valid JSON ({exc.msg})"
                raise _Unreadable(msg) from None
            # Stopped at a UUID key inside the record: read on, at least twice as far.
            following = bisect.bisect_left(starts, start + 2 * len(chunk), following + 1)
            continue
        try:
            value = strictjson.loads(chunk[:used])
        except ValueError as exc:
            msg = f"its record is not valid JSON ({exc})"
            raise _Unreadable(msg) from None
        return value, start + used


def parse_entries(state: State, raw: bytes, offset: int) -> None:
    """Apply the entries in ``raw`` (the file's bytes from ``offset``, just after ``state.end``).

    Every complete line is read; an incomplete last line is left unread (``state.torn``).
    """
    pos = 0
    while pos < len(raw):
        newline = raw.find(b"\n", pos)
        if newline < 0:
            break
        state.entries += 1
        _entry(state, raw[pos:newline], state.entries)
        pos = newline + 1
        state.end = offset + pos
        state.newline = True
    state.torn = len(raw) - pos
    state.notes = [n for n in state.notes if not n.startswith(_TORN)]
    if state.torn:
        state.notes.append(
            f"{_TORN} {state.torn} byte(s), an entry a crash cut short; it was never "
            f"acknowledged and is ignored"
        )


def _entry(state: State, raw: bytes, seq: int) -> None:
    where = f"entry {seq} (line {seq + 1})"
    try:
        entry = _loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        state.problems.append(f"{where}: not valid JSON: {exc}; the claim it changed is unknown")
        return
    if not isinstance(entry, dict):
        state.problems.append(f"{where}: {_type_name(entry)}, not an object")
        return
    given = entry.pop("checksum", None)
    if given != checksum(entry):
        state.problems.append(
            f"{where}: checksum mismatch: the entry was changed or partly overwritten after "
            f"it was written; the claim it changed is unknown"
        )
        return
    number = entry.get("seq")
    if type(number) is not int or number != seq:
        state.problems.append(
            f"{where}: numbered {number!r} instead of {seq}: an entry is missing, "
            f"repeated or out of order"
        )
        return
    uid, op = entry.get("uid"), entry.get("op")
    if not isinstance(uid, str):
        state.problems.append(f"{where}: uid is {uid!r}, not a string")
        return
    expected = _FIELDS.get(op) if isinstance(op, str) else None
    if expected is None:
        state._bad_record(uid, f"op is {op!r}, not 'put' or 'remove'", where)
        return
    if entry.keys() != expected:
        fields = ", ".join(sorted(str(k) for k in entry.keys() ^ expected))
        state._bad_record(uid, f"missing or unknown field(s) {fields}", where)
        return
    if op == "remove":
        state.remove(uid)
        return
    try:
        state.put(uid, *_decode_record(uid, entry["record"]))
    except RecordError as exc:
        state._bad_record(uid, _field_problem(exc), where)
