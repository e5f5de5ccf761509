"""The source protocol every import source implements (http, s3, upload; registry later).

A source is probed once (size, byte-range support, the final URL after redirects), then read
as a stream of chunks from an offset; a source that serves ranges resumes a broken stream by
itself. `plugin_config` is what the nbdkit plugin needs to read the same bytes by range.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

CHUNK_SIZE = 1 << 20  # big enough to amortise per-chunk overhead, small enough to bound memory
MAX_STREAM_RETRIES = 5


@dataclass(frozen=True, slots=True)
class SourceInfo:
    size: int | None
    ranges: bool
    url: str
    local_path: Path | None = None
    """The source is this local, seekable file (a staged upload): an image that needs
    conversion is converted from it in place instead of being copied to scratch first."""


class Source(Protocol):
    kind: str

    async def probe(self) -> SourceInfo: ...

    def stream(self, offset: int = 0) -> AsyncIterator[bytes]: ...

    def plugin_config(self) -> dict[str, Any]: ...

    async def close(self) -> None: ...
