"""What follows an error is decided by its kind (`dra_core.errors`), one claim at a time.

The real agent answers a kubelet over its gRPC sockets, with the checkpoint and CDI specs on
disk; the API server is a stub holding allocated claims. In one kubelet call, claims that the
backend refuses, that fail for a while, that hit a bug, or whose CDI spec cannot be written or
removed fail alone, each with a message in a user's words, logged once; a fatal error stops
the agent, and ``dra-core run`` exits non-zero with its message.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from loguru import logger
from pydantic import BaseModel, ConfigDict

from dra_core import (
    AllocatedClaim,
    AllocationError,
    BackendIdentity,
    ClaimRef,
    ContainerEdits,
    Device,
    FatalError,
    Inventory,
    PreparedClaim,
    PreparedDevice,
    TransientError,
    hookimpl,
)
from dra_core.hookspecs import NodeContext
from dra_core.kube.claims import claim_path
from dra_core.plugins import from_objects
from dra_core.runtime import Agent
from dra_core.testing.kubelet import FakeKubelet
from dra_core.webhook import validate_object
from tests.distributions import make_distribution
from tests.node.test_watchdog_agent import Claims, _settings, _wait_until

DRIVER = "widgets.dra-core.dev"
#: Internal words that must not reach a user: hook names and pydantic's links.
INTERNAL = ("hook '", "dra_prepare", "dra_check_allocation", "errors.pydantic.dev", "Traceback")


class WidgetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    speed: int = 1


class Widgets:
    """Each device name says how its claims fail; ``dev-ok*`` devices are prepared."""

    def __init__(self) -> None:
        self.unprepared: list[str] = []

    @hookimpl
    def dra_backend_identity(self) -> BackendIdentity:
        return BackendIdentity(DRIVER, "dra-core.dev", "widget")

    @hookimpl
    def dra_discover(self) -> Inventory:
        names = ("dev-ok-0", "dev-ok-1", "dev-ok-2", "dev-bad", "dev-busy", "dev-bug", "dev-fatal")
        return Inventory(devices=tuple(Device(name) for name in names))

    @hookimpl
    def dra_decode_config(self, parameters: Any) -> WidgetConfig:
        return WidgetConfig.model_validate(parameters)  # pydantic's own error, as authors do

    @hookimpl
    def dra_check_allocation(self, claim: AllocatedClaim) -> None:
        if any(d.device == "dev-bad" for d in claim.devices):
            msg = "device dev-bad is unhealthy (fan stopped); delete the pod to get another one"
            raise AllocationError(msg)

    @hookimpl
    def dra_prepare(self, claim: AllocatedClaim) -> list[PreparedDevice]:
        devices = {d.device for d in claim.devices}
        if "dev-busy" in devices:
            raise TransientError("device dev-busy is resetting")
        if "dev-bug" in devices:
            return [{}["memory"]]  # a bug: KeyError
        if "dev-fatal" in devices:
            raise FatalError("the widget kernel driver is gone; load it and restart the agent")
        return [PreparedDevice(d, ContainerEdits(env={"WIDGET": d.device})) for d in claim.devices]

    @hookimpl
    def dra_unprepare(self, claim: PreparedClaim) -> bool:
        self.unprepared.append(claim.ref.uid)
        return True


def _add(claims: Claims, device: str, parameters: dict[str, Any] | None = None) -> ClaimRef:
    ref = claims.add(device)
    if parameters is not None:
        claim = json.loads(claims.objects[claim_path(ref)])
        config = {"source": "FromClaim", "opaque": {"driver": DRIVER, "parameters": parameters}}
        claim["status"]["allocation"]["devices"]["config"] = [config]
        claims.objects[claim_path(ref)] = json.dumps(claim).encode()
    return ref


Record = tuple[str, str, dict[str, Any]]


@pytest.fixture
def logs() -> Iterator[list[Record]]:
    """(level, message, extra fields) of every record at INFO and above."""
    records: list[Record] = []

    def sink(message: Any) -> None:
        record = message.record
        records.append((record["level"].name, record["message"], record["extra"]))

    handler = logger.add(sink, level="INFO")
    yield records
    logger.remove(handler)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="dra-err-", dir="/tmp"))  # short: socket paths
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def agent(short_dir: Path) -> Iterator[tuple[Agent, Claims, Widgets]]:
    claims, backend = Claims(DRIVER, short_dir), Widgets()
    agent = Agent(_settings(short_dir, 0), from_objects("widgets", backend), claims.client())
    agent.start()
    yield agent, claims, backend
    agent.stop()
    claims.close()


def _spec(agent: Agent, ref: ClaimRef) -> Path:
    assert agent.service is not None
    return agent.service.cdi.spec_path(ref.uid)


def _block(path: Path) -> None:
    """Put a non-empty directory where a claim's CDI spec goes: it can be neither written nor
    removed, as on a broken or read-only CDI directory."""
    path.unlink(missing_ok=True)
    (path / "keep").mkdir(parents=True)


def test_each_claim_of_a_call_fails_alone_in_a_users_words_and_is_logged_once(agent, logs):
    agent, claims, _ = agent
    bad, busy, bug = _add(claims, "dev-bad"), _add(claims, "dev-busy"), _add(claims, "dev-bug")
    typo = _add(claims, "dev-ok-0", {"sped": 2})
    cdi_broken, good = _add(claims, "dev-ok-1"), _add(claims, "dev-ok-2")
    _block(_spec(agent, cdi_broken))  # its write fails, and so does the removal that undoes it

    with FakeKubelet(agent.plugin.registration_socket) as kubelet:
        kubelet.register()
        results = kubelet.prepare([bad, busy, bug, typo, cdi_broken, good])

    assert not results[good.uid].error and results[good.uid].devices
    errors = {ref.name: results[ref.uid].error for ref in (bad, busy, bug, typo, cdi_broken)}
    refused = "backend 'widgets' refused the allocation: device dev-bad is unhealthy (fan stopped)"
    assert errors[bad.name].endswith(f"{refused}; delete the pod to get another one")
    assert errors[busy.name].endswith(
        "could not prepare the devices: device dev-busy is resetting; the kubelet will retry"
    )
    assert "could not prepare the devices: KeyError: 'memory'" in errors[bug.name]
    assert "the agent's log has its traceback" in errors[bug.name]
    invalid = "invalid opaque config for all requests (from the ResourceClaim): sped: unknown"
    assert invalid in errors[typo.name]
    assert f"CDI spec {_spec(agent, cdi_broken)}" in errors[cdi_broken.name]
    for name, error in errors.items():
        assert f"prepare of claim default/{name}" in error
        assert not [word for word in INTERNAL if word in error], error

    # Each failure is logged once; only the unexpected one with its traceback (at ERROR).
    def logged(ref: ClaimRef) -> list[str]:
        return [level for level, m, _ in logs if m.startswith(f"prepare of claim {ref} failed")]

    assert [logged(ref) for ref in (bad, busy, typo, cdi_broken)] == [["WARNING"]] * 4
    assert logged(bug) == ["ERROR"]
    # For the backend's authors, the record names the plugin and hook that raised.
    (fields,) = [extra for _, m, extra in logs if str(bad) in m]
    assert (fields["plugin"], fields["hook"]) == ("widgets", "dra_check_allocation")
    # The removal that fails after the failed prepare is a failure of its own, logged too.
    undo = f"undoing the failed prepare of claim {cdi_broken}"
    undoing = [m for _, m, _ in logs if m.startswith(undo)]
    assert len(undoing) == 1 and "cannot remove it" in undoing[0]
    assert agent.service is not None and agent.service.checkpoint.get(good.uid) is not None


def test_a_claim_whose_cdi_spec_cannot_be_removed_does_not_fail_the_others(agent, logs):
    agent, claims, backend = agent
    stuck, other = _add(claims, "dev-ok-0"), _add(claims, "dev-ok-1")
    with FakeKubelet(agent.plugin.registration_socket) as kubelet:
        kubelet.register()
        assert not any(r.error for r in kubelet.prepare([stuck, other]).values())
        _block(_spec(agent, stuck))

        errors = kubelet.unprepare([stuck, other])

        assert errors[other.uid] == ""
        assert not _spec(agent, other).exists() and other.uid in backend.unprepared
        failed = f"unprepare of claim {stuck} failed: CDI spec {_spec(agent, stuck)}"
        assert errors[stuck.uid].startswith(failed)
        assert errors[stuck.uid].endswith("the claim stays prepared")
        assert agent.service is not None
        assert agent.service.checkpoint.get(stuck.uid) is not None
        assert agent.service.checkpoint.get(other.uid) is None
        # Once the directory is gone, the kubelet's retry unprepares it.
        (_spec(agent, stuck) / "keep").rmdir()
        _spec(agent, stuck).rmdir()
        assert kubelet.unprepare([stuck]) == {stuck.uid: ""}
    assert len([m for _, m, _ in logs if m.startswith(f"unprepare of claim {stuck} failed")]) == 1


def test_a_fatal_error_fails_its_claim_and_the_rest_of_the_call_and_stops_the_agent(agent):
    agent, claims, _ = agent
    fatal, after = _add(claims, "dev-fatal"), _add(claims, "dev-ok-0")
    with FakeKubelet(agent.plugin.registration_socket) as kubelet:
        kubelet.register()
        results = kubelet.prepare([fatal, after])

    assert results[fatal.uid].error.endswith(
        "the widget kernel driver is gone; load it and restart the agent; "
        "the agent stops, to be restarted"
    )
    assert "the agent is stopping" in results[after.uid].error
    assert agent.stop_event.is_set()
    assert isinstance(agent.fatal, Exception) and "kernel driver is gone" in str(agent.fatal)


def test_a_webhook_denial_speaks_of_the_field_not_of_pydantic() -> None:
    hooks = from_objects("widgets", Widgets())
    context = NodeContext(node_name="node-1", driver_name=DRIVER)
    claim = {
        "metadata": {"name": "c", "namespace": "default"},
        "spec": {
            "devices": {"config": [{"opaque": {"driver": DRIVER, "parameters": {"speed": "x"}}}]}
        },
    }

    denial = validate_object("ResourceClaim", claim, hooks, context)

    assert denial is not None and "speed: Input should be a valid integer" in denial
    assert not [word for word in (*INTERNAL, "For further information") if word in denial]


FATAL_BACKEND = """
from pathlib import Path

from dra_core import BackendIdentity, BackendOption, Device, FatalError, Inventory, hookimpl


class Backend:
    @hookimpl
    def dra_backend_identity(self):
        return BackendIdentity("doomed.dra-core.dev", "dra-core.dev", "doomed")

    @hookimpl
    def dra_backend_options(self):
        return [BackendOption("trigger", "a file whose presence is fatal")]

    @hookimpl
    def dra_discover(self, context):
        if Path(context.options["trigger"]).exists():
            raise FatalError("the doomed kernel driver is unloaded; load it (modprobe doomed)")
        return Inventory(devices=(Device("dev-0"),))
"""


def test_dra_core_run_exits_non_zero_with_the_message_of_a_fatal_error(short_dir: Path) -> None:
    root = short_dir
    site, trigger = root / "site", root / "trigger"
    make_distribution(
        site,
        "doomed-backend",
        "0.1",
        {"dra_core.backends": {"doomed": "doomed_backend:Backend"}},
        {"doomed_backend": FATAL_BACKEND},
    )
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    argv = [
        sys.executable, "-m", "dra_core", "run", "--backend", "doomed", "--no-publish",
        "--trigger", str(trigger), "--poll-interval", "0.2", "--http-port", "0",
        "--registration-dir", str(root / "reg"), "--plugins-dir", str(root / "plugins"),
        "--cdi-dir", str(root / "cdi"),
    ]  # fmt: skip
    agent = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    try:
        _wait_until(lambda: bool(list((root / "reg").glob("*-reg.sock"))), timeout=30)
        assert agent.poll() is None
        started = time.monotonic()
        trigger.touch()
        _, stderr = agent.communicate(timeout=30)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.communicate(timeout=15)
    assert agent.returncode != 0, stderr
    assert time.monotonic() - started < 10.0
    last = stderr.strip().splitlines()[-1]
    assert last == (
        "dra-core: error: backend 'doomed' could not discover the devices: the doomed kernel "
        "driver is unloaded; load it (modprobe doomed)"
    ), stderr
