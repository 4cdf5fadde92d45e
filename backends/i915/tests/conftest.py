"""Fixtures: a fake node (sysfs + devfs + fake kernel) and the i915 hooks bound to it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from dra_backend_i915 import plugin
from dra_backend_i915.memory import DrmMemoryQuery
from dra_backend_i915.testing import GIB, FakeDrmIoctl, FakeKernel, FakeSysfs, node_context

from dra_core import NodeContext
from dra_core.plugins import Hooks, from_objects


@pytest.fixture
def fs(tmp_path: Path) -> FakeSysfs:
    return FakeSysfs(tmp_path / "node")


@pytest.fixture
def max1550(fs: FakeSysfs) -> Path:
    """A two-tile Data Center GPU Max 1550 at 0000:3a:00.0, the PF's directory."""
    return fs.add_gpu(
        "0000:3a:00.0",
        "0x0bd5",
        lmem_total_bytes=128 * GIB,
        sriov_totalvfs=62,
        gts=2,
        vf_gt_dirs=("gt0", "gt1"),
    )


@pytest.fixture
def ioctl() -> FakeDrmIoctl:
    return FakeDrmIoctl({})


@pytest.fixture
def kernel(fs: FakeSysfs) -> Iterator[FakeKernel]:
    k = fs.kernel(delay=0.02)
    yield k
    k.join()


@pytest.fixture
def backend(kernel: FakeKernel, ioctl: FakeDrmIoctl) -> plugin.I915Backend:
    return plugin.I915Backend(writer=kernel, memory_query=DrmMemoryQuery(ioctl=ioctl), poll=0.01)


@pytest.fixture
def hooks(backend: plugin.I915Backend) -> Hooks:
    return from_objects("i915", backend)


@pytest.fixture
def context(fs: FakeSysfs, tmp_path: Path) -> NodeContext:
    return node_context(fs, tmp_path / "state")
