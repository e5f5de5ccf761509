"""Kubernetes resource quantities ("10Gi", "1.5G", "500M", "1e3") as exact numbers.

Owns parsing and formatting only. Parsing is exact (Decimal) and byte counts round up, as the
API server does when it turns a fractional quantity into an integer.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

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
_QUANTITY = re.compile(
    r"^(?P<num>[+-]?(?:\d+(?:\.\d*)?|\.\d+))"
    r"(?:(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE])|(?P<exp>[eE][+-]?\d+))?$"
)


class QuantityError(ValueError):
    """A string that is not a Kubernetes quantity."""


def parse_quantity(text: str) -> Decimal:
    """Parse a quantity exactly: "1.5Gi" -> Decimal(1610612736)."""
    m = _QUANTITY.match(text.strip())
    if not m:
        raise QuantityError(
            f"{text!r} is not a quantity; use a number with an optional suffix "
            "such as 10Gi, 1.5G or 500M"
        )
    try:
        number = Decimal(m["num"])
    except InvalidOperation:  # pragma: no cover - the regex admits only valid decimals
        raise QuantityError(f"{text!r} is not a quantity") from None
    if m["exp"]:
        exponent = int(m["exp"][1:])
        if abs(exponent) > 30:
            raise QuantityError(f"{text!r} has an exponent out of range")
        return number.scaleb(exponent)
    suffix = m["suffix"] or ""
    if suffix in _BINARY:
        return number * _BINARY[suffix]
    return number * _DECIMAL[suffix]


def parse_size(text: str) -> int:
    """A quantity as a whole number of bytes (rounded up), refusing negatives."""
    value = parse_quantity(text)
    if value < 0:
        raise QuantityError(f"{text!r} is negative; a size must be zero or more")
    return math.ceil(value)


def format_size(size: int) -> str:
    """The shortest exact quantity for a byte count: 10737418240 -> "10Gi", 1.5e9 -> "1500M"."""
    if size < 0:
        raise QuantityError("a size must be zero or more")
    if size == 0:
        return "0"
    for suffix in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
        if size % _BINARY[suffix] == 0:
            return f"{size // _BINARY[suffix]}{suffix}"
    for suffix in ("E", "P", "T", "G", "M", "k"):
        unit = int(_DECIMAL[suffix])
        if size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)
