"""Claim records, their phases, the boot ID, the checkpoint's modes and its error."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dra_core.fileio import read_regular_file
from dra_core.lazylog import logger
from dra_core.model import (
    AllocatedDevice,
    ClaimRef,
    PreparedClaim,
    PreparedDevice,
)

__all__ = (
    "BOOT_ID_PATH",
    "DIR_MODE",
    "FILE_MODE",
    "CheckpointError",
    "ClaimRecord",
    "Phase",
    "current_boot_id",
)

FILE_MODE = 0o600
DIR_MODE = 0o700
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
#: The most read of the boot ID file: a UUID and a newline take 37 bytes.
BOOT_ID_BYTES = 64

Phase = Literal["started", "completed"]
_PHASES: tuple[Phase, ...] = ("started", "completed")


class CheckpointError(Exception):
    """The checkpoint cannot be read or written; the message names the file and the problem."""


def _damaged(path: Path, problem: str) -> CheckpointError:
    msg = (
        f"checkpoint {path}: {problem}. The agent will not reset it (that would forget "
        f"prepared claims). Run `dra-core checkpoint inspect --path {path}` to see what is "
        f"damaged and `dra-core checkpoint repair --path {path}` to keep every record that "
        f"can be decoded (the damaged file is backed up first)."
    )
    return CheckpointError(msg)


# ---------------------------------------------------------------------------------------------
# Records and boot ID
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClaimRecord:
    """One prepared (or half-prepared) claim as the checkpoint keeps it.

    ``phase`` is ``started`` while prepare is in progress (``claim.devices`` carry only their
    allocations) and ``completed`` once the CDI spec is written (full edits and state).
    ``boot_id`` is the node's boot ID when the record was written, ``driver`` the driver name
    that prepared it.
    """

    claim: PreparedClaim
    phase: Phase
    boot_id: str
    driver: str

    @property
    def uid(self) -> str:
        return self.claim.ref.uid

    @classmethod
    def started(
        cls,
        ref: ClaimRef,
        allocations: Iterable[AllocatedDevice],
        *,
        boot_id: str,
        driver: str,
    ) -> ClaimRecord:
        """The record written before the backend's prepare: allocations, no edits or state."""
        devices = tuple(PreparedDevice(allocation=a) for a in allocations)
        return cls(PreparedClaim(ref=ref, devices=devices), "started", boot_id, driver)

    @classmethod
    def completed(cls, claim: PreparedClaim, *, boot_id: str, driver: str) -> ClaimRecord:
        """The record written once the claim's CDI spec is on disk."""
        return cls(claim, "completed", boot_id, driver)


def current_boot_id(path: Path = BOOT_ID_PATH) -> str:
    """The kernel's boot ID (changes at every boot); "" with a warning when it is unreadable.

    An empty boot ID never matches a real one, so records written with it are treated as
    being from another boot only if the ID later becomes readable.
    """
    try:
        return read_regular_file(path, BOOT_ID_BYTES).decode("ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        logger.warning("cannot read the boot ID from {}: {}; reboot detection is off", path, exc)
        return ""
