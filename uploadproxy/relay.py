"""The proxy's data path: an upload relayed by one blocking thread (cdi.image.httpfront).

Every request on the upload paths, and /healthz, is served here; requests from browsers (an
`Origin` header: CORS) and unknown paths by the aiohttp app in `uploadproxy.app`, which the
front forwards to. The checks are the app's own, in CDI's order, run on the event loop (token, PVC
readiness, path, address, TLS material); then the thread connects to the upload server with
mutual TLS and copies the body with `readinto`/`sendall` on blocking sockets, so OpenSSL does
the decrypting and encrypting with the GIL released and memory stays at one chunk.

The request head goes upstream with `Expect: 100-continue`: an upload server that refuses at
once (busy, finished) answers before any body byte moves, and its answer reaches the client
while the client still waits to send. A failure before the upload server answered is CDI's
502 "error in upload-proxy: ..."; a client whose body breaks off gets 400; a TLS failure
while connecting is retried once with freshly read material.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

from aiohttp import hdrs

from cdi.image.httpfront import Exchange, Native
from cdi.image.httpwire import (
    Body,
    BodyError,
    Connection,
    HeadError,
    RequestHead,
    ResponseHead,
)
from uploadproxy.errors import Rejection
from uploadproxy.settings import ProxySettings
from uploadproxy.target import UPLOAD_PATHS, Endpoint
from uploadproxy.upstream import (
    REQUEST_HEADERS,
    RESPONSE_SKIP,
    Forwarder,
    Transfer,
    is_tls_failure,
    log_request,
)

log = logging.getLogger(__name__)

HEALTHZ_PATH: Final = "/healthz"
CONTINUE_WAIT: Final = 5.0
"""Seconds to wait for the upload server's `100 Continue` before sending the body anyway (a
server that ignores Expect still gets the body, a little later)."""
ANSWER_LIMIT: Final = 1 << 20  # upload servers answer a line of text
STALL_TIMEOUT: Final = 300.0  # an upload server taking no body byte for this long: 502
EARLY_ANSWER_WAIT: Final = 2.0  # after a failed send: how long to look for the server's answer

T = TypeVar("T")
Locate = Callable[[Mapping[str, str], str, str, Transfer], Awaitable[Endpoint]]
"""The app's checks for (headers, path, query): the upload server's endpoint, or Rejection."""


@dataclass(frozen=True)
class _Target:
    pod_name: str
    host: str
    port: int
    target: str  # path and query on the upload server
    server_hostname: str
    context: ssl.SSLContext


class Relay:
    """`route` for the proxy's HttpFront: which requests this thread-side path serves."""

    def __init__(
        self,
        settings: ProxySettings,
        forwarder: Forwarder,
        locate: Locate,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._settings = settings
        self._forwarder = forwarder
        self._locate = locate
        self._loop = loop

    def route(self, head: RequestHead) -> Native | None:
        # A connection handed to aiohttp stays there, so every request a client like virtctl
        # sends on its kept-alive connection (HEAD first, then the upload) is served here.
        if hdrs.ORIGIN in head.headers:
            return None  # browsers: the app adds the CORS headers and answers preflights
        if head.path == HEALTHZ_PATH:
            return _healthz
        if head.path not in UPLOAD_PATHS:
            return None
        return self.serve

    def serve(self, exchange: Exchange) -> None:
        head = exchange.head
        transfer = Transfer()
        started = time.monotonic()
        status = 500
        detail = ""
        try:
            target = self._on_loop(self._target(head, transfer))
            status = self._relay(exchange, target, transfer)
        except Rejection as err:
            status = err.status
            if status >= 500:
                detail = f" error={err.text!r}"
            headers = [("Content-Type", "text/plain; charset=utf-8")] if err.text else []
            if not exchange.answered:
                exchange.answer(err.status, err.text, headers)
        finally:
            log_request(head.method, head.path, status, transfer, started=started, detail=detail)

    # --- on the event loop -----------------------------------------------------------------
    def _on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _target(self, head: RequestHead, transfer: Transfer) -> _Target:
        query = head.target.partition("?")[2]
        endpoint = await self._locate(head.headers, head.path, query, transfer)
        context = await self._forwarder.tls.context()
        url = urlsplit(endpoint.url)
        assert url.hostname is not None
        target = url.path + (f"?{url.query}" if url.query else "")
        return _Target(
            endpoint.pod_name,
            url.hostname,
            url.port or self._settings.upstream_port,
            target,
            endpoint.server_hostname,
            context,
        )

    async def _fresh_context(self) -> ssl.SSLContext:
        self._forwarder.tls.invalidate()
        return await self._forwarder.tls.context()

    # --- in the connection's thread --------------------------------------------------------
    def _relay(self, exchange: Exchange, target: _Target, transfer: Transfer) -> int:
        deadline = time.monotonic() + self._settings.upstream_timeout
        upstream = self._connect(target)
        try:
            conn = Connection(upstream)
            body = exchange.body
            try:
                upstream.sendall(self._head(exchange.head, target, body))
            except OSError as err:
                raise self._failed(target, err) from None
            answer: ResponseHead | None = None
            if body.length != 0:
                upstream.settimeout(CONTINUE_WAIT)
                answer = self._interim(conn, target)
                if answer is None:
                    answer = self._send_body(body, conn, target, transfer)
            upstream.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                while answer is None or 100 <= answer.status < 200:
                    answer = conn.read_response_head()
                data, cut = self._answer_body(conn, answer, exchange.head.method)
            except (OSError, HeadError) as err:
                raise self._failed(target, err) from None
            if answer.status == 401:
                self._loop.call_soon_threadsafe(self._forwarder.tls.invalidate)
            headers = [(k, v) for k, v in answer.headers.items() if k.lower() not in RESPONSE_SKIP]
            transfer.received = len(data)
            if cut is not None:
                # As a streaming proxy would: the status and what came, then the cut.
                transfer.answer_error = cut
                exchange.close_after = True
                exchange.answer(answer.status, data, headers, length=len(data) + 1)
            else:
                exchange.answer(answer.status, data, headers)
            return answer.status
        finally:
            upstream.close()

    def _connect(self, target: _Target) -> socket.socket:
        context = target.context
        for attempt in range(2):
            try:
                sock = socket.create_connection(
                    (target.host, target.port), timeout=self._settings.upstream_connect_timeout
                )
            except OSError as err:
                raise self._failed(target, err) from None
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return context.wrap_socket(sock, server_hostname=target.server_hostname)
            except OSError as err:
                sock.close()
                if is_tls_failure(err) and attempt == 0:
                    log.info(
                        "TLS to the upload server failed (%s); reading the material again", err
                    )
                    context = self._on_loop(self._fresh_context())
                    continue
                if is_tls_failure(err):
                    self._loop.call_soon_threadsafe(self._forwarder.tls.invalidate)
                raise self._failed(target, err) from None
        raise AssertionError("unreachable")

    def _head(self, head: RequestHead, target: _Target, body: Body) -> bytes:
        """The request line and the headers an upload server reads (never Authorization)."""
        lines = [
            f"{head.method} {target.target} HTTP/1.1",
            f"Host: {target.server_hostname}:{self._settings.upstream_port}",
        ]
        for name in REQUEST_HEADERS:
            if name == "Content-Length":
                continue
            if value := head.headers.get(name):
                lines.append(f"{name}: {value}")
        if body.length is None:
            lines.append("Transfer-Encoding: chunked")
        elif body.length or "Content-Length" in head.headers:
            lines.append(f"Content-Length: {body.length}")
        if body.length != 0:
            lines.append("Expect: 100-continue")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _interim(self, conn: Connection, target: _Target) -> ResponseHead | None:
        """None once the server said 100 Continue (or kept silent); else its final answer."""
        try:
            answer = conn.read_response_head()
        except TimeoutError:
            return None
        except (OSError, HeadError) as err:
            raise self._failed(target, err) from None
        return None if answer.status == 100 else answer

    def _send_body(
        self, body: Body, conn: Connection, target: _Target, transfer: Transfer
    ) -> ResponseHead | None:
        """Copy the client's body upstream; an answer the server gave early, if it did.

        One thread reads and sends in turn: two threads (one decrypting, one encrypting, a
        few buffers in between) were measured no faster here and used more CPU."""
        transfer.started = True
        chunked = body.length is None
        upstream = conn.sock
        upstream.settimeout(STALL_TIMEOUT)
        buffer = bytearray(self._settings.chunk_size)
        with memoryview(buffer) as view:
            while True:
                try:
                    n = body.readinto(view)
                except BodyError as err:
                    transfer.client_error = str(err)
                    raise Rejection(
                        400, f"error in upload-proxy: reading the upload failed: {err}"
                    ) from None
                try:
                    if chunked:
                        upstream.sendall(b"%x\r\n" % n)
                    if n:
                        upstream.sendall(view[:n])
                        transfer.sent += n
                    if chunked:
                        upstream.sendall(b"\r\n")
                except OSError as err:
                    return self._early_answer(conn, target, err)
                if not n:
                    return None

    def _early_answer(self, conn: Connection, target: _Target, err: OSError) -> ResponseHead:
        """The server stopped taking the body: it may have answered why (too large, busy)."""
        conn.sock.settimeout(EARLY_ANSWER_WAIT)
        try:
            return conn.read_response_head()
        except (OSError, HeadError):
            raise self._failed(target, err) from None

    def _answer_body(
        self, conn: Connection, answer: ResponseHead, method: str
    ) -> tuple[bytes, str | None]:
        """The answer's body, and why it broke off if it did."""
        length = answer.framing(method)
        if length == -1:
            return conn.read_until_close(ANSWER_LIMIT), None
        if length is not None and length > ANSWER_LIMIT:
            raise HeadError(f"an answer body of {length} bytes")
        reader = Body(conn, length, expect_continue=False)
        data = reader.read(ANSWER_LIMIT + 1)
        if len(data) > ANSWER_LIMIT:
            raise HeadError(f"an answer body longer than {ANSWER_LIMIT} bytes")
        if not reader.complete:
            try:
                reader.read(1)
            except OSError as err:
                return data, str(err)
            return data, "the answer ended early"
        return data, None

    def _failed(self, target: _Target, err: BaseException) -> Rejection:
        what = "timed out" if isinstance(err, TimeoutError) else str(err)
        return Rejection(
            502,
            f"error in upload-proxy: the upload server {target.pod_name} failed: "
            f"{what or type(err).__name__}",
        )


def _healthz(exchange: Exchange) -> None:
    exchange.answer(200, "OK")
