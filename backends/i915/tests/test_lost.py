"""A GPU that was published and then lost its driver stays published, unhealthy, until rebound."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
from dra_backend_i915.state import StateStore
from dra_backend_i915.testing import GIB, allocated_claim, node_context
from loguru import logger

from dra_core import AllocationError, PreparedClaim, PrepareError
from dra_core.plugins import HookError

FLEX = "0000:03:00.0"
A770 = "0000:08:00.0"
FLEX_DEVICE = "gpu-0000-03-00-0"
A770_DEVICE = "gpu-0000-08-00-0"
VFS = [f"{FLEX_DEVICE}-vf0", f"{FLEX_DEVICE}-vf1"]


@pytest.fixture
def ctx(fs, tmp_path):
    fs.add_gpu(FLEX, "0x56c0", lmem_total_bytes=16 * GIB, sriov_totalvfs=31, error_counters=True)
    fs.add_gpu(
        A770, "0x56a0", bridge="0000:00:1c.0", lmem_total_bytes=16 * GIB, error_counters=True
    )
    return node_context(fs, tmp_path / "state", vf_profile="flex170=flex170_m2")


@pytest.fixture
def logs() -> Iterator[list[tuple[str, str]]]:
    records: list[tuple[str, str]] = []
    sink = logger.add(lambda m: records.append((m.record["level"].name, m.record["message"])))
    yield records
    logger.remove(sink)


def unhealthy(hooks, ctx, inventory):
    return {
        h.device: (h.message, h.effect)
        for h in hooks.device_health(inventory, ctx)
        if not h.healthy
    }


def refused(hooks, ctx, inventory, device: str) -> str:
    with pytest.raises(HookError) as error:
        hooks.check_allocation(allocated_claim(device), inventory, ctx)
    assert isinstance(error.value.__cause__, AllocationError)
    return str(error.value.__cause__)


def test_unbound_gpu_stays_published_unhealthy_until_rebound(hooks, ctx, fs, logs):
    before = hooks.discover(ctx)
    assert unhealthy(hooks, ctx, before) == {}  # the error counters' baseline
    fs.bump_error(A770)  # a sticky fatal error first: the rebind must clear it too
    assert A770_DEVICE in unhealthy(hooks, ctx, before)

    fs.unbind(A770)
    after = hooks.discover(ctx)
    assert after == before, "same devices, attributes, capacities and counters"
    bad = unhealthy(hooks, ctx, after)
    assert bad == {A770_DEVICE: (f"{A770} is no longer bound to i915", "NoExecute")}
    assert refused(hooks, ctx, after, A770_DEVICE) == (
        f"device {A770_DEVICE} is unhealthy: {A770} is no longer bound to i915"
    )
    with pytest.raises(HookError) as error:
        hooks.prepare(allocated_claim(A770_DEVICE), ctx)
    assert isinstance(error.value.__cause__, PrepareError)
    assert "not bound to any driver" in str(error.value)
    assert any(
        level == "WARNING" and f"GPU {A770} was published and is no longer usable" in message
        for level, message in logs
    )
    assert not any("not published" in message for _, message in logs)

    fs.rebind(A770, "i915")  # new card number, error counters back at 0
    again = hooks.discover(ctx)
    assert [d.name for d in again.devices] == [d.name for d in before.devices]
    assert unhealthy(hooks, ctx, again) == {}
    hooks.check_allocation(allocated_claim(A770_DEVICE), again, ctx)
    (prepared,) = hooks.prepare(allocated_claim(A770_DEVICE), ctx)
    assert prepared.edits.env["DRI_CARD_NODE"] == f"/dev/dri/{fs.gpus[A770].card}"


def test_bound_to_vfio_pci(hooks, ctx, fs):
    before = hooks.discover(ctx)
    fs.rebind(A770, "vfio-pci")
    after = hooks.discover(ctx)
    assert after == before
    message, effect = unhealthy(hooks, ctx, after)[A770_DEVICE]
    assert message == f"{A770} is now bound to vfio-pci, not i915" and effect == "NoExecute"
    assert "bound to vfio-pci" in refused(hooks, ctx, after, A770_DEVICE)
    fs.rebind(A770, "i915")
    assert unhealthy(hooks, ctx, hooks.discover(ctx)) == {}


def test_gone_from_sysfs(hooks, ctx, fs):
    before = hooks.discover(ctx)
    fs.remove(A770)
    after = hooks.discover(ctx)
    assert after == before
    message, effect = unhealthy(hooks, ctx, after)[A770_DEVICE]
    assert message.startswith(f"{A770} is gone from sysfs") and effect == "NoExecute"
    assert "gone from sysfs" in refused(hooks, ctx, after, A770_DEVICE)


def test_dangling_link(hooks, ctx, fs):
    before = hooks.discover(ctx)
    shutil.rmtree(fs.gpus[A770].path)  # bus/pci/devices/<address> now points nowhere
    after = hooks.discover(ctx)
    assert after == before
    message, effect = unhealthy(hooks, ctx, after)[A770_DEVICE]
    assert "gone from sysfs" in message and effect == "NoExecute"


def test_never_published_gpu_stays_absent(hooks, fs, tmp_path, logs):
    fs.add_gpu(A770, "0x56a0", driver=None)
    ctx = node_context(fs, tmp_path / "state")
    for _ in range(2):
        assert hooks.discover(ctx).devices == ()
    assert any(
        level == "WARNING" and f"GPU {A770} not published: Arc A770" in message
        for level, message in logs
    )
    fs.rebind(A770, "i915")
    (device,) = hooks.discover(ctx).devices
    assert device.name == A770_DEVICE


def test_vfs_follow_their_pf(hooks, ctx, fs, kernel):
    before = hooks.discover(ctx)
    fs.unbind(FLEX)
    after = hooks.discover(ctx)
    assert after == before, "the PF, its planned VFs and their counter set stay"
    bad = unhealthy(hooks, ctx, after)
    assert set(bad) == {FLEX_DEVICE, *VFS}
    assert bad[VFS[0]] == (f"its PF: {FLEX} is no longer bound to i915", "NoExecute")
    assert f"its PF: {FLEX} is no longer bound" in refused(hooks, ctx, after, VFS[0])
    with pytest.raises(HookError, match=f"{VFS[0]} cannot be prepared"):
        hooks.prepare(allocated_claim(VFS[0]), ctx)
    assert kernel.writes == [], "nothing written to a PF without its driver"
    fs.rebind(FLEX, "i915")
    again = hooks.discover(ctx)
    assert again == before
    assert unhealthy(hooks, ctx, again) == {}
    hooks.prepare(allocated_claim(VFS[0]), ctx)
    assert int((fs.gpus[FLEX].path / "sriov_numvfs").read_text()) == 2


def test_admin_vfs_follow_their_pf(hooks, fs, tmp_path):
    fs.add_gpu(FLEX, "0x56c0", sriov_totalvfs=31)
    fs.add_admin_vfs(FLEX, 2)
    ctx = node_context(fs, tmp_path / "state")
    before = hooks.discover(ctx)
    assert [d.name for d in before.devices] == VFS
    fs.remove_vfs(FLEX)
    fs.remove(FLEX)
    after = hooks.discover(ctx)
    assert after == before
    bad = unhealthy(hooks, ctx, after)
    assert set(bad) == set(VFS)
    assert bad[VFS[1]][0].startswith(f"its PF: {FLEX} is gone from sysfs")
    assert "gone from sysfs" in refused(hooks, ctx, after, VFS[1])


def test_unprepare_with_the_hardware_gone(hooks, ctx, fs, kernel, logs):
    claim = allocated_claim(VFS[1])
    (device,) = hooks.prepare(claim, ctx)
    fs.remove_vfs(FLEX)
    fs.remove(FLEX)
    writes = len(kernel.writes)
    hooks.unprepare(PreparedClaim(claim.ref, (device,)), ctx)  # no error
    assert kernel.writes[writes:] == []
    assert any(
        f"{FLEX} is gone from sysfs; its VFs are gone with it, nothing to tear down" in message
        for _, message in logs
    )
    assert StateStore(ctx.state_dir).load().created == {}


def test_unprepare_when_the_pf_lost_its_driver_but_vfs_remain(hooks, ctx, fs, kernel, logs):
    claim = allocated_claim(VFS[0])
    (device,) = hooks.prepare(claim, ctx)
    fs.unbind(FLEX)  # the fake keeps the VFs; the kernel refuses sriov_numvfs without a driver
    hooks.unprepare(PreparedClaim(claim.ref, (device,)), ctx)  # no error
    assert any(
        level == "WARNING" and "removing its remaining VFs failed" in message
        for level, message in logs
    )
    inventory = hooks.discover(ctx)
    assert {FLEX_DEVICE, *VFS} <= {d.name for d in inventory.devices}
    assert set(unhealthy(hooks, ctx, inventory)) == {FLEX_DEVICE, *VFS}
