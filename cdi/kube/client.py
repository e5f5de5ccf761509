"""The async Kubernetes client: CRUD, patch, status, paginated list and watch, over aiohttp.

Generic over resources (`cdi.api.groups.Resource`), so built-in kinds and CRDs are handled
alike. Retries 429 (honouring Retry-After), 5xx and refused connections with the back-off
sequence it is given; every other error is raised at once as an `ApiError` subclass.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import aiohttp

from cdi.api.groups import Resource
from cdi.kube.config import ClientConfig
from cdi.kube.errors import ApiError, ServerError, TooManyRequests, error_from_status

log = logging.getLogger(__name__)

DEFAULT_BACKOFF = (0.1, 0.2, 0.5, 1.0, 2.0)
PATCH_TYPES = {
    "merge": "application/merge-patch+json",
    "json": "application/json-patch+json",
    "strategic": "application/strategic-merge-patch+json",
    "apply": "application/apply-patch+yaml",
}


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: str  # ADDED, MODIFIED, DELETED, BOOKMARK
    object: dict[str, Any]


def resource_path(
    res: Resource,
    namespace: str | None = None,
    name: str | None = None,
    subresource: str | None = None,
) -> str:
    base = f"/apis/{res.group}/{res.version}" if res.group else f"/api/{res.version}"
    if res.namespaced and namespace:
        base += f"/namespaces/{quote(namespace, safe='')}"
    base += f"/{res.plural}"
    if name is not None:
        base += f"/{quote(name, safe='')}"
    if subresource:
        base += f"/{subresource}"
    return base


class Client:
    def __init__(
        self,
        config: ClientConfig,
        *,
        backoff: Sequence[float] = DEFAULT_BACKOFF,
        user_agent: str = "cdi-py",
    ) -> None:
        self.config = config
        self.backoff = tuple(backoff)
        self._user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self.config.ssl_context(), limit=32),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=30),
            )
        return self._session

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": self._user_agent}
        if token := self.config.bearer_token():
            headers["Authorization"] = f"Bearer {token}"
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> Any:
        data = json.dumps(body) if body is not None else None
        attempt = 0
        while True:
            try:
                async with self._client().request(
                    method,
                    self.config.server + path,
                    params=params,
                    data=data,
                    headers=self._headers(content_type if data is not None else None),
                    timeout=aiohttp.ClientTimeout(total=60, sock_connect=30),
                ) as resp:
                    text = await resp.text()
                    parsed: Any = json.loads(text) if text and _is_json(resp) else text
                    if resp.status < 400:
                        return parsed
                    raise error_from_status(
                        resp.status,
                        parsed,
                        retry_after=_retry_after(resp.headers.get("Retry-After")),
                    )
            except (TimeoutError, aiohttp.ClientConnectionError) as err:
                failure: ApiError = ServerError(
                    503, "ServiceUnavailable", f"cannot reach {self.config.server}: {err}"
                )
                failure.__cause__ = err
            except ApiError as err:
                if not err.retryable:
                    raise
                failure = err
            if attempt >= len(self.backoff):
                raise failure
            delay = self.backoff[attempt]
            if isinstance(failure, TooManyRequests) and failure.retry_after is not None:
                delay = max(delay, failure.retry_after)
            attempt += 1
            log.debug(
                "retrying method=%s path=%s attempt=%d delay=%.2f error=%s",
                method,
                path,
                attempt,
                delay,
                failure,
            )
            await asyncio.sleep(delay)

    # --- typed verbs ------------------------------------------------------------------------
    async def get(self, res: Resource, name: str, namespace: str | None = None) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("GET", resource_path(res, namespace, name))
        return result

    async def list(
        self,
        res: Resource,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        page_size: int = 500,
    ) -> tuple[list[dict[str, Any]], str]:
        """Every item (all pages) and the list's resourceVersion, for a watch to start from."""
        items: list[dict[str, Any]] = []
        params: dict[str, str] = {"limit": str(page_size)}
        if label_selector:
            params["labelSelector"] = label_selector
        if field_selector:
            params["fieldSelector"] = field_selector
        while True:
            page = await self.request("GET", resource_path(res, namespace), params=params)
            items.extend(page.get("items") or [])
            meta = page.get("metadata") or {}
            if not meta.get("continue"):
                return items, str(meta.get("resourceVersion", ""))
            params["continue"] = meta["continue"]

    async def create(
        self, res: Resource, obj: dict[str, Any], namespace: str | None = None
    ) -> dict[str, Any]:
        ns = namespace or obj.get("metadata", {}).get("namespace")
        result: dict[str, Any] = await self.request("POST", resource_path(res, ns), body=obj)
        return result

    async def replace(
        self, res: Resource, obj: dict[str, Any], *, subresource: str | None = None
    ) -> dict[str, Any]:
        meta = obj.get("metadata", {})
        path = resource_path(res, meta.get("namespace"), meta["name"], subresource)
        result: dict[str, Any] = await self.request("PUT", path, body=obj)
        return result

    async def replace_status(self, res: Resource, obj: dict[str, Any]) -> dict[str, Any]:
        return await self.replace(res, obj, subresource="status")

    async def patch(
        self,
        res: Resource,
        name: str,
        patch: Any,
        namespace: str | None = None,
        *,
        patch_type: str = "merge",
        subresource: str | None = None,
    ) -> dict[str, Any]:
        result: dict[str, Any] = await self.request(
            "PATCH",
            resource_path(res, namespace, name, subresource),
            body=patch,
            content_type=PATCH_TYPES[patch_type],
        )
        return result

    async def delete(
        self,
        res: Resource,
        name: str,
        namespace: str | None = None,
        *,
        propagation: str | None = None,
        uid: str | None = None,
    ) -> Any:
        body: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if propagation:
            body["propagationPolicy"] = propagation
        if uid:
            body["preconditions"] = {"uid": uid}
        return await self.request("DELETE", resource_path(res, namespace, name), body=body)

    async def watch(
        self,
        res: Resource,
        namespace: str | None = None,
        *,
        resource_version: str,
        label_selector: str | None = None,
        field_selector: str | None = None,
        timeout_seconds: int = 300,
    ) -> AsyncIterator[WatchEvent]:
        """Events after `resource_version` until the server ends the stream. Raises Gone (410)
        when that version is too old: the caller lists again and starts over."""
        params = {
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
        }
        if label_selector:
            params["labelSelector"] = label_selector
        if field_selector:
            params["fieldSelector"] = field_selector
        async with self._client().get(
            self.config.server + resource_path(res, namespace),
            params=params,
            headers=self._headers(),
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=30, sock_read=timeout_seconds + 30
            ),
        ) as resp:
            if resp.status >= 400:
                text = await resp.text()
                raise error_from_status(resp.status, _maybe_json(text))
            async for line in resp.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    status = event.get("object") or {}
                    raise error_from_status(int(status.get("code", 500)), status)
                yield WatchEvent(event["type"], event["object"])


def _is_json(resp: aiohttp.ClientResponse) -> bool:
    return "json" in resp.headers.get("Content-Type", "")


def _maybe_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None
