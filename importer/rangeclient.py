"""Checked, retried ranged reads of one remote object over HTTP(S) or S3: "NBD with range checks".

Owns the byte-range protocol on the client side: building `Range: bytes=a-b` requests (or S3
ranged `get_object`), insisting on `206` with a `Content-Range` that names exactly the bytes asked
for and the size we expect, reading the body straight into the caller's buffer, and retrying
transient failures with bounded exponential backoff while keeping the bytes already received.
Also owns `SourceConfig`, the JSON file that hands all of this (secrets included) to the nbdkit
plugin without putting anything on a command line.

Called by `importer/nbdkit_plugin.py` inside nbdkit's embedded Python (one `RangeReader` shared by
every connection and worker thread, so it must stay thread-safe and synchronous) and by importer
code that wants a few bytes of a source without nbdkit.

Must not: import aiohttp or anything asyncio-based (it runs in nbdkit's threads); buffer a whole
range (bodies go into the caller's memory); follow a redirect to anything but http/https, or from
https down to http; put secrets in messages or logs (URLs are shown without userinfo and query,
header values never).

Error tree (grouped by what the caller does next):

    SourceError(ImageError)                base; str() is one line naming the source
    ├── SourceUnavailableError             transient failures outlasted the retries: retry later
    │                                      (also a cdi.image RetryableError)
    ├── SourceRefusedError                 the server said no (4xx): wrong URL, credentials or
    │                                      permissions; `status` has the code. A user error
    ├── RangeProtocolError                 the server broke the Range contract (200 instead of
    │                                      206, wrong Content-Range or length, encoded body):
    │                                      do not retry, stream the source instead
    ├── SourceSizeError                    the object's size is not the one expected: it changed
    ├── RedirectError                      a redirect to a forbidden scheme, a downgrade, a loop
    ├── TLSVerifyError                     the server's certificate did not verify
    └── RangeCheckError (also ValueError)  a caller asked for bytes outside [0, size): our bug
"""

from __future__ import annotations

import contextlib
import dataclasses
import email.utils
import http.client
import json
import logging
import os
import re
import stat
import threading
import time
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, Self

import urllib3
import urllib3.exceptions

from cdi.image.errors import ImageError, RetryableError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = [
    "DEFAULT_MAX_REQUEST",
    "READ_STEP",
    "HttpTransport",
    "RangeCheckError",
    "RangeProtocolError",
    "RangeReader",
    "RangeTransport",
    "RedirectError",
    "S3Location",
    "S3Transport",
    "SourceConfig",
    "SourceError",
    "SourceInfo",
    "SourceRefusedError",
    "SourceSizeError",
    "SourceUnavailableError",
    "TLSVerifyError",
    "open_reader",
    "open_transport",
    "probe_source",
    "redact_url",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST: Final = 32 * 1024 * 1024
"""Largest range asked for in one request. qemu-img reads at most 32 MiB per NBD request, and a
range that size keeps a retry's lost work small while large enough to amortise request latency
(the Python plugin measured 1.3 GB/s at 8 MiB, half that at 256 KiB)."""
MAX_REQUEST_LIMIT: Final = 64 * 1024 * 1024
"""nbdkit never passes a request larger than 64 MiB, so a bigger setting is certainly a mistake."""
MAX_REDIRECTS: Final = 5
MAX_BACKOFF: Final = 10.0
"""Cap on one backoff sleep (seconds): the retry budget stays a few tens of seconds, not hours."""
MAX_RETRY_AFTER: Final = 30.0
"""Cap on an honoured Retry-After (seconds): a server must not park an nbdkit thread for long."""
POOL_SIZE: Final = 32
"""Connections kept per host: nbdkit runs 16 threads per NBD connection and nbdcopy opens two."""
USER_AGENT: Final = "cdi-py-importer"
READ_STEP: Final = 1024 * 1024
"""Bytes asked of the socket per readinto while filling a range (see RangeReader._read_range)."""

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
_S3_TRANSIENT_CODES: Final = frozenset(
    {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling"}
)


# --------------------------------------------------------------------------------------------
# Errors


class SourceError(ImageError):
    """Reading the source failed. The message names the source (redacted) and the reason."""


class SourceUnavailableError(SourceError, RetryableError):
    """Transient failures (resets, timeouts, 5xx, 429, short bodies) outlasted the retries."""


class SourceRefusedError(SourceError):
    """The server refused with a 4xx status: the URL, credentials or permissions are wrong."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


class RangeProtocolError(SourceError):
    """The server does not honour byte ranges correctly; reading it by range is unsafe."""


class SourceSizeError(SourceError):
    """The object's total size is not the size we were told to expect."""


class RedirectError(SourceError):
    """A redirect we refuse to follow: another scheme, an https → http downgrade, too many hops."""


class TLSVerifyError(SourceError):
    """The server's TLS certificate did not verify against the configured CA bundle."""


class RangeCheckError(SourceError, ValueError):
    """A read outside [0, size): the caller asked for bytes that do not exist (a bug)."""


class _Transient(Exception):
    """One attempt failed in a way that may succeed if tried again; never leaves this module."""

    def __init__(self, reason: str, *, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


# --------------------------------------------------------------------------------------------
# Configuration (the JSON file handed to the nbdkit plugin)


def _take(data: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = data.pop(key, default)
    # bool is an int subclass; a size of `true` must not pass as 1.
    if value is not default and (
        not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind))
    ):
        raise ValueError(f"source config: {key!r} has the wrong type ({type(value).__name__})")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _reject_unknown(data: Mapping[str, Any], where: str) -> None:
    if data:
        raise ValueError(f"source config: unknown key(s) in {where}: {', '.join(sorted(data))}")


@dataclass(frozen=True, slots=True, kw_only=True)
class S3Location:
    """Where an S3 object lives and how to sign for it. Keys are secrets: never shown in repr."""

    bucket: str
    key: str
    endpoint_url: str | None = None
    """None means AWS itself; set for any other S3-compatible service."""
    access_key: str | None = field(default=None, repr=False)
    """None means boto3's default credential chain (environment, web identity, instance role)."""
    secret_key: str | None = field(default=None, repr=False)
    region: str = "us-east-1"

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> S3Location:
        data = dict(raw)
        loc = cls(
            bucket=_take(data, "bucket", str, None),
            key=_take(data, "key", str, None),
            endpoint_url=_take(data, "endpoint_url", (str, type(None)), None),
            access_key=_take(data, "access_key", (str, type(None)), None),
            secret_key=_take(data, "secret_key", (str, type(None)), None),
            region=_take(data, "region", str, "us-east-1"),
        )
        _reject_unknown(data, "s3")
        if not loc.bucket or not loc.key:
            raise ValueError("source config: s3 needs both 'bucket' and 'key'")
        return loc

    @property
    def name(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceConfig:
    """Everything needed to read one source by range; the plugin's only configuration.

    Written by the importer with `save()` (mode 0600, because it holds credentials) and read by
    the plugin with `load()`, which rejects unknown keys and files readable by others.
    """

    kind: Literal["http", "s3"]
    url: str = ""
    """The source URL (http kind); for the s3 kind only a name for messages."""
    size: int | None = None
    """Expected total size in bytes; None means "learn it from the server" (not for the plugin)."""
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    """Extra request headers (may carry credentials, hence hidden from repr)."""
    ca_file: str | None = None
    """PEM bundle to verify the server with; None means the system's trust store."""
    insecure: bool = False
    """Skip TLS verification entirely (CDI's insecureSkipVerify)."""
    s3: S3Location | None = None
    retries: int = 5
    """Retries after the first failed attempt of one request; each waits `backoff` * 2**n s."""
    backoff: float = 0.5
    """First backoff sleep in seconds; doubles per retry, capped at MAX_BACKOFF."""
    timeout: float = 60.0
    """Seconds for connecting and for each socket read; a stalled server costs at most this."""
    max_request: int = DEFAULT_MAX_REQUEST
    """Largest range in one request; bigger reads are split."""

    def __post_init__(self) -> None:
        if self.kind not in ("http", "s3"):
            raise ValueError(f"source config: kind must be 'http' or 's3', not {self.kind!r}")
        if self.kind == "http" and not self.url:
            raise ValueError("source config: kind 'http' needs a 'url'")
        if self.kind == "s3" and self.s3 is None:
            raise ValueError("source config: kind 's3' needs an 's3' section")
        if self.size is not None and self.size < 0:
            raise ValueError("source config: 'size' must not be negative")
        if not 0 <= self.retries <= 100:
            raise ValueError("source config: 'retries' must be within 0..100")
        if not 0 <= self.backoff <= 60:
            raise ValueError("source config: 'backoff' must be within 0..60 seconds")
        if not 0 < self.timeout <= 3600:
            raise ValueError("source config: 'timeout' must be within (0, 3600] seconds")
        if not 1 <= self.max_request <= MAX_REQUEST_LIMIT:
            raise ValueError(f"source config: 'max_request' must be within 1..{MAX_REQUEST_LIMIT}")

    @property
    def name(self) -> str:
        """The source as shown in messages: no credentials, no query string."""
        if self.kind == "s3" and self.s3 is not None:
            return self.s3.name
        return redact_url(self.url)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> SourceConfig:
        data = dict(raw)
        headers = _take(data, "headers", dict, {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
            raise ValueError("source config: 'headers' must map strings to strings")
        s3_raw = _take(data, "s3", (dict, type(None)), None)
        config = cls(
            kind=_take(data, "kind", str, None),
            url=_take(data, "url", str, ""),
            size=_take(data, "size", (int, type(None)), None),
            headers=dict(headers),
            ca_file=_take(data, "ca_file", (str, type(None)), None),
            insecure=_take(data, "insecure", bool, False),
            s3=S3Location.from_dict(s3_raw) if s3_raw is not None else None,
            retries=_take(data, "retries", int, 5),
            backoff=float(_take(data, "backoff", (int, float), 0.5)),
            timeout=float(_take(data, "timeout", (int, float), 60.0)),
            max_request=_take(data, "max_request", int, DEFAULT_MAX_REQUEST),
        )
        _reject_unknown(data, "the top level")
        return config

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["headers"] = dict(self.headers)
        return data

    @classmethod
    def load(cls, path: str) -> SourceConfig:
        """Read a config file, refusing one that group or others could read (it holds secrets)."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise ValueError(
                    f"source config {path}: mode {stat.S_IMODE(mode):04o} lets others read "
                    "credentials; it must be 0600"
                )
            # A config is a few hundred bytes; anything huge is not ours.
            raw = f.read(1024 * 1024 + 1)
        if len(raw) > 1024 * 1024:
            raise ValueError(f"source config {path}: larger than 1 MiB")
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError(f"source config {path}: expected a JSON object")
        return cls.from_dict(data)

    def save(self, path: str) -> None:
        """Write the config with mode 0600 from the first byte (never briefly world-readable)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            # An existing file keeps its old mode through O_CREAT; force ours.
            os.fchmod(f.fileno(), 0o600)
            json.dump(self.to_dict(), f)


def redact_url(url: str) -> str:
    """`url` without userinfo, query or fragment: keeps presigned URLs and passwords out of logs."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<unparsable url>"
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port is not None else host
    suffix = "?…" if parts.query else ""
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", "")) + suffix


# --------------------------------------------------------------------------------------------
# Transports: one request for one range, headers checked, body not yet read


class RangeBody(Protocol):
    """The body of one checked 206 response."""

    def readinto(self, view: memoryview) -> int:
        """Read into `view`; 0 means the body ended. Network failures raise `_Transient`."""
        ...

    def finish(self) -> None:
        """All bytes asked for were read: check that nothing follows, reuse the connection."""
        ...

    def discard(self) -> None:
        """Abandon the body and its connection (after an error or a partial read)."""
        ...


@dataclass(frozen=True, slots=True)
class RangeReply:
    """A response whose status and headers passed the checks; `total` is from Content-Range."""

    total: int
    body: RangeBody
    content_type: str | None = None
    accept_ranges: str | None = None
    url: str = ""


class RangeTransport(Protocol):
    """Asks for one byte range. Checks status and headers, not the size (the reader does)."""

    @property
    def name(self) -> str: ...

    def get_range(self, first: int, last: int) -> RangeReply:
        """Request bytes first..last (inclusive). Raises `_Transient` or a `SourceError`."""
        ...

    def close(self) -> None: ...


def check_content_range(value: str | None, first: int, last: int, *, source: str) -> int:
    """Return the total size from a Content-Range that names exactly first..last, else raise."""
    if value is None:
        raise RangeProtocolError(
            f"{source}: 206 response without Content-Range for bytes {first}-{last}"
        )
    match = _CONTENT_RANGE.fullmatch(value.strip())
    if match is None:
        raise RangeProtocolError(
            f"{source}: malformed Content-Range {value!r} for bytes {first}-{last}"
        )
    got_first, got_last, total = (int(g) for g in match.groups())
    if (got_first, got_last) != (first, last) or last >= total:
        raise RangeProtocolError(
            f"{source}: Content-Range {value!r} does not match the requested bytes {first}-{last}"
        )
    return total


def _check_length(value: int | str | None, first: int, last: int, *, source: str) -> None:
    """A Content-Length, when present, must be exactly the length of the range asked for."""
    if value is None:
        return
    try:
        length = int(value)
    except ValueError:
        raise RangeProtocolError(f"{source}: malformed Content-Length {value!r}") from None
    if length != last - first + 1:
        raise RangeProtocolError(
            f"{source}: Content-Length {length} does not match the requested length "
            f"{last - first + 1} (bytes {first}-{last})"
        )


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date), capped; None if absent."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    with contextlib.suppress(TypeError, ValueError):
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, min((when - datetime.now(UTC)).total_seconds(), MAX_RETRY_AFTER))
    return None


class _Urllib3Body:
    """A urllib3 response body read with `readinto` straight into the caller's memory.

    urllib3's own `readinto` reads into a temporary bytes object and copies it; for 32 MiB reads
    that doubles the memory traffic. Its `_fp` is the standard library's `http.client`
    response, whose `readinto` lands in our buffer directly and still enforces Content-Length and
    chunked framing (IncompleteRead on a short body). We fall back to the copying path if a future
    urllib3 stops exposing it.
    """

    def __init__(self, resp: urllib3.BaseHTTPResponse, *, source: str) -> None:
        self._resp = resp
        self._source = source
        fp = getattr(resp, "_fp", None)
        self._fp = fp if isinstance(fp, http.client.HTTPResponse) else None

    def readinto(self, view: memoryview) -> int:
        try:
            if self._fp is not None:
                return self._fp.readinto(view)
            return self._resp.readinto(view)
        except (OSError, http.client.HTTPException, urllib3.exceptions.HTTPError) as exc:
            raise _Transient(f"connection broken while reading the body: {exc!r}") from exc

    def finish(self) -> None:
        # One more byte must be impossible: a body longer than the range is a protocol error.
        with memoryview(bytearray(1)) as probe:
            if self.readinto(probe) != 0:
                raise RangeProtocolError(f"{self._source}: body is longer than the range asked for")
        self._resp.release_conn()

    def discard(self) -> None:
        # Closing drops the connection; unread bytes on it would corrupt the next response.
        self._resp.close()
        self._resp.release_conn()


def _silence_insecure_warning() -> None:
    """The user chose not to verify TLS (CDI's insecureSkipVerify); we log that once, while
    urllib3 would warn on every request. The filter is process-wide, which is what the plugin
    process wants; it only ever silences this one warning category."""
    log.warning("TLS verification is disabled for this source (insecure=true)")
    warnings.filterwarnings("ignore", category=urllib3.exceptions.InsecureRequestWarning)


def _proxy_for(url: str) -> str | None:
    """The proxy for `url` from http_proxy/https_proxy/no_proxy (either case), or None."""
    parts = urllib.parse.urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(parts.scheme)
    # On Linux proxy_bypass is the environment variant: it reads no_proxy/NO_PROXY.
    if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return proxy


class HttpTransport:
    """Ranged GETs against one HTTP(S) URL with a urllib3 pool shared by all threads.

    Redirects are followed by hand so that every hop is checked: only http/https, never from https
    down to http, at most MAX_REDIRECTS, and an Authorization header is not sent to another origin
    (what curl and requests do; a presigned target would also reject it). Redirects are followed
    afresh on every request rather than cached: a presigned target may expire, the URL we were
    given stays the source of truth. Proxies come from the environment as curl reads them.
    """

    def __init__(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        ca_file: str | None = None,
        insecure: bool = False,
        timeout: float = 60.0,
        pool_size: int = POOL_SIZE,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {redact_url(url)}")
        self._headers: dict[str, str] = {"User-Agent": USER_AGENT}
        if parts.username is not None:
            # user:pass@ in the URL becomes Basic auth and leaves the URL (and so the logs).
            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
            self._headers.update(urllib3.make_headers(basic_auth=f"{user}:{password}"))
            netloc = parts.netloc.rpartition("@")[2]
            url = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
        self._headers.update(headers or {})
        # Ranges are of the stored bytes; a compressed representation would shift every offset.
        self._headers["Accept-Encoding"] = "identity"
        self._url = url
        self._name = redact_url(url)
        self._pool_kw: dict[str, Any] = {
            "num_pools": 4,
            "maxsize": pool_size,
            "block": False,
            "timeout": urllib3.Timeout(connect=timeout, read=timeout),
            "retries": False,
        }
        if insecure:
            self._pool_kw |= {"cert_reqs": "CERT_NONE", "assert_hostname": False}
            _silence_insecure_warning()
        else:
            self._pool_kw |= {"cert_reqs": "CERT_REQUIRED", "ca_certs": ca_file}
        self._managers: dict[str | None, urllib3.PoolManager] = {}
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self._name

    def _manager(self, url: str) -> urllib3.PoolManager:
        proxy = _proxy_for(url)
        with self._lock:
            manager = self._managers.get(proxy)
            if manager is None:
                if proxy is None:
                    manager = urllib3.PoolManager(**self._pool_kw)
                else:
                    pparts = urllib.parse.urlsplit(proxy)
                    proxy_headers = (
                        urllib3.make_headers(
                            proxy_basic_auth=f"{urllib.parse.unquote(pparts.username)}:"
                            f"{urllib.parse.unquote(pparts.password or '')}"
                        )
                        if pparts.username is not None
                        else None
                    )
                    manager = urllib3.ProxyManager(
                        proxy, proxy_headers=proxy_headers, **self._pool_kw
                    )
                    log.info("using proxy proxy=%s source=%s", redact_url(proxy), self._name)
                self._managers[proxy] = manager
            return manager

    def _request(self, url: str, headers: Mapping[str, str]) -> urllib3.BaseHTTPResponse:
        try:
            return self._manager(url).request(
                "GET",
                url,
                headers=dict(headers),
                redirect=False,
                preload_content=False,
                decode_content=False,
            )
        except urllib3.exceptions.SSLError as exc:
            if "CERTIFICATE_VERIFY_FAILED" in str(exc) or "hostname" in str(exc).lower():
                raise TLSVerifyError(
                    f"{self._name}: TLS certificate verification failed: {exc}"
                ) from exc
            raise _Transient(f"TLS error: {exc}") from exc
        except urllib3.exceptions.LocationValueError as exc:
            raise SourceError(f"{self._name}: invalid URL: {exc}") from exc
        except (urllib3.exceptions.HTTPError, OSError, http.client.HTTPException) as exc:
            raise _Transient(f"request failed: {exc!r}") from exc

    def _redirect(self, url: str, resp: urllib3.BaseHTTPResponse, hops: int) -> str:
        location = resp.headers.get("Location")
        if not location:
            raise RangeProtocolError(f"{self._name}: {resp.status} redirect without a Location")
        target = urllib.parse.urljoin(url, location)
        old, new = urllib.parse.urlsplit(url), urllib.parse.urlsplit(target)
        if new.scheme not in ("http", "https"):
            raise RedirectError(
                f"{self._name}: refusing redirect to scheme {new.scheme!r} "
                f"({redact_url(target)}); only http and https are allowed"
            )
        if old.scheme == "https" and new.scheme == "http":
            raise RedirectError(
                f"{self._name}: refusing redirect from https down to http ({redact_url(target)})"
            )
        if hops >= MAX_REDIRECTS:
            raise RedirectError(f"{self._name}: more than {MAX_REDIRECTS} redirects")
        log.debug("following redirect status=%d to=%s", resp.status, redact_url(target))
        return target

    def get_range(self, first: int, last: int) -> RangeReply:
        url = self._url
        headers = dict(self._headers)
        headers["Range"] = f"bytes={first}-{last}"
        origin = urllib.parse.urlsplit(url)[:2]
        for hops in range(MAX_REDIRECTS + 1):
            resp = self._request(url, headers)
            try:
                if resp.status in _REDIRECTS:
                    url = self._redirect(url, resp, hops)
                    if urllib.parse.urlsplit(url)[:2] != origin:
                        headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
                    # Not drained: a redirect's body could be anything, and one lost keep-alive
                    # connection per redirect costs nothing.
                    resp.close()
                    resp.release_conn()
                    continue
                reply = self._check(resp, first, last, url)
            except BaseException:
                resp.close()
                resp.release_conn()
                raise
            return reply
        raise RedirectError(f"{self._name}: more than {MAX_REDIRECTS} redirects")  # unreachable

    def _check(self, resp: urllib3.BaseHTTPResponse, first: int, last: int, url: str) -> RangeReply:
        status = resp.status
        if status == 206:
            encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise RangeProtocolError(
                    f"{self._name}: body is {encoding}-encoded although identity was asked for; "
                    "byte ranges of it are meaningless"
                )
            total = check_content_range(
                resp.headers.get("Content-Range"), first, last, source=self._name
            )
            _check_length(resp.headers.get("Content-Length"), first, last, source=self._name)
            return RangeReply(
                total=total,
                body=_Urllib3Body(resp, source=self._name),
                content_type=resp.headers.get("Content-Type"),
                accept_ranges=resp.headers.get("Accept-Ranges"),
                url=url,
            )
        if status == 200:
            raise RangeProtocolError(
                f"{self._name}: server ignored the Range header (200 instead of 206 for "
                f"bytes {first}-{last}); it does not support byte ranges"
            )
        if status == 416:
            raise RangeProtocolError(
                f"{self._name}: range {first}-{last} not satisfiable (416, Content-Range "
                f"{resp.headers.get('Content-Range')!r}); the object is smaller than expected"
            )
        if status in (408, 429) or status >= 500:
            raise _Transient(
                f"HTTP {status} {resp.reason or ''}".strip(),
                retry_after=_retry_after(resp.headers.get("Retry-After")),
            )
        if 400 <= status < 500:
            raise SourceRefusedError(
                f"{self._name}: HTTP {status} {resp.reason or ''}".rstrip(), status=status
            )
        raise RangeProtocolError(
            f"{self._name}: unexpected HTTP status {status} to a Range request"
        )

    def close(self) -> None:
        with self._lock:
            managers, self._managers = list(self._managers.values()), {}
        for manager in managers:
            manager.clear()


class S3Transport:
    """Ranged `get_object` calls through one boto3 client (thread-safe, shared by all threads).

    boto3's own retries are switched off so that one policy (the reader's, which resumes) applies;
    addressing is path-style, which every S3-compatible service understands.
    """

    def __init__(
        self,
        location: S3Location,
        *,
        ca_file: str | None = None,
        insecure: bool = False,
        timeout: float = 60.0,
        pool_size: int = POOL_SIZE,
    ) -> None:
        # Imported here: boto3 takes ~0.3 s to import and the http kind never needs it.
        import boto3.session  # noqa: PLC0415
        import botocore.config  # noqa: PLC0415

        self._location = location
        self._name = location.name
        config = botocore.config.Config(
            s3={"addressing_style": "path"},
            retries={"total_max_attempts": 1},
            connect_timeout=timeout,
            read_timeout=timeout,
            max_pool_connections=pool_size,
            # A ranged GET cannot be checked against a whole-object checksum anyway.
            response_checksum_validation="when_required",
            user_agent_extra=USER_AGENT,
        )
        verify: bool | str = False if insecure else (ca_file or True)
        if insecure:
            _silence_insecure_warning()
        self._client: S3Client = boto3.session.Session().client(
            "s3",
            endpoint_url=location.endpoint_url,
            aws_access_key_id=location.access_key,
            aws_secret_access_key=location.secret_key,
            region_name=location.region,
            config=config,
            verify=verify,
        )

    @property
    def name(self) -> str:
        return self._name

    def get_range(self, first: int, last: int) -> RangeReply:
        import botocore.exceptions as bexc  # noqa: PLC0415 (see __init__)

        try:
            out = self._client.get_object(
                Bucket=self._location.bucket,
                Key=self._location.key,
                Range=f"bytes={first}-{last}",
            )
        except bexc.ClientError as exc:
            meta = exc.response.get("ResponseMetadata", {})
            status = int(meta.get("HTTPStatusCode", 0))
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            message = f"{code}: {error.get('Message', '')}".strip(": ")
            if status in (408, 429) or status >= 500 or code in _S3_TRANSIENT_CODES:
                headers = meta.get("HTTPHeaders", {})
                raise _Transient(
                    f"S3 {status} {message}", retry_after=_retry_after(headers.get("retry-after"))
                ) from exc
            if status == 416 or code == "InvalidRange":
                raise RangeProtocolError(
                    f"{self._name}: range {first}-{last} not satisfiable ({message})"
                ) from exc
            raise SourceRefusedError(f"{self._name}: S3 {status} {message}", status=status) from exc
        except bexc.SSLError as exc:
            raise TLSVerifyError(f"{self._name}: TLS verification failed: {exc}") from exc
        except (bexc.ConnectionError, bexc.HTTPClientError) as exc:
            raise _Transient(f"request failed: {exc}") from exc
        except bexc.BotoCoreError as exc:
            raise SourceError(f"{self._name}: {exc}") from exc
        body = out["Body"]
        # The urllib3 response under botocore's wrapper, so the body lands in our buffer uncopied.
        raw: urllib3.BaseHTTPResponse = body._raw_stream  # type: ignore[attr-defined]
        try:
            status = out["ResponseMetadata"]["HTTPStatusCode"]
            if status != 206:
                raise RangeProtocolError(
                    f"{self._name}: server ignored the Range ({status} instead of 206 for "
                    f"bytes {first}-{last})"
                )
            total = check_content_range(out.get("ContentRange"), first, last, source=self._name)
            _check_length(out.get("ContentLength"), first, last, source=self._name)
        except BaseException:
            raw.close()
            raw.release_conn()
            raise
        return RangeReply(
            total=total,
            body=_Urllib3Body(raw, source=self._name),
            content_type=out.get("ContentType"),
            accept_ranges=out.get("AcceptRanges"),
            url=self._name,
        )

    def close(self) -> None:
        self._client.close()


# --------------------------------------------------------------------------------------------
# The reader: range checks, splitting, retries with resume


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """What a probe learnt: size from Content-Range, plus headers the importer may log."""

    size: int
    content_type: str | None
    accept_ranges: str | None
    url: str
    """The URL the probe ended at after redirects (redacted), for logs."""


class RangeReader:
    """Reads any byte range of a source of known size into caller memory, with checks and retries.

    Thread-safe: any number of threads may call `readinto` at once (the transports pool their
    connections). Each call is split into requests of at most `max_request` bytes; each request may
    fail transiently `retries` times, and every retry asks only for the bytes still missing.
    """

    def __init__(
        self,
        transport: RangeTransport,
        *,
        size: int,
        retries: int = 5,
        backoff: float = 0.5,
        max_request: int = DEFAULT_MAX_REQUEST,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if size < 0 or retries < 0 or backoff < 0 or max_request < 1:
            raise ValueError("size, retries and backoff must be >= 0 and max_request >= 1")
        self._transport = transport
        self._size = size
        self._retries = retries
        self._backoff = backoff
        self._max_request = max_request
        self._sleep = sleep

    @property
    def size(self) -> int:
        return self._size

    @property
    def name(self) -> str:
        return self._transport.name

    def readinto(self, buf: Any, offset: int) -> int:
        """Fill all of `buf` (any writable buffer) with the bytes at `offset`; return its length.

        Raises RangeCheckError if the range is not inside [0, size), SourceUnavailableError when
        retries run out, and the other SourceErrors for permanent failures.
        """
        with memoryview(buf) as outer, outer.cast("B") as view:
            length = len(view)
            if offset < 0 or offset + length > self._size:
                raise RangeCheckError(
                    f"{self.name}: read of {length} bytes at offset {offset} is outside the "
                    f"source (size {self._size})"
                )
            for start in range(0, length, self._max_request):
                with view[start : start + self._max_request] as chunk:
                    self._read_range(chunk, offset + start)
        return length

    def read(self, offset: int, length: int) -> bytes:
        """`length` bytes at `offset`; for small reads (headers, probes), not for data copies."""
        buf = bytearray(length)
        self.readinto(buf, offset)
        return bytes(buf)

    def _read_range(self, view: memoryview, offset: int) -> None:
        done = 0

        def attempt() -> None:
            nonlocal done
            if done == len(view):
                # Every byte arrived and only the end of the response failed: nothing to ask for.
                return
            reply = self._transport.get_range(offset + done, offset + len(view) - 1)
            body = reply.body
            try:
                if reply.total != self._size:
                    raise SourceSizeError(
                        f"{self.name}: server reports size {reply.total}, expected {self._size}; "
                        "the object changed"
                    )
                # Bounded: each turn either moves `done` forward or leaves the loop.
                while done < len(view):
                    # In steps: a timeout loses the bytes of the readinto it interrupts (the
                    # buffered socket reader does not report partial progress), at most one step.
                    with view[done : done + READ_STEP] as rest:
                        n = body.readinto(rest)
                    if n == 0:
                        raise _Transient(
                            f"short body: got {done} of {len(view)} bytes at offset {offset}"
                        )
                    done += n
                body.finish()
            except BaseException:
                body.discard()
                raise

        _retrying(
            attempt,
            what=lambda: f"read offset={offset + done} length={len(view) - done}",
            source=self.name,
            retries=self._retries,
            backoff=self._backoff,
            sleep=self._sleep,
        )

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _backoff_delays(backoff: float) -> Iterator[float]:
    delay = backoff
    while True:
        yield min(delay, MAX_BACKOFF)
        delay *= 2


def _retrying(
    attempt: Callable[[], None],
    *,
    what: Callable[[], str],
    source: str,
    retries: int,
    backoff: float,
    sleep: Callable[[float], None],
) -> None:
    """Run `attempt` until it succeeds, at most 1 + `retries` times; only `_Transient` retries."""
    delays = _backoff_delays(backoff)
    for failures in range(retries + 1):
        try:
            attempt()
            return
        except _Transient as exc:
            if failures == retries:
                raise SourceUnavailableError(
                    f"{source}: giving up after {retries + 1} attempts ({what()}): {exc.reason}"
                ) from exc
            delay = next(delays)
            if exc.retry_after is not None:
                delay = max(delay, exc.retry_after)
            log.warning(
                "retrying source=%s %s attempt=%d/%d delay=%.2fs reason=%s",
                source,
                what(),
                failures + 1,
                retries + 1,
                delay,
                exc.reason,
            )
            sleep(delay)


def probe_source(
    transport: RangeTransport,
    *,
    retries: int = 5,
    backoff: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
) -> SourceInfo:
    """Ask for the first byte, retrying like any read: proves Range works and learns the size."""
    info: list[SourceInfo] = []

    def attempt() -> None:
        reply = transport.get_range(0, 0)
        try:
            with memoryview(bytearray(1)) as one:
                if reply.body.readinto(one) != 1:
                    raise _Transient("short body: no byte in the 1-byte probe")
            reply.body.finish()
        except BaseException:
            reply.body.discard()
            raise
        info.append(
            SourceInfo(
                size=reply.total,
                content_type=reply.content_type,
                accept_ranges=reply.accept_ranges,
                url=redact_url(reply.url),
            )
        )

    _retrying(
        attempt,
        what=lambda: "probe",
        source=transport.name,
        retries=retries,
        backoff=backoff,
        sleep=sleep,
    )
    return info[0]


def open_transport(config: SourceConfig) -> RangeTransport:
    """The transport for `config.kind`; the one place that maps kinds to implementations."""
    if config.kind == "s3":
        assert config.s3 is not None  # enforced by SourceConfig
        return S3Transport(
            config.s3, ca_file=config.ca_file, insecure=config.insecure, timeout=config.timeout
        )
    return HttpTransport(
        config.url,
        headers=config.headers,
        ca_file=config.ca_file,
        insecure=config.insecure,
        timeout=config.timeout,
    )


def open_reader(config: SourceConfig) -> tuple[RangeReader, SourceInfo]:
    """Probe the source and return a reader for it, verifying `config.size` if one is given.

    The probe is a 1-byte ranged read, retried like any read: it proves the server honours Range
    and learns the total from Content-Range. A size mismatch raises SourceSizeError.
    """
    transport = open_transport(config)
    try:
        info = probe_source(transport, retries=config.retries, backoff=config.backoff)
        if config.size is not None and info.size != config.size:
            raise SourceSizeError(
                f"{config.name}: server reports size {info.size}, expected {config.size}"
            )
        reader = RangeReader(
            transport,
            size=info.size,
            retries=config.retries,
            backoff=config.backoff,
            max_request=config.max_request,
        )
    except BaseException:
        transport.close()
        raise
    return reader, info
