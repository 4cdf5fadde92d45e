"""The hooks as the agent calls them: identity, options, classes, allocation checks, prepare
and unprepare with container edits and opaque config; loading through the entry point."""

from __future__ import annotations

import time

import dra_backend_fake.plugin
import pytest
from dra_backend_fake.config import decode
from dra_backend_fake.testing import allocated_claim

from dra_core import AllocationError, PrepareError
from dra_core.model import validate_driver_name, validate_inventory
from dra_core.plugins import HookError, from_objects, load

CONFIG = {"apiVersion": "fake.dra-core.dev/v1", "kind": "FakeConfig"}


def test_identity_and_options(hooks):
    identity = hooks.backend_identity()
    assert identity.driver_name == "fake.dra-core.dev"
    assert identity.cdi_kind == "dra-core.dev/fake"
    validate_driver_name(identity.driver_name)
    options = {o.name: o.env for o in hooks.backend_options()}
    assert options == {
        "inventory": "DRA_FAKE_INVENTORY",
        "devices": "DRA_FAKE_DEVICES",
        "control-file": "DRA_FAKE_CONTROL",
        "control-interval": "DRA_FAKE_CONTROL_INTERVAL",
        "device-nodes-dir": "DRA_FAKE_DEVICE_NODES_DIR",
    }


def test_device_classes(hooks):
    classes = {c.name: c.selectors for c in hooks.device_classes(hooks.backend_identity())}
    assert list(classes) == [
        "fake.dra-core.dev",
        "partition.fake.dra-core.dev",
        "shared.fake.dra-core.dev",
    ]
    assert classes["fake.dra-core.dev"] == ('device.driver == "fake.dra-core.dev"',)
    assert classes["partition.fake.dra-core.dev"] == (
        'device.driver == "fake.dra-core.dev" && '
        'device.attributes["fake.dra-core.dev"].type == "partition"',
    )
    assert classes["shared.fake.dra-core.dev"] == (
        'device.driver == "fake.dra-core.dev" && device.allowMultipleAllocations == true',
    )


def test_entry_point_loads_the_installed_backend():
    hooks = load("fake", plugins=False)
    assert hooks.backend_identity().driver_name == "fake.dra-core.dev"
    assert hooks.implemented("dra_prepare") and hooks.implemented("dra_device_health")


def test_discover_without_options_is_the_valid_default(start):
    inventory = start().discover()
    validate_inventory(inventory)
    assert len(inventory.devices) == 10


def test_option_keys_with_dashes_or_underscores(hooks, tmp_path):
    from dra_core import NodeContext

    for key in ("control-interval", "control_interval"):
        context = NodeContext(node_name="n", driver_name="d", options={"devices": "1", key: "0"})
        with pytest.raises(HookError, match="--control-interval: '0'"):
            hooks.start(context)


def test_several_backends_side_by_side(start, tmp_path):
    one = start(devices=1)
    two = start(devices=2)
    assert one.names() == ["dev-0"]
    assert two.names() == ["dev-0", "dev-1"]


# ------------------------------------------------------------------ allocation checks
def test_check_allocation_refuses_unknown_devices(start):
    backend = start()
    backend.check(allocated_claim("dev-0", "big-0-p1", "shared-0"))
    with pytest.raises(HookError) as info:
        backend.check(allocated_claim("nope-7"))
    assert isinstance(info.value.__cause__, AllocationError)
    assert "device 'nope-7' is not in this node's fake inventory" in str(info.value)


def test_check_allocation_refuses_devices_held_by_another_claim(start):
    backend = start()
    first = allocated_claim("dev-0", "big-0-p0")
    backend.prepare(first)
    backend.check(first)  # the same claim again is fine (a retried prepare)
    with pytest.raises(HookError, match="device 'dev-0' is held by claim"):
        backend.check(allocated_claim("dev-0"))
    with pytest.raises(HookError, match="device 'big-0' conflicts with 'big-0-p0', which is held"):
        backend.check(allocated_claim("big-0"))
    backend.check(allocated_claim("big-0-p1"))  # another partition is free
    backend.check(allocated_claim(("r", "shared-0", "u1")))
    backend.check(allocated_claim(("r", "shared-0", "u2")))
    backend.unprepare(first, backend.prepare(first))
    backend.check(allocated_claim("dev-0"))
    backend.check(allocated_claim("big-0"))


# ------------------------------------------------------------------ prepare and unprepare
def test_prepare_gives_environment_per_request_once_for_the_claim(start):
    backend = start()
    claim = allocated_claim(
        ("gpu", "dev-0"), ("gpu", "dev-1"), ("extra/fast", "dev-2"), name="c.one-2"
    )
    prepared = backend.prepare(claim)
    assert [p.allocation.device for p in prepared] == ["dev-0", "dev-1", "dev-2"]
    for p in prepared:
        assert p.edits.env == {}  # nothing per device: the claim's edits hold it once
        assert p.edits.device_nodes == ()
        assert p.state == {}
    assert backend.claim_edits(claim, prepared).env == {
        "DRA_FAKE_CLAIM": "default/c.one-2",
        "DRA_FAKE_CLAIM_C_ONE_2": "dev-0,dev-1,dev-2",
        "DRA_FAKE_DEVICES": "dev-0,dev-1,dev-2",
        "DRA_FAKE_DEVICE_GPU": "dev-0,dev-1",
        "DRA_FAKE_DEVICE_EXTRA": "dev-2",
    }


def test_prepare_shared_device_carries_share_information(start):
    backend = start()
    share = "0f3c2a5e-1111-4b2b-9c3d-123456789abc"
    claim = allocated_claim(("s", "shared-0", share, {"memory": "2Gi", "millicores": "300"}))
    (prepared,) = backend.prepare(claim)
    env = prepared.edits.env
    assert env["DRA_FAKE_SHARE_ID_SHARED_0"] == share
    assert env["DRA_FAKE_CONSUMED_SHARED_0_MEMORY"] == "2Gi"
    assert env["DRA_FAKE_CONSUMED_SHARED_0_MILLICORES"] == "300"


def test_prepare_and_unprepare_are_idempotent(start):
    backend = start()
    claim = allocated_claim("dev-0")
    first = backend.prepare(claim)
    assert backend.prepare(claim) == first
    backend.unprepare(claim, first)
    backend.unprepare(claim, first)
    backend.unprepare(claim, [])  # never prepared at all


def test_opaque_config_adds_env_fails_or_sleeps(start):
    backend = start()
    env_config = decode({**CONFIG, "env": {"GREETING": "hello", "DRA_FAKE_CLAIM": "mine"}})
    claim = allocated_claim(("r", "dev-0"), configs={"r": (env_config,)})
    (prepared,) = backend.prepare(claim)
    assert prepared.edits.env["GREETING"] == "hello"
    assert prepared.edits.env["DRA_FAKE_CLAIM"] == "mine"  # the config wins:
    assert "DRA_FAKE_CLAIM" not in backend.claim_edits(claim, [prepared]).env  # not set twice

    failing = decode({**CONFIG, "failPrepare": True})
    with pytest.raises(HookError) as info:
        backend.prepare(allocated_claim(("r", "dev-1"), configs={"r": (failing,)}))
    assert isinstance(info.value.__cause__, PrepareError)
    assert "FakeConfig sets failPrepare: true" in str(info.value)

    slow = decode({**CONFIG, "sleepSeconds": 0.2})
    began = time.monotonic()
    backend.prepare(allocated_claim(("r", "dev-2"), configs={"r": (slow,)}))
    assert time.monotonic() - began >= 0.2


def test_prepare_rejects_a_uid_that_is_no_uuid(start):
    with pytest.raises(HookError, match="is not a UUID"):
        start().prepare(allocated_claim("dev-0", uid="../../etc"))


def test_hooks_work_without_start():
    """The webhook and ``render`` call hooks in a process that never started the backend."""
    from dra_backend_fake.testing import node_context

    hooks = from_objects("fake", dra_backend_fake.plugin.FakePlugin)
    inventory = hooks.discover(node_context(devices=1))
    assert [d.name for d in inventory.devices] == ["dev-0"]


def test_each_agent_has_a_backend_of_its_own():
    """Two agents in one process (tests, embedding): their backends do not share devices."""
    from dra_backend_fake.testing import node_context

    first, second = (from_objects("fake", dra_backend_fake.plugin.FakePlugin) for _ in "ab")
    one, two = node_context(devices=1), node_context(devices=3)
    first.start(one)
    second.start(two)
    try:
        assert len(first.discover(one).devices) == 1
        assert len(second.discover(two).devices) == 3
    finally:
        first.stop(one)
        second.stop(two)
