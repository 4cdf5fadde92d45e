"""The durable record of the claims prepared on this node.

Unprepare works from this record alone (the claim may be gone from the API server), so it must
survive crashes and never be lost quietly:

- every change rewrites the whole file through `dra_core.fileio.atomic_write` (temp file,
  fsync, rename, fsync of the directory), mode 0600 in a 0700 directory;
- the file carries a kind, a schema version and a SHA-256 checksum of its data, and every
  field is decoded strictly; anything unexpected raises `CheckpointError`, which names the file
  and the problem and points at ``dra-core checkpoint inspect`` / ``repair``. The checkpoint is
  never reset silently;
- each claim is recorded in two phases: ``started`` before the backend touches anything (the
  allocations only), ``completed`` once the CDI spec is written (the full prepared devices),
  so a crash mid-prepare is visible and can be rolled back or completed;
- each record carries the boot ID of the node when it was written, so prepared state from
  before a reboot (which the reboot destroyed) is recognised.

File format (JSON)::

    {
      "kind": "dra-core-checkpoint",
      "version": 1,
      "checksum": "sha256:<hex of the canonical JSON of data>",
      "data": {"claims": {"<uid>": <record>, ...}}
    }

where a record is ``{"phase", "bootId", "driver", "claim": {"namespace", "name", "uid"},
"devices": [{"allocation": {"request", "pool", "device", "shareId", "consumedCapacity",
"adminAccess"}, "edits": {"env", "deviceNodes", "mounts"}, "state": {...}}]}``. The canonical
JSON is ``json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`` in
UTF-8.

Several instances of the agent may share the file during a rolling update (they serialise
prepare with a file lock); a `Checkpoint` notices when the file was replaced by someone else
and reloads it before answering.
"""

from __future__ import annotations

from dra_core.checkpoint.codec import decode_record, encode_record
from dra_core.checkpoint.records import (
    BOOT_ID_PATH,
    DIR_MODE,
    FILE_MODE,
    KIND,
    VERSION,
    CheckpointError,
    ClaimRecord,
    Phase,
    current_boot_id,
)
from dra_core.checkpoint.repair import (
    InspectReport,
    RepairReport,
    inspect,
    render_inspect,
    render_repair,
    repair,
)
from dra_core.checkpoint.store import Checkpoint

__all__ = (
    "BOOT_ID_PATH",
    "DIR_MODE",
    "FILE_MODE",
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
    "inspect",
    "render_inspect",
    "render_repair",
    "repair",
)
