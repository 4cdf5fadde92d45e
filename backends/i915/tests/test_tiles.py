"""Two-tile Data Center GPU Max (1550, 1450): the VF quotas on each tile, as the kernel expects.

Each tile (GT directory ``gt0``, ``gt1`` under ``prelim_iov/vfK/``) has its own doorbells and
GGTT, so the per-VF ``doorbells_quota`` and ``ggtt_quota`` of a profile are divided by the
number of tiles, while ``lmem_quota`` is a per-tile figure written whole to both. The fake
kernel refuses more than a tile has (240 doorbells, 4026531840 bytes of GGTT for the VFs),
as i915 does with ``EDQUOT``.
"""

from __future__ import annotations

import errno

import pytest
from dra_backend_i915 import plugin
from dra_backend_i915.profiles import profiles_for
from dra_backend_i915.testing import GIB, I915_GT_LIMITS, allocated_claim, node_context

from dra_core import PreparedClaim

PF = "0000:3a:00.0"
PF_NAME = "gpu-0000-3a-00-0"
TILES = ("gt0", "gt1")
MIB = 1 << 20
ORDER = (
    "exec_quantum_ms",
    "preempt_timeout_us",
    "lmem_quota",
    "ggtt_quota",
    "doorbells_quota",
    "contexts_quota",
)
#: Profile -> (VFs, what each tile of each VF gets, in ORDER). The per-VF doorbells and GGTT
#: of Intel's table (240/4026531840 for one VF, ...) halved; lmem per tile as in the table.
PER_TILE = {
    "max_128g_c1": (1, (64, 128000, 61440 * MIB, 2013265920, 120, 1024)),
    "max_128g_c2": (2, (64, 128000, 30720 * MIB, 1006632960, 120, 1024)),
    "max_128g_c4": (4, (64, 128000, 15360 * MIB, 503316480, 60, 1024)),
    "max_128g_c8": (8, (32, 64000, 7680 * MIB, 251658240, 30, 1024)),
    "max_128g_c16": (16, (16, 32000, 3840 * MIB, 125829120, 15, 1024)),
    "max_128g_c32": (32, (8, 16000, 1920 * MIB, 62914560, 7, 1024)),
    "max_128g_c62": (62, (4, 8000, 990 * MIB, 32440320, 3, 1024)),
}


def add_max(fs, device_id: str = "0x0bd5"):
    return fs.add_gpu(
        PF,
        device_id,
        lmem_total_bytes=128 * GIB,
        sriov_totalvfs=62,
        gts=2,
        vf_gt_dirs=TILES,
    )


def test_the_table_covers_every_two_tile_profile():
    assert {p.name for p in profiles_for("max_128g")} == set(PER_TILE)
    assert all(p.tiles == 2 for p in profiles_for("max_128g"))


@pytest.mark.parametrize("name", sorted(PER_TILE, key=lambda n: PER_TILE[n][0]))
def test_every_quota_on_every_tile(fs, kernel, tmp_path, name):
    pf = add_max(fs)
    count, values = PER_TILE[name]
    backend = plugin.I915Backend(writer=kernel, poll=0.01)
    ctx = node_context(fs, tmp_path / "state", vf_profile=f"max_128g={name}")
    claim = allocated_claim(f"{PF_NAME}-vf{count - 1}")
    devices = backend.prepare(claim, ctx)
    assert int((pf / "sriov_numvfs").read_text()) == count

    iov = "devices/pci0000:00/0000:00:01.0/0000:3a:00.0/drm/card0/prelim_iov"
    expected = [
        (f"{iov}/vf{vf}/{gt}/{file}", str(value))
        for vf in range(1, count + 1)
        for gt in TILES
        for file, value in zip(ORDER, values, strict=True)
    ]
    written = [w for w in kernel.writes if "/prelim_iov/" in w[0]]
    assert written == expected
    assert [p.rsplit("/", 1)[-1] for p, _ in kernel.writes[len(written) :]] == [
        "sriov_drivers_autoprobe",
        "sriov_numvfs",
    ]
    for vf in range(1, 63):
        for gt in TILES:
            held = [int((pf / f"drm/card0/prelim_iov/vf{vf}/{gt}/{f}").read_text()) for f in ORDER]
            assert held == (list(values) if vf <= count else [0] * 6), f"vf{vf}/{gt}"
    # a VF gets the profile's doorbells and GGTT over both tiles, twice lmem_quota in all
    profile = next(p for p in profiles_for("max_128g") if p.name == name)
    assert values[4] * 2 <= profile.doorbells and values[3] * 2 == profile.ggtt

    backend.unprepare(PreparedClaim(claim.ref, tuple(devices)), ctx)
    assert int((pf / "sriov_numvfs").read_text()) == 0
    quotas = pf.glob("drm/card0/prelim_iov/vf*/gt*/*_quota")
    assert {int(p.read_text()) for p in quotas} == {0}
    assert (pf / "drm/card0/prelim_iov/pf/auto_provisioning").read_text().strip() == "1"


@pytest.mark.parametrize("device_id", ["0x0bd5", "0x0bd6"], ids=["max1550", "max1450"])
def test_default_profile_creates_its_vfs(fs, kernel, tmp_path, device_id):
    pf = add_max(fs, device_id)
    backend = plugin.I915Backend(writer=kernel, poll=0.01)
    ctx = node_context(fs, tmp_path / "state")
    (device,) = backend.prepare(allocated_claim(f"{PF_NAME}-vf15"), ctx)
    assert device.state["profile"] == "max_128g_c16"
    assert int((pf / "sriov_numvfs").read_text()) == 16
    for gt in TILES:
        doorbells = pf.glob(f"drm/card0/prelim_iov/vf*/{gt}/doorbells_quota")
        assert sum(int(p.read_text()) for p in doorbells) == 16 * 15  # 240, all the tile has


def test_fake_kernel_refuses_more_than_a_tile_has(fs, kernel):
    pf = add_max(fs)
    iov = pf / "drm/card0/prelim_iov"
    assert I915_GT_LIMITS == {"doorbells_quota": 240, "ggtt_quota": 4026531840}
    for vf in range(1, 9):
        kernel.write(iov / f"vf{vf}/gt0/doorbells_quota", "30")  # 8 x 30 = 240
    with pytest.raises(OSError) as refused:
        kernel.write(iov / "vf9/gt0/doorbells_quota", "30")
    assert refused.value.errno == errno.EDQUOT
    assert (iov / "vf9/gt0/doorbells_quota").read_text().strip() == "0"
    kernel.write(iov / "vf9/gt1/doorbells_quota", "30")  # the other tile has its own
    kernel.write(iov / "vf1/gt0/doorbells_quota", "30")  # rewriting a VF's own value
    kernel.write(iov / "vf1/gt0/doorbells_quota", "0")
    kernel.write(iov / "vf9/gt0/doorbells_quota", "30")  # the freed doorbells

    kernel.write(iov / "vf1/gt1/ggtt_quota", "4026531840")
    with pytest.raises(OSError) as refused:
        kernel.write(iov / "vf2/gt1/ggtt_quota", str(64 * 1024))
    assert refused.value.errno == errno.EDQUOT
    kernel.write(iov / "vf2/gt0/ggtt_quota", "4026531840")
