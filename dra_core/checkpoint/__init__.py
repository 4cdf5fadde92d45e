"""The durable record of the claims prepared on this node.

Unprepare works from this record alone (the claim may be gone from the API server), so it must
survive crashes and never be lost quietly:

- the file (`fileformat`, which alone knows its name, lines and records) is a snapshot line
  followed by an append-only log: each change appends one checksummed line and flushes it with
  one ``fdatasync`` before it is acknowledged, so its cost does not grow with the number of
  claims recorded; the log is folded into a new snapshot (temp file, fsync, rename, fsync of
  the directory) once it outgrows the snapshot. Mode 0600 in a 0700 directory (created so
  whatever the umask); temp files a crash left beside it are removed when it is opened;
- the snapshot and every entry carry a SHA-256 checksum, the file a kind and a schema version,
  and every field is decoded strictly, names (namespace, claim, driver, pool, request, device,
  share ID) by the API's rules; reading is bounded in size, depth and number length, and only
  a regular file is read. Anything unexpected raises `CheckpointError`, which names the file,
  the claim and the field and points at ``dra-core checkpoint inspect`` / ``repair``; one bad
  record makes the whole file invalid, as a checksum mismatch does. The checkpoint is never
  reset silently. The one thing read past is an incomplete last line: an append a crash cut
  short, which was never acknowledged. Repair keeps every record that can still be read whole,
  from a truncated or partly overwritten file too, and the damaged file beside the new one;
- each claim is recorded in two phases: ``started`` before the backend touches anything (the
  allocations only), ``completed`` once the CDI spec is written (the full prepared devices),
  so a crash mid-prepare is visible and can be rolled back or completed;
- each record carries the boot ID of the node when it was written, so prepared state from
  before a reboot (which the reboot destroyed) is recognised.

Several instances of the agent may share the file during a rolling update: changes are made
under an exclusive ``flock`` of the file, and a `Checkpoint` reads what another instance
appended (or reloads the file it replaced) before answering.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dra_core.checkpoint import fileformat
from dra_core.checkpoint.fileformat import FILE_NAME, KIND, VERSION, decode_record, encode_record
from dra_core.checkpoint.records import (
    BOOT_ID_PATH,
    DIR_MODE,
    FILE_MODE,
    CheckpointError,
    ClaimRecord,
    Phase,
    current_boot_id,
)
from dra_core.checkpoint.store import Checkpoint

if TYPE_CHECKING:
    from dra_core.checkpoint.repair import (
        InspectReport,
        RepairReport,
        inspect,
        render_inspect,
        render_repair,
        repair,
    )

#: What the ``dra-core checkpoint`` command uses, imported on first use: an agent starting on
#: its node serves the kubelet without it.
_REPAIR_NAMES = frozenset(
    ("InspectReport", "RepairReport", "inspect", "render_inspect", "render_repair", "repair")
)


def __getattr__(name: str) -> Any:
    if name in _REPAIR_NAMES:
        # Importing the submodule binds the package's ``repair`` to it: bind the names again.
        module = importlib.import_module("dra_core.checkpoint.repair")
        globals().update((each, getattr(module, each)) for each in _REPAIR_NAMES)
        return globals()[name]
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)


__all__ = (
    "BOOT_ID_PATH",
    "DIR_MODE",
    "FILE_MODE",
    "FILE_NAME",
    "KIND",
    "VERSION",
    "Checkpoint",
    "CheckpointError",
    "ClaimRecord",
    "InspectReport",
    "Phase",
    "RepairReport",
    "current_boot_id",
    "decode_record",
    "encode_record",
    "fileformat",
    "inspect",
    "render_inspect",
    "render_repair",
    "repair",
)
