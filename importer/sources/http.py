"""HTTP(S) import source on aiohttp: probe, redirect checks, streaming with resume (reference §5.6).

Redirects are followed once, at probe time, by hand so that every hop's scheme is checked (only
http and https; a redirect to file:// or ftp:// is refused). The final URL is used from then on.
Custom CAs come from IMPORTER_CERT_DIR (every non-dot file), basic auth from the access key and
secret, extra headers go on every request, proxies come from the environment (both cases).
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp

from importer.errors import SourceError
from importer.settings import ImporterSettings
from importer.sources.base import CHUNK_SIZE, MAX_STREAM_RETRIES, SourceInfo

log = logging.getLogger(__name__)

USER_AGENT = "cdi-py-importer"
MAX_REDIRECTS = 10
_ALLOWED_SCHEMES = ("http", "https")
# What a broken or stalled body looks like; worth a resume when the server serves ranges.
_STREAM_ERRORS = (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


def ca_bundle_files(settings: ImporterSettings) -> list[Path]:
    """Every CA file to trust: the source's cert dir, then the import proxy's."""
    found: list[Path] = []
    for directory in (settings.cert_dir, settings.proxy_cert_dir):
        if directory is not None:
            found += sorted(
                p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")
            )
    return found


def build_ssl_context(settings: ImporterSettings) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.insecure_tls:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    for path in ca_bundle_files(settings):
        try:
            ctx.load_verify_locations(cafile=str(path))
        except (ssl.SSLError, ValueError) as err:
            raise SourceError(
                "http",
                f"certificate file {path.name} in {path.parent} is not a PEM certificate: {err}",
            ) from None
    return ctx


def _status_detail(resp: aiohttp.ClientResponse, expected: int = 200) -> str:
    return (
        f"expected status code {expected}, got {resp.status}. "
        f"Status: {resp.status} {resp.reason or ''}".rstrip()
    )


def _describe(err: BaseException) -> str:
    if isinstance(err, aiohttp.ClientConnectorCertificateError):
        return (
            f"TLS certificate of {err.host} not trusted ({err.certificate_error}); "
            "add its CA to the certConfigMap or set insecureSkipVerify"
        )
    if isinstance(err, aiohttp.ClientSSLError):
        return f"TLS handshake failed: {err}"
    if isinstance(err, asyncio.TimeoutError):
        return "timed out waiting for the server"
    return str(err) or type(err).__name__


class HttpSource:
    kind = "http"

    def __init__(self, settings: ImporterSettings) -> None:
        self._settings = settings
        self._url = settings.endpoint
        self._info: SourceInfo | None = None
        scheme = urlsplit(self._url).scheme
        if scheme not in _ALLOWED_SCHEMES:
            raise SourceError("http", f"URL scheme {scheme!r} is not supported; use http or https")
        self._ssl = build_ssl_context(settings)
        self._auth = (
            aiohttp.BasicAuth(settings.access_key_id, settings.secret_key or "")
            if settings.access_key_id
            else None
        )
        self._headers = {"User-Agent": USER_AGENT, **dict(settings.extra_headers)}
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(
                total=None, sock_connect=60, sock_read=self._settings.stall_timeout
            )
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=4),
                timeout=timeout,
                trust_env=True,  # http_proxy / https_proxy / no_proxy, either case
                auto_decompress=False,  # bytes as served: the checksum is over them
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _request(
        self, method: str, url: str, headers: dict[str, str] | None = None
    ) -> aiohttp.ClientResponse:
        try:
            return await self._client().request(
                method,
                url,
                headers={**self._headers, **(headers or {})},
                auth=self._auth,
                allow_redirects=False,
            )
        except (TimeoutError, aiohttp.ClientError, OSError) as err:
            raise SourceError("http", _describe(err)) from err

    async def _follow(
        self, method: str, headers: dict[str, str] | None = None
    ) -> aiohttp.ClientResponse:
        """One request with redirects followed by hand, each hop's scheme checked."""
        url = self._url
        for _ in range(MAX_REDIRECTS + 1):
            resp = await self._request(method, url, headers)
            if resp.status not in (301, 302, 303, 307, 308):
                self._url = url
                return resp
            location = resp.headers.get("Location", "")
            resp.release()
            target = urljoin(url, location)
            scheme = urlsplit(target).scheme
            if scheme not in _ALLOWED_SCHEMES:
                raise SourceError(
                    "http",
                    f"redirect from {url} to {target} refused: only http and https "
                    "redirects are followed",
                )
            log.info("redirect from=%s to=%s", url, target)
            url = target
        raise SourceError("http", f"more than {MAX_REDIRECTS} redirects")

    async def probe(self) -> SourceInfo:
        if self._info is not None:
            return self._info
        size: int | None = None
        ranges = False
        resp = await self._follow("HEAD")
        if 200 <= resp.status < 300:
            if length := resp.headers.get("Content-Length"):
                size = int(length) if length.isdigit() else None
            ranges = resp.headers.get("Accept-Ranges", "").lower() == "bytes"
        resp.release()
        # Ask for one byte by range: it proves range support (servers lie in Accept-Ranges),
        # gives the size when HEAD was refused, and surfaces 404/403 with CDI's wording.
        resp = await self._follow("GET", {"Range": "bytes=0-0"})
        try:
            if resp.status == 206:
                m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
                if m and m[3] != "*" and int(m[1]) == 0 and int(m[2]) == 0:
                    total = int(m[3])
                    if size is not None and size != total:
                        log.warning("size mismatch head=%d range=%d; trusting range", size, total)
                    size, ranges = total, True
                else:
                    ranges = False
            elif resp.status == 416 and (
                size == 0 or resp.headers.get("Content-Range", "") == "bytes */0"
            ):
                size, ranges = 0, False  # an empty file has no byte 0 to ask for
            elif resp.status == 200:
                ranges = False
                if length := resp.headers.get("Content-Length"):
                    size = int(length) if length.isdigit() else size
            else:
                raise SourceError("http", _status_detail(resp))
            ctype = resp.headers.get("Content-Type", "")
            if ctype.startswith("text/"):
                log.warning("content type is %s; continuing, the inspector decides", ctype)
        finally:
            resp.close()
        self._info = SourceInfo(size=size, ranges=ranges, url=self._url)
        log.info("probed url=%s size=%s ranges=%s", self._url, size, ranges)
        return self._info

    async def stream(self, offset: int = 0) -> AsyncIterator[bytes]:
        info = await self.probe()
        retries = 0
        while True:
            headers = {"Range": f"bytes={offset}-"} if offset else {}
            resp = await self._request("GET", self._url, headers)
            try:
                expected = 206 if offset else 200
                if resp.status != expected:
                    raise SourceError("http", _status_detail(resp, expected))
                if offset:
                    m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
                    if not m or int(m[1]) != offset:
                        raise SourceError(
                            "http",
                            f"resume at byte {offset} answered with "
                            f"Content-Range {resp.headers.get('Content-Range')!r}",
                        )
                try:
                    async for chunk in resp.content.iter_chunked(CHUNK_SIZE):
                        offset += len(chunk)
                        retries = 0
                        yield chunk
                except (
                    TimeoutError,
                    aiohttp.ClientPayloadError,
                    aiohttp.ClientConnectionError,
                ) as err:
                    if info.size is not None and offset >= info.size:
                        return
                    if not info.ranges or retries >= MAX_STREAM_RETRIES:
                        what = (
                            "server stopped sending"
                            if isinstance(err, asyncio.TimeoutError)
                            else "connection lost"
                        )
                        raise SourceError(
                            "http",
                            f"{what} after {offset} of "
                            f"{info.size if info.size is not None else '?'} bytes "
                            f"({_describe(err)})",
                        ) from err
                    retries += 1
                    log.warning(
                        "resuming offset=%d attempt=%d error=%s", offset, retries, _describe(err)
                    )
                    await asyncio.sleep(min(0.2 * 2**retries, 5.0))
                    continue
                if info.size is not None and offset < info.size:
                    if not info.ranges or retries >= MAX_STREAM_RETRIES:
                        raise SourceError("http", f"body ended after {offset} of {info.size} bytes")
                    retries += 1
                    continue
                return
            finally:
                resp.release()

    def plugin_config(self) -> dict[str, Any]:
        if self._info is None:
            raise RuntimeError("probe() first")
        headers = dict(self._headers)
        if self._auth is not None:
            headers["Authorization"] = self._auth.encode()
        ca = ca_bundle_files(self._settings)
        return {
            "kind": "http",
            "url": self._info.url,
            "size": self._info.size,
            "headers": headers,
            "ca_files": [str(p) for p in ca],
            "insecure": self._settings.insecure_tls,
            "timeout": self._settings.stall_timeout,
        }
