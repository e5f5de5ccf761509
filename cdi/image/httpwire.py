"""HTTP/1.1 on a blocking socket: request heads, request bodies, answers.

For the data path of the upload server and the upload proxy (cdi.image.httpfront): a body is
read by the thread that uses it, straight from a blocking (TLS) socket, so that OpenSSL decrypts
with the GIL released and no event loop touches each TLS record. Python's asyncio TLS costs about
twice the CPU of the transfer itself here (measured: 2 GiB over loopback TLS, aiohttp 2.5 CPU-s
in its loop thread, a blocking socket 1.2).

Only what an upload needs: one request line, headers, a body framed by Content-Length or chunked
transfer coding, and short answers with a Content-Length. Anything else (pipelining past a body
we did not read, trailers with meaning, upgrades) is left to aiohttp by forwarding.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final

from multidict import CIMultiDict, CIMultiDictProxy

HEAD_LIMIT: Final = 64 << 10  # what aiohttp accepts for a request line plus headers, roughly
HEADER_COUNT_LIMIT: Final = 128
RECV_SIZE: Final = 256 << 10
CHUNK_LINE_LIMIT: Final = 4096
_CRLF: Final = b"\r\n"
_TOKEN_CHARS: Final = frozenset(
    b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


class HeadError(Exception):
    """The request head is not HTTP/1.1 we can read: answered 400, connection closed."""


class BodyError(ConnectionError):
    """The body broke off or is malformed. A ConnectionError, like a cut aiohttp body, so that
    code reading either kind of body handles both the same way."""


@dataclass(frozen=True)
class RequestHead:
    method: str
    target: str  # path and query, as sent
    version: str  # "HTTP/1.1"
    headers: CIMultiDictProxy[str]
    raw: bytes  # the head as received, for forwarding it unchanged

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def keep_alive(self) -> bool:
        tokens = {t.strip().lower() for t in self.headers.get("Connection", "").split(",")}
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens

    def framing(self) -> int | None:
        """The body's Content-Length; None for chunked; HeadError when it cannot be told."""
        encodings = [
            e.strip().lower()
            for value in self.headers.getall("Transfer-Encoding", [])
            for e in value.split(",")
            if e.strip()
        ]
        lengths = self.headers.getall("Content-Length", [])
        if encodings:
            if lengths:
                raise HeadError("both Transfer-Encoding and Content-Length are set")
            if encodings != ["chunked"]:
                raise HeadError(f"unsupported Transfer-Encoding {', '.join(encodings)}")
            return None
        if not lengths:
            return 0
        if len(set(lengths)) != 1 or not lengths[0].isdigit():
            raise HeadError(f"invalid Content-Length {', '.join(lengths)}")
        return int(lengths[0])


@dataclass(frozen=True)
class ResponseHead:
    status: int
    reason: str
    headers: CIMultiDictProxy[str]

    def framing(self, method: str) -> int | None:
        """The body's length; None for chunked; -1: until the connection closes."""
        if method == "HEAD" or self.status in (204, 304) or 100 <= self.status < 200:
            return 0
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return None
        length = self.headers.get("Content-Length")
        if length is None:
            return -1
        if not length.isdigit():
            raise HeadError(f"invalid Content-Length {length!r} in an answer")
        return int(length)


class Connection:
    """A blocking socket with the bytes read past the last head kept for what comes next."""

    def __init__(self, sock: socket.socket, buffered: bytes = b"") -> None:
        self.sock = sock
        self._buffer = bytearray(buffered)  # bytes already read from `sock`, if any

    def read_head(self) -> RequestHead | None:
        """The next request head; None when the peer closed before sending a byte of one."""
        while True:
            end = self._buffer.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(self._buffer) > HEAD_LIMIT:
                raise HeadError(f"the request head is longer than {HEAD_LIMIT} bytes")
            data = self.sock.recv(RECV_SIZE)
            if not data:
                if self._buffer.strip():
                    raise HeadError("the connection closed in the middle of a request head")
                return None
            self._buffer += data
        raw = bytes(self._buffer[: end + 4])
        del self._buffer[: end + 4]
        return parse_head(raw)

    def read_response_head(self) -> ResponseHead:
        """The next answer's head (1xx ones included: the caller skips what it waits past)."""
        while (end := self._buffer.find(b"\r\n\r\n")) < 0:
            if len(self._buffer) > HEAD_LIMIT:
                raise HeadError(f"the answer's head is longer than {HEAD_LIMIT} bytes")
            data = self.sock.recv(RECV_SIZE)
            if not data:
                raise HeadError("the connection closed before a complete answer")
            self._buffer += data
        raw = bytes(self._buffer[:end])
        del self._buffer[: end + 4]
        lines = raw.split(_CRLF)
        parts = lines[0].decode("latin-1").split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise HeadError(f"malformed status line {lines[0][:80]!r}")
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise HeadError(f"malformed header line {line[:80]!r} in an answer")
            headers.add(name.decode("latin-1").strip(), value.strip(b" \t").decode("latin-1"))
        reason = parts[2] if len(parts) > 2 else ""
        return ResponseHead(int(parts[1]), reason, CIMultiDictProxy(headers))

    def read_until_close(self, limit: int) -> bytes:
        data = bytearray(self.take_buffered())
        while len(data) <= limit and (more := self.sock.recv(RECV_SIZE)):
            data += more
        if len(data) > limit:
            raise HeadError(f"an answer body longer than {limit} bytes")
        return bytes(data)

    def take_buffered(self) -> bytes:
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def recv_into(self, view: memoryview) -> int:
        """Into `view`: buffered bytes first, then straight from the socket."""
        if self._buffer:
            n = min(len(view), len(self._buffer))
            view[:n] = self._buffer[:n]
            del self._buffer[:n]
            return n
        return self.sock.recv_into(view)

    def read_line(self) -> bytes:
        """One CRLF-terminated line (without it), for chunk sizes and trailers."""
        while (end := self._buffer.find(_CRLF)) < 0:
            if len(self._buffer) > CHUNK_LINE_LIMIT:
                raise BodyError("a chunk-size line is too long")
            data = self.sock.recv(CHUNK_LINE_LIMIT)
            if not data:
                raise BodyError("the connection closed inside the chunked framing")
            self._buffer += data
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 2]
        return line

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)


def parse_head(raw: bytes) -> RequestHead:
    lines = raw[:-4].split(_CRLF)
    try:
        method, target, version = lines[0].decode("ascii").split(" ")
    except (UnicodeDecodeError, ValueError):
        raise HeadError("malformed request line") from None
    if version not in ("HTTP/1.1", "HTTP/1.0") or not method.isalpha() or target[:1] != "/":
        raise HeadError(f"unsupported request line {lines[0][:80]!r}")
    if len(lines) - 1 > HEADER_COUNT_LIMIT:
        raise HeadError(f"more than {HEADER_COUNT_LIMIT} headers")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or not set(name) <= _TOKEN_CHARS:
            raise HeadError(f"malformed header line {line[:80]!r}")
        headers.add(name.decode("ascii"), value.strip(b" \t").decode("latin-1"))
    return RequestHead(method, target, version, CIMultiDictProxy(headers), raw)


class Body:
    """A request body read by a blocking thread: `read(n)` fills up to n bytes.

    A body that breaks off hands out what did arrive first and raises BodyError on the next
    read, so that a resumable upload keeps every byte it got. `Expect: 100-continue` is answered
    on the first read: a request refused before its body is read never makes the client send it.
    """

    def __init__(self, conn: Connection, length: int | None, *, expect_continue: bool) -> None:
        self._conn = conn
        self.length = length  # None: chunked
        self.received = 0
        self._chunk_left = 0
        self._done = length == 0
        self._error: BodyError | None = None
        self._expect_continue = expect_continue

    @property
    def complete(self) -> bool:
        return self._done and self._error is None

    def read(self, size: int) -> bytes:
        buf = bytearray(size)
        with memoryview(buf) as view:
            n = self.readinto(view)
        del buf[n:]
        return bytes(buf)

    def readinto(self, view: memoryview) -> int:
        """Fill `view` as far as the body goes; 0 at its end."""
        if self._error is not None:
            raise self._error
        if self._expect_continue:
            self._expect_continue = False
            self._conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        got = 0
        while got < len(view) and not self._done:
            try:
                n = self._read_some(view[got:])
            except (OSError, ssl.SSLError) as err:  # SSLError is an OSError; named for clarity
                # A fresh error, without the traceback whose frames hold views of the buffer.
                self._error = BodyError(str(err) if isinstance(err, BodyError) else self._why(err))
                if got:
                    return got
                raise self._error from None
            got += n
        return got

    def _read_some(self, view: memoryview) -> int:
        if self.length is not None:
            want = min(len(view), self.length - self.received)
            n = self._conn.recv_into(view[:want])
            if not n:
                raise BodyError(
                    f"the connection closed after {self.received} of {self.length} body bytes"
                )
            self.received += n
            self._done = self.received == self.length
            return n
        if not self._chunk_left:
            self._chunk_left = self._next_chunk_size()
            if not self._chunk_left:
                self._done = True
                return 0
        n = self._conn.recv_into(view[: min(len(view), self._chunk_left)])
        if not n:
            raise BodyError(f"the connection closed inside a chunk after {self.received} bytes")
        self.received += n
        self._chunk_left -= n
        if not self._chunk_left and self._conn.read_line():
            raise BodyError("malformed chunked body: no CRLF after a chunk")
        return n

    def _next_chunk_size(self) -> int:
        line = self._conn.read_line().split(b";", 1)[0].strip()
        try:
            size = int(line, 16)
        except ValueError:
            raise BodyError(f"malformed chunked body: chunk size {line[:20]!r}") from None
        if size < 0:
            raise BodyError("malformed chunked body: negative chunk size")
        if size == 0:
            while self._conn.read_line():  # trailers carry nothing we use
                pass
        return size

    def _why(self, err: BaseException) -> str:
        total = self.length if self.length is not None else "?"
        detail = str(err) or type(err).__name__
        return f"the body broke off after {self.received} of {total} bytes: {detail}"

    @property
    def awaits_continue(self) -> bool:
        """The client waits for `100 Continue` that was never sent: it sends no body."""
        return self._expect_continue

    def linger(self, seconds: float) -> None:
        """Read and drop the rest of a body answered early, for up to `seconds`: closing a
        socket with unread bytes resets the connection, and the client may then lose the
        answer while it is still sending (aiohttp lingers the same way)."""
        if self._done or self._error is not None or self._expect_continue:
            return
        deadline = time.monotonic() + seconds
        scratch = memoryview(bytearray(1 << 20))
        sock = self._conn.sock
        try:
            while not self._done:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                sock.settimeout(left)
                if not self.readinto(scratch):
                    return
        except OSError:
            return


def answer_bytes(
    status: int,
    body: bytes = b"",
    headers: Iterable[tuple[str, str]] = (),
    *,
    close: bool = False,
    head_only: bool = False,
    length: int | None = None,
) -> bytes:
    """A whole answer with its Content-Length (its body left out for HEAD); `length` claims
    another one (an answer relayed as cut as it came: the client must see it broke off)."""
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    lines = [f"HTTP/1.1 {status} {reason}"]
    names = set()
    for name, value in headers:
        if name.lower() in ("content-length", "connection", "transfer-encoding"):
            continue
        names.add(name.lower())
        lines.append(f"{name}: {value}")
    if "content-type" not in names and body:
        lines.append("Content-Type: text/plain; charset=utf-8")
    lines.append(f"Content-Length: {len(body) if length is None else length}")
    if close:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body
