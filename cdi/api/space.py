"""CDI's space arithmetic: filesystem overhead, 1 MiB alignment, usable and required sizes.

Owns the formulas the controller (to size PVCs) and the workers (to size images) must agree on.
The overhead is a share of the *whole* volume, as CDI computes it (GetRequiredSpace divides by
1 - overhead; GetUsableSpace multiplies by it). reference/cdi.md §5.7 writes `* (1 + overhead)`;
CDI's source says otherwise, and a PVC sized the other way is 0.4 % too small for CDI's importer.
Computed with exact fractions; CDI's float64 arithmetic agrees except in the last byte of
pathological inputs, where ours is the mathematically exact answer.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

MIB = 1 << 20
ALIGNMENT = MIB
DEFAULT_FILESYSTEM_OVERHEAD = "0.06"
MINIMUM_SIZE = MIB

_OVERHEAD = re.compile(r"^(0(\.\d{1,3})?|1)$")


class OverheadError(ValueError):
    """A filesystem overhead that CDI would refuse."""


def parse_overhead(text: str) -> Fraction:
    """Parse a filesystem overhead as CDI accepts it: 0, 1, or 0.x with up to three decimals."""
    if not _OVERHEAD.match(text.strip()):
        raise OverheadError(
            f"filesystem overhead {text!r} is not valid; use a fraction between 0 and 1 with at "
            "most three decimals, such as 0.06"
        )
    return Fraction(text.strip())


def round_up(size: int, alignment: int = ALIGNMENT) -> int:
    return -(-size // alignment) * alignment


def round_down(size: int, alignment: int = ALIGNMENT) -> int:
    return (size // alignment) * alignment


def usable_size(available: int, overhead: Fraction) -> int:
    """Bytes an image may use in a Filesystem volume of `available` bytes.

    usable = roundDown(ceil(available * (1 - overhead)), 1 MiB)
    """
    return round_down(math.ceil(Fraction(available) * (1 - overhead)))


def required_size(size: int, overhead: Fraction) -> int:
    """Bytes to request for a Filesystem volume that must hold an image of `size` bytes.

    required = ceil(roundUp(size, 1 MiB) / (1 - overhead))
    """
    if overhead >= 1:
        raise OverheadError("a filesystem overhead of 1 leaves no room for any image")
    return math.ceil(round_up(size) / (1 - overhead))


def resize_target(*, requested: int, available: int, overhead: Fraction) -> int:
    """Size the raw image is grown to: the usable part of min(free space, requested size)."""
    return usable_size(min(available, requested), overhead)
