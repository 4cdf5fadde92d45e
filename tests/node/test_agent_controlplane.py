"""The node agent end to end: real API server and scheduler, real kubelet sockets.

A small in-test backend records every prepare and unprepare so the tests can tell whether
side effects were repeated. Claims are allocated by the real scheduler from the slices the
agent publishes, and prepared through the agent's registration socket as the kubelet would.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dra_core import (
    BackendIdentity,
    ClaimRef,
    ContainerEdits,
    Device,
    DeviceClassSpec,
    Inventory,
    PreparedDevice,
    hookimpl,
)
from dra_core.kube.client import KubeClient, load_client
from dra_core.manifests import device_class_manifests
from dra_core.plugins import from_objects
from dra_core.runtime import Agent, AgentSettings
from dra_core.testing.kubelet import FakeKubelet
from dra_core.testing.scenario import create_ready_node
from tests.controlplane import helpers

pytestmark = pytest.mark.controlplane

DRIVER = "test.dra-core.dev"
NODE = "agent-node"


class RecordingBackend:
    """Plain devices; remembers what it prepared and unprepared."""

    def __init__(self) -> None:
        self.prepared: list[str] = []
        self.unprepared: list[str] = []
        self.lock = threading.Lock()

    @hookimpl
    def dra_backend_identity(self):
        return BackendIdentity(DRIVER, "dra-core.dev", "test")

    @hookimpl
    def dra_discover(self, context):
        return Inventory(
            devices=tuple(Device(f"dev-{i}", attributes={"index": i}) for i in range(24))
        )

    @hookimpl
    def dra_device_classes(self, identity):
        return [DeviceClassSpec(DRIVER, (f'device.driver == "{identity.driver_name}"',))]

    @hookimpl
    def dra_decode_config(self, parameters):
        unknown = set(parameters) - {"mode"}
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)}")
        return dict(parameters)

    @hookimpl
    def dra_prepare(self, claim):
        with self.lock:
            self.prepared.append(claim.ref.uid)
        env = {"TEST_DEVICE": ",".join(d.device for d in claim.devices)}
        for configs in claim.configs.values():
            for config in configs:
                env["TEST_MODE"] = config["mode"]
        return [PreparedDevice(d, ContainerEdits(env=env)) for d in claim.devices]

    @hookimpl
    def dra_unprepare(self, claim):
        with self.lock:
            self.unprepared.append(claim.ref.uid)
        return True


@pytest.fixture(scope="module")
def short_dir() -> Iterator[Path]:
    # Unix socket paths must stay under 108 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="dra-agent-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def agent_settings(root: Path, client_node: str = NODE) -> AgentSettings:
    return AgentSettings.below(root, client_node, poll_interval=0.5)


@pytest.fixture(scope="module")
def backend() -> RecordingBackend:
    return RecordingBackend()


@pytest.fixture(scope="module")
def agent(control_plane, kube_api, dra_kube_client, short_dir, backend) -> Iterator[Agent]:
    create_ready_node(dra_kube_client, NODE)
    hooks = from_objects("recording", backend)
    classes = hooks.device_classes(hooks.backend_identity())
    for body in device_class_manifests(classes, control_plane.enabled_gates()):
        helpers.create(kube_api, f"{helpers.RESOURCE_API}/deviceclasses", body)
    client = load_client(str(control_plane.kubeconfig_path))
    running = Agent(agent_settings(short_dir), hooks, client=client)
    running.start()
    helpers.wait_for(
        lambda: helpers.get(
            kube_api,
            f"{helpers.RESOURCE_API}/resourceslices",
            query={"fieldSelector": f"spec.nodeName={NODE}"},
        )["items"],
        30,
        "the agent's ResourceSlices",
    )
    yield running
    running.stop()
    helpers.delete_node(kube_api, NODE)


@pytest.fixture
def kubelet(agent) -> Iterator[FakeKubelet]:
    with FakeKubelet(agent.plugin.registration_socket) as peer:
        peer.register()
        yield peer


def allocated_claim(api, namespace: str, name: str, config: dict | None = None) -> ClaimRef:
    """A claim allocated by the scheduler for a pod pinned to the agent's node."""
    body = helpers.resource_claim_body(name, DRIVER)
    if config is not None:
        body["spec"]["devices"]["config"] = [
            {"requests": ["req"], "opaque": {"driver": DRIVER, "parameters": config}}
        ]
    claim = helpers.create_resource_claim(api, namespace, body)
    pod = helpers.pod_body(f"pod-{name}", [{"name": "dev", "resourceClaimName": name}])
    pod["spec"]["nodeSelector"] = {"kubernetes.io/hostname": NODE}
    helpers.create_pod(api, namespace, pod)
    helpers.wait_for_claim_allocated(api, namespace, name)
    return ClaimRef(namespace, name, claim["metadata"]["uid"])


def test_prepare_unprepare_end_to_end(agent, kubelet, kube_api, namespace, backend, short_dir):
    ref = allocated_claim(kube_api, namespace, "c1", config={"mode": "fast"})
    result = kubelet.prepare([ref])[ref.uid]
    assert result.error == ""
    (device,) = result.devices
    assert device.pool_name == NODE and device.request_names == ("req",)
    assert device.cdi_device_ids == (f"dra-core.dev/test={ref.uid}-{device.device_name}",)
    spec_file = short_dir / "cdi" / f"dra-core.dev-test_{ref.uid}.json"
    spec = json.loads(spec_file.read_text())
    edits = spec["devices"][0]["containerEdits"]
    assert f"TEST_DEVICE={device.device_name}" in edits["env"] and "TEST_MODE=fast" in edits["env"]
    assert oct(spec_file.stat().st_mode & 0o777) == "0o644"

    again = kubelet.prepare([ref])[ref.uid]
    assert again == result
    assert backend.prepared.count(ref.uid) == 1, "a repeated prepare must not redo side effects"

    assert kubelet.unprepare([ref]) == {ref.uid: ""}
    assert not spec_file.exists()
    assert agent.service.checkpoint.get(ref.uid) is None
    assert kubelet.unprepare([ref]) == {ref.uid: ""}
    assert backend.unprepared.count(ref.uid) == 1


def test_unknown_claim_unprepares(kubelet):
    ref = ClaimRef("default", "never-seen", str(uuid.uuid4()))
    assert kubelet.unprepare([ref]) == {ref.uid: ""}


def test_replaced_claim_is_refused(kubelet, kube_api, namespace):
    ref = allocated_claim(kube_api, namespace, "c2")
    stale = ClaimRef(ref.namespace, ref.name, str(uuid.uuid4()))
    error = kubelet.prepare([stale])[stale.uid].error
    assert "was replaced" in error and ref.uid in error


def test_unallocated_and_missing_claims(kubelet, kube_api, namespace):
    claim = helpers.create_resource_claim(
        kube_api, namespace, helpers.resource_claim_body("lonely", DRIVER)
    )
    lonely = ClaimRef(namespace, "lonely", claim["metadata"]["uid"])
    missing = ClaimRef(namespace, "nonesuch", str(uuid.uuid4()))
    results = kubelet.prepare([lonely, missing])
    assert "is not allocated" in results[lonely.uid].error
    assert "not found in the API server" in results[missing.uid].error

    def warning_event():
        events = helpers.get(kube_api, f"/api/v1/namespaces/{namespace}/events")["items"]
        return [e for e in events if e["involvedObject"].get("uid") == lonely.uid]

    (event,) = helpers.wait_for(warning_event, 10, "a PrepareFailed event on the claim")
    assert event["type"] == "Warning" and event["reason"] == "PrepareFailed"
    assert event["involvedObject"]["kind"] == "ResourceClaim"
    assert "is not allocated" in event["message"] and DRIVER in event["message"]


def test_claim_of_another_driver(kubelet, kube_api, namespace):
    other = "other.dra-core.dev"
    helpers.create_resource_slice(
        kube_api,
        helpers.resource_slice_body(f"{NODE}-other", NODE, [helpers.device("x-0")], driver=other),
    )
    helpers.create_device_class(kube_api, other, driver=other)
    claim = helpers.create_resource_claim(
        kube_api, namespace, helpers.resource_claim_body("theirs", other)
    )
    pod = helpers.pod_body("pod-theirs", [{"name": "dev", "resourceClaimName": "theirs"}])
    pod["spec"]["nodeSelector"] = {"kubernetes.io/hostname": NODE}
    helpers.create_pod(kube_api, namespace, pod)
    helpers.wait_for_claim_allocated(kube_api, namespace, "theirs")
    ref = ClaimRef(namespace, "theirs", claim["metadata"]["uid"])
    assert f"has no device of driver {DRIVER}" in kubelet.prepare([ref])[ref.uid].error


def test_bad_opaque_config_fails_only_that_claim(kubelet, kube_api, namespace):
    bad = allocated_claim(kube_api, namespace, "bad-config", config={"mode": "x", "speed": 9})
    good = allocated_claim(kube_api, namespace, "good-config", config={"mode": "slow"})
    results = kubelet.prepare([bad, good])
    assert "invalid opaque config for" in results[bad.uid].error
    assert "(from the ResourceClaim)" in results[bad.uid].error
    assert "unknown fields ['speed']" in results[bad.uid].error
    assert results[good.uid].error == ""
    kubelet.unprepare([good])


def test_concurrent_and_duplicate_prepares(kubelet, kube_api, namespace, backend):
    refs = [allocated_claim(kube_api, namespace, f"many-{i}") for i in range(12)]
    answers: list[dict] = []

    def call(batch):
        answers.append(kubelet.prepare(batch))

    batches = [refs, refs[:6], refs[6:], refs[::-1]]
    threads = [threading.Thread(target=call, args=(b,)) for b in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(answers) == 4
    for answer in answers:
        assert all(r.error == "" for r in answer.values()), answer
    full = [a for a in answers if len(a) == len(refs)]
    assert len(full) == 2 and full[0] == full[1], "every call gets the same answer"
    devices = {full[0][r.uid].devices[0].device_name for r in refs}
    assert len(devices) == 12, "each claim has its own device"
    for ref in refs:
        assert backend.prepared.count(ref.uid) == 1
    assert set(kubelet.unprepare(refs).values()) == {""}


def test_api_unreachable_answers_from_checkpoint(agent, kubelet, kube_api, namespace, backend):
    ref = allocated_claim(kube_api, namespace, "before-outage")
    first = kubelet.prepare([ref])[ref.uid]
    assert first.error == ""
    service = agent.service
    reachable = service.client
    service.client = KubeClient(load_client(unreachable_kubeconfig()).api, timeout=1)
    try:
        assert kubelet.prepare([ref])[ref.uid] == first
        new = ClaimRef(namespace, "during-outage", str(uuid.uuid4()))
        error = kubelet.prepare([new])[new.uid].error
        assert "cannot read ResourceClaim" in error and "API server unreachable" in error
    finally:
        service.client = reachable
    assert kubelet.unprepare([ref]) == {ref.uid: ""}


def unreachable_kubeconfig() -> str:
    """A kubeconfig pointing at a loopback port where nothing listens."""
    import socket

    import yaml

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = Path(tempfile.mkdtemp(dir="/tmp")) / "dead-kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "dead",
                "clusters": [
                    {
                        "name": "dead",
                        "cluster": {
                            "server": f"https://127.0.0.1:{port}",
                            "insecure-skip-tls-verify": True,
                        },
                    }
                ],
                "users": [{"name": "dead", "user": {"token": "x"}}],
                "contexts": [{"name": "dead", "context": {"cluster": "dead", "user": "dead"}}],
            }
        )
    )
    return str(path)
