"""Talking to upload servers: the proxy's mutual TLS, and one request streamed through.

TLS (reference §6.1, §6.5): the proxy presents the client certificate of Secret
`cdi-uploadserver-client-cert` (`tls.crt`, `tls.key`, CN `client.upload-server.cdi.kubevirt.io`)
and trusts the CAs of ConfigMap `cdi-uploadserver-signer-bundle` (`ca-bundle.crt`), both in CDI's
namespace and read through the API. The `ssl.SSLContext` made from them is kept, and made again
(at most every `reload_interval` seconds) after a TLS failure or a 401 from an upload server:
the controller re-issues the client certificate and rotates the CA in place.

`Forwarder` serves the requests the blocking relay (`uploadproxy.relay`) leaves to the aiohttp
app: those from browsers (CORS). Streaming: the request body is an async generator over
`request.content.iter_chunked(chunk)`, so aiohttp reads the client only as fast as the upload
server takes the bytes (the server side pauses the socket when its buffer is full; the client
side drains after each write) and one upload holds a chunk and the socket buffers, whatever its
size. The response comes back the same
way. Method, path, query and the headers an upload server reads (Content-Type, Content-Length,
Content-Range, `x-cdi-content-type`, User-Agent, Accept) go through; the bearer token does not.
Every response header but the hop-by-hop ones comes back (Upload-Offset included). Redirects
are never followed; bodies are never decompressed.

A failure before the upload server answered is a 502 "error in upload-proxy: …" (CDI's
ReverseProxy answers 502 and appends that text); a TLS failure before the first body byte was
read is retried once with freshly read material. A failure after the answer started can only
cut the connection.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import ssl
import tempfile
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
from aiohttp import web
from yarl import URL

from cdi.api.groups import CONFIG_MAP, SECRET
from cdi.kube.client import Client
from cdi.kube.errors import ApiError
from uploadproxy.errors import Rejection
from uploadproxy.settings import ProxySettings
from uploadproxy.target import Endpoint

log = logging.getLogger(__name__)

CLIENT_CERT_SECRET: Final = "cdi-uploadserver-client-cert"
SERVER_CA_BUNDLE: Final = "cdi-uploadserver-signer-bundle"
BUNDLE_KEY: Final = "ca-bundle.crt"
TLS_CERT_KEY: Final = "tls.crt"
TLS_KEY_KEY: Final = "tls.key"

#: Request headers passed to the upload server (what it reads; never Authorization).
REQUEST_HEADERS: Final = (
    "Content-Type",
    "Content-Length",
    "Content-Range",
    "x-cdi-content-type",
    "User-Agent",
    "Accept",
)
#: Headers aiohttp would add by itself; the upload server sees only what the client sent.
_SKIP_AUTO_HEADERS: Final = ("Content-Type", "User-Agent", "Accept", "Accept-Encoding")
_HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
#: Response headers not copied: hop-by-hop, and those our own server writes.
RESPONSE_SKIP: Final = _HOP_BY_HOP | {"content-length", "date", "server"}
_NO_BODY_STATUSES: Final = frozenset({204, 304})


# --- TLS material ---------------------------------------------------------------------------


def _decode(data: Mapping[str, Any], key: str, where: str) -> bytes:
    value = data.get(key)
    if not value:
        raise Rejection(503, f"error in upload-proxy: {where} has no {key}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise Rejection(503, f"error in upload-proxy: {where} {key} is not base64") from None


def build_context(cert: bytes, key: bytes, ca_bundle: str) -> ssl.SSLContext:
    """A client context presenting `cert`/`key` and trusting only `ca_bundle` (PEM).

    `ssl` loads a certificate chain only from files: they are written to a private temporary
    directory and removed as soon as they are loaded."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca_bundle)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    with tempfile.TemporaryDirectory(prefix="cdi-uploadproxy-") as directory:
        cert_path, key_path = Path(directory, "tls.crt"), Path(directory, "tls.key")
        for path, content in ((cert_path, cert), (key_path, key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as file:
                file.write(content)
        context.load_cert_chain(cert_path, key_path)
    return context


class UpstreamTLS:
    """The client side of the upload servers' mutual TLS, read from the API and cached."""

    def __init__(self, settings: ProxySettings, client: Client) -> None:
        self._settings = settings
        self._client = client
        self._context: ssl.SSLContext | None = None
        self._stale = False
        self._loaded_at = float("-inf")
        self._lock = asyncio.Lock()

    def invalidate(self) -> None:
        """Read the material again before the next connection (throttled)."""
        self._stale = True

    async def context(self) -> ssl.SSLContext:
        async with self._lock:
            throttled = time.monotonic() - self._loaded_at < self._settings.reload_interval
            if self._context is None or (self._stale and not throttled):
                self._loaded_at = time.monotonic()
                self._context = await self._load()
                self._stale = False
            return self._context

    async def _load(self) -> ssl.SSLContext:
        namespace = self._settings.namespace
        secret_where = f"Secret {namespace}/{CLIENT_CERT_SECRET}"
        bundle_where = f"ConfigMap {namespace}/{SERVER_CA_BUNDLE}"
        try:
            secret = await self._client.get(SECRET, CLIENT_CERT_SECRET, namespace)
            bundle_map = await self._client.get(CONFIG_MAP, SERVER_CA_BUNDLE, namespace)
        except ApiError as err:
            raise Rejection(
                503, f"error in upload-proxy: cannot read the upload client TLS material: {err}"
            ) from None
        data = secret.get("data") or {}
        cert = _decode(data, TLS_CERT_KEY, secret_where)
        key = _decode(data, TLS_KEY_KEY, secret_where)
        bundle = str((bundle_map.get("data") or {}).get(BUNDLE_KEY) or "")
        if "-----BEGIN CERTIFICATE-----" not in bundle:
            raise Rejection(503, f"error in upload-proxy: {bundle_where} has no {BUNDLE_KEY}")
        try:
            context = await asyncio.to_thread(build_context, cert, key, bundle)
        except (ssl.SSLError, ValueError) as err:
            raise Rejection(
                503, f"error in upload-proxy: unusable upload client TLS material: {err}"
            ) from None
        log.info(
            "loaded upload client certificate from %s and CAs from %s", secret_where, bundle_where
        )
        return context


# --- one request ----------------------------------------------------------------------------


@dataclass(slots=True)
class Transfer:
    """What one proxied request moved, for its log line."""

    pvc_name: str = "-"
    """The PVC (namespace/name) the token names, once it was read."""
    sent: int = 0
    """Request body bytes passed to the upload server."""
    received: int = 0
    """Response body bytes passed back to the client."""
    started: bool = False
    """Whether the request body was started (a retry would lose bytes)."""
    client_error: str = ""
    """Why reading the client failed, if it did."""
    answer_error: str = ""
    """Why passing the answer back failed after it started, if it did."""


def log_request(
    method: str, path: str, status: int, transfer: Transfer, *, started: float, detail: str = ""
) -> None:
    """One line per request, never the token."""
    if transfer.client_error:
        detail += f" client_error={transfer.client_error!r}"
    if transfer.answer_error:
        detail += f" answer_error={transfer.answer_error!r}"
    log.log(
        logging.WARNING if status >= 500 else logging.INFO,
        "%s %s pvc=%s status=%d sent=%d received=%d seconds=%.3f%s",
        method,
        path,
        transfer.pvc_name,
        status,
        transfer.sent,
        transfer.received,
        time.monotonic() - started,
        detail,
    )


def is_tls_failure(err: BaseException) -> bool:
    return isinstance(err, aiohttp.ClientSSLError | ssl.SSLError) or isinstance(
        err.__cause__, ssl.SSLError
    )


class Forwarder:
    """Streams requests to upload servers over one connection pool."""

    def __init__(self, settings: ProxySettings, client: Client) -> None:
        self.settings = settings
        self.tls = UpstreamTLS(settings, client)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, enable_cleanup_closed=True),
                timeout=aiohttp.ClientTimeout(
                    total=self.settings.upstream_timeout,
                    sock_connect=self.settings.upstream_connect_timeout,
                ),
                auto_decompress=False,
                skip_auto_headers=_SKIP_AUTO_HEADERS,
                trust_env=False,
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _body(self, request: web.Request, transfer: Transfer) -> AsyncGenerator[bytes, None]:
        transfer.started = True
        try:
            async for chunk in request.content.iter_chunked(self.settings.chunk_size):
                transfer.sent += len(chunk)
                yield chunk
        except Exception as err:  # aiohttp wraps it for the request; the log says what it was
            transfer.client_error = str(err) or type(err).__name__
            raise

    async def _send(
        self, request: web.Request, endpoint: Endpoint, transfer: Transfer
    ) -> aiohttp.ClientResponse:
        if self._session is None:
            raise RuntimeError("Forwarder.start() was not awaited")
        headers = {name: value for name in REQUEST_HEADERS if (value := request.headers.get(name))}
        headers["Host"] = f"{endpoint.host_header}:{self.settings.upstream_port}"
        for attempt in range(2):
            context = await self.tls.context()
            body = self._body(request, transfer) if request.body_exists else None
            try:
                return await self._session.request(
                    request.method,
                    URL(endpoint.url, encoded=True),
                    data=body,
                    headers=headers,
                    ssl=context,
                    server_hostname=endpoint.server_hostname,
                    allow_redirects=False,
                )
            except (aiohttp.ClientError, OSError, TimeoutError) as err:
                if body is not None and not transfer.started:
                    await body.aclose()
                if transfer.client_error:
                    raise Rejection(
                        400,
                        f"error in upload-proxy: reading the upload failed: "
                        f"{transfer.client_error}",
                    ) from None
                tls_failure = is_tls_failure(err)
                if tls_failure:
                    self.tls.invalidate()
                if tls_failure and attempt == 0 and not transfer.started:
                    log.info(
                        "TLS to the upload server failed (%s); reading the material again", err
                    )
                    continue
                what = "timed out" if isinstance(err, TimeoutError) else str(err)
                raise Rejection(
                    502,
                    f"error in upload-proxy: the upload server {endpoint.pod_name} failed: "
                    f"{what or type(err).__name__}",
                ) from None
        raise AssertionError("unreachable")

    async def forward(
        self, request: web.Request, endpoint: Endpoint, transfer: Transfer
    ) -> web.StreamResponse:
        """Send `request` to `endpoint` and stream the answer back."""
        upstream = await self._send(request, endpoint, transfer)
        async with upstream:
            if upstream.status == 401:
                self.tls.invalidate()  # perhaps the client certificate was re-issued
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in upstream.headers.items():
                if name.lower() not in RESPONSE_SKIP:
                    response.headers.add(name, value)
            if upstream.content_length is not None and upstream.status not in _NO_BODY_STATUSES:
                response.content_length = upstream.content_length
            try:
                await response.prepare(request)
                async for chunk in upstream.content.iter_chunked(self.settings.chunk_size):
                    await response.write(chunk)
                    transfer.received += len(chunk)
                await response.write_eof()
            except (aiohttp.ClientError, OSError, TimeoutError) as err:
                # The status is out: all that is left is to cut the connection.
                transfer.answer_error = str(err) or type(err).__name__
                if request.transport is not None:
                    request.transport.abort()
        return response
