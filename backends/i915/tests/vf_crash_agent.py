"""``dra-core`` with an i915 backend whose sysfs writes go to a fake kernel in the test process,
and which dies (os._exit) right after writing sriov_numvfs when asked to.

Run as ``python vf_crash_agent.py <dra-core arguments>`` (`RunningAgent.start` with this file as
its program), with ``I915_TEST_KERNEL`` the unix socket of the test's fake kernel (see
``KernelServer`` in test_vf_lifetime_controlplane.py), so that the kernel outlives the agent
and finishes making the VFs it was asked for, as a real kernel does; with
``CRASH_AT=after-sriov-numvfs`` it dies once a non-zero ``sriov_numvfs`` write has gone
through, before anything after it is recorded.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

from dra_backend_i915 import plugin
from dra_backend_i915.memory import DrmMemoryQuery
from dra_backend_i915.testing import FakeDrmIoctl

from dra_core import cli


class RemoteKernel:
    """A sysfs writer whose kernel lives in another process (one request per write)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def write(self, path: Path, value: str) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(self.path)
            conn.sendall(json.dumps({"path": str(path), "value": value}).encode() + b"\n")
            with conn.makefile("r", encoding="utf-8") as answers:
                answer = json.loads(answers.readline())
        if answer["errno"]:
            raise OSError(answer["errno"], os.strerror(answer["errno"]), str(path))
        crash = os.environ.get("CRASH_AT") == "after-sriov-numvfs"
        if crash and path.name == "sriov_numvfs" and value != "0":
            print(f"crashing after writing {value} to {path}", file=sys.stderr, flush=True)
            os._exit(137)


def main() -> int:
    backend = plugin.I915Backend(
        writer=RemoteKernel(os.environ["I915_TEST_KERNEL"]),
        memory_query=DrmMemoryQuery(ioctl=FakeDrmIoctl({})),
        poll=0.01,
    )
    return cli.main(backends={"i915": backend})


if __name__ == "__main__":
    sys.exit(main())
