"""Pydantic's validation errors reach users in the project's words (dra_core.validation)."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from dra_core import describe_validation_error
from dra_core.plugins import HookError


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str

    @field_validator("name")
    @classmethod
    def _lower(cls, value: str) -> str:
        if value != value.lower():
            raise ValueError(f"{value!r} must be lower case")
        return value


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    items: list[Item]


def error(data: object) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        Spec.model_validate(data)
    return caught.value


def test_each_problem_named_by_its_path_in_plain_words():
    text = describe_validation_error(
        error({"items": [{"name": "a"}, {"name": "B", "colour": 1}], "extra": 2}), "Spec"
    )
    assert text.startswith("invalid Spec: ")
    assert "items[1].name: 'B' must be lower case" in text
    assert "items[1].colour: unknown field" in text
    assert "extra: unknown field" in text
    assert "Value error" not in text and "pydantic" not in text and "\n" not in text


def test_odd_field_names_are_quoted_on_one_line():
    text = describe_validation_error(error({"items": [], "bad\nkey": 1}))
    assert '"bad\\nkey": unknown field' in text


def test_a_hook_raising_a_validation_error_reads_the_same():
    cause = error({"items": "no"})
    message = str(HookError("acme", "dra_decode_config", cause))
    assert "items: Input should be a valid list" in message
    assert "errors.pydantic.dev" not in message and "For further information" not in message


def test_the_core_runs_without_pydantic(tmp_path):
    """dra-core does not depend on pydantic: its commands, the agent's modules and the
    checkpoint work with pydantic impossible to import (the backends that use it declare it)."""
    import subprocess
    import sys

    from dra_core.checkpoint import fileformat

    path = tmp_path / fileformat.FILE_NAME
    path.write_bytes(fileformat.snapshot_line({}))
    script = (
        "import sys; sys.modules['pydantic'] = None\n"
        "import dra_core, dra_core.runtime, dra_core.webhook, dra_core.doctor\n"
        "from dra_core.cli import main\n"
        f"sys.exit(main(['checkpoint', 'inspect', '--path', {str(path)!r}]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "status: OK" in result.stdout, result.stdout
