"""The published inventory: whole GPUs, partitionable PFs, admin VFs, sharing, profiles."""

from __future__ import annotations

import pytest
from dra_backend_i915.config import settings_from
from dra_backend_i915.discovery import Discoverer
from dra_backend_i915.inventory import build
from dra_backend_i915.profiles import PROFILES, ProfileError, choose, parse_overrides
from dra_backend_i915.state import CreatedVfs, State
from dra_backend_i915.testing import GIB, FakeSysfs, build_demo

from dra_core import parse_quantity
from dra_core.model import validate_inventory


def inventory(fs: FakeSysfs, state: State | None = None, **options: str):
    opts = {"sysfs_root": str(fs.sys), "devfs_root": str(fs.dev), **options}
    settings = settings_from(opts, {})
    built = build(Discoverer(fs.sys, fs.dev).discover(), settings, state or State())
    validate_inventory(built.inventory)
    return built


def test_whole_gpu_attributes(fs):
    fs.add_gpu("0000:03:00.0", "0x56a0", lmem_total_bytes=16 * GIB, numa_node=1)
    (device,) = inventory(fs).inventory.devices
    assert device.name == "gpu-0000-03-00-0"
    assert dict(device.attributes) == {
        "type": "gpu",
        "model": "Arc A770",
        "family": "Arc A-Series",
        "driver": "i915",
        "pciId": "0x56a0",
        "pciAddress": "0000:03:00.0",
        "sriov": False,
        "memoryKnown": True,
        "numa": 1,
        "resource.kubernetes.io/pcieRoot": "pci0000:00",
        "resource.kubernetes.io/pciBusID": "0000:03:00.0",
    }
    assert device.capacity["memory"].value == "16Gi"
    assert not device.allow_multiple_allocations and not device.consumes_counters


def test_unknown_memory_publishes_no_capacity(fs):
    fs.add_gpu("0000:03:00.0", "0x56a0")
    (device,) = inventory(fs).inventory.devices
    assert device.attributes["memoryKnown"] is False
    assert "memory" not in device.capacity


def test_flex170_partitionable(fs):
    fs.add_gpu("0000:03:00.0", "0x56c0", lmem_total_bytes=16 * GIB, sriov_totalvfs=31)
    fs.add_gpu("0000:08:00.0", "0x56a0", lmem_total_bytes=16 * GIB)
    built = inventory(fs, vf_profile="flex170=flex170_m4")
    names = [d.name for d in built.inventory.devices]
    assert names == [
        "gpu-0000-08-00-0",  # plain GPU first
        "gpu-0000-03-00-0",  # the PF before its VFs
        *(f"gpu-0000-03-00-0-vf{k}" for k in range(4)),
    ]
    (counter_set,) = built.inventory.counter_sets
    assert counter_set.name == "gpu-0000-03-00-0"
    assert dict(counter_set.counters) == {"vfs": "4", "memory": "16Gi"}
    vf = built.inventory.device("gpu-0000-03-00-0-vf1")
    assert vf is not None
    assert vf.attributes["type"] == "vf"
    assert vf.attributes["parent"] == "gpu-0000-03-00-0"
    assert vf.attributes["profile"] == "flex170_m4"
    assert vf.attributes["pciAddress"] == "0000:03:00.2"
    assert vf.capacity["memory"].value == "4000Mi"  # ECC off: 16 GiB >= 16000 MiB
    assert dict(vf.consumes_counters[0].counters) == {"vfs": "1", "memory": "4Gi"}
    pf = built.inventory.device("gpu-0000-03-00-0")
    assert pf is not None
    assert dict(pf.consumes_counters[0].counters) == {"vfs": "4", "memory": "16Gi"}
    assert pf.attributes["sriov"] is True
    shares = [built.inventory.device(n) for n in names[2:6]]
    total = sum(parse_quantity(d.consumes_counters[0].counters["memory"]) for d in shares if d)
    assert total <= parse_quantity("16Gi")


def test_ecc_detected_from_memory(fs):
    fs.add_gpu("0000:03:00.0", "0x56c0", lmem_total_bytes=14 * GIB, sriov_totalvfs=31)
    built = inventory(fs, vf_profile="flex170=flex170_m4")
    assert built.inventory.device("gpu-0000-03-00-0-vf0").capacity["memory"].value == "3384Mi"  # type: ignore[union-attr]


def test_max1550_two_tiles_vf_memory(fs, max1550):
    built = inventory(fs)
    vfs = [d for d in built.inventory.devices if d.attributes["type"] == "vf"]
    assert len(vfs) == 16  # default max_128g_c16
    assert vfs[0].capacity["memory"].value == "7680Mi"  # 3840 MiB per tile, two tiles


def test_default_profile_and_none(fs):
    fs.add_gpu("0000:03:00.0", "0x56c0", lmem_total_bytes=16 * GIB, sriov_totalvfs=31)
    assert len(inventory(fs).inventory.devices) == 9  # flex170_m8 + PF
    only = inventory(fs, vf_profile="0x56c0=none").inventory
    assert [d.name for d in only.devices] == ["gpu-0000-03-00-0"]
    assert only.counter_sets == ()


def test_profile_needing_more_vfs_than_total_is_not_used(fs):
    fs.add_gpu("0000:03:00.0", "0x56c0", lmem_total_bytes=16 * GIB, sriov_totalvfs=4)
    assert [d.name for d in inventory(fs).inventory.devices] == ["gpu-0000-03-00-0"]


def test_autoprobe_off_means_no_partitioning(fs):
    path = fs.add_gpu("0000:03:00.0", "0x56c0", lmem_total_bytes=16 * GIB, sriov_totalvfs=31)
    (path / "sriov_drivers_autoprobe").write_text("0\n")
    assert len(inventory(fs).inventory.devices) == 1


def test_unknown_pf_memory_only_vf_counter(fs):
    fs.add_gpu("0000:03:00.0", "0x56c1", sriov_totalvfs=31)
    built = inventory(fs)
    (counter_set,) = built.inventory.counter_sets
    assert dict(counter_set.counters) == {"vfs": "6"}
    vf = built.inventory.device("gpu-0000-03-00-0-vf0")
    assert vf is not None and vf.capacity["memory"].value == "774Mi"  # unknown: ECC assumed


def test_admin_vfs_published_as_they_are(fs):
    fs.add_gpu("0000:03:00.0", "0x56c0", lmem_total_bytes=16 * GIB, sriov_totalvfs=31)
    fs.add_admin_vfs("0000:03:00.0", 3)
    built = inventory(fs)
    names = [d.name for d in built.inventory.devices]
    assert names == [f"gpu-0000-03-00-0-vf{k}" for k in range(3)]
    assert built.inventory.counter_sets == ()
    vf = built.inventory.devices[2]
    assert vf.attributes["type"] == "vf" and "profile" not in vf.attributes
    assert vf.attributes["pciAddress"] == "0000:03:00.3"
    assert vf.attributes["parent"] == "gpu-0000-03-00-0"
    assert not vf.consumes_counters
    assert built.records[vf.name].kind == "vf"


def test_backend_created_vfs_keep_the_partitioned_model(fs):
    fs.add_gpu("0000:03:00.0", "0x56c0", lmem_total_bytes=16 * GIB, sriov_totalvfs=31)
    before = inventory(fs, vf_profile="flex170=flex170_m4").inventory
    fs.add_admin_vfs("0000:03:00.0", 4)  # as if this backend had made them
    state = State(created={"0000:03:00.0": CreatedVfs("flex170_m4", 4, complete=True)})
    after = inventory(fs, state, vf_profile="flex170=flex170_m8").inventory  # option changed
    assert after == before


@pytest.mark.parametrize("memory", [16 * GIB, 16 * GIB + 100 * (1 << 20)])
def test_shared_gpu(fs, memory):
    fs.add_gpu("0000:03:00.0", "0x56a0", lmem_total_bytes=memory)
    fs.add_gpu("0000:04:00.0", "0x56a0", lmem_total_bytes=memory)
    built = inventory(fs, shared_gpus="0000:03:00.0")
    shared, plain = built.inventory.devices
    assert shared.allow_multiple_allocations and not plain.allow_multiple_allocations
    assert shared.attributes["shared"] is True
    policy = shared.capacity["memory"].request_policy
    assert policy is not None and policy.valid_range is not None
    assert policy.default == "16Gi" and policy.valid_range.max == "16Gi"
    assert policy.valid_range.min == "512Mi" and policy.valid_range.step == "512Mi"
    millicores = shared.capacity["millicores"]
    assert millicores.value == "1000"
    assert millicores.request_policy is not None
    assert millicores.request_policy.default == "1000"
    assert built.records[shared.name].kind == "shared"


def test_shared_all_by_id_and_unknown_memory(fs):
    fs.add_gpu("0000:03:00.0", "0x56a0")
    fs.add_gpu("0000:04:00.0", "0x56c0", lmem_total_bytes=16 * GIB, sriov_totalvfs=31)
    built = inventory(fs, shared_gpus="all")
    assert all(d.allow_multiple_allocations for d in built.inventory.devices)
    assert built.inventory.counter_sets == ()  # sharing wins over SR-IOV partitioning
    first = built.inventory.devices[0]
    assert set(first.capacity) == {"millicores"}
    by_id = inventory(fs, shared_gpus="0x56a0").inventory
    assert by_id.devices[0].allow_multiple_allocations is True


def test_demo_tree_is_valid(tmp_path):
    fs = build_demo(tmp_path / "demo")
    built = inventory(fs)
    assert len(built.inventory.devices) == 3 + 9
    for device in built.inventory.devices:
        assert len(device.attributes) + len(device.capacity) <= 32


def test_profile_tables():
    assert PROFILES["flex170_m4"].lmem_bytes == 4000 << 20
    assert PROFILES["max_48g_c63"].ggtt == 63897600
    assert PROFILES["pro_b60_m4"].driver == "xe"
    assert PROFILES["pro_b70_m4"].num_vfs == 4 and "pro_b70_m24" not in PROFILES
    assert choose("flex170", {}, 31) == PROFILES["flex170_m8"]
    assert choose("flex170", {"flex170": "none"}, 31) is None
    assert parse_overrides("Flex 170=flex170_m2, 0x0bd9=max_48g_c4") == {
        "flex170": "flex170_m2",
        "max_48g": "max_48g_c4",
    }
    with pytest.raises(ProfileError, match="not a flex140 profile"):
        parse_overrides("flex140=flex170_m4")
    with pytest.raises(ProfileError, match="unknown model"):
        parse_overrides("a770=x")
    with pytest.raises(ProfileError, match="MODEL=PROFILE"):
        parse_overrides("flex170")
    with pytest.raises(ProfileError, match="no SR-IOV profiles"):
        parse_overrides("0x56a0=flex170_m4")


def test_eight_max_pfs_fit_the_core_slice_builder(fs):
    from dra_core.slices.build import build_slices

    for i in range(8):
        fs.add_gpu(
            f"0000:{0x10 + i * 0x10:02x}:00.0",
            "0x0bd5",
            lmem_total_bytes=128 * GIB,
            sriov_totalvfs=16,
            vf_gt_dirs=(),  # no quota trees: faster, not needed here
            bridge=f"0000:00:{i + 1:02x}.0",
        )
    fs.add_gpu("0000:f0:00.0", "0x56a0", lmem_total_bytes=16 * GIB, bridge="0000:00:1f.0")
    built = inventory(fs, shared_gpus="0000:f0:00.0")
    assert len(built.inventory.devices) == 8 * 17 + 1
    assert len(built.inventory.counter_sets) == 8
    slices = build_slices("gpu.intel.com", "node-1", "node-1", built.inventory, 1)
    published = [d["name"] for s in slices for d in s["spec"].get("devices", [])]
    assert sorted(published) == sorted(d.name for d in built.inventory.devices)
