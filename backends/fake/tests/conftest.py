"""Fixtures of the fake backend's tests: the hooks facade, started backends, captured logs."""

from __future__ import annotations

import dra_backend_fake.plugin
import pytest
from dra_backend_fake.testing import node_context, prepared_claim
from loguru import logger

from dra_core import PreparedClaim, PreparedClaims
from dra_core.plugins import Hooks, from_objects


class Running:
    """A started fake backend, called through the typed hooks facade as the agent calls it."""

    def __init__(self, hooks: Hooks, context) -> None:
        self.hooks = hooks
        self.context = context
        #: What the agent's checkpoint would hold: the claims prepared, by UID.
        self.prepared: dict[str, PreparedClaim] = {}

    def discover(self):
        return self.hooks.discover(self.context)

    def names(self):
        return [d.name for d in self.discover().devices]

    def unhealthy(self):
        reports = self.hooks.device_health(self.discover(), self.context)
        return {h.device: h for h in reports if not h.healthy}

    def check(self, claim):
        others = tuple(c for uid, c in self.prepared.items() if uid != claim.ref.uid)
        self.hooks.check_allocation(claim, self.discover(), self.context, PreparedClaims(others))

    def prepare(self, claim):
        devices = self.hooks.prepare(claim, self.context)
        self.prepared[claim.ref.uid] = prepared_claim(claim, list(devices))
        return devices

    def claim_edits(self, claim, prepared):
        return self.hooks.claim_edits(claim, prepared, self.context)

    def unprepare(self, claim, prepared):
        self.hooks.unprepare(prepared_claim(claim, list(prepared)), self.context)
        self.prepared.pop(claim.ref.uid, None)


@pytest.fixture
def hooks() -> Hooks:
    return from_objects("fake", dra_backend_fake.plugin.FakePlugin)


@pytest.fixture
def start():
    """start(**options) -> Running, each with a backend of its own (as each agent has); every
    backend started is stopped at teardown."""
    started: list[Running] = []

    def _start(**options) -> Running:
        running = Running(
            from_objects("fake", dra_backend_fake.plugin.FakePlugin), node_context(**options)
        )
        running.hooks.start(running.context)
        started.append(running)
        return running

    yield _start
    for running in reversed(started):
        running.hooks.stop(running.context)


@pytest.fixture
def logs():
    """Messages loguru logs during the test, as 'LEVEL message' lines."""
    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(str(m)), level="DEBUG", format="{level} {message}")
    yield messages
    logger.remove(sink)
