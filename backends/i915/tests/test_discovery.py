"""Discovery on each family's fake tree, odd content, names, memory sources."""

from __future__ import annotations

import os
import shutil

import pytest
from dra_backend_i915.discovery import Discoverer, device_name, vf_address, vf_name
from dra_backend_i915.memory import DrmMemoryQuery
from dra_backend_i915.sysfs import SysfsError
from dra_backend_i915.testing import GIB, FakeDrmIoctl, FakeSysfs


def discover(fs: FakeSysfs, ioctl: FakeDrmIoctl | None = None):
    query = DrmMemoryQuery(ioctl=ioctl) if ioctl is not None else None
    return Discoverer(fs.sys, fs.dev, query).discover()


@pytest.mark.parametrize(
    ("device_id", "driver", "model", "family", "kwargs", "memory"),
    [
        (
            "0x0bd5",
            "i915",
            "Max 1550",
            "Data Center GPU Max",
            {"lmem_total_bytes": 128 * GIB, "gts": 2},
            128 * GIB,
        ),
        (
            "0x0bda",
            "i915",
            "Max 1100",
            "Data Center GPU Max",
            {"lmem_total_bytes": 48 * GIB},
            48 * GIB,
        ),
        (
            "0x56c0",
            "i915",
            "Flex 170",
            "Data Center GPU Flex",
            {"lmem_total_bytes": 16 * GIB},
            16 * GIB,
        ),
        (
            "0x56c1",
            "i915",
            "Flex 140",
            "Data Center GPU Flex",
            {"lmem_total_bytes": 6 * GIB},
            6 * GIB,
        ),
        ("0x56a0", "i915", "Arc A770", "Arc A-Series", {"lmem_total_bytes": 16 * GIB}, 16 * GIB),
        ("0x56b3", "i915", "Arc Pro A60", "Arc Pro A-Series", {}, None),
        (
            "0xe20b",
            "xe",
            "Arc B580",
            "Arc B-Series",
            {"xe_vram_per_tile": [12 * GIB], "gts": 2},
            12 * GIB,
        ),
        (
            "0xe211",
            "xe",
            "Arc Pro B60",
            "Arc Pro B-Series",
            {"xe_vram_per_tile": [24 * GIB]},
            24 * GIB,
        ),
        ("0x4905", "i915", "Iris Xe MAX", "Iris Xe MAX", {"lmem_total_bytes": 4 * GIB}, 4 * GIB),
        ("0x9a49", "i915", "Iris Xe (Tiger Lake)", "Integrated", {"bridge": None}, 0),
        ("0x64a0", "xe", "Arc Graphics 140V (Lunar Lake)", "Integrated", {"bridge": None}, 0),
        (
            "0x7d55",
            "i915",
            "Arc Graphics (Meteor Lake)",
            "Integrated",
            {"bridge": None, "gts": 2},
            0,
        ),
        ("0xabcd", "i915", "unknown", "unknown", {}, None),
    ],
)
def test_each_family(fs, device_id, driver, model, family, kwargs, memory):
    address = "0000:00:02.0" if kwargs.get("bridge", "x") is None else "0000:03:00.0"
    fs.add_gpu(address, device_id, driver=driver, **kwargs)
    result = discover(fs)
    assert result.skipped == ()
    (gpu,) = result.gpus
    assert (gpu.info.model, gpu.info.family, gpu.driver) == (model, family, driver)
    assert gpu.address == address
    assert gpu.pci_id == device_id
    assert gpu.memory_bytes == memory
    assert gpu.pcie_root == "pci0000:00"
    assert (gpu.card, gpu.render) == ("card0", "renderD128")
    assert gpu.name == device_name(address)


def test_nodes_from_own_drm_dir_not_computed(fs):
    fs.add_simpledrm()  # card0 without render node
    fs.add_gpu("0000:03:00.0", "0x56a0", render=False)  # a GPU without render node
    fs.add_gpu("0000:04:00.0", "0x56a1", bridge="0000:00:1c.0")
    gpus = {g.address: g for g in discover(fs).gpus}
    assert (gpus["0000:03:00.0"].card, gpus["0000:03:00.0"].render) == ("card1", None)
    assert (gpus["0000:04:00.0"].card, gpus["0000:04:00.0"].render) == ("card2", "renderD128")


def test_names_are_stable_and_dns_labels():
    assert device_name("0000:03:00.0") == "gpu-0000-03-00-0"
    assert vf_name("0000:03:00.0", 5) == "gpu-0000-03-00-0-vf5"
    assert vf_address("0000:03:00.0", 1, 1, 0) == "0000:03:00.1"
    assert vf_address("0000:03:00.0", 1, 1, 7) == "0000:03:01.0"
    assert vf_address("0000:4d:00.0", 8, 2, 1) == "0000:4d:01.2"


def test_name_does_not_depend_on_card_index(fs, tmp_path):
    other = FakeSysfs(tmp_path / "other")
    other.add_simpledrm()
    for tree in (fs, other):
        tree.add_gpu("0000:03:00.0", "0x56c0")
    assert discover(fs).gpus[0].name == discover(other).gpus[0].name
    assert discover(fs).gpus[0].card != discover(other).gpus[0].card


def test_numa_pcie_root_and_non_intel(fs):
    fs.add_gpu("0000:03:00.0", "0x56c0", numa_node=1, pcie_root="pci0000:80")
    fs.add_gpu("0000:05:00.0", "0x56c0", numa_node=-1)
    fs.add_gpu("0000:06:00.0", "0x1234", vendor="0x10de")  # not Intel: ignored silently
    fs.add_gpu("0000:07:00.0", "0x56c0", pci_class="0x020000")  # not display: ignored
    result = discover(fs)
    gpus = {g.address: g for g in result.gpus}
    assert set(gpus) == {"0000:03:00.0", "0000:05:00.0"}
    assert (gpus["0000:03:00.0"].numa_node, gpus["0000:03:00.0"].pcie_root) == (1, "pci0000:80")
    assert gpus["0000:05:00.0"].numa_node is None
    assert result.skipped == ()


def test_unbound_and_vfio_are_skipped_with_reason(fs):
    fs.add_gpu("0000:03:00.0", "0x56c0", driver=None)
    fs.add_gpu("0000:04:00.0", "0x56a0", driver="vfio-pci")
    result = discover(fs)
    assert result.gpus == ()
    reasons = {s.address: s.reason for s in result.skipped}
    assert "not bound to any driver" in reasons["0000:03:00.0"]
    assert "Flex 170" in reasons["0000:03:00.0"]
    assert "vfio-pci" in reasons["0000:04:00.0"]


def test_odd_content(fs):
    bad_vendor = fs.add_gpu("0000:03:00.0", "0x56c0")
    (bad_vendor / "vendor").write_text("intel\n")
    bad_device = fs.add_gpu("0000:04:00.0", "0x56c0")
    (bad_device / "device").write_text("0xzz\n")
    missing_class = fs.add_gpu("0000:05:00.0", "0x56c0")
    (missing_class / "class").unlink()
    bad_numa = fs.add_gpu("0000:06:00.0", "0x56a0")
    (bad_numa / "numa_node").write_text("many\n")
    no_drm = fs.add_gpu("0000:07:00.0", "0x56a0")
    shutil.rmtree(no_drm / "drm")
    os.symlink("../../../devices/pci0000:00/0000:09:00.0", fs.sys / "bus/pci/devices/0000:09:00.0")
    result = discover(fs)
    assert [g.address for g in result.gpus] == ["0000:06:00.0"]
    assert result.gpus[0].numa_node is None
    reasons = {s.address: s.reason for s in result.skipped}
    assert "vendor" in reasons["0000:03:00.0"] and "not an integer" in reasons["0000:03:00.0"]
    assert "device" in reasons["0000:04:00.0"]
    assert "class: missing" in reasons["0000:05:00.0"]
    assert "no DRM node" in reasons["0000:07:00.0"]
    assert "dangling" in reasons["0000:09:00.0"]


def test_missing_devices_dir_is_a_clear_error(tmp_path):
    with pytest.raises(SysfsError, match="bus/pci/devices: cannot be listed"):
        Discoverer(tmp_path, tmp_path).discover()


def test_unparsable_memory_falls_back_to_ioctl(fs):
    path = fs.add_gpu("0000:03:00.0", "0x56c0", lmem_total_bytes=1)
    (path / "drm/card0/lmem_total_bytes").write_text("lots\n")
    ioctl = FakeDrmIoctl({"card0": [(0, 64 * GIB), (1, 16 * GIB)]})
    (gpu,) = discover(fs, ioctl).gpus
    assert (gpu.memory_bytes, gpu.memory_source) == (16 * GIB, "ioctl")


@pytest.mark.parametrize("driver", ["i915", "xe"])
def test_memory_from_ioctl_sums_device_regions(fs, driver):
    device_id = "0x56a0" if driver == "i915" else "0xe20b"
    fs.add_gpu("0000:03:00.0", device_id, driver=driver)
    ioctl = FakeDrmIoctl({"card0": [(0, 32 * GIB), (1, 8 * GIB), (1, 4 * GIB)]})
    (gpu,) = discover(fs, ioctl).gpus
    assert (gpu.memory_bytes, gpu.memory_source) == (12 * GIB, "ioctl")
    assert ioctl.calls == 2  # size, then data


def test_memory_unknown_when_nothing_says(fs):
    fs.add_gpu("0000:03:00.0", "0x56a0")
    (gpu,) = discover(fs, FakeDrmIoctl({})).gpus
    assert (gpu.memory_bytes, gpu.memory_source) == (None, "unknown")


def test_ioctl_answer_is_cached(fs):
    fs.add_gpu("0000:03:00.0", "0x56a0")
    ioctl = FakeDrmIoctl({"card0": [(1, 8 * GIB)]})
    discoverer = Discoverer(fs.sys, fs.dev, DrmMemoryQuery(ioctl=ioctl))
    discoverer.discover()
    discoverer.discover()
    assert ioctl.calls == 2


def test_sriov_pf_and_vfs(fs):
    fs.add_gpu("0000:03:00.0", "0x56c0", sriov_totalvfs=31)
    fs.add_admin_vfs("0000:03:00.0", 2)
    result = discover(fs)
    pf = result.by_address("0000:03:00.0")
    assert pf is not None and pf.sriov is not None
    assert (pf.sriov.total_vfs, pf.sriov.num_vfs, pf.sriov.vf_device_id) == (31, 2, 0x56C0)
    assert pf.sriov.vfs == ((0, "0000:03:00.1"), (1, "0000:03:00.2"))
    vf = result.by_address("0000:03:00.2")
    assert vf is not None and vf.is_vf
    assert (vf.physfn, vf.vf_index, vf.name) == ("0000:03:00.0", 1, "gpu-0000-03-00-0-vf1")
    assert vf.sriov is None


def test_skipped_reason_logged_once_then_debug(fs):
    from loguru import logger

    fs.add_gpu("0000:03:00.0", "0x56c0", driver="vfio-pci")
    records: list[tuple[str, str]] = []
    sink = logger.add(lambda m: records.append((m.record["level"].name, m.record["message"])))
    try:
        discoverer = Discoverer(fs.sys, fs.dev)
        discoverer.discover()
        discoverer.discover()
    finally:
        logger.remove(sink)
    levels = [level for level, message in records if "vfio-pci" in message]
    assert levels == ["WARNING", "DEBUG"]
