"""The fake backend's opaque configuration (``FakeConfig``), decoded strictly.

A DeviceClass or ResourceClaim passes it as ``opaque.parameters`` with ``opaque.driver`` set to
the driver name::

    {"apiVersion": "fake.dra-core.dev/v1", "kind": "FakeConfig",
     "env": {"GREETING": "hello"}, "failPrepare": false, "sleepSeconds": 0}

Unknown fields and wrong types are errors naming the field. Several configs for one request
merge in precedence order (class configs, then claim configs): ``env`` maps merge, later keys
winning; ``failPrepare`` and ``sleepSeconds`` come from the last config that sets them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dra_core import describe_validation_error

__all__ = ("MAX_SLEEP_SECONDS", "FakeConfig", "decode", "merge")

#: Well under the kubelet's 45 s budget per prepare call.
MAX_SLEEP_SECONDS = 30.0

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class FakeConfig(BaseModel):
    """What a claim may ask of a fake device: extra environment, a failure, a delay."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    apiVersion: Literal["fake.dra-core.dev/v1"]
    kind: Literal["FakeConfig"]
    #: Extra environment variables for the container.
    env: dict[str, str] = Field(default_factory=dict)
    #: Make prepare fail (to exercise a claim's error path).
    failPrepare: bool = False
    #: Sleep this long in prepare (to exercise slow prepares and timeouts).
    sleepSeconds: float = Field(default=0.0, ge=0, le=MAX_SLEEP_SECONDS)

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        for name in env:
            if not _ENV_NAME.fullmatch(name):
                msg = f"{name!r} is not an environment variable name (letters, digits, '_')"
                raise ValueError(msg)
        return env


def decode(parameters: Mapping[str, Any]) -> FakeConfig:
    """Decode one ``opaque.parameters`` object; ValueError names each bad field."""
    if not isinstance(parameters, Mapping):
        msg = (
            f"opaque config for the fake backend must be an object with apiVersion "
            f"'fake.dra-core.dev/v1' and kind 'FakeConfig', not {type(parameters).__name__}"
        )
        raise ValueError(msg)
    try:
        return FakeConfig.model_validate(dict(parameters))
    except ValidationError as exc:
        msg = f"invalid FakeConfig: {describe_validation_error(exc)}"
        raise ValueError(msg) from None


def merge(configs: Iterable[object]) -> FakeConfig | None:
    """The effective config of several, in precedence order; None when none is a FakeConfig."""
    merged: FakeConfig | None = None
    for config in configs:
        if not isinstance(config, FakeConfig):
            continue
        if merged is None:
            merged = config
            continue
        update: dict[str, Any] = {"env": {**merged.env, **config.env}}
        for name in ("failPrepare", "sleepSeconds"):
            if name in config.model_fields_set:
                update[name] = getattr(config, name)
        merged = merged.model_copy(update=update)
    return merged
