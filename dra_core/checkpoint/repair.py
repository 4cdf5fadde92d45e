"""Inspecting and repairing a damaged checkpoint (the ``dra-core checkpoint`` command).

Both read at most `fileformat.MAX_FILE_BYTES` of a regular file and decode it within the
format's depth and number bounds, so any file gives a report or a `CheckpointError`, never
another exception. Repair keeps every record `fileformat.parse` can read (from a snapshot cut
short too), keeps the damaged file beside the new one, and lists each record it dropped with
the reason.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from dra_core.checkpoint import fileformat
from dra_core.checkpoint.fileformat import VERSION
from dra_core.checkpoint.records import FILE_MODE, CheckpointError, ClaimRecord
from dra_core.checkpoint.store import exclusive, read_bounded
from dra_core.fileio import atomic_write, fsync_directory
from dra_core.lazylog import logger

__all__ = (
    "InspectReport",
    "RepairReport",
    "inspect",
    "render_inspect",
    "render_repair",
    "repair",
)

# ---------------------------------------------------------------------------------------------
# Inspect and repair (the `dra-core checkpoint` command)
# ---------------------------------------------------------------------------------------------


def _describe(record: ClaimRecord) -> str:
    devices = ", ".join(
        d.allocation.device + (f"#{d.allocation.share_id}" if d.allocation.share_id else "")
        for d in record.claim.devices
    )
    return (
        f"{record.claim.ref} {record.phase} driver={record.driver} "
        f"boot={record.boot_id[:8] or '?'} devices=[{devices}]"
    )


@dataclass(frozen=True)
class InspectReport:
    """What `inspect` found: ``ok`` when the agent would load the file as it is.

    ``records`` are the records that decode (all of them when ok); ``dropped`` the UIDs of
    those that do not, and ``reasons`` why, by UID; ``problems`` every problem found, in
    file order; ``notes`` what is not damage but worth knowing (an append a crash cut short);
    ``entries`` the changes logged after the snapshot.
    """

    path: Path
    ok: bool
    version: int | None
    problems: list[str]
    records: list[ClaimRecord]
    dropped: list[str] = field(default_factory=list)
    exists: bool = True
    notes: list[str] = field(default_factory=list)
    entries: int = 0
    reasons: dict[str, str] = field(default_factory=dict)

    def render(self) -> str:
        """A short human-readable summary for the CLI."""
        lines = [f"checkpoint {self.path}"]
        if not self.exists:
            lines.append("  the file does not exist (the agent creates an empty one on start)")
            return "\n".join(lines)
        version = self.version if self.version is not None else "unknown"
        if self.version is not None and self.version < VERSION:
            version = f"{version} (an earlier release's; the agent rewrites it as {VERSION})"
        lines.append(f"  version: {version}")
        lines.append(f"  status: {'OK' if self.ok else 'DAMAGED'}")
        lines.extend(f"  problem: {p}" for p in self.problems)
        lines.extend(f"  note: {n}" for n in self.notes)
        lines.append(f"  entries after the snapshot: {self.entries}")
        lines.append(f"  records: {len(self.records)} decodable, {len(self.dropped)} not")
        lines.extend(f"    {_describe(r)}" for r in self.records)
        lines.extend(_dropped_lines(self.dropped, self.reasons, "not decodable: "))
        if not self.ok:
            lines.append(
                f"  to salvage the decodable records: dra-core checkpoint repair --path {self.path}"
            )
        return "\n".join(lines)


@dataclass(frozen=True)
class RepairReport:
    """What `repair` did: the backup it made, the records it kept and those it dropped."""

    path: Path
    changed: bool
    backup: Path | None
    kept: list[ClaimRecord]
    dropped: list[str]
    problems: list[str]
    #: False when the damaged file could not be parsed at all, so no record could be kept.
    parsed: bool = True
    #: Why each dropped record was dropped, by claim UID.
    reasons: dict[str, str] = field(default_factory=dict)

    def render(self) -> str:
        """A short human-readable summary for the CLI."""
        if not self.changed:
            return f"checkpoint {self.path}: nothing to repair"
        lines = [f"checkpoint {self.path}: repaired"]
        lines.extend(f"  problem: {p}" for p in self.problems)
        lines.append(f"  damaged file kept as {self.backup}")
        lines.append(f"  kept {len(self.kept)} record(s)")
        lines.extend(f"    {_describe(r)}" for r in self.kept)
        lines.append(f"  dropped {len(self.dropped)} record(s)")
        lines.extend(_dropped_lines(self.dropped, self.reasons))
        if not self.parsed:
            lines.append(
                "  the damaged file could not be parsed, so none of its records were kept; "
                "read the backup to find the claims it held"
            )
        if self.dropped or not self.parsed:
            lines.append(
                "  dropped claims may still hold devices or CDI specs; startup reconciliation "
                "removes CDI specs without a record, check the devices of the dropped claims"
            )
        return "\n".join(lines)


def _dropped_lines(dropped: list[str], reasons: dict[str, str], prefix: str = "") -> list[str]:
    return [
        f"    {prefix}{uid}" + (f": {reasons[uid]}" if uid in reasons else "") for uid in dropped
    ]


def _parse(raw: bytes, size: int) -> fileformat.State:
    """`fileformat.parse` of what was read; a file over the size limit was read in part."""
    parsed = fileformat.parse(raw)
    if size > len(raw):
        parsed.problems.insert(
            0,
            f"the file is {size} bytes, more than the {fileformat.MAX_FILE_BYTES} a checkpoint "
            f"may hold; only its first {len(raw)} bytes were read",
        )
    return parsed


def inspect(path: Path) -> InspectReport:
    """Read the checkpoint at ``path`` without changing it and list every problem."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return InspectReport(path, False, None, ["the file does not exist"], [], exists=False)
    except OSError as exc:
        return InspectReport(path, False, None, [f"cannot be read: {exc}"], [])
    try:
        raw, size = read_bounded(fd, path)
    except CheckpointError as exc:
        return InspectReport(path, False, None, [str(exc)], [])
    except OSError as exc:
        return InspectReport(path, False, None, [f"cannot be read: {exc}"], [])
    finally:
        os.close(fd)
    parsed = _parse(raw, size)
    return InspectReport(
        path=path,
        ok=not parsed.problems,
        version=parsed.version,
        problems=parsed.problems,
        records=list(parsed.records.values()),
        dropped=parsed.dropped,
        notes=parsed.notes,
        entries=parsed.entries,
        reasons=parsed.reasons,
    )


def render_inspect(report: InspectReport) -> str:
    """`InspectReport.render`, as a function for the CLI."""
    return report.render()


def render_repair(report: RepairReport) -> str:
    """`RepairReport.render`, as a function for the CLI."""
    return report.render()


def _backup_path(path: Path) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    candidate = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        n += 1
    return candidate


def repair(path: Path, *, force: bool = False) -> RepairReport:
    """Make the checkpoint at ``path`` loadable again, losing nothing silently.

    The damaged file is first kept as ``<path>.corrupt-<UTC timestamp>`` (mode 0600); then
    every record that decodes is written into a fresh, valid checkpoint, which replaces the
    file atomically. After a checksum mismatch the decodable records are kept, and every
    logged change that verifies is applied; from a snapshot that is not valid JSON (cut short
    or overwritten) every record that can still be read whole is kept; the report lists each
    dropped record with the reason. A file written by a newer release (higher version)
    is refused unless ``force``, since rewriting it as the current version could lose what that
    release recorded. A healthy file is left untouched. The file is locked while it is
    repaired, so an agent using it waits.
    """
    path = Path(path)
    try:
        with exclusive(path) as fd:
            if fd is None:
                msg = f"checkpoint {path}: the file does not exist; there is nothing to repair"
                raise CheckpointError(msg)
            return _repair_locked(path, fd, force=force)
    except OSError as exc:
        msg = f"checkpoint {path}: cannot be read: {exc}; fix its permissions and retry"
        raise CheckpointError(msg) from exc


def _keep_damaged(path: Path, fd: int, raw: bytes, size: int) -> Path:
    """Keep the damaged file (open as ``fd``) beside ``path``, mode 0600; return its name.

    It is linked under the backup name (the original bytes, however large, without a copy);
    where links are not supported, what was read is copied.
    """
    backup = _backup_path(path)
    try:
        os.link(path, backup)
    except FileExistsError:
        raise
    except OSError:
        if size > len(raw):
            raise
        atomic_write(backup, raw, FILE_MODE)
        return backup
    try:
        os.fchmod(fd, FILE_MODE)
        fsync_directory(path.parent)
    except OSError:
        with contextlib.suppress(OSError):
            backup.unlink()
        raise
    return backup


def _repair_locked(path: Path, fd: int, *, force: bool) -> RepairReport:
    raw, size = read_bounded(fd, path)
    parsed = _parse(raw, size)
    if not parsed.problems:
        return RepairReport(path, False, None, list(parsed.records.values()), [], [])
    if parsed.version is not None and parsed.version > VERSION and not force:
        msg = (
            f"checkpoint {path}: version {parsed.version} was written by a newer dra-core "
            f"(this one reads versions up to {VERSION}); run that release, or repair with --force "
            f"to rewrite it as version {VERSION} and drop what this release cannot read"
        )
        raise CheckpointError(msg)
    try:
        backup = _keep_damaged(path, fd, raw, size)
    except OSError as exc:
        msg = (
            f"checkpoint {path}: repair failed: cannot keep the damaged file beside it: {exc}; "
            f"the file was not changed (check free space and permissions of {path.parent})"
        )
        raise CheckpointError(msg) from exc
    try:
        atomic_write(path, fileformat.snapshot_line(parsed.canon), FILE_MODE)
    except OSError as exc:
        with contextlib.suppress(OSError):
            backup.unlink()
        msg = f"checkpoint {path}: repair failed: {exc}; the file was not changed"
        raise CheckpointError(msg) from exc
    logger.warning(
        "repaired checkpoint {}: kept {} record(s), dropped {}, backup {}",
        path,
        len(parsed.records),
        parsed.dropped,
        backup,
    )
    return RepairReport(
        path=path,
        changed=True,
        backup=backup,
        kept=list(parsed.records.values()),
        dropped=parsed.dropped,
        problems=parsed.problems,
        parsed=parsed.structured,
        reasons=parsed.reasons,
    )
