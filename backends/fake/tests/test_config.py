"""Opaque configuration: strict decoding with errors naming the field, and merging."""

from __future__ import annotations

import pytest
from dra_backend_fake.config import FakeConfig, decode, merge
from dra_backend_fake.testing import node_context

from dra_core.plugins import HookError

GOOD = {"apiVersion": "fake.dra-core.dev/v1", "kind": "FakeConfig"}


def test_decode_full_config():
    config = decode({**GOOD, "env": {"K": "V"}, "failPrepare": True, "sleepSeconds": 1.5})
    assert config == FakeConfig(**GOOD, env={"K": "V"}, failPrepare=True, sleepSeconds=1.5)
    assert decode({**GOOD, "sleepSeconds": 2}).sleepSeconds == 2.0


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        ({**GOOD, "colour": "red"}, "colour: unknown field"),
        ({**GOOD, "env": {"K": 1}}, "env.K: Input should be a valid string"),
        ({**GOOD, "env": {"1BAD": "x"}}, "env: '1BAD' is not an environment variable name"),
        ({**GOOD, "failPrepare": "yes"}, "failPrepare: Input should be a valid boolean"),
        ({**GOOD, "sleepSeconds": "1"}, "sleepSeconds: Input should be a valid number"),
        ({**GOOD, "sleepSeconds": 31}, "sleepSeconds: Input should be less than or equal to 30"),
        ({**GOOD, "sleepSeconds": -1}, "sleepSeconds: Input should be greater than or equal to 0"),
        ({"kind": "FakeConfig"}, "apiVersion: Field required"),
        ({**GOOD, "apiVersion": "v1"}, "apiVersion: Input should be 'fake.dra-core.dev/v1'"),
        ({**GOOD, "kind": "GpuConfig"}, "kind: Input should be 'FakeConfig'"),
    ],
)
def test_bad_config_names_the_field(parameters, expected):
    with pytest.raises(ValueError, match="invalid FakeConfig") as info:
        decode(parameters)
    assert expected in str(info.value)


def test_not_an_object():
    with pytest.raises(ValueError, match="must be an object"):
        decode(["not", "a", "mapping"])  # type: ignore[arg-type]


def test_merge_later_wins_for_set_fields_and_env_merges():
    first = decode({**GOOD, "env": {"A": "1", "B": "1"}, "failPrepare": True, "sleepSeconds": 3})
    second = decode({**GOOD, "env": {"B": "2"}, "failPrepare": False})
    merged = merge([first, "not a FakeConfig", second])
    assert merged is not None
    assert merged.env == {"A": "1", "B": "2"}
    assert merged.failPrepare is False
    assert merged.sleepSeconds == 3  # not set by the second
    assert merge([]) is None


def test_decode_through_the_hook(hooks):
    context = node_context()
    assert hooks.decode_config({**GOOD, "env": {"X": "y"}}, context).env == {"X": "y"}
    with pytest.raises(HookError, match="failPrepare: Input should be a valid boolean"):
        hooks.decode_config({**GOOD, "failPrepare": 1}, context)
