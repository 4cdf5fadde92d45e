"""The checkpoint file: checksummed, atomically rewritten, reloaded when replaced."""

from __future__ import annotations

import contextlib
import hashlib
import json
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

from dra_core.checkpoint.codec import _Bad, _decode, _type_name, encode_record
from dra_core.checkpoint.records import (
    _PHASES,
    DIR_MODE,
    FILE_MODE,
    KIND,
    VERSION,
    CheckpointError,
    ClaimRecord,
    _damaged,
    current_boot_id,
)
from dra_core.fileio import atomic_write, remove_stale_temps

__all__ = ("Checkpoint",)

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
