"""``helm upgrade`` to a new image tag while pods with claims are being created, on a real
node with the fake backend, both ways the chart rolls the agent:

* With surge (the chart's default, maxSurge 1 and maxUnavailable 0) on a node with a pod
  network: the new agent starts beside the old one and registers sockets of its own (named
  after its pod UID), the old one stops once the new one is ready and leaves the new one's
  sockets alone, and the new one serves every prepare after the hand-over.
* Without surge (maxSurge 0, maxUnavailable 1) in the host's network, as on nodes without a
  pod network, where two agents would share the status port: the old agent stops before the
  new one starts, and the kubelet retries the prepares that come while none is registered.

Either way no prepare fails and every pod of the stream reaches Running.
"""

from __future__ import annotations

import contextlib
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dra_core.kubelet.sockets import SocketPaths
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
RELEASE = "upgrade"
#: Pods created before the upgrade starts and after it has finished.
PODS_AROUND_THE_UPGRADE = 3
#: Seconds between two pods of the stream.
POD_INTERVAL = 1.0


class PodStream:
    """Creates pods with a claim each, one every :data:`POD_INTERVAL` seconds, until stopped."""

    def __init__(self, api, namespace: str, node) -> None:
        self.api, self.namespace, self.node = api, namespace, node
        self.created: list[tuple[str, float]] = []  # (pod, time.monotonic() once created)
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._create, name="pod-stream", daemon=True)

    def _create(self) -> None:
        try:
            while not self._stop.is_set():
                name = f"stream-{len(self.created)}"
                body = pods.pod_body(name, self.node.name, pods.from_template("stream"))
                helpers.create_pod(self.api, self.namespace, body)
                self.created.append((name, time.monotonic()))
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
        return [name for name, _ in self.created]

    def created_after(self, moment: float) -> list[str]:
        return [name for name, at in self.created if at > moment]


@dataclass(frozen=True)
class Sample:
    at: float  # time.monotonic()
    ready: dict[str, bool]  # agent pod UID -> Ready
    registered: frozenset[str]  # names in the kubelet's registration directory


class AgentWatch:
    """Samples the agent pods and the registration sockets a few times a second while the
    DaemonSet rolls."""

    def __init__(self, api, namespace: str, registration_dir: Path) -> None:
        self.api, self.namespace, self.registration_dir = api, namespace, registration_dir
        self.samples: list[Sample] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()

    def _sample(self) -> None:
        try:
            while not self._stop.is_set():
                ready = {
                    pod["metadata"]["uid"]: any(
                        c["type"] == "Ready" and c["status"] == "True"
                        for c in pod.get("status", {}).get("conditions", [])
                    )
                    for pod in agent_pods(self.api, self.namespace)
                }
                registered = frozenset(p.name for p in self.registration_dir.iterdir())
                self.samples.append(Sample(time.monotonic(), ready, registered))
                self._stop.wait(0.2)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e

    @contextlib.contextmanager
    def running(self) -> Iterator[AgentWatch]:
        thread = threading.Thread(target=self._sample, name="agent-watch", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join(10)
        if self.error:
            raise self.error

    def wait_until_gone(self, uid: str, timeout: float) -> float:
        """Wait until a sample no longer has the pod ``uid``; when it was last seen."""
        helpers.wait_for(
            lambda: self.error or (self.samples and uid not in self.samples[-1].ready),
            timeout,
            f"agent pod {uid} to be gone",
        )
        seen = [s.at for s in self.samples if uid in s.ready]
        assert seen, f"agent pod {uid} never seen"
        return seen[-1]


def sockets(node, uid: str) -> SocketPaths:
    """The socket paths of the agent instance of pod ``uid`` (the chart's DRA_INSTANCE_ID)."""
    return SocketPaths.for_driver(
        FAKE,
        registration_dir=node.registration_dir,
        plugin_dir=node.plugins_dir / FAKE,
        instance_id=uid,
    )


def install(helm, image, node, api, namespace: str) -> dict:
    """Install the release with ``image`` on ``node``; its agent pod once it publishes."""
    node.import_image(image.archive)
    install_or_upgrade(
        helm, "install", RELEASE, namespace, chart_values(image, node), node.control_plane, api,
        node,
    )  # fmt: skip
    (agent,) = agent_pods(api, namespace)
    try:
        helpers.wait_for(lambda: node_slices(api, node.name, FAKE), 60, "the agent's slices")
    except TimeoutError as e:
        raise AssertionError(f"{e}: {agent_story(api, namespace, node)}") from None
    pods.create_template(api, namespace, pods.claim_template("stream", FAKE))
    return agent


def chart_values(image, node) -> dict:
    # Enough plain devices for every pod of the stream, each holding one.
    return {**values(image, node, node.control_plane), "backendOptions": {"devices": "64"}}


def upgrade(helm, image, node, api, namespace: str) -> tuple[str, float]:
    """``helm upgrade`` to a new tag of ``image``; the new image's name and the seconds it
    took."""
    new_image = retag(image, image.name.rsplit(":", 1)[1] + "-next")
    node.import_image(new_image.archive)
    started = time.monotonic()
    install_or_upgrade(
        helm, "upgrade", RELEASE, namespace, chart_values(new_image, node), node.control_plane,
        api, node,
    )  # fmt: skip
    return new_image.name, time.monotonic() - started


def events(api, namespace: str, reason: str) -> list[str]:
    """The events of ``reason`` in the namespace: what they were about and what they said."""
    return [
        f"{ev['involvedObject']['name']}: {ev.get('message')}"
        for ev in helpers.get(api, f"/api/v1/namespaces/{namespace}/events")["items"]
        if ev.get("reason") == reason
    ]


def check_the_stream(api, namespace: str, node, created: list[str]) -> list[str]:
    """Every pod of the stream runs, the agent failed no prepare, and each claim has its CDI
    spec; the claims' UIDs."""
    for name in created:
        pods.wait_running(api, namespace, name, timeout=120)
    failed = events(api, namespace, "PrepareFailed")  # the agent's, on a claim
    assert not failed, failed
    uids = [uid for name in created for uid in pods.claim_uids(api, namespace, name).values()]
    specs = {p.name for p in node.cdi_dir.glob("*.json")}
    assert all(any(uid in spec for spec in specs) for uid in uids), "a claim without CDI spec"
    return uids


def clean_up(api, namespace: str, node, created: list[str], uids: list[str]) -> None:
    for name in created:
        helpers.delete_pod(api, namespace, name)
    helpers.wait_for(
        lambda: not any(uid in p.name for uid in uids for p in node.cdi_dir.glob("*.json")),
        90,
        "the stream's claims to be unprepared",
    )


def uninstall(helm, namespace: str, node) -> None:
    with contextlib.suppress(HelmError):
        helm.run(
            "uninstall", RELEASE, "--namespace", namespace, "--wait",
            kubeconfig=node.control_plane.kubeconfig_path,
        )  # fmt: skip


def metric(text: str, sample: str) -> float:
    """The value of ``sample`` (name and labels, as exposed) in a /metrics page; 0 if absent."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture
def pod_network_namespace(pod_network_node) -> Iterator[tuple[object, str]]:
    """An API client of the pod-network node's control plane and a fresh namespace there."""
    api = pod_network_node.control_plane.api_client()
    name = helpers.create_namespace(api)
    try:
        helpers.wait_for_default_service_account(api, name)
        yield api, name
    finally:
        helpers.delete_namespace(api, name)
        api.close()


@pytest.mark.timeout(900)
def test_helm_upgrade_with_surge_hands_over_to_the_new_agent_during_a_stream_of_pods(
    helm, agent_image, pod_network_node, pod_network_namespace
):
    node = pod_network_node
    api, namespace = pod_network_namespace
    try:
        old_agent = install(helm, agent_image, node, api, namespace)
        assert not old_agent["spec"].get("hostNetwork"), "the agent must run in the pod network"
        old_uid = old_agent["metadata"]["uid"]
        watch = AgentWatch(api, namespace, node.registration_dir)
        stream = PodStream(api, namespace, node)
        stream.start()
        try:
            stream.wait_for_more(PODS_AROUND_THE_UPGRADE)
            with watch.running():
                new_image, upgrade_seconds = upgrade(helm, agent_image, node, api, namespace)
                handed_over = watch.wait_until_gone(old_uid, 90)
            stream.wait_for_more(PODS_AROUND_THE_UPGRADE)
        finally:
            created = stream.stop()

        (new_agent,) = agent_pods(api, namespace)
        new_uid = new_agent["metadata"]["uid"]
        assert new_agent["spec"]["containers"][0]["image"] == new_image
        old, new = sockets(node, old_uid), sockets(node, new_uid)
        seen = [(s.ready, sorted(s.registered)) for s in watch.samples]
        # Surge: the new agent registered beside the old one, under names of its own, and
        # was ready while the old pod still existed.
        assert any({old.registration.name, new.registration.name} <= s.registered
                   for s in watch.samples), seen  # fmt: skip
        assert any(s.ready.get(new_uid) and old_uid in s.ready for s in watch.samples), seen
        # The old agent removed its own sockets and left the new one's alone.
        assert not old.registration.exists() and not old.dra.exists()
        assert new.registration.is_socket() and new.dra.is_socket()
        assert sorted(p.name for p in node.registration_dir.iterdir()) == [new.registration.name]

        uids = check_the_stream(api, namespace, node, created)
        # Nor did a call of the kubelet fail: an agent was registered at every moment.
        kubelet_failed = events(api, namespace, "FailedPrepareDynamicResources")
        assert not kubelet_failed, kubelet_failed
        # The new agent served every prepare after the hand-over: its log names each of
        # those claims, and its metrics, read at its pod IP as the kubelet's probes reach it,
        # count them and no error.
        after = stream.created_after(handed_over)
        assert len(after) >= PODS_AROUND_THE_UPGRADE, (handed_over, stream.created)
        log = node.container_log(namespace, new_agent["metadata"]["name"], "agent")
        prepared = [line for line in log.splitlines() if "prepared claim" in line]
        for name in after:
            (uid,) = pods.claim_uids(api, namespace, name).values()
            assert any(f"({uid})" in line for line in prepared), (name, uid, prepared)
        ip = helpers.get_pod(api, namespace, new_agent["metadata"]["name"])["status"]["podIP"]
        port = new_agent["spec"]["containers"][0]["ports"][0]["containerPort"]
        with urllib.request.urlopen(f"http://{ip}:{port}/metrics", timeout=5) as response:
            page = response.read().decode()
        served = metric(page, 'dra_prepare_total{result="success"}')
        assert served >= len(after), page
        assert metric(page, 'dra_prepare_total{result="error"}') == 0, page
        print(
            f"surge upgrade: {upgrade_seconds:.1f} s; {len(created)} pods, {len(after)} created "
            f"after the hand-over; the new agent served {served:.0f} prepares"
        )
        clean_up(api, namespace, node, created, uids)
    finally:
        uninstall(helm, namespace, node)


@pytest.mark.timeout(900)
def test_helm_upgrade_without_surge_in_the_hosts_network_during_a_stream_of_pods(
    helm, agent_image, real_node, kube_api, namespace
):
    try:
        old_agent = install(helm, agent_image, real_node, kube_api, namespace)
        assert old_agent["spec"].get("hostNetwork") is True
        stream = PodStream(kube_api, namespace, real_node)
        stream.start()
        try:
            stream.wait_for_more(PODS_AROUND_THE_UPGRADE)
            new_image, upgrade_seconds = upgrade(helm, agent_image, real_node, kube_api, namespace)
            stream.wait_for_more(PODS_AROUND_THE_UPGRADE)
        finally:
            created = stream.stop()

        (new_agent,) = agent_pods(kube_api, namespace)
        assert new_agent["metadata"]["uid"] != old_agent["metadata"]["uid"]
        assert new_agent["spec"]["containers"][0]["image"] == new_image
        assert len(created) >= 2 * PODS_AROUND_THE_UPGRADE + int(upgrade_seconds / 2), (
            f"only {len(created)} pods created in an upgrade of {upgrade_seconds:.0f} s"
        )
        uids = check_the_stream(kube_api, namespace, real_node, created)
        retried = events(kube_api, namespace, "FailedPrepareDynamicResources")
        print(
            f"upgrade without surge: {upgrade_seconds:.1f} s; {len(created)} pods; the kubelet "
            f"retried {len(retried)} prepares while no agent was registered"
        )
        clean_up(kube_api, namespace, real_node, created, uids)
    finally:
        uninstall(helm, namespace, real_node)
