"""Device nodes: a /dev/null-like character device per prepared device, removed at unprepare."""

from __future__ import annotations

import errno
import os
import stat

import pytest
from dra_backend_fake import devnodes
from dra_backend_fake.testing import allocated_claim

from dra_core import DeviceNode, PrepareError
from dra_core.plugins import HookError


@pytest.fixture
def nodes_dir(tmp_path):
    directory = tmp_path / "nodes"
    try:
        devnodes.check_mknod(directory)
    except devnodes.DeviceNodeError as exc:
        if exc.errno == errno.EPERM:
            pytest.skip(f"mknod is not permitted here: {exc}")
        raise
    return directory


def test_prepare_creates_a_null_node_and_unprepare_removes_it(start, nodes_dir):
    backend = start(device_nodes_dir=nodes_dir)
    claim = allocated_claim("dev-0", "big-0-p1")
    prepared = backend.prepare(claim)
    for device in prepared:
        name = device.allocation.device
        host = nodes_dir / claim.ref.uid / name
        st = host.lstat()
        assert stat.S_ISCHR(st.st_mode)
        assert st.st_rdev == os.makedev(1, 3)
        assert stat.S_IMODE(st.st_mode) == 0o666
        assert device.edits.device_nodes == (
            DeviceNode(
                path=f"/dev/fake/{name}",
                host_path=str(host),
                type="c",
                major=1,
                minor=3,
                permissions="rw",
            ),
        )
        assert device.state == {"deviceNode": str(host)}
    assert backend.prepare(claim) == prepared  # idempotent: the nodes are kept
    backend.unprepare(claim, prepared)
    assert not (nodes_dir / claim.ref.uid).exists()
    backend.unprepare(claim, prepared)  # again: nothing left, no error


def test_unprepare_tolerates_a_half_prepared_claim(start, nodes_dir):
    backend = start(device_nodes_dir=nodes_dir)
    claim = allocated_claim("dev-0", "dev-1")
    backend.prepare(claim)
    # The checkpoint recorded nothing (crash before it was written): the claim's directory goes.
    backend.unprepare(claim, [])
    assert not (nodes_dir / claim.ref.uid).exists()


def test_claims_sharing_a_device_have_their_own_nodes(start, nodes_dir):
    backend = start(device_nodes_dir=nodes_dir)
    one = allocated_claim(("s", "shared-0", "0f3c2a5e-1111-4b2b-9c3d-123456789abc"))
    two = allocated_claim(("s", "shared-0", "0f3c2a5e-2222-4b2b-9c3d-123456789abc"))
    first, second = backend.prepare(one), backend.prepare(two)
    backend.unprepare(one, first)
    assert (nodes_dir / two.ref.uid / "shared-0").exists()
    backend.unprepare(two, second)


def test_a_stray_file_in_the_way_is_replaced(nodes_dir):
    path = nodes_dir / "uid" / "dev-0"
    path.parent.mkdir(parents=True)
    path.write_text("not a device")
    assert devnodes.create(nodes_dir, "uid", "dev-0") == path
    assert stat.S_ISCHR(path.lstat().st_mode)


def test_eperm_is_reported_clearly(start, tmp_path, monkeypatch):
    def deny(*args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "mknod", deny)
    with pytest.raises(HookError) as info:
        start(device_nodes_dir=tmp_path / "nodes")
    message = str(info.value)
    assert "mknod is not permitted (EPERM)" in message and "CAP_MKNOD" in message
    assert "--device-nodes-dir" in message


def test_eperm_at_prepare_is_a_prepare_error(start, nodes_dir, monkeypatch):
    backend = start(device_nodes_dir=nodes_dir)

    def deny(*args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "mknod", deny)
    with pytest.raises(HookError) as info:
        backend.prepare(allocated_claim("dev-0"))
    assert isinstance(info.value.__cause__, PrepareError)
    assert "device 'dev-0'" in str(info.value) and "mknod is not permitted" in str(info.value)
