"""VF lifetime: created once per GPU for every VF and claim on it, recorded as the backend's
before ``sriov_numvfs`` is written, removed with the last claim; and the memory of VFs an
administrator made, from the quota their PF gives them."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from dra_backend_i915.testing import GIB, FakeKernel, FakeSysfs, allocated_claim, node_context

from dra_core import NodeContext, PreparedClaim, PrepareError, format_bytes
from dra_core.plugins import HookError, Hooks

PF = "0000:03:00.0"
PF_NAME = "gpu-0000-03-00-0"
MIB = 1 << 20


@pytest.fixture
def flex(fs: FakeSysfs) -> Path:
    return fs.add_gpu(PF, "0x56c0", lmem_total_bytes=16 * GIB, sriov_totalvfs=31)


@pytest.fixture
def ctx(fs: FakeSysfs, tmp_path: Path, flex: Path) -> NodeContext:
    return node_context(fs, tmp_path / "state", vf_profile="flex170=flex170_m4")


def prepared(hooks: Hooks, ctx: NodeContext, *devices: str) -> PreparedClaim:
    claim = allocated_claim(*devices)
    hooks.check_allocation(claim, hooks.discover(ctx), ctx)
    return PreparedClaim(claim.ref, tuple(hooks.prepare(claim, ctx)))


def numvfs(flex: Path) -> int:
    return int((flex / "sriov_numvfs").read_text())


def saved(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "state/i915-state.json").read_text())


def numvfs_writes(kernel: FakeKernel) -> list[str]:
    return [v for p, v in kernel.writes if p.endswith("sriov_numvfs")]


def test_one_claim_with_two_vfs_creates_them_once(hooks, ctx, flex, kernel, tmp_path):
    claim = prepared(hooks, ctx, f"{PF_NAME}-vf0", f"{PF_NAME}-vf1")
    assert numvfs_writes(kernel) == ["4"]
    assert [d.state["address"] for d in claim.devices] == ["0000:03:00.1", "0000:03:00.2"]
    assert all(d.state["createdByBackend"] for d in claim.devices)
    state = saved(tmp_path)
    assert state["created"] == {PF: {"profile": "flex170_m4", "numVfs": 4, "complete": True}}
    assert state["holders"] == {
        f"{PF_NAME}-vf0": [claim.ref.uid],
        f"{PF_NAME}-vf1": [claim.ref.uid],
    }

    hooks.unprepare(claim, ctx)
    assert numvfs_writes(kernel) == ["4", "0"]
    assert numvfs(flex) == 0
    assert saved(tmp_path) == {"version": 1, "created": {}, "holders": {}}
    inventory = hooks.discover(ctx)
    assert inventory.device(PF_NAME) is not None, "the whole GPU is published again"


def test_claims_share_the_vfs_until_the_last_is_released(hooks, ctx, flex, kernel):
    first = prepared(hooks, ctx, f"{PF_NAME}-vf0", f"{PF_NAME}-vf1")
    second = prepared(hooks, ctx, f"{PF_NAME}-vf2")
    third = prepared(hooks, ctx, f"{PF_NAME}-vf3")
    assert numvfs_writes(kernel) == ["4"]
    hooks.unprepare(second, ctx)
    hooks.unprepare(first, ctx)
    assert numvfs(flex) == 4, "vf3 is still held"
    hooks.unprepare(third, ctx)
    assert numvfs(flex) == 0
    assert numvfs_writes(kernel) == ["4", "0"]


class RefusesRemoval(FakeKernel):
    """A kernel that refuses to remove VFs (i915 says EPERM while a VF is assigned to a VM)."""

    refuse = True

    def write(self, path: Path, value: str) -> None:
        if self.refuse and path.name == "sriov_numvfs" and value == "0":
            self.writes.append((str(path.relative_to(self.fs.sys)), value))
            raise OSError(errno.EPERM, os.strerror(errno.EPERM), str(path))
        super().write(path, value)


def test_vfs_left_by_a_failed_creation_stay_ours(hooks, fs, flex, tmp_path, backend):
    # The VFs never get their DRM nodes and the rollback cannot remove them: they stay
    # recorded as this backend's (never taken for an administrator's) and go once possible.
    kernel = RefusesRemoval(fs, materialise=False)
    backend.writer = kernel
    ctx = node_context(
        fs, tmp_path / "state", config={"vfTimeoutSeconds": 0.2}, vf_profile="flex170=flex170_m4"
    )
    claim = allocated_claim(f"{PF_NAME}-vf0")
    with pytest.raises(HookError) as failed:
        hooks.prepare(claim, ctx)
    assert isinstance(failed.value.__cause__, PrepareError)
    message = str(failed.value.__cause__)
    assert f"on {PF} failed while waiting for the VFs to appear" in message
    assert "the rollback could not remove the VFs (EPERM" in message
    assert f"write 0 to {flex / 'sriov_numvfs'} by hand" in message
    assert numvfs(flex) == 4
    state = saved(tmp_path)
    assert state["created"] == {PF: {"profile": "flex170_m4", "numVfs": 4, "complete": False}}
    inventory = hooks.discover(ctx)
    assert inventory.counter_sets, "published as the backend's partitioned GPU, not as admin VFs"

    kernel.refuse = False
    hooks.unprepare(PreparedClaim(claim.ref, ()), ctx)  # the core undoes the failed prepare
    assert numvfs(flex) == 0
    assert saved(tmp_path)["created"] == {}


def test_vf_count_changed_outside_is_a_clear_error(hooks, ctx, fs, flex, kernel):
    first = prepared(hooks, ctx, f"{PF_NAME}-vf0")
    kernel.write(flex / "sriov_numvfs", "0")
    kernel.write(flex / "sriov_numvfs", "2")  # an administrator's
    kernel.join()
    with pytest.raises(HookError) as failed:
        hooks.prepare(allocated_claim(f"{PF_NAME}-vf1"), ctx)
    message = str(failed.value.__cause__)
    assert f"GPU {PF} has 2 VFs where this driver made 4 (flex170_m4)" in message
    assert f"write 0 to {flex / 'sriov_numvfs'}" in message
    hooks.unprepare(first, ctx)


def test_state_is_saved_before_sriov_numvfs_is_written(hooks, ctx, fs, flex, tmp_path, backend):
    seen: list[dict] = []

    class Recording(FakeKernel):
        def write(self, path: Path, value: str) -> None:
            if path.name == "sriov_numvfs" and value != "0":
                seen.append(saved(tmp_path)["created"])
            super().write(path, value)

    backend.writer = kernel = Recording(fs, delay=0.01)
    prepared(hooks, ctx, f"{PF_NAME}-vf1")
    kernel.join()
    assert seen == [{PF: {"profile": "flex170_m4", "numVfs": 4, "complete": False}}]


# -- VFs an administrator made: their memory ---------------------------------------------------


def admin_vfs(fs: FakeSysfs, pf: Path, count: int, quotas: dict[str, int]) -> None:
    """What an administrator does: quotas per VF (relative file -> value), then sriov_numvfs."""
    kernel = fs.kernel(delay=0)
    for vf in range(1, count + 1):
        for relative, value in quotas.items():
            kernel.write(pf / relative.format(vf=vf), str(value))
    kernel.write(pf / "sriov_numvfs", str(count))
    kernel.join()


def vf_memory(hooks: Hooks, ctx: NodeContext, name: str) -> tuple[str | None, object]:
    device = hooks.discover(ctx).device(name)
    assert device is not None
    memory = device.capacity.get("memory")
    return (memory.value if memory else None), device.attributes["memoryKnown"]


def test_admin_vf_memory_from_its_i915_quota(hooks, fs, flex, tmp_path):
    admin_vfs(fs, flex, 2, {"drm/card0/prelim_iov/vf{vf}/gt/lmem_quota": 8000 * MIB})
    ctx = node_context(fs, tmp_path / "state")
    assert vf_memory(hooks, ctx, f"{PF_NAME}-vf1") == ("8000Mi", True)


def test_admin_vf_memory_on_two_tiles_is_the_sum(hooks, fs, max1550, tmp_path):
    tiles = {f"drm/card0/prelim_iov/vf{{vf}}/gt{t}/lmem_quota": 30720 * MIB for t in (0, 1)}
    admin_vfs(fs, max1550, 2, tiles)
    ctx = node_context(fs, tmp_path / "state")
    assert vf_memory(hooks, ctx, "gpu-0000-3a-00-0-vf0") == ("60Gi", True)


def test_admin_vf_memory_from_its_xe_quota(hooks, fs, tmp_path):
    pf = fs.add_gpu(
        "0000:05:00.0", "0xe211", driver="xe", xe_vram_per_tile=[24 * GIB], sriov_totalvfs=24
    )
    admin_vfs(fs, pf, 3, {"sriov_admin/vf{vf}/profile/vram_quota": 6 * GIB})
    ctx = node_context(fs, tmp_path / "state")
    assert vf_memory(hooks, ctx, "gpu-0000-05-00-0-vf2") == (format_bytes(6 * GIB), True)


def test_admin_vf_own_lmem_total_wins(hooks, fs, flex, tmp_path):
    admin_vfs(fs, flex, 1, {"drm/card0/prelim_iov/vf{vf}/gt/lmem_quota": 8000 * MIB})
    vf = fs.gpus["0000:03:00.1"]
    (vf.path / "drm" / str(vf.card) / "lmem_total_bytes").write_text(f"{7900 * MIB}\n")
    ctx = node_context(fs, tmp_path / "state")
    assert vf_memory(hooks, ctx, f"{PF_NAME}-vf0") == ("7900Mi", True)


def test_auto_provisioned_admin_vf_memory_stays_unknown(hooks, fs, flex, tmp_path):
    fs.add_admin_vfs(PF, 2)  # quotas left at 0: the kernel's fair share, not shown in sysfs
    ctx = node_context(fs, tmp_path / "state")
    assert vf_memory(hooks, ctx, f"{PF_NAME}-vf0") == (None, False)


def test_admin_vf_memory_kept_when_the_pf_is_lost(hooks, fs, flex, tmp_path):
    admin_vfs(fs, flex, 2, {"drm/card0/prelim_iov/vf{vf}/gt/lmem_quota": 4000 * MIB})
    ctx = node_context(fs, tmp_path / "state")
    before = hooks.discover(ctx).device(f"{PF_NAME}-vf1")
    fs.unbind(PF)  # the PF's card and its quota tree go with the driver
    after = hooks.discover(ctx).device(f"{PF_NAME}-vf1")
    assert before is not None and after is not None
    assert after.capacity == before.capacity
    assert after.capacity["memory"].value == "4000Mi"


def test_backend_vfs_keep_their_profile_memory(hooks, ctx, flex):
    claim = prepared(hooks, ctx, f"{PF_NAME}-vf0")
    device = hooks.discover(ctx).device(f"{PF_NAME}-vf0")
    assert device is not None and device.attributes["profile"] == "flex170_m4"
    assert device.capacity["memory"].value == "4000Mi"
    hooks.unprepare(claim, ctx)
