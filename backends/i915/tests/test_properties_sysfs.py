"""Property-based: any content in the sysfs files discovery reads, for one GPU of two.

Whatever a GPU's files hold (bytes, numbers out of range, a FIFO, /dev/zero, a directory, or
nothing), discovery never raises and never blocks: that GPU is published (perhaps without a
detail) or left out with a reason, the other GPU is always published, and the inventory passes
the ResourceSlice rules.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

import pytest
from dra_backend_i915 import plugin
from dra_backend_i915.discovery import Discoverer
from dra_backend_i915.memory import DrmMemoryQuery
from dra_backend_i915.testing import GIB, FakeDrmIoctl, FakeSysfs, node_context
from hypothesis import given
from hypothesis import strategies as st

from dra_core import validate_inventory
from dra_core.plugins import from_objects

GOOD = "0000:03:00.0"
SUBJECT = "0000:08:00.0"
GOOD_DEVICE = "gpu-0000-03-00-0"

#: The files of a Flex 170 PF that discovery and the health check read.
FILES = (
    "vendor",
    "device",
    "class",
    "numa_node",
    "sriov_totalvfs",
    "sriov_numvfs",
    "sriov_offset",
    "sriov_stride",
    "sriov_drivers_autoprobe",
    "sriov_vf_device",
    "aer_dev_fatal",
    "drm/card1/lmem_total_bytes",
    "drm/card1/gt/gt0/error_counter/fatal_guc",
)
NUMBERS = st.integers(min_value=-(2**70), max_value=2**70).map(str) | st.sampled_from(
    ["0x8086", "0x56c0", "0x030000", "-1", "0", "1", "31", "0xffff", "1" + "0" * 30, "9" * 5000]
)
CONTENT = (
    NUMBERS.map(lambda n: (n + "\n").encode())
    | st.binary(max_size=64)
    | st.text(max_size=64).map(str.encode)
    | st.sampled_from(["fifo", "dev-zero", "directory", "missing"])
)


def put(path: Path, content: bytes | str) -> None:
    if path.is_dir() and not path.is_symlink():
        path.rmdir()
    else:
        path.unlink(missing_ok=True)
    if content == "fifo":
        os.mkfifo(path)
    elif content == "dev-zero":
        path.symlink_to("/dev/zero")
    elif content == "directory":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)


def bounded(call: object, seconds: float = 20.0) -> object:
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())  # type: ignore[operator]
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"blocked for more than {seconds} s"
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[FakeSysfs, Path]:
    """Two GPUs, built once (a Flex 170's SR-IOV tree takes a while); tests restore it."""
    fs = FakeSysfs(tmp_path_factory.mktemp("sysfs") / "node")
    fs.add_gpu(GOOD, "0x56a0", lmem_total_bytes=16 * GIB)
    subject = fs.add_gpu(
        SUBJECT,
        "0x56c0",
        bridge="0000:00:1c.0",
        lmem_total_bytes=16 * GIB,
        sriov_totalvfs=31,
        error_counters=True,
    )
    return fs, subject


@given(contents=st.dictionaries(st.sampled_from(FILES), CONTENT, min_size=1, max_size=5))
def test_one_gpus_broken_files_never_take_the_other_gpu_down(
    tree: tuple[FakeSysfs, Path], contents: dict[str, object]
) -> None:
    fs, subject = tree
    originals = {name: (subject / name).read_bytes() for name in contents}
    try:
        for name, content in contents.items():
            put(subject / name, content)  # type: ignore[arg-type]
        check(fs, contents)
    finally:
        for name, data in originals.items():
            put(subject / name, data)


def check(fs: FakeSysfs, contents: dict[str, object]) -> None:
    found = bounded(lambda: Discoverer(fs.sys, fs.dev).discover())
    addresses = [g.address for g in found.gpus]  # type: ignore[attr-defined]
    assert GOOD in addresses
    skipped = {s.address: s.reason for s in found.skipped}  # type: ignore[attr-defined]
    # Published, or left out with a reason; or, with another vendor or class, not an Intel GPU
    # at all (none of the backend's business).
    not_ours = "vendor" in contents or "class" in contents
    assert SUBJECT in addresses or skipped.get(SUBJECT) or not_ours, (addresses, skipped)

    backend = plugin.I915Backend(memory_query=DrmMemoryQuery(FakeDrmIoctl({})))
    with tempfile.TemporaryDirectory() as state:
        hooks = from_objects("i915", backend)
        context = node_context(fs, Path(state))
        inventory = bounded(lambda: hooks.discover(context))
        validate_inventory(inventory)  # type: ignore[arg-type]
        names = [d.name for d in inventory.devices]  # type: ignore[attr-defined]
        assert GOOD_DEVICE in names
        health = bounded(lambda: hooks.device_health(inventory, context))  # type: ignore[arg-type]
        assert {h.device for h in health} == set(names)  # type: ignore[attr-defined]
        assert next(h for h in health if h.device == GOOD_DEVICE).healthy  # type: ignore[attr-defined]
