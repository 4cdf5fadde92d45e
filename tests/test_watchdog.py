"""The watchdog on backend hook calls: a call blocked in a real read fails in bounded time.

The blocking backend here reads a real FIFO that nobody writes, as a backend that opens the
wrong file would; the test unblocks it by writing to the FIFO, which is how a stuck call that
later returns is exercised.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from loguru import logger

from dra_core import (
    AllocatedClaim,
    AllocatedDevice,
    BackendIdentity,
    ClaimRef,
    ContainerEdits,
    Device,
    Inventory,
    NodeContext,
    PreparedClaim,
    PreparedDevice,
    hookimpl,
)
from dra_core.plugins import Hooks, from_objects
from dra_core.watchdog import (
    MAX_STUCK_CALLS,
    HookError,
    HookLimits,
    HookStuck,
    HookTimeout,
    StuckCall,
)

CONTEXT = NodeContext(node_name="node-1", driver_name="block.example.com")


class FifoBackend:
    """Prepares any device at once, except ``dev-fifo``, whose prepare reads ``fifo``."""

    def __init__(self, fifo: Path) -> None:
        self.fifo = fifo
        self.returned: list[str] = []
        self.discover_blocks = False

    @hookimpl
    def dra_backend_identity(self) -> BackendIdentity:
        return BackendIdentity("block.example.com", "example.com", "block")

    @hookimpl
    def dra_discover(self) -> Inventory:
        if self.discover_blocks:
            self.fifo.read_bytes()  # blocks until someone writes
        return Inventory(devices=(Device("dev-0"), Device("dev-fifo")))

    @hookimpl
    def dra_prepare(self, claim: AllocatedClaim) -> list[PreparedDevice]:
        for device in claim.devices:
            if device.device == "dev-fifo":
                self.fifo.read_bytes()  # blocks until someone writes
        self.returned.append(claim.ref.uid)
        return [PreparedDevice(d, ContainerEdits(env={"D": d.device})) for d in claim.devices]

    @hookimpl
    def dra_unprepare(self, claim: PreparedClaim) -> bool:
        return True

    @hookimpl
    def dra_check_allocation(self, claim: AllocatedClaim) -> None:
        if claim.ref.name == "raises":
            raise ValueError("device on fire")


def claim(device: str, name: str = "c") -> AllocatedClaim:
    ref = ClaimRef("default", name, str(uuid.uuid4()))
    return AllocatedClaim(ref, (AllocatedDevice("r", "node-1", device),), {})


def unblock(fifo: Path) -> None:
    """Let a reader of ``fifo`` finish: open it for writing (waits for the reader), close."""
    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    os.write(fd, b"go\n")
    os.close(fd)


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    yield path
    # Free any reader left blocked, so no thread outlives the test.
    for _ in range(MAX_STUCK_CALLS + 2):
        try:
            unblock(path)
        except OSError:  # ENXIO: no reader any more
            break
        time.sleep(0.01)


@pytest.fixture
def backend(fifo: Path) -> FifoBackend:
    return FifoBackend(fifo)


@pytest.fixture
def hooks(backend: FifoBackend) -> Hooks:
    hooks = from_objects("block", backend)
    hooks.watchdog.limits = HookLimits(prepare=0.5, discovery=0.5, stuck=2.0)
    return hooks


def wait_until(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_a_prepare_blocked_in_a_read_times_out_and_others_go_on(hooks, backend, fifo):
    timed_out: list[StuckCall] = []
    returned: list[StuckCall] = []
    hooks.watchdog.subscribe(timed_out.append, returned.append)
    stuck_claim = claim("dev-fifo", "stuck")

    started = time.monotonic()
    with pytest.raises(HookTimeout) as caught:
        hooks.prepare(stuck_claim, CONTEXT)
    took = time.monotonic() - started
    assert 0.5 <= took < 2.0, took
    message = str(caught.value)
    assert "backend 'block' could not prepare the devices: no answer within 0.5 s" in message
    assert "hook '" not in message and caught.value.hook == "dra_prepare"
    assert f"for claim {stuck_claim.ref}" in message
    assert "test_watchdog.py" in message and "dra_prepare" in message  # where it runs
    assert "/healthz fails" in message and "2 s after it began" in message
    assert isinstance(caught.value.__cause__, TimeoutError)
    assert caught.value.claim == stuck_claim.ref

    (stuck,) = hooks.watchdog.stuck_calls()
    assert (stuck.hook, stuck.plugin, stuck.claim) == ("dra_prepare", "block", stuck_claim.ref)
    assert timed_out == [stuck]

    # Another claim is prepared at once: nothing waits for the stuck call.
    other = claim("dev-0", "other")
    assert [p.allocation.device for p in hooks.prepare(other, CONTEXT)] == ["dev-0"]

    # The stuck claim is refused at once, for every hook that takes a claim.
    for call in (
        lambda: hooks.prepare(stuck_claim, CONTEXT),
        lambda: hooks.unprepare(PreparedClaim(stuck_claim.ref, ()), CONTEXT),
        lambda: hooks.check_allocation(stuck_claim, Inventory(), CONTEXT),
    ):
        started = time.monotonic()
        with pytest.raises(HookStuck, match=r"not called for claim .*: its earlier prepare"):
            call()
        assert time.monotonic() - started < 0.4

    # When the read returns, the call is no longer stuck and its result is discarded.
    unblock(fifo)
    wait_until(lambda: returned == [stuck])  # listeners hear of it after it is untracked
    assert hooks.watchdog.stuck_calls() == []
    assert stuck_claim.ref.uid in backend.returned
    assert [p.allocation.device for p in hooks.prepare(claim("dev-0"), CONTEXT)] == ["dev-0"]


def test_discovery_times_out_once_then_fails_at_once_until_it_returns(hooks, backend, fifo):
    backend.discover_blocks = True
    with pytest.raises(HookTimeout, match="the devices discovered last stay published"):
        hooks.discover(CONTEXT)
    started = time.monotonic()
    with pytest.raises(HookStuck, match="calls for discovery fail at once"):
        hooks.discover(CONTEXT)
    assert time.monotonic() - started < 0.4
    # Prepare is another hook: it runs.
    assert hooks.prepare(claim("dev-0"), CONTEXT)
    backend.discover_blocks = False
    unblock(fifo)
    wait_until(lambda: not hooks.watchdog.stuck_calls())
    assert [d.name for d in hooks.discover(CONTEXT).devices] == ["dev-0", "dev-fifo"]


def test_too_many_stuck_calls_refuse_every_call(hooks, fifo):
    hooks.watchdog.limits = HookLimits(prepare=0.1)
    for _ in range(MAX_STUCK_CALLS):
        with pytest.raises(HookTimeout):
            hooks.prepare(claim("dev-fifo"), CONTEXT)
    assert len(hooks.watchdog.stuck_calls()) == MAX_STUCK_CALLS
    with pytest.raises(HookStuck, match=f"{MAX_STUCK_CALLS} calls of backend 'block'"):
        hooks.prepare(claim("dev-0"), CONTEXT)


def test_errors_name_the_backend_in_a_users_words_and_keep_the_cause(hooks):
    with pytest.raises(HookError) as caught:
        hooks.check_allocation(claim("dev-0", "raises"), Inventory(), CONTEXT)
    assert not isinstance(caught.value, HookTimeout)
    assert str(caught.value) == "backend 'block' refused the allocation: device on fire"
    assert (caught.value.plugin, caught.value.hook) == ("block", "dra_check_allocation")
    assert isinstance(caught.value.__cause__, ValueError)
    assert hooks.watchdog.stuck_calls() == []


def test_the_callers_log_context_reaches_the_hook(hooks, backend):
    seen: list[object] = []
    sink = logger.add(lambda m: seen.append(m.record["extra"].get("request")), level="DEBUG")

    class Logs:
        @hookimpl
        def dra_decode_config(self, parameters: dict) -> dict:
            logger.info("decoding")
            return dict(parameters)

    logging_hooks = from_objects("logs", Logs())
    try:
        with logger.contextualize(request="r-1"):
            assert logging_hooks.decode_config({"a": 1}, CONTEXT) == {"a": 1}
    finally:
        logger.remove(sink)
    assert "r-1" in seen


def test_calls_run_in_few_threads(hooks):
    before = threading.active_count()
    for _ in range(200):
        hooks.prepare(claim("dev-0"), CONTEXT)
    assert threading.active_count() - before <= 2  # idle workers are reused, not piled up


@pytest.mark.parametrize(
    "limits",
    [{"prepare": 0}, {"discovery": -1.0}, {"stuck": float("inf")}, {"prepare": float("nan")}],
)
def test_limits_must_be_positive_and_finite(limits):
    with pytest.raises(ValueError, match="is not a positive number"):
        HookLimits(**limits)
