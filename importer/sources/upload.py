"""Upload sources: the bytes of an HTTP request body, or of a staged (resumable) upload.

`BodySource` reads whatever `read(n)` returns (an aiohttp request's `content.read`, or a
multipart part's `read_chunk`) and hands the pipeline chunks of about CHUNK_SIZE. It reads only
when the pipeline asks for more, so the request's own flow control (aiohttp pauses the socket when
its buffer is full) bounds memory whatever the body size. A body the upload server's blocking
front received (`blocking`) is instead read by the pipeline's worker thread itself, straight from
the socket (`blocking_reader`). There are no ranges: an image that needs conversion goes through
scratch, as from an HTTP server without Range support.

`StagedFileSource` reads a local file holding a whole resumable upload; it tells the pipeline the
file's path so that an image that needs conversion is converted from it in place.
"""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError

from importer.errors import ImporterError
from importer.sources.base import CHUNK_SIZE, SourceInfo

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

ReadFn = Callable[[int], Awaitable[bytes]]
# A body that broke off: connection lost, shorter than its Content-Length, bad chunked or
# multipart framing (aiohttp raises ValueError for a malformed multipart body).
_BODY_ERRORS = (
    OSError,
    asyncio.IncompleteReadError,
    HttpProcessingError,
    aiohttp.ClientPayloadError,
    ValueError,
)


class UploadBodyError(ImporterError):
    """The request body ended early or the connection broke: the client's upload is incomplete."""

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(f"Unable to process data: the upload is incomplete: {detail}")


class BlockingBody(Protocol):
    """A request body a thread reads straight from its socket (cdi.image.httpwire.Body)."""

    received: int

    def readinto(self, view: memoryview) -> int: ...


class BodySource:
    kind = "upload"

    def __init__(
        self,
        read: ReadFn,
        size: int | None,
        description: str,
        *,
        blocking: BlockingBody | None = None,
    ) -> None:
        self._read = read
        self._size = size
        self._description = description
        self._blocking = blocking
        self.received = 0

    def blocking_reader(self) -> io.RawIOBase | None:
        """The body as a file for the pipeline's worker thread, when a thread can read it
        from the socket itself: the bytes are decrypted straight into the buffer the pipeline
        hands on, with no event loop hop and no copy in between."""
        if self._blocking is None:
            return None
        return _BodyFile(self, self._blocking)

    async def probe(self) -> SourceInfo:
        return SourceInfo(size=self._size, ranges=False, url=self._description)

    async def stream(self, offset: int = 0) -> AsyncIterator[bytes]:
        if offset:
            raise UploadBodyError("a request body cannot be read again from an offset")
        # Chunks as they arrive are gathered up to CHUNK_SIZE and joined once (one copy; none
        # when a single read already filled it): the per-chunk cost downstream stays low.
        parts: list[bytes] = []
        held = 0
        while True:
            try:
                data = await self._read(CHUNK_SIZE - held)
            except _BODY_ERRORS as err:
                raise UploadBodyError(self._short(str(err) or type(err).__name__)) from err
            if data:
                self.received += len(data)
                parts.append(data)
                held += len(data)
                if self._size is not None and self.received > self._size:
                    raise UploadBodyError(
                        f"the body is longer than its Content-Length {self._size}"
                    )
                if held < CHUNK_SIZE:
                    continue
            if parts:
                chunk = parts[0] if len(parts) == 1 else b"".join(parts)
                parts.clear()
                held = 0
                yield chunk
            if not data:
                break
        if self._size is not None and self.received < self._size:
            raise UploadBodyError(self._short("the body ended"))

    def _short(self, why: str) -> str:
        total = self._size if self._size is not None else "?"
        return f"received {self.received} of {total} bytes ({why})"

    def plugin_config(self) -> dict[str, Any]:
        raise RuntimeError("an upload body cannot be read by range")

    async def close(self) -> None:
        return None


class _BodyFile(io.RawIOBase):
    def __init__(self, source: BodySource, body: BlockingBody) -> None:
        super().__init__()
        self._source = source
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        try:
            n = self._body.readinto(memoryview(buffer).cast("B"))
        except _BODY_ERRORS as err:
            self._source.received = self._body.received
            raise UploadBodyError(self._source._short(str(err) or type(err).__name__)) from err
        self._source.received = self._body.received
        size = self._source._size
        if not n and size is not None and self._source.received < size:
            raise UploadBodyError(self._source._short("the body ended"))
        return n


class StagedFileSource:
    """A complete upload staged in a local file (resumable uploads)."""

    kind = "upload"

    def __init__(self, path: Path, size: int) -> None:
        self._path = path
        self._size = size

    async def probe(self) -> SourceInfo:
        return SourceInfo(
            size=self._size, ranges=False, url=f"staged upload {self._path}", local_path=self._path
        )

    async def stream(self, offset: int = 0) -> AsyncIterator[bytes]:
        fd = await asyncio.to_thread(os.open, self._path, os.O_RDONLY)
        try:
            position = offset
            while position < self._size:
                chunk = await asyncio.to_thread(
                    os.pread, fd, min(CHUNK_SIZE, self._size - position), position
                )
                if not chunk:
                    raise UploadBodyError(
                        f"the staged upload {self._path} holds {position} of {self._size} bytes"
                    )
                position += len(chunk)
                yield chunk
        finally:
            os.close(fd)

    def plugin_config(self) -> dict[str, Any]:
        raise RuntimeError("a staged upload is converted in place, not served by range")

    async def close(self) -> None:
        return None
