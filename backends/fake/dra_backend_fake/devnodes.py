"""Harmless device nodes for prepared fake devices (``--device-nodes-dir``).

Each prepared device gets a character device with the numbers of ``/dev/null`` (1:3, mode
0666) at ``<dir>/<claim UID>/<device>``; the CDI spec maps it to ``/dev/fake/<device>`` in the
container. Nodes live per claim so that claims sharing a device never remove each other's node.
Creating them needs ``CAP_MKNOD``; without it the error says so.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from pathlib import Path

from dra_core import DeviceNode, logger

__all__ = (
    "CONTAINER_DIR",
    "NULL_MAJOR",
    "NULL_MINOR",
    "DeviceNodeError",
    "check_mknod",
    "container_node",
    "create",
    "host_path",
    "remove_claim",
    "remove_node",
)

#: Where a prepared device's node appears in the container.
CONTAINER_DIR = "/dev/fake"
NULL_MAJOR = 1
NULL_MINOR = 3
_MODE = 0o666


class DeviceNodeError(OSError):
    """A device node could not be created or removed; the message says why and what to do."""


def host_path(directory: Path, claim_uid: str, device: str) -> Path:
    """Where the node of ``device`` for claim ``claim_uid`` lives on the host."""
    return directory / claim_uid / device


def container_node(device: str, host: Path) -> DeviceNode:
    """The CDI device node for ``device``, backed by the host node ``host``."""
    return DeviceNode(
        path=f"{CONTAINER_DIR}/{device}",
        host_path=str(host),
        type="c",
        major=NULL_MAJOR,
        minor=NULL_MINOR,
        permissions="rw",
    )


def _is_null_node(path: Path) -> bool:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(NULL_MAJOR, NULL_MINOR)


def _mknod(path: Path) -> None:
    try:
        os.mknod(path, stat.S_IFCHR | _MODE, os.makedev(NULL_MAJOR, NULL_MINOR))
    except PermissionError as exc:
        msg = (
            f"cannot create device node {path}: mknod is not permitted "
            f"({errno.errorcode.get(exc.errno or errno.EPERM, 'EPERM')}); "
            "run the agent with CAP_MKNOD (as root, not in a user namespace), or drop "
            "--device-nodes-dir"
        )
        raise DeviceNodeError(exc.errno or errno.EPERM, msg) from None
    except OSError as exc:
        msg = f"cannot create device node {path}: {exc.strerror or exc}"
        raise DeviceNodeError(exc.errno or errno.EIO, msg) from None
    path.chmod(_MODE)  # mknod's mode is filtered by the umask


def create(directory: Path, claim_uid: str, device: str) -> Path:
    """Create (or keep) the node of ``device`` for claim ``claim_uid``; return its host path."""
    path = host_path(directory, claim_uid, device)
    if _is_null_node(path):
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        msg = f"cannot create the device node directory {path.parent}: {exc.strerror or exc}"
        raise DeviceNodeError(exc.errno or errno.EIO, msg) from None
    if path.is_symlink() or path.exists():
        logger.bind(device=device).warning("replacing {}, which is not a 1:3 device node", path)
        path.unlink()
    _mknod(path)
    return path


def check_mknod(directory: Path) -> None:
    """Fail early, at start, when device nodes cannot be made in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".probe-{os.getpid()}"
    probe.unlink(missing_ok=True)
    try:
        _mknod(probe)
    finally:
        probe.unlink(missing_ok=True)


def remove_node(directory: Path, path: Path) -> None:
    """Remove one node recorded at prepare, if it is still there and inside ``directory``."""
    if not path.is_relative_to(directory) or ".." in path.parts:
        logger.warning(
            "not removing {}: it is outside the device-nodes directory {}", path, directory
        )
        return
    path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # other devices of the claim remain, or it is gone
        path.parent.rmdir()


def remove_claim(directory: Path, claim_uid: str) -> None:
    """Remove every node of a claim (for unprepare of a claim prepared only in part)."""
    claim_dir = directory / claim_uid
    if claim_dir.is_dir() and not claim_dir.is_symlink():
        shutil.rmtree(claim_dir, ignore_errors=True)
