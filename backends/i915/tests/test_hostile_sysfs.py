"""A broken or hostile sysfs tree: one bad GPU is left out (or loses a detail), the others are
published, and no read blocks or runs without end.

Real FIFOs, a real /dev/zero and real oversized files stand in for what a broken kernel
driver, a bad bind mount or an attacker with write access to the tree would leave.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dra_backend_i915.discovery import Discoverer
from dra_backend_i915.sysfs import MAX_ATTRIBUTE_BYTES
from dra_backend_i915.testing import GIB, FakeSysfs, allocated_claim
from loguru import logger

from dra_core import AllocationError, validate_inventory
from dra_core.plugins import HookError
from dra_core.testing.bounded import within

GOOD = "0000:03:00.0"
BAD = "0000:08:00.0"
GOOD_DEVICE = "gpu-0000-03-00-0"
BAD_DEVICE = "gpu-0000-08-00-0"


def rss_kib() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


@pytest.fixture
def two(fs: FakeSysfs) -> Path:
    """A good Arc A770 and a bad one's directory (still good until a test breaks it)."""
    fs.add_gpu(GOOD, "0x56a0", lmem_total_bytes=16 * GIB)
    return fs.add_gpu(BAD, "0x56a0", bridge="0000:00:1c.0", lmem_total_bytes=16 * GIB)


@pytest.fixture
def logs() -> Iterator[list[str]]:
    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(f"{m.record['level'].name} {m.record['message']}"))
    yield messages
    logger.remove(sink)


def replace(path: Path, kind: str) -> None:
    """Put a FIFO, /dev/zero, a directory or an oversized file where ``path`` was."""
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "directory":
        path.mkdir()
    else:
        path.write_bytes(b"0x8086" + b"0" * MAX_ATTRIBUTE_BYTES)


@pytest.mark.parametrize(
    ("kind", "problem"),
    [
        ("fifo", "vendor: is a FIFO (named pipe), not a regular file"),
        ("dev-zero", "vendor: is a character device, not a regular file"),
        ("directory", "vendor: is a directory, not a regular file"),
        ("huge", f"vendor: holds more than {MAX_ATTRIBUTE_BYTES} bytes"),
    ],
)
def test_an_identity_file_that_is_not_a_file_leaves_out_that_gpu_only(fs, two, logs, kind, problem):
    replace(two / "vendor", kind)
    rss = rss_kib()
    result = within(10, lambda: Discoverer(fs.sys, fs.dev).discover())
    assert not isinstance(result, BaseException), result
    assert [g.address for g in result.gpus] == [GOOD]
    (skipped,) = result.skipped
    assert skipped.address == BAD and problem in skipped.reason
    assert any(m.startswith(f"WARNING GPU {BAD} not published: ") for m in logs)
    assert rss_kib() - rss < 50 * 1024


@pytest.mark.parametrize("value", ["1" + "0" * 30, "-7", "0x1", "4096"])
def test_an_absurd_numa_node_costs_that_gpu_its_numa_attribute_only(
    hooks, context, two, logs, value
):
    (two / "numa_node").write_text(value + "\n")
    inventory = hooks.discover(context)
    validate_inventory(inventory)
    assert [d.name for d in inventory.devices] == [GOOD_DEVICE, BAD_DEVICE]
    assert inventory.device(GOOD_DEVICE).attributes["numa"] == 0
    assert "numa" not in inventory.device(BAD_DEVICE).attributes
    warnings = [m for m in logs if m.startswith("WARNING") and "numa_node" in m]
    assert warnings and BAD in warnings[0], logs


def test_absurd_sizes_and_counts_do_not_reach_the_inventory(fs, hooks, context, logs):
    fs.add_gpu(GOOD, "0x56a0", lmem_total_bytes=16 * GIB)
    big = fs.add_gpu(BAD, "0x56a0", bridge="0000:00:1c.0", lmem_total_bytes=2**70)
    flex = fs.add_gpu("0000:0a:00.0", "0x56c0", bridge="0000:00:1d.0", sriov_totalvfs=31)
    (flex / "sriov_offset").write_text("99999999999\n")
    inventory = hooks.discover(context)
    validate_inventory(inventory)
    names = [d.name for d in inventory.devices]
    assert GOOD_DEVICE in names and BAD_DEVICE in names
    assert "memory" not in inventory.device(BAD_DEVICE).capacity  # not believed: unknown
    assert not any(n.startswith("gpu-0000-0a-00-0") for n in names)
    assert any(str(big / "drm") in m and "not a memory size" in m for m in logs), logs
    assert any("sriov_offset" in m and "not a 16-bit SR-IOV count" in m for m in logs), logs


def test_a_fifo_that_appears_under_a_published_gpu_fails_its_claims_not_the_others(
    hooks, context, two
):
    inventory = hooks.discover(context)
    assert [d.name for d in inventory.devices] == [GOOD_DEVICE, BAD_DEVICE]
    replace(two / "device", "fifo")
    # The bad GPU's claim fails at once; the next claim, on the good GPU, is prepared.
    started = time.monotonic()
    error = within(
        10, lambda: hooks.check_allocation(allocated_claim(BAD_DEVICE), inventory, context)
    )
    assert isinstance(error, HookError) and isinstance(error.__cause__, AllocationError), error
    assert "device: is a FIFO" in str(error)
    good = allocated_claim(GOOD_DEVICE)
    hooks.check_allocation(good, inventory, context)
    (prepared,) = hooks.prepare(good, context)
    assert prepared.allocation.device == GOOD_DEVICE
    assert time.monotonic() - started < 10
    # Discovery keeps publishing both (the bad one as lost, so unhealthy), within bounds.
    after = within(10, lambda: hooks.discover(context))
    assert [d.name for d in after.devices] == [GOOD_DEVICE, BAD_DEVICE]
    sick = {h.device for h in hooks.device_health(after, context) if not h.healthy}
    assert sick == {BAD_DEVICE}


def test_the_discover_command_publishes_the_good_gpus_of_a_hostile_tree(fs, tmp_path):
    fs.add_gpu(GOOD, "0x56a0", lmem_total_bytes=16 * GIB)
    numa = fs.add_gpu(BAD, "0x56a0", bridge="0000:00:1c.0")
    (numa / "numa_node").write_text("1" + "0" * 30 + "\n")
    fifo = fs.add_gpu("0000:0b:00.0", "0x56a0", bridge="0000:00:1d.0")
    replace(fifo / "class", "fifo")
    zero = fs.add_gpu("0000:0c:00.0", "0x56a0", bridge="0000:00:1e.0")
    replace(zero / "vendor", "dev-zero")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    for name in ("DRA_BACKEND", "SYSFS_ROOT", "DEVFS_ROOT"):
        env.pop(name, None)
    result = subprocess.run(
        [
            *(sys.executable, "-m", "dra_core", "discover", "--backend", "i915"),
            *("--sysfs-root", str(fs.sys), "--devfs-root", str(fs.dev)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "2 devices" in result.stdout
    assert f"name: {GOOD_DEVICE}" in result.stdout and f"name: {BAD_DEVICE}" in result.stdout
    assert "0000:0b:00.0 not published" in result.stderr and "is a FIFO" in result.stderr
    assert "0000:0c:00.0 not published" in result.stderr
    assert "is a character device" in result.stderr
