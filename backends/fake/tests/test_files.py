"""The fake backend's files are read with bounds: a FIFO, a device, a huge file, a YAML bomb
in place of the control or inventory file is a clear error naming the file, never a hang or a
read without end; a bad control file leaves the previous state, every device of it."""

from __future__ import annotations

import os
import resource
import time

import pytest
from dra_backend_fake.control import MAX_BYTES as CONTROL_MAX_BYTES
from dra_backend_fake.control import ControlError, ControlFile
from dra_backend_fake.files import MAX_DEPTH, MAX_NODES
from dra_backend_fake.inventory import InventoryError, load_file
from dra_backend_fake.testing import allocated_claim, write_control

from dra_core.testing.bounded import within


def rss_kib() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(8)
)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("fifo", "is a FIFO (named pipe), not a regular file"),
        ("/dev/zero", "is a character device, not a regular file"),
        ("directory", "is a directory, not a regular file"),
        ("huge", f"holds more than {CONTROL_MAX_BYTES} bytes"),
        ("latin-1", "not UTF-8 text (byte 6: invalid continuation byte)"),
        ("bomb", f"stands for more than {MAX_NODES} values once its aliases are expanded"),
        ("deep", f"nested more than {MAX_DEPTH} levels deep"),
        ("loop", "an alias refers to a node that contains it"),
        ("two documents", "not valid YAML: expected a single document"),
    ],
)
def test_control_file_that_cannot_be_used_is_a_clear_error(tmp_path, content, problem):
    path = tmp_path / "control.yaml"
    if content == "fifo":
        os.mkfifo(path)
    elif content == "/dev/zero":
        path.symlink_to("/dev/zero")
    elif content == "directory":
        path.mkdir()
    elif content == "huge":
        path.write_bytes(b"#" * (CONTROL_MAX_BYTES + 1))
    elif content == "latin-1":
        path.write_bytes(b"add: [\xe9]\n")
    elif content == "bomb":
        path.write_text(BOMB)
    elif content == "deep":
        path.write_text("add: " + "[" * 200 + "]" * 200 + "\n")
    elif content == "loop":
        path.write_text("add: &x [*x]\n")
    else:
        path.write_text("add: []\n---\nadd: []\n")
    rss = rss_kib()
    error = within(5, ControlFile(path)._read)
    assert isinstance(error, ControlError), error
    assert str(error).startswith(f"control file {path}: "), error
    assert problem in str(error)
    assert rss_kib() - rss < 50 * 1024


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero"])
def test_inventory_file_that_is_not_a_file_stops_the_start_with_its_name(tmp_path, kind):
    path = tmp_path / "inventory.yaml"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    error = within(5, lambda: load_file(path))
    assert isinstance(error, InventoryError)
    assert str(error).startswith(f"inventory file {path}: is a ")


def test_bad_control_file_keeps_the_previous_state_whole(start, tmp_path, logs):
    control = tmp_path / "control.yaml"
    backend = start(control_file=control, devices=2)
    write_control(control, {"add": [{"name": "hot-0"}], "unhealthy": {"dev-0": "hot"}})
    assert backend.names() == ["dev-0", "dev-1", "hot-0"]
    # One bad entry among good ones: the whole file is refused, the previous state stays.
    write_control(
        control,
        {"add": [{"name": "hot-1"}, {"name": "hot-2", "attributes": {"big": 2**70}}]},
    )
    assert backend.names() == ["dev-0", "dev-1", "hot-0"]
    assert "dev-0" in backend.unhealthy()
    assert any("add[1].attributes" in m and "int64" in m for m in logs), logs[-3:]
    # A FIFO in its place: refused at once, still the previous state.
    control.unlink()
    os.mkfifo(control)
    started = time.monotonic()
    assert within(5, backend.names) == ["dev-0", "dev-1", "hot-0"]
    assert time.monotonic() - started < 2
    assert any(f"{control}: is a FIFO" in m for m in logs)


def test_prepare_is_not_held_up_by_a_fifo_control_file(start, tmp_path):
    control = tmp_path / "control.yaml"
    os.mkfifo(control)
    backend = start(control_file=control)
    claim = allocated_claim("dev-0")
    prepared = within(5, lambda: backend.prepare(claim))
    assert not isinstance(prepared, BaseException), prepared


def test_control_file_as_dev_zero_does_not_start_an_endless_read(start):
    rss = rss_kib()
    backend = within(10, lambda: start(control_file="/dev/zero"))
    assert not isinstance(backend, BaseException), backend
    assert len(within(5, backend.names)) == 10
    assert rss_kib() - rss < 50 * 1024
