"""The agent's view of the checkpoint file: records in memory, each change appended durably.

The file's format is `dra_core.checkpoint.fileformat`'s. A change costs one appended line and
one ``fdatasync``, whatever the number of claims recorded; the log is folded into a new
snapshot (an atomic replacement of the file) once it is longer than the snapshot and at least
`COMPACT_BYTES`, so the work of compacting is bounded by a constant per change too.

Several processes may use the file (two agent instances during a rolling update): every
change is made under an exclusive ``flock`` of the file, after reading what others appended,
and a compaction locks the new file before renaming it into place. Readers compare the file's
identity, size and modification time with what they last read; they read only the bytes
appended since, and reload the whole file when it was replaced. The descriptor a `Checkpoint`
keeps open pins the inode it read, so a replaced file is always seen as replaced.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

from loguru import logger

from dra_core.checkpoint import fileformat
from dra_core.checkpoint.codec import _Bad, _decode, encode_record
from dra_core.checkpoint.records import (
    _PHASES,
    DIR_MODE,
    FILE_MODE,
    CheckpointError,
    ClaimRecord,
    _damaged,
    current_boot_id,
)
from dra_core.fileio import atomic_write_locked, remove_stale_temps

__all__ = ("COMPACT_BYTES", "Checkpoint", "exclusive")

#: The log is compacted once it is longer than both this and the snapshot.
COMPACT_BYTES = 256 * 1024

_OPEN_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
_READ_CHUNK = 1 << 20


def _read_from(fd: int, offset: int) -> bytes:
    """The bytes of ``fd`` from ``offset`` to its end."""
    chunks: list[bytes] = []
    while True:
        chunk = os.pread(fd, _READ_CHUNK, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


def _disappeared(path: Path) -> CheckpointError:
    msg = (
        f"checkpoint {path}: the file disappeared while the agent was running; the prepared "
        f"claims it recorded are unknown now. Restore it from a backup or restart the agent, "
        f"which will create an empty one"
    )
    return CheckpointError(msg)


def _cannot_write(path: Path, exc: OSError) -> CheckpointError:
    msg = (
        f"checkpoint {path}: cannot write it: {exc}; check free space and permissions of "
        f"{path.parent} (the previous content is unchanged)"
    )
    return CheckpointError(msg)


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[int | None]:
    """Hold the exclusive ``flock`` of the checkpoint at ``path`` (None when it does not exist).

    Yields a read-only descriptor of the file that is current under the lock.
    """
    while True:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            yield None
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            mine = os.fstat(fd)
            with contextlib.suppress(FileNotFoundError):
                current = path.stat()
                if (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                    yield fd
                    return
        finally:
            os.close(fd)


class Checkpoint:
    """The checkpoint file of one agent: a thread-safe map from claim UID to `ClaimRecord`.

    Build it with `Checkpoint.open`. Reads are answered from memory after a ``stat`` that
    reads what another process appended or reloads a file it replaced; `put` and `remove`
    append one entry and flush it to disk before they return.
    """

    def __init__(self, path: Path, boot_id: str, fd: int, state: fileformat.State) -> None:
        self._path = path
        self._boot_id = boot_id
        self._lock = threading.RLock()
        self._fd = -1
        self._close: Callable[[], None] = lambda: None
        self._identity: tuple[int, int] = (0, 0)
        self._seen: tuple[int, int] = (-1, -1)
        self._state = state
        self._adopt(fd, state)

    # -- opening and reading -------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path, *, boot_id: str | None = None) -> Checkpoint:
        """Load the checkpoint at ``path``, creating an empty one (directory 0700) if absent.

        ``boot_id`` is this boot's ID (read from the kernel when None). Raises CheckpointError
        when the file is unreadable, corrupt or of an unknown version; it is never reset. A
        version 1 file (an earlier release's) is rewritten as version 2.
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
        loaded = cls._load(path)
        if loaded is None:
            empty = fileformat.snapshot_line({})
            try:
                fd = atomic_write_locked(path, empty, FILE_MODE, create=True)
            except FileExistsError:
                loaded = cls._load(path)  # another instance created it meanwhile
            except OSError as exc:
                raise _cannot_write(path, exc) from exc
            else:
                fcntl.flock(fd, fcntl.LOCK_UN)
                loaded = fd, fileformat.parse(empty)
                logger.info("created an empty checkpoint at {}", path)
            if loaded is None:
                raise _disappeared(path)
        fd, state = loaded
        with contextlib.suppress(OSError):
            if stat.S_IMODE(os.fstat(fd).st_mode) & ~FILE_MODE:
                os.fchmod(fd, FILE_MODE)
        resolved = current_boot_id() if boot_id is None else boot_id
        checkpoint = cls(path, resolved, fd, state)
        if not state.appendable:
            with checkpoint._lock, checkpoint._locked():
                if not checkpoint._state.appendable:
                    logger.info(
                        "converting checkpoint {} from version {} to {}",
                        path,
                        checkpoint._state.version,
                        fileformat.VERSION,
                    )
                    checkpoint._compact()
        return checkpoint

    @staticmethod
    def _load(path: Path) -> tuple[int, fileformat.State] | None:
        """Open and read the file at ``path``; None when there is none."""
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _damaged(path, f"cannot be read: {exc}") from exc
        try:
            state = fileformat.parse(_read_from(fd, 0))
        except OSError as exc:
            os.close(fd)
            raise _damaged(path, f"cannot be read: {exc}") from exc
        if state.problems:
            os.close(fd)
            raise _damaged(path, "; ".join(state.problems))
        return fd, state

    def _adopt(self, fd: int, state: fileformat.State) -> None:
        """Make ``fd`` (and what was read from it) the current file, closing the previous one."""
        info = os.fstat(fd)
        self._close()
        self._fd = fd
        self._close = weakref.finalize(self, os.close, fd)
        self._identity = (info.st_dev, info.st_ino)
        self._state = state
        # Only what was parsed counts as seen: a stat that differs makes the next read look.
        self._seen = (state.end + state.torn, info.st_mtime_ns)

    def _reload(self) -> None:
        loaded = self._load(self._path)
        if loaded is None:
            raise _disappeared(self._path)
        logger.debug("checkpoint {} was replaced on disk; reloaded", self._path)
        self._adopt(*loaded)

    def _catch_up(self, info: os.stat_result) -> None:
        """Apply what another process appended since we last read."""
        state = self._state
        if info.st_size < state.end:
            raise _damaged(
                self._path,
                f"the file shrank to {info.st_size} bytes below the {state.end} already read: "
                f"something other than dra-core cut acknowledged entries off",
            )
        try:
            raw = _read_from(self._fd, state.end)
        except OSError as exc:
            raise _damaged(self._path, f"cannot be read: {exc}") from exc
        fileformat.parse_entries(state, raw, state.end)
        if state.problems:
            raise _damaged(self._path, "; ".join(state.problems))
        self._seen = (info.st_size, info.st_mtime_ns)

    def _refresh(self) -> None:
        """Read what another process appended, or reload a file it replaced."""
        if self._state.problems:
            raise _damaged(self._path, "; ".join(self._state.problems))
        try:
            info = self._path.stat()
        except FileNotFoundError:
            raise _disappeared(self._path) from None
        if (info.st_dev, info.st_ino) != self._identity:
            self._reload()
        elif (info.st_size, info.st_mtime_ns) != self._seen or self._state.torn:
            # An incomplete last line is read again: it may have been completed (or cut off
            # and replaced) without the size changing.
            self._catch_up(info)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the file's ``flock``, with everything others wrote read (thread lock held)."""
        while True:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                info = self._path.stat()
            except FileNotFoundError:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                raise _disappeared(self._path) from None
            if (info.st_dev, info.st_ino) == self._identity:
                break
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            self._reload()
        try:
            if self._state.problems:
                raise _damaged(self._path, "; ".join(self._state.problems))
            if (info.st_size, info.st_mtime_ns) != self._seen or self._state.torn:
                self._catch_up(info)
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    # -- writing -------------------------------------------------------------------------------

    def _append(self, line: Callable[[int], bytes]) -> None:
        """Append entry ``line(seq)`` and flush it (file locked); CheckpointError on failure."""
        state = self._state
        if not state.appendable:
            self._compact()  # a version 1 file (or a snapshot over several lines) first
            state = self._state
        if state.torn:
            logger.warning(
                "checkpoint {}: cutting off {} byte(s) of an entry a crash cut short (never "
                "acknowledged)",
                self._path,
                state.torn,
            )
            try:
                os.ftruncate(self._fd, state.end)
            except OSError as exc:
                raise _cannot_write(self._path, exc) from exc
            state.torn = 0
            state.notes = []
        data = line(state.entries + 1)
        if not state.newline:
            data = b"\n" + data
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            os.fdatasync(self._fd)
        except OSError as exc:
            # Take back what may have reached the file; if even that fails, the next read
            # looks at the file again rather than trusting memory.
            self._seen = (-1, -1)
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, state.end)
            raise _cannot_write(self._path, exc) from exc
        state.entries += 1
        state.end += len(data)
        state.newline = True
        info = os.fstat(self._fd)
        self._seen = (info.st_size, info.st_mtime_ns)

    def _compact(self) -> None:
        """Replace the file with a snapshot of the records (file locked)."""
        data = fileformat.snapshot_line(self._state.canon)
        try:
            fd = atomic_write_locked(self._path, data, FILE_MODE)
        except OSError as exc:
            raise _cannot_write(self._path, exc) from exc
        state = fileformat.State(
            version=fileformat.VERSION,
            records=self._state.records,
            canon=self._state.canon,
            structured=True,
            snapshot_bytes=len(data),
            end=len(data),
            appendable=True,
        )
        # The old file's lock goes with its descriptor; the new one stays locked until the
        # caller's `_locked` releases it.
        self._adopt(fd, state)

    def _maybe_compact(self) -> None:
        state = self._state
        log = state.end - state.snapshot_bytes
        if log < COMPACT_BYTES or log < state.snapshot_bytes:
            return
        try:
            self._compact()
        except CheckpointError as exc:
            logger.warning("{}; the change itself is recorded, compaction is retried later", exc)

    def put(self, record: ClaimRecord) -> None:
        """Add or replace the record of ``record.uid`` durably."""
        uid = record.uid
        if record.phase not in _PHASES:
            msg = f"checkpoint {self._path}: claim {uid}: phase {record.phase!r} is not valid"
            raise CheckpointError(msg)
        try:
            canon = fileformat.canonical(encode_record(record))
        except (TypeError, ValueError) as exc:
            msg = (
                f"checkpoint {self._path}: claim {uid}: the record is not JSON-serialisable "
                f"({exc}); a backend's device state must hold only JSON values (objects with "
                f"string keys, arrays, strings, finite numbers, booleans, null)"
            )
            raise CheckpointError(msg) from exc
        try:
            # What a reload would give: readers see the same value before and after a restart.
            decoded = _decode(uid, json.loads(canon))
        except _Bad as exc:
            msg = (
                f"checkpoint {self._path}: claim {uid}: field {exc.where or '(record)'}: "
                f"{exc.problem}; the record was not written (a backend returned a value the "
                f"model does not allow)"
            )
            raise CheckpointError(msg) from None
        with self._lock, self._locked():
            self._append(lambda seq: fileformat.put_line(seq, uid, canon))
            self._state.put(uid, decoded, canon)
            self._maybe_compact()

    def remove(self, uid: str) -> None:
        """Forget claim ``uid`` durably; unknown UIDs are fine."""
        with self._lock:
            self._refresh()
            if uid not in self._state.canon:
                return
            with self._locked():
                if uid not in self._state.canon:
                    return
                self._append(lambda seq: fileformat.remove_line(seq, uid))
                self._state.remove(uid)
                self._maybe_compact()

    def compact(self) -> None:
        """Fold the log into a new snapshot now (it happens by itself as the log grows)."""
        with self._lock, self._locked():
            self._compact()

    def close(self) -> None:
        """Close the file; the object must not be used afterwards."""
        with self._lock:
            self._close()

    # -- reading -------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The checkpoint file."""
        return self._path

    @property
    def boot_id(self) -> str:
        """This boot's ID, to record in new records and compare with old ones."""
        return self._boot_id

    def records(self) -> dict[str, ClaimRecord]:
        """A copy of every record, by claim UID."""
        with self._lock:
            self._refresh()
            return dict(self._state.records)

    def get(self, uid: str) -> ClaimRecord | None:
        """The record of claim ``uid``, or None."""
        with self._lock:
            self._refresh()
            return self._state.records.get(uid)

    def from_previous_boot(self) -> dict[str, ClaimRecord]:
        """The records written before the current boot (their device state is gone)."""
        return {u: r for u, r in self.records().items() if r.boot_id != self._boot_id}

    def __len__(self) -> int:
        with self._lock:
            self._refresh()
            return len(self._state.records)

    def __repr__(self) -> str:
        return f"Checkpoint({str(self._path)!r})"
