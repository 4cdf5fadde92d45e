"""The real-node harness itself: a node of its own runs a pod, and stopping it leaves the host
as it was (processes, containers and their cgroups, mounts, links, kernel settings, paths)."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from urllib.parse import urlparse

import pytest

from dra_core.testing.controlplane import ControlPlane
from dra_core.testing.node import HostState, Node, PodNetwork
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


def test_a_node_with_a_pod_network_runs_pods_that_reach_the_host_and_nothing_else(
    real_node_binaries, control_plane
):
    before = HostState()
    forwarding = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    with (
        PodNetwork() as net,
        ControlPlane(
            control_plane.binaries,
            k8s_version=control_plane.k8s_version,
            gates=control_plane.gates,
            bind_address=net.gateway,
        ) as cp,
    ):
        node = Node(cp, real_node_binaries, name="dra-harness-pod-network", pod_network=net)
        node.start()
        try:
            api = cp.api_client()
            namespace = helpers.create_namespace(api)
            helpers.wait_for_default_service_account(api, namespace)
            api_port = urlparse(cp.server).port
            body = pods.pod_body("networked", node.name, {})
            del body["spec"]["hostNetwork"]
            (container,) = body["spec"]["containers"]
            container["command"] = [
                "sh", "-c",
                f"ip route; nc -w 5 {net.gateway} {api_port} </dev/null && echo API reached;"
                " exec httpd -f -p 8080 -h /",
            ]  # fmt: skip
            # The kubelet probes the pod at its IP from the host, as it probes the agent.
            container["readinessProbe"] = {
                "httpGet": {"path": "/etc/hostname", "port": 8080},
                "periodSeconds": 1,
            }
            helpers.create_pod(api, namespace, body)
            helpers.wait_for(
                lambda: any(
                    c["type"] == "Ready" and c["status"] == "True"
                    for c in helpers.get_pod(api, namespace, "networked")["status"].get(
                        "conditions", []
                    )
                ),
                60,
                "the pod's readiness probe to pass",
            )
            ip = helpers.get_pod(api, namespace, "networked")["status"]["podIP"]
            assert ipaddress.ip_address(ip) in net.subnet
            log = node.container_log(namespace, "networked", "c")
            assert "API reached" in log, log
            # Only the pod network's own route: the pod reaches the host and nothing beyond.
            routes = [line.split()[0] for line in log.splitlines() if " dev " in line]
            assert routes == [str(net.subnet)], log
            helpers.delete_pod(api, namespace, "networked")
        finally:
            node.stop()
    after = HostState()
    assert after.links == before.links
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == forwarding
    assert after.paths == before.paths
