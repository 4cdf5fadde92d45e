"""The chart installs the agent's image on the real node: the kubelet runs the DaemonSet's pod,
the agent registers and publishes, a workload pod gets its device, and an uninstall leaves
only what deploy/README.md names.
"""

from __future__ import annotations

import contextlib
from urllib.parse import urlparse

import pytest

from tests.controlplane import helpers
from tests.deploy.helmcli import CHART, HelmError
from tests.realnode import pods

pytestmark = [pytest.mark.controlplane, pytest.mark.realnode]

FAKE = "fake.dra-core.dev"


def _values(image, node, control_plane) -> dict:
    repository, tag = image.name.rsplit(":", 1)
    return {
        "backend": "fake",
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "kubeletDir": str(node.root_dir),
        "cdiDir": str(node.cdi_dir),
        "nodeSelector": {"kubernetes.io/hostname": node.name},
        # The test node has no pod network and no Service proxy: the agent reaches the API
        # server on the host's loopback address.
        "hostNetwork": True,
        "updateStrategy": {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1},
        },
        "extraEnv": [
            {"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
            {"name": "KUBERNETES_SERVICE_PORT", "value": str(urlparse(control_plane.server).port)},
        ],
        "logFormat": "text",
    }


def _agent_pods(api, namespace: str) -> list[dict]:
    return helpers.get(
        api,
        f"/api/v1/namespaces/{namespace}/pods",
        query={"labelSelector": "app.kubernetes.io/component=agent"},
    )["items"]


def _agent_story(api, namespace: str, node) -> str:
    """The agent pods' phases and logs, for a failure message."""
    told = []
    for pod in _agent_pods(api, namespace):
        name = pod["metadata"]["name"]
        log = node.container_log(namespace, name, "agent")[-3000:]
        events = helpers.get(
            api, f"/api/v1/namespaces/{namespace}/events",
            query={"fieldSelector": f"involvedObject.name={name}"},
        )["items"]  # fmt: skip
        said = "; ".join(f"{ev.get('reason')}: {ev.get('message')}" for ev in events[-5:])
        told.append(f"{name}: {pods.phase(api, namespace, name)}; events: {said}\n{log}")
    return "\n".join(told) or "no agent pod"


def _node_slices(api, node: str) -> list[dict]:
    return helpers.get(
        api,
        f"{helpers.RESOURCE_API}/resourceslices",
        query={"fieldSelector": f"spec.nodeName={node},spec.driver={FAKE}"},
    )["items"]


@pytest.mark.timeout(900)
def test_helm_install_runs_the_image_on_the_real_node_and_uninstalls_cleanly(
    helm, agent_image, real_node, control_plane, kube_api, namespace
):
    real_node.import_image(agent_image.archive)
    kubeconfig = control_plane.kubeconfig_path
    release = "node"
    args = [
        "--namespace",
        namespace,
        *helm.values_args(_values(agent_image, real_node, control_plane)),
    ]
    try:
        helm.run(
            "install",
            release,
            str(CHART),
            *args,
            "--wait",
            "--timeout",
            "90s",
            kubeconfig=kubeconfig,
            timeout=200,
        )
    except HelmError as e:
        raise AssertionError(
            f"{e}\nagent: {_agent_story(kube_api, namespace, real_node)}"
        ) from None
    installed = True
    try:
        (agent,) = _agent_pods(kube_api, namespace)
        assert agent["spec"]["containers"][0]["image"] == agent_image.name
        ready = {c["type"]: c["status"] for c in agent["status"]["conditions"]}
        assert ready["Ready"] == "True"  # /readyz: registered and the API server answers
        assert any(real_node.registration_dir.glob(f"{FAKE}-*reg.sock"))
        helpers.wait_for(lambda: _node_slices(kube_api, real_node.name), 60, "the agent's slices")

        pods.create_template(
            kube_api,
            namespace,
            pods.claim_template("one", FAKE, selectors=pods.plain_fake_device(0)),
        )
        pods.start(kube_api, namespace, real_node, "workload", pods.from_template("one"))
        (uid,) = pods.claim_uids(kube_api, namespace, "workload").values()
        edits = pods.cdi_edits(real_node.cdi_dir, uid)
        pods.assert_sees(pods.container_view(real_node, namespace, "workload"), edits)
        helpers.delete_pod(kube_api, namespace, "workload")
        helpers.wait_for(
            lambda: not any(uid in p.name for p in real_node.cdi_dir.glob("*.json")),
            60,
            "the workload's claim to be unprepared",
        )

        helm.run("uninstall", release, "--namespace", namespace, "--wait", kubeconfig=kubeconfig)
        installed = False
        helpers.wait_for(lambda: not _agent_pods(kube_api, namespace), 90, "the agent to stop")
        # The kubelet withdraws the slices of a driver whose last instance unregistered.
        helpers.wait_for(lambda: not _node_slices(kube_api, real_node.name), 90, "slices to go")
        assert not list(real_node.registration_dir.glob(f"{FAKE}-*")), "registration socket left"
        left = sorted(
            str(p.relative_to(real_node.plugins_dir / FAKE))
            for p in (real_node.plugins_dir / FAKE).rglob("*")
        )
        assert not [p for p in left if p.endswith(".sock")], f"sockets left: {left}"
        documented = ("checkpoint.json", "serialize.lock", "backend")  # deploy/README.md
        assert all(p.split("/")[0] in documented for p in left), left
        assert not list(real_node.cdi_dir.glob("dra-core.dev-fake_*.json"))
    finally:
        if installed:
            with contextlib.suppress(HelmError):
                helm.run("uninstall", release, "--namespace", namespace, kubeconfig=kubeconfig)
