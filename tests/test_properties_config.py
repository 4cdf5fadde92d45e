"""Opaque configs of both backends, decoded as the core decodes them (the ``dra_decode_config``
hook through :class:`~dra_core.plugins.Hooks`), for any JSON value: a valid config round-trips;
anything else is a ``ValueError`` whose message names the field and says what is wrong, in
plain words, never an unhandled exception and never a library's boilerplate."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from dra_core.hookspecs import NodeContext
from dra_core.plugins import HookError, Hooks, load

FAKE_HEAD = {"apiVersion": "fake.dra-core.dev/v1", "kind": "FakeConfig"}
I915_HEAD = {"apiVersion": "gpu.intel.com/v1alpha1", "kind": "GpuConfig"}
#: The fields each backend's config has besides apiVersion and kind.
FIELDS = {
    "fake": ("env", "failPrepare", "sleepSeconds"),
    "i915": ("vfProfile",),
}
HEADS = {"fake": FAKE_HEAD, "i915": I915_HEAD}
#: What must never reach a user: a library's links, internal prefixes, Python's own words.
BOILERPLATE = (
    "errors.pydantic.dev",
    "For further information",
    "validation error for",
    "Value error,",
    "Assertion failed,",
    "[type=",
    "input_value=",
    "Traceback",
    "set_int_max_str_digits",
)

# ------------------------------------------------------------------ strategies
#: Any text, lone surrogates included (JSON's \ud800 escapes decode to them).
any_text = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=20)
huge_ints = st.sampled_from([2**63, -(2**63) - 1, 10**30, 10**99, -(10**99), 2**1000])
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | huge_ints
    | st.floats(allow_nan=False, allow_infinity=False)
    | any_text
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=12,
)


def nested(depth: int) -> object:
    """``depth`` levels of objects and arrays around an empty object."""
    value: object = {}
    for level in range(depth):
        value = [value] if level % 2 else {"a": value}
    return value


deep_values = st.integers(min_value=1, max_value=400).map(nested)
field_values = json_values | deep_values


# ------------------------------------------------------------------ helpers
@pytest.fixture(scope="module", params=["fake", "i915"])
def backend(request: pytest.FixtureRequest) -> tuple[str, Hooks]:
    return str(request.param), load(str(request.param))


CONTEXT = NodeContext(node_name="node-a", driver_name="")


def decode(hooks: Hooks, parameters: object) -> tuple[object, str | None]:
    """(the decoded config, None) or (None, the error message), as the core sees them."""
    try:
        return hooks.decode_config(parameters, CONTEXT), None  # type: ignore[arg-type]
    except HookError as exc:
        cause = exc.__cause__
        assert isinstance(cause, ValueError), f"{type(cause).__name__} is not a ValueError: {cause}"
        return None, str(cause)


def assert_clear(message: str, echoed: object = ()) -> None:
    """``message`` is one printable line free of boilerplate (what the user wrote aside: the
    field names in ``echoed`` are not counted)."""
    text = message
    for key in sorted(echoed if isinstance(echoed, Mapping) else (), key=len, reverse=True):
        text = text.replace(str(key), "") if key else text
    for words in BOILERPLATE:
        assert words not in text, f"{words!r} in {message!r}"
    assert "\n" not in message and "\r" not in message, f"not one line: {message!r}"
    assert message.isprintable(), f"control characters or lone surrogates in {message!r}"


def assert_refusal(message: str, value: object) -> None:
    """A clear refusal of ``value``: an object's fields are named, anything else is told to be
    an object."""
    assert_clear(message, value)
    if isinstance(value, Mapping):
        assert ": " in message, f"no field and reason in {message!r}"
    else:
        assert "object" in message, message


def names(message: str, field: str) -> bool:
    """Whether ``message`` names ``field``: bare, or quoted as JSON when it must be (a long
    field name that is not valid Unicode by its beginning)."""
    if field and field.isprintable():
        return field in message
    return json.dumps(field)[: 40 if readable(field) else 20] in message


def readable(text: str) -> bool:
    """Whether ``text`` is valid Unicode (no lone surrogate)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def same_number(a: object, b: object) -> bool:
    return isinstance(a, int | float) and isinstance(b, int | float) and math.isclose(a, b)


# ------------------------------------------------------------------ any JSON value
@given(value=json_values)
def test_any_json_value_is_decoded_or_refused_clearly(
    backend: tuple[str, Hooks], value: object
) -> None:
    name, hooks = backend
    config, message = decode(hooks, value)
    if message is None:
        assert isinstance(value, dict) and value.items() >= HEADS[name].items(), config
        return
    assert_refusal(message, value)


@given(value=deep_values)
def test_deeply_nested_config_is_refused_clearly(backend: tuple[str, Hooks], value: object) -> None:
    _, hooks = backend
    config, message = decode(hooks, value)
    assert message is not None, config
    assert_refusal(message, value)


# ------------------------------------------------------------------ near-valid configs
@given(
    field=st.sampled_from(["apiVersion", "kind", *{f for fs in FIELDS.values() for f in fs}])
    | any_text,
    value=field_values,
)
@example(field="vfProfile", value="no-such-profile")  # pydantic's "Value error, " prefix
@example(field="\ud800", value={})  # a field name pydantic cannot read
@example(field="", value=1)  # an empty field name
@example(field="a\nb", value=1)  # a field name that would break the line
def test_one_wrong_field_is_named(backend: tuple[str, Hooks], field: str, value: object) -> None:
    """The right apiVersion and kind with one field (known or not) set to any value: either
    it is valid, or the message names that field."""
    name, hooks = backend
    known = ("apiVersion", "kind", *FIELDS[name])
    parameters = {**HEADS[name], field: value}
    _, message = decode(hooks, parameters)
    if message is None:
        assert field in known, f"unknown field {field!r} accepted"
        return
    assert_clear(message, parameters)
    assert names(message, field), f"{field!r} not named in {message!r}"
    if not readable(field):
        assert "not valid Unicode" in message, message
    elif field not in known:
        assert "unknown field" in message, message


@given(
    extra=st.dictionaries(any_text, field_values, min_size=1, max_size=4),
    missing=st.sampled_from(["", "apiVersion", "kind"]),
)
def test_every_problem_is_named(
    backend: tuple[str, Hooks], extra: dict[str, object], missing: str
) -> None:
    name, hooks = backend
    unknown = {k: v for k, v in extra.items() if k not in (*HEADS[name], *FIELDS[name])}
    parameters: dict[str, object] = {k: v for k, v in HEADS[name].items() if k != missing}
    parameters.update(unknown)
    config, message = decode(hooks, parameters)
    if not unknown and not missing:
        assert message is None, message
        return
    assert message is not None, config
    assert_clear(message, parameters)
    unreadable = [k for k in unknown if not readable(k)]
    if unreadable:  # the object cannot be read at all: that is the one problem named
        assert any(names(message, k) for k in unreadable), message
        assert "not valid Unicode" in message, message
        return
    for field in unknown:
        assert names(message, field), f"{field!r} not named in {message!r}"
    if missing:
        assert f"{missing}: " in message, message


# ------------------------------------------------------------------ valid configs
env_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,15}", fullmatch=True)
fake_configs = st.fixed_dictionaries(
    {k: st.just(v) for k, v in FAKE_HEAD.items()},
    optional={
        "env": st.dictionaries(env_names, st.text(max_size=30), max_size=5),
        "failPrepare": st.booleans(),
        "sleepSeconds": st.floats(min_value=0, max_value=30) | st.integers(0, 30),
    },
)


def _profiles() -> list[str]:
    from dra_backend_i915.profiles import PROFILES

    return sorted(PROFILES)


i915_configs = st.fixed_dictionaries(
    {k: st.just(v) for k, v in I915_HEAD.items()},
    optional={"vfProfile": st.sampled_from(_profiles()) | st.none()},
)
VALID: dict[str, st.SearchStrategy[dict[str, Any]]] = {"fake": fake_configs, "i915": i915_configs}


def dumped(config: object) -> dict[str, Any]:
    dump: Callable[..., dict[str, Any]] = config.model_dump  # type: ignore[attr-defined]
    return dump(mode="json", by_alias=True, exclude_unset=True)


@given(data=st.data())
def test_valid_config_round_trips(backend: tuple[str, Hooks], data: st.DataObject) -> None:
    name, hooks = backend
    parameters = data.draw(VALID[name], label="parameters")
    config, message = decode(hooks, parameters)
    assert message is None, message
    written = dumped(config)
    for key, value in parameters.items():
        assert written[key] == value or same_number(written[key], value), (key, written)
    again, message = decode(hooks, json.loads(json.dumps(written)))
    assert message is None, message
    assert again == config
