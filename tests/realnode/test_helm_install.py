"""The chart installs the agent's image on the real node: the kubelet runs the DaemonSet's pod,
the agent registers and publishes, a workload pod gets its device, and an uninstall leaves
only what deploy/README.md names.
"""

from __future__ import annotations

import contextlib

import pytest

from tests.controlplane import helpers
from tests.deploy.helmcli import HelmError
from tests.realnode import pods
from tests.realnode.helm_release import agent_pods, install_or_upgrade, node_slices, values

pytestmark = [pytest.mark.controlplane, pytest.mark.realnode]

FAKE = "fake.dra-core.dev"


@pytest.mark.timeout(900)
def test_helm_install_runs_the_image_on_the_real_node_and_uninstalls_cleanly(
    helm, agent_image, real_node, control_plane, kube_api, namespace
):
    real_node.import_image(agent_image.archive)
    kubeconfig = control_plane.kubeconfig_path
    release = "node"
    # Specs of claims an earlier test's agent left prepared on this node stay until a kubelet
    # call unprepares them; only what this release prepared must be gone.
    earlier_specs = set(real_node.cdi_dir.glob("dra-core.dev-fake_*.json"))
    chart_values = values(agent_image, real_node, control_plane)
    install_or_upgrade(
        helm, "install", release, namespace, chart_values, control_plane, kube_api, real_node
    )
    installed = True
    try:
        (agent,) = agent_pods(kube_api, namespace)
        assert agent["spec"]["containers"][0]["image"] == agent_image.name
        ready = {c["type"]: c["status"] for c in agent["status"]["conditions"]}
        assert ready["Ready"] == "True"  # /readyz: registered and the API server answers
        assert any(real_node.registration_dir.glob(f"{FAKE}-*reg.sock"))
        helpers.wait_for(
            lambda: node_slices(kube_api, real_node.name, FAKE), 60, "the agent's slices"
        )

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
        helpers.wait_for(lambda: not agent_pods(kube_api, namespace), 90, "the agent to stop")
        # The kubelet withdraws the slices of a driver whose last instance unregistered.
        helpers.wait_for(
            lambda: not node_slices(kube_api, real_node.name, FAKE), 90, "slices to go"
        )
        assert not list(real_node.registration_dir.glob(f"{FAKE}-*")), "registration socket left"
        left = sorted(
            str(p.relative_to(real_node.plugins_dir / FAKE))
            for p in (real_node.plugins_dir / FAKE).rglob("*")
        )
        assert not [p for p in left if p.endswith(".sock")], f"sockets left: {left}"
        documented = ("checkpoint.json", "serialize.lock", "backend")  # deploy/README.md
        assert all(p.split("/")[0] in documented for p in left), left
        assert not set(real_node.cdi_dir.glob("dra-core.dev-fake_*.json")) - earlier_specs
    finally:
        if installed:
            with contextlib.suppress(HelmError):
                helm.run("uninstall", release, "--namespace", namespace, kubeconfig=kubeconfig)
