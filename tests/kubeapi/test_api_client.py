"""The embedded API server through our own async client (`cdi.kube.Client`), as the controller
will use it: identity on create, paginated lists, optimistic concurrency, watch semantics
(resume from a resourceVersion, 410 when too old, continuity across a restart) and the status
codes of bad requests, each leaving nothing stored.

The server is a `cdi server` subprocess (conftest). Raw HTTP (aiohttp) is used only where the
client cannot send the request: malformed bodies and missing credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest

import cdi.kube
from cdi.api.groups import CONFIG_MAP, DATA_VOLUME, NAMESPACE, RBAC_GROUP, Resource
from cdi.kube import Client, WatchEvent
from cdi.kube.config import ClientConfig, load_kubeconfig
from cdi.kubeapi.store import Store
from tests.kubeapi.conftest import USERS, CdiServer

ROLE = Resource(RBAC_GROUP, "v1", "Role", "roles", True)
ROLE_BINDING = Resource(RBAC_GROUP, "v1", "RoleBinding", "rolebindings", True)
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
DNS1123_SUBDOMAIN_MESSAGE = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or "
    "'.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used "
    "for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
DNS1123_LABEL_MESSAGE = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and "
    "must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex "
    "used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)
WATCH_TIMEOUT = 10.0


def cm(name: str, namespace: str, **data: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace},
        "data": dict(data),
    }


def dv(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "cdi.kubevirt.io/v1beta1",
        "kind": "DataVolume",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "source": {"http": {"url": "https://images.example.com/disk.img"}},
            "storage": {"resources": {"requests": {"storage": "1Gi"}}},
            **spec,
        },
    }


@contextlib.asynccontextmanager
async def open_client(config: ClientConfig, **kwargs: Any) -> AsyncIterator[Client]:
    """A Client that, before closing, lets the loop finish the TLS shutdown of connections a
    watch left mid-stream (asyncio closes those in the background; a loop that ends first
    leaves an unclosed socket, a ResourceWarning, an error under `filterwarnings = error`)."""
    async with Client(config, **kwargs) as client:
        try:
            yield client
        finally:
            if client in _WATCHED:
                await asyncio.sleep(0.2)


_WATCHED: weakref.WeakSet[Client] = weakref.WeakSet()


@pytest.fixture
async def client(cdi_server: CdiServer) -> AsyncIterator[Client]:
    async with open_client(cdi_server.client_config(), backoff=(0.1, 0.2, 0.5)) as c:
        yield c


async def store_rv(client: Client) -> int:
    """The store's current resourceVersion (a list's): it moves with every write."""
    page = await client.request("GET", "/api/v1/namespaces", params={"limit": "1"})
    return int(page["metadata"]["resourceVersion"])


async def watch_events(
    client: Client,
    res: Resource,
    namespace: str | None,
    since: str,
    count: int,
    *,
    until: Callable[[WatchEvent], bool] | None = None,
    within: float = WATCH_TIMEOUT,
) -> list[WatchEvent]:
    """The first `count` non-bookmark events after `since` (or up to and including the first
    for which `until` is true), within `within` seconds."""
    events: list[WatchEvent] = []
    _WATCHED.add(client)

    async def run() -> None:
        stream = cast(
            AsyncGenerator[WatchEvent, None],
            client.watch(res, namespace, resource_version=since, timeout_seconds=30),
        )
        async with contextlib.aclosing(stream):
            async for event in stream:
                if event.type == "BOOKMARK":
                    continue
                events.append(event)
                if (until is not None and until(event)) or (until is None and len(events) >= count):
                    return

    try:
        await asyncio.wait_for(run(), within)
    except TimeoutError:
        raise AssertionError(f"watch from {since}: only {len(events)} events: {events}") from None
    return events


def summary(events: list[WatchEvent]) -> list[tuple[str, str]]:
    return [(e.type, e.object["metadata"]["name"]) for e in events]


def rv_of(obj: dict[str, Any]) -> int:
    return int(obj["metadata"]["resourceVersion"])


# --- create, list, update -------------------------------------------------------------------


async def test_create_with_generate_name(client: Client, namespace: str) -> None:
    body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"generateName": "job-"}}
    first = await client.create(CONFIG_MAP, body, namespace)
    second = await client.create(CONFIG_MAP, body, namespace)
    for obj in (first, second):
        md = obj["metadata"]
        assert re.fullmatch(r"job-[a-z0-9]{5}", md["name"]), md
        assert md["generateName"] == "job-"
        assert md["namespace"] == namespace
        assert UUID.match(md["uid"])
        assert TIMESTAMP.match(md["creationTimestamp"])
        assert md["resourceVersion"].isdigit()
    assert first["metadata"]["name"] != second["metadata"]["name"]
    assert first["metadata"]["uid"] != second["metadata"]["uid"]
    assert rv_of(second) > rv_of(first)
    fetched = await client.get(CONFIG_MAP, first["metadata"]["name"], namespace)
    assert fetched == first

    made = await client.create(
        DATA_VOLUME,
        {**dv("x", namespace), "metadata": {"generateName": "import-"}},
        namespace,
    )
    assert re.fullmatch(r"import-[a-z0-9]{5}", made["metadata"]["name"])
    assert made["metadata"]["generation"] == 1

    # an explicit name wins over generateName
    named = await client.create(
        CONFIG_MAP, {**cm("explicit", namespace), "metadata": {"name": "explicit",
                                                               "generateName": "job-"}},
        namespace,
    )  # fmt: skip
    assert named["metadata"]["name"] == "explicit"


async def test_list_with_limit_and_continue(client: Client, namespace: str) -> None:
    for i in range(7):
        await client.create(CONFIG_MAP, cm(f"page-{i}", namespace), namespace)
    path = f"/api/v1/namespaces/{namespace}/configmaps"

    first = await client.request("GET", path, params={"limit": "3"})
    assert [o["metadata"]["name"] for o in first["items"]] == ["page-0", "page-1", "page-2"]
    token = first["metadata"]["continue"]
    list_rv = first["metadata"]["resourceVersion"]

    # writes between pages do not show: every page is served at the first page's rv
    await client.delete(CONFIG_MAP, "page-5", namespace)
    await client.create(CONFIG_MAP, cm("page-9", namespace), namespace)
    await client.patch(CONFIG_MAP, "page-4", {"data": {"late": "yes"}}, namespace)

    second = await client.request("GET", path, params={"limit": "3", "continue": token})
    assert [o["metadata"]["name"] for o in second["items"]] == ["page-3", "page-4", "page-5"]
    assert second["metadata"]["resourceVersion"] == list_rv
    assert second["items"][1].get("data") == {}
    third = await client.request(
        "GET", path, params={"limit": "3", "continue": second["metadata"]["continue"]}
    )
    assert [o["metadata"]["name"] for o in third["items"]] == ["page-6"]
    assert not third["metadata"].get("continue")

    # the client's list() walks every page; now it sees the writes
    items, rv = await client.list(CONFIG_MAP, namespace, page_size=2)
    assert [o["metadata"]["name"] for o in items] == [
        "page-0", "page-1", "page-2", "page-3", "page-4", "page-6", "page-9",
    ]  # fmt: skip
    assert int(rv) > int(list_rv)

    # a garbled continue token is a 400
    with pytest.raises(cdi.kube.ApiError) as err:
        await client.request("GET", path, params={"limit": "3", "continue": "garbage"})
    assert err.value.code == 400


async def test_update_with_a_stale_resource_version_conflicts(
    client: Client, namespace: str
) -> None:
    created = await client.create(CONFIG_MAP, cm("race", namespace, v="0"), namespace)
    mine = json.loads(json.dumps(created))
    theirs = json.loads(json.dumps(created))
    theirs["data"] = {"v": "theirs"}
    won = await client.replace(CONFIG_MAP, theirs)
    assert rv_of(won) > rv_of(created)

    mine["data"] = {"v": "mine"}
    before = await store_rv(client)
    with pytest.raises(cdi.kube.Conflict) as err:
        await client.replace(CONFIG_MAP, mine)
    assert err.value.code == 409
    assert err.value.reason == "Conflict"
    assert str(err.value) == (
        'Operation cannot be fulfilled on configmaps "race": the object has been modified; '
        "please apply your changes to the latest version and try again"
    )
    assert await store_rv(client) == before
    assert (await client.get(CONFIG_MAP, "race", namespace))["data"] == {"v": "theirs"}

    # the same for a custom resource, and for its status subresource
    obj = await client.create(DATA_VOLUME, dv("race-dv", namespace), namespace)
    await client.patch(DATA_VOLUME, "race-dv", {"metadata": {"labels": {"a": "b"}}}, namespace)
    obj["status"] = {"phase": "Succeeded"}
    with pytest.raises(cdi.kube.Conflict) as err:
        await client.replace_status(DATA_VOLUME, obj)
    assert 'datavolumes.cdi.kubevirt.io "race-dv"' in str(err.value)
    assert "status" not in await client.get(DATA_VOLUME, "race-dv", namespace)


async def test_replace_with_another_uid_is_a_precondition_conflict(
    client: Client, namespace: str
) -> None:
    """kube-apiserver takes the uid in a PUT body as a precondition (409), checked before any
    validation; so a controller holding an object that was deleted and made again under the
    same name gets a Conflict and refetches."""
    made = await client.create(DATA_VOLUME, dv("same-name", namespace), namespace)
    stale = json.loads(json.dumps(made))
    stale["metadata"]["uid"] = "00000000-0000-4000-8000-000000000000"
    del stale["metadata"]["resourceVersion"]
    stale["spec"]["storage"]["resources"]["requests"]["storage"] = "9Gi"
    before = await store_rv(client)
    with pytest.raises(cdi.kube.Conflict) as err:
        await client.replace(DATA_VOLUME, stale)
    assert err.value.code == 409
    assert str(err.value) == (
        'Operation cannot be fulfilled on datavolumes.cdi.kubevirt.io "same-name": '
        "Precondition failed: UID in precondition: 00000000-0000-4000-8000-000000000000, "
        f"UID in object meta: {made['metadata']['uid']}"
    )
    assert await store_rv(client) == before


async def test_replace_keeps_system_metadata(client: Client, namespace: str) -> None:
    """creationTimestamp and generation in a PUT are the server's; a missing uid is filled."""
    made = await client.create(DATA_VOLUME, dv("sysmeta", namespace), namespace)
    mine = json.loads(json.dumps(made))
    del mine["metadata"]["uid"]
    mine["metadata"]["creationTimestamp"] = "2000-01-01T00:00:00Z"
    mine["metadata"]["generation"] = 42
    mine["spec"]["storage"]["resources"]["requests"]["storage"] = "2Gi"
    updated = await client.replace(DATA_VOLUME, mine)
    assert updated["metadata"]["uid"] == made["metadata"]["uid"]
    assert updated["metadata"]["creationTimestamp"] == made["metadata"]["creationTimestamp"]
    assert updated["metadata"]["generation"] == 2


async def test_watch_with_a_label_selector_sees_objects_enter_and_leave(
    client: Client, namespace: str
) -> None:
    _, since = await client.list(CONFIG_MAP, namespace)
    await client.create(CONFIG_MAP, {"metadata": {"name": "s", "labels": {"app": "x"}}}, namespace)
    left = await client.patch(CONFIG_MAP, "s", {"metadata": {"labels": {"app": "y"}}}, namespace)
    await client.patch(CONFIG_MAP, "s", {"data": {"k": "1"}}, namespace)  # not selected: unseen
    back = await client.patch(CONFIG_MAP, "s", {"metadata": {"labels": {"app": "x"}}}, namespace)
    await client.create(CONFIG_MAP, {"metadata": {"name": "other"}}, namespace)
    await client.delete(CONFIG_MAP, "s", namespace)
    events: list[WatchEvent] = []

    async def run() -> None:
        stream = cast(
            AsyncGenerator[WatchEvent, None],
            client.watch(CONFIG_MAP, namespace, resource_version=since, label_selector="app=x",
                         timeout_seconds=30),
        )  # fmt: skip
        async with contextlib.aclosing(stream):
            async for event in stream:
                if event.type != "BOOKMARK":
                    events.append(event)
                if len(events) == 4:
                    return

    _WATCHED.add(client)
    await asyncio.wait_for(run(), WATCH_TIMEOUT)
    assert [e.type for e in events] == ["ADDED", "DELETED", "ADDED", "DELETED"]
    # leaving the selection is a DELETED at the write that moved it away
    assert rv_of(events[1].object) == rv_of(left)
    assert rv_of(events[2].object) == rv_of(back)
    assert events[2].object["data"] == {"k": "1"}


async def test_create_twice_is_already_exists(client: Client, namespace: str) -> None:
    first = await client.create(CONFIG_MAP, cm("dup", namespace, v="1"), namespace)
    before = await store_rv(client)
    with pytest.raises(cdi.kube.AlreadyExists) as err:
        await client.create(CONFIG_MAP, cm("dup", namespace, v="2"), namespace)
    assert err.value.code == 409
    assert str(err.value) == 'configmaps "dup" already exists'
    assert await store_rv(client) == before
    assert await client.get(CONFIG_MAP, "dup", namespace) == first


# --- watch ----------------------------------------------------------------------------------


async def test_watch_from_a_resource_version_gets_exactly_what_followed(
    client: Client, namespace: str, cdi_server: CdiServer
) -> None:
    await client.create(CONFIG_MAP, cm("before", namespace), namespace)
    _, since = await client.list(CONFIG_MAP, namespace)

    other = f"{namespace}-other"
    await client.create(NAMESPACE, {"metadata": {"name": other}})
    written: list[tuple[str, str, int | None]] = []
    a = await client.create(CONFIG_MAP, cm("a", namespace), namespace)
    written.append(("ADDED", "a", rv_of(a)))
    await client.create(CONFIG_MAP, cm("elsewhere", other), other)  # another namespace
    b = await client.create(CONFIG_MAP, cm("b", namespace), namespace)
    written.append(("ADDED", "b", rv_of(b)))
    a = await client.patch(CONFIG_MAP, "a", {"data": {"n": "1"}}, namespace)
    written.append(("MODIFIED", "a", rv_of(a)))
    b = await client.patch(CONFIG_MAP, "b", {"data": {"n": "1"}}, namespace)
    written.append(("MODIFIED", "b", rv_of(b)))
    await client.delete(CONFIG_MAP, "a", namespace)
    written.append(("DELETED", "a", None))
    a2 = await client.create(CONFIG_MAP, cm("a", namespace), namespace)  # same name, new uid
    written.append(("ADDED", "a", rv_of(a2)))
    await client.create(DATA_VOLUME, dv("not-a-configmap", namespace), namespace)

    # then live writes while the watch runs; a sentinel marks the end
    async def live() -> None:
        await asyncio.sleep(0.2)
        await client.patch(CONFIG_MAP, "b", {"data": {"n": "2"}}, namespace)
        await client.create(CONFIG_MAP, cm("sentinel", namespace), namespace)

    writer = asyncio.create_task(live())
    events = await watch_events(
        client, CONFIG_MAP, namespace, since, 0,
        until=lambda e: e.object["metadata"]["name"] == "sentinel",
    )  # fmt: skip
    await writer
    assert summary(events) == [
        ("ADDED", "a"), ("ADDED", "b"), ("MODIFIED", "a"), ("MODIFIED", "b"),
        ("DELETED", "a"), ("ADDED", "a"), ("MODIFIED", "b"), ("ADDED", "sentinel"),
    ]  # fmt: skip
    for event, (_, _, rv) in zip(events, written, strict=False):
        if rv is not None:
            assert rv_of(event.object) == rv
    rvs = [rv_of(e.object) for e in events]
    assert rvs == sorted(rvs) and len(set(rvs)) == len(rvs)
    assert int(since) < rvs[0]
    assert events[4].object["metadata"]["uid"] == events[2].object["metadata"]["uid"]
    assert (
        events[5].object["metadata"]["uid"]
        == a2["metadata"]["uid"]
        != events[4].object["metadata"]["uid"]
    )
    assert events[6].object["data"] == {"n": "2"}
    assert all(e.object["kind"] == "ConfigMap" for e in events)

    # from the middle: exactly the suffix
    middle = str(rvs[3])
    tail = await watch_events(client, CONFIG_MAP, namespace, middle, len(events) - 4)
    assert [rv_of(e.object) for e in tail] == rvs[4:]

    # all namespaces: the other namespace's object shows, in rv order
    everywhere = await watch_events(
        client, CONFIG_MAP, None, since, 0,
        until=lambda e: e.object["metadata"]["name"] == "sentinel",
    )  # fmt: skip
    assert ("ADDED", "elsewhere") in summary(everywhere)
    assert len(everywhere) == len(events) + 1


async def test_watch_under_concurrent_writers_loses_and_reorders_nothing(
    client: Client, namespace: str
) -> None:
    writers, updates = 4, 15
    for w in range(writers):
        await client.create(CONFIG_MAP, cm(f"obj-{w}", namespace, n="0"), namespace)
    _, since = await client.list(CONFIG_MAP, namespace)

    async def write(w: int) -> None:
        for n in range(1, updates + 1):
            await client.patch(CONFIG_MAP, f"obj-{w}", {"data": {"n": str(n)}}, namespace)

    async def watcher() -> list[WatchEvent]:
        return await watch_events(client, CONFIG_MAP, namespace, since, writers * updates,
                                  within=15)  # fmt: skip

    watchers = [asyncio.create_task(watcher()) for _ in range(3)]
    await asyncio.gather(*(write(w) for w in range(writers)))
    results = await asyncio.gather(*watchers)
    for events in results:
        assert all(e.type == "MODIFIED" for e in events)
        rvs = [rv_of(e.object) for e in events]
        assert rvs == sorted(rvs) and len(set(rvs)) == len(rvs)
        for w in range(writers):
            seen = [int(e.object["data"]["n"]) for e in events
                    if e.object["metadata"]["name"] == f"obj-{w}"]  # fmt: skip
            assert seen == list(range(1, updates + 1)), (w, seen)
    assert summary(results[0]) == summary(results[1]) == summary(results[2])


async def test_watch_with_a_compacted_resource_version_is_gone(
    fresh_cdi_server: CdiServer,
) -> None:
    """There is no server setting for the event retention (10,000 events); the history is
    compacted offline with `Store.compact()` while the server is down."""
    server = fresh_cdi_server
    async with open_client(server.client_config(), backoff=(0.1, 0.2, 0.5, 1.0)) as client:
        first = await client.create(CONFIG_MAP, cm("old", "default"), "default")
        old_rv = first["metadata"]["resourceVersion"]
        for i in range(5):
            await client.create(CONFIG_MAP, cm(f"later-{i}", "default"), "default")
        page = await client.request(
            "GET", "/api/v1/namespaces/default/configmaps", params={"limit": "2"}
        )
        old_continue = page["metadata"]["continue"]
        for i in range(2):  # the token's rv must fall behind the kept history too
            await client.create(CONFIG_MAP, cm(f"last-{i}", "default"), "default")

        def compact() -> None:
            store = Store(server.data_dir / "api.db", event_retention=1)
            try:
                store.compact()
            finally:
                store.close()

        server.restart(between=compact)

        with pytest.raises(cdi.kube.Gone) as err:
            await watch_events(client, CONFIG_MAP, "default", old_rv, 1)
        assert err.value.code == 410
        assert err.value.reason == "Expired"
        assert "too old resource version" in str(err.value)

        with pytest.raises(cdi.kube.Gone) as err:
            await client.request(
                "GET",
                "/api/v1/namespaces/default/configmaps",
                params={"limit": "2", "continue": old_continue},
            )
        assert err.value.reason == "Expired"

        # starting from now still works
        _, now = await client.list(CONFIG_MAP, "default")
        await client.create(CONFIG_MAP, cm("fresh", "default"), "default")
        events = await watch_events(client, CONFIG_MAP, "default", now, 1)
        assert summary(events) == [("ADDED", "fresh")]


# --- restart --------------------------------------------------------------------------------


async def test_restart_keeps_objects_and_resource_versions_and_watches_resume(
    fresh_cdi_server: CdiServer,
) -> None:
    server = fresh_cdi_server
    async with open_client(server.client_config(), backoff=(0.1, 0.2, 0.5, 1.0)) as client:
        await client.create(NAMESPACE, {"metadata": {"name": "keep"}})
        await client.create(CONFIG_MAP, cm("one", "keep", v="1"), "keep")
        await client.create(CONFIG_MAP, cm("two", "keep", v="2"), "keep")
        made = await client.create(DATA_VOLUME, dv("disk", "keep"), "keep")
        await client.patch(
            DATA_VOLUME, "disk", {"status": {"phase": "Succeeded", "progress": "100.0%"}},
            "keep", subresource="status",
        )  # fmt: skip
        await client.patch(DATA_VOLUME, "disk", {"metadata": {"labels": {"x": "y"}}}, "keep")
        cms_before, since = await client.list(CONFIG_MAP, "keep")
        dvs_before, _ = await client.list(DATA_VOLUME, "keep")
        # written after the watcher's list, before the restart: must be replayed
        pre = await client.patch(CONFIG_MAP, "one", {"data": {"v": "1b"}}, "keep")
        top_before = await store_rv(client)

        server.restart()

        cms_after, _ = await client.list(CONFIG_MAP, "keep")
        dvs_after, _ = await client.list(DATA_VOLUME, "keep")
        assert [o for o in cms_after if o["metadata"]["name"] == "two"] == [
            o for o in cms_before if o["metadata"]["name"] == "two"
        ]
        assert await client.get(CONFIG_MAP, "one", "keep") == pre
        assert dvs_after == dvs_before
        disk = dvs_after[0]
        assert disk["metadata"]["uid"] == made["metadata"]["uid"]
        assert disk["metadata"]["creationTimestamp"] == made["metadata"]["creationTimestamp"]
        assert disk["status"] == {"phase": "Succeeded", "progress": "100.0%"}
        assert await store_rv(client) == top_before

        post = await client.create(CONFIG_MAP, cm("three", "keep"), "keep")
        assert rv_of(post) > top_before
        events = await watch_events(client, CONFIG_MAP, "keep", since, 2)
        assert summary(events) == [("MODIFIED", "one"), ("ADDED", "three")]
        assert [rv_of(e.object) for e in events] == [rv_of(pre), rv_of(post)]


# --- bad input ------------------------------------------------------------------------------

DEFAULT_TOKEN = object()


@dataclass
class Reply:
    status: int
    body: Any
    headers: dict[str, str]


async def raw(
    config: ClientConfig,
    method: str,
    path: str,
    data: str | bytes | None = None,
    *,
    content_type: str = "application/json",
    token: Any = DEFAULT_TOKEN,
) -> Reply:
    headers = {"Accept": "application/json"}
    if data is not None:
        headers["Content-Type"] = content_type
    bearer = config.token if token is DEFAULT_TOKEN else token
    if bearer:
        headers["Authorization"] = f"Bearer {bearer}"
    timeout = aiohttp.ClientTimeout(total=15)
    connector = aiohttp.TCPConnector(ssl=config.ssl_context())
    async with (
        aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
        session.request(method, config.server + path, data=data, headers=headers) as resp,
    ):
        text = await resp.text()
        try:
            body: Any = json.loads(text)
        except ValueError:
            body = text
        return Reply(resp.status, body, dict(resp.headers))


def assert_status(reply: Reply, code: int, reason: str) -> str:
    assert reply.status == code, reply
    body = reply.body
    assert isinstance(body, dict), reply
    assert body["kind"] == "Status" and body["apiVersion"] == "v1", body
    assert body["status"] == "Failure"
    assert body["code"] == code
    assert body["reason"] == reason, body
    assert body["message"], body
    return str(body["message"])


CM_PATH = "/api/v1/namespaces/{ns}/configmaps"
DV_PATH = "/apis/cdi.kubevirt.io/v1beta1/namespaces/{ns}/datavolumes"


def _dump(obj: Any) -> str:
    return json.dumps(obj)


@dataclass
class BadCase:
    id: str
    path: str
    body: Callable[[str], str]
    code: int
    reason: str
    message: Callable[[str], str] | None = None  # exact message, from the namespace
    contains: str = ""
    content_type: str = "application/json"
    stored: tuple[Resource, str] = (CONFIG_MAP, "x")


BAD_CASES = [
    BadCase(
        "malformed-json", CM_PATH, lambda ns: '{"apiVersion": "v1", "kind": "ConfigMap", '
        '"metadata": {"name": "x"', 400, "BadRequest", contains="JSON",
    ),
    BadCase(
        "malformed-yaml", CM_PATH,
        lambda ns: "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x\n",
        400, "BadRequest", contains="YAML", content_type="application/yaml",
    ),
    BadCase("not-an-object", CM_PATH, lambda ns: "[1, 2]", 400, "BadRequest"),
    BadCase(
        "wrong-api-version", CM_PATH,
        lambda ns: _dump({**cm("x", ns), "apiVersion": "apps/v1"}), 400, "BadRequest",
        message=lambda ns: "the API version in the data (apps/v1) does not match the expected "
        "API version (v1)",
    ),
    BadCase(
        "wrong-kind", CM_PATH, lambda ns: _dump({**cm("x", ns), "kind": "Secret"}),
        400, "BadRequest",
        message=lambda ns: "the kind in the data (Secret) does not match the expected kind "
        "(ConfigMap)",
    ),
    BadCase(
        "dv-core-api-version", DV_PATH, lambda ns: _dump({**dv("x", ns), "apiVersion": "v1"}),
        400, "BadRequest", stored=(DATA_VOLUME, "x"),
    ),
    BadCase(
        "dv-unserved-api-version", DV_PATH,
        lambda ns: _dump({**dv("x", ns), "apiVersion": "cdi.kubevirt.io/v9"}),
        400, "BadRequest", stored=(DATA_VOLUME, "x"),
    ),
    BadCase(
        "dv-wrong-kind", DV_PATH, lambda ns: _dump({**dv("x", ns), "kind": "DataSource"}),
        400, "BadRequest", stored=(DATA_VOLUME, "x"),
    ),
    BadCase(
        "namespace-mismatch", CM_PATH, lambda ns: _dump(cm("x", "default")), 400, "BadRequest",
        message=lambda ns: "the namespace of the provided object does not match the namespace "
        "sent on the request",
    ),
    BadCase(
        "invalid-name", CM_PATH, lambda ns: _dump(cm("Bad_Name", ns)), 422, "Invalid",
        message=lambda ns: 'ConfigMap "Bad_Name" is invalid: metadata.name: Invalid value: '
        f'"Bad_Name": {DNS1123_SUBDOMAIN_MESSAGE}',
        stored=(CONFIG_MAP, "Bad_Name"),
    ),
    BadCase(
        "invalid-dv-name", DV_PATH, lambda ns: _dump(dv("disk_1", ns)), 422, "Invalid",
        message=lambda ns: 'DataVolume.cdi.kubevirt.io "disk_1" is invalid: metadata.name: '
        f'Invalid value: "disk_1": {DNS1123_SUBDOMAIN_MESSAGE}',
        stored=(DATA_VOLUME, "disk_1"),
    ),
    BadCase(
        "name-too-long", CM_PATH, lambda ns: _dump(cm("a" * 254, ns)), 422, "Invalid",
        contains="must be no more than 253 characters", stored=(CONFIG_MAP, "a" * 254),
    ),
    BadCase(
        "no-name", CM_PATH,
        lambda ns: _dump({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}}),
        422, "Invalid",
        message=lambda ns: 'ConfigMap "" is invalid: metadata.name: Required value: name or '
        "generateName is required",
    ),
    BadCase(
        "unknown-field-strict", DV_PATH + "?fieldValidation=Strict",
        lambda ns: _dump(dv("x", ns, bogus=1)), 400, "BadRequest",
        message=lambda ns: 'strict decoding error: unknown field "spec.bogus"',
        stored=(DATA_VOLUME, "x"),
    ),
    BadCase(
        "schema-type", DV_PATH,
        lambda ns: _dump(dv("x", ns, source={"http": {"url": 5}})), 422, "Invalid",
        message=lambda ns: 'DataVolume.cdi.kubevirt.io "x" is invalid: spec.source.http.url: '
        'Invalid value: "integer": spec.source.http.url in body must be of type string: '
        '"integer"',
        stored=(DATA_VOLUME, "x"),
    ),
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_CASES, ids=[c.id for c in BAD_CASES])
async def test_bad_input_is_rejected_and_nothing_is_stored(
    client: Client, cdi_server: CdiServer, namespace: str, case: BadCase
) -> None:
    before = await store_rv(client)
    reply = await raw(
        cdi_server.client_config(),
        "POST",
        case.path.format(ns=namespace),
        case.body(namespace),
        content_type=case.content_type,
    )
    message = assert_status(reply, case.code, case.reason)
    if case.message is not None:
        assert message == case.message(namespace)
    assert case.contains in message
    if case.code == 422:
        details = reply.body["details"]
        assert details["kind"] == ("ConfigMap" if case.stored[0] is CONFIG_MAP else "DataVolume")
        assert details["causes"] and all("field" in c for c in details["causes"])
    assert await store_rv(client) == before, "a rejected request wrote something"
    resource, name = case.stored
    with pytest.raises(cdi.kube.NotFound):
        await client.get(resource, name, namespace)


async def test_bad_namespace_name_is_invalid(client: Client) -> None:
    before = await store_rv(client)
    with pytest.raises(cdi.kube.Invalid) as err:
        await client.create(NAMESPACE, {"metadata": {"name": "team.a"}})
    assert err.value.code == 422
    assert str(err.value) == (
        f'Namespace "team.a" is invalid: metadata.name: Invalid value: "team.a": '
        f"{DNS1123_LABEL_MESSAGE}"
    )
    assert await store_rv(client) == before


async def test_unknown_field_without_strict_is_pruned_with_a_warning(
    client: Client, cdi_server: CdiServer, namespace: str
) -> None:
    reply = await raw(
        cdi_server.client_config(),
        "POST",
        DV_PATH.format(ns=namespace) + "?fieldValidation=Warn",
        _dump(dv("lenient", namespace, bogus=1)),
    )
    assert reply.status == 201, reply
    assert "bogus" not in reply.body["spec"]
    assert reply.headers.get("Warning") == '299 - "unknown field \\"spec.bogus\\""'
    stored = await client.get(DATA_VOLUME, "lenient", namespace)
    assert "bogus" not in stored["spec"]


async def test_the_client_maps_errors_to_exceptions(client: Client, namespace: str) -> None:
    with pytest.raises(cdi.kube.Invalid):
        await client.create(CONFIG_MAP, cm("Bad_Name", namespace), namespace)
    with pytest.raises(cdi.kube.NotFound) as err:
        await client.get(DATA_VOLUME, "missing", namespace)
    assert str(err.value) == 'datavolumes.cdi.kubevirt.io "missing" not found'
    with pytest.raises(cdi.kube.NotFound):
        await client.create(CONFIG_MAP, cm("x", "no-such-namespace"), "no-such-namespace")


# --- authentication and authorization -------------------------------------------------------


@pytest.mark.parametrize("token", [None, "", "not-a-token", USERS["alice"][0] + "x"])
async def test_unauthenticated_requests_are_401(
    client: Client, cdi_server: CdiServer, namespace: str, token: str | None
) -> None:
    config = cdi_server.client_config()
    before = await store_rv(client)
    reply = await raw(
        config, "POST", CM_PATH.format(ns=namespace), _dump(cm("sneaky", namespace)), token=token
    )
    assert_status(reply, 401, "Unauthorized")
    for path in (CM_PATH.format(ns=namespace), "/api", "/apis"):
        assert_status(await raw(config, "GET", path, token=token), 401, "Unauthorized")
    assert await store_rv(client) == before
    with pytest.raises(cdi.kube.NotFound):
        await client.get(CONFIG_MAP, "sneaky", namespace)

    # the same through our client, with a kubeconfig carrying a bad token
    bad = ClientConfig(server=config.server, token="not-a-token", ca_data=config.ca_data)
    async with Client(bad, backoff=()) as stranger:
        with pytest.raises(cdi.kube.Unauthorized) as err:
            await stranger.create(CONFIG_MAP, cm("sneaky", namespace), namespace)
        assert err.value.code == 401


async def test_forbidden_requests_are_403_and_store_nothing(
    client: Client, cdi_server: CdiServer, namespace: str
) -> None:
    await client.create(
        ROLE,
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "cm-reader", "namespace": namespace},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}],
        },
        namespace,
    )
    await client.create(
        ROLE_BINDING,
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "alice", "namespace": namespace},
            "subjects": [{"kind": "User", "name": "alice", "apiGroup": RBAC_GROUP}],
            "roleRef": {"kind": "Role", "name": "cm-reader", "apiGroup": RBAC_GROUP},
        },
        namespace,
    )
    await client.create(CONFIG_MAP, cm("shared", namespace, k="v"), namespace)
    before = await store_rv(client)
    async with open_client(cdi_server.client_config("alice"), backoff=()) as alice:
        assert (await alice.get(CONFIG_MAP, "shared", namespace))["data"] == {"k": "v"}
        items, _ = await alice.list(CONFIG_MAP, namespace)
        assert [o["metadata"]["name"] for o in items] == ["shared"]

        with pytest.raises(cdi.kube.Forbidden) as err:
            await alice.create(CONFIG_MAP, cm("mine", namespace), namespace)
        assert err.value.code == 403
        assert str(err.value) == (
            'configmaps is forbidden: User "alice" cannot create resource "configmaps" in API '
            f'group "" in the namespace "{namespace}"'
        )
        with pytest.raises(cdi.kube.Forbidden):
            await alice.patch(CONFIG_MAP, "shared", {"data": {"k": "changed"}}, namespace)
        with pytest.raises(cdi.kube.Forbidden):
            await alice.delete(CONFIG_MAP, "shared", namespace)
        with pytest.raises(cdi.kube.Forbidden) as err:
            await alice.list(CONFIG_MAP, "default")
        assert 'in the namespace "default"' in str(err.value)
        with pytest.raises(cdi.kube.Forbidden):
            await alice.create(DATA_VOLUME, dv("mine", namespace), namespace)
        with pytest.raises(cdi.kube.Forbidden):
            await watch_events(alice, CONFIG_MAP, namespace, "0", 1)
    assert await store_rv(client) == before
    assert (await client.get(CONFIG_MAP, "shared", namespace))["data"] == {"k": "v"}
    for res, name in ((CONFIG_MAP, "mine"), (DATA_VOLUME, "mine")):
        with pytest.raises(cdi.kube.NotFound):
            await client.get(res, name, namespace)


def test_kubeconfig_written_by_the_server_loads(cdi_server: CdiServer) -> None:
    config = load_kubeconfig(cdi_server.kubeconfig)
    assert config.server == cdi_server.url
    assert config.server.startswith("https://127.0.0.1:")
    assert config.ca_data and b"BEGIN CERTIFICATE" in config.ca_data
    assert config.token == (cdi_server.data_dir / "admin-token").read_text().strip()
    assert config.namespace == "default"
    assert oct(Path(cdi_server.kubeconfig).stat().st_mode & 0o777) == "0o600"


async def test_sigterm_stops_the_server_promptly_after_watches_ended(
    fresh_cdi_server: CdiServer,
) -> None:
    """A watch the client has closed must not hold the server up at shutdown (nor linger)."""
    server = fresh_cdi_server
    async with open_client(server.client_config(), backoff=()) as client:
        _, since = await client.list(CONFIG_MAP, "default")
        await client.create(CONFIG_MAP, cm("w", "default"), "default")
        events = await watch_events(client, CONFIG_MAP, "default", since, 1)
        assert summary(events) == [("ADDED", "w")]
    took = server.stop(timeout=8)  # raises (and kills) when SIGTERM is not enough in time
    assert took < 5, f"cdi server took {took:.1f}s to stop after a watch ended"
