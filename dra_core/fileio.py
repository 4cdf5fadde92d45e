"""Durable file replacement and removal, shared by the checkpoint and the CDI spec writer.

`atomic_write` gives readers either the old content or the new, never a torn file, and makes
the new content survive a power cut once it returns: the data goes to a temp file in the same
directory, is flushed to disk, given its mode, renamed over the target, and the directory entry
is flushed too. `remove_durably` is the matching delete.

Temp files are named ``.<name>.<random>.tmp`` so that a crash between write and rename leaves
something recognisable (hidden, and without the ``.json`` suffix that CDI runtimes load);
`temp_prefix` and `is_temp_for` let owners collect their own leftovers.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

__all__ = ("TEMP_SUFFIX", "atomic_write", "fsync_directory", "is_temp_for", "remove_durably")

#: The suffix of every temp file `atomic_write` creates.
TEMP_SUFFIX = ".tmp"


def _temp_name(target: Path) -> str:
    return f".{target.name}.{secrets.token_hex(8)}{TEMP_SUFFIX}"


def is_temp_for(candidate: str, target_name: str) -> bool:
    """True when ``candidate`` is a temp file name `atomic_write` makes for ``target_name``."""
    prefix = f".{target_name}."
    if not (candidate.startswith(prefix) and candidate.endswith(TEMP_SUFFIX)):
        return False
    middle = candidate[len(prefix) : -len(TEMP_SUFFIX)]
    return len(middle) == 16 and all(c in "0123456789abcdef" for c in middle)


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


def remove_durably(path: Path) -> bool:
    """Delete ``path`` and flush its directory; False when it did not exist."""
    path = Path(path)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    fsync_directory(path.parent)
    return True
