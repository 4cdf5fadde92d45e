"""Device nodes a container runtime accepts: the host path is the node, never a udev link.

The CDI library containerd and CRI-O use fills a node's type and major:minor with ``lstat`` on
``hostPath`` unless the spec gives them, and refuses anything that is not a device node. Every
test runs on a fake tree with plain files and, as root, on one whose ``/dev/dri`` entries are
real character devices (DRM major 226), and checks the CDI spec the core writes from the edits.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest
from dra_backend_i915 import testing
from dra_backend_i915.edits import drm_edits
from dra_backend_i915.testing import (
    DRM_MAJOR,
    GIB,
    FakeSysfs,
    allocated_claim,
    build_demo,
    node_context,
)
from loguru import logger

from dra_core import PreparedClaim
from dra_core.cdi import CdiSpecs

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="mknod of DRM character devices needs root")
A770 = "0000:03:00.0"
FLEX = "0000:03:00.0"
NODE_NAME = re.compile(r"card\d+|renderD\d+")


@pytest.fixture(
    params=[False, pytest.param(True, marks=needs_root)], ids=["plain-files", "char-devices"]
)
def fs(request: pytest.FixtureRequest, tmp_path: Path) -> FakeSysfs:
    return FakeSysfs(tmp_path / "node", char_devices=request.param)


@pytest.fixture
def warned() -> Any:
    records: list[str] = []
    sink = logger.add(lambda m: records.append(m.record["message"]), level="WARNING")
    yield records
    logger.remove(sink)


def sysfs_nodes(fs: FakeSysfs, address: str) -> dict[str, tuple[int, int]]:
    """The function's DRM nodes and their major:minor, as its ``drm/<node>/dev`` files say."""
    drm = fs.sys / "bus/pci/devices" / address / "drm"
    found: dict[str, tuple[int, int]] = {}
    for entry in drm.iterdir():
        if NODE_NAME.fullmatch(entry.name):
            major, minor = (entry / "dev").read_text().strip().split(":")
            found[entry.name] = (int(major), int(minor))
    assert found, f"{address} has no DRM nodes in sysfs"
    return found


def spec_nodes(hooks, claim: PreparedClaim, tmp_path: Path, fs: FakeSysfs) -> list[dict[str, Any]]:
    """The deviceNodes of the CDI spec the core writes for ``claim``.

    With character devices the spec is also written, so the session's CDI check
    (``tests/cdicheck.py``, when loaded) injects it with the CDI library as containerd does; a
    tree of plain files is refused by any runtime, so it is only built.
    """
    specs = CdiSpecs(tmp_path / "cdi", hooks.backend_identity())
    spec = specs.build(claim)
    assert spec is not None
    if fs.char_devices:
        assert specs.write(claim)
    return [n for d in spec["devices"] for n in d["containerEdits"].get("deviceNodes", [])]


def check_nodes(fs: FakeSysfs, address: str, nodes: list[dict[str, Any]]) -> None:
    """The nodes of one function are what a runtime accepts and name the right device."""
    expected = sysfs_nodes(fs, address)
    by_path = {
        f"/dev/dri/by-path/pci-{address}-{'render' if name.startswith('renderD') else 'card'}": name
        for name in expected
    }
    mine = {
        n["path"]: n
        for n in nodes
        if n["path"] in by_path or n["path"].removeprefix("/dev/dri/") in expected
    }
    assert set(mine) == {f"/dev/dri/{name}" for name in expected} | set(by_path)
    for path, node in mine.items():
        name = by_path.get(path, path.removeprefix("/dev/dri/"))
        host = Path(node["hostPath"])
        assert host == fs.dev / "dri" / name, path
        assert not host.is_symlink(), f"{path}: hostPath {host} is a symlink"
        info = os.lstat(host)
        if fs.char_devices:
            assert stat.S_ISCHR(info.st_mode), f"{host} is not a character device"
            assert (os.major(info.st_rdev), os.minor(info.st_rdev)) == expected[name]
            assert expected[name][0] == DRM_MAJOR
            assert (node["type"], node["major"], node["minor"]) == ("c", *expected[name])
        else:
            assert stat.S_ISREG(info.st_mode)
            assert "type" not in node and "major" not in node and "minor" not in node


def test_whole_gpu(hooks, fs, context, tmp_path):
    fs.add_simpledrm()  # card0: the A770 is card1 with renderD128
    fs.add_gpu(A770, "0x56a0", lmem_total_bytes=16 * GIB)
    claim = allocated_claim("gpu-0000-03-00-0")
    hooks.check_allocation(claim, hooks.discover(context), context)
    devices = tuple(hooks.prepare(claim, context))
    nodes = spec_nodes(hooks, PreparedClaim(claim.ref, devices), tmp_path, fs)
    assert {n["path"] for n in nodes} == {
        "/dev/dri/card1",
        "/dev/dri/renderD128",
        f"/dev/dri/by-path/pci-{A770}-card",
        f"/dev/dri/by-path/pci-{A770}-render",
    }
    check_nodes(fs, A770, nodes)


def test_vf_created_on_demand(hooks, fs, kernel, tmp_path):
    flex = fs.add_gpu(FLEX, "0x56c0", lmem_total_bytes=16 * GIB, sriov_totalvfs=31)
    ctx = node_context(fs, tmp_path / "state", vf_profile="flex170=flex170_m4")
    claim = allocated_claim("gpu-0000-03-00-0-vf1")
    hooks.check_allocation(claim, hooks.discover(ctx), ctx)
    devices = tuple(hooks.prepare(claim, ctx))
    vf = (flex / "virtfn1").resolve().name
    assert vf == "0000:03:00.2"
    nodes = spec_nodes(hooks, PreparedClaim(claim.ref, devices), tmp_path, fs)
    assert {n["path"] for n in nodes} >= {
        f"/dev/dri/by-path/pci-{vf}-card",
        f"/dev/dri/by-path/pci-{vf}-render",
    }
    check_nodes(fs, vf, nodes)
    assert sysfs_nodes(fs, vf) == {"card2": (226, 2), "renderD130": (226, 130)}


def test_shared_gpu(hooks, fs, tmp_path):
    fs.add_gpu(A770, "0x56a0", lmem_total_bytes=16 * GIB)
    ctx = node_context(fs, tmp_path / "state", shared_gpus="all")
    inventory = hooks.discover(ctx)
    for share in ("7f1c2c9e-3d5b-4a53-9a1e-9a8f3c1b2d4e", "0b9f0e54-5f0c-4f7e-8d6a-2b1c7e0f9a11"):
        claim = allocated_claim(
            "gpu-0000-03-00-0", consumed={"memory": "2Gi", "millicores": "200"}, share_id=share
        )
        hooks.check_allocation(claim, inventory, ctx)
        devices = tuple(hooks.prepare(claim, ctx))
        check_nodes(fs, A770, spec_nodes(hooks, PreparedClaim(claim.ref, devices), tmp_path, fs))


def test_rebound_gpu_gets_its_new_nodes(hooks, fs, context, tmp_path):
    fs.add_gpu(A770, "0x56a0")
    fs.rebind(A770, "vfio-pci")
    assert not list((fs.dev / "dri").glob("card*"))
    fs.rebind(A770, "i915")
    assert set(sysfs_nodes(fs, A770)) == {"card1", "renderD129"}
    claim = allocated_claim("gpu-0000-03-00-0")
    devices = tuple(hooks.prepare(claim, context))
    check_nodes(fs, A770, spec_nodes(hooks, PreparedClaim(claim.ref, devices), tmp_path, fs))


@pytest.mark.parametrize(
    ("kind", "target", "reason"),
    [
        ("card", "../card7", "but the GPU has its node card1"),
        ("render", "../card1", "but the GPU has its node renderD128"),
        ("card", "../../../../../etc/hostname", "outside"),
        ("card", "/etc/hostname", "outside"),
        ("render", "renderD128", "outside"),  # relative to by-path/: not in dri/
        ("card", "../by-path/pci-0000:03:00.0-render", "outside"),
    ],
)
def test_unusable_by_path_link_is_left_out(fs, warned, kind, target, reason):
    fs.add_simpledrm()
    fs.add_gpu(A770, "0x56a0")
    link = fs.dev / f"dri/by-path/pci-{A770}-{kind}"
    link.unlink()
    link.symlink_to(target)
    edits = drm_edits(A770, "card1", "renderD128", fs.dev)
    paths = [n.path for n in edits.device_nodes]
    other = "render" if kind == "card" else "card"
    assert paths == [
        "/dev/dri/card1",
        "/dev/dri/renderD128",
        f"/dev/dri/by-path/pci-{A770}-{other}",
    ]
    (warning,) = warned
    assert A770 in warning and str(link) in warning and target in warning
    assert reason in warning


def test_by_path_link_to_missing_node_is_left_out(fs, warned):
    fs.add_gpu(A770, "0x56a0")
    (fs.dev / "dri/renderD128").unlink()  # the udev link dangles
    edits = drm_edits(A770, "card0", "renderD128", fs.dev)
    assert f"/dev/dri/by-path/pci-{A770}-render" not in [n.path for n in edits.device_nodes]
    assert f"/dev/dri/by-path/pci-{A770}-card" in [n.path for n in edits.device_nodes]
    (warning,) = warned
    assert A770 in warning and "does not exist" in warning
    assert f"{fs.dev}/dri/by-path/pci-{A770}-render" in warning


def test_by_path_link_to_a_symlink_is_left_out(fs, warned):
    fs.add_gpu(A770, "0x56a0", render=False)
    card = fs.dev / "dri/card0"
    card.rename(fs.dev / "dri/card-real")
    card.symlink_to("card-real")  # the GPU's node itself is a link: no runtime takes it
    edits = drm_edits(A770, "card0", None, fs.dev)
    assert f"/dev/dri/by-path/pci-{A770}-card" not in [n.path for n in edits.device_nodes]
    (warning,) = warned
    assert A770 in warning and "not a device node" in warning


def test_absolute_link_into_dev_is_read_under_the_devfs_root(fs, warned):
    fs.add_gpu(A770, "0x56a0")
    link = fs.dev / f"dri/by-path/pci-{A770}-card"
    link.unlink()
    link.symlink_to("/dev/dri/card0")  # as the host sees it; the agent sees /dev at fs.dev
    nodes = {
        n.path: n.host_path for n in drm_edits(A770, "card0", "renderD128", fs.dev).device_nodes
    }
    assert nodes[f"/dev/dri/by-path/pci-{A770}-card"] == str(fs.dev / "dri/card0")
    assert warned == []


def test_host_without_by_path_links_is_quiet(fs, warned):
    fs.add_gpu(A770, "0x56a0")
    for link in (fs.dev / "dri/by-path").iterdir():
        link.unlink()
    edits = drm_edits(A770, "card0", "renderD128", fs.dev)
    assert [n.path for n in edits.device_nodes] == ["/dev/dri/card0", "/dev/dri/renderD128"]
    assert warned == []


@needs_root
def test_fake_tree_char_devices_follow_the_kernel(tmp_path):
    fs = build_demo(tmp_path / "demo", char_devices=True)
    kernel = fs.kernel(delay=0)
    kernel.write(fs.gpus[FLEX].path / "sriov_numvfs", "2")
    kernel.join()
    fs.unbind("0000:08:00.0")
    fs.rebind("0000:00:02.0", "vfio-pci")
    fs.rebind("0000:00:02.0", "i915")
    dri = fs.dev / "dri"
    sysfs = {
        entry.name: (entry / "dev").read_text().strip()
        for entry in (fs.sys / "class/drm").iterdir()
    }
    devices = {p.name for p in dri.iterdir() if p.name != "by-path"}
    assert devices == set(sysfs)
    assert {"card5", "renderD132", "card6", "renderD133"} <= devices  # the VFs, then the rebind
    for name in devices:
        info = os.lstat(dri / name)
        assert stat.S_ISCHR(info.st_mode), name
        assert f"{os.major(info.st_rdev)}:{os.minor(info.st_rdev)}" == sysfs[name]
        assert stat.S_IMODE(info.st_mode) == (0o666 if name.startswith("renderD") else 0o660)
    for link in (dri / "by-path").iterdir():
        assert not os.readlink(link).startswith("/")
        assert stat.S_ISCHR(os.stat(link).st_mode), link
    assert not (dri / "by-path/pci-0000:08:00.0-card").exists()
    kernel.write(fs.gpus[FLEX].path / "sriov_numvfs", "0")
    assert not {"card5", "renderD132", "card6", "renderD133"} & {p.name for p in dri.iterdir()}


@needs_root
def test_demo_command_makes_char_devices(tmp_path, capsys):
    assert testing.main(["--char-devices", str(tmp_path / "demo")]) == 0
    assert stat.S_ISCHR(os.lstat(tmp_path / "demo/dev/dri/card1").st_mode)
    assert testing.main(["--char-devices"]) == 2
    capsys.readouterr()


def test_plain_files_by_default(tmp_path):
    fs = build_demo(tmp_path / "demo")
    assert not fs.char_devices
    assert stat.S_ISREG(os.lstat(fs.dev / "dri/card1").st_mode)
