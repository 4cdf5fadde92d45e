"""Property-based: any bytes, YAML or JSON as the fake backend's control or inventory file.

Never an unhandled exception: a file is either used (and then what discovery publishes passes
the ResourceSlice rules) or refused with an error naming the file, the previous state kept.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import dra_backend_fake.plugin
import yaml
from dra_backend_fake.control import ControlError, ControlFile
from dra_backend_fake.inventory import InventoryError, load_file
from dra_backend_fake.testing import node_context, write_control
from hypothesis import given
from hypothesis import strategies as st

from dra_core import validate_inventory
from dra_core.plugins import HookError, from_objects

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(["dev-0", "dev-1", "big-0", "big-0-p1", "1Gi", "512Mi", "1.2.3", "x/y", ""])
    | st.text(max_size=20)
)
VALUES = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=12) | st.sampled_from(["name", "value"]), children)
    ),
    max_leaves=20,
)
NAMES = st.sampled_from(["dev-0", "dev-1", "hot-0", "big-0", "big-0-p2", "Bad_Name", "x" * 70])
QUANTITIES = st.sampled_from(["1Gi", "512Mi", "3", "0", "-1", "1e3", "2.5Gi", "lots", 7, 2**70])
DEVICE = st.fixed_dictionaries(
    {"name": NAMES},
    optional={
        "attributes": st.dictionaries(
            st.sampled_from(["model", "index", "a/b", "type", "Bad Name"]),
            SCALARS | st.dictionaries(st.sampled_from(["int", "string", "version"]), SCALARS),
            max_size=3,
        ),
        "capacity": st.dictionaries(
            st.sampled_from(["memory", "millicores", "bad name"]),
            QUANTITIES
            | st.fixed_dictionaries(
                {"value": QUANTITIES},
                optional={
                    "requestPolicy": st.fixed_dictionaries(
                        {},
                        optional={
                            "default": QUANTITIES,
                            "validValues": st.lists(QUANTITIES, max_size=3),
                            "validRange": st.fixed_dictionaries(
                                {"min": QUANTITIES},
                                optional={"max": QUANTITIES, "step": QUANTITIES},
                            ),
                        },
                    )
                },
            ),
            max_size=2,
        ),
        "partitions": st.fixed_dictionaries(
            {"count": st.integers(min_value=-1, max_value=70)},
            optional={"counters": st.dictionaries(st.sampled_from(["memory", "x"]), QUANTITIES)},
        ),
        "shared": st.booleans() | SCALARS,
    },
)
DEVICE_NAMES = st.lists(NAMES, max_size=3)
CONTROL = st.fixed_dictionaries(
    {},
    optional={
        "add": st.lists(DEVICE, max_size=3) | VALUES,
        "remove": DEVICE_NAMES | VALUES,
        "unhealthy": st.dictionaries(
            NAMES,
            st.text(max_size=10)
            | st.fixed_dictionaries(
                {"message": st.text(max_size=10)},
                optional={"effect": st.sampled_from(["NoSchedule", "NoExecute", "Nope"])},
            ),
            max_size=2,
        ),
        "failPrepare": st.dictionaries(NAMES, SCALARS, max_size=2),
        "failUnprepare": st.dictionaries(NAMES, SCALARS, max_size=2),
        "hangPrepare": st.dictionaries(NAMES, SCALARS, max_size=2),
        "unknown": VALUES,
    },
)
INVENTORY = st.fixed_dictionaries(
    {"devices": st.lists(DEVICE, max_size=4) | VALUES},
    optional={"apiVersion": SCALARS, "kind": SCALARS},
)


def encodings(documents: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """A document as YAML or JSON, or arbitrary bytes."""
    return (
        documents.map(lambda d: yaml.safe_dump(d).encode())
        | documents.map(lambda d: json.dumps(d).encode())
        | st.binary(max_size=200)
        | st.text(max_size=200).map(str.encode)
    )


@given(content=encodings(CONTROL | VALUES))
def test_any_control_file_is_used_whole_or_refused_with_its_name(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as directory:
        control = Path(directory) / "control.yaml"
        hooks = from_objects("fake", dra_backend_fake.plugin.FakePlugin)
        context = node_context(control_file=control, devices=2)
        hooks.start(context)
        try:
            before = hooks.discover(context)
            write_control(control, content.decode("utf-8", errors="replace"))
            control.write_bytes(content)  # the exact bytes, after write_control's new mtime
            try:
                ControlFile(control)._read()
                refused = False
            except ControlError as exc:
                assert str(exc).startswith(f"control file {control}: "), exc
                refused = True
            inventory = hooks.discover(context)  # never raises: a bad file is logged
            validate_inventory(inventory)
            hooks.device_health(inventory, context)
            if refused:
                assert inventory == before
        finally:
            hooks.stop(context)


@given(content=encodings(INVENTORY | VALUES))
def test_any_inventory_file_starts_valid_or_is_refused_with_a_clear_error(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "inventory.yaml"
        path.write_bytes(content)
        try:
            load_file(path)
        except InventoryError as exc:
            assert str(exc).startswith(f"inventory file {path}: "), exc
        hooks = from_objects("fake", dra_backend_fake.plugin.FakePlugin)
        context = node_context(inventory=path)
        try:
            hooks.start(context)
        except HookError as exc:
            assert "fake backend cannot start: " in str(exc), exc
            return
        try:
            validate_inventory(hooks.discover(context))
        finally:
            hooks.stop(context)
