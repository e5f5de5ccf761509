"""The upload proxy as an aiohttp application: `make_app(settings, client)`.

Served by `cdi-uploadproxy` (`uploadproxy.main`, HTTPS from files) and hosted in-process by
`cdi server`. Routes (reference §6.4): every method on `/v1beta1/upload`, `/upload-async`,
`/upload-form`, `/upload-form-async` and their `/v1alpha1/` aliases, each handled in CDI's
order (§6.5, see `uploadproxy.auth` and `uploadproxy.target`):

    Authorization → 400 / 401 / 400;  PVC ready within the wait → 503;  content type → 503;
    forward to the upload server (mutual TLS, streamed both ways) → its answer, or 502/503

Uploads from programs (virtctl, curl, `cdi image-upload`) are relayed by blocking threads
(`uploadproxy.relay`, served with this app by `uploadproxy.listener`) after the same checks
(`locate`); this app answers browsers and anything the relay forwards. `/healthz` answers 200 "OK"
without authentication. CORS as CDI's (`rs/cors` AllowAll): any
origin, method and header; a preflight (`OPTIONS` with `Origin` and
`Access-Control-Request-Method`) is answered 204 on any path; other answers to a request with
an `Origin` carry `Access-Control-Allow-Origin: *` and expose `Upload-Offset` (so a browser can
resume). One log line per request: method, path, PVC, status, bytes each way, seconds; never
the token.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Final

from aiohttp import hdrs, web

from cdi.kube.client import Client
from uploadproxy.auth import TokenVerifier
from uploadproxy.errors import Rejection
from uploadproxy.settings import ProxySettings
from uploadproxy.target import (
    UPLOAD_PATHS,
    Endpoint,
    upload_path,
    upstream_endpoint,
    wait_until_ready,
)
from uploadproxy.upstream import Forwarder, Transfer, log_request

log = logging.getLogger(__name__)

HEALTHZ_PATH: Final = "/healthz"
#: Response headers a browser script may read (ours: the resumable upload's offset).
EXPOSED_HEADERS: Final = "Upload-Offset"

SETTINGS_KEY: Final = web.AppKey("settings", ProxySettings)
VERIFIER_KEY: Final = web.AppKey("verifier", TokenVerifier)
FORWARDER_KEY: Final = web.AppKey("forwarder", Forwarder)
CLIENT_KEY: Final = web.AppKey("client", Client)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _rejection_response(err: Rejection) -> web.Response:
    if not err.text:
        return web.Response(status=err.status)
    return web.Response(status=err.status, text=err.text, content_type="text/plain")


async def locate(
    app: web.Application,
    headers: Mapping[str, str],
    path: str,
    query: str,
    transfer: Transfer,
) -> Endpoint:
    """The checks every upload passes, in CDI's order: the token, the PVC's readiness, the
    server path, the upload server's address. Rejection when one fails."""
    settings = app[SETTINGS_KEY]
    claim = await app[VERIFIER_KEY].claim(headers.get(hdrs.AUTHORIZATION))
    transfer.pvc_name = f"{claim.namespace}/{claim.name}"
    client = app[CLIENT_KEY]
    pvc = await wait_until_ready(client, claim, settings)
    return await upstream_endpoint(client, settings, pvc, upload_path(pvc, claim, path), query)


async def handle_upload(request: web.Request) -> web.StreamResponse:
    """An upload the blocking front did not relay itself (browsers, other methods)."""
    app = request.app
    transfer = Transfer()
    started = time.monotonic()
    status = 500  # what the log says when something unexpected escapes
    detail = ""
    try:
        endpoint = await locate(
            app, request.headers, request.path, request.rel_url.raw_query_string, transfer
        )
        response = await app[FORWARDER_KEY].forward(request, endpoint, transfer)
        status = response.status
        return response
    except Rejection as err:
        status = err.status
        if status >= 500:
            detail = f" error={err.text!r}"
        return _rejection_response(err)
    finally:
        log_request(request.method, request.path, status, transfer, started=started, detail=detail)


async def handle_healthz(request: web.Request) -> web.Response:
    return web.Response(text="OK")


def _is_preflight(request: web.Request) -> bool:
    return (
        request.method == hdrs.METH_OPTIONS
        and hdrs.ORIGIN in request.headers
        and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers
    )


def _preflight(request: web.Request) -> web.Response:
    response = web.Response(status=204)
    headers = response.headers
    for vary in (
        hdrs.ORIGIN,
        hdrs.ACCESS_CONTROL_REQUEST_METHOD,
        hdrs.ACCESS_CONTROL_REQUEST_HEADERS,
    ):
        headers.add(hdrs.VARY, vary)
    headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = "*"
    headers[hdrs.ACCESS_CONTROL_ALLOW_METHODS] = request.headers[
        hdrs.ACCESS_CONTROL_REQUEST_METHOD
    ].upper()
    if requested := request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS):
        headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = requested
    return response


async def _cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    if hdrs.ORIGIN in request.headers and not _is_preflight(request):
        response.headers.add(hdrs.VARY, hdrs.ORIGIN)
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = "*"
        response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = EXPOSED_HEADERS


@web.middleware
async def _preflight_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if _is_preflight(request):
        return _preflight(request)
    return await handler(request)


def make_app(settings: ProxySettings, client: Client) -> web.Application:
    """The upload proxy. `client` (owned by the caller, left open) reads PVCs, pods, the
    signing key and the TLS material."""
    app = web.Application(middlewares=[_preflight_middleware])
    app[SETTINGS_KEY] = settings
    app[CLIENT_KEY] = client
    app[VERIFIER_KEY] = TokenVerifier(settings, client)
    forwarder = Forwarder(settings, client)
    app[FORWARDER_KEY] = forwarder

    async def upstream_session(_: web.Application) -> AsyncIterator[None]:
        await forwarder.start()
        yield
        await forwarder.close()

    app.cleanup_ctx.append(upstream_session)
    app.on_response_prepare.append(_cors_headers)
    app.router.add_route("*", HEALTHZ_PATH, handle_healthz)
    for path in UPLOAD_PATHS:
        app.router.add_route("*", path, handle_upload)
    return app
