"""Claim-level container edits through the prepare pipeline: one claim device every device
result names, kept in the checkpoint so a restarted agent answers and rewrites the spec with
them, and a failing ``dra_claim_edits`` fails only its claim, undone."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from dra_core import ContainerEdits, hookimpl
from dra_core.model import ClaimRef
from tests.node.claimservice import ApiClaims, Backend, claim_service

KIND = "dra-core.dev/identity"


class ClaimBackend(Backend):
    """Adds the claim's name as a claim-level variable; refuses claims named ``bad-*``."""

    @hookimpl
    def dra_claim_edits(self, claim: Any, devices: Any) -> ContainerEdits:
        if claim.ref.name.startswith("bad-"):
            msg = f"claim {claim.ref}: no claim edits for a bad claim"
            raise ValueError(msg)
        names = ",".join(d.allocation.device for d in devices)
        return ContainerEdits(env={"CLAIM": claim.ref.name, "CLAIM_DEVICES": names})


@pytest.fixture
def api() -> ApiClaims:
    return ApiClaims()


@pytest.fixture
def backend() -> ClaimBackend:
    return ClaimBackend()


def test_every_device_result_names_the_claim_device(
    tmp_path: Path, api: ApiClaims, backend: ClaimBackend
) -> None:
    service = claim_service(tmp_path, api, backend)
    ref = api.add(ClaimRef("default", "claim-a", str(uuid.uuid4())))

    (device,) = service.prepare([ref])[ref.uid].devices

    assert device.cdi_device_ids == (f"{KIND}={ref.uid}-dev-0", f"{KIND}=claim-{ref.uid}")
    spec = service.cdi.read(ref.uid)
    assert spec is not None
    assert spec["devices"][-1] == {
        "name": f"claim-{ref.uid}",
        "containerEdits": {"env": ["CLAIM=claim-a", "CLAIM_DEVICES=dev-0"]},
    }
    record = service.checkpoint.get(ref.uid)
    assert record is not None
    assert record.claim.edits.env == {"CLAIM": "claim-a", "CLAIM_DEVICES": "dev-0"}


def test_a_restarted_agent_keeps_the_claim_edits(
    tmp_path: Path, api: ApiClaims, backend: ClaimBackend
) -> None:
    first = claim_service(tmp_path, api, backend)
    ref = api.add(ClaimRef("default", "claim-a", str(uuid.uuid4())))
    answer = first.prepare([ref])[ref.uid]
    spec = first.cdi.read(ref.uid)
    first.cdi.remove(ref.uid)  # e.g. a tmpfs CDI directory emptied under the agent

    # a new agent without the hook: the edits come from the checkpoint, not from a new call
    restarted = claim_service(tmp_path, api, Backend())
    report = restarted.reconcile()

    assert report.regenerated_specs == [ref.uid]
    assert restarted.cdi.read(ref.uid) == spec
    restarted.cdi.remove(ref.uid)
    assert restarted.prepare([ref])[ref.uid] == answer  # answered from the checkpoint
    assert restarted.cdi.read(ref.uid) == spec
    assert backend.prepared == [ref.uid]


def test_failing_claim_edits_fail_that_claim_only(
    tmp_path: Path, api: ApiClaims, backend: ClaimBackend
) -> None:
    service = claim_service(tmp_path, api, backend)
    bad = api.add(ClaimRef("default", "bad-claim", str(uuid.uuid4())))
    good = api.add(ClaimRef("default", "good-claim", str(uuid.uuid4())))

    results = service.prepare([bad, good])

    assert "no claim edits for a bad claim" in results[bad.uid].error
    assert results[good.uid].error == ""
    assert backend.unprepared == [bad.uid]  # the backend's prepare was undone
    assert service.checkpoint.get(bad.uid) is None
    assert not service.cdi.exists(bad.uid)
