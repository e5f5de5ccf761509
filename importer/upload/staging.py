"""Resumable uploads (ours, beyond CDI): the bytes received so far, kept in a staging file.

`PUT` with `Content-Range: bytes START-END/TOTAL` appends at the current offset; the offset is
the staging file's length, so what arrived before a connection was cut (written and fsync'd) is
kept and the client continues from `Upload-Offset`. The total is kept next to it
(`<staging>.json`), so a restarted server (a new container on the same scratch volume) resumes
too. Once the file holds TOTAL bytes it is processed as a POST of the whole file would be.

Where: in scratch (`<CDI_SCRATCH_DIR>/upload.partial`) when scratch is mounted, as it always is
for CDI's upload pods; else, for a Filesystem volume, next to the destination
(`<volume>/.upload.partial`), which then needs room for the staged bytes and the image; a Block
volume without scratch has nowhere to stage, and resumable uploads are refused there.
Memory stays bounded: the body is read and written in chunks of at most CHUNK_SIZE.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from aiohttp import StreamReader

from importer.settings import Paths
from importer.sources.base import CHUNK_SIZE
from importer.sources.upload import ReadFn
from importer.upload.frontrequest import ThreadBody

log = logging.getLogger(__name__)

STAGING_NAME = "upload.partial"
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")


class RangeError(ValueError):
    """A Content-Range header that is missing or makes no sense."""


@dataclass(frozen=True, slots=True)
class ContentRange:
    start: int
    end: int  # inclusive
    total: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    @property
    def last(self) -> bool:
        return self.end + 1 == self.total


def parse_content_range(value: str | None) -> ContentRange:
    m = _CONTENT_RANGE.match((value or "").strip())
    if not m:
        raise RangeError("a resumable PUT needs the header Content-Range: bytes START-END/TOTAL")
    start, end, total = (int(g) for g in m.groups())
    if start > end or end >= total:
        raise RangeError(f"Content-Range {value!r}: needs START <= END < TOTAL")
    return ContentRange(start, end, total)


def staging_path(paths: Paths) -> Path | None:
    if paths.has_scratch:
        return paths.scratch_dir / STAGING_NAME
    if not paths.is_block:
        return paths.data_dir / f".{STAGING_NAME}"
    return None


class Staging:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.meta = path.with_name(path.name + ".json")
        self.total: int | None = None
        self.offset = 0
        self._load()

    def _load(self) -> None:
        try:
            total = json.loads(self.meta.read_text())["total"]
            size = self.path.stat().st_size
        except (OSError, ValueError, KeyError, TypeError):
            self.discard()
            return
        if not isinstance(total, int) or size > total:
            self.discard()
            return
        self.total, self.offset = total, size
        log.info("resumable upload found path=%s offset=%d total=%d", self.path, size, total)

    def begin(self, total: int) -> None:
        """Start a new resumable upload of `total` bytes (forgetting any other)."""
        self.discard()
        self.meta.write_text(json.dumps({"total": total}))
        self.path.touch(0o600)
        self.total = total

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self.meta.unlink(missing_ok=True)
        self.total = None
        self.offset = 0

    async def append(self, read: ReadFn, length: int) -> int:
        """Write up to `length` bytes from `read` at the current offset; returns the count.

        On a broken body the bytes written so far are kept (and fsync'd), then the error is
        raised; the offset always says what the file durably holds."""
        fd = await asyncio.to_thread(os.open, self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        written = 0
        buf = bytearray()
        try:
            # A cut earlier may have left more than the offset says (never fsync'd): drop it.
            await asyncio.to_thread(os.ftruncate, fd, self.offset)
            while written + len(buf) < length:
                data = await read(min(CHUNK_SIZE - len(buf), length - written - len(buf)))
                if not data:
                    break
                buf += data
                if len(buf) >= CHUNK_SIZE:
                    await asyncio.to_thread(_pwrite_all, fd, bytes(buf), self.offset + written)
                    written += len(buf)
                    buf.clear()
        finally:
            # Whatever happened to the body, what arrived is kept and made durable.
            try:
                if buf:
                    await asyncio.to_thread(_pwrite_all, fd, bytes(buf), self.offset + written)
                    written += len(buf)
                await asyncio.to_thread(os.fsync, fd)
            finally:
                os.close(fd)
                self.offset += written
        return written


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def salvaging_reader(content: StreamReader | ThreadBody) -> ReadFn:
    """`content.read`, except that bytes aiohttp had already buffered when the connection broke
    are still returned before the error (its `read` raises first and would drop them): a cut
    resumable chunk keeps everything that arrived."""

    async def read(n: int) -> bytes:
        try:
            return await content.read(n)
        except Exception:
            take = getattr(content, "_read_nowait", None)
            if getattr(content, "_buffer", None) and callable(take):
                data = take(n)
                if isinstance(data, bytes) and data:
                    return data
            raise

    return read
