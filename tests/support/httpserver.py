"""A misbehaving-on-purpose HTTP(S) image server for importer tests (CDI's bad-webserver, and more).

Owns `BadServer`: an aiohttp app on 127.0.0.1, port 0, running in a background thread with its own
event loop, so synchronous tests, async tests and subprocesses (nbdkit, qemu-img) can all use it.
It serves the files of one directory with its own Range implementation (aiohttp's FileResponse
would be correct, and correctness is not the point), and each path can be told to misbehave:

    server.behave("/img.qcow2", ignore_range=True)      # 200 and the whole body for a Range
    server.behave("/img.qcow2", drop_after=65536, drop_times=2)

See `Behaviour` for every knob. Every request is recorded (method, path, raw target, headers) for
assertions. TLS mode makes a CA and a server certificate for 127.0.0.1/localhost in the test and
exposes the CA's PEM path as `ca_file`. Also a forward proxy of sorts: a request whose target is an
absolute `http://` URL is served by its path and recorded with that target.

Used by tests only (tests/importer, later upload and end-to-end tests). Must not bind anything but
127.0.0.1, and must not outlive its `with` block: stalled responses end when the server stops.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime
import ipaddress
import re
import shutil
import ssl
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Self

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from multidict import CIMultiDict, CIMultiDictProxy

__all__ = [
    "BadServer",
    "Behaviour",
    "RecordedRequest",
    "TestCA",
    "bad_server",
    "bad_tls_server",
]

HOST: Final = "127.0.0.1"
CHUNK: Final = 64 * 1024
START_TIMEOUT: Final = 10.0
STOP_TIMEOUT: Final = 10.0
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


@dataclass(frozen=True, slots=True, kw_only=True)
class Behaviour:
    """How one path misbehaves. The default is a correct server. Checks apply in field order:
    basic_auth, flaky, status, no_head, redirect_to, then the file with the body knobs."""

    basic_auth: tuple[str, str] | None = None
    """Require these credentials (401 + WWW-Authenticate otherwise)."""
    flaky: int = 0
    """The first N requests to the path get `flaky_status` (503), then it works."""
    flaky_status: int = 503
    retry_after: str | None = None
    """Retry-After header on flaky answers."""
    status: int | None = None
    """Answer every request with this status (404, 403, 401, 500, 416, ...) and a short text."""
    no_head: bool | int = False
    """HEAD answers this status (403 like CDI's forbidden-HEAD; True means 405); GET works."""
    redirect_to: str | None = None
    """Redirect every request here (any scheme: https://..., file:///etc/passwd, ftp://...)."""
    redirect_status: int = 302
    ignore_range: bool = False
    """Answer a Range request with 200 and the whole body."""
    no_accept_ranges: bool = False
    """Leave out `Accept-Ranges: bytes` (ranges still work unless ignore_range is set too)."""
    wrong_content_range: Literal["shift", "total", "unknown-total", "garbage", "missing"] | None = (
        None
    )
    """Send the right bytes under a wrong Content-Range: one byte later, another total size,
    `*` as total, something unparsable, or none at all."""
    lie_content_length: int = 0
    """Content-Length claims this many bytes more than the body has; then the connection is cut."""
    short_body: int = 0
    """Honest headers, but the body stops this many bytes early; then the connection is cut."""
    extra_bytes: int = 0
    """Send this many bytes past the range (only sensible with `chunked`, or it corrupts the
    next response on the connection)."""
    chunked: bool = False
    """No Content-Length; Transfer-Encoding: chunked."""
    content_encoding: str | None = None
    """A Content-Encoding header (the body stays identity); ranges of an encoded body are wrong."""
    drop_after: int | None = None
    """Cut the connection after this many body bytes (bodies no longer than this are sent
    whole and do not count)..."""
    drop_times: int | None = None
    """...but only the first N times (None: every time)."""
    stall_after: int | None = None
    """Send this many body bytes, then hang for `stall_seconds` (or until the server stops) and
    cut the connection; like drop_after, only bodies longer than this..."""
    stall_times: int | None = None
    """...but only the first N times (None: every time)."""
    stall_seconds: float = 60.0
    content_type: str = "application/octet-stream"
    throttle: int | None = None
    """Bytes per second for bodies."""


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as the server saw it."""

    method: str
    path: str
    target: str
    """The raw request target: `/img.raw`, or `http://host/img.raw` when used as a proxy."""
    headers: CIMultiDictProxy[str]

    @property
    def range(self) -> str | None:
        return self.headers.get("Range")


@dataclass(slots=True)
class _Counters:
    hits: int = 0
    drops: int = 0
    stalls: int = 0


@dataclass(frozen=True, slots=True)
class TestCA:
    """A throwaway certificate authority made in the test; `cert_pem` is what clients trust."""

    key: ec.EllipticCurvePrivateKey = field(repr=False)
    cert: x509.Certificate

    __test__ = False  # not a pytest test class, despite the name

    @classmethod
    def create(cls, name: str = "cdi-py test CA") -> TestCA:
        # EC keys: generating RSA-2048 costs ~0.1-1 s each on a small box, P-256 microseconds.
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(key=key, cert=cert)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write_cert(self, path: Path) -> Path:
        path.write_bytes(self.cert_pem)
        return path

    def issue_server_cert(self, certdir: Path) -> tuple[Path, Path]:
        """A server certificate for 127.0.0.1 and localhost; returns (cert path, key path)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
                ),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
            .sign(self.key, hashes.SHA256())
        )
        cert_path = certdir / "server.pem"
        key_path = certdir / "server.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_path.chmod(0o600)
        return cert_path, key_path


def _parse_range(value: str | None, size: int) -> tuple[int, int] | Literal["bad"] | None:
    """(first, last) for a single `bytes=` range, None for no Range, "bad" if unsatisfiable."""
    if value is None:
        return None
    match = _RANGE.fullmatch(value.strip())
    if match is None:
        return None  # multi-range or other units: ignored, as RFC 9110 allows
    first_s, last_s = match.groups()
    if not first_s:  # suffix range: the last N bytes
        if not last_s or int(last_s) == 0:
            return "bad"
        return max(0, size - int(last_s)), size - 1
    first = int(first_s)
    last = int(last_s) if last_s else size - 1
    if first >= size or last < first:
        return "bad"
    return first, min(last, size - 1)


class BadServer:
    """The server. `with BadServer(root) as server:`, then `server.url("/img.raw")`."""

    def __init__(self, root: Path, *, tls: bool = False) -> None:
        self.root = root.resolve()
        self.tls = tls
        self._behaviours: dict[str, Behaviour] = {}
        self._counters: dict[str, _Counters] = {}
        self._requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._port = 0
        self._certdir: Path | None = None
        self.ca: TestCA | None = None
        self.ca_file: str | None = None
        """PEM of the CA that signed the server certificate (TLS mode only)."""

    # -- configuration and inspection, from any thread ------------------------------------

    def behave(self, path: str, **knobs: Any) -> Behaviour:
        """Replace the behaviour of `path` (keyword arguments are `Behaviour` fields); counters
        for the path restart at zero."""
        if not path.startswith("/"):
            raise ValueError("path must start with '/'")
        behaviour = Behaviour(**knobs)
        with self._lock:
            self._behaviours[path] = behaviour
            self._counters[path] = _Counters()
        return behaviour

    def reset(self, path: str | None = None) -> None:
        """Make `path` (or every path) behave correctly again and forget the recorded requests."""
        with self._lock:
            if path is None:
                self._behaviours.clear()
                self._counters.clear()
                self._requests.clear()
            else:
                self._behaviours.pop(path, None)
                self._counters.pop(path, None)

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of every request so far, oldest first."""
        with self._lock:
            return list(self._requests)

    def requests_for(self, path: str, method: str | None = None) -> list[RecordedRequest]:
        return [
            r for r in self.requests if r.path == path and (method is None or r.method == method)
        ]

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{HOST}:{self._port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def add_file(self, name: str, data: bytes) -> str:
        """Write `data` as `root/name` and return its URL path."""
        (self.root / name).write_bytes(data)
        return "/" + name

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        ssl_context = None
        if self.tls:
            self._certdir = Path(tempfile.mkdtemp(prefix="badserver-tls-"))
            self.ca = TestCA.create()
            self.ca_file = str(self.ca.write_cert(self._certdir / "ca.pem"))
            cert, key = self.ca.issue_server_cert(self._certdir)
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(cert, key)
        self._thread = threading.Thread(
            target=self._run, args=(ssl_context,), name="bad-http-server", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT):
            raise RuntimeError("bad server did not start in time")
        if self._error is not None:
            self._thread.join(STOP_TIMEOUT)
            raise RuntimeError("bad server failed to start") from self._error

    def stop(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            # The loop may have just finished on its own; then there is nothing to wake.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT)
            if self._thread.is_alive():
                raise RuntimeError("bad server thread did not stop")
            self._thread = None
        if self._certdir is not None:
            shutil.rmtree(self._certdir, ignore_errors=True)
            self._certdir = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self, ssl_context: ssl.SSLContext | None) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(ssl_context))
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()
            loop.close()

    async def _serve(self, ssl_context: ssl.SSLContext | None) -> None:
        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # A short shutdown: stalled handlers are woken by the stop event, nothing else lingers.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, HOST, 0, ssl_context=ssl_context)
            await site.start()
            self._port = runner.addresses[0][1]
            self._ready.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()

    # -- request handling (event loop thread) ----------------------------------------------

    def _begin(self, request: web.Request) -> tuple[Behaviour, _Counters]:
        record = RecordedRequest(
            method=request.method,
            path=request.path,
            target=request.raw_path,
            headers=CIMultiDictProxy(CIMultiDict(request.headers)),
        )
        with self._lock:
            self._requests.append(record)
            behaviour = self._behaviours.get(request.path, Behaviour())
            counters = self._counters.setdefault(request.path, _Counters())
            counters.hits += 1
            return behaviour, counters

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        b, counters = self._begin(request)
        if b.basic_auth is not None and not _auth_ok(request, b.basic_auth):
            return web.Response(
                status=401, text="who are you?\n", headers={"WWW-Authenticate": 'Basic realm="t"'}
            )
        if counters.hits <= b.flaky:
            headers = {"Retry-After": b.retry_after} if b.retry_after is not None else {}
            return web.Response(status=b.flaky_status, text="try again\n", headers=headers)
        if b.status is not None:
            return web.Response(status=b.status, text=f"told to answer {b.status}\n")
        if request.method == "HEAD" and b.no_head is not False:
            return web.Response(status=405 if b.no_head is True else int(b.no_head))
        if b.redirect_to is not None:
            return web.Response(status=b.redirect_status, headers={"Location": b.redirect_to})
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405, headers={"Allow": "GET, HEAD"})
        path = (self.root / request.path.lstrip("/")).resolve()
        if not path.is_relative_to(self.root) or not path.is_file():
            return web.Response(status=404, text="no such file\n")
        return await self._send_file(request, b, counters, path)

    async def _send_file(
        self, request: web.Request, b: Behaviour, counters: _Counters, path: Path
    ) -> web.StreamResponse:
        # Small local files in a test: a blocking stat or read on the loop costs microseconds.
        size = path.stat().st_size  # noqa: ASYNC240
        headers = CIMultiDict[str]({"Content-Type": b.content_type})
        if not b.no_accept_ranges:
            headers["Accept-Ranges"] = "bytes"
        if b.content_encoding is not None:
            headers["Content-Encoding"] = b.content_encoding
        wanted = None if b.ignore_range else _parse_range(request.headers.get("Range"), size)
        if wanted == "bad":
            headers["Content-Range"] = f"bytes */{size}"
            return web.Response(status=416, headers=headers)
        if wanted is None:
            status, first, last = 200, 0, size - 1
        else:
            status, (first, last) = 206, wanted
            content_range = _content_range(b, first, last, size)
            if content_range is not None:
                headers["Content-Range"] = content_range
        length = last - first + 1
        resp = web.StreamResponse(status=status, headers=headers)
        if b.chunked:
            resp.enable_chunked_encoding()
        else:
            resp.content_length = length + b.lie_content_length
        await resp.prepare(request)
        if request.method == "HEAD":
            await resp.write_eof()
            return resp

        send = length - b.short_body + b.extra_bytes
        cut = b.short_body > 0 or b.lie_content_length > 0
        stall_at: int | None = None
        # A response shorter than the cut point is sent whole and does not count as a drop/stall.
        with self._lock:
            if (
                b.drop_after is not None
                and b.drop_after < send
                and (b.drop_times is None or counters.drops < b.drop_times)
            ):
                counters.drops += 1
                send, cut = b.drop_after, True
            if (
                b.stall_after is not None
                and b.stall_after < send
                and (b.stall_times is None or counters.stalls < b.stall_times)
            ):
                counters.stalls += 1
                stall_at = b.stall_after
        try:
            if stall_at is not None:
                await self._write_body(resp, path, first, stall_at, b.throttle)
                await self._sleep_or_stop(b.stall_seconds)
                cut = True
            else:
                await self._write_body(resp, path, first, send, b.throttle)
        except ConnectionError:
            # The client hung up (often on purpose, having spotted our lie). Returning the
            # prepared response lets aiohttp finish quietly instead of logging an error.
            return resp
        if cut:
            # close() flushes what was written, then ends the TCP stream: the client sees a short
            # body (and, with keep-alive, a connection it must not reuse).
            if request.transport is not None:
                request.transport.close()
            return resp
        await resp.write_eof()
        return resp

    async def _write_body(
        self, resp: web.StreamResponse, path: Path, offset: int, count: int, throttle: int | None
    ) -> None:
        step = CHUNK if throttle is None else max(1, min(CHUNK, throttle // 10))
        with path.open("rb") as f:
            f.seek(offset)
            remaining = count
            while remaining > 0:
                data = f.read(min(step, remaining))
                if not data:  # extra_bytes past the end of the file: pad
                    data = b"\0" * min(step, remaining)
                if throttle is not None:
                    # Pace before sending, so that the last chunk is late too.
                    await asyncio.sleep(len(data) / throttle)
                await resp.write(data)
                remaining -= len(data)

    async def _sleep_or_stop(self, seconds: float) -> None:
        assert self._stop is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)


def _content_range(b: Behaviour, first: int, last: int, size: int) -> str | None:
    match b.wrong_content_range:
        case None:
            return f"bytes {first}-{last}/{size}"
        case "shift":
            return f"bytes {first + 1}-{last + 1}/{size}"
        case "total":
            return f"bytes {first}-{last}/{size + 4096}"
        case "unknown-total":
            return f"bytes {first}-{last}/*"
        case "garbage":
            return "lots of bytes, trust me"
        case "missing":
            return None


def _auth_ok(request: web.Request, expected: tuple[str, str]) -> bool:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    return (user, password) == expected


@pytest.fixture
def bad_server(tmp_path: Path) -> Iterator[BadServer]:
    """A plain-HTTP BadServer serving `tmp_path / "www"` (empty; tests add files)."""
    root = tmp_path / "www"
    root.mkdir()
    with BadServer(root) as server:
        yield server


@pytest.fixture
def bad_tls_server(tmp_path: Path) -> Iterator[BadServer]:
    """An HTTPS BadServer serving `tmp_path / "www-tls"`; trust `server.ca_file`."""
    root = tmp_path / "www-tls"
    root.mkdir()
    with BadServer(root, tls=True) as server:
        yield server
