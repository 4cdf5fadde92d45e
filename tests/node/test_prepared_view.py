"""``dra_check_allocation`` sees the claims prepared on this node, from the checkpoint: the
others, not the claim being checked, and still after the agent restarts."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from loguru import logger

from dra_core import AllocationError, PreparedClaims, hookimpl
from dra_core.model import AllocatedDevice, ClaimRef, PreparedClaim, PreparedDevice
from tests.node.claimservice import ApiClaims, Backend, claim_service


class ExclusiveBackend(Backend):
    """Refuses a device another prepared claim holds; records each view it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.views: list[PreparedClaims] = []

    @hookimpl
    def dra_check_allocation(self, claim: Any, prepared: PreparedClaims) -> None:
        self.views.append(prepared)
        for device in claim.devices:
            holders = prepared.holding(device.device)
            if holders:
                msg = f"device {device.device} is held by claim {holders[0].ref}"
                raise AllocationError(msg)


def test_the_view_holds_the_other_prepared_claims_across_restarts(tmp_path: Path) -> None:
    api, backend = ApiClaims(), ExclusiveBackend()
    service = claim_service(tmp_path, api, backend)
    first = api.add(ClaimRef("default", "first", str(uuid.uuid4())))
    second = api.add(ClaimRef("default", "second", str(uuid.uuid4())))

    assert service.prepare([first])[first.uid].error == ""
    assert backend.views[-1] == PreparedClaims()  # nothing else prepared; not itself either

    restarted = claim_service(tmp_path, api, backend)  # the view comes from the checkpoint
    error = restarted.prepare([second])[second.uid].error
    assert f"device dev-0 is held by claim {first}" in error
    (holder,) = backend.views[-1].claims
    assert holder.ref == first
    assert [d.allocation.device for d in holder.devices] == ["dev-0"]

    assert restarted.unprepare([first])[first.uid] == ""
    assert restarted.prepare([second])[second.uid].error == ""


def test_admin_access_holds_nothing() -> None:
    def claim(name: str, admin: bool) -> PreparedClaim:
        device = PreparedDevice(AllocatedDevice("r", "node-1", "dev-0", admin_access=admin))
        return PreparedClaim(ClaimRef("default", name, str(uuid.uuid4())), (device,))

    monitor, user = claim("monitor", True), claim("user", False)
    assert PreparedClaims((monitor,)).holding("dev-0") == ()
    assert PreparedClaims((monitor, user)).holding("dev-0") == (user,)
    assert PreparedClaims((user,)).holding("dev-1") == ()


class DamagingBackend(Backend):
    """Cuts the checkpoint file short (as something else writing it would) before it asks the
    view about a device."""

    def __init__(self, checkpoint: Path) -> None:
        super().__init__()
        self.checkpoint = checkpoint

    @hookimpl
    def dra_check_allocation(self, claim: Any, prepared: PreparedClaims) -> None:
        os.truncate(self.checkpoint, 10)
        prepared.holding(claim.devices[0].device)


def test_a_checkpoint_the_view_cannot_read_fails_the_claim_as_the_cores_error(tmp_path: Path):
    api = ApiClaims()
    backend = DamagingBackend(tmp_path / "plugin" / "checkpoint.json")
    service = claim_service(tmp_path, api, backend)
    ref = api.add(ClaimRef("default", "first", str(uuid.uuid4())))
    logged: list[tuple[str, str]] = []
    sink = logger.add(lambda m: logged.append((m.record["level"].name, m.record["message"])))
    try:
        error = service.prepare([ref])[ref.uid].error
    finally:
        logger.remove(sink)
    assert f"checkpoint {backend.checkpoint}" in error and "shrank" in error
    assert "unexpected error" not in error  # not the backend's bug: the message says what to do
    (level,) = [lv for lv, m in logged if m.startswith(f"prepare of claim {ref} failed")]
    assert level == "WARNING"
