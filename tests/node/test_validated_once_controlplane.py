"""The agent validates what the backend discovers once, and publishes it without validating it
again: not in the publisher's update, nor at each write of the slices (real API server)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from dra_core import BackendIdentity, Device, Inventory, hookimpl, model, runtime
from dra_core.kube.client import KubeClient
from dra_core.slices import build, publisher
from dra_core.testing.agent import RunningAgent
from dra_core.testing.scenario import published_slices, wait_for

pytestmark = pytest.mark.controlplane

DRIVER = "once.dra-core.dev"


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


def test_a_discovered_inventory_is_validated_once(
    dra_agent: Callable[..., RunningAgent],
    dra_kube_client: KubeClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    validated: list[Inventory] = []
    real = model.validate_inventory

    def counted(inventory: Inventory) -> None:
        validated.append(inventory)
        real(inventory)

    for module in (runtime, publisher, build):  # every caller in the agent's publishing path
        monkeypatch.setattr(module, "validate_inventory", counted)
    backend = GrowingBackend()
    agent = dra_agent(backend, name="once", poll_interval=0.3)

    def devices_published() -> int:
        slices = published_slices(dra_kube_client, agent.node, DRIVER) or []
        return sum(len(s["spec"].get("devices") or ()) for s in slices)

    wait_for("the first 3 devices", lambda: devices_published() == 3, 30)
    with backend.lock:
        backend.devices = 4  # a change: published again, in a new generation
    wait_for("the 4th device", lambda: devices_published() == 4, 30)
    agent.stop()  # no discovery after this: the counts are final
    assert backend.discoveries >= 2
    # Each inventory validated once, as discovered: not again while discovery finds it unchanged.
    assert [len(i.devices) for i in validated] == [3, 4]
