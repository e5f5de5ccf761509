"""An HTTPS listener whose bulk requests are served by blocking threads, the rest by aiohttp.

Uploads are big request bodies over TLS. In asyncio every TLS record costs Python calls in the
event loop thread (SSLProtocol, the app protocol, the stream reader), which made that thread the
bottleneck of an upload (2 GiB: aiohttp alone needed 2.5 CPU-s to receive and drop the body, a
blocking ssl socket 1.2). Here each connection gets a thread with a blocking socket; for every
request head `route` says whether a native handler serves it (an upload body, read by the thread
that writes it) or the connection goes to the aiohttp application in this process, over a
socketpair, with the TLS kept here: the aiohttp code keeps serving everything else unchanged
(forms, metrics, unknown paths). A forwarded connection stays forwarded until it closes.

The peer's certificate of a forwarded connection is found with `peercert(transport)`, since the
aiohttp side sees a Unix socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from typing import Any, Final

from cdi.image.httpwire import (
    Body,
    Connection,
    HeadError,
    RequestHead,
    answer_bytes,
)

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT: Final = 30.0
IDLE_TIMEOUT: Final = 75.0  # between requests on a kept-alive connection (aiohttp's default)
STALL_TIMEOUT: Final = 300.0  # no byte of a body, or of forwarded traffic, for this long: cut
LINGER_SECONDS: Final = 10.0  # reading the rest of a body answered early (aiohttp's lingering)
MAX_CONNECTIONS: Final = 256
"""Connections served at once (a thread each); more wait in the listen backlog."""
FORWARD_BUFFER: Final = 1 << 20  # per direction, while the other side is slower
FORWARD_RECV: Final = 256 << 10

PeerCert = dict[str, Any]


class Exchange:
    """One request served by a native handler: what came in, and the one answer it gets."""

    def __init__(
        self, head: RequestHead, body: Body, conn: Connection, peercert: PeerCert | None
    ) -> None:
        self.head = head
        self.body = body
        self.peercert = peercert
        self._conn = conn
        self.answered = False
        self.close_after = False

    def common_name(self) -> str | None:
        for rdn in (self.peercert or {}).get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    return str(value)
        return None

    def answer(
        self,
        status: int,
        body: bytes | str = b"",
        headers: Iterable[tuple[str, str]] = (),
        *,
        length: int | None = None,
    ) -> None:
        """Send the answer (blocking). A body not read to its end closes the connection: the
        rest of it cannot be told from the next request."""
        if self.answered:
            raise RuntimeError("a request is answered once")
        self.answered = True
        data = body.encode() if isinstance(body, str) else body
        self.close_after = self.close_after or not self.head.keep_alive or not self.body.complete
        self._conn.send(
            answer_bytes(
                status,
                data,
                headers,
                close=self.close_after,
                head_only=self.head.method == "HEAD",
                length=length,
            )
        )


Native = Callable[[Exchange], None]
Route = Callable[[RequestHead], Native | None]
"""For a request head: the native handler that serves it, or None to forward to aiohttp."""


class HttpFront:
    """Listens on host:port; `route` picks native handlers; the rest goes to `protocol_factory`
    (an aiohttp `web.Server`, e.g. `AppRunner.server`) on `loop`."""

    def __init__(
        self,
        host: str,
        port: int,
        context: ssl.SSLContext | None,
        route: Route,
        *,
        loop: asyncio.AbstractEventLoop,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        name: str = "http",
    ) -> None:
        self._context = context
        self._route = route
        self._loop = loop
        self._factory = protocol_factory
        self._name = name
        self._forwarded: dict[int, PeerCert | None] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, port), family=family, backlog=128)
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, name=f"{name}-accept", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop accepting; connections in progress end on their own (daemon threads)."""
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() below
        self._listener.close()
        self._thread.join(timeout=5)

    def peercert(self, transport: asyncio.BaseTransport | None) -> PeerCert | None:
        """The TLS peer's certificate of a connection forwarded to aiohttp."""
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None:
            return None
        try:
            key = os.fstat(sock.fileno()).st_ino
        except OSError:
            return None
        with self._lock:
            return self._forwarded.get(key)

    # --- connections -----------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closed.is_set():
            self._slots.acquire()
            try:
                raw, _ = self._listener.accept()
            except OSError as err:
                self._slots.release()
                if self._closed.is_set():
                    return
                log.warning("accept failed error=%s", err)
                self._closed.wait(0.1)  # EMFILE and the like: do not spin
                continue
            threading.Thread(
                target=self._serve_counted, args=(raw,), name=f"{self._name}-conn", daemon=True
            ).start()

    def _serve_counted(self, raw: socket.socket) -> None:
        try:
            self._serve(raw)
        finally:
            self._slots.release()

    def _serve(self, raw: socket.socket) -> None:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.settimeout(HANDSHAKE_TIMEOUT)
        try:
            sock = (
                self._context.wrap_socket(raw, server_side=True)
                if self._context is not None
                else raw
            )
        except (OSError, ValueError) as err:
            log.debug("TLS handshake failed error=%s", err)
            raw.close()
            return
        try:
            peercert = sock.getpeercert() if isinstance(sock, ssl.SSLSocket) else None
            self._requests(Connection(sock), peercert)
        except OSError as err:
            log.debug("connection ended error=%s", err)
        finally:
            with contextlib.suppress(OSError):
                sock.close()

    def _requests(self, conn: Connection, peercert: PeerCert | None) -> None:
        while not self._closed.is_set():
            conn.sock.settimeout(IDLE_TIMEOUT)
            try:
                head = conn.read_head()
            except HeadError as err:
                conn.send(answer_bytes(400, f"Bad Request: {err}".encode(), close=True))
                return
            if head is None:
                return
            conn.sock.settimeout(STALL_TIMEOUT)
            native = self._route(head)
            if native is None:
                self._forward(conn, head, peercert)
                return
            try:
                length = head.framing()
            except HeadError as err:
                conn.send(answer_bytes(400, f"Bad Request: {err}".encode(), close=True))
                return
            expect = head.headers.get("Expect", "").lower() == "100-continue"
            exchange = Exchange(head, Body(conn, length, expect_continue=expect), conn, peercert)
            try:
                native(exchange)
            except Exception:
                log.exception("%s %s failed", head.method, head.path)
                if not exchange.answered:
                    exchange.close_after = True
                    exchange.answer(500, "internal error")
                return
            if not exchange.answered:
                exchange.close_after = True
                exchange.answer(500, "internal error: no answer")
            if exchange.close_after:
                exchange.body.linger(LINGER_SECONDS)
                return

    # --- forwarding to aiohttp -------------------------------------------------------------
    def _forward(self, conn: Connection, head: RequestHead, peercert: PeerCert | None) -> None:
        ours, theirs = socket.socketpair()
        key = os.fstat(theirs.fileno()).st_ino
        with self._lock:
            self._forwarded[key] = peercert
        try:
            handed = asyncio.run_coroutine_threadsafe(
                self._loop.connect_accepted_socket(self._factory, theirs), self._loop
            )
            handed.result(timeout=10)
            _pump(conn.sock, ours, head.raw + conn.take_buffered())
        except (OSError, TimeoutError, RuntimeError) as err:
            log.debug("forwarded connection ended error=%s", err)
        finally:
            with self._lock:
                self._forwarded.pop(key, None)
            ours.close()


def _pump(outer: socket.socket, inner: socket.socket, first: bytes) -> None:
    """Copy both ways between the client (maybe TLS) and the in-process server until the
    server closes, or the client left and the server has nothing more to say."""
    outer.setblocking(False)
    inner.setblocking(False)
    to_inner = bytearray(first)
    to_outer = bytearray()
    outer_eof = inner_eof = inner_shut = False
    while True:
        if inner_eof and not to_outer:
            return
        if outer_eof and not to_inner and not inner_shut:
            with contextlib.suppress(OSError):
                inner.shutdown(socket.SHUT_WR)
            inner_shut = True
        readers = []
        if not outer_eof and len(to_inner) < FORWARD_BUFFER:
            readers.append(outer)
        if not inner_eof and len(to_outer) < FORWARD_BUFFER:
            readers.append(inner)
        writers = [s for s, pending in ((inner, to_inner), (outer, to_outer)) if pending]
        if isinstance(outer, ssl.SSLSocket) and outer in readers and outer.pending():
            ready_r: list[socket.socket] = [outer]
            ready_w: list[socket.socket] = []
        else:
            ready_r, ready_w, _ = select.select(readers, writers, [], STALL_TIMEOUT)
            if not ready_r and not ready_w:
                return
        if outer in ready_r:
            try:
                data = outer.recv(FORWARD_RECV)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                data = None
            except OSError:
                data = b""
            if data is not None:
                if data:
                    to_inner += data
                else:
                    outer_eof = True
        if inner in ready_r:
            try:
                data = inner.recv(FORWARD_RECV)
            except BlockingIOError:
                data = None
            except OSError:
                data = b""
            if data is not None:
                if data:
                    to_outer += data
                else:
                    inner_eof = True
        if inner in ready_w and to_inner:
            try:
                del to_inner[: inner.send(to_inner)]
            except BlockingIOError:
                pass
            except OSError:
                return
        if outer in ready_w and to_outer:
            try:
                del to_outer[: outer.send(to_outer[:FORWARD_RECV])]
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                pass
            except OSError:
                return
