"""Durable file replacement and removal, shared by the checkpoint and the CDI spec writer.

`atomic_write` gives readers either the old content or the new, never a torn file, and makes
the new content survive a power cut once it returns: the data goes to a temp file in the same
directory, is flushed to disk, given its mode, renamed over the target, and the directory entry
is flushed too. `remove_durably` is the matching delete.

Temp files are named ``.<name>.<random>.tmp`` so that a crash between write and rename leaves
something recognisable (hidden, and without the ``.json`` suffix that CDI runtimes load);
`temp_target` and `is_temp_for` let owners collect their own leftovers.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path

__all__ = (
    "TEMP_SUFFIX",
    "atomic_write",
    "fsync_directory",
    "is_temp_for",
    "remove_durably",
    "remove_stale_temps",
    "temp_target",
)

#: The suffix of every temp file `atomic_write` creates.
TEMP_SUFFIX = ".tmp"


def _temp_name(target: Path) -> str:
    return f".{target.name}.{secrets.token_hex(8)}{TEMP_SUFFIX}"


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


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data`` atomically and durably, with permission bits ``mode``.

    The directory must exist. On any failure the temp file is removed, ``path`` keeps its old
    content, and the original exception propagates.
    """
    path = Path(path)
    directory = path.parent
    temp = directory / _temp_name(path)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        temp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    fsync_directory(directory)


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
