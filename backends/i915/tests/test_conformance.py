"""The i915 backend passes the conformance suite of dra_core.testing on a fake node: an Arc
A770 shared through consumable capacity and a Tiger Lake integrated GPU as a whole device;
health by a GPU losing its driver and getting it back.

The agent runs as a process of its own, so nothing emulates the kernel creating VFs when the
backend writes ``sriov_numvfs``: the node has no SR-IOV GPU and the VF class is not tried
(tests/test_e2e_controlplane.py covers VFs with the in-process fake kernel)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import pytest
from dra_backend_i915.testing import GIB, FakeSysfs

from dra_core.testing.conformance import AgentUnderTest, BackendConformance

EXAMPLES = Path(__file__).parents[3] / "examples" / "i915"
A770 = "0000:08:00.0"


class TestI915Conformance(BackendConformance):
    backend = "i915"
    valid_config = {"apiVersion": "gpu.intel.com/v1alpha1", "kind": "GpuConfig"}
    classes_without_devices = ("vf.gpu.intel.com",)
    examples = sorted(EXAMPLES.glob("*.yaml"))

    node: ClassVar[FakeSysfs]

    @pytest.fixture(scope="class")
    @classmethod
    def backend_args(cls, tmp_path_factory: pytest.TempPathFactory) -> Sequence[str]:
        fake = FakeSysfs(tmp_path_factory.mktemp("i915-node"), char_devices=os.geteuid() == 0)
        fake.add_gpu(A770, "0x56a0", bridge="0000:00:1c.0", lmem_total_bytes=16 * GIB)
        fake.add_gpu("0000:00:02.0", "0x9a49", bridge=None, numa_node=-1)
        cls.node = fake
        return (
            "--sysfs-root", str(fake.sys),
            "--devfs-root", str(fake.dev),
            "--shared-gpus", A770,
        )  # fmt: skip

    def set_health(self, agent: AgentUnderTest, device: str, healthy: bool) -> bool:
        """A GPU losing its driver is unhealthy (NoExecute); bound again, it recovers."""
        (address,) = [
            a for a in self.node.gpus if device == f"gpu-{a.replace(':', '-').replace('.', '-')}"
        ]
        if healthy:
            self.node.rebind(address, "i915")
        else:
            self.node.unbind(address)
        return True
