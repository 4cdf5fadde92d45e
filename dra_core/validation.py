"""Pydantic's validation errors in the project's words: one ``field: problem`` per error.

Backends decode opaque configuration and their own files with pydantic models; the messages
reach users in pod events, admission denials and logs, so they name the field path
(``devices[1].capacity.memory``) and say what is wrong in plain words, without pydantic's
prefixes (``Value error, ``) and documentation links. Pydantic is not imported here: the
function reads the error's ``errors()``, so importing the facade stays cheap.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ("describe_validation_error",)

_PREFIXES = ("Value error, ", "Assertion failed, ")
_UNKNOWN_FIELD = "unknown field (check the spelling; unknown fields are not allowed)"


def describe_validation_error(exc: Any, what: str = "") -> str:
    """``exc`` (a pydantic ``ValidationError``) as one line: ``invalid <what>: `` (when ``what``
    is given) and ``path: problem`` for each error, separated by ``; ``."""
    problems = []
    for error in exc.errors(include_url=False):
        message = str(error["msg"])
        for prefix in _PREFIXES:
            message = message.removeprefix(prefix)
        if error["type"] == "extra_forbidden":
            message = _UNKNOWN_FIELD
        elif error["type"] == "string_unicode":
            message = _not_unicode(error.get("input"))
        problems.append(f"{_path(error['loc'])}: {_printable(message)}")
    described = "; ".join(problems)
    return f"invalid {what}: {described}" if what else described


def _path(location: tuple[str | int, ...]) -> str:
    """``devices[0].name``; ``(top level)`` for the object itself."""
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{_key(part)}" if path else _key(part)
    return path or "(top level)"


def _key(part: str) -> str:
    """A field name as a message shows it: bare, or quoted and escaped as JSON when it is empty
    or holds characters that would break the line (control characters, lone surrogates)."""
    return part if part and part.isprintable() else json.dumps(part)


def _printable(text: str) -> str:
    """``text`` with each character that would break the line escaped (``\\n``)."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _not_unicode(text: object) -> str:
    """Text holding a lone surrogate (JSON's ``\\ud800`` escape), which no UTF-8 file,
    environment or API object can carry; pydantic cannot even read such a field name and fails
    the whole object, so the text itself is shown."""
    shown = json.dumps(text)
    shown = shown if len(shown) <= 80 else f'{shown[:76]}..."'
    return f"text {shown} is not valid Unicode (it holds a lone surrogate such as \\ud800)"
