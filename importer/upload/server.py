"""The upload server's HTTP side (reference §6.4, §6.6): paths, client check, one upload at a time.

Paths, for v1beta1 and v1alpha1 alike:

    POST /upload            sync: answered after the whole import (conversion, resize)
    POST /upload-async      answered once every byte is in and the image passed every check;
                            conversion and resize go on, the result goes to the termination log
    POST /upload-form[-async]   the same with a multipart/form-data body, field `file`
    POST /upload-archive    a tar (maybe compressed) extracted into the volume
    POST /upload + header x-cdi-content-type   a clone stream (importer.upload.clone)
    HEAD /upload-async, /upload-form-async   200 (how virtctl discovers async support)
    PUT  /upload, /upload-async, /upload-archive   resumable upload (ours): Content-Range chunks
    HEAD /upload, /upload-async, /upload-archive   200 with `Upload-Offset: N`
    GET  /healthz           200
    GET  /metrics           the import progress metric (no client certificate needed)

Any other method on an upload path is a 404, as in CDI. Every upload path needs a verified client
certificate whose CN is CLIENT_NAME (401 otherwise), unless started insecure (tests).

One upload at a time: while one is received or processed another gets 503; after success 409,
until the server exits a moment later. A failed upload leaves the target as the importer leaves it
after a failure (what it wrote removed) and the server takes a new attempt. Errors are CDI's:
400 "Saving stream failed: effective image size is larger than the reported available storage:
..." when the image does not fit, 400 "Saving stream failed: <what was refused>" for bad or unsafe
data and broken bodies, 500 "Saving stream failed: ..." for anything else.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import enum
import functools
import logging
from collections.abc import Awaitable
from dataclasses import dataclass

from aiohttp import BodyPartReader, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cdi.api import (
    MESSAGE_UPLOAD_COMPLETE,
    ContentType,
    TerminationMessage,
    encode_failure,
)
from cdi.api.termination import MESSAGE_DEADLINE_PASSED
from cdi.image.httpfront import Exchange, HttpFront, Native
from cdi.image.httpwire import RequestHead
from cdi.image.worker import write_termination
from importer.metrics import ImportProgress
from importer.pipeline import ImportRun
from importer.sources import Source
from importer.sources.upload import BodySource, StagedFileSource, UploadBodyError
from importer.upload.clone import CloneRefused, is_clone, receive_clone
from importer.upload.errors import classify, describe, no_capacity
from importer.upload.frontrequest import FrontRequest
from importer.upload.settings import UploadSettings
from importer.upload.staging import (
    RangeError,
    Staging,
    parse_content_range,
    salvaging_reader,
    staging_path,
)

log = logging.getLogger(__name__)

VERSIONS = ("v1beta1", "v1alpha1")
OFFSET_HEADER = "Upload-Offset"
LENGTH_HEADER = "Upload-Length"
FORM_FIELD = "file"

UploadRequest = web.Request | FrontRequest


class State(enum.Enum):
    IDLE = "idle"
    BUSY = "busy"  # receiving or processing
    DONE = "done"


@dataclass(frozen=True, slots=True)
class Endpoint:
    path: str
    is_async: bool = False
    form: bool = False
    archive: bool = False
    resumable: bool = False

    @property
    def content_type(self) -> ContentType:
        return ContentType.ARCHIVE if self.archive else ContentType.KUBEVIRT


def endpoints() -> list[Endpoint]:
    found = []
    for v in VERSIONS:
        found += [
            Endpoint(f"/{v}/upload", resumable=True),
            Endpoint(f"/{v}/upload-async", is_async=True, resumable=True),
            Endpoint(f"/{v}/upload-form", form=True),
            Endpoint(f"/{v}/upload-form-async", is_async=True, form=True),
            Endpoint(f"/{v}/upload-archive", archive=True, resumable=True),
        ]
    return found


class UploadServer:
    """The state of one upload pod: at most one upload, then exit (the code in `finished`)."""

    def __init__(self, settings: UploadSettings) -> None:
        self.settings = settings
        self.progress = ImportProgress(settings.owner_uid)
        self.state = State.IDLE
        self.finished: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        path = staging_path(settings.paths)
        self.staging = Staging(path) if path is not None else None
        self._deadline_passed = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = asyncio.get_running_loop()
        self._endpoints = {e.path: e for e in endpoints()}
        self.front: HttpFront | None = None  # set by whoever listens; tells forwarded peers
        if settings.deadline is not None:
            self._spawn(self._watch_deadline(settings.deadline))

    @property
    def busy(self) -> bool:
        return self.state is State.BUSY

    def app(self) -> web.Application:
        app = web.Application()
        for endpoint in endpoints():
            app.router.add_route("*", endpoint.path, functools.partial(self._handle, endpoint))
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        return app

    def route(self, head: RequestHead) -> Native | None:
        """What the blocking front serves itself: upload bodies (the data path), HEAD, and
        /healthz (probes); forms, /metrics and anything else go to the aiohttp app."""
        if head.path == "/healthz" and head.method == "GET":
            return self._native_healthz
        endpoint = self._endpoints.get(head.path)
        if endpoint is None or endpoint.form or head.method not in ("POST", "PUT", "HEAD"):
            return None
        return functools.partial(self._native, endpoint)

    def _native_healthz(self, exchange: Exchange) -> None:
        exchange.answer(200, "OK")

    def _native(self, endpoint: Endpoint, exchange: Exchange) -> None:
        request = FrontRequest(exchange)
        handled = asyncio.run_coroutine_threadsafe(self._handle(endpoint, request), self._loop)
        response = handled.result()
        if isinstance(response, web.Response):
            request.send_blocking(response)

    def finish(self, code: int) -> None:
        if not self.finished.done():
            self.finished.set_result(code)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- plain endpoints ---------------------------------------------------------------------
    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="OK")

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.progress.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    # --- upload endpoints --------------------------------------------------------------------
    async def _handle(self, endpoint: Endpoint, request: UploadRequest) -> web.StreamResponse:
        if not self._authorized(request):
            log.warning("refused request without a valid client certificate path=%s", endpoint.path)
            return web.Response(status=401, text="client certificate required")
        method = request.method
        if method == "HEAD" and (endpoint.is_async or endpoint.resumable):
            return web.Response(headers=self._offset_headers())
        if method == "PUT" and endpoint.resumable:
            return await self._put(endpoint, request)
        if method != "POST":
            return web.Response(status=404, text="not found")
        if refusal := self._acquire():
            return refusal
        try:
            if is_clone(endpoint.path, request.headers):
                return await self._clone(request)
            if endpoint.archive and self.settings.is_block:
                return self._release_with(400, "archive uploads need a Filesystem volume")
            if self.staging is not None and self.staging.total is not None:
                log.info("a POST replaces the resumable upload at offset=%d", self.staging.offset)
                self.staging.discard()
            if endpoint.form:
                found = await self._form_source(request)
                if isinstance(found, web.Response):
                    return found
                source: Source = found
            else:
                source = BodySource(
                    request.content.read,
                    request.content_length,
                    f"upload {endpoint.path}",
                    blocking=getattr(request.content, "blocking", None),
                )
            return await self._process(endpoint, request, source)
        except BaseException:
            self._release()
            raise

    async def _form_source(self, request: UploadRequest) -> BodySource | web.Response:
        if not isinstance(request, web.Request):  # the front forwards forms to aiohttp
            return self._release_with(500, "internal error: a form reached the front")
        try:
            reader = await request.multipart()
            while True:
                part = await reader.next()
                if part is None:
                    return self._release_with(
                        400, f"the multipart/form-data body has no {FORM_FIELD!r} field"
                    )
                if isinstance(part, BodyPartReader) and part.name == FORM_FIELD:
                    return BodySource(part.read_chunk, None, f"upload form field {FORM_FIELD}")
                await part.release()
        except (ValueError, AssertionError, KeyError) as err:
            return self._release_with(400, f"not a multipart/form-data body: {err}")
        except UploadBodyError as err:
            return self._release_with(400, str(err))
        except (ConnectionError, OSError) as err:
            return self._release_with(400, f"the upload is incomplete: {err}")

    async def _put(self, endpoint: Endpoint, request: UploadRequest) -> web.StreamResponse:
        staging = self.staging
        if staging is None:
            return web.Response(
                status=400,
                text="resumable uploads need scratch space on a Block volume; use POST",
            )
        try:
            crange = parse_content_range(request.headers.get("Content-Range"))
        except RangeError as err:
            return web.Response(status=400, text=str(err))
        length = request.content_length
        if length is not None and length != crange.length:
            return web.Response(
                status=400,
                text=f"Content-Length {length} differs from the Content-Range's {crange.length}",
            )
        if refusal := self._acquire():
            return refusal
        try:
            if endpoint.archive and self.settings.is_block:
                return self._release_with(400, "archive uploads need a Filesystem volume")
            if staging.total is not None and staging.offset and crange.total != staging.total:
                self._release()
                return web.Response(
                    status=416,
                    headers=self._offset_headers(),
                    text=f"this upload is {staging.total} bytes, not {crange.total}; "
                    f"continue at Upload-Offset {staging.offset}",
                )
            if crange.start != staging.offset:
                self._release()
                return web.Response(
                    status=416,
                    headers=self._offset_headers(),
                    text=f"the upload continues at byte {staging.offset}, not {crange.start}",
                )
            if crange.start == 0:
                staging.begin(crange.total)
            try:
                got = await staging.append(salvaging_reader(request.content), crange.length)
            except UploadBodyError as err:
                return self._release_with(400, str(err), headers=self._offset_headers())
            except Exception as err:  # a broken body: what arrived is kept
                log.warning("resumable chunk cut offset=%d error=%s", staging.offset, err)
                if no_capacity(err):
                    status, text = classify(err)
                    return self._release_with(status, text, headers=self._offset_headers())
                return self._release_with(
                    400,
                    f"the chunk is incomplete ({type(err).__name__}: {err}); "
                    f"continue at Upload-Offset {staging.offset}",
                    headers=self._offset_headers(),
                )
            log.info("resumable chunk offset=%d total=%d", staging.offset, crange.total)
            if got < crange.length:
                log.warning("resumable chunk cut offset=%d error=body ended", staging.offset)
                return self._release_with(
                    400,
                    f"the chunk ended after {got} of {crange.length} bytes; "
                    f"continue at Upload-Offset {staging.offset}",
                    headers=self._offset_headers(),
                )
            if staging.offset < crange.total:
                self._release()
                return web.Response(
                    headers=self._offset_headers(),
                    text=f"received {staging.offset} of {crange.total} bytes",
                )
            source = StagedFileSource(staging.path, crange.total)
            return await self._process(endpoint, request, source)
        except BaseException:
            self._release()
            raise

    # --- processing --------------------------------------------------------------------------
    async def _process(
        self, endpoint: Endpoint, request: UploadRequest, source: Source
    ) -> web.StreamResponse:
        """Run the importer's pipeline over `source`; the caller holds the upload (BUSY)."""
        validated = asyncio.Event()
        self.progress = ImportProgress(self.settings.owner_uid)  # a fresh counter per attempt
        run = ImportRun(
            self.settings.importer_settings(endpoint.content_type),
            self.progress,
            source=source,
            on_validated=validated.set,
        )
        log.info("upload start path=%s length=%s", endpoint.path, request.content_length)
        task = asyncio.ensure_future(run.run())
        if endpoint.is_async:
            waiter = asyncio.ensure_future(validated.wait())
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if not task.done() or task.exception() is None:
                self._spawn(self._finish_in_background(task))
                log.info("upload received and validated; processing goes on")
                return web.Response(text="Upload received; processing continues")
        try:
            message = await task
        except Exception as err:
            return self._failed(err)
        return await self._complete(request, message)

    async def _clone(self, request: UploadRequest) -> web.StreamResponse:
        """A clone stream (importer.upload.clone); the caller holds the upload (BUSY)."""
        self.progress = ImportProgress(self.settings.owner_uid)  # a fresh counter per attempt
        try:
            message = await receive_clone(request, self.settings, self.progress)
        except CloneRefused as err:
            log.warning("clone refused status=%d %s", err.status, err)
            return self._release_with(err.status, str(err))
        except Exception as err:
            return self._failed(err)
        return await self._complete(request, message)

    async def _complete(
        self, request: UploadRequest, message: TerminationMessage
    ) -> web.StreamResponse:
        self._succeeded(message)
        response = web.Response(text=MESSAGE_UPLOAD_COMPLETE)
        try:
            if isinstance(request, FrontRequest):
                await request.send(response)
            else:
                await response.prepare(request)
                await response.write_eof()
        except (ConnectionError, OSError) as err:
            log.info("the client left before the answer error=%s", err)
        self.finish(0)
        return response

    async def _finish_in_background(self, task: asyncio.Future[TerminationMessage]) -> None:
        try:
            message = await task
        except Exception as err:
            text = describe(err)
            log.error("upload processing failed after the answer: %s", text)
            self._discard_staging()
            write_termination(encode_failure(text))
            self.finish(1)
            return
        self._succeeded(message)
        self.finish(0)

    def _succeeded(self, message: TerminationMessage) -> None:
        self.state = State.DONE
        self._discard_staging()
        done = dataclasses.replace(message, message=MESSAGE_UPLOAD_COMPLETE)
        text = done.to_json()
        write_termination(text)
        print(text, flush=True)
        log.info("upload complete %s", text)

    def _failed(self, err: BaseException) -> web.Response:
        status, text = classify(err)
        log.warning("upload failed status=%d %s", status, text)
        self._discard_staging()
        return self._release_with(status, text, headers=self._offset_headers())

    def _discard_staging(self) -> None:
        if self.staging is not None:
            self.staging.discard()

    # --- state -------------------------------------------------------------------------------
    def _authorized(self, request: UploadRequest) -> bool:
        if self.settings.insecure:
            return True
        if isinstance(request, FrontRequest):
            cert = request.peercert
        else:
            transport = request.transport
            cert = transport.get_extra_info("peercert") if transport is not None else None
            if not cert and self.front is not None:
                cert = self.front.peercert(transport)
        if not cert:
            return False
        for rdn in cert.get("subject", ()):
            for key, value in rdn:
                if key == "commonName" and value == self.settings.client_name:
                    return True
        return False

    def _acquire(self) -> web.Response | None:
        if self.state is State.BUSY:
            return web.Response(status=503, text="upload already in progress")
        if self.state is State.DONE or self.finished.done():
            return web.Response(status=409, text="upload already completed")
        self.state = State.BUSY
        return None

    def _release(self) -> None:
        if self.state is State.BUSY:
            self.state = State.IDLE
        self._check_deadline()

    def _release_with(
        self, status: int, text: str, *, headers: dict[str, str] | None = None
    ) -> web.Response:
        self._release()
        return web.Response(status=status, text=text, headers=headers)

    def _offset_headers(self) -> dict[str, str]:
        headers = {OFFSET_HEADER: "0"}
        if self.staging is not None:
            headers[OFFSET_HEADER] = str(self.staging.offset)
            if self.staging.total is not None:
                headers[LENGTH_HEADER] = str(self.staging.total)
        return headers

    async def _watch_deadline(self, deadline: datetime.datetime) -> None:
        delay = (deadline - datetime.datetime.now(datetime.UTC)).total_seconds()
        if delay > 0:
            await asyncio.sleep(delay)
        self._deadline_passed = True
        self._check_deadline()

    def _check_deadline(self) -> None:
        if not self._deadline_passed or self.state is not State.IDLE or self.finished.done():
            return
        message = TerminationMessage(message=MESSAGE_DEADLINE_PASSED, deadline_passed=True)
        text = message.to_json()
        log.info("deadline passed with no upload; exiting %s", text)
        write_termination(text)
        print(text, flush=True)
        self.state = State.DONE
        self.finish(0)
