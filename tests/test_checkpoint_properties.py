"""Property-based tests of the checkpoint file: whatever the bytes on disk (random, random
JSON, a valid file with a field changed, cut short, deeply nested), loading, inspecting and
repairing it end in a result or a `CheckpointError`, never another exception; what the agent
loads is what inspect calls OK; a repaired file always loads; valid records round-trip."""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hypothesis import assume, given
from hypothesis import strategies as st

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
    DeviceNode,
    Mount,
    PreparedClaim,
    PreparedDevice,
)

BOOT = "0f0f0f0f-1111-2222-3333-444444444444"

# --- valid records ------------------------------------------------------------------------------

dns_label = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,14}[a-z0-9])?\Z")
dns_subdomain = st.lists(dns_label, min_size=1, max_size=3).map(".".join)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)
text = st.text(max_size=12)


@st.composite
def container_edits(draw: st.DrawFn) -> ContainerEdits:
    nodes = draw(
        st.lists(
            st.builds(
                DeviceNode,
                path=text,
                host_path=st.none() | text,
                type=st.sampled_from(["c", "b", "u", "p", ""]),
                major=st.none() | st.integers(0, 4095),
                minor=st.none() | st.integers(0, 2**20),
                permissions=st.sampled_from(["r", "rw", "rwm"]),
            ),
            max_size=2,
        )
    )
    mounts = draw(
        st.lists(
            st.builds(
                Mount,
                host_path=text,
                container_path=text,
                options=st.lists(text, max_size=2).map(tuple),
                type=st.none() | text,
            ),
            max_size=2,
        )
    )
    return ContainerEdits(
        env=draw(st.dictionaries(text, text, max_size=2)),
        device_nodes=tuple(nodes),
        mounts=tuple(mounts),
    )


@st.composite
def devices(draw: st.DrawFn) -> PreparedDevice:
    allocation = AllocatedDevice(
        request=draw(dns_label | st.tuples(dns_label, dns_label).map("/".join)),
        pool=draw(st.lists(dns_subdomain, min_size=1, max_size=2).map("/".join)),
        device=draw(dns_label),
        share_id=draw(st.none() | st.uuids().map(str)),
        consumed_capacity=draw(st.dictionaries(dns_label, text, max_size=2)),
        admin_access=draw(st.booleans()),
    )
    edits = draw(container_edits())
    state = draw(st.dictionaries(st.text(max_size=6), json_values, max_size=3))
    return PreparedDevice(allocation=allocation, edits=edits, state=state)


@st.composite
def records(draw: st.DrawFn) -> ClaimRecord:
    ref = ClaimRef(namespace=draw(dns_label), name=draw(dns_subdomain), uid=str(draw(st.uuids())))
    claim = PreparedClaim(
        ref=ref,
        devices=tuple(draw(st.lists(devices(), max_size=2))),
        edits=draw(container_edits()),
    )
    return ClaimRecord(
        claim=claim,
        phase=draw(st.sampled_from(["started", "completed"])),
        boot_id=draw(text),
        driver=draw(dns_subdomain.filter(lambda name: len(name) <= 63)),
    )


def record_sets() -> st.SearchStrategy[dict[str, ClaimRecord]]:
    return st.lists(records(), max_size=3).map(lambda rs: {r.uid: r for r in rs})


# --- helpers ------------------------------------------------------------------------------------


@contextlib.contextmanager
def checkpoint_file(raw: bytes) -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "plugin" / "checkpoint.json"
        path.parent.mkdir()
        path.write_bytes(raw)
        yield path


def load(path: Path) -> dict[str, ClaimRecord] | None:
    """The records the agent loads, or None when it refuses the file (with CheckpointError)."""
    try:
        checkpoint = Checkpoint.open(path, boot_id=BOOT)
    except CheckpointError as exc:
        assert str(path) in str(exc), "the error names the file"
        return None
    try:
        return checkpoint.records()
    finally:
        checkpoint.close()


def check_any_file(raw: bytes) -> None:
    """The properties every file on disk has, whatever its bytes."""
    with checkpoint_file(raw) as path:
        report = inspect(path)
        assert report.render()
        loaded = load(path)
        assert report.ok == (loaded is not None), report.problems
        if loaded is not None:
            assert {r.uid: r for r in report.records} == loaded
            return
        assert path.read_bytes() == raw, "a refused file is never changed"
        try:
            repaired = repair(path, force=True)
        except CheckpointError:
            return
        assert repaired.render()
        assert repaired.backup is not None and repaired.backup.read_bytes() == raw
        assert load(path) == {r.uid: r for r in repaired.kept}, "a repaired file loads"
        assert set(repaired.dropped) == set(repaired.reasons)


def valid_file(recorded: dict[str, ClaimRecord], *, logged: bool) -> bytes:
    """A file the agent wrote: the records in its snapshot, or appended to its log."""
    if not logged:
        texts = {u: fileformat.canonical(encode_record(r)) for u, r in recorded.items()}
        return fileformat.snapshot_line(texts)
    raw = fileformat.snapshot_line({})
    for seq, (u, r) in enumerate(recorded.items(), start=1):
        raw += fileformat.put_line(seq, u, fileformat.canonical(encode_record(r)))
    return raw


# --- properties ---------------------------------------------------------------------------------


@given(st.binary(max_size=600))
def test_random_bytes(raw: bytes) -> None:
    check_any_file(raw)


@given(json_values)
def test_random_json(value: Any) -> None:
    check_any_file(fileformat.canonical(value).encode("utf-8", "surrogatepass"))


@given(record_sets(), st.booleans(), st.data())
def test_a_valid_file_cut_at_any_length(
    recorded: dict[str, ClaimRecord], logged: bool, data: st.DataObject
) -> None:
    raw = valid_file(recorded, logged=logged)
    cut = data.draw(st.integers(0, len(raw)))
    check_any_file(raw[:cut])
    for uid, record in fileformat.parse(raw[:cut]).records.items():
        assert recorded[uid] == record, "salvage keeps records as written, never altered"


@given(record_sets(), st.booleans(), st.data())
def test_a_valid_file_with_bytes_overwritten(
    recorded: dict[str, ClaimRecord], logged: bool, data: st.DataObject
) -> None:
    raw = valid_file(recorded, logged=logged)
    at = data.draw(st.integers(0, len(raw)))
    garbage = data.draw(st.binary(min_size=1, max_size=12))
    check_any_file(raw[:at] + garbage + raw[at + len(garbage) :])


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path to a value inside ``value`` (dict keys and list indices)."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))


@given(records(), st.booleans(), st.data())
def test_a_checksum_valid_file_with_a_field_changed(
    record: ClaimRecord, logged: bool, data: st.DataObject
) -> None:
    encoded = encode_record(record)
    path = data.draw(st.sampled_from([p for p in _paths(encoded) if p]))
    parent: Any = encoded
    for key in path[:-1]:
        parent = parent[key]
    action = data.draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "replace" or isinstance(parent, list):
        parent[path[-1]] = data.draw(
            json_values | st.sampled_from(["../../etc", "a/b", "", "X" * 300, "\ud800"])
        )
    elif action == "delete":
        del parent[path[-1]]
    else:
        parent[data.draw(st.text(max_size=6))] = data.draw(json_values)
    canon = fileformat.canonical(encoded)
    try:
        canon.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: written as the escape "\ud800"
        canon = json.dumps(encoded, sort_keys=True, separators=(",", ":"))
    if logged:
        raw = fileformat.snapshot_line({}) + fileformat.put_line(1, record.uid, canon)
    else:
        raw = fileformat.snapshot_line({record.uid: canon})
    check_any_file(raw)


@given(
    st.integers(min_value=fileformat.MAX_DEPTH - 5, max_value=20_000),
    st.sampled_from(["[", '{"a":', '[{"b":']),
    st.booleans(),
)
def test_deeply_nested(depth: int, opener: str, inside_a_record: bool) -> None:
    nested = opener * depth
    if inside_a_record:
        record = fileformat.canonical(encode_record(_plain_record()))
        raw = fileformat.snapshot_line(
            {_plain_record().uid: record.replace('"vf":1', f'"vf":{nested}')}
        )
    else:
        raw = nested.encode()
    check_any_file(raw)


def _plain_record() -> ClaimRecord:
    device = PreparedDevice(
        allocation=AllocatedDevice(request="r", pool="p", device="d"), state={"vf": 1}
    )
    ref = ClaimRef("default", "claim", "11111111-2222-3333-4444-555555555555")
    return ClaimRecord.completed(
        PreparedClaim(ref=ref, devices=(device,)), boot_id=BOOT, driver="gpu.example.com"
    )


@given(record_sets(), st.lists(st.integers(0, 2), max_size=4))
def test_valid_records_round_trip(recorded: dict[str, ClaimRecord], removals: list[int]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "checkpoint.json"
        checkpoint = Checkpoint.open(path, boot_id=BOOT)
        for record in recorded.values():
            checkpoint.put(record)
        expected = dict(recorded)
        uids = list(recorded)
        for index in removals:
            if index < len(uids):
                checkpoint.remove(uids[index])
                expected.pop(uids[index], None)
        checkpoint.close()
        assert load(path) == expected
        report = inspect(path)
        assert report.ok and {r.uid: r for r in report.records} == expected
        assert not repair(path).changed
        Checkpoint.open(path, boot_id=BOOT).compact()
        assert load(path) == expected


@given(records())
def test_a_valid_file_of_any_records_is_inspected_ok(record: ClaimRecord) -> None:
    assume(record.claim.devices)
    raw = valid_file({record.uid: record}, logged=False)
    with checkpoint_file(raw) as path:
        assert inspect(path).ok
        assert load(path) == {record.uid: record}


def _scan_holding(checkpoint: Checkpoint, device: str) -> set[str]:
    """The UIDs holding ``device`` by looking at every record."""
    return {
        uid
        for uid, record in checkpoint.records().items()
        if any(
            d.allocation.device == device and not d.allocation.admin_access
            for d in record.claim.devices
        )
    }


_UIDS = [f"00000000-0000-0000-0000-00000000000{i}" for i in range(4)]
_DEVICES = ["d0", "d1", "d2"]
_holding_ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("put"),
            st.sampled_from(_UIDS),
            st.lists(st.tuples(st.sampled_from(_DEVICES), st.booleans()), max_size=3),
        ),
        st.tuples(st.just("remove"), st.sampled_from(_UIDS), st.just([])),
        st.tuples(st.just("compact"), st.just(""), st.just([])),
    ),
    max_size=12,
)


@given(_holding_ops)
def test_the_device_index_agrees_with_the_records(ops: list[tuple[str, str, list[Any]]]) -> None:
    """`Checkpoint.holding` answers from an index kept through puts, replacements, removals
    and compactions, in the writer and in a second instance that reads what it appended."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "checkpoint.json"
        writer = Checkpoint.open(path, boot_id=BOOT)
        reader = Checkpoint.open(path, boot_id=BOOT)
        for op, uid, held in ops:
            if op == "put":
                devices = tuple(
                    PreparedDevice(AllocatedDevice("r", "p", device, admin_access=admin))
                    for device, admin in held
                )
                claim = PreparedClaim(ClaimRef("default", f"c{uid[-1]}", uid), devices)
                writer.put(ClaimRecord.completed(claim, boot_id=BOOT, driver="gpu.example.com"))
            elif op == "remove":
                writer.remove(uid)
            else:
                writer.compact()
            for checkpoint in (writer, reader):
                for device in _DEVICES:
                    held_by = {r.uid for r in checkpoint.holding(device)}
                    assert held_by == _scan_holding(checkpoint, device), (op, device)
        writer.close()
        reader.close()
