"""The embedded API server's HTTP layer: Kubernetes' REST protocol over the SQLite store.

Routes discovery (/api, /apis, per group/version), resources (/api/v1/..., /apis/g/v/...,
namespaced and cluster-scoped, with subresources status and log), list/watch, create, update,
patch (merge, JSON, strategic for built-in kinds), delete with finalizers and propagation, Table
output for `kubectl get`, authentication and RBAC, and SubjectAccessReviews. Errors leave as
`Status` objects. Admission specific to CDI hooks in through `admission_hooks`: each is called
with an `AdmissionRequest` (the object, the old one, the operation and the requesting user, as a
webhook's AdmissionReview carries them) and answers allowed, with the object to store, or
refused, with the Status kube-apiserver would send for a webhook that said no.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar, cast

import yaml
from aiohttp import web

from cdi import __version__
from cdi.api.tokens import UPLOAD_TOKEN_LIFETIME_SECONDS
from cdi.apiserver import uploadtoken
from cdi.kubeapi import patch as patching
from cdi.kubeapi.auth import (
    ADMIN_GROUP,
    AUTHENTICATED,
    Attributes,
    Authenticator,
    Authorizer,
    UserInfo,
    review,
)
from cdi.kubeapi.crds import default_crd, established_status, validate_crd
from cdi.kubeapi.errors import (
    ApiError,
    BadRequest,
    Conflict,
    Forbidden,
    Gone,
    Invalid,
    MethodNotAllowed,
    NotFound,
    StatusCause,
    StatusDetails,
    Unauthorized,
    UnsupportedMediaType,
)
from cdi.kubeapi.registry import (
    CRD_KEY,
    UPLOAD_TOKEN_REQUESTS,
    Registry,
    ResourceType,
    table_cells,
    table_columns,
)
from cdi.kubeapi.schema import FieldError, check_custom_resource, validate_object_name
from cdi.kubeapi.store import Store, Subscription

log = logging.getLogger(__name__)
T = TypeVar("T")

Obj = dict[str, Any]
LogReader = Callable[[str, str, str | None], Awaitable[str]]
USER_KEY = web.RequestKey("user", UserInfo)
NAMESPACE_KEY = "namespaces"
NAMESPACE_FINALIZER = "kubernetes"
KUBE_VERSION = {
    "major": "1",
    "minor": "30",
    "gitVersion": f"v1.30.0+cdi-py.{__version__}",
    "gitCommit": "",
    "gitTreeState": "clean",
    "buildDate": "",
    "goVersion": "",
    "compiler": "python",
    "platform": "linux/amd64",
}
DEFAULT_WATCH_SECONDS = 1800
ENCODED_EVENTS_KEPT = 4096
OPENAPI_V2_PROTOBUF = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf"
BOOKMARK_SECONDS = 30.0
ANONYMOUS_ADMIN = UserInfo("system:admin", (ADMIN_GROUP, AUTHENTICATED))
REVIEW_KEYS = frozenset(
    {"subjectaccessreviews.authorization.k8s.io", "selfsubjectaccessreviews.authorization.k8s.io"}
)
PUBLIC_PATHS = ("/healthz", "/livez", "/readyz", "/version")


@dataclass(frozen=True, slots=True)
class AdmissionRequest:
    """One write as an admission hook sees it: what kube-apiserver puts in an AdmissionReview,
    plus the server's own means for what a webhook would ask the API (its authorizer, as
    SubjectAccessReviews; reads of stored objects)."""

    resource: ResourceType
    operation: Literal["CREATE", "UPDATE"]
    subresource: str  # "status" for status writes, "" for the object itself
    namespace: str
    name: str  # "" when the server is to generate it (metadata.generateName), as for webhooks
    obj: Obj  # the object to store; a hook may change it (or answer another, `patched`)
    old: Obj | None  # the stored object, on UPDATE; read-only
    user: UserInfo
    dry_run: bool
    review: Callable[[Mapping[str, Any]], Obj]
    """A SubjectAccessReview `spec` in, its `status` out, answered by this server's RBAC."""
    get: Callable[[str, str, str], Obj | None]
    """The stored object (resource key, namespace, name), None if there is none. On PATCH this
    runs inside the write: it sees the last committed state."""


class AdmissionResponse(Protocol):
    """A hook's answer, shaped as a webhook's AdmissionResponse: allowed (with the object to
    store, `patched`, or None to keep it as it was) or refused (with `code`, `reason`,
    `message` and `causes` for the Status, and the `webhook` name kube-apiserver quotes)."""

    @property
    def allowed(self) -> bool: ...
    @property
    def patched(self) -> Obj | None: ...
    @property
    def webhook(self) -> str: ...
    @property
    def code(self) -> int: ...
    @property
    def reason(self) -> str: ...
    @property
    def message(self) -> str: ...
    @property
    def causes(self) -> Sequence[StatusCause]: ...


AdmissionHook = Callable[[AdmissionRequest], AdmissionResponse]
LegacyAdmissionHook = Callable[[ResourceType, str, Obj, Obj | None], Obj]


# Status reasons for the codes webhooks answer with, when they name none.
_REASONS: dict[int, str] = {
    400: "BadRequest",
    403: "Forbidden",
    404: "NotFound",
    409: "Conflict",
    422: "Invalid",
}


def _denied(answer: AdmissionResponse) -> ApiError:
    """The error kube-apiserver returns for a webhook that refused (webhookerrors.ToStatusErr):
    the webhook's code (403 when it gave none, or one below 400), and its message after who
    denied it."""
    denied_by = f'admission webhook "{answer.webhook}" denied the request'
    why = answer.message or answer.reason
    message = f"{denied_by}: {why}" if why else f"{denied_by} without explanation"
    code = answer.code if answer.code >= 400 else 403
    reason = answer.reason or _REASONS.get(code, "")
    details: StatusDetails | None = {"causes": list(answer.causes)} if answer.causes else None
    return ApiError(code, reason, message, details)


def _dry_run(request: web.Request) -> bool:
    """`?dryRun=All`: validate and answer as if written, write nothing (kube-apiserver knows no
    other value)."""
    values = request.query.getall("dryRun", [])
    if any(v != "All" for v in values):
        raise BadRequest(f"unsupported dryRun value {values!r}: the only value is All")
    return bool(values)


def _as_stored(obj: Obj, current: Obj, resource: str) -> Obj:
    """`obj` as an update would store it: the server-owned metadata stays the current one's."""
    result = copy.deepcopy(obj)
    md, old = result.setdefault("metadata", {}), current.get("metadata") or {}
    sent_rv = md.get("resourceVersion")
    if sent_rv and sent_rv != old.get("resourceVersion"):
        raise Conflict.of(
            resource,
            str(md.get("name", "")),
            "the object has been modified; please apply your changes to the latest version and "
            "try again",
        )
    for key in ("uid", "creationTimestamp", "resourceVersion", "generation"):
        if key in old:
            md[key] = old[key]
    return result


def _causes(errors: Iterable[FieldError]) -> list[StatusCause]:
    return [StatusCause(reason=str(e.type), message=e.message, field=e.field) for e in errors]


def _field_validation(mode: str) -> Literal["Ignore", "Warn", "Strict"]:
    if mode in ("Ignore", "Warn", "Strict"):
        return cast(Literal["Ignore", "Warn", "Strict"], mode)
    return "Warn"


def _quote_warning(text: str) -> str:
    """RFC 7234 warn-text is a quoted-string: backslash and double quote are escaped."""
    return text.replace("\\", "\\\\").replace('"', '\\"')


def status_response(err: ApiError) -> web.Response:
    return web.json_response(err.to_status(), status=err.code)


def _wants_table(request: web.Request) -> bool:
    accept = request.headers.get("Accept", "")
    first = accept.split(",")[0]
    return "as=Table" in first


def _table(
    rt: ResourceType, objs: list[Obj], rv: str, *, include: str, cont: str | None = None
) -> Obj:
    rows = []
    for obj in objs:
        if include == "Object":
            embedded: Obj = obj
        elif include == "None":
            embedded = {}
        else:
            embedded = {
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": obj.get("metadata", {}),
            }
        row: Obj = {"cells": table_cells(rt, obj)}
        if embedded:
            row["object"] = embedded
        rows.append(row)
    meta: Obj = {"resourceVersion": rv}
    if cont:
        meta["continue"] = cont
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": meta,
        "columnDefinitions": table_columns(rt),
        "rows": rows,
    }


class ApiServer:
    def __init__(
        self,
        store: Store,
        *,
        authenticator: Authenticator,
        log_reader: LogReader | None = None,
        admission: list[LegacyAdmissionHook] | None = None,
        admission_hooks: Sequence[AdmissionHook] = (),
        anonymous_admin: bool = False,
        signing_key: bytes | None = None,
        upload_token_lifetime: int = UPLOAD_TOKEN_LIFETIME_SECONDS,
    ) -> None:
        self.store = store
        # CDI's own API (cdi.apiserver): UploadTokenRequest is served when there is a key
        # (private PEM, cdi.apiserver.signing) to sign the tokens with.
        self.signing_key = signing_key
        self.upload_token_lifetime = upload_token_lifetime
        self.registry = Registry(extra=(UPLOAD_TOKEN_REQUESTS,) if signing_key else ())
        self.authenticator = authenticator
        self.authorizer = Authorizer(self._list_for_rbac)
        self.log_reader = log_reader
        # `admission`: the first form, (type, method, object, old object) -> object, kept for
        # its callers; `admission_hooks` also see the user and may refuse (AdmissionRequest).
        self.admission = admission or []
        self.admission_hooks = tuple(admission_hooks)
        # Plain-HTTP loopback mode, like kube-apiserver's old insecure port: kubectl sends no
        # bearer token over http, so a request without one acts as admin. Tokens still count.
        self.anonymous_admin = anonymous_admin
        self._encoded: dict[tuple[str, str, str, str, bool, str], bytes] = {}
        self._watches: set[Subscription] = set()
        self._reload_crds()

    def shutdown(self) -> None:
        """End every open watch, so a graceful stop does not wait on long-lived streams."""
        for sub in list(self._watches):
            sub.close()

    # --- plumbing ---------------------------------------------------------------------------
    @staticmethod
    def _sync(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a single-object store call on the event loop. Measured: a WAL write takes well
        under a millisecond, less than the two thread hops of to_thread and without their
        GIL hand-offs; lists, which can be long, still go to a thread."""
        return fn(*args, **kwargs)

    def _list_for_rbac(self, key: str, namespace: str | None) -> list[Obj]:
        return self.store.list(key, namespace).items

    def _reload_crds(self) -> None:
        self.registry.reload(self.store.list(CRD_KEY).items)

    def app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._errors, self._authenticate], client_max_size=64 << 20
        )
        app.router.add_get("/healthz", self._ok)
        app.router.add_get("/livez", self._ok)
        app.router.add_get("/readyz", self._ok)
        app.router.add_get("/version", self._version)
        app.router.add_get("/openapi/v2", self._openapi_v2)
        app.router.add_get("/api", self._api)
        app.router.add_get("/apis", self._apis)
        app.router.add_route("*", "/api/{version}", self._core_group_version)
        app.router.add_route("*", "/apis/{group}", self._group)
        app.router.add_route("*", "/apis/{group}/{version}", self._group_version)
        app.router.add_route("*", "/api/{version}/{rest:.+}", self._resource)
        app.router.add_route("*", "/apis/{group}/{version}/{rest:.+}", self._resource)
        app.router.add_route("*", "/{rest:.*}", self._not_found)
        return app

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as err:
            return status_response(err)
        except web.HTTPException:
            raise
        except Exception as err:  # the edge: a Status, never a traceback
            log.exception("internal error path=%s", request.path)
            from cdi.kubeapi.errors import InternalError  # noqa: PLC0415

            return status_response(InternalError(f"internal error: {err}"))

    @web.middleware
    async def _authenticate(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path in PUBLIC_PATHS:
            return await handler(request)
        header = request.headers.get("Authorization")
        user = self.authenticator.authenticate(header)
        if user is None and header is None and self.anonymous_admin:
            user = ANONYMOUS_ADMIN
        if user is None:
            raise Unauthorized("Unauthorized")
        request[USER_KEY] = user
        if not request.path.startswith(("/api/", "/apis/")) or request.path.count("/") <= 3:
            ok, _ = self.authorizer.allowed(user, Attributes(verb="get", path=request.path))
            if not ok:
                raise Forbidden(f'forbidden: User "{user.name}" cannot get path "{request.path}"')
        return await handler(request)

    def _authorize(
        self,
        request: web.Request,
        verb: str,
        rt: ResourceType,
        *,
        namespace: str,
        name: str,
        sub: str,
    ) -> None:
        user = request[USER_KEY]
        attrs = Attributes(
            verb=verb,
            group=rt.group,
            resource=rt.plural,
            subresource=sub,
            namespace=namespace,
            name=name,
        )
        ok, _ = self.authorizer.allowed(user, attrs)
        if not ok:
            what = rt.plural + (f"/{sub}" if sub else "")
            qualified = f"{what}.{rt.group}" if rt.group else what
            scope = f' in the namespace "{namespace}"' if namespace else " at the cluster scope"
            named = f' "{name}"' if name else ""
            raise Forbidden(
                f'{qualified}{named} is forbidden: User "{user.name}" cannot {verb} '
                f'resource "{rt.plural}"'
                f'{f" with subresource {sub!r}" if sub else ""} in API group "{rt.group}"{scope}'
            )
        if not sub and verb not in rt.verbs:
            # Allowed, but not served (create-only kinds: access reviews, UploadTokenRequest),
            # as kube-apiserver answers once authorization has passed.
            raise MethodNotAllowed(
                "the server does not allow this method on the requested resource"
            )

    async def _ok(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response(KUBE_VERSION)

    async def _openapi_v2(self, request: web.Request) -> web.Response:
        """An OpenAPI v2 document with no definitions: kubectl's client-side validation then
        skips every kind (as it does for CRDs without schema) and leaves checking to us; custom
        resources are validated here against their CRD schema."""
        if "protobuf" in request.headers.get("Accept", ""):
            # protobuf Document{swagger: "2.0"}: field 1, length-delimited, 3 bytes.
            return web.Response(body=b"\x0a\x032.0", content_type=OPENAPI_V2_PROTOBUF)
        return web.json_response(
            {
                "swagger": "2.0",
                "info": {"title": "cdi-py", "version": KUBE_VERSION["gitVersion"]},
                "paths": {},
                "definitions": {},
            }
        )

    async def _not_found(self, request: web.Request) -> web.Response:
        return status_response(
            NotFound(f"the server could not find the requested resource ({request.path})")
        )

    # --- discovery --------------------------------------------------------------------------
    async def _api(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": request.host}
                ],
            }
        )

    def _group_doc(self, group: str, versions: list[str]) -> Obj:
        entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {"name": group, "versions": entries, "preferredVersion": entries[0]}

    async def _apis(self, request: web.Request) -> web.Response:
        groups = [self._group_doc(g, vs) for g, vs in sorted(self.registry.groups().items()) if g]
        return web.json_response({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})

    async def _group(self, request: web.Request) -> web.Response:
        group = request.match_info["group"]
        versions = self.registry.groups().get(group)
        if not versions:
            raise NotFound(f"the server could not find the requested resource (group {group})")
        return web.json_response(
            {"kind": "APIGroup", "apiVersion": "v1", **self._group_doc(group, versions)}
        )

    def _resource_list(self, group: str, version: str) -> web.Response:
        types = self.registry.in_group_version(group, version)
        if not types:
            raise NotFound(f"the server could not find the requested resource ({group}/{version})")
        resources = [entry for t in types for entry in t.discovery()]
        gv = f"{group}/{version}" if group else version
        return web.json_response(
            {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": gv,
                "resources": resources,
            }
        )

    async def _core_group_version(self, request: web.Request) -> web.Response:
        return self._resource_list("", request.match_info["version"])

    async def _group_version(self, request: web.Request) -> web.Response:
        return self._resource_list(request.match_info["group"], request.match_info["version"])

    # --- resources --------------------------------------------------------------------------
    def _route(self, request: web.Request) -> tuple[ResourceType, str, str, str]:
        """(type, namespace, name, subresource) from the URL."""
        group = request.match_info.get("group", "")
        version = request.match_info["version"]
        parts = [p for p in request.match_info["rest"].split("/") if p]
        namespace = ""
        if parts[0] == "namespaces" and len(parts) >= 3:
            candidate = self.registry.get(group, version, parts[2])
            if candidate is not None and candidate.namespaced:
                namespace = parts[1]
                parts = parts[2:]
        rt = self.registry.get(group, version, parts[0])
        if rt is None:
            raise NotFound(f"the server could not find the requested resource ({request.path})")
        name = parts[1] if len(parts) > 1 else ""
        sub = parts[2] if len(parts) > 2 else ""
        if len(parts) > 3 or (sub and sub not in rt.subresources):
            raise NotFound(f"the server could not find the requested resource ({request.path})")
        if rt.namespaced and name and not namespace:
            raise NotFound(f"the server could not find the requested resource ({request.path})")
        return rt, namespace, name, sub

    def _present(self, rt: ResourceType, obj: Obj) -> Obj:
        """The object as this version serves it (custom resources convert by apiVersion alone)."""
        obj["apiVersion"] = rt.api_version
        obj["kind"] = rt.kind
        return obj

    def _json(
        self,
        request: web.Request,
        rt: ResourceType,
        body: Obj,
        status: int = 200,
        warnings: tuple[str, ...] = (),
    ) -> web.Response:
        headers = {}
        notes = list(warnings)
        if rt.deprecation_warning:
            notes.append(rt.deprecation_warning)
        if notes:
            headers["Warning"] = ", ".join(f'299 - "{_quote_warning(w)}"' for w in notes)
        return web.json_response(body, status=status, headers=headers)

    async def _resource(self, request: web.Request) -> web.StreamResponse:
        rt, namespace, name, sub = self._route(request)
        method = request.method
        if method == "GET":
            if not name:
                verb = "watch" if request.query.get("watch") in ("true", "1") else "list"
                self._authorize(request, verb, rt, namespace=namespace, name="", sub="")
                if verb == "watch":
                    return await self._watch(request, rt, namespace)
                return await self._list(request, rt, namespace)
            self._authorize(request, "get", rt, namespace=namespace, name=name, sub=sub)
            if sub == "log":
                return await self._log(request, namespace, name)
            obj = self._sync(self.store.get, rt.key, namespace, name)
            if _wants_table(request):
                return web.json_response(
                    _table(
                        rt,
                        [obj],
                        obj["metadata"]["resourceVersion"],
                        include=request.query.get("includeObject", "Metadata"),
                    )
                )
            return self._json(request, rt, self._present(rt, obj))
        if method == "POST" and not name:
            self._authorize(request, "create", rt, namespace=namespace, name="", sub="")
            return await self._create(request, rt, namespace)
        if method == "PUT" and name:
            self._authorize(request, "update", rt, namespace=namespace, name=name, sub=sub)
            return await self._update(request, rt, namespace, name, sub)
        if method == "PATCH" and name:
            self._authorize(request, "patch", rt, namespace=namespace, name=name, sub=sub)
            return await self._patch(request, rt, namespace, name, sub)
        if method == "DELETE":
            if not name:
                self._authorize(
                    request, "deletecollection", rt, namespace=namespace, name="", sub=""
                )
                return await self._delete_collection(request, rt, namespace)
            self._authorize(request, "delete", rt, namespace=namespace, name=name, sub="")
            return await self._delete(request, rt, namespace, name)
        raise MethodNotAllowed(
            f"the server does not allow this method on the requested resource ({method})"
        )

    async def _body(self, request: web.Request) -> Any:
        raw = await request.read()
        ctype = request.headers.get("Content-Type", "application/json").split(";")[0].strip()
        if "protobuf" in ctype:
            raise UnsupportedMediaType.of(["application/json", "application/yaml"])
        try:
            if "yaml" in ctype:
                return yaml.safe_load(raw)
            return json.loads(raw)
        except (ValueError, yaml.YAMLError) as err:
            raise BadRequest(
                f"the request body is not valid {'YAML' if 'yaml' in ctype else 'JSON'}: {err}"
            ) from None

    async def _list(self, request: web.Request, rt: ResourceType, namespace: str) -> web.Response:
        q = request.query
        limit = int(q["limit"]) if q.get("limit", "").isdigit() and int(q["limit"]) > 0 else None
        result = await asyncio.to_thread(
            self.store.list,
            rt.key,
            namespace or None,
            label_selector=q.get("labelSelector"),
            field_selector=q.get("fieldSelector"),
            limit=limit,
            continue_token=q.get("continue") or None,
        )
        if _wants_table(request):
            return web.json_response(
                _table(
                    rt,
                    result.items,
                    result.resource_version,
                    include=q.get("includeObject", "Metadata"),
                    cont=result.continue_token,
                )
            )
        meta: Obj = {"resourceVersion": result.resource_version}
        if result.continue_token:
            meta["continue"] = result.continue_token
        items = [self._present(rt, o) for o in result.items]
        return self._json(
            request,
            rt,
            {
                "kind": f"{rt.kind}List",
                "apiVersion": rt.api_version,
                "metadata": meta,
                "items": items,
            },
        )

    async def _watch(
        self, request: web.Request, rt: ResourceType, namespace: str
    ) -> web.StreamResponse:
        q = request.query
        rv = q.get("resourceVersion") or ""
        timeout = (
            int(q["timeoutSeconds"])
            if q.get("timeoutSeconds", "").isdigit()
            else DEFAULT_WATCH_SECONDS
        )
        bookmarks = q.get("allowWatchBookmarks") in ("true", "1")
        initial: list[Obj] = []
        since: str | None = rv if rv not in ("", "0") else None
        if since is None:
            # "Start at most recent": the current objects arrive as ADDED events first.
            result = await asyncio.to_thread(
                self.store.list,
                rt.key,
                namespace or None,
                label_selector=q.get("labelSelector"),
                field_selector=q.get("fieldSelector"),
            )
            initial = result.items
            since = result.resource_version
        try:
            sub = self.store.subscribe(
                rt.key,
                namespace or None,
                since_rv=since,
                label_selector=q.get("labelSelector"),
                field_selector=q.get("fieldSelector"),
            )
        except Gone as err:
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            await resp.prepare(request)
            await resp.write(
                json.dumps({"type": "ERROR", "object": err.to_status()}).encode() + b"\n"
            )
            return resp
        as_table = _wants_table(request)
        include = q.get("includeObject", "Metadata")

        def encode(kind: str, obj: Obj) -> bytes:
            rv = str(obj["metadata"].get("resourceVersion", ""))
            # Every watcher of a kind gets the same bytes for an event: encode it once.
            memo_key = (kind, rv, rt.api_version, rt.plural, as_table, include)
            if (cached := self._encoded.get(memo_key)) is not None:
                return cached
            shown = self._present(rt, dict(obj))
            if as_table:  # kubectl get -w asked for rows, one Table per event
                shown = _table(rt, [shown], rv, include=include)
            data = json.dumps({"type": kind, "object": shown}).encode() + b"\n"
            if kind != "ADDED" or since is not None:
                self._encoded[memo_key] = data
                while len(self._encoded) > ENCODED_EVENTS_KEPT:
                    self._encoded.pop(next(iter(self._encoded)))
            return data

        resp = web.StreamResponse(
            headers={"Content-Type": "application/json", "Cache-Control": "no-cache"}
        )
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        deadline = time.monotonic() + timeout
        self._watches.add(sub)
        try:
            for obj in initial:
                await resp.write(encode("ADDED", obj))
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    event = await asyncio.wait_for(
                        sub.get(), timeout=min(remaining, BOOKMARK_SECONDS)
                    )
                except TimeoutError:
                    if bookmarks:
                        mark = {
                            "kind": rt.kind,
                            "apiVersion": rt.api_version,
                            "metadata": {"resourceVersion": str(sub.bookmark_rv)},
                        }
                        await resp.write(
                            json.dumps({"type": "BOOKMARK", "object": mark}).encode() + b"\n"
                        )
                    continue
                if event is None:
                    if sub.overflowed:
                        gone = Gone(f"watch fell behind; resume from resourceVersion {sub.last_rv}")
                        await resp.write(
                            json.dumps({"type": "ERROR", "object": gone.to_status()}).encode()
                            + b"\n"
                        )
                    break
                wire = event.to_wire()
                await resp.write(encode(wire["type"], wire["object"]))
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._watches.discard(sub)
            sub.close()
        with contextlib.suppress(ConnectionResetError):
            await resp.write_eof()
        return resp

    async def _log(self, request: web.Request, namespace: str, name: str) -> web.Response:
        self._sync(self.store.get, "pods", namespace, name)
        if self.log_reader is None:
            raise NotFound(f'pods "{name}" has no logs on this server')
        text = await self.log_reader(namespace, name, request.query.get("container"))
        tail = request.query.get("tailLines")
        if tail and tail.isdigit():
            text = "".join(text.splitlines(keepends=True)[-int(tail) :])
        return web.Response(text=text, content_type="text/plain")

    # --- writes -------------------------------------------------------------------------------
    def _check_kind(self, rt: ResourceType, obj: Any) -> Obj:
        if not isinstance(obj, dict):
            raise BadRequest("the request body must be a JSON object")
        api_version = obj.get("apiVersion")
        kind = obj.get("kind")
        if api_version and api_version != rt.api_version:
            raise BadRequest(
                f"the API version in the data ({api_version}) does not match the expected "
                f"API version ({rt.api_version})"
            )
        if kind and kind != rt.kind:
            raise BadRequest(
                f"the kind in the data ({kind}) does not match the expected kind ({rt.kind})"
            )
        obj["apiVersion"] = rt.api_version
        obj["kind"] = rt.kind
        obj.setdefault("metadata", {})
        if not isinstance(obj["metadata"], dict):
            raise BadRequest("metadata must be an object")
        return obj

    def _validate(
        self,
        request: web.Request,
        rt: ResourceType,
        obj: Obj,
        old: Obj | None,
        *,
        sub: str = "",
        generated_name: bool = False,
    ) -> tuple[str, ...]:
        """Name, schema (custom resources), per-kind rules and admission; returns warnings.
        What admission changes is written into `obj`, which callers then store."""
        name = obj["metadata"].get("name")
        errors = validate_object_name(name, label=rt.plural == NAMESPACE_KEY)
        if errors:
            raise Invalid.of(rt.kind, str(name or ""), _causes(errors), group=rt.group)
        warnings: tuple[str, ...] = ()
        if rt.custom and rt.schema is not None:
            mode = request.query.get("fieldValidation", "Warn")
            result = check_custom_resource(obj, rt.schema, field_validation=_field_validation(mode))
            if result.strict_error:
                raise BadRequest(result.strict_error)
            if result.errors:
                raise Invalid.of(rt.kind, str(name), _causes(result.errors), group=rt.group)
            warnings = result.warnings
        if rt.key == CRD_KEY:
            default_crd(obj)
            errors = validate_crd(obj)
            if errors:
                raise Invalid.of(rt.kind, str(name), _causes(errors), group=rt.group)
        admitted = obj
        for hook in self.admission:
            admitted = hook(rt, request.method, admitted, old)
        admitted = self._admit(request, rt, admitted, old, sub=sub, generated_name=generated_name)
        if admitted is not obj:  # callers hold `obj`: the admitted object replaces its content
            obj.clear()
            obj.update(admitted)
        return warnings

    def _admit(
        self,
        request: web.Request,
        rt: ResourceType,
        obj: Obj,
        old: Obj | None,
        *,
        sub: str,
        generated_name: bool,
    ) -> Obj:
        """Run `admission_hooks` in order, each on the object the previous one admitted; the
        first refusal is the answer (its Status, as kube-apiserver words a webhook's)."""
        for hook in self.admission_hooks:
            md = obj.get("metadata") or {}
            answer = hook(
                AdmissionRequest(
                    resource=rt,
                    operation="UPDATE" if old is not None else "CREATE",
                    subresource=sub,
                    namespace=str(md.get("namespace") or ""),
                    name="" if generated_name else str(md.get("name") or ""),
                    obj=obj,
                    old=old,
                    user=request[USER_KEY],
                    dry_run=_dry_run(request),
                    review=lambda spec: review(self.authorizer, spec),
                    get=self._lookup,
                )
            )
            if not answer.allowed:
                raise _denied(answer)
            if answer.patched is not None:
                obj = answer.patched
        return obj

    def _lookup(self, key: str, namespace: str, name: str) -> Obj | None:
        try:
            return self.store.get(key, namespace, name)
        except NotFound:
            return None

    def _defaults(self, rt: ResourceType, obj: Obj) -> None:
        if rt.plural == NAMESPACE_KEY and rt.group == "":
            obj.setdefault("spec", {}).setdefault("finalizers", [NAMESPACE_FINALIZER])
            obj["status"] = {"phase": "Active"}
        elif rt.plural == "pods" and rt.group == "":
            obj["status"] = {"phase": "Pending"}
            spec = obj.setdefault("spec", {})
            spec.setdefault("restartPolicy", "Always")
            for container in spec.get("containers") or []:
                container.setdefault("terminationMessagePath", "/dev/termination-log")
                container.setdefault("terminationMessagePolicy", "File")
        elif rt.plural == "persistentvolumeclaims" and rt.group == "":
            obj["status"] = {"phase": "Pending"}
            obj.setdefault("spec", {}).setdefault("volumeMode", "Filesystem")
        elif rt.plural == "persistentvolumes" and rt.group == "":
            obj["status"] = {"phase": "Pending"}
            spec = obj.setdefault("spec", {})
            spec.setdefault("persistentVolumeReclaimPolicy", "Retain")
            spec.setdefault("volumeMode", "Filesystem")
        elif rt.plural == "secrets" and rt.group == "":
            obj.setdefault("type", "Opaque")
        elif rt.key == CRD_KEY:
            obj["status"] = established_status(obj)

    async def _namespace_ready(self, namespace: str) -> None:
        if not namespace:
            return
        try:
            ns = self._sync(self.store.get, NAMESPACE_KEY, "", namespace)
        except NotFound:
            raise NotFound(f'namespaces "{namespace}" not found') from None
        if ns["metadata"].get("deletionTimestamp"):
            raise Forbidden(
                f"unable to create new content in namespace {namespace} because it is being "
                "terminated"
            )

    async def _create(self, request: web.Request, rt: ResourceType, namespace: str) -> web.Response:
        obj = self._check_kind(rt, await self._body(request))
        meta = obj["metadata"]
        if rt.namespaced:
            body_ns = meta.get("namespace")
            if body_ns and body_ns != namespace:
                raise BadRequest(
                    "the namespace of the provided object does not match the namespace sent on "
                    "the request"
                )
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        if rt.key in REVIEW_KEYS:
            return self._access_review(request, rt, obj)
        await self._namespace_ready(namespace)
        if rt.key == UPLOAD_TOKEN_REQUESTS.key:
            return self._upload_token_request(request, rt, namespace, obj)
        if not meta.get("name") and meta.get("generateName"):
            # Validated under a stand-in name (the store picks the suffix); admission hooks see
            # no name, as webhooks do, and what they change is kept.
            probe = copy.deepcopy(obj)
            probe["metadata"]["name"] = meta["generateName"] + "xxxxx"
            self._validate(request, rt, probe, None, generated_name=True)
            probe["metadata"].pop("name", None)
            obj = probe
            warnings: tuple[str, ...] = ()
        else:
            warnings = self._validate(request, rt, obj, None)
        self._defaults(rt, obj)
        if _dry_run(request):
            return self._json(request, rt, obj, 201, warnings)
        created = self._sync(
            self.store.create,
            rt.key,
            obj,
            status_subresource=rt.status_subresource
            and rt.plural
            not in (
                "pods",
                "persistentvolumeclaims",
                "persistentvolumes",
                "namespaces",
                "customresourcedefinitions",
            ),
        )
        if rt.key == CRD_KEY:
            self._reload_crds()
        return self._json(request, rt, self._present(rt, created), 201, warnings)

    def _access_review(self, request: web.Request, rt: ResourceType, obj: Obj) -> web.Response:
        spec = obj.get("spec") or {}
        if rt.plural == "selfsubjectaccessreviews":
            user: UserInfo = request[USER_KEY]
            spec = {**spec, "user": user.name, "groups": list(user.groups)}
        obj["status"] = review(self.authorizer, spec)
        return web.json_response(obj, status=201)

    # --- CDI's own API (cdi.apiserver) ---------------------------------------------------------
    def _upload_token_request(
        self, request: web.Request, rt: ResourceType, namespace: str, obj: Obj
    ) -> web.Response:
        """Create-only and stored nowhere, like an access review: the caller passed RBAC
        (`create uploadtokenrequests` in the namespace, CDI's one rule) in `_resource`."""
        assert self.signing_key is not None  # the type is only served with a key
        user: UserInfo = request[USER_KEY]
        try:
            answer = uploadtoken.issue(
                obj,
                namespace,
                self.signing_key,
                user=user.name,
                lifetime=self.upload_token_lifetime,
            )
        except uploadtoken.InvalidUploadTokenRequest as err:
            causes = [
                StatusCause(reason=e.reason, message=e.message, field=e.field) for e in err.errors
            ]
            name = str(obj["metadata"].get("name") or "")
            raise Invalid.of(rt.kind, name, causes, group=rt.group) from None
        return web.json_response(answer, status=201)

    # --- end CDI's own API ---------------------------------------------------------------------

    async def _update(
        self, request: web.Request, rt: ResourceType, namespace: str, name: str, sub: str
    ) -> web.Response:
        obj = self._check_kind(rt, await self._body(request))
        meta = obj["metadata"]
        if meta.get("name") and meta["name"] != name:
            raise BadRequest("the name of the object does not match the name on the URL")
        meta["name"] = name
        if rt.namespaced:
            meta["namespace"] = namespace
        old = self._sync(self.store.get, rt.key, namespace, name)
        sent_uid = meta.get("uid")
        stored_uid = old["metadata"].get("uid")
        if sent_uid and sent_uid != stored_uid:
            # As kube-apiserver: a uid in the body is a precondition, checked before validation,
            # so a client replacing an object someone recreated gets a Conflict and refetches.
            raise Conflict.of(
                rt.key,
                name,
                f"Precondition failed: UID in precondition: {sent_uid}, "
                f"UID in object meta: {stored_uid}",
            )
        warnings = self._validate(request, rt, obj, old, sub=sub)
        if _dry_run(request):
            stored = _as_stored(obj, old, rt.key)
            return self._json(request, rt, self._present(rt, stored), 200, warnings)
        updated = self._sync(
            self.store.update,
            rt.key,
            obj,
            subresource="status" if sub == "status" else None,
            status_subresource=rt.status_subresource,
        )
        if rt.key == CRD_KEY:
            self._reload_crds()
        return self._json(request, rt, self._present(rt, updated), 200, warnings)

    async def _patch(
        self, request: web.Request, rt: ResourceType, namespace: str, name: str, sub: str
    ) -> web.Response:
        body = await request.read()
        ctype = request.headers.get("Content-Type", "")
        try:
            patch_doc = json.loads(body)
        except ValueError as err:
            raise BadRequest(f"the patch is not valid JSON: {err}") from None
        warnings: list[str] = []

        def mutate(current: Obj) -> Obj:
            result = patching.apply_patch(current, ctype, patch_doc, resource=rt.key)
            result = self._check_kind(rt, result)
            result["metadata"]["name"] = name
            if rt.namespaced:
                result["metadata"]["namespace"] = namespace
            warnings.extend(self._validate(request, rt, result, current, sub=sub))
            return result

        if _dry_run(request):
            current = self._sync(self.store.get, rt.key, namespace, name)
            result = _as_stored(mutate(copy.deepcopy(current)), current, rt.key)
            return self._json(request, rt, self._present(rt, result), 200, tuple(warnings))
        updated = self._sync(
            self.store.modify,
            rt.key,
            namespace,
            name,
            mutate,
            subresource="status" if sub == "status" else None,
            status_subresource=rt.status_subresource,
        )
        if rt.key == CRD_KEY:
            self._reload_crds()
        return self._json(request, rt, self._present(rt, updated), 200, tuple(warnings))

    async def _delete_options(self, request: web.Request) -> Obj:
        raw = await request.read()
        options: Obj = {}
        if raw.strip():
            try:
                options = json.loads(raw)
            except ValueError as err:
                raise BadRequest(f"the delete options are not valid JSON: {err}") from None
        if "propagationPolicy" in request.query:
            options["propagationPolicy"] = request.query["propagationPolicy"]
        if "gracePeriodSeconds" in request.query:
            options["gracePeriodSeconds"] = int(request.query["gracePeriodSeconds"])
        return options

    async def _delete(
        self, request: web.Request, rt: ResourceType, namespace: str, name: str
    ) -> web.Response:
        options = await self._delete_options(request)
        policy = options.get("propagationPolicy") or (
            "Orphan" if options.get("orphanDependents") else "Background"
        )
        finalizers = {"Foreground": ("foregroundDeletion",), "Orphan": ("orphan",)}.get(policy, ())
        if rt.plural == NAMESPACE_KEY and rt.group == "":
            finalizers = (*finalizers, NAMESPACE_FINALIZER)
        pre = options.get("preconditions") or {}
        # kubectl sends it in the DeleteOptions body; other clients in the query.
        body_dry = options.get("dryRun") or []
        if any(v != "All" for v in body_dry):
            raise BadRequest(f"unsupported dryRun value {body_dry!r}: the only value is All")
        if _dry_run(request) or body_dry:
            current = self._sync(self.store.get, rt.key, namespace, name)
            uid = current["metadata"].get("uid")
            if pre.get("uid") and pre["uid"] != uid:
                raise Conflict.of(
                    rt.key,
                    name,
                    f"Precondition failed: UID in precondition: {pre['uid']}, "
                    f"UID in object meta: {uid}",
                )
            return self._json(request, rt, self._present(rt, current), 200)
        result = self._sync(
            self.store.delete,
            rt.key,
            namespace,
            name,
            precondition_uid=pre.get("uid"),
            precondition_rv=pre.get("resourceVersion"),
            add_finalizers=finalizers,
        )
        if rt.key == CRD_KEY:
            self._reload_crds()
        if not result.deleted:
            return self._json(request, rt, self._present(rt, result.object), 202)
        md = result.object.get("metadata", {})
        return web.json_response(
            {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Success",
                "details": {
                    "name": name,
                    "group": rt.group,
                    "kind": rt.plural,
                    "uid": md.get("uid"),
                },
            }
        )

    async def _delete_collection(
        self, request: web.Request, rt: ResourceType, namespace: str
    ) -> web.Response:
        q = request.query
        result = await asyncio.to_thread(
            self.store.list,
            rt.key,
            namespace or None,
            label_selector=q.get("labelSelector"),
            field_selector=q.get("fieldSelector"),
        )
        for obj in [] if _dry_run(request) else result.items:
            md = obj["metadata"]
            with contextlib.suppress(NotFound):
                self._sync(self.store.delete, rt.key, md.get("namespace", ""), md["name"])
        return web.json_response(
            {"kind": f"{rt.kind}List", "apiVersion": rt.api_version, "metadata": {}, "items": []}
        )
