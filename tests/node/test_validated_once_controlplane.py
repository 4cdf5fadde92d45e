"""The agent validates what the backend discovers once, and publishes it without validating it
again: not in the publisher's update, nor at each write of the slices (real API server)."""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dra_core import BackendIdentity, Device, Inventory, hookimpl, model, runtime
from dra_core.kube.client import KubeClient
from dra_core.plugins import from_objects
from dra_core.slices import build, publisher
from dra_core.testing.scenario import create_ready_node, published_slices, wait_for

pytestmark = pytest.mark.controlplane

DRIVER = "once.dra-core.dev"
NODE = "validated-once-node"


class GrowingBackend:
    """Plain devices, one more each time ``grow`` is called; counts its discoveries."""

    def __init__(self) -> None:
        self.devices = 3
        self.discoveries = 0
        self.lock = threading.Lock()

    @hookimpl
    def dra_backend_identity(self) -> BackendIdentity:
        return BackendIdentity(DRIVER, "dra-core.dev", "once")

    @hookimpl
    def dra_discover(self) -> Inventory:
        with self.lock:
            self.discoveries += 1
            return Inventory(devices=tuple(Device(f"dev-{i}") for i in range(self.devices)))


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="dra-once-", dir="/tmp"))  # socket paths stay short
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_discovered_inventory_is_validated_once(
    dra_kube_client: KubeClient, short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    validated: list[Inventory] = []
    real = model.validate_inventory

    def counted(inventory: Inventory) -> None:
        validated.append(inventory)
        real(inventory)

    for module in (runtime, publisher, build):  # every caller in the agent's publishing path
        monkeypatch.setattr(module, "validate_inventory", counted)
    create_ready_node(dra_kube_client, NODE)
    backend = GrowingBackend()
    settings = runtime.AgentSettings.below(short_dir, NODE, poll_interval=0.3)
    agent = runtime.Agent(settings, from_objects("once", backend), client=dra_kube_client)

    def devices_published() -> int:
        slices = published_slices(dra_kube_client, NODE, DRIVER) or []
        return sum(len(s["spec"].get("devices") or ()) for s in slices)

    agent.start()
    try:
        wait_for("the first 3 devices", lambda: devices_published() == 3, 30)
        with backend.lock:
            backend.devices = 4  # a change: published again, in a new generation
        wait_for("the 4th device", lambda: devices_published() == 4, 30)
    finally:
        agent.stop()
        dra_kube_client.request("DELETE", f"/api/v1/nodes/{NODE}")
    assert backend.discoveries >= 2
    assert len(validated) == backend.discoveries, "validated once each, as discovered"
