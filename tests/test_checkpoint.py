"""The checkpoint: round trip, strict decoding, durability, modes, inspect and repair."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from dra_core import checkpoint as cp
from dra_core.checkpoint import (
    Checkpoint,
    CheckpointError,
    ClaimRecord,
    current_boot_id,
    decode_record,
    encode_record,
    inspect,
    render_inspect,
    render_repair,
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

UID1 = "11111111-2222-3333-4444-555555555555"
UID2 = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
BOOT = "0f0f0f0f-1111-2222-3333-444444444444"


def _ref(uid: str = UID1) -> ClaimRef:
    return ClaimRef(namespace="default", name="gpu-claim", uid=uid)


def _full_record(uid: str = UID1) -> ClaimRecord:
    devices = (
        PreparedDevice(
            allocation=AllocatedDevice(
                request="gpu/big",
                pool="node-1",
                device="gpu-0000-03-00-0",
                share_id="3f2a-1",
                consumed_capacity={"memory": "4Gi", "millicores": "250"},
                admin_access=True,
            ),
            edits=ContainerEdits(
                env={"GPU_VISIBLE": "0", "EMPTY": ""},
                device_nodes=(
                    DeviceNode(
                        path="/dev/dri/renderD128",
                        host_path="/dev/dri/renderD129",
                        type="c",
                        major=226,
                        minor=128,
                        permissions="rw",
                    ),
                    DeviceNode(path="/dev/dri/card0"),
                ),
                mounts=(
                    Mount(host_path="/sys/x", container_path="/sys/y"),
                    Mount(host_path="/a", container_path="/b", options=(), type="tmpfs"),
                ),
            ),
            state={"vf": 3, "nested": {"list": [1, "two", None, True, 1.5]}},
        ),
        PreparedDevice(allocation=AllocatedDevice(request="r2", pool="p", device="d2")),
    )
    claim_edits = ContainerEdits(
        env={"CLAIM_DEVICES": "d,d2"}, mounts=(Mount(host_path="/c", container_path="/c"),)
    )
    claim = PreparedClaim(ref=_ref(uid), devices=devices, edits=claim_edits)
    return ClaimRecord.completed(claim, boot_id=BOOT, driver="gpu.example.com")


def _started(uid: str = UID2) -> ClaimRecord:
    return ClaimRecord.started(
        _ref(uid),
        [AllocatedDevice(request="r", pool="p", device="d")],
        boot_id=BOOT,
        driver="gpu.example.com",
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _doc(path: Path) -> dict[str, Any]:
    """The snapshot document, once every logged change is folded into it."""
    Checkpoint.open(path, boot_id=BOOT).compact()
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def _rewrite(path: Path, doc: dict[str, Any], *, fix_checksum: bool = True) -> None:
    if fix_checksum:
        doc["checksum"] = cp.fileformat.checksum(doc["data"])
    path.write_text(json.dumps(doc))


@pytest.fixture
def ckpt_path(tmp_path: Path) -> Path:
    return tmp_path / "plugin" / "checkpoint.json"


def test_open_creates_empty_file_and_private_dir(ckpt_path: Path) -> None:
    ckpt = Checkpoint.open(ckpt_path, boot_id=BOOT)
    assert ckpt.path == ckpt_path
    assert ckpt.records() == {}
    assert ckpt.boot_id == BOOT
    assert _mode(ckpt_path) == 0o600
    assert _mode(ckpt_path.parent) == 0o700
    doc = _doc(ckpt_path)
    assert doc["kind"] == "dra-core-checkpoint"
    assert doc["version"] == 2
    assert doc["data"] == {"claims": {}}
    assert doc["checksum"].startswith("sha256:")


def test_round_trip_every_field(ckpt_path: Path) -> None:
    full, started = _full_record(), _started()
    ckpt = Checkpoint.open(ckpt_path, boot_id=BOOT)
    ckpt.put(full)
    ckpt.put(started)
    assert ckpt.get(UID1) == full
    reopened = Checkpoint.open(ckpt_path, boot_id=BOOT)
    assert reopened.records() == {UID1: full, UID2: started}
    assert reopened.get(UID2) is not None
    assert reopened.get(UID2).phase == "started"  # type: ignore[union-attr]
    assert reopened.get("nope") is None
    assert _mode(ckpt_path) == 0o600
    # the codec is symmetric on its own too
    assert decode_record(UID1, encode_record(full)) == full
    # a claim without edits of its own is written as before, so older releases read it
    assert "claimEdits" not in encode_record(started)
    assert "claimEdits" in encode_record(full)


def test_records_is_a_copy(ckpt_path: Path) -> None:
    ckpt = Checkpoint.open(ckpt_path, boot_id=BOOT)
    ckpt.put(_full_record())
    records = ckpt.records()
    records.clear()
    assert len(ckpt.records()) == 1


def test_put_replaces_and_remove_is_durable(ckpt_path: Path) -> None:
    ckpt = Checkpoint.open(ckpt_path, boot_id=BOOT)
    ckpt.put(_started(UID1))
    ckpt.put(_full_record(UID1))
    ckpt.put(_started(UID2))
    assert Checkpoint.open(ckpt_path, boot_id=BOOT).get(UID1) == _full_record(UID1)
    ckpt.remove(UID1)
    ckpt.remove(UID1)  # unknown: fine
    reopened = Checkpoint.open(ckpt_path, boot_id=BOOT)
    assert set(reopened.records()) == {UID2}
    assert sorted(p.name for p in ckpt_path.parent.iterdir()) == ["checkpoint.json"]


@pytest.mark.parametrize("fails", ["write", "fdatasync"])
def test_failed_write_keeps_old_state(
    ckpt_path: Path, monkeypatch: pytest.MonkeyPatch, fails: str
) -> None:
    ckpt = Checkpoint.open(ckpt_path, boot_id=BOOT)
    ckpt.put(_started(UID1))
    before = ckpt_path.read_bytes()
    real = getattr(os, fails)

    def crash(fd: int, *args: Any) -> Any:
        if fails == "write":
            real(fd, bytes(args[0])[:7])  # a part reaches the file, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, fails, crash)
    with pytest.raises(CheckpointError, match="cannot write") as info:
        ckpt.put(_full_record(UID2))
    assert str(ckpt_path) in str(info.value)
    monkeypatch.undo()
    assert ckpt_path.read_bytes() == before, "what reached the file was taken back"
    assert set(ckpt.records()) == {UID1}
    assert set(Checkpoint.open(ckpt_path, boot_id=BOOT).records()) == {UID1}
    assert sorted(p.name for p in ckpt_path.parent.iterdir()) == ["checkpoint.json"]
    ckpt.put(_full_record(UID2))
    assert set(Checkpoint.open(ckpt_path, boot_id=BOOT).records()) == {UID1, UID2}


def test_failed_compaction_keeps_old_state(
    ckpt_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = Checkpoint.open(ckpt_path, boot_id=BOOT)
    ckpt.put(_started(UID1))
    before = ckpt_path.read_bytes()

    def crash(self: Path, target: Path) -> Path:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "replace", crash)
    with pytest.raises(CheckpointError, match="cannot write") as info:
        ckpt.compact()
    assert str(ckpt_path) in str(info.value)
    monkeypatch.undo()
    assert ckpt_path.read_bytes() == before
    assert set(ckpt.records()) == {UID1}
    assert sorted(p.name for p in ckpt_path.parent.iterdir()) == ["checkpoint.json"]
    ckpt.put(_full_record(UID2))
    assert set(Checkpoint.open(ckpt_path, boot_id=BOOT).records()) == {UID1, UID2}


def test_unserialisable_state_is_refused(ckpt_path: Path) -> None:
    ckpt = Checkpoint.open(ckpt_path, boot_id=BOOT)
    bad = ClaimRecord.completed(
        PreparedClaim(
            ref=_ref(),
            devices=(
                PreparedDevice(
                    allocation=AllocatedDevice(request="r", pool="p", device="d"),
                    state={"when": object()},
                ),
            ),
        ),
        boot_id=BOOT,
        driver="d",
    )
    with pytest.raises(CheckpointError, match=f"claim {UID1}.*JSON"):
        ckpt.put(bad)
    assert ckpt.records() == {}


def test_invalid_model_value_is_refused_before_writing(ckpt_path: Path) -> None:
    ckpt = Checkpoint.open(ckpt_path, boot_id=BOOT)
    node = DeviceNode(path="/dev/x", type="x")  # type: ignore[arg-type]
    bad = ClaimRecord.completed(
        PreparedClaim(
            ref=_ref(),
            devices=(
                PreparedDevice(
                    allocation=AllocatedDevice(request="r", pool="p", device="d"),
                    edits=ContainerEdits(device_nodes=(node,)),
                ),
            ),
        ),
        boot_id=BOOT,
        driver="d",
    )
    with pytest.raises(CheckpointError, match=r"claim .*deviceNodes\[0\]\.type"):
        ckpt.put(bad)
    assert Checkpoint.open(ckpt_path, boot_id=BOOT).records() == {}


def test_checksum_mismatch_is_refused_not_reset(ckpt_path: Path) -> None:
    Checkpoint.open(ckpt_path, boot_id=BOOT).put(_full_record())
    doc = _doc(ckpt_path)
    doc["data"]["claims"][UID1]["driver"] = "evil.example.com"
    _rewrite(ckpt_path, doc, fix_checksum=False)
    before = ckpt_path.read_bytes()
    with pytest.raises(CheckpointError) as info:
        Checkpoint.open(ckpt_path, boot_id=BOOT)
    message = str(info.value)
    assert "checksum mismatch" in message
    assert str(ckpt_path) in message
    assert f"dra-core checkpoint inspect --path {ckpt_path}" in message
    assert f"dra-core checkpoint repair --path {ckpt_path}" in message
    assert ckpt_path.read_bytes() == before


def test_unknown_version(ckpt_path: Path) -> None:
    Checkpoint.open(ckpt_path, boot_id=BOOT)
    doc = _doc(ckpt_path)
    doc["version"] = 3
    _rewrite(ckpt_path, doc)
    with pytest.raises(CheckpointError, match="version 3 is unknown"):
        Checkpoint.open(ckpt_path, boot_id=BOOT)


def test_wrong_kind(ckpt_path: Path) -> None:
    Checkpoint.open(ckpt_path, boot_id=BOOT)
    doc = _doc(ckpt_path)
    doc["kind"] = "something-else"
    _rewrite(ckpt_path, doc)
    with pytest.raises(CheckpointError, match="kind"):
        Checkpoint.open(ckpt_path, boot_id=BOOT)


@pytest.mark.parametrize("cut", [0, 1, 10, -20])
def test_truncated_file(ckpt_path: Path, cut: int) -> None:
    ckpt = Checkpoint.open(ckpt_path, boot_id=BOOT)
    ckpt.put(_full_record())
    ckpt.compact()  # the snapshot itself is cut (an entry cut short is a crash's, see below)
    raw = ckpt_path.read_bytes()
    ckpt_path.write_bytes(raw[:cut])
    with pytest.raises(CheckpointError, match="truncated"):
        Checkpoint.open(ckpt_path, boot_id=BOOT)
    assert ckpt_path.read_bytes() == raw[:cut]


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: r.__setitem__("phase", "halfway"), "phase"),
        (lambda r: r.__setitem__("bootId", 7), "bootId"),
        (lambda r: r["claim"].__setitem__("uid", UID2), "claim.uid"),
        (lambda r: r["claim"].pop("namespace"), "claim"),
        (lambda r: r.__setitem__("extra", 1), "(record)"),
        (lambda r: r.__setitem__("devices", {}), "devices"),
        (lambda r: r["devices"][0]["allocation"].__setitem__("shareId", 5), "shareId"),
        (lambda r: r["devices"][0]["allocation"].__setitem__("adminAccess", "yes"), "adminAccess"),
        (
            lambda r: r["devices"][0]["allocation"]["consumedCapacity"].__setitem__("m", 1),
            "consumedCapacity.m",
        ),
        (lambda r: r["devices"][0]["edits"]["env"].__setitem__("K", None), "env.K"),
        (lambda r: r["devices"][0]["edits"]["deviceNodes"][0].__setitem__("type", "x"), "type"),
        (lambda r: r["devices"][0]["edits"]["deviceNodes"][0].__setitem__("major", True), "major"),
        (lambda r: r["devices"][0]["edits"]["mounts"][0].__setitem__("options", [1]), "options[0]"),
        (lambda r: r["devices"][0].__setitem__("state", []), "state"),
        (lambda r: r["claimEdits"]["env"].__setitem__("K", 1), "claimEdits.env.K"),
        (lambda r: r["claimEdits"].pop("mounts"), "claimEdits"),
    ],
)
def test_wrong_field_names_uid_and_field(ckpt_path: Path, mutate: Any, field: str) -> None:
    Checkpoint.open(ckpt_path, boot_id=BOOT).put(_full_record())
    doc = _doc(ckpt_path)
    mutate(doc["data"]["claims"][UID1])
    _rewrite(ckpt_path, doc)
    with pytest.raises(CheckpointError) as info:
        Checkpoint.open(ckpt_path, boot_id=BOOT)
    message = str(info.value)
    assert f"claim {UID1}" in message
    assert field in message
    assert str(ckpt_path) in message


def test_decode_record_error_is_value_error() -> None:
    with pytest.raises(ValueError, match=f"claim {UID1}: field phase"):
        decode_record(UID1, {**encode_record(_full_record()), "phase": "done"})


def test_unreadable_file(ckpt_path: Path) -> None:
    ckpt_path.mkdir(parents=True)
    with pytest.raises(CheckpointError, match="cannot be read"):
        Checkpoint.open(ckpt_path, boot_id=BOOT)


def test_reload_when_another_process_writes(ckpt_path: Path) -> None:
    first = Checkpoint.open(ckpt_path, boot_id=BOOT)
    second = Checkpoint.open(ckpt_path, boot_id=BOOT)
    first.put(_full_record(UID1))
    assert second.get(UID1) == _full_record(UID1)
    second.put(_started(UID2))
    assert set(first.records()) == {UID1, UID2}
    first.remove(UID1)
    assert set(second.records()) == {UID2}


def test_file_vanishing_is_an_error(ckpt_path: Path) -> None:
    ckpt = Checkpoint.open(ckpt_path, boot_id=BOOT)
    ckpt_path.unlink()
    with pytest.raises(CheckpointError, match="disappeared"):
        ckpt.records()


def test_loose_mode_is_tightened(ckpt_path: Path) -> None:
    Checkpoint.open(ckpt_path, boot_id=BOOT)
    ckpt_path.chmod(0o644)
    Checkpoint.open(ckpt_path, boot_id=BOOT)
    assert _mode(ckpt_path) == 0o600


def test_concurrent_puts(ckpt_path: Path) -> None:
    ckpt = Checkpoint.open(ckpt_path, boot_id=BOOT)
    uids = [f"00000000-0000-0000-0000-{i:012d}" for i in range(16)]
    threads = [threading.Thread(target=ckpt.put, args=(_started(u),)) for u in uids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(Checkpoint.open(ckpt_path, boot_id=BOOT).records()) == set(uids)


def test_boot_id(tmp_path: Path, ckpt_path: Path) -> None:
    boot = tmp_path / "boot_id"
    boot.write_text("abc-123\n")
    assert current_boot_id(boot) == "abc-123"
    assert current_boot_id(tmp_path / "missing") == ""
    ckpt = Checkpoint.open(ckpt_path, boot_id="new-boot")
    ckpt.put(_full_record(UID1))  # written with BOOT
    ckpt.put(ClaimRecord.completed(_full_record(UID2).claim, boot_id="new-boot", driver="d"))
    assert set(ckpt.from_previous_boot()) == {UID1}


def test_default_boot_id_is_read(ckpt_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cp.store, "current_boot_id", lambda path=cp.BOOT_ID_PATH: "from-kernel")
    assert Checkpoint.open(ckpt_path).boot_id == "from-kernel"


def test_stale_temp_files_are_collected(ckpt_path: Path) -> None:
    Checkpoint.open(ckpt_path, boot_id=BOOT)
    stale = ckpt_path.parent / ".checkpoint.json.0123456789abcdef.tmp"
    stale.write_text("{")
    os.utime(stale, (1, 1))
    Checkpoint.open(ckpt_path, boot_id=BOOT)
    assert not stale.exists()


# --- inspect and repair ------------------------------------------------------------------------


def test_inspect_healthy(ckpt_path: Path) -> None:
    ckpt = Checkpoint.open(ckpt_path, boot_id=BOOT)
    ckpt.put(_full_record())
    report = inspect(ckpt_path)
    assert report.ok
    assert report.version == 2
    assert report.problems == []
    assert report.records == [_full_record()]
    text = render_inspect(report)
    assert text == report.render()
    assert "OK" in text
    assert UID1 in text
    assert "gpu-0000-03-00-0#3f2a-1" in text


def test_inspect_missing(tmp_path: Path) -> None:
    report = inspect(tmp_path / "none.json")
    assert not report.ok
    assert not report.exists
    assert "does not exist" in report.render()


def test_inspect_lists_problems_and_decodable_records(ckpt_path: Path) -> None:
    ckpt = Checkpoint.open(ckpt_path, boot_id=BOOT)
    ckpt.put(_full_record(UID1))
    ckpt.put(_started(UID2))
    doc = _doc(ckpt_path)
    doc["data"]["claims"][UID2]["phase"] = "bogus"
    _rewrite(ckpt_path, doc, fix_checksum=False)
    report = inspect(ckpt_path)
    assert not report.ok
    assert report.records == [_full_record(UID1)]
    assert report.dropped == [UID2]
    assert any("checksum mismatch" in p for p in report.problems)
    assert any(UID2 in p and "phase" in p for p in report.problems)
    text = report.render()
    assert "DAMAGED" in text
    assert "dra-core checkpoint repair" in text


def test_repair_keeps_decodable_records_and_backs_up(ckpt_path: Path) -> None:
    ckpt = Checkpoint.open(ckpt_path, boot_id=BOOT)
    ckpt.put(_full_record(UID1))
    ckpt.put(_started(UID2))
    doc = _doc(ckpt_path)
    doc["data"]["claims"][UID2]["devices"] = "broken"
    _rewrite(ckpt_path, doc, fix_checksum=False)
    damaged = ckpt_path.read_bytes()

    report = repair(ckpt_path)
    assert report.changed
    assert report.backup is not None
    assert report.backup.name.startswith("checkpoint.json.corrupt-")
    assert report.backup.read_bytes() == damaged
    assert _mode(report.backup) == 0o600
    assert report.kept == [_full_record(UID1)]
    assert report.dropped == [UID2]
    assert _mode(ckpt_path) == 0o600
    assert Checkpoint.open(ckpt_path, boot_id=BOOT).records() == {UID1: _full_record(UID1)}
    text = render_repair(report)
    assert text == report.render()
    assert str(report.backup) in text
    assert UID2 in text

    again = repair(ckpt_path)
    assert not again.changed
    assert "nothing to repair" in again.render()


def test_repair_unparsable_gives_empty_and_backup(ckpt_path: Path) -> None:
    ckpt_path.parent.mkdir(parents=True)
    ckpt_path.write_bytes(b'{"kind": "dra-core-checkpoint", "vers')
    report = repair(ckpt_path)
    assert report.changed
    assert report.kept == []
    assert not report.parsed
    assert report.backup is not None
    assert report.backup.read_bytes() == b'{"kind": "dra-core-checkpoint", "vers'
    assert Checkpoint.open(ckpt_path, boot_id=BOOT).records() == {}
    assert "could not be parsed" in report.render()


def test_repair_two_backups_do_not_collide(ckpt_path: Path) -> None:
    ckpt_path.parent.mkdir(parents=True)
    ckpt_path.write_bytes(b"garbage")
    first = repair(ckpt_path)
    ckpt_path.write_bytes(b"garbage 2")
    second = repair(ckpt_path)
    assert first.backup != second.backup
    assert first.backup is not None
    assert first.backup.read_bytes() == b"garbage"


def test_repair_refuses_newer_version_unless_forced(ckpt_path: Path) -> None:
    Checkpoint.open(ckpt_path, boot_id=BOOT).put(_full_record())
    doc = _doc(ckpt_path)
    doc["version"] = 7
    _rewrite(ckpt_path, doc)
    with pytest.raises(CheckpointError, match="newer dra-core"):
        repair(ckpt_path)
    report = repair(ckpt_path, force=True)
    assert report.kept == [_full_record()]
    assert Checkpoint.open(ckpt_path, boot_id=BOOT).get(UID1) == _full_record()


def test_repair_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nothing to repair"):
        repair(tmp_path / "none.json")


def test_the_repair_names_of_the_package_load_on_first_use() -> None:
    """An agent imports the checkpoint package without its repair module, and the package's
    repair names are still there for programs: ``repair`` the function, not the module."""
    program = """
import sys
import dra_core.checkpoint as cp
assert "dra_core.checkpoint.repair" not in sys.modules
from dra_core.checkpoint import inspect, repair
assert callable(repair) and cp.repair is repair and cp.inspect is inspect
assert cp.render_repair.__module__ == "dra_core.checkpoint.repair"
print(repair.__name__, cp.InspectReport.__name__)
"""
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["repair", "InspectReport"]
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        cp.nothing  # noqa: B018 - the attribute access is the test
