"""Local-memory size of a GPU from the DRM memory-region query ioctls.

Used when sysfs does not say (mainline i915 has no sysfs total; current xe has none either).
i915 answers ``DRM_IOCTL_I915_QUERY`` with ``DRM_I915_QUERY_MEMORY_REGIONS``; xe answers
``DRM_IOCTL_XE_DEVICE_QUERY`` with ``DRM_XE_DEVICE_QUERY_MEM_REGIONS``. Both use the same two
calls: the first with size 0 learns the reply size, the second fills a buffer. The sum over the
device-memory regions (class 1) is the GPU's local memory.

The ioctl itself is a seam (:data:`Ioctl`): tests pass a function that fills the buffers like
the kernel (see :class:`dra_backend_i915.testing.FakeDrmIoctl`), so the packing and parsing
here run unchanged in tests.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import stat
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from dra_core import logger

__all__ = (
    "DRM_IOCTL_I915_QUERY",
    "DRM_IOCTL_XE_DEVICE_QUERY",
    "DrmMemoryQuery",
    "I915Query",
    "I915QueryItem",
    "Ioctl",
    "MemoryQuery",
    "XeDeviceQuery",
    "open_drm_node",
    "parse_i915_regions",
    "parse_xe_regions",
)

DRM_IOCTL_I915_QUERY = 0xC0106479
DRM_IOCTL_XE_DEVICE_QUERY = 0xC0286440
I915_QUERY_MEMORY_REGIONS = 4
XE_DEVICE_QUERY_MEM_REGIONS = 1
DEVICE_MEMORY_CLASS = 1
REGION_SIZE = 88


class I915QueryItem(ctypes.Structure):
    """``struct drm_i915_query_item``."""

    _fields_ = (
        ("query_id", ctypes.c_uint64),
        ("length", ctypes.c_int32),
        ("flags", ctypes.c_uint32),
        ("data_ptr", ctypes.c_uint64),
    )


class I915Query(ctypes.Structure):
    """``struct drm_i915_query``."""

    _fields_ = (
        ("num_items", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("items_ptr", ctypes.c_uint64),
    )


class XeDeviceQuery(ctypes.Structure):
    """``struct drm_xe_device_query``."""

    _fields_ = (
        ("extensions", ctypes.c_uint64),
        ("query", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
        ("data", ctypes.c_uint64),
        ("reserved", ctypes.c_uint64 * 2),
    )


#: ``ioctl(fd, request, struct)``: must fill the structure (and the buffers it points to) in
#: place like the kernel, and raise ``OSError`` on failure.
Ioctl = Callable[[int, int, ctypes.Structure], None]


def _real_ioctl(fd: int, request: int, arg: ctypes.Structure) -> None:
    fcntl.ioctl(fd, request, arg, True)


def parse_i915_regions(data: bytes) -> int:
    """Sum of ``probed_size`` over the device-memory regions of an i915 reply."""
    (count,) = struct.unpack_from("<I", data, 0)
    total = 0
    for index in range(count):
        offset = 16 + index * REGION_SIZE
        if offset + REGION_SIZE > len(data):
            msg = f"i915 memory-region reply is {len(data)} bytes, too short for {count} regions"
            raise ValueError(msg)
        mem_class, _instance, _rsvd, probed, _unallocated = struct.unpack_from(
            "<HHIQQ", data, offset
        )
        if mem_class == DEVICE_MEMORY_CLASS:
            total += probed
    return total


def parse_xe_regions(data: bytes) -> int:
    """Sum of ``total_size`` over the VRAM regions of an xe reply."""
    (count,) = struct.unpack_from("<I", data, 0)
    total = 0
    for index in range(count):
        offset = 8 + index * REGION_SIZE
        if offset + REGION_SIZE > len(data):
            msg = f"xe memory-region reply is {len(data)} bytes, too short for {count} regions"
            raise ValueError(msg)
        mem_class, _instance, _page, size = struct.unpack_from("<HHIQ", data, offset)
        if mem_class == DEVICE_MEMORY_CLASS:
            total += size
    return total


class MemoryQuery(Protocol):
    """Asks a GPU for its local-memory size; None when it cannot be learned."""

    def query(self, driver: str, card_node: Path) -> int | None:
        """Bytes of local memory of the GPU behind ``card_node`` bound to ``driver``."""


#: The character-device major of every DRM node.
DRM_MAJOR = 226
#: The largest memory-region reply believed (a GPU has a handful of regions of 88 bytes).
MAX_REPLY_BYTES = 64 << 10


def open_drm_node(path: Path) -> int:
    """Open a DRM card node for ioctls; refuse anything else before opening it.

    Only a character device with the DRM major (or a regular file, as fake trees hold) is
    opened, without blocking: a FIFO in its place would block the open forever, and opening
    another device can have effects of its own.
    """
    info = path.stat()
    is_drm = stat.S_ISCHR(info.st_mode) and os.major(info.st_rdev) == DRM_MAJOR
    if not (is_drm or stat.S_ISREG(info.st_mode)):
        msg = f"{path} is not a DRM device node (character device {DRM_MAJOR}:N); not opened"
        raise OSError(msg)
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)


class DrmMemoryQuery:
    """The ioctl path, with the ioctl and the opener as seams for tests."""

    def __init__(
        self,
        ioctl: Ioctl = _real_ioctl,
        opener: Callable[[Path], int] = open_drm_node,
    ) -> None:
        self._ioctl = ioctl
        self._open = opener

    def query(self, driver: str, card_node: Path) -> int | None:
        """Bytes of local memory, or None (logged) when the node cannot be opened or asked."""
        try:
            fd = self._open(card_node)
        except OSError as exc:
            logger.debug("cannot open {} for the memory query: {}", card_node, exc)
            return None
        try:
            if driver == "xe":
                return parse_xe_regions(self._xe(fd))
            if driver == "i915":
                return parse_i915_regions(self._i915(fd))
            return None
        except (OSError, ValueError, struct.error) as exc:
            logger.debug("memory query on {} ({}) failed: {}", card_node, driver, exc)
            return None
        finally:
            os.close(fd)

    def _i915(self, fd: int) -> bytes:
        item = I915QueryItem(query_id=I915_QUERY_MEMORY_REGIONS, length=0, flags=0, data_ptr=0)
        query = I915Query(num_items=1, flags=0, items_ptr=ctypes.addressof(item))
        self._ioctl(fd, DRM_IOCTL_I915_QUERY, query)
        if not 0 < item.length <= MAX_REPLY_BYTES:
            msg = f"i915 memory-region query returned length {item.length}"
            raise ValueError(msg)
        buffer = ctypes.create_string_buffer(item.length)
        item.data_ptr = ctypes.addressof(buffer)
        self._ioctl(fd, DRM_IOCTL_I915_QUERY, query)
        if item.length <= 0:
            msg = f"i915 memory-region query returned length {item.length}"
            raise ValueError(msg)
        return buffer.raw[: item.length]

    def _xe(self, fd: int) -> bytes:
        query = XeDeviceQuery(extensions=0, query=XE_DEVICE_QUERY_MEM_REGIONS, size=0, data=0)
        self._ioctl(fd, DRM_IOCTL_XE_DEVICE_QUERY, query)
        if not 0 < query.size <= MAX_REPLY_BYTES:
            msg = f"xe memory-region query returned size {query.size}"
            raise ValueError(msg)
        buffer = ctypes.create_string_buffer(query.size)
        query.data = ctypes.addressof(buffer)
        self._ioctl(fd, DRM_IOCTL_XE_DEVICE_QUERY, query)
        return buffer.raw[: query.size]
