"""The real-node harness itself: a node of its own runs a pod, and stopping it leaves the host
as it was (processes, containers and their cgroups, mounts, links, kernel settings, paths)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dra_core.testing.node import HostState, Node
from tests.controlplane import helpers
from tests.realnode import pods

pytestmark = [pytest.mark.controlplane, pytest.mark.realnode]


def processes_naming(marker: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(entry.name)
            except OSError:
                continue
    return found


def test_a_node_runs_a_pod_and_leaves_the_host_as_it_was(
    real_node_binaries, control_plane, kube_api, namespace
):
    before = HostState()
    node = Node(control_plane, real_node_binaries, name="dra-harness-node")
    node.start()
    workdir = node.workdir
    assert workdir is not None
    try:
        pods.start(kube_api, namespace, node, "plain", {})
        view = pods.container_view(node, namespace, "plain")
        assert view.env["HOSTNAME"], view.env
        assert "/dev/null" in view.devices and view.devices["/dev/null"] == (1, 3)
        containers = os.listdir(workdir / "runc" / "k8s.io")
        assert len(containers) == 2, containers  # the sandbox and the container
        assert processes_naming(str(workdir))
    finally:
        helpers.delete_pod(kube_api, namespace, "plain")
        node.stop()  # raises NodeError naming what it could not undo
        helpers.delete_node(kube_api, "dra-harness-node")

    after = HostState()
    assert not workdir.exists()
    assert not processes_naming(str(workdir))
    assert after.paths == before.paths
    assert after.sysctls == before.sysctls
    assert after.links == before.links
    assert not [m for m in after.mounts - before.mounts if m.startswith(str(workdir))]
    leftover = [
        d for h in Path("/sys/fs/cgroup").iterdir() for c in containers for d in h.glob(f"*/{c}")
    ]
    assert not leftover
