"""The agent's discovery and health loop: a round that finds what the last one found does no
more than ask the backend, and a change is still taken at the next round (real sockets and
files, no API server)."""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dra_core import BackendIdentity, Device, DeviceHealth, Inventory, hookimpl, runtime
from dra_core.health import HealthTracker
from dra_core.model import validate_inventory
from dra_core.plugins import from_objects
from dra_core.runtime import Agent, AgentSettings

DRIVER = "poll.dra-core.dev"


class Backend:
    """Plain devices and their health as the test sets them; a new but equal inventory and
    new reports at every round, as a backend reading sysfs returns them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.names = ["dev-0", "dev-1"]
        self.unhealthy: set[str] = set()
        self.rounds = 0

    @hookimpl
    def dra_backend_identity(self) -> BackendIdentity:
        return BackendIdentity(DRIVER, "dra-core.dev", "poll")

    @hookimpl
    def dra_discover(self) -> Inventory:
        with self.lock:
            return Inventory(devices=tuple(Device(n) for n in self.names))

    @hookimpl
    def dra_device_health(self, inventory: Inventory) -> list[DeviceHealth]:
        with self.lock:
            self.rounds += 1
            return [
                DeviceHealth(d.name, healthy=d.name not in self.unhealthy, message="test")
                for d in inventory.devices
            ]


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How often the agent validated an inventory and updated its health tracker."""
    counts = {"validated": 0, "health updates": 0}
    real_update = HealthTracker.update

    def validate(inventory: Inventory) -> None:
        counts["validated"] += 1
        validate_inventory(inventory)

    def update(self: HealthTracker, *args: object) -> Inventory:
        counts["health updates"] += 1
        return real_update(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(runtime, "validate_inventory", validate)
    monkeypatch.setattr(HealthTracker, "update", update)
    return counts


def rounds_later(backend: Backend, rounds: int, check: Callable[[], bool] = lambda: True) -> None:
    """Wait until the agent has polled ``rounds`` more times and ``check`` holds."""
    with backend.lock:
        until = backend.rounds + rounds
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with backend.lock:
            done = backend.rounds >= until
        if done and check():
            return
        time.sleep(0.01)
    pytest.fail(f"the agent did not poll {rounds} more times, or the change did not show")


@pytest.fixture
def agent(counted: dict[str, int]) -> Iterator[tuple[Agent, Backend]]:
    """A running agent polling every 10 ms, without an API server."""
    backend = Backend()
    with tempfile.TemporaryDirectory(prefix="dra-poll-", dir="/tmp") as root:  # short paths
        settings = AgentSettings.below(Path(root), "node-poll", publish=False, poll_interval=0.01)
        started = Agent(settings, from_objects("poll", backend))
        started.start()
        try:
            yield started, backend
        finally:
            started.stop()


def healthy(agent: Agent) -> dict[str, bool | None]:
    return {s.device: s.healthy for s in agent.board.snapshot()}


def test_unchanged_rounds_neither_validate_nor_update_health(agent, counted):
    _, backend = agent
    rounds_later(backend, 20)
    # Once at start, for the first inventory and its health; never again while unchanged.
    assert counted == {"validated": 1, "health updates": 1}


def test_a_new_device_is_validated_and_taken_at_the_next_round(agent, counted):
    started, backend = agent
    rounds_later(backend, 3)
    with backend.lock:
        backend.names.append("dev-2")
    rounds_later(backend, 3, lambda: len(started.inventory.devices) == 3)
    assert healthy(started) == {"dev-0": True, "dev-1": True, "dev-2": True}
    assert counted == {"validated": 2, "health updates": 2}


def test_a_health_change_alone_is_taken_without_validating_again(agent, counted):
    started, backend = agent
    with backend.lock:
        backend.unhealthy.add("dev-1")
    rounds_later(backend, 3, lambda: healthy(started)["dev-1"] is False)
    with backend.lock:
        backend.unhealthy.clear()
    rounds_later(backend, 3, lambda: healthy(started)["dev-1"] is True)
    assert counted == {"validated": 1, "health updates": 3}


def test_an_invalid_inventory_after_a_valid_one_is_still_refused(agent, counted):
    started, backend = agent
    with backend.lock:
        backend.names.append("Not_A_DNS_Label")
    rounds_later(backend, 5)
    assert [d.name for d in started.inventory.devices] == ["dev-0", "dev-1"]
    assert counted["validated"] >= 5  # refused each round: it never became the inventory
    assert counted["health updates"] == 1
