"""The checkpoint's file format (a snapshot line and an append-only log): what each change
writes, what a crash between (or inside) writes leaves, several processes on one file, the
version 1 file of earlier releases, and a cost that does not grow with the claims recorded."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from dra_core.checkpoint import (
    Checkpoint,
    CheckpointError,
    ClaimRecord,
    fileformat,
    inspect,
    repair,
)
from dra_core.checkpoint import store as store_module
from dra_core.model import AllocatedDevice, ClaimRef, ContainerEdits, PreparedClaim, PreparedDevice

BOOT = "0f0f0f0f-1111-2222-3333-444444444444"
ROOT = Path(__file__).resolve().parents[1]


def uid(i: int) -> str:
    return f"00000000-0000-0000-0000-{i:012d}"


def started(i: int) -> ClaimRecord:
    ref = ClaimRef("default", f"claim-{i}", uid(i))
    allocation = AllocatedDevice(request="gpu", pool="node-1", device=f"gpu-{i % 512}")
    return ClaimRecord.started(ref, [allocation], boot_id=BOOT, driver="gpu.example.com")


def completed(i: int) -> ClaimRecord:
    record = started(i)
    device = PreparedDevice(
        allocation=record.claim.devices[0].allocation,
        edits=ContainerEdits(env={"GPU": str(i), "CLAIM": f"claim-{i}"}),
        state={"vf": i % 63, "note": "é"},
    )
    claim = PreparedClaim(ref=record.claim.ref, devices=(device,))
    return ClaimRecord.completed(claim, boot_id=BOOT, driver="gpu.example.com")


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "plugin" / "checkpoint.json"


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


# --- the format ---------------------------------------------------------------------------------


def test_each_change_appends_one_canonical_checksummed_line(path: Path) -> None:
    ckpt = Checkpoint.open(path, boot_id=BOOT)
    snapshot = path.read_bytes()
    ckpt.put(started(1))
    ckpt.put(completed(1))
    ckpt.put(started(2))
    ckpt.remove(uid(1))
    ckpt.remove(uid(1))  # unknown now: nothing written
    ckpt.remove(uid(9))
    written = lines(path)
    assert written[0] == snapshot
    assert len(written) == 5
    for seq, line in enumerate(written[1:], start=1):
        assert line.endswith(b"\n") and b"\n" not in line[:-1]
        entry = json.loads(line)
        assert (fileformat.canonical(entry) + "\n").encode() == line, "canonical JSON"
        given = entry.pop("checksum")
        assert given == fileformat.checksum(entry)
        assert entry["seq"] == seq
    ops = [(json.loads(line)["op"], json.loads(line)["uid"]) for line in written[1:]]
    assert ops == [("put", uid(1)), ("put", uid(1)), ("put", uid(2)), ("remove", uid(1))]
    assert json.loads(written[2])["record"]["phase"] == "completed"
    assert Checkpoint.open(path, boot_id=BOOT).records() == {uid(2): started(2)}


def test_snapshot_line_is_the_version_1_document_on_one_line(path: Path) -> None:
    ckpt = Checkpoint.open(path, boot_id=BOOT)
    ckpt.put(completed(1))
    ckpt.put(started(2))
    ckpt.compact()
    (line,) = lines(path)
    doc = json.loads(line)
    assert (fileformat.canonical(doc) + "\n").encode() == line
    assert doc["version"] == 2
    assert doc["checksum"] == fileformat.checksum(doc["data"])
    assert sorted(doc["data"]["claims"]) == [uid(1), uid(2)]
    assert Checkpoint.open(path, boot_id=BOOT).records() == {
        uid(1): completed(1),
        uid(2): started(2),
    }


def test_the_log_is_compacted_once_it_outgrows_the_snapshot(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "COMPACT_BYTES", 4096)
    ckpt = Checkpoint.open(path, boot_id=BOOT)
    for i in range(40):
        ckpt.put(started(i))
        ckpt.put(completed(i))
    assert path.stat().st_size < 3 * 4096 + 40 * 600, "compacted on the way"
    assert len(lines(path)) < 80
    expected = {uid(i): completed(i) for i in range(40)}
    assert ckpt.records() == expected
    assert Checkpoint.open(path, boot_id=BOOT).records() == expected
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.json"]


# --- crashes between and inside writes ----------------------------------------------------------


def _operations() -> list[tuple[str, ClaimRecord | str]]:
    """A prepare and an unprepare of one claim, with another claim held all along."""
    return [
        ("put", completed(7)),
        ("put", started(1)),
        ("put", completed(1)),
        ("remove", uid(1)),
    ]


def test_a_crash_inside_any_append_loses_nothing_acknowledged(path: Path) -> None:
    """Every prefix of every appended line: the state of the last acknowledged change."""
    ckpt = Checkpoint.open(path, boot_id=BOOT)
    states = [ckpt.records()]
    contents = [path.read_bytes()]
    for op, arg in _operations():
        if op == "put":
            assert isinstance(arg, ClaimRecord)
            ckpt.put(arg)
        else:
            assert isinstance(arg, str)
            ckpt.remove(arg)
        states.append(ckpt.records())
        contents.append(path.read_bytes())
    ckpt.close()
    for k in range(1, len(contents)):
        before, after = contents[k - 1], contents[k]
        assert after.startswith(before)
        appended = after[len(before) :]
        for cut in range(len(appended) + 1):
            path.write_bytes(before + appended[:cut])
            expected = states[k] if cut == len(appended) else states[k - 1]
            reopened = Checkpoint.open(path, boot_id=BOOT)
            assert reopened.records() == expected, f"change {k}, {cut} bytes written"
            report = inspect(path)
            assert report.ok
            assert bool(report.notes) == (0 < cut < len(appended))
            # The next change cuts the torn bytes off and the file is clean again.
            reopened.put(started(99))
            assert inspect(path).notes == []
            assert Checkpoint.open(path, boot_id=BOOT).records() == {
                **expected,
                uid(99): started(99),
            }
            reopened.close()


CHILD = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    sys.path[:0] = [{root!r}]
    from dra_core import fileio
    from dra_core.checkpoint import Checkpoint, store
    from tests.test_checkpoint_log import completed, started, uid

    point = sys.argv[2]
    ckpt = Checkpoint.open(Path(sys.argv[1]), boot_id={boot!r})
    ckpt.put(completed(7))

    def die(*args, **kwargs):
        os._exit(137)

    if point == "append-half":
        real_write = os.write
        def half(fd, data):
            real_write(fd, bytes(data)[: len(data) // 2])
            os._exit(137)
        os.write = half
    elif point == "before-fdatasync":
        os.fdatasync = die
    elif point == "after-fdatasync":
        real_sync = os.fdatasync
        def sync_then_die(fd):
            real_sync(fd)
            os._exit(137)
        os.fdatasync = sync_then_die
    elif point == "compact-before-rename":
        store.COMPACT_BYTES = 0
        Path.replace = die
        os.link = die
    elif point == "compact-after-rename":
        store.COMPACT_BYTES = 0
        fileio.fsync_directory = die
    ckpt.put(started(1))
    os._exit(0)
    """
)


@pytest.mark.parametrize(
    ("point", "has_claim_1"),
    [
        ("append-half", False),  # cut short: never acknowledged, ignored
        ("before-fdatasync", True),  # complete in the page cache: a process crash keeps it
        ("after-fdatasync", True),
        ("compact-before-rename", True),  # the entry is durable; the old file stays
        ("compact-after-rename", True),  # the new snapshot holds it
    ],
)
def test_a_process_killed_at_each_step_of_a_change(path: Path, point: str, has_claim_1: bool):
    script = CHILD.format(root=str(ROOT), boot=BOOT)
    proc = subprocess.run(
        [sys.executable, "-c", script, str(path), point],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 137, proc.stderr
    expected = {uid(7): completed(7)}
    if has_claim_1:
        expected[uid(1)] = started(1)
    ckpt = Checkpoint.open(path, boot_id=BOOT)
    assert ckpt.records() == expected
    ckpt.put(completed(1))
    assert Checkpoint.open(path, boot_id=BOOT).records() == {**expected, uid(1): completed(1)}
    report = inspect(path)
    assert report.ok and report.notes == []


def test_damage_inside_the_log_is_refused_and_repaired(path: Path) -> None:
    ckpt = Checkpoint.open(path, boot_id=BOOT)
    ckpt.put(completed(1))
    ckpt.put(started(2))
    ckpt.put(completed(3))
    ckpt.close()
    written = lines(path)
    written[2] = written[2].replace(b'"phase":"started"', b'"phase":"completed"')
    path.write_bytes(b"".join(written))
    with pytest.raises(CheckpointError) as info:
        Checkpoint.open(path, boot_id=BOOT)
    assert "entry 2 (line 3): checksum mismatch" in str(info.value)
    assert "dra-core checkpoint repair" in str(info.value)
    report = inspect(path)
    assert not report.ok
    assert {r.uid for r in report.records} == {uid(1), uid(3)}
    repaired = repair(path)
    assert repaired.changed and repaired.backup is not None
    assert repaired.backup.read_bytes() == b"".join(written)
    assert Checkpoint.open(path, boot_id=BOOT).records() == {
        uid(1): completed(1),
        uid(3): completed(3),
    }


@pytest.mark.parametrize(
    ("mutate", "problem"),
    [
        (lambda ls: ls.pop(2), "entry 2 (line 3): numbered 3 instead of 2"),
        (lambda ls: ls.insert(2, ls[1]), "numbered 1 instead of 2"),
        (lambda ls: ls.insert(2, b"\n"), "entry 2 (line 3): not valid JSON"),
        (lambda ls: ls.insert(2, b"[1]\n"), "entry 2 (line 3): array, not an object"),
        (lambda ls: ls.insert(2, b'{"seq":1e999}\n'), "entry 2 (line 3): not valid JSON"),
    ],
)
def test_missing_repeated_or_foreign_lines_are_damage(path: Path, mutate: Any, problem: str):
    ckpt = Checkpoint.open(path, boot_id=BOOT)
    for i in range(3):
        ckpt.put(started(i))
    ckpt.close()
    written = lines(path)
    mutate(written)
    path.write_bytes(b"".join(written))
    with pytest.raises(CheckpointError, match=re.escape(problem)):
        Checkpoint.open(path, boot_id=BOOT)


def test_a_file_cut_below_what_was_read_is_an_error(path: Path) -> None:
    ckpt = Checkpoint.open(path, boot_id=BOOT)
    ckpt.put(started(1))
    ckpt.put(started(2))
    raw = path.read_bytes()
    with path.open("r+b") as handle:  # same inode: not a replacement
        handle.truncate(len(raw) - 150)
    with pytest.raises(CheckpointError, match="shrank"):
        ckpt.records()


# --- several processes --------------------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path[:0] = [{root!r}]
    from dra_core.checkpoint import Checkpoint, store
    from tests.test_checkpoint_log import completed, started, uid

    store.COMPACT_BYTES = 2048
    first, count = int(sys.argv[2]), int(sys.argv[3])
    ckpt = Checkpoint.open(Path(sys.argv[1]), boot_id={boot!r})
    for i in range(first, first + count):
        ckpt.put(started(i))
        ckpt.put(completed(i))
        if i % 3 == 0:
            ckpt.remove(uid(i))
    """
)


def test_two_processes_appending_and_compacting_lose_nothing(path: Path) -> None:
    Checkpoint.open(path, boot_id=BOOT).close()
    script = WRITER.format(root=str(ROOT), boot=BOOT)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(path), str(first), "60"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for first in (0, 1000)
    ]
    reader = Checkpoint.open(path, boot_id=BOOT)
    while any(p.poll() is None for p in procs):
        reader.records()  # follows the other processes' appends and compactions
    for proc in procs:
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, output
    expected = {
        uid(i): completed(i) for first in (0, 1000) for i in range(first, first + 60) if i % 3
    }
    assert reader.records() == expected
    assert Checkpoint.open(path, boot_id=BOOT).records() == expected
    assert inspect(path).ok


# --- the version 1 file of earlier releases ----------------------------------------------------


def test_a_version_1_file_is_read_and_rewritten_as_version_2(path: Path) -> None:
    records = {uid(1): completed(1), uid(2): started(2)}
    data = {
        "claims": {u: json.loads(fileformat.canonical(_encoded(r))) for u, r in records.items()}
    }
    doc = {"kind": "dra-core-checkpoint", "version": 1, "checksum": fileformat.checksum(data)}
    doc["data"] = data
    path.parent.mkdir(parents=True)
    legacy = (json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()
    path.write_bytes(legacy)
    report = inspect(path)
    assert report.ok and report.version == 1
    assert "earlier release" in report.render()
    ckpt = Checkpoint.open(path, boot_id=BOOT)
    assert ckpt.records() == records
    assert json.loads(path.read_bytes())["version"] == 2
    ckpt.put(completed(2))
    assert Checkpoint.open(path, boot_id=BOOT).records() == {**records, uid(2): completed(2)}


def _encoded(record: ClaimRecord) -> dict[str, Any]:
    from dra_core.checkpoint import encode_record

    return encode_record(record)


# --- cost -------------------------------------------------------------------------------------


@contextmanager
def counting() -> Iterator[dict[str, int]]:
    """Bytes passed to os.write and fsync/fdatasync calls (which do flush)."""
    counts = {"bytes": 0, "syncs": 0}
    real_write, real_fsync, real_fdatasync = os.write, os.fsync, os.fdatasync

    def write(fd: int, data: Any) -> int:
        written = real_write(fd, data)
        counts["bytes"] += written
        return written

    def fsync(fd: int) -> None:
        counts["syncs"] += 1
        real_fsync(fd)

    def fdatasync(fd: int) -> None:
        counts["syncs"] += 1
        real_fdatasync(fd)

    os.write, os.fsync, os.fdatasync = write, fsync, fdatasync  # type: ignore[assignment]
    try:
        yield counts
    finally:
        os.write, os.fsync, os.fdatasync = real_write, real_fsync, real_fdatasync


def _cycle_cost(path: Path, held: int, cycles: int) -> dict[str, int]:
    ckpt = Checkpoint.open(path, boot_id=BOOT)
    for i in range(held):
        ckpt.put(completed(10_000 + i))
    ckpt.compact()
    with counting() as counts:
        for i in range(cycles):
            ckpt.put(started(i))  # a prepare: started, then completed
            ckpt.put(completed(i))
            ckpt.remove(uid(i))  # an unprepare
    assert len(ckpt) == held
    ckpt.close()
    return counts


def test_the_cost_of_a_change_does_not_grow_with_the_claims_held(tmp_path: Path) -> None:
    empty = _cycle_cost(tmp_path / "a" / "checkpoint.json", held=0, cycles=20)
    full = _cycle_cost(tmp_path / "b" / "checkpoint.json", held=500, cycles=20)
    assert empty["syncs"] == full["syncs"] == 3 * 20, "one flush per change"
    assert empty["bytes"] == full["bytes"], "the same bytes, whatever is held"
    assert full["bytes"] < 20 * 2000


def test_compaction_costs_a_bounded_amount_per_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "COMPACT_BYTES", 16 * 1024)
    appended = _cycle_cost(tmp_path / "a" / "checkpoint.json", held=0, cycles=1)["bytes"]
    cycles = 400
    full = _cycle_cost(tmp_path / "b" / "checkpoint.json", held=500, cycles=cycles)
    compactions = (full["syncs"] - 3 * cycles) // 2
    assert compactions >= 1, "the log was compacted"
    # A compaction writes the snapshot only after at least as many bytes were appended.
    assert full["bytes"] <= 2 * appended * cycles + 16 * 1024


@contextmanager
def counted_flushes() -> Iterator[list[int]]:
    """The descriptors ``os.fdatasync`` flushes (and flushes) while the block runs."""
    flushed: list[int] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        flushed.append(fd)
        real(fd)

    os.fdatasync = fdatasync  # type: ignore[assignment]
    try:
        yield flushed
    finally:
        os.fdatasync = real


def test_changes_appended_without_a_flush_share_the_next_one(path: Path) -> None:
    ckpt = Checkpoint.open(path, boot_id=BOOT)
    ckpt.flush()  # what was there when it was opened: written by whom, flushed or not
    with counted_flushes() as flushed:
        ckpt.put(started(1), durable=False)
        ckpt.put(completed(1), durable=False)
        ckpt.remove(uid(1), durable=False)
        ckpt.put(started(2), durable=False)
        assert flushed == [], "appended, not flushed"
        # Appended all the same: another process (and a restart after a kill) reads them.
        assert Checkpoint.open(path, boot_id=BOOT).records() == {uid(2): started(2)}
        ckpt.flush()
        ckpt.flush()
    assert len(flushed) == 1, "one flush for the four changes; none when nothing is left"
    with counted_flushes() as flushed:
        ckpt.put(completed(2))  # durable: flushed at once
        ckpt.flush()
    assert len(flushed) == 1


def test_a_flush_covers_what_another_process_appended(path: Path) -> None:
    ours = Checkpoint.open(path, boot_id=BOOT)
    ours.flush()
    other = Checkpoint.open(path, boot_id=BOOT)
    other.put(started(1), durable=False)  # that process may die before it flushes
    with counted_flushes() as flushed:
        assert ours.get(uid(1)) == started(1)
        ours.flush()
    assert len(flushed) == 1, "what another process wrote is flushed before it is relied on"
