"""A node reboots while its API server is unreachable; the agent converges once it returns.

The agent's client goes through a TCP proxy that the test cuts and restores, so the shared
API server keeps serving the other tests. Before the reboot two claims are prepared; while
the agent is down one of them is deleted. The agent then starts under a new boot ID with the
API cut off: nothing can be checked. When the API returns, reconciliation (retried, not
given up) prepares the surviving claim again and releases the deleted one; later runs
release a claim deleted while the agent is running.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from dra_core import (
    BackendIdentity,
    ClaimRef,
    ContainerEdits,
    Device,
    Inventory,
    PreparedDevice,
    hookimpl,
)
from dra_core.kube.client import load_client
from dra_core.plugins import from_objects
from dra_core.runtime import Agent, AgentSettings
from dra_core.testing.kubelet import FakeKubelet
from dra_core.testing.scenario import create_ready_node
from tests.controlplane import helpers
from tests.node.apiproxy import ApiProxy

pytestmark = pytest.mark.controlplane

DRIVER = "outage.dra-core.dev"
NODE = "outage-node"


class RecordingBackend:
    def __init__(self) -> None:
        self.prepared: list[str] = []
        self.unprepared: list[str] = []
        self.lock = threading.Lock()

    @hookimpl
    def dra_backend_identity(self):
        return BackendIdentity(DRIVER, "dra-core.dev", "outage")

    @hookimpl
    def dra_discover(self, context):
        return Inventory(devices=tuple(Device(f"dev-{i}") for i in range(4)))

    @hookimpl
    def dra_prepare(self, claim):
        with self.lock:
            self.prepared.append(claim.ref.uid)
        return [PreparedDevice(d, ContainerEdits(env={"OUTAGE": "1"})) for d in claim.devices]

    @hookimpl
    def dra_unprepare(self, claim):
        with self.lock:
            self.unprepared.append(claim.ref.uid)
        return True


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="dra-outage-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def node(kube_api, dra_kube_client) -> Iterator[str]:
    create_ready_node(dra_kube_client, NODE)
    helpers.create_device_class(kube_api, DRIVER, driver=DRIVER)
    yield NODE
    helpers.delete_device_class(kube_api, DRIVER)
    helpers.delete_node(kube_api, NODE)


@pytest.fixture
def proxy(control_plane) -> Iterator[ApiProxy]:
    server = urlsplit(control_plane.server)
    with ApiProxy((server.hostname, server.port)) as running:
        running.up()
        yield running


def allocated_claim(api, namespace: str, name: str) -> ClaimRef:
    claim = helpers.create_resource_claim(api, namespace, helpers.resource_claim_body(name, DRIVER))
    pod = helpers.pod_body(f"pod-{name}", [{"name": "dev", "resourceClaimName": name}])
    pod["spec"]["nodeSelector"] = {"kubernetes.io/hostname": NODE}
    helpers.create_pod(api, namespace, pod)
    helpers.wait_for_claim_allocated(api, namespace, name)
    return ClaimRef(namespace, name, claim["metadata"]["uid"])


def delete_claim(api, ref: ClaimRef) -> None:
    helpers.delete_pod(api, ref.namespace, f"pod-{ref.name}")
    path = f"{helpers.RESOURCE_API}/namespaces/{ref.namespace}/resourceclaims/{ref.name}"
    helpers.merge_patch(api, path, {"metadata": {"finalizers": None}})
    helpers.delete(api, path)

    def deleted() -> bool:
        claims = helpers.get(api, path.rsplit("/", 1)[0])["items"]
        return all(c["metadata"]["uid"] != ref.uid for c in claims)

    helpers.wait_for(deleted, 30, "the claim deleted")


def test_reboot_while_the_api_server_is_unreachable(
    control_plane, kube_api, namespace, node, root, proxy
):
    backend = RecordingBackend()
    boot_id = root / "boot_id"
    boot_id.write_text("boot-1\n")
    settings = AgentSettings.below(
        root, node, poll_interval=0.5, boot_id_file=boot_id, reconcile_interval=4.0
    )

    # The agent reaches the API server only through the proxy.
    kubeconfig = root / "kubeconfig"
    kubeconfig.write_text(
        control_plane.kubeconfig_path.read_text().replace(
            control_plane.server, f"https://127.0.0.1:{proxy.port}"
        )
    )
    assert str(proxy.port) in kubeconfig.read_text()

    def agent() -> Agent:
        client = load_client(str(kubeconfig), timeout=3.0)
        return Agent(settings, from_objects("outage", backend), client=client)

    first = agent()
    first.start()
    try:
        helpers.wait_for(
            lambda: helpers.get(
                kube_api,
                f"{helpers.RESOURCE_API}/resourceslices",
                query={"fieldSelector": f"spec.nodeName={NODE}"},
            )["items"],
            30,
            "the agent's ResourceSlices",
        )
        keep = allocated_claim(kube_api, namespace, "keep")
        gone = allocated_claim(kube_api, namespace, "gone")
        with FakeKubelet(first.plugin.registration_socket) as kubelet:
            kubelet.register()
            results = kubelet.prepare([keep, gone])
        assert [r.error for r in results.values()] == ["", ""]
    finally:
        first.stop()

    # The node reboots (device state and /var/run/cdi are lost) and one claim is deleted
    # meanwhile; when the agent starts, the API server cannot be reached.
    for spec in (root / "cdi").iterdir():
        spec.unlink()
    boot_id.write_text("boot-2\n")
    delete_claim(kube_api, gone)
    proxy.down()

    second = agent()
    second.start()
    try:
        helpers.wait_for(
            lambda: second.service.api_reachable is False, 40, "the API server found unreachable"
        )
        assert second.readiness() and second.liveness() == []
        time.sleep(3)  # a few retries while the API server is away: nothing can change
        records = second.service.checkpoint.records()
        assert {uid: r.boot_id for uid, r in records.items()} == {
            keep.uid: "boot-1",
            gone.uid: "boot-1",
        }
        assert sorted(backend.prepared) == sorted([keep.uid, gone.uid]), "nothing prepared again"
        assert backend.unprepared == []

        proxy.up()

        def converged() -> bool:
            records = second.service.checkpoint.records()
            return set(records) == {keep.uid} and records[keep.uid].boot_id == "boot-2"

        helpers.wait_for(converged, 120, "the claims reconciled once the API server returned")
        assert backend.prepared.count(keep.uid) == 2, "prepared again after the reboot"
        assert backend.prepared.count(gone.uid) == 1
        assert gone.uid in backend.unprepared, "the deleted claim was released"
        assert [p.name for p in (root / "cdi").iterdir()] == [
            f"dra-core.dev-outage_{keep.uid}.json"
        ]
        assert second.service.api_reachable is True and second.readiness() == []

        # Reconciliation goes on periodically: a claim deleted while the agent runs (and the
        # kubelet never unprepares) is released too.
        delete_claim(kube_api, keep)
        helpers.wait_for(
            lambda: not second.service.checkpoint.records(), 30, "the periodic reconciliation"
        )
        assert keep.uid in backend.unprepared and not list((root / "cdi").iterdir())
    finally:
        second.stop()
