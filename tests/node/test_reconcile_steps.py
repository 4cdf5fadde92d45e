"""Reconciliation goes on past one claim it cannot repair: the others are still repaired, and
the failure is reported for that claim."""

from __future__ import annotations

import uuid
from pathlib import Path

from dra_core.model import ClaimRef
from tests.node.claimservice import ApiClaims, Backend, claim_service


def test_a_claim_whose_cdi_spec_cannot_be_written_does_not_stop_the_others(
    tmp_path: Path,
) -> None:
    api, backend = ApiClaims(), Backend()
    service = claim_service(tmp_path, api, backend)
    refs = [api.add(ClaimRef("team-a", f"claim-{i}", str(uuid.uuid4()))) for i in range(3)]
    for ref in refs:
        assert service.prepare([ref])[ref.uid].error == ""
    specs = {ref.uid: next(service.cdi.directory.glob(f"*{ref.uid}*.json")) for ref in refs}
    for spec in specs.values():
        spec.unlink()  # lost, e.g. a CDI directory on a tmpfs after a restart of the runtime
    # The first claim's spec cannot be written again: its name is taken by a directory.
    specs[refs[0].uid].mkdir()

    report = service.reconcile(startup=False)

    assert sorted(report.regenerated_specs) == sorted(ref.uid for ref in refs[1:])
    assert len(report.errors) == 1 and refs[0].uid in report.errors[0]
    for ref in refs[1:]:
        assert specs[ref.uid].is_file()
