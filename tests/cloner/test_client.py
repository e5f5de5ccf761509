"""The cloner's sender (`cloner.client.send` with `cloner.stream.Body`) against small servers of
our own on 127.0.0.1, over real sockets and real mutual TLS (cdi.controller.certs): what goes on
the wire, and every way the exchange can end."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pytest
from yarl import URL

from cdi.api.tokens import UPLOAD_CLIENT_NAME
from cdi.controller.certs import KeyPair, create_ca, issue_client_cert, issue_server_cert
from cloner import client, stream
from cloner.client import ClientTls, clone_headers, send
from cloner.errors import CloneError, SettingsError
from cloner.settings import CloneSettings, Tls
from cloner.stream import Body, Counts

MIB = 1 << 20
SERVICE = "cdi-upload-tgt.ns.svc"  # what the URL names: the certificate's name, resolvable by none
TIMEOUT = 10.0  # every blocking step of the test servers
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\nConnection: close\r\n\r\nUpload Complete"

pytestmark = pytest.mark.timeout(30)


# --- certificates ---------------------------------------------------------------------------------


@dataclass
class Pki:
    server_ca: KeyPair
    client_ca: KeyPair
    server: KeyPair
    client: KeyPair


@pytest.fixture(scope="module")
def pki() -> Pki:
    server_ca = create_ca("cdi-uploadserver-signer")
    client_ca = create_ca("cdi-uploadserver-client-signer")
    return Pki(
        server_ca=server_ca,
        client_ca=client_ca,
        server=issue_server_cert(server_ca, [SERVICE]),
        client=issue_client_cert(client_ca, UPLOAD_CLIENT_NAME),
    )


def tls_of(pki: Pki, server_ca: KeyPair | None = None) -> Tls:
    return Tls(
        client_cert=pki.client.cert.decode(),
        client_key=pki.client.key.decode(),
        server_ca=(server_ca or pki.server_ca).cert.decode(),
    )


def server_context(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    """What the upload server does: its certificate, client certificates of the client CA."""
    directory = tmp_path_factory.mktemp("server-pki")
    files = {"tls.crt": pki.server.cert, "tls.key": pki.server.key, "ca.crt": pki.client_ca.cert}
    for name, data in files.items():
        (directory / name).write_bytes(data)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(directory / "ca.crt"))
    context.load_cert_chain(str(directory / "tls.crt"), str(directory / "tls.key"))
    context.verify_mode = ssl.CERT_REQUIRED
    return context


@pytest.fixture(scope="module")
def tls_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    return server_context(pki, tmp_path_factory)


@pytest.fixture(scope="module")
def tls_client(pki: Pki) -> ssl.SSLContext:
    return ClientTls(tls_of(pki)).context


# --- a server of our own --------------------------------------------------------------------------


@dataclass
class Request:
    """What one connection brought: the request head, the decoded body, and whether the chunked
    body ended with its last chunk (False: cut)."""

    line: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    complete: bool = False
    error: str = ""


Handler = Callable[[socket.socket, BinaryIO, Request], None]


class Server:
    """Accepts connections on 127.0.0.1 in a thread, TLS if given a context, and lets `handler`
    answer each one after the request head is read."""

    def __init__(self, handler: Handler, context: ssl.SSLContext | None) -> None:
        self.handler = handler
        self.context = context
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port: int = self.listener.getsockname()[1]
        self.requests: list[Request] = []
        self.head_seen = threading.Event()
        self.done = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            request = Request()
            try:
                self._one(conn, request)
            except (OSError, ValueError) as err:
                request.error = f"{type(err).__name__}: {err}"
            finally:
                conn.close()
                if request.line:  # not the client's probe that we listen
                    self.done.set()

    def _one(self, conn: socket.socket, request: Request) -> None:
        conn.settimeout(TIMEOUT)
        if self.context is not None:
            conn = self.context.wrap_socket(conn, server_side=True)
        with conn, conn.makefile("rb") as f:
            request.line = f.readline().decode().rstrip("\r\n")
            if not request.line:
                return
            self.requests.append(request)
            while line := f.readline().decode().rstrip("\r\n"):
                name, _, value = line.partition(":")
                request.headers[name.strip().lower()] = value.strip()
            self.head_seen.set()
            self.handler(conn, f, request)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)
        self.listener.close()


@pytest.fixture
def serve() -> Iterator[Callable[[Handler, ssl.SSLContext | None], Server]]:
    servers: list[Server] = []

    def start(handler: Handler, context: ssl.SSLContext | None) -> Server:
        servers.append(Server(handler, context))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def read_chunked(f: BinaryIO, request: Request, *, limit: int | None = None) -> None:
    """The chunked body into `request` (strictly framed), up to `limit` bytes if given."""
    while limit is None or len(request.body) < limit:
        size_line = f.readline()
        if not size_line:
            return  # cut between chunks
        size = int(size_line.strip(), 16)
        if size == 0:
            assert f.readline() == b"\r\n"  # no trailers
            request.complete = True
            return
        data = f.read(size)
        request.body += data
        if len(data) < size:
            return  # cut inside a chunk
        end = f.read(2)
        if len(end) < 2:
            return  # cut after a chunk's data
        assert end == b"\r\n", "a chunk must end with CRLF"


def receive_all(conn: socket.socket, f: BinaryIO, request: Request) -> None:
    try:
        read_chunked(f, request)
    except (OSError, ValueError) as err:  # a cut TLS stream may end in an error
        request.error = f"{type(err).__name__}: {err}"
    if request.complete:
        conn.sendall(OK)


def refuse_after(status: int, text: str, *, linger: bool) -> Handler:
    """Read 1 MiB, answer, then close at once (unread data: a reset), or with `linger` go on
    reading and discarding as aiohttp's server does for a while."""

    def handle(conn: socket.socket, f: BinaryIO, request: Request) -> None:
        read_chunked(f, request, limit=MIB)
        body = text.encode()
        head = f"HTTP/1.1 {status} Refused\r\nContent-Length: {len(body)}\r\n\r\n"
        conn.sendall(head.encode() + body)
        if linger:
            read_chunked(f, request)

    return handle


def drop_after(length: int) -> Handler:
    def handle(conn: socket.socket, f: BinaryIO, request: Request) -> None:
        read_chunked(f, request, limit=length)

    return handle


# --- the client side ------------------------------------------------------------------------------


def settings_for(server: Server, *, tls: bool, connect_wait: float = 5.0) -> CloneSettings:
    if tls:  # as on a cluster: the Service's name in the URL, the pod's address to connect to
        return CloneSettings(
            upload_url=URL(f"https://{SERVICE}:8443/v1beta1/upload"),
            server_address=("127.0.0.1", server.port),
            metrics_addr=None,
            connect_wait=connect_wait,
        )
    return CloneSettings(
        upload_url=URL(f"http://127.0.0.1:{server.port}/v1beta1/upload"),
        metrics_addr=None,
        connect_wait=connect_wait,
    )


def body_of(chunks: Iterator[bytes]) -> tuple[Body, Counts]:
    counts = Counts()
    return Body(chunks, counts, lambda: None), counts


async def post(
    settings: CloneSettings, context: ssl.SSLContext | None, chunks: Iterator[bytes]
) -> tuple[str, Counts]:
    body, counts = body_of(chunks)
    try:
        answer = await asyncio.wait_for(
            send(settings, context, body, clone_headers(settings)), TIMEOUT
        )
    finally:
        body.close()
    return answer, counts


def repeated(piece: bytes, times: int) -> Iterator[bytes]:
    for _ in range(times):
        yield piece


def mixed_chunks() -> list[bytes]:
    """Sizes around every framing case: empty (never sent), tiny, just under and over the
    small-chunk buffer, and large."""
    sizes = [16, 0, 1, 5000, client.SMALL_CHUNK - 1, client.SMALL_CHUNK, 16, 4 * MIB, 3, 0, MIB]
    sizes += [16, 100_000] * 20
    return [os.urandom(n) for n in sizes]


# --- success --------------------------------------------------------------------------------------


@pytest.mark.parametrize("tls", [True, False], ids=["https", "http"])
async def test_the_body_arrives_chunked_with_the_clone_headers(
    serve: Callable[[Handler, ssl.SSLContext | None], Server],
    tls_server: ssl.SSLContext,
    tls_client: ssl.SSLContext,
    tls: bool,
) -> None:
    server = serve(receive_all, tls_server if tls else None)
    settings = settings_for(server, tls=tls)
    chunks = mixed_chunks()
    answer, counts = await post(settings, tls_client if tls else None, iter(chunks))
    assert answer == "Upload Complete"
    expected = b"".join(chunks)
    assert counts.wire == len(expected)
    server.done.wait(TIMEOUT)
    [request] = server.requests
    assert request.error == ""
    assert request.complete
    assert request.body == expected
    assert request.line == "POST /v1beta1/upload HTTP/1.1"
    headers = request.headers
    assert headers["host"] == (f"{SERVICE}:8443" if tls else f"127.0.0.1:{server.port}")
    assert headers["transfer-encoding"] == "chunked"
    assert "content-length" not in headers
    assert headers["connection"] == "close"
    assert headers["content-type"] == "application/octet-stream"
    assert headers["x-cdi-content-type"] == "blockdevice-clone"
    assert headers["x-cdi-clone-encoding"] == "extents-v1"
    assert headers["x-cdi-preallocation"] == "false"


# --- refusals and broken streams ------------------------------------------------------------------


@pytest.mark.parametrize("linger", [False, True], ids=["close", "linger"])
async def test_an_early_answer_is_reported_with_the_servers_text(
    serve: Callable[[Handler, ssl.SSLContext | None], Server],
    tls_server: ssl.SSLContext,
    tls_client: ssl.SSLContext,
    linger: bool,
) -> None:
    text = "the clone source is 67108864 bytes\nbut the target holds only 33554432 bytes"
    server = serve(refuse_after(400, text, linger=linger), tls_server)
    settings = settings_for(server, tls=True)
    total = 2048  # MiB: far more than the server reads or the sockets buffer
    with pytest.raises(CloneError) as caught:
        await post(settings, tls_client, repeated(os.urandom(MIB), total))
    assert str(caught.value) == (
        "the upload server answered HTTP 400: the clone source is 67108864 bytes "
        "but the target holds only 33554432 bytes"
    )
    server.done.wait(TIMEOUT)
    # Seen between chunks, the answer stopped the stream long before its end.
    assert len(server.requests[0].body) < total * MIB // 4
    assert not server.requests[0].complete


async def test_a_long_answer_is_cut_to_one_line(
    serve: Callable[[Handler, ssl.SSLContext | None], Server],
    tls_server: ssl.SSLContext,
    tls_client: ssl.SSLContext,
) -> None:
    server = serve(refuse_after(507, "no room\r\n" + "x" * 5000, linger=False), tls_server)
    with pytest.raises(CloneError) as caught:
        await post(settings_for(server, tls=True), tls_client, repeated(bytes(MIB), 64))
    message = str(caught.value)
    assert message.startswith("the upload server answered HTTP 507: no room xxx")
    assert len(message) == len("the upload server answered HTTP 507: ") + client.ERROR_TEXT_LIMIT


@pytest.mark.parametrize("tls", [True, False], ids=["https", "http"])
async def test_a_server_gone_mid_body_is_a_broken_stream(
    serve: Callable[[Handler, ssl.SSLContext | None], Server],
    tls_server: ssl.SSLContext,
    tls_client: ssl.SSLContext,
    tls: bool,
) -> None:
    server = serve(drop_after(2 * MIB), tls_server if tls else None)
    with pytest.raises(CloneError) as caught:
        await post(
            settings_for(server, tls=tls), tls_client if tls else None, repeated(bytes(MIB), 2048)
        )
    assert str(caught.value).startswith(f"the clone stream to 127.0.0.1:{server.port} broke: ")


async def test_a_server_certificate_of_another_ca_fails_tls(
    serve: Callable[[Handler, ssl.SSLContext | None], Server],
    tls_server: ssl.SSLContext,
    pki: Pki,
) -> None:
    server = serve(receive_all, tls_server)
    other = ClientTls(tls_of(pki, server_ca=create_ca("someone-else"))).context
    with pytest.raises(CloneError) as caught:
        await post(settings_for(server, tls=True), other, repeated(b"data", 1))
    message = str(caught.value)
    assert message.startswith(f"TLS with the upload server at 127.0.0.1:{server.port} failed: ")
    assert "certificate verify failed" in message


@pytest.mark.parametrize("chunks", [1, 64], ids=["small", "large"])
async def test_a_client_certificate_the_server_refuses_fails_tls(
    serve: Callable[[Handler, ssl.SSLContext | None], Server],
    tls_server: ssl.SSLContext,
    pki: Pki,
    chunks: int,
) -> None:
    stranger = issue_client_cert(create_ca("another-client-signer"), UPLOAD_CLIENT_NAME)
    refused = Tls(
        client_cert=stranger.cert.decode(),
        client_key=stranger.key.decode(),
        server_ca=pki.server_ca.cert.decode(),
    )
    server = serve(receive_all, tls_server)
    with pytest.raises(CloneError) as caught:
        # TLS 1.3: the server's alert comes after our handshake ended: while we send a large
        # body, when we wait for the answer to a small one.
        await post(
            settings_for(server, tls=True), ClientTls(refused).context, repeated(bytes(MIB), chunks)
        )
    message = str(caught.value)
    assert message.startswith(f"TLS with the upload server at 127.0.0.1:{server.port} failed: ")
    assert "unknown ca" in message


async def test_a_certificate_for_another_name_fails_tls(
    serve: Callable[[Handler, ssl.SSLContext | None], Server],
    tls_server: ssl.SSLContext,
    tls_client: ssl.SSLContext,
) -> None:
    server = serve(receive_all, tls_server)
    settings = CloneSettings(
        upload_url=URL("https://cdi-upload-other.ns.svc:8443/v1beta1/upload"),
        server_address=("127.0.0.1", server.port),
        metrics_addr=None,
    )
    with pytest.raises(CloneError) as caught:
        await post(settings, tls_client, repeated(b"data", 1))
    assert "TLS with the upload server" in str(caught.value)
    assert "cdi-upload-other.ns.svc" in str(caught.value)


async def test_nobody_listening_past_the_connect_wait(tls_client: ssl.SSLContext) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens there once closed
    settings = CloneSettings(
        upload_url=URL(f"https://{SERVICE}:8443/v1beta1/upload"),
        server_address=("127.0.0.1", port),
        metrics_addr=None,
        connect_wait=0.3,
    )
    started = time.monotonic()
    with pytest.raises(CloneError) as caught:
        await post(settings, tls_client, repeated(b"data", 1))
    assert str(caught.value).startswith(
        f"cannot connect to the upload server at 127.0.0.1:{port}: "
    )
    assert 0.3 <= time.monotonic() - started < 5


def failing_source(error: Exception, good: list[bytes]) -> Iterator[bytes]:
    yield from good
    raise error


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (OSError(5, "Input/output error"), "reading the clone source failed: OSError: "),
        (CloneError("tar of /src failed with exit status 2"), "tar of /src failed"),
    ],
)
async def test_a_source_failure_cuts_the_stream(
    serve: Callable[[Handler, ssl.SSLContext | None], Server],
    tls_server: ssl.SSLContext,
    tls_client: ssl.SSLContext,
    error: Exception,
    expected: str,
) -> None:
    server = serve(receive_all, tls_server)
    good = [os.urandom(MIB) for _ in range(3)]
    with pytest.raises(CloneError) as caught:
        await post(settings_for(server, tls=True), tls_client, failing_source(error, good))
    assert str(caught.value).startswith(expected)
    assert server.done.wait(TIMEOUT)
    [request] = server.requests
    assert not request.complete  # never the last chunk: the server sees a cut
    assert b"".join(good).startswith(request.body)


async def test_cancel_stops_the_sending_thread_at_once(
    serve: Callable[[Handler, ssl.SSLContext | None], Server],
    tls_server: ssl.SSLContext,
    tls_client: ssl.SSLContext,
) -> None:
    """SIGTERM cancels the clone task: the thread blocked in a full socket must not go on."""
    stalled = threading.Event()

    def stall(conn: socket.socket, f: BinaryIO, request: Request) -> None:
        stalled.wait(TIMEOUT)  # reads nothing: the client's sends block

    server = serve(stall, tls_server)
    settings = settings_for(server, tls=True)
    body, _ = body_of(repeated(bytes(MIB), 100_000))
    task = asyncio.create_task(send(settings, tls_client, body, clone_headers(settings)))
    try:
        assert await asyncio.to_thread(server.head_seen.wait, TIMEOUT)
        await asyncio.sleep(0.3)  # the socket buffers fill, the thread blocks in sendall
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        body.close()
        assert time.monotonic() - started < 2
        alive = [t.name for t in threading.enumerate() if t.name.startswith("clone-read")]
        assert not alive
    finally:
        stalled.set()
        task.cancel()
        body.close()


def test_sigterm_ends_the_cloner_process_during_a_stalled_send(
    serve: Callable[[Handler, ssl.SSLContext | None], Server],
    tls_server: ssl.SSLContext,
    pki: Pki,
    tmp_path: Path,
) -> None:
    """The whole process: SIGTERM cancels the clone task, the sending thread stops, asyncio.run
    (which waits for its worker threads) returns, and the cloner exits 143."""
    stalled = threading.Event()

    def stall(conn: socket.socket, f: BinaryIO, request: Request) -> None:
        stalled.wait(TIMEOUT)

    server = serve(stall, tls_server)
    source = tmp_path / "source"
    source.mkdir()
    with (source / "disk.img").open("wb") as disk:
        disk.write(os.urandom(64 * MIB))  # more than the socket buffers hold
    (tmp_path / "tmp").mkdir()
    environ = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "TMPDIR": str(tmp_path / "tmp"),
        "UPLOAD_URL": f"https://{SERVICE}:8443/v1beta1/upload",
        "UPLOAD_SERVER_ADDRESS": f"127.0.0.1:{server.port}",
        "CLIENT_CERT": pki.client.cert.decode(),
        "CLIENT_KEY": pki.client.key.decode(),
        "SERVER_CA_CERT": pki.server_ca.cert.decode(),
        "MOUNT_POINT": str(source),
        "CDI_METRICS_ADDR": "off",
        "CDI_TERMINATION_LOG": str(tmp_path / "term"),
    }
    cloner = str(Path(sys.executable).parent / "cdi-cloner")
    proc = subprocess.Popen(cloner, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert server.head_seen.wait(TIMEOUT)
        time.sleep(0.5)  # the socket buffers fill, the sending thread blocks
        assert not list((tmp_path / "tmp").iterdir())  # no key on disk while it runs
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=TIMEOUT)
        assert time.monotonic() - started < 3
    finally:
        stalled.set()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, err
    assert err.decode().endswith("cdi-cloner: terminated (SIGTERM) during the clone\n")


# --- the body -------------------------------------------------------------------------------------


def test_body_reads_ahead_a_bounded_number_of_chunks() -> None:
    made: list[int] = []

    def source() -> Iterator[bytes]:
        for i in range(1000):
            made.append(i)
            yield b"x" * 10

    body, counts = body_of(source())
    chunks = body.chunks()
    assert next(chunks) == b"x" * 10
    time.sleep(0.2)  # room for the reader to run ahead as far as it may
    assert len(made) <= 1 + stream.READ_AHEAD + 1
    body.close()
    assert not body.finished
    assert counts.wire == 10
    with pytest.raises(stream.BodyStopped):
        next(chunks)


def test_body_close_aborts_a_blocked_read_and_closes_the_source() -> None:
    unblock = threading.Event()
    closed = threading.Event()

    def source() -> Iterator[bytes]:
        try:
            yield b"first"
            unblock.wait(TIMEOUT)  # a read that ends only when aborted (tar killed)
            yield b"second"
        finally:
            closed.set()

    body = Body(source(), Counts(), unblock.set)
    chunks = body.chunks()
    assert next(chunks) == b"first"
    started = time.monotonic()
    body.close()
    assert time.monotonic() - started < 2
    assert closed.is_set()


def test_body_keeps_the_source_failure() -> None:
    error = OSError("gone")
    body, _ = body_of(failing_source(error, [b"a", b"", b"b"]))
    got = []
    with pytest.raises(OSError, match="gone"):
        got.extend(body.chunks())
    assert got == [b"a", b"b"]
    assert body.failure is error
    assert not body.finished
    body.close()


# --- the TLS material -----------------------------------------------------------------------------


def test_no_tls_files_stay_on_disk(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    tls = ClientTls(tls_of(pki))
    assert tls.directory.parent == tmp_path
    assert not tls.directory.exists()  # gone at once: a SIGKILL leaves nothing behind
    assert not list(tmp_path.iterdir())
    assert tls.context.verify_mode == ssl.CERT_REQUIRED
    tls.close()  # harmless


def test_no_tls_files_stay_on_disk_when_they_do_not_load(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    bad = Tls(
        client_cert=pki.client.cert.decode(),
        client_key=pki.server.key.decode(),  # not the certificate's key
        server_ca=pki.server_ca.cert.decode(),
    )
    with pytest.raises(SettingsError, match="CLIENT_CERT"):
        ClientTls(bad)
    assert not list(tmp_path.iterdir())
