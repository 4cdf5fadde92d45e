"""Reading and writing the sysfs tree, with errors that name the path and the problem.

Reads go straight to the filesystem under a configurable root (``--sysfs-root``), so a fake
tree in a temporary directory is read exactly like ``/sys``. They are bounded: an attribute is
read only if it is a regular file (as every sysfs attribute is), so a FIFO or a device in its
place fails at once instead of blocking or never ending, and at most :data:`MAX_ATTRIBUTE_BYTES`
are read. Writes go through
:class:`SysfsWriter`, the one seam where the kernel's behaviour matters: the real writer writes
the file and lets the kernel's ``OSError`` (``EBUSY``, ``ERANGE``...) through; the fake in
:mod:`dra_backend_i915.testing` enforces the same rules and creates VFs like the PCI core.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final, Protocol

from dra_core import BoundedReadError, read_regular_file

__all__ = (
    "MAX_ATTRIBUTE_BYTES",
    "FileWriter",
    "SysfsError",
    "SysfsWriter",
    "link_name",
    "read_int",
    "read_str",
)

#: The most bytes read of one sysfs attribute: the kernel shows at most a page (4 KiB, or
#: 64 KiB with large pages) of a text attribute.
MAX_ATTRIBUTE_BYTES: Final = 64 << 10


class SysfsError(Exception):
    """A sysfs file is missing, unreadable or holds something unexpected.

    The message names the path and the problem; ``path`` keeps the path for callers.
    """

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


def read_str(path: Path) -> str:
    """The content of a one-value sysfs file without the trailing newline."""
    try:
        data = read_regular_file(path, MAX_ATTRIBUTE_BYTES)
    except FileNotFoundError:
        raise SysfsError(path, "missing") from None
    except BoundedReadError as exc:
        raise SysfsError(path, exc.problem) from None
    except OSError as exc:
        raise SysfsError(path, f"cannot be read ({exc.strerror or exc})") from None
    return data.decode("utf-8", errors="replace").strip()


def read_int(path: Path, base: int = 10) -> int:
    """An integer sysfs file (``base`` 10, or 16 for ``0x``-prefixed IDs, or 0 for either)."""
    text = read_str(path)
    try:
        return int(text, base)
    except ValueError:
        raise SysfsError(path, f"holds {text[:40]!r}, not an integer") from None


def link_name(path: Path) -> str:
    """The last component of a symlink's target (``driver`` -> ``i915``), even if it dangles."""
    try:
        target = str(path.readlink())
    except FileNotFoundError:
        raise SysfsError(path, "missing") from None
    except OSError as exc:
        raise SysfsError(path, f"is not a readable symlink ({exc.strerror or exc})") from None
    name = Path(target.rstrip("/")).name
    if not name:
        raise SysfsError(path, f"points to {target!r}, which has no last component")
    return name


class SysfsWriter(Protocol):
    """Writes one value to a sysfs attribute; raises ``OSError`` with the kernel's errno."""

    def write(self, path: Path, value: str) -> None:
        """Write ``value`` (no newline needed) to ``path``."""


class FileWriter:
    """The real writer: one ``write(2)`` of the whole value, as sysfs attributes expect."""

    def write(self, path: Path, value: str) -> None:
        """Write ``value`` to ``path``; the kernel's error comes out as ``OSError``."""
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, value.encode("ascii"))
        finally:
            os.close(fd)
