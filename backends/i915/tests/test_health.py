"""Health from sysfs signals and its transitions."""

from __future__ import annotations

import pytest
from dra_backend_i915.testing import GIB, allocated_claim, node_context

from dra_core import AllocationError
from dra_core.plugins import HookError

PF = "0000:03:00.0"


@pytest.fixture
def ctx(fs, tmp_path):
    fs.add_gpu(PF, "0x56c0", lmem_total_bytes=16 * GIB, sriov_totalvfs=31, error_counters=True)
    fs.add_gpu("0000:08:00.0", "0x56a0", bridge="0000:00:1c.0", error_counters=True)
    return node_context(fs, tmp_path / "state", vf_profile="flex170=flex170_m2")


def unhealthy(hooks, ctx, inventory=None):
    inventory = inventory or hooks.discover(ctx)
    return {
        h.device: (h.message, h.effect)
        for h in hooks.device_health(inventory, ctx)
        if not h.healthy
    }


def test_all_healthy(hooks, ctx):
    inventory = hooks.discover(ctx)
    reports = hooks.device_health(inventory, ctx)
    assert {h.device for h in reports} == {d.name for d in inventory.devices}
    assert all(h.healthy for h in reports)


def test_error_counter_rising_is_sticky_until_rebind(hooks, ctx, fs):
    inventory = hooks.discover(ctx)
    assert unhealthy(hooks, ctx, inventory) == {}
    fs.bump_error(PF, "fatal_l3_double")
    bad = unhealthy(hooks, ctx, inventory)
    # the PF and every VF of it
    assert set(bad) == {"gpu-0000-03-00-0", "gpu-0000-03-00-0-vf0", "gpu-0000-03-00-0-vf1"}
    message, effect = bad["gpu-0000-03-00-0"]
    assert "gt0/fatal_l3_double rose from 0 to 1" in message and effect == "NoExecute"
    assert bad["gpu-0000-03-00-0-vf0"][0].startswith("its PF:")
    assert set(unhealthy(hooks, ctx, inventory)) == set(bad)  # sticky
    with pytest.raises(HookError) as refused:
        hooks.check_allocation(allocated_claim("gpu-0000-03-00-0-vf0"), inventory, ctx)
    assert isinstance(refused.value.__cause__, AllocationError)
    # driver rebound: new baseline
    fs.rebind(PF, "vfio-pci")
    assert "now bound to vfio-pci" in unhealthy(hooks, ctx, inventory)["gpu-0000-03-00-0"][0]
    fs.rebind(PF, "i915")
    assert unhealthy(hooks, ctx, inventory) == {}


def test_device_gone_and_unbound(hooks, ctx, fs):
    inventory = hooks.discover(ctx)
    fs.unbind("0000:08:00.0")
    message, effect = unhealthy(hooks, ctx, inventory)["gpu-0000-08-00-0"]
    assert "no longer bound to i915" in message and effect == "NoExecute"
    fs.remove(PF)
    bad = unhealthy(hooks, ctx, inventory)
    assert "0000:03:00.0 is gone from sysfs" in bad["gpu-0000-03-00-0"][0]
    assert "gone from sysfs" in bad["gpu-0000-03-00-0-vf1"][0]
    # published earlier in this run: still there, refused as unhealthy
    with pytest.raises(HookError, match=r"is unhealthy: 0000:03:00\.0 is gone from sysfs"):
        hooks.check_allocation(allocated_claim("gpu-0000-03-00-0"), inventory, ctx)
    with pytest.raises(HookError, match="not on node node-1 any more"):
        hooks.check_allocation(allocated_claim("gpu-0000-09-00-0"), inventory, ctx)


def test_aer_and_survivability(hooks, ctx, fs):
    inventory = hooks.discover(ctx)
    assert unhealthy(hooks, ctx, inventory) == {}
    path = fs.gpus["0000:08:00.0"].path
    (path / "aer_dev_fatal").write_text("Undefined 0\nTOTAL_ERR_FATAL 2\n")
    assert (
        "aer_dev_fatal rose from 0 to 2" in unhealthy(hooks, ctx, inventory)["gpu-0000-08-00-0"][0]
    )
    (fs.gpus[PF].path / "survivability_mode").write_text("1\n")
    assert "survivability" in unhealthy(hooks, ctx, inventory)["gpu-0000-03-00-0"][0]


def test_created_vf_checked_itself(hooks, ctx, fs):
    hooks.prepare(allocated_claim("gpu-0000-03-00-0-vf1"), ctx)
    inventory = hooks.discover(ctx)
    assert unhealthy(hooks, ctx, inventory) == {}
    fs.unbind("0000:03:00.2")
    bad = unhealthy(hooks, ctx, inventory)
    assert set(bad) == {"gpu-0000-03-00-0-vf1"}
    assert "0000:03:00.2 is no longer bound" in bad["gpu-0000-03-00-0-vf1"][0]


def test_admin_vf_follows_pf(hooks, fs, tmp_path):
    fs.add_gpu(PF, "0x56c0", sriov_totalvfs=31, error_counters=True)
    fs.add_admin_vfs(PF, 2)
    ctx = node_context(fs, tmp_path / "state")
    inventory = hooks.discover(ctx)
    assert unhealthy(hooks, ctx, inventory) == {}
    fs.bump_error(PF)
    assert set(unhealthy(hooks, ctx, inventory)) == {
        "gpu-0000-03-00-0-vf0",
        "gpu-0000-03-00-0-vf1",
    }
