"""The control file changes what discovery, health, allocation checks, prepare and unprepare
do while the backend runs; invalid content is logged and the previous state kept."""

from __future__ import annotations

import threading
import time

import pytest
from dra_backend_fake.testing import allocated_claim, write_control

from dra_core import AllocationError, PrepareError
from dra_core.model import validate_inventory
from dra_core.plugins import HookError


@pytest.fixture
def control(tmp_path):
    return tmp_path / "control.yaml"


def test_missing_file_means_no_changes(start, control):
    assert len(start(control_file=control).names()) == 10


def test_add_and_remove_devices(start, control):
    backend = start(control_file=control, devices=3)
    write_control(control, {"add": [{"name": "hot-0", "capacity": {"memory": "2Gi"}}]})
    assert backend.names() == ["dev-0", "dev-1", "dev-2", "hot-0"]
    write_control(control, {"remove": ["dev-1"]})
    assert backend.names() == ["dev-0", "dev-2"]
    write_control(control, "")
    assert backend.names() == ["dev-0", "dev-1", "dev-2"]


def test_remove_a_partitioned_device_whole_or_one_partition(start, control):
    backend = start(control_file=control)
    write_control(control, {"remove": ["big-0-p2"]})
    inventory = backend.discover()
    validate_inventory(inventory)
    assert "big-0-p2" not in backend.names() and "big-0" in backend.names()
    write_control(control, {"remove": ["big-0"]})
    inventory = backend.discover()
    validate_inventory(inventory)
    assert not any(n.startswith("big-0") for n in backend.names())
    assert inventory.counter_sets == ()


def test_replace_a_device_by_removing_and_adding_it(start, control):
    backend = start(control_file=control, devices=1)
    write_control(control, {"remove": ["dev-0"], "add": [{"name": "dev-0", "shared": True}]})
    assert backend.discover().device("dev-0").allow_multiple_allocations


def test_removed_device_is_refused_at_allocation(start, control):
    backend = start(control_file=control)
    write_control(control, {"remove": ["dev-3"]})
    with pytest.raises(HookError) as info:
        backend.check(allocated_claim("dev-3"))
    assert isinstance(info.value.__cause__, AllocationError)
    assert "'dev-3' is not in this node's fake inventory" in str(info.value)


def test_unhealthy_devices_and_recovery(start, control):
    backend = start(control_file=control)
    write_control(
        control,
        {
            "unhealthy": {
                "dev-1": "fan on fire",
                "big-0": {"message": "gone", "effect": "NoExecute"},
            }
        },
    )
    sick = backend.unhealthy()
    assert sorted(sick) == ["big-0", "big-0-p0", "big-0-p1", "big-0-p2", "big-0-p3", "dev-1"]
    assert sick["dev-1"].message == "fan on fire" and sick["dev-1"].effect == "NoSchedule"
    assert sick["big-0"].effect == "NoExecute"
    assert sick["big-0-p1"].message == "whole device big-0: gone"
    with pytest.raises(HookError, match=r"device 'dev-1' is unhealthy \(fan on fire\)"):
        backend.check(allocated_claim("dev-1"))
    write_control(control, {"unhealthy": {"big-0": "gone"}})
    assert "dev-1" not in backend.unhealthy()
    backend.check(allocated_claim("dev-1"))


def test_fail_prepare_until_removed(start, control):
    backend = start(control_file=control)
    write_control(control, {"failPrepare": {"dev-0": "injected"}})
    claim = allocated_claim("dev-0")
    for _ in range(2):  # every retry fails while the entry is there
        with pytest.raises(HookError) as info:
            backend.prepare(claim)
        assert isinstance(info.value.__cause__, PrepareError)
        message = str(info.value)
        assert "device 'dev-0'" in message and "injected" in message
        assert str(control) in message
    backend.prepare(allocated_claim("dev-1"))  # other devices are unaffected
    write_control(control, {})
    backend.prepare(claim)


def test_fail_unprepare_until_removed(start, control):
    backend = start(control_file=control)
    claim = allocated_claim("dev-0")
    prepared = backend.prepare(claim)
    write_control(control, {"failUnprepare": {"dev-0": "stuck"}})
    with pytest.raises(HookError) as info:
        backend.unprepare(claim, prepared)
    assert isinstance(info.value.__cause__, PrepareError)
    assert "unprepare failed" in str(info.value) and "stuck" in str(info.value)
    write_control(control, {})
    backend.unprepare(claim, prepared)


def test_hang_prepare(start, control):
    backend = start(control_file=control)
    write_control(control, {"hangPrepare": {"dev-0": 0.3}})
    began = time.monotonic()
    backend.prepare(allocated_claim("dev-0"))
    assert time.monotonic() - began >= 0.3
    began = time.monotonic()
    backend.prepare(allocated_claim("dev-1"))
    assert time.monotonic() - began < 0.3


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("add: [{name: x, colour: red}]", "add[0].colour: unknown field"),
        ("unhealthy: {dev-0: 3}", "unhealthy.dev-0"),
        ("hangPrepare: {dev-0: soon}", "hangPrepare.dev-0: Input should be a valid number"),
        ("failPrepare: [dev-0]", "failPrepare: Input should be a valid dictionary"),
        ("remove: dev-0", "remove: Input should be a valid list"),
        ("frobnicate: true", "frobnicate: unknown field"),
        (
            "add: [{name: dev-0}]",
            "add[0] ('dev-0'): device name 'dev-0' is already in the inventory",
        ),
        ("add: [\n", "not valid YAML"),
    ],
)
def test_invalid_control_file_is_logged_and_the_previous_state_kept(
    start, control, logs, content, expected
):
    backend = start(control_file=control)
    write_control(control, {"remove": ["dev-3"], "unhealthy": {"dev-1": "sick"}})
    assert "dev-3" not in backend.names()
    write_control(control, content)
    assert "dev-3" not in backend.names()
    assert "dev-1" in backend.unhealthy()
    errors = [m for m in logs if m.startswith("ERROR")]
    assert len(errors) == 1, errors  # once per change, not once per poll
    assert f"control file {control}" in errors[0] and expected in errors[0]
    assert "keeping the previous control state" in errors[0]


def test_deleting_the_file_undoes_its_changes(start, control):
    backend = start(control_file=control)
    write_control(control, {"remove": ["dev-0"]})
    assert "dev-0" not in backend.names()
    control.unlink()
    assert "dev-0" in backend.names()


def test_watcher_thread_asks_for_rediscovery(start, control):
    woken = threading.Event()
    backend = start(control_file=control, control_interval=0.02, rediscover=woken.set)
    assert not woken.wait(0.1)
    write_control(control, {"remove": ["dev-0"]})
    assert woken.wait(5), "the watcher did not call request_rediscovery"
    assert "dev-0" not in backend.names()
