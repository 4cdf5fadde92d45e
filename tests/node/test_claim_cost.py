"""The claim service's work per prepare and unprepare does not grow with the claims it holds.

Counted, not timed: the bytes the agent writes to files, the flushes (fsync, fdatasync) it
asks for and the prepared claims it looks at, for one prepare and one unprepare with no other
claim prepared and with 500.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dra_core import BackendIdentity, ContainerEdits, Device, Inventory, PreparedDevice, hookimpl
from dra_core.cdi import CdiSpecs
from dra_core.checkpoint import Checkpoint
from dra_core.hookspecs import NodeContext
from dra_core.kube.claims import claim_path
from dra_core.model import ClaimRef, ClaimResult, PreparedClaim, PreparedClaims
from dra_core.node.lock import DriverLock
from dra_core.node.service import ClaimService
from dra_core.plugins import from_objects

DRIVER = "cost.dra-core.dev"
NODE = "node-1"
BOOT = "boot-1"
HELD = 500


class Backend:
    @hookimpl
    def dra_backend_identity(self) -> BackendIdentity:
        return BackendIdentity(DRIVER, "dra-core.dev", "cost")

    @hookimpl
    def dra_prepare(self, claim: Any) -> list[PreparedDevice]:
        return [PreparedDevice(d, ContainerEdits(env={"DEVICE": d.device})) for d in claim.devices]

    @hookimpl
    def dra_unprepare(self, claim: Any) -> bool:
        return True

    @hookimpl
    def dra_check_allocation(self, claim: Any, prepared: PreparedClaims) -> None:
        """As a backend with exclusive devices checks: the claims holding each device."""
        for device in claim.devices:
            assert not prepared.holding(device.device)


class Claims:
    """The API server, as far as reading allocated claims goes."""

    timeout = 10.0

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}

    def add(self, index: int) -> ClaimRef:
        ref = ClaimRef("default", f"claim-{index:04d}", str(uuid.UUID(int=index + 1)))
        result = {"request": "dev", "driver": DRIVER, "pool": NODE, "device": f"dev-{index}"}
        self.objects[claim_path(ref)] = {
            "metadata": {"name": ref.name, "namespace": ref.namespace, "uid": ref.uid},
            "status": {"allocation": {"devices": {"results": [result]}}},
        }
        return ref

    def get(self, path: str, query: Any = None, *, timeout: float | None = None) -> Any:
        return self.objects[path]


@contextmanager
def counting() -> Iterator[dict[str, int]]:
    """Bytes written with os.write, and flushes requested (not performed: only counted)."""
    counts = {"bytes": 0, "syncs": 0, "unlinks": 0, "claims looked at": 0}
    real_write, real_fsync, real_fdatasync, real_unlink = (
        os.write,
        os.fsync,
        os.fdatasync,
        Path.unlink,
    )
    real_held = PreparedClaim.held_devices

    def write(fd: int, data: Any) -> int:
        written = real_write(fd, data)
        counts["bytes"] += written
        return written

    def sync(fd: int) -> None:
        counts["syncs"] += 1

    def unlink(self: Path, missing_ok: bool = False) -> None:
        counts["unlinks"] += 1
        real_unlink(self, missing_ok=missing_ok)

    def held(self: PreparedClaim) -> frozenset[str]:
        counts["claims looked at"] += 1
        return real_held.__get__(self)  # type: ignore[attr-defined, no-any-return]

    os.write, os.fsync, os.fdatasync = write, sync, sync  # type: ignore[assignment]
    Path.unlink = unlink  # type: ignore[method-assign]
    PreparedClaim.held_devices = property(held)  # type: ignore[method-assign, assignment]
    try:
        yield counts
    finally:
        os.write, os.fsync, os.fdatasync = real_write, real_fsync, real_fdatasync
        Path.unlink = real_unlink  # type: ignore[method-assign]
        PreparedClaim.held_devices = real_held  # type: ignore[method-assign]


def _service(root: Path, claims: Claims, backend: object | None = None) -> ClaimService:
    identity = Backend().dra_backend_identity()
    devices = tuple(Device(f"dev-{i}") for i in range(HELD + 10))
    context = NodeContext(node_name=NODE, driver_name=DRIVER)
    return ClaimService(
        hooks=from_objects("cost", backend or Backend()),
        context=context,
        client=claims,  # type: ignore[arg-type]
        checkpoint=Checkpoint.open(root / "plugin" / "checkpoint.json", boot_id=BOOT),
        cdi=CdiSpecs(root / "cdi", identity),
        lock=DriverLock(root / "plugin" / "serialize.lock"),
        inventory=lambda: Inventory(devices=devices),
        pools={NODE},
        boot_id=BOOT,
    )


def _cost(root: Path, held: int) -> tuple[dict[str, int], dict[str, int]]:
    """(prepare, unprepare) cost of one claim with ``held`` others prepared."""
    claims = Claims()
    service = _service(root, claims)
    with counting():  # quick: flushes are counted, not done
        refs = [claims.add(i) for i in range(held)]
        assert all(not r.error for r in service.prepare(refs).values())
        service.checkpoint.compact()
    probe = claims.add(HELD + 1)
    with counting() as prepare:
        (result,) = service.prepare([probe]).values()
    assert not result.error and result.devices
    spec = service.cdi.spec_path(probe.uid)
    assert spec.exists()
    with counting() as unprepare:
        assert service.unprepare([probe]) == {probe.uid: ""}
    assert not spec.exists()
    assert len(service.checkpoint) == held
    return prepare, unprepare


def test_prepare_and_unprepare_cost_the_same_with_none_or_500_claims_held(tmp_path: Path):
    prepare_0, unprepare_0 = _cost(tmp_path / "empty", 0)
    prepare_n, unprepare_n = _cost(tmp_path / "full", HELD)
    # Two flushes per prepare (the started and the completed record), one per unprepare.
    assert prepare_0["syncs"] == prepare_n["syncs"] == 2
    assert unprepare_0["syncs"] == unprepare_n["syncs"] == 1
    assert prepare_0["bytes"] == prepare_n["bytes"]
    assert unprepare_0["bytes"] == unprepare_n["bytes"]
    assert prepare_n["bytes"] < 4096, "a few lines and a CDI spec, not the whole checkpoint"
    # The check of the devices' holders looks at the holders, not at every claim prepared.
    assert prepare_0["claims looked at"] == prepare_n["claims looked at"]
    assert unprepare_0["claims looked at"] == unprepare_n["claims looked at"]


def test_unprepare_removes_the_spec_once(tmp_path: Path) -> None:
    _, unprepare = _cost(tmp_path, 0)
    assert unprepare["unlinks"] == 1


def test_unprepare_of_an_unknown_claim_still_removes_an_orphaned_spec(tmp_path: Path) -> None:
    claims = Claims()
    service = _service(tmp_path, claims)
    ref = claims.add(3)
    spec = service.cdi.spec_path(ref.uid)
    spec.parent.mkdir(parents=True)
    spec.write_text("{}")
    assert service.unprepare([ref]) == {ref.uid: ""}
    assert not spec.exists()


def test_prepares_waiting_for_the_lock_together_share_flushes(tmp_path: Path) -> None:
    """Calls that wait for the driver lock at the same time are prepared together: one flush
    per claim (its started record with the completed record of the one before) and one at the
    end, not two per claim; each call returns once its claim is on disk."""
    calls = 20
    claims = Claims()
    service = _service(tmp_path, claims)
    refs = [claims.add(i) for i in range(calls)]
    results: dict[str, ClaimResult] = {}
    threads = [
        threading.Thread(target=lambda ref=ref: results.update(service.prepare([ref])))
        for ref in refs
    ]
    with counting() as prepare:
        with service.lock.held(purpose="a test"):
            for thread in threads:
                thread.start()
            waited_until = time.monotonic() + 10
            while service.queued < calls and time.monotonic() < waited_until:
                time.sleep(0.005)
            assert service.queued == calls, "every call waits for the lock"
        for thread in threads:
            thread.join(timeout=10)
    assert {uid: r.error for uid, r in results.items()} == {r.uid: "" for r in refs}
    assert prepare["syncs"] == calls + 1
    reopened = Checkpoint.open(service.checkpoint.path, boot_id=BOOT)
    assert {uid: r.phase for uid, r in reopened.records().items()} == {
        r.uid: "completed" for r in refs
    }
    with counting() as unprepare:
        assert service.unprepare(refs) == {r.uid: "" for r in refs}
    assert unprepare["syncs"] == 1, "the removals of one call share one flush"
    assert len(Checkpoint.open(service.checkpoint.path, boot_id=BOOT)) == 0


def test_a_call_that_waits_for_the_lock_past_its_deadline_fails_and_is_not_prepared(
    tmp_path: Path,
) -> None:
    claims = Claims()
    service = _service(tmp_path, claims)
    ref = claims.add(1)
    with service.lock.held(purpose="prepare of claim default/other (1234)"):
        started = time.monotonic()
        (result,) = service.prepare([ref], deadline=started + 0.3).values()
        assert time.monotonic() - started < 5
    assert "holds the driver lock" in result.error and "default/other (1234)" in result.error
    assert "the kubelet will retry" in result.error
    assert service.queued == 0 and service.checkpoint.get(ref.uid) is None
    (result,) = service.prepare([ref]).values()
    assert not result.error, "free again: the retry prepares it"


class HeldBackend(Backend):
    """Prepares the first claim only once ``release`` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.waiting = threading.Event()
        self.prepared: list[str] = []

    @hookimpl
    def dra_prepare(self, claim: Any) -> list[PreparedDevice]:
        if not self.prepared:
            self.waiting.set()
            assert self.release.wait(10)
        self.prepared.append(claim.ref.uid)
        return super().dra_prepare(claim)


def test_a_call_whose_claim_waits_behind_a_slow_one_in_the_same_batch_answers_by_its_deadline(
    tmp_path: Path,
) -> None:
    claims = Claims()
    backend = HeldBackend()
    service = _service(tmp_path, claims, backend)
    slow, quick = claims.add(1), claims.add(2)
    results: dict[str, ClaimResult] = {}
    first = threading.Thread(target=lambda: results.update(service.prepare([slow])))
    with service.lock.held(purpose="a test"):
        first.start()
        waited_until = time.monotonic() + 10
        while service.queued < 1 and time.monotonic() < waited_until:
            time.sleep(0.005)
        late = threading.Thread(
            target=lambda: results.update(service.prepare([quick], time.monotonic() + 1.0))
        )
        late.start()
        while service.queued < 2 and time.monotonic() < waited_until:
            time.sleep(0.005)
        assert service.queued == 2, "both calls wait for the lock: one batch takes both"
    assert backend.waiting.wait(10), "the batch began with the slow claim"
    late.join(timeout=5)
    assert not late.is_alive(), "answered by its deadline, not after the slow claim"
    assert "holds the driver lock" in results[quick.uid].error
    assert "the kubelet will retry" in results[quick.uid].error
    backend.release.set()
    first.join(timeout=10)
    assert not results[slow.uid].error
    assert backend.prepared == [slow.uid], "the claim given up on is not prepared"
    assert service.checkpoint.get(quick.uid) is None
