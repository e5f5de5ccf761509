"""A request served by the upload server's blocking front (cdi.image.httpfront), shaped like the
part of aiohttp's `web.Request` the upload handlers use, so that one handler serves both.

The body is read by threads: `content.read` (for the import pipeline, on the event loop) hops to
a worker thread once per call, and a call fills up to 1 MiB, so the hop is paid per MiB rather
than per TLS record; `content.blocking` is the body itself, for code already running in a thread
(the clone receiver reads it directly).
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from multidict import CIMultiDictProxy

from cdi.image.httpfront import Exchange
from cdi.image.httpwire import Body


class ThreadBody:
    """`read(n)` for coroutines, `blocking` for threads; never both at once (one upload)."""

    def __init__(self, body: Body) -> None:
        self.blocking = body

    async def read(self, n: int = -1) -> bytes:
        return await asyncio.to_thread(self.blocking.read, n if n > 0 else 1 << 20)


class FrontRequest:
    def __init__(self, exchange: Exchange) -> None:
        self._exchange = exchange
        head = exchange.head
        self.method: str = head.method
        self.path: str = head.path
        self.headers: CIMultiDictProxy[str] = head.headers
        self.content_length: int | None = exchange.body.length
        self.content = ThreadBody(exchange.body)

    @property
    def peercert(self) -> dict[str, Any] | None:
        return self._exchange.peercert

    async def send(self, response: web.Response) -> None:
        """Answer now (the upload server exits right after a success: the answer goes first)."""
        await asyncio.to_thread(self.send_blocking, response)

    def send_blocking(self, response: web.Response) -> None:
        if self._exchange.answered:
            return
        body = response.body
        data = body if isinstance(body, bytes | bytearray) else b""
        headers = [(k, v) for k, v in response.headers.items()]
        self._exchange.answer(response.status, bytes(data), headers)
