"""Admin-access (monitoring) claims: they hold nothing, create and remove no VFs, and get the
device nodes of what exists plus each GPU's management engine (MEI)."""

from __future__ import annotations

import logging

import pytest
from dra_backend_i915.discovery import Discoverer, mei_node
from dra_backend_i915.edits import mei_edits
from dra_backend_i915.memory import DrmMemoryQuery
from dra_backend_i915.testing import GIB, FakeDrmIoctl, allocated_claim, node_context
from loguru import logger

from dra_core import PreparedClaim
from dra_core.plugins import HookError

FLEX = "0000:03:00.0"
FLEX_NAME = "gpu-0000-03-00-0"
A770 = "0000:08:00.0"
A770_NAME = "gpu-0000-08-00-0"


@pytest.fixture
def node(fs):
    fs.add_simpledrm()  # card0
    fs.add_gpu(FLEX, "0x56c0", lmem_total_bytes=16 * GIB, sriov_totalvfs=31)  # card1
    fs.add_mei(FLEX, "mei-gsc")  # mei0
    fs.add_gpu(  # card2
        A770, "0x56a0", bridge="0000:00:1c.0", lmem_total_bytes=16 * GIB, error_counters=True
    )
    fs.add_mei(A770)  # mei1
    return fs


@pytest.fixture
def ctx(node, tmp_path):
    return node_context(node, tmp_path / "state", vf_profile="flex170=flex170_m4")


def prepared(hooks, ctx, claim):
    hooks.check_allocation(claim, hooks.discover(ctx), ctx)
    return PreparedClaim(claim.ref, tuple(hooks.prepare(claim, ctx)))


def nodes(device) -> dict[str, str | None]:
    return {n.path: n.host_path for n in device.edits.device_nodes}


def gpu_nodes(fs, address: str, card: str, render: str) -> dict[str, str]:
    dri = fs.dev / "dri"
    return {
        f"/dev/dri/{card}": str(dri / card),
        f"/dev/dri/{render}": str(dri / render),
        f"/dev/dri/by-path/pci-{address}-card": str(dri / card),
        f"/dev/dri/by-path/pci-{address}-render": str(dri / render),
    }


def numvfs(fs) -> int:
    return int((fs.gpus[FLEX].path / "sriov_numvfs").read_text())


def test_mei_found_in_the_functions_own_directory(node):
    discovery = Discoverer(node.sys, node.dev, DrmMemoryQuery(ioctl=FakeDrmIoctl({}))).discover()
    flex, a770 = discovery.by_address(FLEX), discovery.by_address(A770)
    assert flex is not None and a770 is not None
    assert (flex.mei, a770.mei) == ("mei0", "mei1")
    assert (flex.path / "i915.mei-gsc.768/mei/mei0/dev").read_text().strip() == "240:0"
    assert (a770.path / "i915.mei-gscfi.2048/mei/mei1").is_dir()
    assert (node.sys / "class/mei/mei1").resolve() == a770.path / "i915.mei-gscfi.2048/mei/mei1"
    node.add_gpu("0000:0a:00.0", "0x56a5", bridge="0000:00:1d.0")
    assert mei_node(node.gpus["0000:0a:00.0"].path) is None


def test_admin_claim_never_blocks_and_is_never_blocked(hooks, ctx, node):
    first = prepared(hooks, ctx, allocated_claim(A770_NAME))
    monitor = prepared(hooks, ctx, allocated_claim(A770_NAME, FLEX_NAME, admin_access=True))
    a770, flex = monitor.devices
    assert nodes(a770) == {
        **gpu_nodes(node, A770, "card2", "renderD129"),
        "/dev/mei1": str(node.dev / "mei1"),
    }
    assert nodes(flex) == {
        **gpu_nodes(node, FLEX, "card1", "renderD128"),
        "/dev/mei0": str(node.dev / "mei0"),
    }
    assert a770.edits.env["MEI_NODE_0000_08_00_0"] == "/dev/mei1"
    assert flex.state == {"kind": "pf", "adminAccess": True, "address": FLEX}

    # the next normal claims on both GPUs are not refused because of the monitor
    hooks.unprepare(first, ctx)
    prepared(hooks, ctx, allocated_claim(A770_NAME))
    whole = prepared(hooks, ctx, allocated_claim(FLEX_NAME))
    assert nodes(whole.devices[0]) == gpu_nodes(node, FLEX, "card1", "renderD128")
    hooks.unprepare(monitor, ctx)
    with pytest.raises(HookError, match="already prepared"):  # the normal holds still count
        hooks.check_allocation(allocated_claim(FLEX_NAME), hooks.discover(ctx), ctx)


def test_admin_claim_over_vfs_creates_and_removes_none(hooks, ctx, node, kernel):
    vfs = [f"{FLEX_NAME}-vf{k}" for k in range(4)]
    before = prepared(hooks, ctx, allocated_claim(*vfs, admin_access=True))
    assert [d.edits.device_nodes for d in before.devices] == [()] * 4, "no VF exists"
    assert [d.edits.env for d in before.devices] == [{}] * 4
    assert numvfs(node) == 0 and kernel.writes == []

    workload = prepared(hooks, ctx, allocated_claim(vfs[1]))
    assert numvfs(node) == 4
    writes = len(kernel.writes)
    during = prepared(hooks, ctx, allocated_claim(*vfs, admin_access=True))
    for index, device in enumerate(during.devices):
        vf = node.gpus[f"0000:03:00.{index + 1}"]
        assert vf.card and vf.render
        assert nodes(device) == gpu_nodes(node, vf.address, vf.card, vf.render), "no MEI on VFs"
    hooks.unprepare(before, ctx)
    assert numvfs(node) == 4 and len(kernel.writes) == writes

    # the monitor does not keep the VFs: the workload's release removes them
    hooks.unprepare(workload, ctx)
    assert numvfs(node) == 0
    writes = len(kernel.writes)
    hooks.unprepare(during, ctx)
    assert len(kernel.writes) == writes


def test_admin_claim_on_a_split_pf(hooks, ctx, node):
    prepared(hooks, ctx, allocated_claim(f"{FLEX_NAME}-vf0"))
    with pytest.raises(HookError, match="split into 4 VFs"):
        hooks.check_allocation(allocated_claim(FLEX_NAME), hooks.discover(ctx), ctx)
    monitor = prepared(hooks, ctx, allocated_claim(FLEX_NAME, admin_access=True))
    assert nodes(monitor.devices[0]) == {
        **gpu_nodes(node, FLEX, "card1", "renderD128"),
        "/dev/mei0": str(node.dev / "mei0"),
    }


def test_admin_share_of_a_shared_gpu_gets_no_share_variables(hooks, node, tmp_path):
    ctx = node_context(node, tmp_path / "state", shared_gpus=A770)
    monitor = prepared(
        hooks,
        ctx,
        allocated_claim(
            A770_NAME,
            consumed={"memory": "16Gi", "millicores": "1000"},
            share_id="7f1c2c9e-3d5b-4a53-9a1e-9a8f3c1b2d4e",
            admin_access=True,
        ),
    )
    (device,) = monitor.devices
    assert "GPU_SHARE_MILLICORES" not in device.edits.env
    assert "/dev/mei1" in nodes(device)


def test_missing_mei_node_is_left_out_with_a_warning(node):
    (node.dev / "mei1").unlink()
    seen: list[str] = []
    sink = logger.add(seen.append, level=logging.WARNING, format="{message}")
    try:
        edits = mei_edits(A770, "mei1", node.dev)
    finally:
        logger.remove(sink)
    assert edits.device_nodes == () and edits.env == {}
    assert len(seen) == 1 and A770 in seen[0] and str(node.dev / "mei1") in seen[0]
    assert mei_edits(A770, None, node.dev).device_nodes == ()


def test_admin_claim_sees_unhealthy_and_skips_lost_gpus(hooks, ctx, node):
    hooks.device_health(hooks.discover(ctx), ctx)  # the error-counter baselines
    node.bump_error(A770)
    with pytest.raises(HookError, match="unhealthy"):
        hooks.check_allocation(allocated_claim(A770_NAME), hooks.discover(ctx), ctx)
    node.unbind(FLEX)  # lost: kept published (unhealthy), its nodes gone
    monitor = allocated_claim(A770_NAME, FLEX_NAME, admin_access=True)
    a770, flex = prepared(hooks, ctx, monitor).devices
    assert "/dev/dri/card2" in nodes(a770) and "/dev/mei1" in nodes(a770)
    assert flex.edits.device_nodes == () and flex.edits.env == {}
