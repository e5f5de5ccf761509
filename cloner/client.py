"""The POST to the upload server: mutual TLS, the clone headers, the answer as success or a line.

CDI passes the TLS material as PEM contents in the environment; the ssl module wants files, so
they are written to a private directory (0700, files 0600) that is removed as soon as the ssl
context has read them: the key is never left on disk, not even when the process is killed.
UPLOAD_SERVER_ADDRESS changes only where we connect: the server certificate is still checked
against the URL's host name and the Host header is still the URL's, as a Service name would
give on a cluster.

The request runs in one worker thread with blocking socket calls: OpenSSL encrypts and the kernel
sends each chunk with the GIL released, with no per-record Python work (asyncio's TLS path was
the cloner's bottleneck). The event loop stays free for the metrics endpoint and for SIGTERM,
which shuts the socket down so the thread stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import shutil
import socket
import ssl
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from yarl import URL

from cdi.api import CloneContentType, env
from cdi.api.clonestream import (
    COMPRESSION_HEADER,
    CONTENT_TYPE_HEADER,
    ENCODING_HEADER,
    EXTENTS_V1,
    PREALLOCATION_HEADER,
)
from cdi.image.httpwire import Body as HttpBody
from cdi.image.httpwire import Connection, HeadError
from cloner.errors import CloneError, SettingsError
from cloner.settings import CloneSettings, Compression, Content, Tls
from cloner.stream import Body, BodyStopped

log = logging.getLogger(__name__)

# The headers of a clone stream; the receiver (importer/upload/clone.py) spells them the same.

CONNECT_TIMEOUT: Final = 30.0  # connecting and the TLS handshake
LISTEN_POLL: Final = 0.1
ERROR_TEXT_LIMIT: Final = 1000  # characters of the server's answer kept in the failure line
STALL_TIMEOUT: Final = 300.0  # seconds a send may make no progress before the stream is given up
LATE_ANSWER_WAIT: Final = 5.0  # for an answer already sent when our sending failed
ANSWER_LIMIT: Final = 8192  # bytes of the answer's body kept (ERROR_TEXT_LIMIT chars and more)
SMALL_CHUNK: Final = 64 << 10  # smaller chunks are framed in one buffer; larger go out as they are
STOP_WAIT: Final = 10.0  # seconds a cancelled send waits for its thread
# While the server fsyncs before answering the connection is idle: probes find a vanished peer.
KEEPALIVE: Final = (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 15), ("TCP_KEEPCNT", 4))


class ClientTls:
    """The client certificate, its key and the server CA as files, and the ssl context."""

    def __init__(self, tls: Tls) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="cdi-cloner-tls-"))  # mode 0700
        try:
            cert = self._write("tls.crt", tls.client_cert)
            key = self._write("tls.key", tls.client_key)
            ca = self._write("ca.crt", tls.server_ca)
            try:
                self.context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
            except (OSError, ssl.SSLError) as err:
                raise SettingsError(
                    env.SERVER_CA_CERT, f"not a usable CA certificate: {err}"
                ) from None
            try:
                self.context.load_cert_chain(cert, key)
            except (OSError, ssl.SSLError) as err:
                raise SettingsError(
                    env.CLIENT_CERT, f"certificate and CLIENT_KEY do not load as a pair: {err}"
                ) from None
        finally:
            # The context holds what it loaded; the files would only outlive a SIGKILL.
            self.close()

    def _write(self, name: str, text: str) -> str:
        path = self.directory / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text if text.endswith("\n") else text + "\n")
        return str(path)

    def close(self) -> None:
        """Nothing left to do since the files go right after loading; kept for the owner."""
        shutil.rmtree(self.directory, ignore_errors=True)


def clone_headers(settings: CloneSettings) -> dict[str, str]:
    headers = {
        "Content-Type": "application/octet-stream",
        PREALLOCATION_HEADER: "true" if settings.preallocation else "false",
    }
    if settings.content is Content.ARCHIVE:
        headers[CONTENT_TYPE_HEADER] = CloneContentType.FILESYSTEM.value
    else:
        headers[CONTENT_TYPE_HEADER] = CloneContentType.BLOCK_DEVICE.value
        headers[ENCODING_HEADER] = EXTENTS_V1
    if settings.compression is Compression.ZSTD:
        headers[COMPRESSION_HEADER] = Compression.ZSTD.value
    return headers


def connect_url(settings: CloneSettings) -> tuple[URL, dict[str, str], str | None]:
    """Where to connect, the extra headers and the TLS server name for UPLOAD_SERVER_ADDRESS."""
    url = settings.upload_url
    if settings.server_address is None:
        return url, {}, None
    host, port = settings.server_address
    target = url.with_host(host).with_port(port)
    return target, {"Host": authority(url)}, url.host if url.scheme == "https" else None


def authority(url: URL) -> str:
    """The Host header's value for `url`: host, and port unless it is the scheme's."""
    assert url.host is not None  # checked by the settings
    shown = f"[{url.host}]" if ":" in url.host else url.host
    return shown if url.is_default_port() else f"{shown}:{url.port}"


async def wait_until_listening(host: str, port: int, *, within: float) -> None:
    """Return once something accepts TCP connections at host:port. The source pod is started
    as soon as the target's upload server runs, before its readiness probe passes (that saves
    the probe's initial delay on every clone), so the server may not listen yet; a refusal is
    retried, anything else ends the wait and `send` reports it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT)
        except ConnectionRefusedError:
            if loop.time() >= deadline:
                return
            await asyncio.sleep(LISTEN_POLL)
            continue
        except (OSError, TimeoutError):
            return
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return


async def send(
    settings: CloneSettings, context: ssl.SSLContext | None, body: Body, headers: Mapping[str, str]
) -> str:
    """POST the body; the server's answer text on 200, CloneError for anything else."""
    url, extra, server_hostname = connect_url(settings)
    assert url.host is not None and url.port is not None  # checked by the settings
    await wait_until_listening(url.host, url.port, within=settings.connect_wait)
    if url.scheme == "https":
        context = context if context is not None else ssl.create_default_context()
        server_hostname = server_hostname or url.host
    else:
        context, server_hostname = None, None
    exchange = Exchange(
        url.host,
        url.port,
        context=context,
        server_hostname=server_hostname,
        head=request_head(url, extra.get("Host", authority(url)), headers),
        body=body,
    )
    answer = await _run(exchange)
    if body.failure is not None:  # the server answered before noticing the cut
        raise _source_failure(body.failure)
    if answer.status != 200:
        one_line = " ".join(answer.text.split())[:ERROR_TEXT_LIMIT]
        raise CloneError(f"the upload server answered HTTP {answer.status}: {one_line}")
    if not body.finished:
        raise CloneError("the upload server answered 200 before the whole stream was sent")
    return answer.text


async def _run(exchange: Exchange) -> Answer:
    """`exchange.run()` in a worker thread; a cancelled caller stops the thread first."""
    worker = asyncio.ensure_future(asyncio.to_thread(exchange.run))
    # Once we stop waiting, nobody wants the worker's outcome: do not log it as lost.
    worker.add_done_callback(lambda done: done.cancelled() or done.exception())
    try:
        return await asyncio.shield(worker)
    except asyncio.CancelledError:
        exchange.cancel()
        # asyncio.run's shutdown would wait for the thread anyway; this keeps the order clear
        # (the thread is out of the body before its owner closes it).
        await asyncio.wait({worker}, timeout=STOP_WAIT)
        raise


def request_head(url: URL, host: str, headers: Mapping[str, str]) -> bytes:
    """The request line and headers of a chunked POST on a connection used once."""
    framing = {"host", "transfer-encoding", "content-length", "connection"}
    lines = [f"POST {url.raw_path_qs} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in headers.items() if name.lower() not in framing]
    lines += ["Transfer-Encoding: chunked", "Connection: close", "", ""]
    text = "\r\n".join(lines)
    if "\n" in text.replace("\r\n", ""):  # a header value may not start another header
        raise ValueError(f"a line break in the request head: {text!r}")
    return text.encode("latin-1")


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    text: str


class Exchange:
    """One POST on its own connection, run by one thread (`run`); `cancel` from any other.

    Every outcome but an answer is a CloneError with the line the user sees.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        context: ssl.SSLContext | None,
        server_hostname: str | None,
        head: bytes,
        body: Body,
    ) -> None:
        self.host = host
        self.port = port
        self.where = f"{host}:{port}"
        self.context = context
        self.server_hostname = server_hostname
        self.head = head
        self.body = body
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._cancelled = False

    def run(self) -> Answer:
        try:
            return self._exchange(self._connect())
        finally:
            with self._lock:  # `cancel` must not shut down a descriptor number reused by then
                sock, self._sock = self._sock, None
            if sock is not None:
                sock.close()  # without the final chunk, this is the cut the server sees

    def cancel(self) -> None:
        """Stop `run` soon: its blocking send or receive fails once the socket is shut down.
        (A connect in progress is not interrupted: CONNECT_TIMEOUT bounds it.)"""
        with self._lock:
            self._cancelled = True
            if self._sock is not None:
                _shutdown(self._sock)
        self.body.stop()

    def _connect(self) -> socket.socket:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=CONNECT_TIMEOUT)
            self._hold(sock)
            _tune(sock)
            if self.context is not None:
                sock = self.context.wrap_socket(
                    sock, server_hostname=self.server_hostname, do_handshake_on_connect=False
                )
                self._hold(sock)
                sock.do_handshake()
        except ssl.SSLError as err:  # certificate checks, alerts: TLS itself failed
            raise CloneError(f"TLS with the upload server at {self.where} failed: {err}") from None
        except OSError as err:
            raise CloneError(
                f"cannot connect to the upload server at {self.where}: {err}"
            ) from None
        return sock

    def _hold(self, sock: socket.socket) -> None:
        """Make `sock` the one `cancel` shuts down (and `run` closes); fail if the cancel came
        first."""
        with self._lock:
            self._sock = sock
            if self._cancelled:
                raise OSError("the clone was stopped")

    def _exchange(self, sock: socket.socket) -> Answer:
        sock.settimeout(STALL_TIMEOUT)
        try:
            early = self._send(sock)
        except BodyStopped:
            raise CloneError("the clone was stopped") from None
        except Exception as err:
            if self.body.failure is not None:  # raised from the body: the source failed
                raise _source_failure(self.body.failure) from None
            if not isinstance(err, OSError):
                raise
            return self._late_answer(sock, err)
        try:
            if early is not None:
                return self._answer(sock, early, STALL_TIMEOUT)
            # The server fsyncs before it answers: no time limit, keepalive finds a dead peer.
            return self._answer(sock, b"", None)
        except (OSError, HeadError) as err:
            raise self._broke(err) from None

    def _send(self, sock: socket.socket) -> bytes | None:
        """Send the request; the first bytes of an answer the server sent before its end."""
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        out = bytearray(self.head)
        for chunk in self.body.chunks():
            if self._cancelled:
                raise BodyStopped("the clone stream was stopped")
            frame = b"%x\r\n" % len(chunk)
            if len(chunk) < SMALL_CHUNK:
                out += frame
                out += chunk
                out += b"\r\n"
                if len(out) < SMALL_CHUNK:
                    continue
                self._write(sock, out)
                out.clear()
            else:
                out += frame
                self._write(sock, out)
                self._write(sock, chunk)  # as it is: no copy of a large chunk
                out[:] = b"\r\n"
            if poller.poll(0) and (early := _early_answer(sock)):
                return early
        out += b"0\r\n\r\n"
        self._write(sock, out)
        return None

    def _write(self, sock: socket.socket, data: bytes | bytearray) -> None:
        try:
            sock.sendall(data)
        except TimeoutError:
            raise TimeoutError(f"no progress for {STALL_TIMEOUT:.0f} s") from None

    def _late_answer(self, sock: socket.socket, err: OSError) -> Answer:
        """A server that refuses the stream may answer and close at once: our send fails, but
        its answer (or its TLS alert) may be waiting to be read."""
        if not isinstance(err, TimeoutError):
            try:
                return self._answer(sock, b"", LATE_ANSWER_WAIT)
            except ssl.SSLError as tls_err:
                if _alert(tls_err):
                    raise self._broke(tls_err) from None
            except (OSError, HeadError):
                pass
        raise self._broke(err) from None

    def _broke(self, err: BaseException) -> CloneError:
        if self._cancelled:
            return CloneError("the clone was stopped")
        if isinstance(err, ssl.SSLError) and _alert(err):  # such as a client certificate refused
            return CloneError(f"TLS with the upload server at {self.where} failed: {err}")
        detail = str(err) or type(err).__name__
        return CloneError(f"the clone stream to {self.where} broke: {detail}")

    def _answer(self, sock: socket.socket, start: bytes, timeout: float | None) -> Answer:
        """The status and text of the server's answer (`start`: its first bytes, if read)."""
        sock.settimeout(timeout)
        conn = Connection(sock, start)
        head = conn.read_response_head()
        while 100 <= head.status < 200:
            head = conn.read_response_head()
        try:
            length = head.framing("POST")
            if length == -1:
                data = conn.read_until_close(ANSWER_LIMIT)
            else:
                data = HttpBody(conn, length, expect_continue=False).read(ANSWER_LIMIT)
        except (OSError, HeadError):
            data = b""  # the status says what matters
        return Answer(head.status, data.decode("utf-8", errors="replace").strip())


def _source_failure(err: BaseException) -> CloneError:
    if isinstance(err, CloneError):
        return err
    return CloneError(f"reading the clone source failed: {type(err).__name__}: {err}")


def _alert(err: ssl.SSLError) -> bool:
    """Whether the server said no in TLS (a certificate it refused), not just that it left."""
    return "ALERT" in (err.reason or "")


def _tune(sock: socket.socket) -> None:
    # Small writes (frames, the final chunk) go out at once instead of waiting for an ACK.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in KEEPALIVE:
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def _shutdown(sock: socket.socket) -> None:
    # The plain socket's shutdown: the TLS layer is left alone, it may be in use by the sender.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _early_answer(sock: socket.socket) -> bytes | None:
    """What the server sent while we were still sending, read without blocking: an answer's
    first bytes; None when it was TLS housekeeping (a session ticket). An end of the
    connection raises, as a failed send would."""
    sock.settimeout(0.0)
    try:
        data = sock.recv(ANSWER_LIMIT)
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
        return None
    finally:
        sock.settimeout(STALL_TIMEOUT)
    if not data:
        raise ConnectionResetError("the upload server closed the connection")
    return data
