"""List-then-watch for one resource: a never-ending stream of what changed, resumable, relisting.

Owns the informer loop every long-running watcher needs (the local node agent, the local
provisioner, later the controller runtime): list once, then watch from the list's
resourceVersion; when the stream ends (server timeout, dropped connection) resume from the last
resourceVersion seen; when the server says that version is too old (410 Gone) list again. Each
(re)list is yielded as one `Snapshot` so that the consumer can also forget objects deleted while
it was not watching. Bookmarks only move the resume point and are not yielded.

Called by `cdi.agent.runner` and `cdi.provisioner.local`. It never stops by itself: the caller
cancels the task consuming it. It does not interpret objects, throttle or queue: that is the
consumer's business.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp

from cdi.api.groups import Resource
from cdi.kube.client import Client, WatchEvent
from cdi.kube.errors import ApiError, Gone

log = logging.getLogger(__name__)

#: Seconds between attempts when the API cannot be reached (the client already retried).
DEFAULT_RETRY_DELAY = 1.0
#: Server-side watch timeout; a fresh watch resumes from the last resourceVersion after it.
DEFAULT_WATCH_SECONDS = 300


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every object that exists, from a (re)list: the consumer's full resync point."""

    items: list[dict[str, Any]]
    resource_version: str


async def list_then_watch(
    client: Client,
    resource: Resource,
    namespace: str | None = None,
    *,
    retry_delay: float = DEFAULT_RETRY_DELAY,
    watch_seconds: int = DEFAULT_WATCH_SECONDS,
) -> AsyncIterator[Snapshot | WatchEvent]:
    """Yield a `Snapshot`, then every ADDED/MODIFIED/DELETED event, forever (until cancelled)."""
    rv: str | None = None
    kind = resource.plural
    while True:
        if rv is None:
            try:
                items, rv = await client.list(resource, namespace)
            except (ApiError, aiohttp.ClientError, TimeoutError) as err:
                log.warning("list failed resource=%s error=%s; retrying", kind, err)
                await asyncio.sleep(retry_delay)
                continue
            log.debug("listed resource=%s count=%d rv=%s", kind, len(items), rv)
            yield Snapshot(items, rv)
        try:
            async for event in client.watch(
                resource, namespace, resource_version=rv, timeout_seconds=watch_seconds
            ):
                new_rv = (event.object.get("metadata") or {}).get("resourceVersion")
                if new_rv:
                    rv = str(new_rv)
                if event.type == "BOOKMARK":
                    continue
                yield event
        except Gone:
            log.info("watch expired resource=%s rv=%s; listing again", kind, rv)
            rv = None
        except (ApiError, aiohttp.ClientError, TimeoutError, ValueError) as err:
            # ValueError: a frame cut in half by a dropped connection is not JSON.
            log.warning("watch broke resource=%s rv=%s error=%s; resuming", kind, rv, err)
            await asyncio.sleep(retry_delay)
