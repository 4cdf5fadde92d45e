"""The checkpoint file's format: a snapshot line, then an append-only log of changes.

This module alone knows the bytes of the file; `store` (the agent's view) and `repair` (the
``dra-core checkpoint`` command) read and write it through the functions here.

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
  JSON, a checksum or number that does not match, an unknown field) is damage, reported with
  its line number; the agent refuses to start on it and ``dra-core checkpoint repair`` keeps
  what can be read.

Version 1, written by earlier releases, is the snapshot alone, indented over several lines. It
is read as it is and rewritten as version 2 when the agent opens it.

A record is ``{"phase", "bootId", "driver", "claim": {"namespace", "name", "uid"}, "devices":
[{"allocation": {"request", "pool", "device", "shareId", "consumedCapacity", "adminAccess"},
"edits": {"env", "deviceNodes", "mounts"}, "state": {...}}]}`` (`dra_core.checkpoint.codec`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dra_core import strictjson
from dra_core.checkpoint.codec import _Bad, _decode, _type_name
from dra_core.checkpoint.records import KIND, VERSION, ClaimRecord

__all__ = (
    "READS",
    "VERSION",
    "State",
    "canonical",
    "checksum",
    "parse",
    "parse_entries",
    "put_line",
    "remove_line",
    "snapshot_line",
)

#: The versions this release reads (it writes `VERSION`).
READS = (1, 2)

_TOP_LEVEL = frozenset({"kind", "version", "checksum", "data"})
_PUT_FIELDS = frozenset({"op", "record", "seq", "uid"})
_REMOVE_FIELDS = frozenset({"op", "seq", "uid"})
_FIELDS = {"put": _PUT_FIELDS, "remove": _REMOVE_FIELDS}
_TORN = "the file ends with an incomplete line of"


def canonical(value: object) -> str:
    """The canonical JSON of ``value``; TypeError or ValueError when it is not plain JSON."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def checksum(value: object) -> str:
    """``sha256:<hex>`` of the canonical JSON of ``value``."""
    return "sha256:" + hashlib.sha256(canonical(value).encode("utf-8")).hexdigest()


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
    ``dropped`` the UIDs whose record does not decode; ``notes`` what is worth telling but is
    not damage (an append cut short by a crash). ``end`` is the offset just after the last
    complete line, ``torn`` the bytes after it that are not a complete line yet, ``entries``
    the entries read, ``snapshot_bytes`` the length of the snapshot.
    """

    version: int | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    records: dict[str, ClaimRecord] = field(default_factory=dict)
    canon: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
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

    def put(self, uid: str, record: ClaimRecord, canon: str) -> None:
        self.records[uid] = record
        self.canon[uid] = canon
        if uid in self.dropped:
            self.dropped.remove(uid)

    def remove(self, uid: str) -> None:
        self.records.pop(uid, None)
        self.canon.pop(uid, None)
        if uid in self.dropped:
            self.dropped.remove(uid)

    def _drop(self, uid: str) -> None:
        self.records.pop(uid, None)
        self.canon.pop(uid, None)
        if uid not in self.dropped:
            self.dropped.append(uid)


def _loads(raw: bytes) -> Any:
    return strictjson.loads(raw.decode("utf-8"))


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
            state.put(uid, _decode(uid, raw_record), canonical(raw_record))
        except _Bad as exc:
            state.problems.append(f"claim {uid}: field {exc.where or '(record)'}: {exc.problem}")
            state._drop(uid)


def parse(raw: bytes) -> State:
    """Read a whole checkpoint file leniently: every problem listed, every decodable record kept."""
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
        else:
            state.problems.append(f"not valid JSON (truncated or overwritten?): {exc}")
        return state
    state.snapshot_bytes = state.end = len(raw)
    state.newline = raw.endswith(b"\n")
    _snapshot(state, doc)
    return state


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
    if entry.get("seq") != seq:
        state.problems.append(
            f"{where}: numbered {entry.get('seq')!r} instead of {seq}: an entry is missing, "
            f"repeated or out of order"
        )
        return
    uid, op = entry.get("uid"), entry.get("op")
    if not isinstance(uid, str):
        state.problems.append(f"{where}: uid is {uid!r}, not a string")
        return
    expected = _FIELDS.get(op) if isinstance(op, str) else None
    if expected is None:
        state.problems.append(f"{where}: claim {uid}: op is {op!r}, not 'put' or 'remove'")
        state._drop(uid)
        return
    if entry.keys() != expected:
        fields = ", ".join(sorted(str(k) for k in entry.keys() ^ expected))
        state.problems.append(f"{where}: claim {uid}: missing or unknown field(s) {fields}")
        state._drop(uid)
        return
    if op == "remove":
        state.remove(uid)
        return
    try:
        record = _decode(uid, entry["record"])
    except _Bad as exc:
        state.problems.append(
            f"{where}: claim {uid}: field {exc.where or '(record)'}: {exc.problem}"
        )
        state._drop(uid)
        return
    state.put(uid, record, canonical(entry["record"]))
