"""Strict JSON (RFC 8259) for what dra-core reads from outside: no NaN or Infinity, no
number out of a float's range, and optionally bounded nesting and number length, checked
before :func:`json.loads` sees the text so that neither becomes a ``RecursionError`` or an
integer conversion error. Errors are :class:`JsonLimitError` (a ``ValueError``) or
:class:`json.JSONDecodeError`.
"""

from __future__ import annotations

import functools
import json
import math
import re
from itertools import accumulate
from typing import Any

__all__ = ("JsonLimitError", "loads")


class JsonLimitError(ValueError):
    """A JSON document that is too deep, has too long a number, or is not JSON at all."""


# A string, or an unterminated one up to the end: the match from a quote never fails, and
# possessive quantifiers never backtrack, so blanking the strings takes linear time whatever
# the input (a pattern that can fail rescans from every later quote: quadratic).
_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+(?:"|\\?\Z)', re.DOTALL)
_NUMBER_CHARS = b"0123456789.eE+-"
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = [0] * 256
for _b in b"[{":
    _STEP[_b] = 1
for _b in b"]}":
    _STEP[_b] = -1


def check_shape(raw: bytes, max_depth: int, max_number_digits: int) -> None:
    """Refuse ``raw`` when it nests deeper than ``max_depth`` or has a longer number.

    Works on the bytes with the strings blanked out, with regular expressions and C-level
    iteration only (no Python code per character): about 0.2 s for 4 MiB of brackets.
    """
    bare = _STRING.sub(b'""', raw)
    for match in _long_number_runs(max_number_digits).finditer(bare):
        digits = len(match.group().translate(None, b".eE+-"))
        if digits > max_number_digits:
            msg = f"the JSON has a number of {digits} digits, over the limit of {max_number_digits}"
            raise JsonLimitError(msg)
    brackets = bare.translate(None, _NOT_BRACKETS)
    deepest = max(accumulate(map(_STEP.__getitem__, brackets)), default=0)
    if deepest > max_depth:
        msg = f"the JSON is nested {deepest} levels deep, over the limit of {max_depth}"
        raise JsonLimitError(msg)


@functools.cache
def _long_number_runs(max_number_digits: int) -> re.Pattern[bytes]:
    """Runs of number characters longer than ``max_number_digits``: only those can hold too
    many digits. (Anchored at the start of a run, or every shorter run would be rescanned
    from each of its characters.)"""
    chars = re.escape(_NUMBER_CHARS)
    return re.compile(b"(?<![%s])[%s]{%d,}" % (chars, chars, max_number_digits + 1))


def _strict_constant(name: str) -> Any:
    msg = f"{name} is not a JSON value"
    raise JsonLimitError(msg)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        msg = f"the number {text} is out of range"
        raise JsonLimitError(msg)
    return value


def loads(
    raw: bytes | str, *, max_depth: int | None = None, max_number_digits: int | None = None
) -> Any:
    """``raw`` decoded as strict JSON; with limits, refused when it nests deeper than
    ``max_depth`` or has a number of more than ``max_number_digits`` digits."""
    if max_depth is not None and max_number_digits is not None:
        check_shape(raw if isinstance(raw, bytes) else raw.encode(), max_depth, max_number_digits)
    return json.loads(raw, parse_constant=_strict_constant, parse_float=_finite_float)
