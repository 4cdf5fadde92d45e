"""Socket names, the path-length fallback, and what is removed on disk."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from dra_core.kubelet.sockets import (
    LONGEST_SOCKET_PATH,
    UNIX_PATH_MAX,
    SocketError,
    SocketPaths,
    prepare_socket,
    remove_socket,
)

DRIVER = "long-driver.example.com"
UID = "6f1b3c2e-8d4a-4b7e-9a51-2c3d4e5f6a7b"


def listen(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen()
    return sock


def test_default_single_instance_names() -> None:
    paths = SocketPaths.for_driver("gpu.example.com")
    assert paths.registration == Path("/var/lib/kubelet/plugins_registry/gpu.example.com-reg.sock")
    assert paths.dra == Path("/var/lib/kubelet/plugins/gpu.example.com/dra.sock")


def test_rolling_update_names() -> None:
    paths = SocketPaths.for_driver("gpu.example.com", instance_id=UID)
    assert paths.registration.name == f"gpu.example.com-{UID}-reg.sock"
    assert paths.dra == Path(f"/var/lib/kubelet/plugins/gpu.example.com/dra-{UID}.sock")


def test_long_paths_fall_back_to_hashed_names(tmp_path: Path) -> None:
    base = Path("/" + "d" * 40)
    paths = SocketPaths.for_driver(
        DRIVER,
        registration_dir=base / "registry",
        plugin_dir=base / "plugins" / ("p" * 20),
        instance_id=UID,
    )
    for path in (paths.registration, paths.dra):
        assert len(os.fsencode(path)) < UNIX_PATH_MAX
        assert UID not in path.name
    assert paths.registration.name.startswith(f"{DRIVER}-")
    assert paths.dra.name.startswith("dra-")
    # The hashed forms are stable and differ per instance.
    again = SocketPaths.for_driver(
        DRIVER,
        registration_dir=base / "registry",
        plugin_dir=base / "plugins" / ("p" * 20),
        instance_id=UID,
    )
    other = SocketPaths.for_driver(
        DRIVER,
        registration_dir=base / "registry",
        plugin_dir=base / "plugins" / ("p" * 20),
        instance_id=UID.replace("6f", "70"),
    )
    assert again == paths
    assert other.registration != paths.registration and other.dra != paths.dra


@pytest.mark.parametrize("length", [104, 105, 106, 107])
def test_the_chosen_path_is_one_grpc_can_serve(length: int) -> None:
    """gRPC refuses paths the kernel would take: the long name is chosen only where it binds."""
    top = Path(tempfile.mkdtemp(prefix="s", dir="/tmp"))  # pytest's tmp_path is too long
    plugin_dir = top / "p"
    filler = length - len(os.fsencode(plugin_dir / f"dra-{UID}.sock")) - 1
    plugin_dir = plugin_dir / ("x" * filler)
    plugin_dir.mkdir(parents=True)
    paths = SocketPaths.for_driver(DRIVER, plugin_dir=plugin_dir, instance_id=UID)
    assert len(os.fsencode(plugin_dir / f"dra-{UID}.sock")) == length
    assert (UID in paths.dra.name) == (length <= LONGEST_SOCKET_PATH)
    server = grpc.server(ThreadPoolExecutor(max_workers=1))
    try:
        server.add_insecure_port(f"unix://{paths.dra}")
        server.start()
        assert paths.dra.is_socket()
    finally:
        server.stop(None)
        shutil.rmtree(top)


def test_very_long_driver_falls_back_to_driver_hash() -> None:
    driver = "d" * 63
    paths = SocketPaths.for_driver(
        driver, registration_dir=Path("/" + "r" * 30), plugin_dir=Path("/p"), instance_id=UID
    )
    assert paths.registration.name.startswith("dra-")
    assert paths.registration.name.endswith("-reg.sock")
    assert len(os.fsencode(paths.registration)) < UNIX_PATH_MAX


def test_hopelessly_long_directory_is_an_error() -> None:
    with pytest.raises(SocketError, match="choose a shorter directory"):
        SocketPaths.for_driver("gpu.example.com", registration_dir=Path("/" + "x" * 120))


@pytest.mark.parametrize("instance_id", ["", "../x", ".hidden"])
def test_bad_instance_id(instance_id: str) -> None:
    with pytest.raises(SocketError, match="instance id"):
        SocketPaths.for_driver("gpu.example.com", instance_id=instance_id)


def test_prepare_socket_creates_directory_0750(sockdir: Path) -> None:
    path = sockdir / "new" / "dir" / "dra.sock"
    prepare_socket(path)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o750


def test_prepare_socket_removes_stale_socket_only(sockdir: Path) -> None:
    mine = sockdir / "dra-a.sock"
    theirs = sockdir / "dra-b.sock"
    with listen(mine), listen(theirs):
        pass
    prepare_socket(mine)
    assert not mine.exists()
    assert theirs.exists()


def test_prepare_socket_refuses_a_regular_file(sockdir: Path) -> None:
    path = sockdir / "dra.sock"
    path.write_text("not a socket")
    with pytest.raises(SocketError, match="is not a socket"):
        prepare_socket(path)
    assert path.read_text() == "not a socket"


def test_remove_socket_leaves_other_files(sockdir: Path) -> None:
    path = sockdir / "dra.sock"
    path.write_text("x")
    remove_socket(path)
    assert path.exists()
    remove_socket(sockdir / "missing.sock")
