"""Durable file replacement and removal, shared by the checkpoint and the CDI spec writer.

`atomic_write` gives readers either the old content or the new, never a torn file, and makes
the new content survive a power cut once it returns: the data goes to a temp file in the same
directory, is flushed to disk, given its mode, renamed over the target, and the directory entry
is flushed too (``durable=False`` skips both flushes, for files that can be rebuilt: the
replacement is still atomic for readers). `atomic_write_locked` does the same and hands back the
new file open, under an exclusive ``flock`` taken before it was renamed into place, so that
the first holder of the new file is its writer. `remove_durably` is the matching delete.

Temp files are named ``.<name>.<random>.tmp`` so that a crash between write and rename leaves
something recognisable (hidden, and without the ``.json`` suffix that CDI runtimes load);
`temp_target` and `is_temp_for` let owners collect their own leftovers.

`read_regular_file` (and `read_regular_text`) read a file the reader does not own (a
configuration file, a sysfs attribute) with two bounds: anything but a regular file (a FIFO, a
device, a socket, a directory) is refused before it is opened, so a read can neither block
forever nor run without end, and at most ``limit`` bytes are read. Sysfs attributes and procfs
files are regular files whose reported size (4096, 0) says nothing of their content, so the
size is found by reading, never from ``stat``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

__all__ = (
    "TEMP_SUFFIX",
    "BoundedReadError",
    "FileTooLargeError",
    "NotARegularFileError",
    "atomic_write",
    "atomic_write_locked",
    "fsync_directory",
    "is_temp_for",
    "make_directories",
    "read_regular_file",
    "read_regular_text",
    "remove_durably",
    "remove_stale_temps",
    "temp_target",
)

#: The suffix of every temp file `atomic_write` creates.
TEMP_SUFFIX = ".tmp"


def _temp_name(target: Path) -> str:
    # os.urandom, as secrets.token_hex does, without importing secrets (and OpenSSL) at start
    return f".{target.name}.{os.urandom(8).hex()}{TEMP_SUFFIX}"


def temp_target(candidate: str) -> str | None:
    """The target file name when ``candidate`` is a temp name `atomic_write` makes, else None."""
    if not (candidate.startswith(".") and candidate.endswith(TEMP_SUFFIX)):
        return None
    stem = candidate[1 : -len(TEMP_SUFFIX)]
    target, dot, token = stem.rpartition(".")
    if not dot or not target or len(token) != 16:
        return None
    if not all(c in "0123456789abcdef" for c in token):
        return None
    return target


def is_temp_for(candidate: str, target_name: str) -> bool:
    """True when ``candidate`` is a temp file name `atomic_write` makes for ``target_name``."""
    return temp_target(candidate) == target_name


def fsync_directory(directory: Path) -> None:
    """Flush a directory's entries (a rename or unlink in it) to disk."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(
    path: Path, data: bytes, mode: int, *, durable: bool, keep: bool, create: bool = False
) -> int | None:
    path = Path(path)
    directory = path.parent
    temp = directory / _temp_name(path)
    access = os.O_RDWR | os.O_APPEND if keep else os.O_WRONLY
    fd = os.open(temp, access | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    is_open = True
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        if durable:
            os.fsync(fd)
        os.fchmod(fd, mode)
        if keep:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            is_open = False
            os.close(fd)
        if create:
            os.link(temp, path)  # FileExistsError when someone else created it
            temp.unlink()
        else:
            temp.replace(path)
        if durable:
            fsync_directory(directory)
    except BaseException:
        if is_open:
            os.close(fd)
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    return fd if keep else None


def atomic_write(path: Path, data: bytes, mode: int, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically and durably, with permission bits ``mode``.

    The directory must exist. On any failure the temp file is removed, ``path`` keeps its old
    content, and the original exception propagates. With ``durable=False`` nothing is flushed:
    readers still see the old content or the new, but a power cut may lose the change.
    """
    _replace(path, data, mode, durable=durable, keep=False)


def atomic_write_locked(path: Path, data: bytes, mode: int, *, create: bool = False) -> int:
    """`atomic_write` (durable), returning the new file's descriptor (read-write, append).

    The descriptor holds an exclusive ``flock`` on the new file, taken before the rename, so
    no other process can lock the new file before the caller releases it (or closes the
    descriptor, which the caller owns). With ``create``, ``path`` must not exist: the file is
    linked into place instead of renamed, and FileExistsError says someone else created it.
    """
    fd = _replace(path, data, mode, durable=True, keep=True, create=create)
    assert fd is not None
    return fd


def make_directories(path: Path, mode: int) -> list[Path]:
    """Create directory ``path`` and its missing parents, each with exactly ``mode``.

    ``mkdir``'s mode is masked by the process umask (under umask 000 a plain ``mkdir -p``
    leaves 0777 directories), so each level created here is given ``mode`` with ``fchmod``
    right after; until then it is at most as open as ``mode``. Directories that exist already
    are left as they are: they may be the kubelet's. Returns the directories created,
    outermost first; FileExistsError when something that is not a directory is in the way.
    """
    path = Path(path)
    missing: list[Path] = []
    level = path
    while not level.is_dir() and level.parent != level:
        missing.append(level)
        level = level.parent
    created: list[Path] = []
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=mode)
        except FileExistsError:
            if directory.is_dir():
                continue  # another process created it meanwhile: its mode is its own
            raise
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        created.append(directory)
    return created


def remove_stale_temps(
    directory: Path, owns: Callable[[str], bool], older_than: float = 60.0
) -> list[Path]:
    """Delete temp files `atomic_write` left in ``directory`` (a crash between write and rename).

    Only temps whose target name ``owns`` accepts and that were last modified more than
    ``older_than`` seconds ago are removed, so a write in flight in another process survives.
    Returns the removed paths; a missing directory has none.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return removed
    deadline = time.time() - older_than
    for entry in entries:
        target = temp_target(entry.name)
        if target is None or not owns(target):
            continue
        try:
            if not entry.is_file(follow_symlinks=False) or entry.stat().st_mtime > deadline:
                continue
            Path(entry.path).unlink()
        except FileNotFoundError:
            continue
        removed.append(Path(entry.path))
    if removed:
        fsync_directory(Path(directory))
    return removed


def remove_durably(path: Path) -> bool:
    """Delete ``path`` and flush its directory; False when it did not exist."""
    path = Path(path)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    fsync_directory(path.parent)
    return True


class BoundedReadError(OSError):
    """`read_regular_file` refused a file; ``str()`` is ``<path>: <problem>``.

    An ``OSError`` (``strerror`` is the problem, ``filename`` the path), so callers that
    report unreadable files already report these too.
    """

    def __init__(self, path: Path | str, problem: str, code: int) -> None:
        super().__init__(code, problem, str(path))
        self.path = Path(path)
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


class NotARegularFileError(BoundedReadError):
    """The path is a FIFO, a device, a socket or a directory, not a regular file."""


class FileTooLargeError(BoundedReadError):
    """The file holds more than the most the caller reads from it."""


_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)", "reading it could block forever"),
    (stat.S_ISCHR, "a character device", "reading it could block forever or never end"),
    (stat.S_ISBLK, "a block device", "it could be a whole disk"),
    (stat.S_ISSOCK, "a socket", "it cannot be read as a file"),
    (stat.S_ISDIR, "a directory", "it cannot be read as a file"),
)

#: The most read at once: larger files are read in pieces of this size, up to the limit.
_CHUNK = 1 << 20


def _refuse_unless_regular(path: Path | str, mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    kind, why = "not a regular file", "only regular files are read"
    for test, name, reason in _KINDS:
        if test(mode):
            kind, why = name, reason
            break
    code = errno.EISDIR if stat.S_ISDIR(mode) else errno.EINVAL
    msg = f"is {kind}, not a regular file: refused, as {why}"
    raise NotARegularFileError(path, msg, code)


def read_regular_file(path: Path | str, limit: int) -> bytes:
    """The content of the regular file ``path``, at most ``limit`` bytes.

    Symlinks are followed. Anything but a regular file is refused before it is opened (opening
    a device can have effects, and reading a FIFO can block forever), and the file is opened
    without blocking and checked again, so a file swapped in between is refused too.

    :raises NotARegularFileError: ``path`` is a FIFO, device, socket or directory.
    :raises FileTooLargeError: it holds more than ``limit`` bytes.
    :raises OSError: it cannot be opened or read (``FileNotFoundError`` when missing).
    """
    if limit < 0:
        msg = f"limit must be 0 or more bytes, not {limit}"
        raise ValueError(msg)
    _refuse_unless_regular(path, Path(path).stat().st_mode)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        _refuse_unless_regular(path, os.fstat(fd).st_mode)
        pieces: list[bytes] = []
        size = 0
        while True:
            piece = os.read(fd, min(limit + 1 - size, _CHUNK))
            if not piece:
                return b"".join(pieces)
            pieces.append(piece)
            size += len(piece)
            if size > limit:
                msg = f"holds more than {limit} bytes, the most read from it: refused"
                raise FileTooLargeError(path, msg, errno.EFBIG)
    finally:
        os.close(fd)


def read_regular_text(path: Path | str, limit: int, *, errors: str = "strict") -> str:
    """`read_regular_file` decoded as UTF-8; ``errors`` as for `bytes.decode`.

    :raises UnicodeDecodeError: with ``errors="strict"``, the content is not UTF-8.
    """
    return read_regular_file(path, limit).decode("utf-8", errors=errors)
