"""An unprepare is reported done once its removal from the checkpoint is on disk.

A disk that refuses a flush cannot be had here, so ``os.fdatasync`` fails for the one call;
everything else (checkpoint, CDI specs, lock) is on real files.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from loguru import logger

from dra_core import metrics
from dra_core.model import ClaimRef
from dra_core.node.service import ClaimService
from tests.node.claimservice import ApiClaims, Backend, claim_service


@pytest.fixture
def info_lines() -> Iterator[list[str]]:
    lines: list[str] = []
    handler = logger.add(lambda message: lines.append(message.record["message"]), level="INFO")
    yield lines
    logger.remove(handler)


def _succeeded() -> float:
    value = metrics.REGISTRY.get_sample_value(
        "dra_unprepare_total", {"result": metrics.RESULT_SUCCESS}
    )
    return value or 0.0


@dataclass
class Prepared:
    """A claim service on real files with one claim prepared, and the unprepares counted
    successful before it is unprepared."""

    service: ClaimService
    backend: Backend
    ref: ClaimRef
    succeeded: float


@pytest.fixture
def prepared(tmp_path: Path) -> Prepared:
    api, backend = ApiClaims(), Backend()
    service = claim_service(tmp_path, api, backend)
    ref = api.add(ClaimRef("team-a", "claim-a", str(uuid.uuid4())))
    assert service.prepare([ref])[ref.uid].error == ""
    return Prepared(service, backend, ref, _succeeded())


def test_an_unprepare_whose_removal_cannot_be_flushed_fails_and_is_not_logged_as_done(
    prepared: Prepared, monkeypatch: pytest.MonkeyPatch, info_lines: list[str]
) -> None:
    service, ref = prepared.service, prepared.ref

    def disk_error(fd: int) -> Any:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    with monkeypatch.context() as patched:
        patched.setattr(os, "fdatasync", disk_error)
        error = service.unprepare([ref])[ref.uid]

    assert "cannot flush it to disk" in error and os.strerror(errno.EIO) in error, error
    assert "devices were released" in error and "stays prepared" not in error, error
    assert prepared.backend.unprepared == [ref.uid]
    assert not any(line.startswith("unprepared claim") for line in info_lines), info_lines
    assert _succeeded() == prepared.succeeded
    # The kubelet calls again: the removal reaches the disk, and the call succeeds.
    assert service.unprepare([ref]) == {ref.uid: ""}
    assert _succeeded() == prepared.succeeded + 1
    assert service.checkpoint.get(ref.uid) is None


def test_an_unprepare_is_logged_and_counted_once_flushed(
    prepared: Prepared, info_lines: list[str]
) -> None:
    ref = prepared.ref

    assert prepared.service.unprepare([ref]) == {ref.uid: ""}

    assert [line for line in info_lines if line.startswith("unprepared")] == [
        f"unprepared claim {ref}"
    ]
    assert _succeeded() == prepared.succeeded + 1
    assert prepared.backend.unprepared == [ref.uid]
