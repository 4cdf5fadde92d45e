"""Bounded reads of files the reader does not own: regular files only, at most a limit.

Every case uses the real thing: a FIFO nobody writes (a read would block forever), /dev/zero
(a read would never end), a listening Unix socket, a directory, procfs and sysfs files.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from dra_core import (
    BoundedReadError,
    FileTooLargeError,
    NotARegularFileError,
    read_regular_file,
    read_regular_text,
)
from dra_core.testing.bounded import within


def test_regular_file_read_whole_up_to_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    assert read_regular_file(path, 100) == b"x" * 100
    assert read_regular_file(str(path), 1000) == b"x" * 100
    (tmp_path / "empty").write_bytes(b"")
    assert read_regular_file(tmp_path / "empty", 0) == b""


def test_larger_than_the_limit_is_refused_naming_path_and_limit(tmp_path: Path) -> None:
    path = tmp_path / "big"
    path.write_bytes(b"x" * 101)
    with pytest.raises(FileTooLargeError) as caught:
        read_regular_file(path, 100)
    assert str(caught.value) == f"{path}: holds more than 100 bytes, the most read from it: refused"
    assert caught.value.path == path
    with pytest.raises(FileTooLargeError):
        read_regular_file(path, 0)


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    error = within(5.0, lambda: read_regular_file(fifo, 4096))
    assert isinstance(error, NotARegularFileError), error
    assert str(error) == (
        f"{fifo}: is a FIFO (named pipe), not a regular file: refused, as reading it could "
        "block forever"
    )


def test_symlink_to_a_fifo_is_refused_too(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link"
    link.symlink_to(fifo)
    error = within(5.0, lambda: read_regular_file(link, 4096))
    assert isinstance(error, NotARegularFileError) and str(link) in str(error)


def test_endless_device_is_refused_and_not_read() -> None:
    error = within(5.0, lambda: read_regular_file("/dev/zero", 1 << 30))
    assert isinstance(error, NotARegularFileError), error
    assert "/dev/zero: is a character device" in str(error)


def test_directory_and_socket_are_refused(tmp_path: Path) -> None:
    with pytest.raises(NotARegularFileError, match="is a directory"):
        read_regular_file(tmp_path, 10)
    path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen()
        with pytest.raises(NotARegularFileError, match="is a socket"):
            read_regular_file(path, 10)


def test_refusals_are_os_errors_with_strerror_and_filename(tmp_path: Path) -> None:
    with pytest.raises(OSError) as caught:
        read_regular_file(tmp_path, 10)
    assert isinstance(caught.value, BoundedReadError)
    assert caught.value.filename == str(tmp_path)
    assert caught.value.strerror is not None and "directory" in caught.value.strerror


def test_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_regular_file(tmp_path / "absent", 10)


def test_procfs_file_of_reported_size_zero_is_read_by_content() -> None:
    boot_id = read_regular_text("/proc/sys/kernel/random/boot_id", 64).strip()
    assert len(boot_id) == 36


@pytest.mark.skipif(not Path("/sys/bus/pci/devices").is_dir(), reason="no PCI sysfs here")
def test_sysfs_attribute_of_reported_size_4096_is_read_by_content() -> None:
    device = sorted(Path("/sys/bus/pci/devices").iterdir())[0]
    assert (device / "vendor").stat().st_size == 4096
    assert read_regular_text(device / "vendor", 64).startswith("0x")


def test_text_must_be_utf8_unless_told(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"\xff\xfe ok")
    with pytest.raises(UnicodeDecodeError):
        read_regular_text(path, 10)
    assert read_regular_text(path, 10, errors="replace") == "\ufffd\ufffd ok"


def test_a_negative_limit_is_a_programming_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(ValueError, match="limit must be 0 or more"):
        read_regular_file(tmp_path / "f", -1)
