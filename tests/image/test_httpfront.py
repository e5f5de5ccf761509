"""cdi.image.httpfront / httpwire over real sockets: native requests read by threads, the rest
forwarded to a real aiohttp app in the same process, TLS with client certificates."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from cdi.controller.certs import create_ca, issue_client_cert, issue_server_cert
from cdi.image.httpfront import Exchange, HttpFront, Native
from cdi.image.httpwire import BodyError, RequestHead

HOST = "127.0.0.1"
TIMEOUT = 10.0


@dataclass
class Seen:
    """What the native handler got, for the test to look at."""

    bodies: list[bytes] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    common_names: list[str | None] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)


def _native(seen: Seen) -> Native:
    def handle(exchange: Exchange) -> None:
        seen.common_names.append(exchange.common_name())
        path = exchange.head.path
        if path == "/early":  # refused before reading a byte of the body
            exchange.answer(503, "busy")
            seen.done.set()
            return
        if path == "/boom":
            raise RuntimeError("handler bug")
        parts = []
        try:
            while data := exchange.body.read(4096):
                parts.append(data)
        except BodyError as err:
            seen.errors.append(str(err))
            seen.bodies.append(b"".join(parts))
            seen.done.set()
            return
        seen.bodies.append(b"".join(parts))
        exchange.answer(200, f"got {sum(map(len, parts))}", [("X-Extra", "1")])
        seen.done.set()

    return handle


def _route(seen: Seen) -> object:
    native = _native(seen)

    def route(head: RequestHead) -> Native | None:
        return native if head.path in ("/native", "/early", "/boom") else None

    return route


@dataclass
class Pki:
    server_ctx: ssl.SSLContext
    client_ctx: ssl.SSLContext
    files: Path


def _pki(tmp: Path) -> Pki:
    server_ca = create_ca("front-test-server-ca")
    client_ca = create_ca("front-test-client-ca")
    server = issue_server_cert(server_ca, ["front.test"])
    client = issue_client_cert(client_ca, "front-client")
    for name, data in {
        "server.crt": server.cert,
        "server.key": server.key,
        "client.crt": client.cert,
        "client.key": client.key,
        "server-ca.crt": server_ca.cert,
        "client-ca.crt": client_ca.cert,
    }.items():
        (tmp / name).write_bytes(data)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tmp / "server.crt", tmp / "server.key")
    server_ctx.load_verify_locations(cafile=str(tmp / "client-ca.crt"))
    server_ctx.verify_mode = ssl.CERT_OPTIONAL
    client_ctx = ssl.create_default_context(cafile=str(tmp / "server-ca.crt"))
    client_ctx.load_cert_chain(tmp / "client.crt", tmp / "client.key")
    return Pki(server_ctx, client_ctx, tmp)


@dataclass
class Front:
    front: HttpFront
    seen: Seen
    forwarded_names: list[str | None]

    @property
    def port(self) -> int:
        return self.front.port


async def _start(tls: ssl.SSLContext | None) -> tuple[Front, web.AppRunner]:
    seen = Seen()
    names: list[str | None] = []
    holder: dict[str, HttpFront] = {}

    async def other(request: web.Request) -> web.Response:
        cert = holder["front"].peercert(request.transport)
        subject = dict(x[0] for x in cert["subject"]) if cert else {}
        names.append(subject.get("commonName"))
        body = await request.read()
        return web.Response(text=f"aiohttp {request.method} {request.path} {len(body)}")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", other)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    assert runner.server is not None
    front = HttpFront(
        HOST,
        0,
        tls,
        _route(seen),  # type: ignore[arg-type]
        loop=asyncio.get_running_loop(),
        protocol_factory=runner.server,
        name="test",
    )
    holder["front"] = front
    return Front(front, seen, names), runner


@pytest.fixture
async def plain() -> AsyncIterator[Front]:
    front, runner = await _start(None)
    try:
        yield front
    finally:
        front.front.close()
        await runner.cleanup()


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return _pki(tmp_path)


@pytest.fixture
async def tls_front(pki: Pki) -> AsyncIterator[Front]:
    front, runner = await _start(pki.server_ctx)
    try:
        yield front
    finally:
        front.front.close()
        await runner.cleanup()


# --- a raw client ---------------------------------------------------------------------------


class RawClient:
    def __init__(self, port: int, context: ssl.SSLContext | None = None) -> None:
        sock = socket.create_connection((HOST, port), timeout=TIMEOUT)
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname="front.test")
        self.sock = sock
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def answer(self) -> tuple[int, dict[str, str], bytes]:
        """One answer (skipping 100 Continue)."""
        while True:
            while b"\r\n\r\n" not in self.buffer:
                more = self.sock.recv(65536)
                if not more:
                    raise ConnectionError(f"closed; got {self.buffer!r}")
                self.buffer += more
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            status = int(lines[0].split()[1])
            headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
            if status == 100:
                continue
            length = int(headers.get("content-length", "0"))
            while len(self.buffer) < length:
                more = self.sock.recv(65536)
                if not more:
                    raise ConnectionError("closed inside the body")
                self.buffer += more
            body, self.buffer = self.buffer[:length], self.buffer[length:]
            return status, headers, body

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except (ConnectionError, ssl.SSLError):
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def clients() -> Iterator[list[RawClient]]:
    made: list[RawClient] = []
    yield made
    for client in made:
        client.close()


def _post(path: str, body: bytes, *extra: str) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: x", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


# --- tests ----------------------------------------------------------------------------------


async def test_native_body_and_keep_alive(plain: Front, clients: list[RawClient]) -> None:
    client = RawClient(plain.port)
    clients.append(client)
    body = bytes(range(256)) * 1000

    def exchange() -> None:
        client.send(_post("/native", body))
        assert client.answer()[::2] == (200, b"got 256000")
        client.send(_post("/native", b"again"))  # the same connection
        status, headers, text = client.answer()
        assert (status, text, headers["x-extra"]) == (200, b"got 5", "1")

    await asyncio.to_thread(exchange)
    assert plain.seen.bodies == [body, b"again"]


async def test_chunked_body_with_extensions_and_trailers(
    plain: Front, clients: list[RawClient]
) -> None:
    client = RawClient(plain.port)
    clients.append(client)
    wire = (
        b"POST /native HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    await asyncio.to_thread(client.send, wire)
    status, _, text = await asyncio.to_thread(client.answer)
    assert (status, text) == (200, b"got 11")
    assert plain.seen.bodies == [b"hello world"]


async def test_expect_continue_only_when_the_body_is_read(
    plain: Front, clients: list[RawClient]
) -> None:
    refused = RawClient(plain.port)
    clients.append(refused)
    head = _post("/early", b"")[:-4].replace(b"Content-Length: 0", b"Content-Length: 9999")
    await asyncio.to_thread(refused.send, head + b"\r\nExpect: 100-continue\r\n\r\n")
    status, headers, text = await asyncio.to_thread(refused.answer)
    assert (status, text, headers["connection"]) == (503, b"busy", "close")
    assert await asyncio.to_thread(refused.closed)

    accepted = RawClient(plain.port)
    clients.append(accepted)
    head = _post("/native", b"")[:-4].replace(b"Content-Length: 0", b"Content-Length: 3")
    await asyncio.to_thread(accepted.send, head + b"\r\nExpect: 100-continue\r\n\r\n")

    def continue_then_body() -> bytes:
        while b"\r\n\r\n" not in accepted.buffer:
            accepted.buffer += accepted.sock.recv(4096)
        first, _, accepted.buffer = accepted.buffer.partition(b"\r\n\r\n")
        accepted.send(b"abc")
        return first

    assert (await asyncio.to_thread(continue_then_body)).startswith(b"HTTP/1.1 100")
    assert (await asyncio.to_thread(accepted.answer))[::2] == (200, b"got 3")


async def test_early_answer_reaches_a_client_still_sending(
    plain: Front, clients: list[RawClient]
) -> None:
    """The front reads the rest (lingers) instead of resetting the connection under it."""
    client = RawClient(plain.port)
    clients.append(client)
    body = bytes(8 << 20)

    def send_all_then_read() -> tuple[int, dict[str, str], bytes]:
        client.send(_post("/early", body))
        return client.answer()

    status, _, text = await asyncio.to_thread(send_all_then_read)
    assert (status, text) == (503, b"busy")


async def test_body_cut_hands_out_what_came_then_fails(
    plain: Front, clients: list[RawClient]
) -> None:
    client = RawClient(plain.port)
    clients.append(client)
    await asyncio.to_thread(client.send, _post("/native", b"x" * 10000)[:-4000])
    client.sock.shutdown(socket.SHUT_WR)
    assert await asyncio.to_thread(plain.seen.done.wait, TIMEOUT)
    assert plain.seen.bodies == [b"x" * 6000]
    assert plain.seen.errors and "6000 of 10000" in plain.seen.errors[0]


@pytest.mark.parametrize(
    "head",
    [
        b"GARBAGE\r\n\r\n",
        b"POST /native HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST /native HTTP/1.1\r\nContent-Length: -3\r\n\r\n",
        b"POST /native HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"POST /native HTTP/1.1\r\nbad header\r\n\r\n",
    ],
)
async def test_bad_heads_are_400_and_closed(
    plain: Front, clients: list[RawClient], head: bytes
) -> None:
    client = RawClient(plain.port)
    clients.append(client)
    await asyncio.to_thread(client.send, head)
    status, headers, text = await asyncio.to_thread(client.answer)
    assert status == 400 and text.startswith(b"Bad Request: ")
    assert headers["connection"] == "close"
    assert await asyncio.to_thread(client.closed)
    assert plain.seen.bodies == []


async def test_handler_error_is_500_and_closes(plain: Front, clients: list[RawClient]) -> None:
    client = RawClient(plain.port)
    clients.append(client)
    await asyncio.to_thread(client.send, _post("/boom", b""))
    status, _, text = await asyncio.to_thread(client.answer)
    assert (status, text) == (500, b"internal error")
    assert await asyncio.to_thread(client.closed)


async def test_other_requests_reach_the_aiohttp_app(plain: Front) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.put(f"http://{HOST}:{plain.port}/else?q=1", data=b"12345") as resp:
            assert (resp.status, await resp.text()) == (200, "aiohttp PUT /else 5")
        async with http.get(f"http://{HOST}:{plain.port}/x") as resp:  # kept-alive, forwarded
            assert await resp.text() == "aiohttp GET /x 0"
        # A forwarded connection stays with aiohttp, whatever comes next on it.
        async with http.post(f"http://{HOST}:{plain.port}/native", data=b"ab") as resp:
            assert await resp.text() == "aiohttp POST /native 2"
    async with (
        aiohttp.ClientSession() as http,  # a new connection starts native again
        http.post(f"http://{HOST}:{plain.port}/native", data=b"ab") as resp,
    ):
        assert await resp.text() == "got 2"


async def test_tls_identity_for_native_and_forwarded(
    tls_front: Front, pki: Pki, clients: list[RawClient]
) -> None:
    client = RawClient(tls_front.port, pki.client_ctx)
    clients.append(client)
    await asyncio.to_thread(client.send, _post("/native", b"secret"))
    assert (await asyncio.to_thread(client.answer))[::2] == (200, b"got 6")
    assert tls_front.seen.common_names == ["front-client"]
    connector = aiohttp.TCPConnector(ssl=pki.client_ctx)
    async with aiohttp.ClientSession(connector=connector) as http:
        url = f"https://{HOST}:{tls_front.port}/forwarded"
        async with http.get(url, server_hostname="front.test") as resp:
            assert await resp.text() == "aiohttp GET /forwarded 0"
    assert tls_front.forwarded_names == ["front-client"]
    anonymous = ssl.create_default_context(cafile=str(pki.files / "server-ca.crt"))
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=anonymous)) as http,
        http.get(url, server_hostname="front.test") as resp,
    ):
        assert resp.status == 200
    assert tls_front.forwarded_names == ["front-client", None]


async def test_large_tls_body_is_received_whole(
    tls_front: Front, pki: Pki, clients: list[RawClient]
) -> None:
    client = RawClient(tls_front.port, pki.client_ctx)
    clients.append(client)
    body = bytes(range(256)) * (64 << 10)  # 16 MiB, not a multiple of a TLS record
    body += b"tail"
    await asyncio.to_thread(client.send, _post("/native", body))
    status, _, text = await asyncio.to_thread(client.answer)
    assert (status, text) == (200, f"got {len(body)}".encode())
    assert tls_front.seen.bodies == [body]
