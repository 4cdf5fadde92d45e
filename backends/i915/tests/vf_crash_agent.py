"""An i915 node agent in its own process, which dies (os._exit) right after writing sriov_numvfs.

Run as ``python vf_crash_agent.py ROOT KUBECONFIG NODE SYSFS DEVFS KERNEL_SOCKET``, with
``CRASH_AT=after-sriov-numvfs`` to die once a non-zero ``sriov_numvfs`` write has gone through,
before anything after it is recorded. Sysfs writes go to a fake kernel served by the test
process on KERNEL_SOCKET (see ``KernelServer`` in test_vf_lifetime_controlplane.py), so the
kernel outlives the agent and finishes making the VFs it was asked for, as a real kernel does.
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

from dra_core.kube.client import load_client
from dra_core.logs import configure_logging
from dra_core.plugins import from_objects
from dra_core.runtime import Agent, AgentSettings


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


def main() -> None:
    root, kubeconfig, node, sysfs, devfs, kernel = sys.argv[1:7]
    configure_logging("DEBUG")
    backend = plugin.I915Backend(
        writer=RemoteKernel(kernel), memory_query=DrmMemoryQuery(ioctl=FakeDrmIoctl({})), poll=0.01
    )
    settings = AgentSettings.below(
        Path(root),
        node,
        poll_interval=0.5,
        backend_options={"sysfs_root": sysfs, "devfs_root": devfs},
    )
    Agent(settings, from_objects("i915", backend), client=load_client(kubeconfig)).run()


if __name__ == "__main__":
    main()
