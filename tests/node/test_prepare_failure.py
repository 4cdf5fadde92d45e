"""A prepare the backend fails is that claim's error, and what the backend did is undone."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from dra_core import PreparedDevice, hookimpl
from dra_core.model import ClaimRef
from tests.node.claimservice import ApiClaims, Backend, claim_service


class FailingBackend(Backend):
    """Fails the prepare of claims named ``bad-*`` after it has started on them."""

    @hookimpl
    def dra_prepare(self, claim: Any) -> list[PreparedDevice]:
        self.prepared.append(claim.ref.uid)
        if claim.ref.name.startswith("bad-"):
            raise RuntimeError("the device did not answer")
        return super().dra_prepare(claim)


def test_a_prepare_that_raises_is_undone_and_fails_only_its_claim(tmp_path: Path) -> None:
    api, backend = ApiClaims(), FailingBackend()
    service = claim_service(tmp_path, api, backend)
    bad = api.add(ClaimRef("team-a", "bad-claim", str(uuid.uuid4())))
    good = api.add(ClaimRef("team-a", "good-claim", str(uuid.uuid4())))

    results = service.prepare([bad, good])

    assert "the device did not answer" in results[bad.uid].error
    assert results[bad.uid].devices == ()
    assert results[good.uid].error == "" and results[good.uid].devices
    assert backend.unprepared == [bad.uid], "the backend is asked to undo what it started"
    assert service.checkpoint.get(bad.uid) is None
    assert not list(service.cdi.directory.glob(f"*{bad.uid}*"))
    # The kubelet's retry prepares it again from the start.
    backend.prepared.clear()
    assert "the device did not answer" in service.prepare([bad])[bad.uid].error
    assert backend.prepared == [bad.uid]
