"""The checkpoint against hostile or damaged files: records validated at load, decoding and
reading bounded, repair that salvages what a truncated or overwritten file still holds,
directories created with explicit modes whatever the umask, crash leftovers removed at start."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dra_core.checkpoint import (
    Checkpoint,
    CheckpointError,
    ClaimRecord,
    encode_record,
    fileformat,
    inspect,
    repair,
)
from dra_core.model import (
    AllocatedDevice,
    ClaimRef,
    ContainerEdits,
    PreparedClaim,
    PreparedDevice,
)

BOOT = "0f0f0f0f-1111-2222-3333-444444444444"
ROOT = Path(__file__).resolve().parents[1]


def uid(i: int) -> str:
    return f"00000000-0000-0000-0000-{i:012d}"


def completed(i: int, state: dict[str, Any] | None = None) -> ClaimRecord:
    device = PreparedDevice(
        allocation=AllocatedDevice(request="gpu", pool="node-1", device=f"gpu-{i}"),
        edits=ContainerEdits(env={"GPU": str(i)}),
        state={"vf": i} if state is None else state,
    )
    claim = PreparedClaim(ref=ClaimRef("default", f"claim-{i}", uid(i)), devices=(device,))
    return ClaimRecord.completed(claim, boot_id=BOOT, driver="gpu.example.com")


def record_text(record: ClaimRecord) -> str:
    return fileformat.canonical(encode_record(record))


def write_snapshot(path: Path, texts: dict[str, str]) -> bytes:
    """A version 2 file whose snapshot holds ``texts`` (UID to record JSON), checksum valid."""
    raw = fileformat.snapshot_line(texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)
    return raw


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "plugin" / "checkpoint.json"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- 1. records validated at load ---------------------------------------------------------------


def _set(keys: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(record: dict[str, Any]) -> None:
        target: Any = record
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return mutate


ALLOCATION = ("devices", 0, "allocation")
HOSTILE = [
    pytest.param(_set(("claim", "namespace"), "../../etc"), "claim.namespace", id="namespace"),
    pytest.param(_set(("claim", "namespace"), "Default"), "claim.namespace", id="namespace-case"),
    pytest.param(_set(("claim", "name"), "a/b"), "claim.name", id="name"),
    pytest.param(_set(("claim", "name"), ""), "claim.name", id="name-empty"),
    pytest.param(_set(("driver",), "../evil"), "driver", id="driver"),
    pytest.param(_set((*ALLOCATION, "device"), "../../../../tmp/x"), "device", id="device"),
    pytest.param(_set((*ALLOCATION, "device"), "gpu\n0"), "device", id="device-newline"),
    pytest.param(_set((*ALLOCATION, "pool"), "../node-1"), "pool", id="pool"),
    pytest.param(_set((*ALLOCATION, "pool"), "a//b"), "pool", id="pool-empty-part"),
    pytest.param(_set((*ALLOCATION, "pool"), "p" * 254), "pool", id="pool-too-long"),
    pytest.param(_set((*ALLOCATION, "request"), "gpu/../x"), "request", id="request"),
    pytest.param(_set((*ALLOCATION, "shareId"), "a/b"), "shareId", id="share"),
]


@pytest.mark.parametrize(("mutate", "field"), HOSTILE)
def test_a_checksum_valid_record_with_an_impossible_name_is_refused(
    path: Path, mutate: Callable[[dict[str, Any]], None], field: str
) -> None:
    good, bad = completed(1), encode_record(completed(2))
    mutate(bad)
    raw = write_snapshot(path, {uid(1): record_text(good), uid(2): fileformat.canonical(bad)})
    with pytest.raises(CheckpointError) as info:
        Checkpoint.open(path, boot_id=BOOT)
    message = str(info.value)
    assert f"claim {uid(2)}: field " in message
    assert field in message
    assert str(path) in message
    assert f"dra-core checkpoint repair --path {path}" in message
    assert path.read_bytes() == raw, "refused, never reset"

    report = inspect(path)
    assert not report.ok
    assert report.records == [good]
    assert report.dropped == [uid(2)]
    assert field in report.reasons[uid(2)]
    assert field in report.render()

    repaired = repair(path)
    assert repaired.kept == [good] and repaired.dropped == [uid(2)]
    assert field in repaired.reasons[uid(2)]
    assert f"{uid(2)}: field" in repaired.render()
    assert Checkpoint.open(path, boot_id=BOOT).records() == {uid(1): good}


def test_a_record_keyed_by_a_path_is_refused_and_shown_quoted(path: Path) -> None:
    bad = encode_record(completed(1))
    bad["claim"]["uid"] = "../../etc/passwd"
    write_snapshot(path, {"../../etc/passwd": fileformat.canonical(bad)})
    with pytest.raises(CheckpointError, match=r"claim '\.\./\.\./etc/passwd': field claim\.uid"):
        Checkpoint.open(path, boot_id=BOOT)


def test_an_impossible_name_in_a_log_entry_is_refused_with_its_line(path: Path) -> None:
    ckpt = Checkpoint.open(path, boot_id=BOOT)
    ckpt.put(completed(1))
    ckpt.close()
    bad = encode_record(completed(2))
    bad["devices"][0]["allocation"]["device"] = "../../../../tmp/x"
    with path.open("ab") as handle:
        handle.write(fileformat.put_line(2, uid(2), fileformat.canonical(bad)))
    with pytest.raises(CheckpointError) as info:
        Checkpoint.open(path, boot_id=BOOT)
    assert f"entry 2 (line 3): claim {uid(2)}: field devices[0].allocation.device" in str(
        info.value
    )
    assert repair(path).kept == [completed(1)]


def test_put_refuses_a_record_the_load_would_refuse(path: Path) -> None:
    ckpt = Checkpoint.open(path, boot_id=BOOT)
    record = completed(1)
    device = record.claim.devices[0]
    hostile = PreparedDevice(
        allocation=AllocatedDevice(request="gpu", pool="node-1", device="../../../../tmp/x"),
        edits=device.edits,
    )
    claim = PreparedClaim(ref=record.claim.ref, devices=(hostile,))
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match=r"field devices\[0\]\.allocation\.device"):
        ckpt.put(ClaimRecord.completed(claim, boot_id=BOOT, driver="gpu.example.com"))
    assert path.read_bytes() == before


def test_names_the_api_allows_round_trip(path: Path) -> None:
    allocation = AllocatedDevice(
        request="gpu/vf", pool="node-1.example.com/pf-0", device="gpu-0", share_id=uid(9)
    )
    claim = PreparedClaim(
        ref=ClaimRef("kube-system", "a.b-c.d", uid(1)),
        devices=(PreparedDevice(allocation=allocation),),
    )
    record = ClaimRecord.completed(claim, boot_id=BOOT, driver="gpu.example.com")
    Checkpoint.open(path, boot_id=BOOT).put(record)
    assert Checkpoint.open(path, boot_id=BOOT).records() == {uid(1): record}


# --- 2. decoding bounded in depth and size ------------------------------------------------------


def test_a_deeply_nested_file_is_an_error_not_a_recursion_error(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(b"[" * 200_000)
    with pytest.raises(CheckpointError, match="nested 200000 levels deep"):
        Checkpoint.open(path, boot_id=BOOT)
    report = inspect(path)
    assert not report.ok and any("nested" in p for p in report.problems)
    repaired = repair(path)
    assert repaired.changed and repaired.kept == [] and not repaired.parsed
    assert Checkpoint.open(path, boot_id=BOOT).records() == {}


@pytest.mark.parametrize(
    ("hostile", "problem"),
    [
        ("[" * 5000 + "]" * 5000, "nested"),
        ("1" * 5000, "digits"),
    ],
)
def test_one_hostile_record_is_dropped_and_the_others_salvaged(
    path: Path, hostile: str, problem: str
) -> None:
    deep = record_text(completed(2, {"x": 0})).replace('{"x":0}', f'{{"x":{hostile}}}')
    good = {uid(i): completed(i) for i in (1, 3)}
    write_snapshot(path, {u: record_text(r) for u, r in good.items()} | {uid(2): deep})
    with pytest.raises(CheckpointError, match=problem):
        Checkpoint.open(path, boot_id=BOOT)
    report = inspect(path)
    assert report.dropped == [uid(2)] and problem in report.reasons[uid(2)]
    assert {r.uid for r in report.records} == set(good)
    repaired = repair(path)
    assert repaired.dropped == [uid(2)]
    assert Checkpoint.open(path, boot_id=BOOT).records() == good


def test_put_refuses_state_nested_deeper_than_the_load_reads(path: Path) -> None:
    ckpt = Checkpoint.open(path, boot_id=BOOT)
    state: dict[str, Any] = {}
    for _ in range(fileformat.MAX_DEPTH):
        state = {"x": state}
    with pytest.raises(CheckpointError, match=f"claim {uid(1)}.*nested"):
        ckpt.put(completed(1, state))
    endless: list[Any] = []
    endless.append(endless)
    with pytest.raises(CheckpointError, match=f"claim {uid(2)}"):
        ckpt.put(completed(2, {"cycle": endless}))
    ckpt.put(completed(3, {"long": 10**99}))  # 100 digits: the limit itself
    with pytest.raises(CheckpointError, match=f"claim {uid(4)}.*digits"):
        ckpt.put(completed(4, {"long": 10**100}))
    assert set(Checkpoint.open(path, boot_id=BOOT).records()) == {uid(3)}


def test_a_lone_surrogate_is_refused_on_write_and_on_read(path: Path) -> None:
    ckpt = Checkpoint.open(path, boot_id=BOOT)
    with pytest.raises(CheckpointError, match=f"claim {uid(1)}"):
        ckpt.put(completed(1, {"text": "\ud800"}))
    text = record_text(completed(2)).replace('"vf":2', '"vf":"\\ud800"')
    write_snapshot(path, {uid(2): text})
    with pytest.raises(CheckpointError, match="lone surrogate"):
        Checkpoint.open(path, boot_id=BOOT)
    assert repair(path).dropped == [uid(2)]


def test_a_file_over_the_size_limit_is_refused_and_its_records_salvaged(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fileformat, "MAX_FILE_BYTES", 16 * 1024)
    ckpt = Checkpoint.open(path, boot_id=BOOT)
    ckpt.put(completed(1))
    ckpt.put(completed(2))
    ckpt.close()
    with path.open("ab") as handle:
        handle.write(b"x" * 32 * 1024)  # something else wrote to it
    original = path.read_bytes()
    with pytest.raises(CheckpointError, match=f"{len(original)} bytes, more than the 16384"):
        Checkpoint.open(path, boot_id=BOOT)
    report = inspect(path)
    assert not report.ok and "more than the 16384" in report.problems[0]
    repaired = repair(path)
    assert {r.uid for r in repaired.kept} == {uid(1), uid(2)}
    assert repaired.backup is not None and repaired.backup.read_bytes() == original
    assert _mode(repaired.backup) == 0o600
    assert len(Checkpoint.open(path, boot_id=BOOT)) == 2


def test_a_change_that_would_outgrow_the_limit_is_refused(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fileformat, "MAX_FILE_BYTES", 4096)
    ckpt = Checkpoint.open(path, boot_id=BOOT)
    written = []
    with pytest.raises(CheckpointError, match="larger than the 4096 bytes"):
        for i in range(100):
            ckpt.put(completed(i))
            written.append(uid(i))
    assert path.stat().st_size <= 4096
    assert sorted(Checkpoint.open(path, boot_id=BOOT).records()) == written
    ckpt.remove(written[0])  # a removal still fits after the log was folded
    assert len(Checkpoint.open(path, boot_id=BOOT)) == len(written) - 1


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_something_other_than_a_regular_file_is_refused_without_reading_it(
    path: Path, kind: str
) -> None:
    path.parent.mkdir(parents=True)
    if kind == "fifo":
        os.mkfifo(path)
        expected = "is a FIFO"
    else:
        path.symlink_to("/dev/zero")  # an endless file
        expected = "is a character device"
    with pytest.raises(CheckpointError, match=expected):
        Checkpoint.open(path, boot_id=BOOT)
    report = inspect(path)
    assert not report.ok and expected in report.problems[0]
    with pytest.raises(CheckpointError, match=expected):
        repair(path)


# --- 3. repair that salvages --------------------------------------------------------------------


def _snapshot_with_offsets(path: Path, count: int) -> tuple[bytes, dict[str, int]]:
    """A compacted file of ``count`` records and where each record's text ends in it."""
    ckpt = Checkpoint.open(path, boot_id=BOOT)
    for i in range(count):
        ckpt.put(completed(i))
    ckpt.compact()
    ckpt.close()
    raw = path.read_bytes()
    ends = {}
    for i in range(count):
        text = record_text(completed(i)).encode()
        ends[uid(i)] = raw.index(text) + len(text)
    return raw, ends


def test_every_record_whole_before_the_cut_is_salvaged_at_every_length(path: Path) -> None:
    raw, ends = _snapshot_with_offsets(path, 3)
    records = {uid(i): completed(i) for i in range(3)}
    for cut in range(len(raw) - 1):  # the last byte is the newline: still whole
        state = fileformat.parse(raw[:cut])
        expected = {u: records[u] for u, end in ends.items() if end <= cut}
        assert state.problems, f"{cut} bytes: damage is reported"
        assert state.records == expected, f"{cut} bytes"
        assert set(state.dropped) <= set(records) - set(expected), f"{cut} bytes"


def test_repair_of_a_truncated_file_keeps_the_intact_records(path: Path) -> None:
    raw, ends = _snapshot_with_offsets(path, 4)
    cut = ends[uid(2)] + 40  # inside the record of uid(3)
    path.write_bytes(raw[:cut])
    with pytest.raises(CheckpointError, match="truncated"):
        Checkpoint.open(path, boot_id=BOOT)
    report = repair(path)
    assert [r.uid for r in report.kept] == [uid(0), uid(1), uid(2)]
    assert report.dropped == [uid(3)]
    assert "cut off" in report.reasons[uid(3)]
    assert report.backup is not None and report.backup.read_bytes() == raw[:cut]
    text = report.render()
    assert f"{uid(3)}: its record is cut off" in text
    assert "kept 3 record(s)" in text
    assert set(Checkpoint.open(path, boot_id=BOOT).records()) == {uid(0), uid(1), uid(2)}


def test_repair_reads_past_a_record_overwritten_in_the_middle(path: Path) -> None:
    raw, ends = _snapshot_with_offsets(path, 3)
    at = ends[uid(1)] - 30
    damaged = raw[:at] + b"\x00\xff garbage \x00" + raw[at + 14 :]
    path.write_bytes(damaged)
    report = repair(path)
    assert [r.uid for r in report.kept] == [uid(0), uid(2)]
    assert report.dropped == [uid(1)]
    assert "not valid JSON" in report.reasons[uid(1)]
    assert Checkpoint.open(path, boot_id=BOOT).records() == {
        uid(0): completed(0),
        uid(2): completed(2),
    }


def test_a_damaged_snapshot_keeps_the_log_entries_after_it(path: Path) -> None:
    ckpt = Checkpoint.open(path, boot_id=BOOT)
    ckpt.put(completed(0))
    ckpt.put(completed(1))
    ckpt.compact()
    ckpt.put(completed(2))  # logged after the snapshot
    ckpt.remove(uid(0))
    ckpt.close()
    lines = path.read_bytes().splitlines(keepends=True)
    lines[0] = lines[0][:-20] + b"\n"  # the snapshot line loses its end
    path.write_bytes(b"".join(lines))
    report = repair(path)
    assert {r.uid for r in report.kept} == {uid(1), uid(2)}
    assert Checkpoint.open(path, boot_id=BOOT).records() == {
        uid(1): completed(1),
        uid(2): completed(2),
    }


def test_a_truncated_version_1_file_is_salvaged(path: Path) -> None:
    records = {uid(i): completed(i) for i in range(3)}
    data = {"claims": {u: encode_record(r) for u, r in records.items()}}
    doc = {
        "checksum": fileformat.checksum(data),
        "data": data,
        "kind": "dra-core-checkpoint",
        "version": 1,
    }
    text = json.dumps(doc, indent=2, sort_keys=True).encode()
    path.parent.mkdir(parents=True)
    path.write_bytes(text[: text.index(uid(2).encode()) + 60])
    report = repair(path)
    assert [r.uid for r in report.kept] == [uid(0), uid(1)]
    assert report.dropped == [uid(2)]


def test_a_uuid_key_inside_a_record_does_not_split_it(path: Path) -> None:
    inner = completed(1, {uid(7): {"vf": 3}, "after": [1, 2]})
    write_snapshot(path, {uid(1): record_text(inner), uid(2): record_text(completed(2))})
    raw = path.read_bytes()
    path.write_bytes(raw[: raw.index(record_text(completed(2)).encode()) + 20])
    report = repair(path)
    assert report.kept == [inner]
    assert report.dropped == [uid(2)]


def test_salvage_of_irregular_text_takes_a_few_passes_not_a_pass_per_key(path: Path) -> None:
    # One record that never closes, holding 20,000 claim-like keys: reading on to each next
    # key from the record's start would scan the text 20,000 times.
    keys = "".join(f'"{uid(i)}":1,' for i in range(1, 20_000))
    text = f'{{"checksum":"x","data":{{"claims":{{"{uid(0)}":{{{keys}'
    state = fileformat.parse(text.encode())
    assert state.records == {}
    assert state.reasons[uid(0)] == "its record is cut off (the snapshot's text ends inside it)"
    assert "expected an object" in state.reasons[uid(1)]


def test_the_agent_names_the_first_problems_and_counts_the_others(path: Path) -> None:
    ckpt = Checkpoint.open(path, boot_id=BOOT)
    for i in range(12):
        ckpt.put(completed(i))
    ckpt.close()
    lines = path.read_bytes().splitlines(keepends=True)
    damaged = [lines[0]] + [line.replace(b'"vf":', b'"vF":') for line in lines[1:]]
    path.write_bytes(b"".join(damaged))
    with pytest.raises(CheckpointError) as info:
        Checkpoint.open(path, boot_id=BOOT)
    message = str(info.value)
    assert message.count("checksum mismatch") == 5
    assert "and 7 more problem(s)" in message
    assert len(inspect(path).problems) == 12


# --- 4. directories created with explicit modes whatever the umask ------------------------------

UMASK_000 = textwrap.dedent(
    """
    import json, os, stat, sys
    from pathlib import Path
    sys.path[:0] = [{root!r}]
    from dra_core.checkpoint import Checkpoint
    from dra_core.kubelet.sockets import prepare_socket
    from dra_core.node.lock import DriverLock

    base = Path(sys.argv[1])
    os.umask(0)
    Checkpoint.open(base / "ckpt" / "a" / "b" / "checkpoint.json", boot_id="b")
    prepare_socket(base / "kubelet" / "plugins_registry" / "x-reg.sock")
    prepare_socket(base / "kubelet" / "plugins" / "gpu.example.com" / "dra.sock")
    with DriverLock(base / "lock" / "a" / "serialize.lock").held():
        pass
    modes = {{}}
    for directory in sorted(p for p in base.rglob("*") if p.is_dir()):
        modes[str(directory.relative_to(base))] = stat.S_IMODE(directory.stat().st_mode)
    print(json.dumps(modes))
    """
)


def test_directories_get_their_mode_under_umask_000(tmp_path: Path) -> None:
    (tmp_path / "kubelet").mkdir(mode=0o711)  # exists already: left as it is
    (tmp_path / "kubelet").chmod(0o711)
    script = UMASK_000.format(root=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    modes = {name: oct(mode) for name, mode in json.loads(result.stdout).items()}
    assert modes == {
        "ckpt": "0o700",
        "ckpt/a": "0o700",
        "ckpt/a/b": "0o700",
        "kubelet": "0o711",
        "kubelet/plugins": "0o750",
        "kubelet/plugins/gpu.example.com": "0o750",
        "kubelet/plugins_registry": "0o750",
        "lock": "0o750",
        "lock/a": "0o750",
    }


def test_make_directories_reports_what_it_created(tmp_path: Path) -> None:
    from dra_core.fileio import make_directories

    target = tmp_path / "a" / "b" / "c"
    previous = os.umask(0o077)
    try:
        created = make_directories(target, 0o750)
    finally:
        os.umask(previous)
    assert created == [tmp_path / "a", tmp_path / "a" / "b", target]
    assert all(_mode(d) == 0o750 for d in created), "the umask does not narrow it either"
    assert make_directories(target, 0o700) == []
    assert _mode(target) == 0o750, "an existing directory is left as it is"
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError):
        make_directories(tmp_path / "file", 0o700)


# --- 5. crash leftovers removed at start --------------------------------------------------------


def test_temp_files_a_crash_left_are_removed_when_the_checkpoint_is_opened(path: Path) -> None:
    Checkpoint.open(path, boot_id=BOOT).put(completed(1))
    directory = path.parent
    ours = [
        directory / ".checkpoint.json.0123456789abcdef.tmp",  # a compaction's, just now
        directory / ".checkpoint.json.corrupt-20250101T000000000000Z.fedcba9876543210.tmp",
    ]
    others = [
        directory / ".other.json.0123456789abcdef.tmp",
        directory / ".checkpoint.json.not-a-temp.tmp",
        directory / "checkpoint.json.corrupt-20250101T000000000000Z",  # a repair's backup
    ]
    for leftover in ours + others:
        leftover.write_text("{")
    Checkpoint.open(path, boot_id=BOOT)  # what the agent does when it starts
    assert not any(p.exists() for p in ours)
    assert all(p.exists() for p in others)
    assert set(Checkpoint.open(path, boot_id=BOOT).records()) == {uid(1)}
