"""Checksums given as `algo:hex` (IMPORTER_CHECKSUM), computed on the bytes as they arrive."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

# Hex lengths per algorithm; sha1 is accepted because CDI accepts it (webhook §1.12).
_HEX_LENGTHS = {"md5": 32, "sha1": 40, "sha256": 64, "sha512": 128}


@dataclass(frozen=True, slots=True)
class Checksum:
    algorithm: str
    hexdigest: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hexdigest}"


def parse_checksum(text: str) -> Checksum:
    """Parse `algo:hex`; raises ValueError with advice on anything else."""
    algo, sep, digest = text.strip().partition(":")
    algo = algo.lower()
    digest = digest.lower()
    if not sep or algo not in _HEX_LENGTHS:
        raise ValueError(
            f"{text!r} is not a checksum; use algo:hex with algo one of {', '.join(_HEX_LENGTHS)}"
        )
    if len(digest) != _HEX_LENGTHS[algo] or not re.fullmatch(r"[0-9a-f]+", digest):
        raise ValueError(f"a {algo} checksum is {_HEX_LENGTHS[algo]} hex digits, got {digest!r}")
    return Checksum(algo, digest)


class StreamHasher:
    """Hashes a stream piecewise; `verify()` compares with the expected checksum."""

    def __init__(self, expected: Checksum) -> None:
        self.expected = expected
        self._hash = hashlib.new(expected.algorithm)

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._hash.update(data)

    @property
    def calculated(self) -> Checksum:
        return Checksum(self.expected.algorithm, self._hash.hexdigest())

    def matches(self) -> bool:
        return self.calculated == self.expected
