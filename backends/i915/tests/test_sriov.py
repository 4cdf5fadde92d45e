"""SR-IOV: VFs created at the first VF's prepare, torn down after the last; failures roll back."""

from __future__ import annotations

import errno
import json

import pytest
from dra_backend_i915 import plugin
from dra_backend_i915.config import GpuConfig
from dra_backend_i915.discovery import Discoverer
from dra_backend_i915.memory import DrmMemoryQuery
from dra_backend_i915.profiles import PROFILES
from dra_backend_i915.sriov import I915_QUOTA_ORDER, VfProvisioner
from dra_backend_i915.testing import GIB, FakeDrmIoctl, allocated_claim, node_context

from dra_core import AllocationError, PreparedClaim, PrepareError
from dra_core.plugins import HookError, from_objects

PF = "0000:03:00.0"
PF_NAME = "gpu-0000-03-00-0"


@pytest.fixture
def flex(fs):
    return fs.add_gpu(PF, "0x56c0", lmem_total_bytes=16 * GIB, sriov_totalvfs=31)


@pytest.fixture
def ctx(fs, tmp_path, flex):
    return node_context(fs, tmp_path / "state", vf_profile="flex170=flex170_m4")


def prepared(hooks, ctx, claim):
    hooks.check_allocation(claim, hooks.discover(ctx), ctx)
    devices = hooks.prepare(claim, ctx)
    return PreparedClaim(claim.ref, tuple(devices))


def numvfs(flex) -> int:
    return int((flex / "sriov_numvfs").read_text())


def cause(excinfo):
    return excinfo.value.__cause__


def test_first_vf_creates_all_last_vf_tears_down(hooks, ctx, fs, flex, kernel, tmp_path):
    before = hooks.discover(ctx)
    first = allocated_claim(f"{PF_NAME}-vf0")
    one = prepared(hooks, ctx, first)
    assert numvfs(flex) == 4
    assert sorted(p.name for p in flex.glob("virtfn*")) == [f"virtfn{k}" for k in range(4)]
    (device,) = one.devices
    assert device.state["createdByBackend"] is True
    assert device.state["address"] == "0000:03:00.1"
    paths = {n.path for n in device.edits.device_nodes}
    vf_dir = (flex / "virtfn0").resolve()
    card = next(p.name for p in (vf_dir / "drm").glob("card*"))
    assert f"/dev/dri/{card}" in paths
    assert "/dev/dri/by-path/pci-0000:03:00.1-render" in paths
    hosts = {n.path: n.host_path for n in device.edits.device_nodes}
    render = next(p.name for p in (vf_dir / "drm").glob("renderD*"))
    assert hosts["/dev/dri/by-path/pci-0000:03:00.1-render"] == str(fs.dev / "dri" / render)
    assert hosts["/dev/dri/by-path/pci-0000:03:00.1-card"] == str(fs.dev / "dri" / card)
    assert device.edits.env["DRI_RENDER_NODE"].startswith("/dev/dri/renderD")

    # the kernel saw quotas (in order, per VF and GT) before autoprobe and numvfs
    names = [w[0].rsplit("/", 1)[-1] for w in kernel.writes]
    assert names[:6] == list(I915_QUOTA_ORDER)
    assert names[-2:] == ["sriov_drivers_autoprobe", "sriov_numvfs"]
    assert len(names) == 4 * 6 + 2
    lmem = flex / "drm/card0/prelim_iov/vf3/gt/lmem_quota"
    assert int(lmem.read_text()) == 4000 << 20

    # the published model does not change once the VFs exist
    assert hooks.discover(ctx) == before
    state = json.loads((tmp_path / "state/i915-state.json").read_text())
    assert state["created"][PF] == {"profile": "flex170_m4", "numVfs": 4, "complete": True}

    # a second VF: no new writes
    kernel.writes.clear()
    two = prepared(hooks, ctx, allocated_claim(f"{PF_NAME}-vf2"))
    assert kernel.writes == []

    # the whole GPU is refused while VFs exist
    whole = allocated_claim(PF_NAME)
    with pytest.raises(HookError) as refused:
        hooks.check_allocation(whole, hooks.discover(ctx), ctx)
    assert isinstance(cause(refused), AllocationError)
    assert "split into 4 VFs" in str(cause(refused))
    with pytest.raises(HookError) as failed:
        hooks.prepare(whole, ctx)
    assert isinstance(cause(failed), PrepareError)

    hooks.unprepare(one, ctx)
    assert numvfs(flex) == 4  # vf2 still held
    hooks.unprepare(two, ctx)
    assert numvfs(flex) == 0
    assert not list(flex.glob("virtfn*"))
    assert int(lmem.read_text()) == 0
    assert (flex / "drm/card0/prelim_iov/pf/auto_provisioning").read_text().strip() == "1"
    hooks.unprepare(two, ctx)  # idempotent
    # and the whole GPU is available again
    prepared(hooks, ctx, whole)


def test_prepare_is_idempotent(hooks, ctx, flex, kernel):
    claim = allocated_claim(f"{PF_NAME}-vf1")
    first = hooks.prepare(claim, ctx)
    writes = len(kernel.writes)
    assert hooks.prepare(claim, ctx) == first
    assert len(kernel.writes) == writes


def test_vfs_not_appearing_rolls_back(hooks, fs, flex, tmp_path, backend):
    backend.writer = fs.kernel(materialise=False)
    ctx = node_context(
        fs, tmp_path / "state", config={"vfTimeoutSeconds": 0.2}, vf_profile="flex170=flex170_m4"
    )
    with pytest.raises(HookError) as failed:
        prepared(hooks, ctx, allocated_claim(f"{PF_NAME}-vf0"))
    message = str(cause(failed))
    assert isinstance(cause(failed), PrepareError)
    assert "0 of 4 VFs" in message and "rolled back" in message
    assert numvfs(flex) == 0
    assert all(
        p.read_text().strip() == "0" for p in flex.glob("drm/card0/prelim_iov/vf*/gt/*_quota")
    )
    assert (flex / "drm/card0/prelim_iov/pf/auto_provisioning").read_text().strip() == "1"
    state = json.loads((tmp_path / "state/i915-state.json").read_text())
    assert state["created"] == {} and state["holders"] == {}


@pytest.mark.parametrize(
    ("name", "code", "text"),
    [
        ("sriov_numvfs", errno.EBUSY, "EBUSY"),
        ("doorbells_quota", errno.EDQUOT, "EDQUOT"),
        ("sriov_drivers_autoprobe", errno.EIO, "EIO"),
    ],
)
def test_write_failure_half_way_rolls_back(hooks, ctx, flex, kernel, name, code, text):
    kernel.fail[name] = code
    with pytest.raises(HookError) as failed:
        hooks.prepare(allocated_claim(f"{PF_NAME}-vf0"), ctx)
    assert isinstance(cause(failed), PrepareError)
    assert text in str(cause(failed))
    assert numvfs(flex) == 0
    assert (flex / "drm/card0/prelim_iov/pf/auto_provisioning").read_text().strip() == "1"
    del kernel.fail[name]
    prepared(hooks, ctx, allocated_claim(f"{PF_NAME}-vf0"))  # the retry works
    assert numvfs(flex) == 4


def test_fake_kernel_rules(fs, flex, kernel):
    path = flex / "sriov_numvfs"
    with pytest.raises(OSError) as too_many:
        kernel.write(path, "32")
    assert too_many.value.errno == errno.ERANGE
    kernel.write(path, "2")
    kernel.write(path, "2")  # same value: no-op
    with pytest.raises(OSError) as busy:
        kernel.write(path, "3")
    assert busy.value.errno == errno.EBUSY
    kernel.join()
    kernel.write(path, "0")
    assert not list(flex.glob("virtfn*"))
    fs.unbind(PF)
    with pytest.raises(OSError) as unbound:
        kernel.write(path, "1")
    assert unbound.value.errno == errno.ENOENT


def test_vfs_made_by_someone_else_after_discovery(hooks, ctx, fs, flex, kernel):
    # an administrator enabled 2 VFs between discovery and prepare: vf0 is now theirs
    claim = allocated_claim(f"{PF_NAME}-vf0")
    hooks.discover(ctx)
    fs.add_admin_vfs(PF, 2)
    done = hooks.prepare(claim, ctx)
    assert done[0].state["createdByBackend"] is False
    assert kernel.writes == []
    with pytest.raises(HookError) as failed:  # vf3 does not exist in the admin's layout
        hooks.prepare(allocated_claim(f"{PF_NAME}-vf3"), ctx)
    assert "not on node" in str(cause(failed))


def test_admin_vfs_never_touched(hooks, fs, flex, kernel, tmp_path):
    fs.add_admin_vfs(PF, 2)
    ctx = node_context(fs, tmp_path / "state")
    claim = allocated_claim(f"{PF_NAME}-vf1")
    done = prepared(hooks, ctx, claim)
    assert done.devices[0].state["createdByBackend"] is False
    assert done.devices[0].edits.env["DRI_RENDER_NODE_0000_03_00_2"].startswith("/dev/dri/")
    hooks.unprepare(done, ctx)
    assert kernel.writes == []
    assert numvfs(flex) == 2


def interrupted(tmp_path, num_vfs: int = 4) -> None:
    """The state an agent leaves when it dies after saving its intent to make VFs."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "i915-state.json").write_text(
        json.dumps(
            {
                "version": 1,
                "created": {PF: {"profile": "flex170_m4", "numVfs": num_vfs, "complete": False}},
                "holders": {},
            }
        )
    )


def test_interrupted_creation_is_used(hooks, ctx, fs, flex, kernel, tmp_path):
    # the agent died after writing sriov_numvfs (quotas first), before recording the VFs made
    interrupted(tmp_path)
    fs.add_admin_vfs(PF, 4)
    done = prepared(hooks, ctx, allocated_claim(f"{PF_NAME}-vf3"))
    assert kernel.writes == [], "the VFs of the recorded count are used as they are"
    assert done.devices[0].state["address"] == "0000:03:00.4"
    assert done.devices[0].state["createdByBackend"] is True
    state = json.loads((tmp_path / "state/i915-state.json").read_text())
    assert state["created"][PF]["complete"] is True
    hooks.unprepare(done, ctx)
    assert numvfs(flex) == 0, "ours: removed with the last claim"


def test_interrupted_creation_with_other_count_is_redone(hooks, ctx, fs, flex, kernel, tmp_path):
    interrupted(tmp_path)
    fs.add_admin_vfs(PF, 2)
    done = prepared(hooks, ctx, allocated_claim(f"{PF_NAME}-vf3"))
    assert [v for p, v in kernel.writes if p.endswith("sriov_numvfs")] == ["0", "4"]
    assert done.devices[0].state["address"] == "0000:03:00.4"


def test_interrupted_creation_unused_is_torn_down(hooks, ctx, fs, flex, kernel, tmp_path):
    # the core rolls back the claim that was being prepared: nobody holds the VFs
    interrupted(tmp_path)
    fs.add_admin_vfs(PF, 4)
    claim = allocated_claim(f"{PF_NAME}-vf0")
    hooks.unprepare(PreparedClaim(claim.ref, ()), ctx)
    assert numvfs(flex) == 0
    state = json.loads((tmp_path / "state/i915-state.json").read_text())
    assert state["created"] == {}


def test_state_survives_restart(fs, flex, tmp_path, kernel):
    ctx = node_context(fs, tmp_path / "state", vf_profile="flex170=flex170_m4")
    first = plugin.I915Backend(writer=kernel, poll=0.01)
    claim = allocated_claim(f"{PF_NAME}-vf0")
    devices = first.prepare(claim, ctx)
    second = plugin.I915Backend(writer=kernel, poll=0.01)  # the agent restarted
    assert second.discover(ctx).counter_sets
    second.unprepare(PreparedClaim(claim.ref, tuple(devices)), ctx)
    assert numvfs(flex) == 0


def test_profile_config_must_match(hooks, ctx):
    wrong = GpuConfig.model_validate(
        {"apiVersion": "gpu.intel.com/v1alpha1", "kind": "GpuConfig", "vfProfile": "flex170_m8"}
    )
    claim = allocated_claim(f"{PF_NAME}-vf0", configs={"r0": (wrong,)})
    with pytest.raises(HookError) as refused:
        hooks.check_allocation(claim, hooks.discover(ctx), ctx)
    assert "flex170_m4" in str(cause(refused))
    with pytest.raises(HookError):
        hooks.prepare(claim, ctx)
    right = GpuConfig.model_validate(
        {"apiVersion": "gpu.intel.com/v1alpha1", "kind": "GpuConfig", "vfProfile": "flex170_m4"}
    )
    prepared(hooks, ctx, allocated_claim(f"{PF_NAME}-vf0", configs={"r0": (right,)}))


def test_vf_refused_while_pf_held_whole(hooks, ctx):
    prepared(hooks, ctx, allocated_claim(PF_NAME))
    with pytest.raises(HookError) as refused:
        hooks.check_allocation(allocated_claim(f"{PF_NAME}-vf0"), hooks.discover(ctx), ctx)
    assert "held whole" in str(cause(refused))


def test_max1550_quotas_on_both_tiles(fs, kernel, max1550, tmp_path):
    backend = plugin.I915Backend(writer=kernel, poll=0.01)
    ctx = node_context(fs, tmp_path / "state", vf_profile="max_128g=max_128g_c2")
    backend.prepare(allocated_claim("gpu-0000-3a-00-0-vf1"), ctx)
    for gt in ("gt0", "gt1"):
        lmem = max1550 / f"drm/card0/prelim_iov/vf2/{gt}/lmem_quota"
        assert int(lmem.read_text()) == 30720 << 20
    assert int((max1550 / "sriov_numvfs").read_text()) == 2


def test_xe_sriov_admin_profile(fs, kernel, tmp_path):
    pf = fs.add_gpu(
        "0000:05:00.0", "0xe211", driver="xe", xe_vram_per_tile=[24 * GIB], sriov_totalvfs=24
    )
    backend = plugin.I915Backend(writer=kernel, poll=0.01)
    ctx = node_context(fs, tmp_path / "state")
    inventory = backend.discover(ctx)
    assert inventory.devices[0].name == "gpu-0000-05-00-0"  # the PF first
    backend.prepare(allocated_claim("gpu-0000-05-00-0-vf0"), ctx)
    quota = int((pf / "sriov_admin/vf4/profile/vram_quota").read_text())
    assert quota == 25367150592 // 4 // (1 << 20) * (1 << 20)  # 24 GiB >= pool: ECC off
    assert int((pf / "sriov_numvfs").read_text()) == 4


def test_provisioner_refuses_dirty_pf(fs, flex, kernel):
    fs.add_admin_vfs(PF, 1)
    pf = (
        Discoverer(fs.sys, fs.dev, DrmMemoryQuery(ioctl=FakeDrmIoctl({}))).discover().by_address(PF)
    )
    assert pf is not None
    with pytest.raises(PrepareError, match="already 1"):
        VfProvisioner(kernel, timeout=0.1).create(pf, PROFILES["flex170_m4"])
    assert numvfs(flex) == 1


def test_hooks_from_the_entry_point_class():
    hooks = from_objects("i915", plugin.I915Backend)
    assert hooks.backend_identity().driver_name == "gpu.intel.com"


def test_vfs_removed_behind_our_back_are_recreated(hooks, ctx, flex, kernel):
    first = prepared(hooks, ctx, allocated_claim(f"{PF_NAME}-vf0"))
    kernel.write(flex / "sriov_numvfs", "0")  # someone removed them
    second = prepared(hooks, ctx, allocated_claim(f"{PF_NAME}-vf1"))
    assert numvfs(flex) == 4
    assert second.devices[0].state["address"] == "0000:03:00.2"
    hooks.unprepare(first, ctx)
    hooks.unprepare(second, ctx)
    assert numvfs(flex) == 0
