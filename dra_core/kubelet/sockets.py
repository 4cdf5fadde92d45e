"""Where the kubelet plugin's unix sockets live, and their lifecycle on disk.

Two sockets per plugin instance: the registration socket in the kubelet's plugin watcher
directory, and the DRA service socket in the driver's plugin directory. In rolling-update
mode (kubelet 1.33 and later) each instance, identified e.g. by its pod UID, gets its own
pair of names so an old and a new instance can serve side by side; an instance only ever
removes its own sockets.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from dra_core.fileio import make_directories

__all__ = [
    "DEFAULT_PLUGINS_DIR",
    "DEFAULT_REGISTRATION_DIR",
    "LONGEST_SOCKET_PATH",
    "UNIX_PATH_MAX",
    "SocketError",
    "SocketPaths",
    "prepare_socket",
    "remove_socket",
]

DEFAULT_REGISTRATION_DIR = Path("/var/lib/kubelet/plugins_registry")
DEFAULT_PLUGINS_DIR = Path("/var/lib/kubelet/plugins")
#: Size of ``sockaddr_un.sun_path``, including the terminating NUL.
UNIX_PATH_MAX = 108
#: The longest socket path used, below the kernel's 107 bytes: gRPC clients refuse longer ones
#: (grpcio 1.85 refuses a 106-byte path: "Path name should not have more than 107 characters").
LONGEST_SOCKET_PATH = 105
#: Mode of the socket directories the agent creates: the kubelet makes its own plugin and
#: registration directories 0750 (it runs as root), and nobody else needs to list them.
DIR_MODE = 0o750


class SocketError(RuntimeError):
    """A socket path is unusable: too long, or occupied by something that is not a socket."""


def _fits(path: Path) -> bool:
    return len(os.fsencode(path)) <= LONGEST_SOCKET_PATH


def _short_hash(data: str, size: int) -> str:
    digest = hashlib.sha256(data.encode()).digest()[:size]
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def _first_fitting(what: str, candidates: list[Path]) -> Path:
    for candidate in candidates:
        if _fits(candidate):
            return candidate
    msg = (
        f"the {what} socket path {candidates[0]} is {len(os.fsencode(candidates[0]))} bytes, "
        f"and even its short form {candidates[-1]} does not fit the {LONGEST_SOCKET_PATH}-byte "
        "limit of a unix socket path; choose a shorter directory"
    )
    raise SocketError(msg)


@dataclass(frozen=True)
class SocketPaths:
    """The registration and DRA service socket paths of one plugin instance."""

    registration: Path
    dra: Path

    @classmethod
    def for_driver(
        cls,
        driver_name: str,
        *,
        registration_dir: Path = DEFAULT_REGISTRATION_DIR,
        plugin_dir: Path | None = None,
        instance_id: str | None = None,
    ) -> SocketPaths:
        """The socket paths for ``driver_name``.

        ``plugin_dir`` defaults to ``/var/lib/kubelet/plugins/<driver_name>``. Without an
        ``instance_id`` the names are ``<driver>-reg.sock`` and ``dra.sock``; with one they
        are ``<driver>-<id>-reg.sock`` and ``dra-<id>.sock``, falling back to hashed forms
        of the id when a full path would exceed the unix socket path limit.
        """
        if plugin_dir is None:
            plugin_dir = DEFAULT_PLUGINS_DIR / driver_name
        if not driver_name or "/" in driver_name:
            msg = f"driver name {driver_name!r} cannot name a socket; use a DNS subdomain"
            raise SocketError(msg)
        if instance_id is None:
            registration = [registration_dir / f"{driver_name}-reg.sock"]
            dra = [plugin_dir / "dra.sock"]
        else:
            if not instance_id or "/" in instance_id or instance_id.startswith("."):
                msg = f"instance id {instance_id!r} cannot be in a socket name; use the pod UID"
                raise SocketError(msg)
            id_hash = _short_hash(instance_id, 8)
            both_hash = _short_hash(f"{driver_name}\0{instance_id}", 16)
            registration = [
                registration_dir / f"{driver_name}-{instance_id}-reg.sock",
                registration_dir / f"{driver_name}-{id_hash}-reg.sock",
                registration_dir / f"dra-{both_hash}-reg.sock",
            ]
            dra = [plugin_dir / f"dra-{instance_id}.sock", plugin_dir / f"dra-{id_hash}.sock"]
        return cls(
            registration=_first_fitting("registration", registration),
            dra=_first_fitting("DRA service", dra),
        )


def prepare_socket(path: Path) -> None:
    """Make ``path`` ready to listen on: create its directory and missing parents (mode 0750
    whatever the umask) and remove a stale socket left there by an earlier run of this instance.

    Refuses to remove anything that is not a socket.
    """
    make_directories(path.parent, DIR_MODE)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        msg = f"{path} exists and is not a socket; remove it or choose another socket directory"
        raise SocketError(msg)
    path.unlink(missing_ok=True)


def remove_socket(path: Path) -> None:
    """Remove this instance's socket at ``path`` if it is (still) a socket."""
    try:
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink(missing_ok=True)
    except FileNotFoundError:
        pass
