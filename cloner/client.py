"""The POST to the upload server: mutual TLS, the clone headers, the answer as success or a line.

CDI passes the TLS material as PEM contents in the environment; the ssl module wants files, so
they are written to a private directory (0700, files 0600) that `ClientTls.close` removes.
UPLOAD_SERVER_ADDRESS changes only where we connect: the server certificate is still checked
against the URL's host name and the Host header is still the URL's, as a Service name would
give on a cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import ssl
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import aiohttp
from yarl import URL

from cdi.api import CloneContentType, env
from cdi.api.clonestream import (
    COMPRESSION_HEADER,
    CONTENT_TYPE_HEADER,
    ENCODING_HEADER,
    EXTENTS_V1,
    PREALLOCATION_HEADER,
)
from cloner.errors import CloneError, SettingsError
from cloner.settings import CloneSettings, Compression, Content, Tls
from cloner.stream import Body

log = logging.getLogger(__name__)

# The headers of a clone stream; the receiver (importer/upload/clone.py) spells them the same.

CONNECT_TIMEOUT: Final = 30.0
LISTEN_POLL: Final = 0.1
ERROR_TEXT_LIMIT: Final = 1000  # characters of the server's answer kept in the failure line


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
        except BaseException:
            self.close()
            raise

    def _write(self, name: str, text: str) -> str:
        path = self.directory / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text if text.endswith("\n") else text + "\n")
        return str(path)

    def close(self) -> None:
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
    assert url.host is not None  # checked by the settings
    shown = f"[{url.host}]" if ":" in url.host else url.host
    authority = shown if url.is_default_port() else f"{shown}:{url.port}"
    target = url.with_host(host).with_port(port)
    return target, {"Host": authority}, url.host if url.scheme == "https" else None


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
    where = f"{url.host}:{url.port}"
    await wait_until_listening(str(url.host), int(url.port or 443), within=settings.connect_wait)
    connector = aiohttp.TCPConnector(ssl=context if context is not None else True, limit=1)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT)
    try:
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
            session.post(
                url,
                data=body.stream(),
                headers={**headers, **extra},
                server_hostname=server_hostname,
            ) as response,
        ):
            text = (await response.text(errors="replace")).strip()
            status = response.status
    except aiohttp.ClientConnectorCertificateError as err:
        raise CloneError(
            f"TLS with the upload server at {where} failed: {err.certificate_error}"
        ) from None
    except aiohttp.ClientConnectorError as err:
        if body.failure is not None:
            raise _source_failure(body.failure) from None
        raise CloneError(
            f"cannot connect to the upload server at {where}: {err.os_error}"
        ) from None
    except (aiohttp.ClientError, OSError, TimeoutError) as err:
        if body.failure is not None:
            raise _source_failure(body.failure) from None
        detail = str(err) or type(err).__name__
        raise CloneError(f"the clone stream to {where} broke: {detail}") from None
    if body.failure is not None:  # the server answered before noticing the cut
        raise _source_failure(body.failure)
    if status != 200:
        one_line = " ".join(text.split())[:ERROR_TEXT_LIMIT]
        raise CloneError(f"the upload server answered HTTP {status}: {one_line}")
    if not body.finished:
        raise CloneError("the upload server answered 200 before the whole stream was sent")
    return text


def _source_failure(err: BaseException) -> CloneError:
    if isinstance(err, CloneError):
        return err
    return CloneError(f"reading the clone source failed: {type(err).__name__}: {err}")
