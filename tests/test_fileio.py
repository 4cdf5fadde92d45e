"""Atomic replacement and durable removal of files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from dra_core.fileio import (
    atomic_write,
    is_temp_for,
    remove_durably,
    remove_stale_temps,
    temp_target,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_write_creates_with_mode(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    atomic_write(target, b"hello", 0o600)
    assert target.read_bytes() == b"hello"
    assert _mode(target) == 0o600
    assert os.listdir(tmp_path) == ["a.json"]


def test_atomic_write_replaces_and_sets_mode(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    target.write_bytes(b"old")
    target.chmod(0o600)
    atomic_write(target, b"new content", 0o644)
    assert target.read_bytes() == b"new content"
    assert _mode(target) == 0o644


def test_atomic_write_large(tmp_path: Path) -> None:
    target = tmp_path / "big"
    data = os.urandom(3 * 1024 * 1024)
    atomic_write(target, data, 0o600)
    assert target.read_bytes() == data


def test_failed_rename_leaves_no_temp_and_old_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "a.json"
    target.write_bytes(b"old")

    def crash(self: Path, target: Path) -> Path:
        raise OSError(5, "simulated crash")

    monkeypatch.setattr(Path, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        atomic_write(target, b"new", 0o600)
    assert target.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["a.json"]


def test_directory_at_target_fails_cleanly(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    target.mkdir()
    (target / "inside").write_bytes(b"x")
    with pytest.raises(OSError):
        atomic_write(target, b"new", 0o600)
    assert sorted(os.listdir(tmp_path)) == ["a.json"]
    assert target.is_dir()


def test_missing_directory_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "nope" / "a.json", b"x", 0o600)


def test_temp_names_are_recognised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    real_replace = Path.replace

    def spy(self: Path, target: Path) -> Path:
        seen.append(self.name)
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", spy)
    atomic_write(tmp_path / "spec.json", b"{}", 0o644)
    assert len(seen) == 1
    assert is_temp_for(seen[0], "spec.json")
    assert not is_temp_for(seen[0], "other.json")
    assert not is_temp_for(".spec.json.zz.tmp", "spec.json")
    assert not is_temp_for("spec.json", "spec.json")
    assert temp_target(seen[0]) == "spec.json"
    assert temp_target(".x.0123456789abcdef.tmp") == "x"
    assert temp_target("..0123456789abcdef.tmp") is None
    assert temp_target(".x.0123456789abcdeg.tmp") is None
    assert temp_target("x.0123456789abcdef.tmp") is None


def test_remove_durably(tmp_path: Path) -> None:
    target = tmp_path / "a"
    target.write_bytes(b"x")
    assert remove_durably(target) is True
    assert not target.exists()
    assert remove_durably(target) is False


def test_remove_stale_temps(tmp_path: Path) -> None:
    old_ours = tmp_path / ".a.json.0123456789abcdef.tmp"
    new_ours = tmp_path / ".a.json.fedcba9876543210.tmp"
    old_theirs = tmp_path / ".b.json.0123456789abcdef.tmp"
    unrelated = tmp_path / "a.json"
    for p in (old_ours, new_ours, old_theirs, unrelated):
        p.write_bytes(b"x")
    for p in (old_ours, old_theirs, unrelated):
        os.utime(p, (1, 1))
    removed = remove_stale_temps(tmp_path, lambda name: name == "a.json", older_than=60)
    assert removed == [old_ours]
    assert sorted(os.listdir(tmp_path)) == sorted([new_ours.name, old_theirs.name, unrelated.name])
    assert remove_stale_temps(tmp_path / "missing", lambda name: True) == []
