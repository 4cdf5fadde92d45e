"""``helm upgrade`` to a new image tag while pods with claims are being created, on the real
node with the fake backend.

The test node has no pod network, so the chart runs the agent with ``hostNetwork``; two agents
would then share the node's status port, and the rollout runs with maxSurge 0 and
maxUnavailable 1: the old agent stops before the new one starts. Surge itself (the new agent
beside the old one, per-instance socket names) is therefore not exercised on this node. What
is proven is that no prepare fails: while no agent is registered the kubelet retries the
prepare of a pod's claims, and every pod of the stream reaches Running.
"""

from __future__ import annotations

import contextlib
import threading
import time

import pytest

from tests.controlplane import helpers
from tests.deploy.helmcli import HelmError
from tests.realnode import pods
from tests.realnode.agent_image import retag
from tests.realnode.helm_release import (
    agent_pods,
    agent_story,
    install_or_upgrade,
    node_slices,
    values,
)

pytestmark = [pytest.mark.controlplane, pytest.mark.realnode]

FAKE = "fake.dra-core.dev"
#: Pods created before the upgrade starts and after it has finished.
PODS_AROUND_THE_UPGRADE = 3
#: Seconds between two pods of the stream.
POD_INTERVAL = 1.0


class PodStream:
    """Creates pods with a claim each, one every :data:`POD_INTERVAL` seconds, until stopped."""

    def __init__(self, api, namespace: str, node) -> None:
        self.api, self.namespace, self.node = api, namespace, node
        self.created: list[str] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._create, name="pod-stream", daemon=True)

    def _create(self) -> None:
        try:
            while not self._stop.is_set():
                name = f"stream-{len(self.created)}"
                body = pods.pod_body(name, self.node.name, pods.from_template("stream"))
                helpers.create_pod(self.api, self.namespace, body)
                self.created.append(name)
                self._stop.wait(POD_INTERVAL)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e

    def start(self) -> None:
        self._thread.start()

    def wait_for_more(self, count: int) -> None:
        goal = len(self.created) + count
        helpers.wait_for(lambda: len(self.created) >= goal or self.error, 60, "pods created")

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join(30)
        if self.error:
            raise self.error
        return list(self.created)


@pytest.mark.timeout(900)
def test_helm_upgrade_to_a_new_tag_during_a_stream_of_pod_creations(
    helm, agent_image, real_node, control_plane, kube_api, namespace
):
    real_node.import_image(agent_image.archive)
    new_image = retag(agent_image, agent_image.name.rsplit(":", 1)[1] + "-next")
    real_node.import_image(new_image.archive)
    # Enough plain devices for every pod of the stream, each holding one.
    chart_values = {
        **values(agent_image, real_node, control_plane),
        "backendOptions": {"devices": "64"},
    }
    release = "upgrade"
    install_or_upgrade(
        helm, "install", release, namespace, chart_values, control_plane, kube_api, real_node
    )
    try:
        (old_agent,) = agent_pods(kube_api, namespace)
        try:
            helpers.wait_for(
                lambda: node_slices(kube_api, real_node.name, FAKE), 60, "the agent's slices"
            )
        except TimeoutError as e:
            raise AssertionError(f"{e}: {agent_story(kube_api, namespace, real_node)}") from None
        pods.create_template(kube_api, namespace, pods.claim_template("stream", FAKE))

        stream = PodStream(kube_api, namespace, real_node)
        stream.start()
        try:
            stream.wait_for_more(PODS_AROUND_THE_UPGRADE)
            upgraded = {**chart_values, **values(new_image, real_node, control_plane)}
            upgraded["backendOptions"] = chart_values["backendOptions"]
            started = time.monotonic()
            install_or_upgrade(
                helm, "upgrade", release, namespace, upgraded, control_plane, kube_api, real_node
            )
            upgrade_seconds = time.monotonic() - started
            stream.wait_for_more(PODS_AROUND_THE_UPGRADE)
        finally:
            created = stream.stop()

        (new_agent,) = agent_pods(kube_api, namespace)
        assert new_agent["metadata"]["uid"] != old_agent["metadata"]["uid"]
        assert new_agent["spec"]["containers"][0]["image"] == new_image.name
        assert len(created) >= 2 * PODS_AROUND_THE_UPGRADE + int(upgrade_seconds / 2), (
            f"only {len(created)} pods created in an upgrade of {upgrade_seconds:.0f} s"
        )
        for name in created:
            pods.wait_running(kube_api, namespace, name, timeout=120)
        events = helpers.get(kube_api, f"/api/v1/namespaces/{namespace}/events")["items"]
        failed = [
            f"{ev['involvedObject']['name']}: {ev.get('message')}"
            for ev in events
            if ev.get("reason") == "PrepareFailed"
        ]
        assert not failed, failed
        uids = [
            uid for name in created for uid in pods.claim_uids(kube_api, namespace, name).values()
        ]
        specs = {p.name for p in real_node.cdi_dir.glob("*.json")}
        assert all(any(uid in spec for spec in specs) for uid in uids), "a claim without CDI spec"
        for name in created:
            helpers.delete_pod(kube_api, namespace, name)
        helpers.wait_for(
            lambda: (
                not any(uid in p.name for uid in uids for p in real_node.cdi_dir.glob("*.json"))
            ),
            90,
            "the stream's claims to be unprepared",
        )
    finally:
        with contextlib.suppress(HelmError):
            helm.run(
                "uninstall", release, "--namespace", namespace, "--wait",
                kubeconfig=control_plane.kubeconfig_path,
            )  # fmt: skip
