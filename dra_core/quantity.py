"""Kubernetes resource quantities (``"16Gi"``, ``"250m"``, ``"1e3"``) as exact decimals.

The model, the fake backend's sharing arithmetic and the i915 memory figures all need to
compare and add quantities; this module parses the API's canonical forms without importing
the kubernetes client.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

__all__ = ("QuantityError", "format_bytes", "parse_quantity")


class QuantityError(ValueError):
    """A string is not a Kubernetes quantity."""


_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": Decimal(1),
    "k": Decimal("1e3"),
    "M": Decimal("1e6"),
    "G": Decimal("1e9"),
    "T": Decimal("1e12"),
    "P": Decimal("1e15"),
    "E": Decimal("1e18"),
}
_FORM = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+))(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?\d+)?$")


def parse_quantity(text: str) -> Decimal:
    """The value of a quantity string, exactly; raise QuantityError naming the bad input."""
    match = _FORM.match(text.strip()) if isinstance(text, str) else None
    if match is None:
        msg = f"{text!r} is not a Kubernetes quantity (e.g. '16Gi', '500m', '1000')"
        raise QuantityError(msg)
    number, suffix = match.group(1), match.group(2) or ""
    try:
        value = Decimal(number)
    except InvalidOperation:  # pragma: no cover - the pattern admits only decimals
        msg = f"{text!r} is not a Kubernetes quantity"
        raise QuantityError(msg) from None
    if suffix in _BINARY:
        return value * _BINARY[suffix]
    if suffix[:1] in ("e", "E"):
        return value.scaleb(int(suffix[1:]))
    return value * _DECIMAL[suffix]


def format_bytes(value: int) -> str:
    """A byte count in the largest binary unit that divides it exactly (``"4000Mi"``)."""
    for suffix in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
        unit = _BINARY[suffix]
        if value and value % unit == 0:
            return f"{value // unit}{suffix}"
    return str(value)
