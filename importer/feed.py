"""A bounded hand-off from the async side (network) to the sync side (decompress, inspect, write).

The producer is a coroutine that `put`s chunks; the consumer is a thread that reads the feed as a
file (`readinto`). At most `maxsize` chunks wait in between, so memory is bounded whatever the
image size. Either side can stop the other: `close()` from the consumer makes `put` return False;
`finish(error)` from the producer makes the consumer's next read raise that error.
"""

from __future__ import annotations

import asyncio
import io
import queue
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

_EOF = object()
_POLL_SECONDS = 0.002  # short: the consumer drains a 1 MiB chunk in about a millisecond


class FeedClosed(Exception):
    """The consumer stopped reading; the producer should stop producing."""


class ChunkFeed(io.RawIOBase):
    def __init__(self, maxsize: int = 8) -> None:
        super().__init__()
        self._queue: queue.Queue[object] = queue.Queue(maxsize)
        self._current = memoryview(b"")
        self._consumer_closed = False
        self._done = False

    # --- producer (event loop) ---------------------------------------------------------------
    async def put(self, chunk: bytes) -> bool:
        while not self._consumer_closed:
            try:
                self._queue.put_nowait(chunk)
                return True
            except queue.Full:
                await asyncio.sleep(_POLL_SECONDS)
        return False

    async def finish(self, error: BaseException | None = None) -> None:
        item = _EOF if error is None else error
        while not self._consumer_closed:
            try:
                self._queue.put_nowait(item)
                return
            except queue.Full:
                await asyncio.sleep(_POLL_SECONDS)

    @property
    def consumer_closed(self) -> bool:
        return self._consumer_closed

    # --- consumer (thread) -------------------------------------------------------------------
    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        out = memoryview(buffer).cast("B")
        while not self._current:
            if self._done:
                return 0
            item = self._queue.get()
            if item is _EOF:
                self._done = True
                return 0
            if isinstance(item, BaseException):
                self._done = True
                raise item
            assert isinstance(item, bytes)
            self._current = memoryview(item)
        n = min(len(out), len(self._current))
        out[:n] = self._current[:n]
        self._current = self._current[n:]
        return n

    def close(self) -> None:
        self._consumer_closed = True
        # Unblock a producer waiting on a full queue.
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        super().close()


class ReplayReader(io.RawIOBase):
    """Records what is read until `rewind()`, then replays it before reading on (bounded)."""

    def __init__(self, inner: io.RawIOBase, limit: int) -> None:
        super().__init__()
        self._inner = inner
        self._limit = limit
        self._recorded: bytearray | None = bytearray()
        self._replay = memoryview(b"")

    def readable(self) -> bool:
        return True

    def rewind(self) -> None:
        if self._recorded is None:
            raise RuntimeError("rewind() works once")
        self._replay = memoryview(bytes(self._recorded))
        self._recorded = None

    def readinto(self, buffer: WriteableBuffer) -> int:
        out = memoryview(buffer).cast("B")
        if self._replay:
            n = min(len(out), len(self._replay))
            out[:n] = self._replay[:n]
            self._replay = self._replay[n:]
            return n
        n = self._inner.readinto(out) or 0
        if self._recorded is not None:
            if len(self._recorded) + n > self._limit:
                raise RuntimeError("recorded more than the replay limit")
            self._recorded += out[:n]
        return n
