"""Sending an image file to an upload proxy: the byte-moving half of `cdi image-upload`.

Owns the HTTP conversation with a CDI upload proxy (ours or CDI's own): discovering the async path
(`HEAD /v1beta1/upload-async`, as virtctl does), discovering resumable uploads (an `Upload-Offset`
header on `HEAD /v1beta1/upload`, our extension), sending the file with bounded memory (64 KiB
reads, streamed), and resuming after a dropped connection from the offset the server reports
instead of starting over. Against a server without the extension it POSTs the whole file and
retries from the start, as virtctl does. Progress goes to a `ByteProgress` (a bar on a terminal).

A fresh token is asked of `tokens()` for every request, so uploads that outlive one token (CDI's
live 5 minutes) go on. Called by `cdi.cli.imageupload`; knows nothing of DataVolumes or PVCs.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Self, TextIO

import aiohttp
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

log = logging.getLogger(__name__)

CHUNK: Final = 64 * 1024
UPLOAD_PATH: Final = "/v1beta1/upload"
ASYNC_PATH: Final = "/v1beta1/upload-async"
OFFSET_HEADER: Final = "Upload-Offset"
#: How long a request may take in total: a sync upload answers after conversion.
REQUEST_TIMEOUT: Final = 24 * 3600.0
CONNECT_TIMEOUT: Final = 30.0
#: Seconds between resume attempts (times the attempt number).
RETRY_PAUSE: Final = 1.0


class UploadError(Exception):
    """The upload failed in a way retrying will not fix (the message says why)."""


class ConnectionLost(Exception):
    """The connection dropped mid-request; `sent` bytes of the body went out."""


@dataclass(frozen=True, slots=True)
class Capabilities:
    async_path: bool
    resumable: bool


class ByteProgress:
    """Bytes sent of a total: a rich bar on a terminal, a line per 10% otherwise."""

    def __init__(self, out: TextIO, *, total: int, label: str) -> None:
        self._out = out
        self._total = total
        self._tty = out.isatty()
        self._shown = -1
        self._progress: Progress | None = None
        if self._tty:
            self._progress = Progress(
                TextColumn(label),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=Console(file=out),
            )
            self._task = self._progress.add_task(label, total=total)

    def __enter__(self) -> Self:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    def at(self, done: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=done)
            return
        tenth = done * 10 // max(self._total, 1)
        if tenth != self._shown:
            self._shown = tenth
            print(f"{done}/{self._total} bytes ({tenth * 10}%)", file=self._out, flush=True)


class Uploader:
    """One file to one proxy; see the module docstring."""

    def __init__(
        self,
        base_url: str,
        tokens: Callable[[], Awaitable[str]],
        *,
        ssl_context: ssl.SSLContext | bool,
        retries: int = 5,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.tokens = tokens
        self.ssl_context = ssl_context
        self.retries = retries
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT, sock_connect=CONNECT_TIMEOUT),
            connector=aiohttp.TCPConnector(ssl=self.ssl_context),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "use `async with Uploader(...)`"
        return self._session

    async def _headers(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {await self.tokens()}", **extra}

    async def capabilities(self) -> Capabilities:
        """What the proxy offers: the async path (virtctl's HEAD) and resumable uploads."""
        async with self.session.head(
            self.base_url + ASYNC_PATH, headers=await self._headers()
        ) as resp:
            await self._refuse(resp)
            async_path = resp.status == 200
            resumable = OFFSET_HEADER in resp.headers
        return Capabilities(async_path=async_path, resumable=resumable)

    async def offset(self, path: str) -> int:
        async with self.session.head(self.base_url + path, headers=await self._headers()) as resp:
            await self._refuse(resp)
            try:
                return int(resp.headers.get(OFFSET_HEADER, "0"))
            except ValueError:
                return 0

    async def send(
        self, file: Path, size: int, progress: ByteProgress, *, caps: Capabilities
    ) -> tuple[int, str]:
        """Send `file`; returns the final (status, body). Raises UploadError or ConnectionLost
        (the last one, once retries are spent)."""
        path = ASYNC_PATH if caps.async_path else UPLOAD_PATH
        attempt = 0
        while True:
            try:
                if caps.resumable:
                    start = await self.offset(path)
                    if start > size:
                        raise UploadError(
                            f"the server holds {start} bytes of a {size}-byte file: "
                            "it is not this file; delete the DataVolume and start over"
                        )
                    return await self._put(file, path, start, size, progress)
                return await self._post(file, path, size, progress)
            except (ConnectionLost, aiohttp.ClientConnectionError, TimeoutError) as err:
                attempt += 1
                if attempt > self.retries:
                    raise ConnectionLost(str(err)) from err
                log.info("upload interrupted (%s); resuming, attempt %d", err, attempt)
                await asyncio.sleep(RETRY_PAUSE * attempt)

    async def _put(
        self, file: Path, path: str, start: int, size: int, progress: ByteProgress
    ) -> tuple[int, str]:
        last = size - 1
        headers = await self._headers(
            **{
                "Content-Type": "application/octet-stream",
                "Content-Range": f"bytes {start}-{last}/{size}" if size else f"bytes */{size}",
            }
        )
        body = _stream(file, start, progress)
        return await self._request("PUT", path, headers, body, size - start)

    async def _post(
        self, file: Path, path: str, size: int, progress: ByteProgress
    ) -> tuple[int, str]:
        headers = await self._headers(**{"Content-Type": "application/octet-stream"})
        return await self._request("POST", path, headers, _stream(file, 0, progress), size)

    async def _request(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        body: AsyncIterator[bytes],
        length: int,
    ) -> tuple[int, str]:
        headers["Content-Length"] = str(length)
        try:
            async with self.session.request(
                method, self.base_url + path, headers=headers, data=body
            ) as resp:
                text = await resp.text(errors="replace")
                await self._refuse(resp, text)
                return resp.status, text
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as err:
            raise ConnectionLost(str(err) or type(err).__name__) from err

    async def _refuse(self, resp: aiohttp.ClientResponse, text: str | None = None) -> None:
        """Statuses no retry fixes become UploadError with the server's words."""
        if resp.status < 400 or resp.status == 416:
            return
        body = text if text is not None else await resp.text(errors="replace")
        detail = " ".join(body.split()) or resp.reason or ""
        if resp.status in (502, 503, 504) and "in progress" not in detail:
            # The proxy waits for the upload pod and relays its failures: worth a retry.
            raise ConnectionLost(f"{resp.status} {detail}")
        raise UploadError(f"unexpected return value {resp.status}, {detail}")


async def _stream(file: Path, start: int, progress: ByteProgress) -> AsyncIterator[bytes]:
    """The file from `start`, CHUNK by CHUNK, reported to `progress` as it goes out."""
    sent = start
    progress.at(sent)
    with file.open("rb") as f:
        f.seek(start)
        while True:
            data = await asyncio.to_thread(f.read, CHUNK)
            if not data:
                return
            sent += len(data)
            yield data
            progress.at(sent)


def proxy_ssl_context(
    *, insecure: bool, ca_file: str | None, ca_data: bytes | None
) -> ssl.SSLContext:
    """Trust for the proxy: the system's CAs plus the kubeconfig's (the all-in-one server
    serves the proxy with its own CA); none at all with --insecure."""
    ctx = ssl.create_default_context()
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    if ca_file or ca_data:
        ctx.load_verify_locations(cafile=ca_file, cadata=ca_data.decode() if ca_data else None)
    return ctx
