"""A claim is known by its UID, namespace and name together: a request that names a recorded
UID under another namespace or name is refused, for prepare and for unprepare, and changes
nothing (no answer from the checkpoint, no API read, no release of the real claim)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from dra_core.checkpoint import ClaimRecord
from dra_core.model import ClaimRef, PreparedClaim
from dra_core.node.service import ClaimService
from tests.node.claimservice import BOOT, DRIVER, ApiClaims, Backend, claim_service


@pytest.fixture
def api() -> ApiClaims:
    return ApiClaims()


@pytest.fixture
def backend() -> Backend:
    return Backend()


@pytest.fixture
def service(tmp_path: Path, api: ApiClaims, backend: Backend) -> ClaimService:
    return claim_service(tmp_path, api, backend)


def prepared_claim(service: ClaimService, api: ApiClaims) -> ClaimRef:
    ref = api.add(ClaimRef("team-a", "gpu-claim", str(uuid.uuid4())))
    result = service.prepare([ref])[ref.uid]
    assert result.error == "" and result.devices
    return ref


IMPOSTORS = [
    pytest.param(lambda ref: ClaimRef("team-b", ref.name, ref.uid), id="other-namespace"),
    pytest.param(lambda ref: ClaimRef(ref.namespace, "other-claim", ref.uid), id="other-name"),
    pytest.param(lambda ref: ClaimRef("team-b", "other-claim", ref.uid), id="both"),
]


@pytest.mark.parametrize("impostor_of", IMPOSTORS)
def test_prepare_under_another_name_is_not_answered_from_the_checkpoint(
    service: ClaimService, api: ApiClaims, backend: Backend, impostor_of: Any
) -> None:
    ref = prepared_claim(service, api)
    impostor = impostor_of(ref)
    reads = len(api.reads)

    result = service.prepare([impostor])[ref.uid]

    assert result.devices == ()
    assert f"prepare of claim {impostor} failed" in result.error
    assert f"recorded claim UID {ref.uid} as ResourceClaim team-a/gpu-claim" in result.error
    assert f"not {impostor.namespace}/{impostor.name}" in result.error
    assert len(api.reads) == reads, "refused before the API is asked"
    assert backend.prepared == [ref.uid]
    record = service.checkpoint.get(ref.uid)
    assert record is not None and record.claim.ref == ref
    # The real claim is still answered from the checkpoint.
    again = service.prepare([ref])[ref.uid]
    assert again.error == "" and again.devices


@pytest.mark.parametrize("impostor_of", IMPOSTORS)
def test_unprepare_under_another_name_keeps_the_real_claim(
    service: ClaimService, api: ApiClaims, backend: Backend, impostor_of: Any
) -> None:
    ref = prepared_claim(service, api)
    impostor = impostor_of(ref)
    spec = service.cdi.spec_path(ref.uid)
    assert spec.exists()

    error = service.unprepare([impostor])[ref.uid]

    assert f"unprepare of claim {impostor} failed" in error
    assert "as ResourceClaim team-a/gpu-claim" in error
    assert "the claim stays prepared" in error
    assert backend.unprepared == []
    assert spec.exists()
    assert service.checkpoint.get(ref.uid) is not None
    # Under its own name it goes.
    assert service.unprepare([ref]) == {ref.uid: ""}
    assert backend.unprepared == [ref.uid]
    assert not spec.exists() and service.checkpoint.get(ref.uid) is None


def test_an_interrupted_prepare_under_another_name_is_not_undone(
    service: ClaimService, api: ApiClaims, backend: Backend
) -> None:
    """A claim recorded as started (a crash mid-prepare) is rolled back only by a request
    under its own name, never by one that borrows its UID."""
    ref = ClaimRef("team-a", "gpu-claim", str(uuid.uuid4()))
    started = ClaimRecord(
        claim=PreparedClaim(ref, ()), phase="started", boot_id=BOOT, driver=DRIVER
    )
    service.checkpoint.put(started)
    impostor = api.add(ClaimRef("team-b", "gpu-claim", ref.uid))

    result = service.prepare([impostor])[ref.uid]

    assert "as ResourceClaim team-a/gpu-claim, not team-b/gpu-claim" in result.error
    assert api.reads == [] and backend.unprepared == []
    assert service.checkpoint.get(ref.uid) == started


def test_one_refused_claim_does_not_fail_the_others(service: ClaimService, api: ApiClaims) -> None:
    ref = prepared_claim(service, api)
    other = api.add(ClaimRef("team-a", "second", str(uuid.uuid4())))
    impostor = ClaimRef("team-a", "second", ref.uid)

    results = service.prepare([impostor, other])

    assert "refused" in results[ref.uid].error
    assert results[other.uid].error == "" and results[other.uid].devices
    errors = service.unprepare([impostor, other])
    assert "stays prepared" in errors[ref.uid] and errors[other.uid] == ""
    assert set(service.checkpoint.records()) == {ref.uid}
