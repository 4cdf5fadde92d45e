"""The agent's view of the checkpoint file: records in memory, each change appended durably.

The file's format is `dra_core.checkpoint.fileformat`'s. A change costs one appended line and
one ``fdatasync``, whatever the number of claims recorded; the log is folded into a new
snapshot (an atomic replacement of the file) once it is longer than the snapshot and at least
`COMPACT_BYTES`, so the work of compacting is bounded by a constant per change too.

Changes made one after the other may share a flush: `put` and `remove` with ``durable=False``
append without flushing, and `flush` makes every change appended so far durable with one
``fdatasync`` (the caller flushes before it acts on them: before the backend touches a device,
before it answers the kubelet). Until then the change is only in the page cache, which a
killed process does not lose; only a power cut could. `flush` also flushes what another process
appended, since this one cannot know whether that process has flushed it yet.

Several processes may use the file (two agent instances during a rolling update): every
change is made under an exclusive ``flock`` of the file, after reading what others appended,
and a compaction locks the new file before renaming it into place. Readers compare the file's
identity, size and modification time with what they last read; they read only the bytes
appended since, and reload the whole file when it was replaced. The descriptor a `Checkpoint`
keeps open pins the inode it read, so a replaced file is always seen as replaced.

What is read is bounded: the checkpoint must be a regular file (a FIFO or a device is refused
before it is read) of at most `fileformat.MAX_FILE_BYTES`, and a change that would make it
larger is refused. The directory is created 0700 whatever the umask, and the temp files a
crash left beside the checkpoint are removed when it is opened, under its lock (no other
instance can be writing one then).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

from dra_core.checkpoint import fileformat
from dra_core.checkpoint.records import (
    _PHASES,
    DIR_MODE,
    FILE_MODE,
    CheckpointError,
    ClaimRecord,
    _damaged,
    current_boot_id,
)
from dra_core.fileio import atomic_write_locked, make_directories, remove_stale_temps
from dra_core.lazylog import logger

__all__ = ("COMPACT_BYTES", "Checkpoint", "exclusive", "read_bounded")

#: The log is compacted once it is longer than both this and the snapshot: the file stays
#: within twice the snapshot or the snapshot and 64 KiB (about 50 prepares and unprepares),
#: and a compaction (one rewrite, two flushes) comes at most every 64 KiB of changes.
COMPACT_BYTES = 64 * 1024

# O_NONBLOCK: opening a FIFO put in the checkpoint's place must not wait for a writer.
_OPEN_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | os.O_NONBLOCK
_READ_CHUNK = 1 << 20
_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _read_from(fd: int, offset: int, limit: int) -> bytes:
    """The bytes of ``fd`` from ``offset`` to its end, or the first ``limit`` of them."""
    chunks: list[bytes] = []
    while limit > 0:
        chunk = os.pread(fd, min(_READ_CHUNK, limit), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
        limit -= len(chunk)
    return b"".join(chunks)


def _check_regular(fd: int, path: Path) -> None:
    """CheckpointError when ``fd`` is not a regular file (reading a FIFO or device never ends)."""
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode):
        return
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
    msg = (
        f"checkpoint {path}: is {kind}, not a regular file, so it holds no records; remove it "
        f"(the agent then creates an empty checkpoint) or choose another plugin data directory"
    )
    raise CheckpointError(msg)


def read_bounded(fd: int, path: Path) -> tuple[bytes, int]:
    """The first `fileformat.MAX_FILE_BYTES` bytes of the checkpoint open as ``fd``, and
    the file's size (larger than what was read when the file is over the limit).

    CheckpointError when it is not a regular file; OSError when it cannot be read.
    """
    _check_regular(fd, path)
    os.set_blocking(fd, True)
    data = _read_from(fd, 0, fileformat.MAX_FILE_BYTES + 1)
    size = max(len(data), os.fstat(fd).st_size)
    return data[: fileformat.MAX_FILE_BYTES], size


#: How many problems an error message lists (inspect lists them all).
_PROBLEMS_SHOWN = 5


def _summary(problems: list[str]) -> str:
    """The first problems found, and how many more there are."""
    shown = "; ".join(problems[:_PROBLEMS_SHOWN])
    more = len(problems) - _PROBLEMS_SHOWN
    return shown + (f"; and {more} more problem(s)" if more > 0 else "")


def _too_large(size: int) -> str:
    return (
        f"the file is {size} bytes, more than the {fileformat.MAX_FILE_BYTES} a checkpoint may "
        f"hold (dra-core compacts it long before): something else wrote to it"
    )


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
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
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
        #: Whether changes in the file may not be on disk yet (see `flush`).
        self._unflushed = True
        self._adopt(fd, state)

    # -- opening and reading -------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path, *, boot_id: str | None = None) -> Checkpoint:
        """Load the checkpoint at ``path``, creating an empty one (directory 0700) if absent.

        ``boot_id`` is this boot's ID (read from the kernel when None). Raises CheckpointError
        when the file is unreadable, corrupt, too large, not a regular file or of an unknown
        version; it is never reset. A version 1 file (an earlier release's) is rewritten as
        version 2. Temp files a crash left beside it are removed.
        """
        path = Path(path)
        try:
            make_directories(path.parent, DIR_MODE)
        except OSError as exc:
            msg = (
                f"checkpoint {path}: cannot create the directory {path.parent}: {exc}; "
                f"create it (mode 0700) or choose another plugin data directory"
            )
            raise CheckpointError(msg) from exc
        loaded = cls._load(path)
        if loaded is None:
            empty = fileformat.snapshot_line({})
            try:
                fd = atomic_write_locked(path, empty, FILE_MODE, create=True)
            except (FileExistsError, FileNotFoundError):
                # Another instance created it meanwhile (and may have removed our temp file
                # as a crash's leftover).
                loaded = cls._load(path)
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
        with checkpoint._lock, checkpoint._locked():
            checkpoint._remove_crash_leftovers()
            if not checkpoint._state.appendable:
                logger.info(
                    "converting checkpoint {} from version {} to {}",
                    path,
                    checkpoint._state.version,
                    fileformat.VERSION,
                )
                checkpoint._compact()
        return checkpoint

    def _remove_crash_leftovers(self) -> None:
        """Delete the temp files of this checkpoint (and of its repair backups) in its directory.

        Called with the file locked: every writer of those temps (a compaction, a repair)
        holds the lock, so any temp there now was left by a process that died mid-write.
        """
        name = self._path.name

        def ours(target: str) -> bool:
            return target == name or target.startswith(f"{name}.corrupt-")

        try:
            # Whatever their age: under the lock none can be a write in flight.
            removed = remove_stale_temps(self._path.parent, ours, older_than=float("-inf"))
        except OSError as exc:
            logger.warning(
                "checkpoint {}: cannot remove temp files left by a crash: {}", self._path, exc
            )
            return
        for temp in removed:
            logger.info(
                "removed {}, left by a crash while checkpoint {} was written", temp, self._path
            )

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
            raw, size = read_bounded(fd, path)
            if size > fileformat.MAX_FILE_BYTES:
                raise _damaged(path, _too_large(size))
            state = fileformat.parse(raw, salvage=False)  # refused either way: inspect tells
            if state.problems:
                raise _damaged(path, _summary(state.problems))
        except OSError as exc:
            os.close(fd)
            raise _damaged(path, f"cannot be read: {exc}") from exc
        except CheckpointError:
            os.close(fd)
            raise
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
        # Whoever wrote what was read (a process that died, another instance) may not have
        # flushed all of it.
        self._unflushed = True

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
        if info.st_size > fileformat.MAX_FILE_BYTES:
            raise _damaged(self._path, _too_large(info.st_size))
        try:
            raw = _read_from(self._fd, state.end, fileformat.MAX_FILE_BYTES + 1 - state.end)
        except OSError as exc:
            raise _damaged(self._path, f"cannot be read: {exc}") from exc
        if state.end + len(raw) > fileformat.MAX_FILE_BYTES:
            raise _damaged(self._path, _too_large(state.end + len(raw)))
        fileformat.parse_entries(state, raw, state.end)
        if state.problems:
            raise _damaged(self._path, _summary(state.problems))
        self._seen = (info.st_size, info.st_mtime_ns)
        self._unflushed = True  # another process appended: it may not have flushed yet

    def _refresh(self) -> None:
        """Read what another process appended, or reload a file it replaced."""
        if self._state.problems:
            raise _damaged(self._path, _summary(self._state.problems))
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
                raise _damaged(self._path, _summary(self._state.problems))
            if (info.st_size, info.st_mtime_ns) != self._seen or self._state.torn:
                self._catch_up(info)
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    # -- writing -------------------------------------------------------------------------------

    def _append(self, line: Callable[[int], bytes], *, durable: bool = True) -> None:
        """Append entry ``line(seq)`` and, when ``durable``, flush it (file locked);
        CheckpointError on failure."""
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
        if state.end + len(data) > fileformat.MAX_FILE_BYTES:
            # Fold the log first; only records that fill the whole file are refused.
            self._compact()
            state = self._state
            if state.end + len(data) > fileformat.MAX_FILE_BYTES:
                msg = (
                    f"checkpoint {self._path}: the change ({len(data)} bytes) would make the "
                    f"file larger than the {fileformat.MAX_FILE_BYTES} bytes a checkpoint may "
                    f"hold ({state.end} bytes of records already); it was not made"
                )
                raise CheckpointError(msg)
            data = line(state.entries + 1)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            if durable:
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
        # A flush covers every change before it, this process's and others'.
        self._unflushed = not durable

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
            holders=self._state.holders,
            structured=True,
            snapshot_bytes=len(data),
            end=len(data),
            appendable=True,
        )
        # The old file's lock goes with its descriptor; the new one stays locked until the
        # caller's `_locked` releases it. The snapshot was flushed: everything is on disk.
        self._adopt(fd, state)
        self._unflushed = False

    def _maybe_compact(self) -> None:
        state = self._state
        log = state.end - state.snapshot_bytes
        if log < COMPACT_BYTES or log < state.snapshot_bytes:
            return
        try:
            self._compact()
        except CheckpointError as exc:
            logger.warning("{}; the change itself is recorded, compaction is retried later", exc)

    def put(self, record: ClaimRecord, *, durable: bool = True) -> None:
        """Add or replace the record of ``record.uid``: durably, or with ``durable=False``
        appended to the file but on disk only after the next `flush`."""
        uid = record.uid
        if record.phase not in _PHASES:
            msg = f"checkpoint {self._path}: claim {uid}: phase {record.phase!r} is not valid"
            raise CheckpointError(msg)
        try:
            # Kept as a reload would give it: the same value before and after a restart.
            canon, decoded = fileformat.encode(record)
        except fileformat.RecordError as exc:
            msg = (
                f"checkpoint {self._path}: claim {uid}: field {exc.where or '(record)'}: "
                f"{exc.problem}; the record was not written (a name or value the model does "
                f"not allow)"
            )
            raise CheckpointError(msg) from None
        except (TypeError, ValueError) as exc:
            msg = (
                f"checkpoint {self._path}: claim {uid}: the record cannot be written as JSON "
                f"({exc}); a backend's device state must hold only JSON values (objects with "
                f"string keys, arrays, strings, finite numbers, booleans, null), nested at "
                f"most {fileformat.RECORD_MAX_DEPTH - 3} levels deep, with numbers of at most "
                f"{fileformat.MAX_NUMBER_DIGITS} digits"
            )
            raise CheckpointError(msg) from exc
        with self._lock, self._locked():
            self._append(lambda seq: fileformat.put_line(seq, uid, canon), durable=durable)
            self._state.put(uid, decoded, canon)
            self._maybe_compact()

    def remove(self, uid: str, *, durable: bool = True) -> None:
        """Forget claim ``uid`` (durably, or at the next `flush` as for `put`); unknown UIDs
        are fine."""
        with self._lock:
            self._refresh()
            if uid not in self._state.canon:
                return
            with self._locked():
                if uid not in self._state.canon:
                    return
                self._append(lambda seq: fileformat.remove_line(seq, uid), durable=durable)
                self._state.remove(uid)
                self._maybe_compact()

    def flush(self) -> None:
        """Make every change in the file durable (one ``fdatasync``; none when all are).

        CheckpointError when the flush fails: the changes since the last flush may or may not
        be on disk, so the caller must not act on them (it undoes them or fails).
        """
        with self._lock:
            if not self._unflushed:
                return
            try:
                os.fdatasync(self._fd)
            except OSError as exc:
                msg = (
                    f"checkpoint {self._path}: cannot flush it to disk: {exc}; check the disk "
                    f"holding {self._path.parent} (the last changes may be lost on a power cut)"
                )
                raise CheckpointError(msg) from exc
            self._unflushed = False

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

    def holding(self, device: str) -> list[ClaimRecord]:
        """The records of the claims holding ``device`` (see `PreparedClaim.held_devices`)."""
        with self._lock:
            self._refresh()
            state = self._state
            return [state.records[uid] for uid in state.holders.get(device, ())]

    def from_previous_boot(self) -> dict[str, ClaimRecord]:
        """The records written before the current boot (their device state is gone)."""
        return {u: r for u, r in self.records().items() if r.boot_id != self._boot_id}

    def __len__(self) -> int:
        with self._lock:
            self._refresh()
            return len(self._state.records)

    def __repr__(self) -> str:
        return f"Checkpoint({str(self._path)!r})"
