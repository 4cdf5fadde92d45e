"""The backend's small durable state: which PFs' VFs it created, and who holds which device.

Kept as JSON in ``<state_dir>/i915-state.json`` (written atomically and durably: temp file,
fsync, rename, fsync of the directory), or in memory when the agent gives no state directory
(``dra-core discover``, tests). It answers three questions the sysfs tree cannot:

- were a PF's VFs created by this backend (torn down when the last is released) or by an
  administrator (never touched)? A PF is recorded (``complete: false``) and saved *before*
  ``sriov_numvfs`` is written, marked complete once its VFs are there, and forgotten only
  when it has no VFs again, so an agent that dies anywhere in between still knows them as
  its own;
- which claims hold each device, so the last VF's release triggers the teardown and a whole GPU
  is not handed to a second claim;
- which profile the VFs were made with.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dra_core import logger

__all__ = ("STATE_FILE", "CreatedVfs", "State", "StateStore")

STATE_FILE = "i915-state.json"
_VERSION = 1


@dataclass
class CreatedVfs:
    """VFs this backend created (or is creating: ``complete`` false) on one PF."""

    profile: str
    num_vfs: int
    complete: bool = False


@dataclass
class State:
    """The whole state; see the module docstring."""

    created: dict[str, CreatedVfs] = field(default_factory=dict)
    holders: dict[str, list[str]] = field(default_factory=dict)

    def hold(self, device: str, claim_uid: str) -> None:
        """Record that ``claim_uid`` holds ``device`` (idempotent)."""
        owners = self.holders.setdefault(device, [])
        if claim_uid not in owners:
            owners.append(claim_uid)

    def release(self, device: str, claim_uid: str) -> None:
        """Forget that ``claim_uid`` holds ``device`` (idempotent)."""
        owners = self.holders.get(device, [])
        if claim_uid in owners:
            owners.remove(claim_uid)
        if not owners:
            self.holders.pop(device, None)

    def others(self, device: str, claim_uid: str) -> list[str]:
        """The claims other than ``claim_uid`` that hold ``device``."""
        return [c for c in self.holders.get(device, []) if c != claim_uid]

    def to_json(self) -> dict[str, Any]:
        """The JSON form written to disk."""
        return {
            "version": _VERSION,
            "created": {
                pf: {"profile": c.profile, "numVfs": c.num_vfs, "complete": c.complete}
                for pf, c in self.created.items()
            },
            "holders": self.holders,
        }

    @classmethod
    def from_json(cls, data: Any, origin: str) -> State:
        """Parse the JSON form; ``ValueError`` naming the file when it is not ours."""
        try:
            if data.get("version") != _VERSION:
                msg = f"unsupported version {data.get('version')!r}"
                raise ValueError(msg)
            created = {
                str(pf): CreatedVfs(str(c["profile"]), int(c["numVfs"]), bool(c["complete"]))
                for pf, c in data["created"].items()
            }
            holders = {str(d): [str(u) for u in us] for d, us in data["holders"].items()}
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            msg = (
                f"{origin}: not an i915 backend state file ({exc}); move it away to start "
                f"afresh, after checking no backend-created VFs are in use"
            )
            raise ValueError(msg) from None
        return cls(created, holders)


class StateStore:
    """Loads and saves :class:`State` in a directory, or keeps it in memory."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._memory = State()

    @property
    def path(self) -> Path | None:
        """The state file, or None when the state lives in memory."""
        return None if self.directory is None else self.directory / STATE_FILE

    def load(self) -> State:
        """The current state (a fresh copy the caller may change and save)."""
        path = self.path
        if path is None:
            return State.from_json(self._memory.to_json(), "memory")
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return State()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            msg = f"{path}: not valid JSON ({exc}); move it away to start afresh"
            raise ValueError(msg) from None
        return State.from_json(data, str(path))

    def save(self, state: State) -> None:
        """Replace the stored state atomically."""
        path = self.path
        if path is None:
            self._memory = State.from_json(state.to_json(), "memory")
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".i915-state.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(state.to_json(), handle, indent=1, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            Path(tmp).replace(path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)  # the rename itself survives a crash or power cut
        finally:
            os.close(directory)
        logger.trace("saved {}", path)
