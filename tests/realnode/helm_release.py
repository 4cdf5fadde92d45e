"""The chart's release on the real node: its values and what its agent pods did, shared by the
Helm tests of tests/realnode."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from tests.controlplane import helpers
from tests.realnode import pods


def values(image, node, control_plane, backend: str = "fake") -> dict[str, Any]:
    """Values that run ``image`` on ``node`` with ``backend``: in the node's pod network when
    it has one, else in the host's network."""
    repository, tag = image.name.rsplit(":", 1)
    server = urlparse(control_plane.server)
    chosen: dict[str, Any] = {
        "backend": backend,
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "kubeletDir": str(node.root_dir),
        "cdiDir": str(node.cdi_dir),
        "nodeSelector": {"kubernetes.io/hostname": node.name},
        # The test node has no Service proxy: the agent reaches the API server at its own
        # address (loopback, or the gateway of the node's pod network).
        "extraEnv": [
            {"name": "KUBERNETES_SERVICE_HOST", "value": server.hostname},
            {"name": "KUBERNETES_SERVICE_PORT", "value": str(server.port)},
        ],
        "logFormat": "text",
    }
    if node.pod_network is None:
        # Two agents in the host's network would share the status port: no surge here.
        chosen["hostNetwork"] = True
        chosen["updateStrategy"] = {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1},
        }
    return chosen


def agent_pods(api, namespace: str) -> list[dict]:
    return helpers.get(
        api,
        f"/api/v1/namespaces/{namespace}/pods",
        query={"labelSelector": "app.kubernetes.io/component=agent"},
    )["items"]


def agent_story(api, namespace: str, node) -> str:
    """The agent pods' phases and logs, for a failure message."""
    told = []
    for pod in agent_pods(api, namespace):
        name = pod["metadata"]["name"]
        log = node.container_log(namespace, name, "agent")[-3000:]
        events = helpers.get(
            api, f"/api/v1/namespaces/{namespace}/events",
            query={"fieldSelector": f"involvedObject.name={name}"},
        )["items"]  # fmt: skip
        said = "; ".join(f"{ev.get('reason')}: {ev.get('message')}" for ev in events[-5:])
        told.append(f"{name}: {pods.phase(api, namespace, name)}; events: {said}\n{log}")
    return "\n".join(told) or "no agent pod"


def node_slices(api, node: str, driver: str) -> list[dict]:
    return helpers.get(
        api,
        f"{helpers.RESOURCE_API}/resourceslices",
        query={"fieldSelector": f"spec.nodeName={node},spec.driver={driver}"},
    )["items"]


def install_or_upgrade(
    helm, command: str, release: str, namespace: str, chart_values: dict, control_plane, api, node
) -> None:
    """``helm install`` or ``helm upgrade`` of the chart, waiting for the agent to be ready; a
    failure says what the agent pods did."""
    from tests.deploy.helmcli import CHART, HelmError

    try:
        helm.run(
            command, release, str(CHART), "--namespace", namespace,
            *helm.values_args(chart_values), "--wait", "--timeout", "90s",
            kubeconfig=control_plane.kubeconfig_path, timeout=200,
        )  # fmt: skip
    except HelmError as e:
        raise AssertionError(f"{e}\nagent: {agent_story(api, namespace, node)}") from None
