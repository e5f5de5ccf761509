"""The SQLite object store: identity, concurrency, status split, finalizers, lists, watches.

Every test runs against a real SQLite file in tmp_path; concurrency tests use real threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from cdi.kubeapi import store as store_module
from cdi.kubeapi.errors import (
    AlreadyExists,
    BadRequest,
    Conflict,
    Gone,
    Invalid,
    NotFound,
    resource_key,
)
from cdi.kubeapi.store import Store, WatchEvent

CM = "configmaps"
DV = resource_key("cdi.kubevirt.io", "datavolumes")
PVC = "persistentvolumeclaims"
NS = "default"

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock) -> Iterator[Store]:
    with Store(tmp_path / "api.db", clock=clock) as s:
        yield s


def configmap(name: str, namespace: str = NS, **data: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace},
        "data": dict(data),
    }


def datavolume(name: str, **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "cdi.kubevirt.io/v1beta1",
        "kind": "DataVolume",
        "metadata": {"name": name, "namespace": NS, "labels": dict(labels)},
        "spec": {
            "source": {"blank": {}},
            "storage": {"resources": {"requests": {"storage": "1Gi"}}},
        },
        "status": {"phase": "Pending"},
    }


def names(items: list[dict[str, Any]]) -> list[str]:
    return [i["metadata"]["name"] for i in items]


# --- create / get ------------------------------------------------------------------------------


def test_create_sets_system_metadata(store: Store) -> None:
    sent = datavolume("dv1")
    sent["metadata"]["uid"] = "client-chosen"
    sent["metadata"]["deletionTimestamp"] = "2020-01-01T00:00:00Z"
    created = store.create(DV, sent)
    md = created["metadata"]
    assert re.fullmatch(r"[0-9a-f-]{36}", md["uid"]) and md["uid"] != "client-chosen"
    assert md["creationTimestamp"] == "2024-05-01T12:00:00Z"
    assert md["generation"] == 1
    assert md["resourceVersion"] == "1"
    assert "deletionTimestamp" not in md
    assert "status" not in created  # status is written through the subresource only
    assert sent["metadata"]["uid"] == "client-chosen"  # the caller's dict is untouched
    assert store.get(DV, NS, "dv1") == created


def test_create_keeps_status_without_a_status_subresource(store: Store) -> None:
    created = store.create(DV, datavolume("dv1"), status_subresource=False)
    assert created["status"] == {"phase": "Pending"}


def test_create_existing_name_is_already_exists(store: Store) -> None:
    store.create(DV, datavolume("dv1"))
    with pytest.raises(AlreadyExists) as info:
        store.create(DV, datavolume("dv1"))
    status = info.value.to_status()
    assert status == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'datavolumes.cdi.kubevirt.io "dv1" already exists',
        "reason": "AlreadyExists",
        "details": {"name": "dv1", "group": "cdi.kubevirt.io", "kind": "datavolumes"},
        "code": 409,
    }
    # The same name in another namespace or resource is another object.
    store.create(DV, {**datavolume("dv1"), "metadata": {"name": "dv1", "namespace": "other"}})
    store.create(CM, configmap("dv1"))


def test_get_missing_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound) as info:
        store.get(PVC, NS, "x")
    assert info.value.message == 'persistentvolumeclaims "x" not found'
    assert info.value.to_status()["details"] == {"name": "x", "kind": "persistentvolumeclaims"}
    assert info.value.code == 404


def test_generate_name(store: Store) -> None:
    a = store.create(CM, {"metadata": {"generateName": "importer-", "namespace": NS}})
    b = store.create(CM, {"metadata": {"generateName": "importer-", "namespace": NS}})
    for obj in (a, b):
        assert re.fullmatch(r"importer-[bcdfghjklmnpqrstvwxz2456789]{5}", obj["metadata"]["name"])
    assert a["metadata"]["name"] != b["metadata"]["name"]
    long = store.create(CM, {"metadata": {"generateName": "x" * 80, "namespace": NS}})
    assert len(long["metadata"]["name"]) == 63


def test_generate_name_retries_on_clash(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    store.create(CM, configmap("gen-aaaaa"))
    picks = iter(["gen-aaaaa", "gen-aaaaa", "gen-bbbbb"])
    monkeypatch.setattr(store_module, "_generate_name", lambda prefix: next(picks))
    created = store.create(CM, {"metadata": {"generateName": "gen-", "namespace": NS}})
    assert created["metadata"]["name"] == "gen-bbbbb"

    monkeypatch.setattr(store_module, "_generate_name", lambda prefix: "gen-aaaaa")
    with pytest.raises(AlreadyExists, match="not able to generate a unique name"):
        store.create(CM, {"metadata": {"generateName": "gen-", "namespace": NS}})


def test_create_without_a_name_is_invalid(store: Store) -> None:
    with pytest.raises(Invalid) as info:
        store.create(DV, {"kind": "DataVolume", "metadata": {"namespace": NS}})
    assert info.value.code == 422
    assert info.value.message == (
        'DataVolume.cdi.kubevirt.io "" is invalid: metadata.name: Required value: '
        "name or generateName is required"
    )
    assert info.value.causes[0]["field"] == "metadata.name"


def test_resource_versions_are_global_and_increasing(store: Store) -> None:
    rvs = [
        int(store.create(CM, configmap("a"))["metadata"]["resourceVersion"]),
        int(store.create(DV, datavolume("a"))["metadata"]["resourceVersion"]),
        int(store.create(CM, configmap("b", "other"))["metadata"]["resourceVersion"]),
    ]
    assert rvs == [1, 2, 3]
    assert store.resource_version == "3"
    assert store.list(CM).resource_version == "3"


# --- update: concurrency, status, generation ---------------------------------------------------


def test_stale_resource_version_is_conflict(store: Store) -> None:
    first = store.create(CM, configmap("c", a="1"))
    first["data"]["a"] = "2"
    second = store.update(CM, first)
    assert second["metadata"]["resourceVersion"] == "2"
    first["data"]["a"] = "3"  # still carries resourceVersion 1
    with pytest.raises(Conflict) as info:
        store.update(CM, first)
    assert info.value.message == (
        'Operation cannot be fulfilled on configmaps "c": the object has been modified; '
        "please apply your changes to the latest version and try again"
    )
    assert info.value.code == 409 and info.value.reason == "Conflict"
    with pytest.raises(Conflict):
        store.update(CM, second, expect_rv="1")
    assert store.get(CM, NS, "c")["data"] == {"a": "2"}


def test_update_without_resource_version_is_unconditional(store: Store) -> None:
    store.create(CM, configmap("c", a="1"))
    updated = store.update(CM, configmap("c", a="9"))
    assert updated["data"] == {"a": "9"}


def test_update_of_missing_object_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound):
        store.update(CM, configmap("ghost"))


def test_main_resource_update_keeps_status_and_bumps_generation(store: Store) -> None:
    store.create(DV, datavolume("dv"))
    with_status = store.get(DV, NS, "dv")
    with_status["status"] = {"phase": "ImportInProgress", "progress": "10.0%"}
    after_status = store.update(DV, with_status, subresource="status")
    assert after_status["status"]["phase"] == "ImportInProgress"
    assert after_status["metadata"]["generation"] == 1  # status writes never bump it

    # A spec change through the main resource: status sent is ignored, generation bumps.
    obj = store.get(DV, NS, "dv")
    obj["spec"]["source"] = {"http": {"url": "http://x/disk.img"}}
    obj["status"] = {"phase": "Succeeded"}
    after_spec = store.update(DV, obj)
    assert after_spec["status"] == {"phase": "ImportInProgress", "progress": "10.0%"}
    assert after_spec["metadata"]["generation"] == 2

    # Metadata-only change: no generation bump.
    obj = store.get(DV, NS, "dv")
    obj["metadata"]["labels"] = {"team": "a"}
    assert store.update(DV, obj)["metadata"]["generation"] == 2


def test_status_update_keeps_everything_but_status(store: Store) -> None:
    store.create(DV, datavolume("dv", app="x"))
    obj = store.get(DV, NS, "dv")
    obj["spec"] = {"source": {"blank": {}}, "changed": True}
    obj["metadata"]["labels"] = {"app": "changed"}
    obj["status"] = {"phase": "Succeeded"}
    result = store.update(DV, obj, subresource="status")
    assert result["spec"] == datavolume("dv")["spec"]
    assert result["metadata"]["labels"] == {"app": "x"}
    assert result["status"] == {"phase": "Succeeded"}
    # A status write without status removes it, as the real server's status strategy does.
    del obj["status"]
    obj["metadata"]["resourceVersion"] = result["metadata"]["resourceVersion"]
    assert "status" not in store.update(DV, obj, subresource="status")


def test_status_is_spec_without_a_status_subresource(store: Store) -> None:
    store.create(CM, {**configmap("c"), "status": {"x": 1}}, status_subresource=False)
    obj = store.get(CM, NS, "c")
    obj["status"] = {"x": 2}
    result = store.update(CM, obj, status_subresource=False)
    assert result["status"] == {"x": 2}
    assert result["metadata"]["generation"] == 2


def test_system_metadata_cannot_be_changed_by_update(store: Store, clock: FakeClock) -> None:
    created = store.create(CM, configmap("c"))
    obj = store.get(CM, NS, "c")
    obj["metadata"]["creationTimestamp"] = "1999-01-01T00:00:00Z"
    obj["metadata"]["generation"] = 42
    obj["metadata"]["deletionTimestamp"] = "1999-01-01T00:00:00Z"
    del obj["metadata"]["uid"]  # a missing uid means "the same object"
    obj["data"] = {"a": "1"}
    result = store.update(CM, obj)
    assert result["metadata"]["creationTimestamp"] == created["metadata"]["creationTimestamp"]
    assert result["metadata"]["uid"] == created["metadata"]["uid"]
    assert result["metadata"]["generation"] == 2
    assert "deletionTimestamp" not in result["metadata"]

    obj = store.get(CM, NS, "c")
    obj["metadata"]["uid"] = "another"
    with pytest.raises(Invalid) as info:
        store.update(CM, obj)
    assert info.value.message == (
        'ConfigMap "c" is invalid: metadata.uid: Invalid value: "another": field is immutable'
    )


def test_noop_update_writes_nothing(store: Store) -> None:
    created = store.create(CM, configmap("c", a="1"))
    again = store.update(CM, created)
    assert again == created
    assert store.resource_version == "1"
    assert store.events_since(0) and len(store.events_since(0)) == 1


def test_modify_is_atomic_read_modify_write(store: Store) -> None:
    store.create(CM, configmap("c", n="0"))

    def bump(obj: dict[str, Any]) -> dict[str, Any]:
        obj["data"]["n"] = str(int(obj["data"]["n"]) + 1)
        return obj

    threads = [
        threading.Thread(target=lambda: [store.modify(CM, NS, "c", bump) for _ in range(25)])
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = store.get(CM, NS, "c")
    assert final["data"]["n"] == "200"
    assert final["metadata"]["resourceVersion"] == "201"


def test_modify_checks_a_resource_version_set_by_the_patch(store: Store) -> None:
    store.create(CM, configmap("c"))
    store.update(CM, configmap("c", a="1"))

    def stale(obj: dict[str, Any]) -> dict[str, Any]:
        obj["metadata"]["resourceVersion"] = "1"
        obj["data"] = {"a": "2"}
        return obj

    with pytest.raises(Conflict):
        store.modify(CM, NS, "c", stale)
    with pytest.raises(NotFound):
        store.modify(CM, NS, "nope", lambda o: o)
    with pytest.raises(BadRequest):
        store.modify(CM, NS, "c", lambda o: {**o, "metadata": {**o["metadata"], "name": "d"}})


def test_modify_status_subresource(store: Store) -> None:
    store.create(DV, datavolume("dv"))

    def set_phase(obj: dict[str, Any]) -> dict[str, Any]:
        obj["status"] = {"phase": "Succeeded"}
        obj["spec"] = {}
        return obj

    result = store.modify(DV, NS, "dv", set_phase, subresource="status")
    assert result["status"] == {"phase": "Succeeded"}
    assert result["spec"] == datavolume("dv")["spec"]


def test_threads_with_retry_lose_no_update(store: Store) -> None:
    """The classic controller loop: get, change, update, on Conflict start again."""
    store.create(CM, configmap("counter", n="0"))
    conflicts = 0
    lock = threading.Lock()

    def worker() -> None:
        nonlocal conflicts
        for _ in range(20):
            while True:
                obj = store.get(CM, NS, "counter")
                obj["data"]["n"] = str(int(obj["data"]["n"]) + 1)
                try:
                    store.update(CM, obj)
                    break
                except Conflict:
                    with lock:
                        conflicts += 1

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.get(CM, NS, "counter")["data"]["n"] == "160"


def test_exactly_one_of_two_conflicting_updates_wins(store: Store) -> None:
    base = store.create(CM, configmap("c", who="nobody"))
    barrier = threading.Barrier(2)
    outcomes: dict[str, str] = {}

    def writer(who: str) -> None:
        obj = {**base, "data": {"who": who}}
        barrier.wait()
        try:
            store.update(CM, obj)
            outcomes[who] = "won"
        except Conflict:
            outcomes[who] = "conflict"

    threads = [threading.Thread(target=writer, args=(w,)) for w in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes.values()) == ["conflict", "won"]
    winner = next(w for w, o in outcomes.items() if o == "won")
    assert store.get(CM, NS, "c")["data"] == {"who": winner}


async def test_concurrent_tasks_through_threads(store: Store) -> None:
    """What the HTTP layer does: many coroutines calling the store via asyncio.to_thread."""
    await asyncio.gather(
        *(asyncio.to_thread(store.create, CM, configmap(f"cm-{i:03d}")) for i in range(50))
    )
    result = await asyncio.to_thread(store.list, CM, NS)
    assert len(result.items) == 50
    assert result.resource_version == "50"
    rvs = sorted(int(i["metadata"]["resourceVersion"]) for i in result.items)
    assert rvs == list(range(1, 51))


# --- delete and finalizers -------------------------------------------------------------------


def test_delete_without_finalizers_removes(store: Store) -> None:
    store.create(CM, configmap("c"))
    result = store.delete(CM, NS, "c")
    assert result.deleted
    assert result.object["metadata"]["resourceVersion"] == "2"
    with pytest.raises(NotFound):
        store.get(CM, NS, "c")
    with pytest.raises(NotFound):
        store.delete(CM, NS, "c")
    assert [e.type for e in store.events_since(0)] == ["ADDED", "DELETED"]


def test_finalizer_flow(store: Store, clock: FakeClock) -> None:
    dv = datavolume("dv")
    dv["metadata"]["finalizers"] = ["cdi.kubevirt.io/dataVolumeFinalizer"]
    store.create(DV, dv)

    clock.now = T0 + timedelta(minutes=5)
    marked = store.delete(DV, NS, "dv")
    assert not marked.deleted
    md = marked.object["metadata"]
    assert md["deletionTimestamp"] == "2024-05-01T12:05:00Z"
    assert md["deletionGracePeriodSeconds"] == 0
    assert md["generation"] == 2  # the first deletion request bumps it
    assert store.get(DV, NS, "dv")["metadata"]["deletionTimestamp"] == md["deletionTimestamp"]

    # Deleting again changes nothing and writes nothing.
    rv = store.resource_version
    assert not store.delete(DV, NS, "dv").deleted
    assert store.resource_version == rv

    # No new finalizers once deletion started.
    obj = store.get(DV, NS, "dv")
    obj["metadata"]["finalizers"].append("example.com/late")
    with pytest.raises(Invalid, match="no new finalizers can be added"):
        store.update(DV, obj)

    # An update cannot clear the deletion timestamp either.
    obj = store.get(DV, NS, "dv")
    del obj["metadata"]["deletionTimestamp"]
    obj["metadata"]["labels"] = {"touched": "yes"}
    touched = store.update(DV, obj)
    assert touched["metadata"]["deletionTimestamp"] == md["deletionTimestamp"]

    # Removing the last finalizer deletes the object.
    touched["metadata"]["finalizers"] = []
    store.update(DV, touched)
    with pytest.raises(NotFound):
        store.get(DV, NS, "dv")
    types = [e.type for e in store.events_since(0)]
    assert types == ["ADDED", "MODIFIED", "MODIFIED", "DELETED"]


def test_delete_adding_finalizers_for_foreground_cascade(store: Store) -> None:
    store.create(CM, configmap("owner"))
    result = store.delete(CM, NS, "owner", add_finalizers=["foregroundDeletion"])
    assert not result.deleted
    assert result.object["metadata"]["finalizers"] == ["foregroundDeletion"]
    assert "deletionTimestamp" in result.object["metadata"]


def test_delete_preconditions(store: Store) -> None:
    created = store.create(CM, configmap("c"))
    with pytest.raises(Conflict, match="Precondition failed: UID in precondition: wrong"):
        store.delete(CM, NS, "c", precondition_uid="wrong")
    with pytest.raises(Conflict, match="ResourceVersion in precondition: 7"):
        store.delete(CM, NS, "c", precondition_rv="7")
    assert store.delete(
        CM, NS, "c", precondition_uid=created["metadata"]["uid"], precondition_rv="1"
    ).deleted


def test_graceful_pod_deletion(store: Store, clock: FakeClock) -> None:
    store.create("pods", {"metadata": {"name": "p", "namespace": NS}, "spec": {}})
    marked = store.delete("pods", NS, "p", grace_period_seconds=30)
    assert not marked.deleted
    assert marked.object["metadata"]["deletionTimestamp"] == "2024-05-01T12:00:30Z"
    assert marked.object["metadata"]["deletionGracePeriodSeconds"] == 30
    # The agent, once the process is gone, deletes it for good.
    assert store.delete("pods", NS, "p", grace_period_seconds=0).deleted


# --- list and pagination ---------------------------------------------------------------------


def test_list_sorting_and_scoping(store: Store) -> None:
    for ns, name in [("b", "x"), ("a", "z"), ("a", "y"), ("c", "a")]:
        store.create(CM, configmap(name, ns))
    store.create(DV, datavolume("not-a-configmap"))
    everything = store.list(CM)
    assert [(i["metadata"]["namespace"], i["metadata"]["name"]) for i in everything.items] == [
        ("a", "y"),
        ("a", "z"),
        ("b", "x"),
        ("c", "a"),
    ]
    assert everything.continue_token is None
    assert names(store.list(CM, "a").items) == ["y", "z"]
    assert store.list(CM, "nope").items == []


def test_list_with_selectors(store: Store) -> None:
    for i, (app, tier) in enumerate([("web", "front"), ("web", "back"), ("db", "back")]):
        store.create(DV, datavolume(f"dv{i}", app=app, tier=tier))
    pending = store.get(DV, NS, "dv2")
    pending["status"] = {"phase": "Succeeded"}
    store.update(DV, pending, subresource="status")

    assert names(store.list(DV, NS, label_selector="app=web").items) == ["dv0", "dv1"]
    assert names(store.list(DV, label_selector="tier in (back),app!=web").items) == ["dv2"]
    assert names(store.list(DV, field_selector="metadata.name=dv1").items) == ["dv1"]
    assert names(store.list(DV, field_selector="metadata.namespace=default").items) == [
        "dv0",
        "dv1",
        "dv2",
    ]
    assert store.list(DV, "other", field_selector="metadata.namespace=default").items == []
    assert names(store.list(DV, field_selector="status.phase=Succeeded").items) == ["dv2"]
    assert names(store.list(DV, field_selector="status.phase!=Succeeded").items) == ["dv0", "dv1"]
    with pytest.raises(BadRequest):
        store.list(DV, label_selector="app in")


def test_list_pages(store: Store) -> None:
    for i in range(25):
        store.create(CM, configmap(f"cm-{i:02d}"))
    seen: list[str] = []
    token: str | None = None
    pages = 0
    while True:
        page = store.list(CM, NS, limit=10, continue_token=token)
        pages += 1
        seen += names(page.items)
        assert page.resource_version == "25"
        token = page.continue_token
        if token is None:
            break
    assert pages == 3
    assert seen == [f"cm-{i:02d}" for i in range(25)]


def test_list_pages_with_selector_count_matches(store: Store) -> None:
    for i in range(10):
        store.create(DV, datavolume(f"dv{i}", parity="even" if i % 2 == 0 else "odd"))
    page = store.list(DV, label_selector="parity=even", limit=3)
    assert names(page.items) == ["dv0", "dv2", "dv4"]
    rest = store.list(DV, label_selector="parity=even", limit=3, continue_token=page.continue_token)
    assert names(rest.items) == ["dv6", "dv8"]


def test_pagination_is_a_consistent_snapshot_under_concurrent_writes(store: Store) -> None:
    for i in range(30):
        store.create(CM, configmap(f"cm-{i:02d}", v="0"))
    snapshot = {i["metadata"]["name"]: i for i in store.list(CM).items}

    first = store.list(CM, limit=10)
    assert first.continue_token
    seen = list(first.items)

    def set_value(n: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
        return lambda obj: {**obj, "data": {"v": str(n)}}

    def churn() -> None:
        for n in range(1, 201):
            with contextlib.suppress(NotFound):  # deleted earlier in the churn
                store.modify(CM, NS, f"cm-{n % 30:02d}", set_value(n))
            if n % 7 == 0:
                store.create(CM, configmap(f"cm-{n % 30:02d}-new-{n}"))
            if n % 11 == 0:
                with contextlib.suppress(NotFound):
                    store.delete(CM, NS, f"cm-{(n * 3) % 30:02d}")

    writer = threading.Thread(target=churn)
    writer.start()
    token: str | None = first.continue_token
    try:
        while token:
            page = store.list(CM, limit=7, continue_token=token)
            assert page.resource_version == first.resource_version
            seen += page.items
            token = page.continue_token
    finally:
        writer.join()
    assert int(store.resource_version) > 200  # the churn really happened

    assert names(seen) == sorted(snapshot)
    assert all(item == snapshot[item["metadata"]["name"]] for item in seen)
    # And after the churn, continuing the old list still gives the old snapshot.
    again = store.list(CM, limit=100, continue_token=first.continue_token)
    assert [i for i in again.items] == [snapshot[n] for n in sorted(snapshot)][10:]


def test_bad_and_expired_continue_tokens(tmp_path: Path) -> None:
    with Store(tmp_path / "small.db", event_retention=5) as small:
        for i in range(6):
            small.create(CM, configmap(f"cm-{i}"))
        page = small.list(CM, limit=2)
        with pytest.raises(BadRequest, match="continue key is not valid"):
            small.list(CM, continue_token="garbage!")
        with pytest.raises(BadRequest):
            small.list(CM, continue_token="eyJ2IjoibWV0YS5rOHMuaW8vdjEifQ")  # no rv
        for i in range(10):
            small.modify(CM, NS, "cm-0", lambda obj: {**obj, "data": {"i": str(i)}})  # noqa: B023
        with pytest.raises(Gone) as info:
            small.list(CM, limit=2, continue_token=page.continue_token)
        assert info.value.code == 410 and info.value.reason == "Expired"


# --- history, watch --------------------------------------------------------------------------


def test_events_since_and_compaction(tmp_path: Path) -> None:
    with Store(tmp_path / "small.db", event_retention=5) as small:
        for i in range(12):
            small.create(CM, configmap(f"cm-{i:02d}"))
        events = small.events_since(7)
        assert [e.rv for e in events] == [8, 9, 10, 11, 12]
        assert all(e.type == "ADDED" for e in events)
        with pytest.raises(Gone) as info:
            small.events_since(2)
        assert info.value.to_status()["reason"] == "Expired"
        assert info.value.message.startswith("too old resource version: 2 (")
        assert small.events_since(12) == []
        assert small.compact() == 7


def test_events_filter_by_resource_and_namespace(store: Store) -> None:
    store.create(CM, configmap("a", "ns1"))
    store.create(CM, configmap("b", "ns2"))
    store.create(DV, datavolume("c"))
    assert [e.name for e in store.events_since(0, CM)] == ["a", "b"]
    assert [e.name for e in store.events_since(0, CM, "ns2")] == ["b"]
    assert [e.name for e in store.events_since("0", DV)] == ["c"]
    with pytest.raises(BadRequest):
        store.events_since("abc")


def test_events_carry_the_previous_object(store: Store) -> None:
    store.create(CM, configmap("c", a="1"))
    store.update(CM, configmap("c", a="2"))
    store.delete(CM, NS, "c")
    added, modified, deleted = store.events_since(0)
    assert added.prev is None
    assert modified.prev is not None and modified.prev["data"] == {"a": "1"}
    assert modified.object["data"] == {"a": "2"}
    assert deleted.object["metadata"]["resourceVersion"] == "3"
    assert deleted.to_wire()["type"] == "DELETED"


async def take(sub: store_module.Subscription, n: int) -> list[WatchEvent]:
    events: list[WatchEvent] = []
    for _ in range(n):
        event = await asyncio.wait_for(sub.get(), 5)
        assert event is not None
        events.append(event)
    return events


async def test_subscribe_receives_writes_from_threads(store: Store) -> None:
    with store.subscribe(CM) as sub:
        await asyncio.to_thread(store.create, CM, configmap("a"))
        await asyncio.to_thread(store.create, DV, datavolume("ignored"))
        await asyncio.to_thread(store.update, CM, configmap("a", x="1"))
        await asyncio.to_thread(store.delete, CM, NS, "a")
        events = await take(sub, 3)
    assert [(e.type, e.name, e.rv) for e in events] == [
        ("ADDED", "a", 1),
        ("MODIFIED", "a", 3),
        ("DELETED", "a", 4),
    ]
    assert await sub.get() is None  # closed


async def test_watch_resumes_from_a_resource_version_without_gap(store: Store) -> None:
    for i in range(5):
        store.create(CM, configmap(f"cm-{i}"))
    # A client that saw rv 2 reconnects; history and live events join without gap or duplicate.
    sub = store.subscribe(CM, since_rv="2")
    writer = asyncio.create_task(
        asyncio.to_thread(lambda: [store.create(CM, configmap(f"late-{i}")) for i in range(5)])
    )
    events = await take(sub, 8)
    await writer
    assert [e.rv for e in events] == list(range(3, 11))
    assert sub.last_rv == 10
    sub.close()


async def test_watch_from_a_future_resource_version_skips_what_it_claims_to_have(
    store: Store,
) -> None:
    store.create(CM, configmap("a"))
    with store.subscribe(CM, since_rv=3) as sub:
        for name in "bcd":
            store.create(CM, configmap(name))
        (event,) = await take(sub, 1)
    assert (event.name, event.rv) == ("d", 4)


async def test_bookmark_rv_moves_past_filtered_events(store: Store) -> None:
    with store.subscribe(CM, label_selector="app=web") as sub:
        assert sub.bookmark_rv == 0
        store.create(CM, configmap("quiet"))
        store.create(CM, configmap("noise"))
        await asyncio.sleep(0.01)
        assert sub.bookmark_rv == 2
        assert sub.last_rv == 0
        store.create(
            CM,
            {
                **configmap("web"),
                "metadata": {"name": "web", "namespace": NS, "labels": {"app": "web"}},
            },
        )
        await asyncio.sleep(0.01)
        assert sub.bookmark_rv == 0  # an event is waiting: nothing past it may be promised
        (event,) = await take(sub, 1)
        assert event.rv == 3 and sub.bookmark_rv == 3


async def test_watch_from_compacted_history_is_gone(tmp_path: Path) -> None:
    with Store(tmp_path / "small.db", event_retention=3) as small:
        for i in range(10):
            small.create(CM, configmap(f"cm-{i}"))
        with pytest.raises(Gone):
            small.subscribe(CM, since_rv=1)
        with small.subscribe(CM, since_rv=7) as sub:
            assert [e.rv for e in await take(sub, 3)] == [8, 9, 10]


async def test_watch_with_label_selector_sees_objects_enter_and_leave(store: Store) -> None:
    store.create(DV, datavolume("dv", app="web"))
    with store.subscribe(DV, NS, label_selector="app=web") as sub:
        obj = store.get(DV, NS, "dv")
        obj["metadata"]["labels"] = {"app": "db"}
        left = store.update(DV, obj)
        left["metadata"]["labels"] = {"app": "db", "x": "1"}
        store.update(DV, left)  # invisible: never matched before or after
        again = store.get(DV, NS, "dv")
        again["metadata"]["labels"] = {"app": "web"}
        store.update(DV, again)
        store.delete(DV, NS, "dv")
        events = await take(sub, 3)
    assert [(e.type, e.rv) for e in events] == [("DELETED", 2), ("ADDED", 4), ("DELETED", 5)]
    # The synthetic DELETED carries the last matching content with the event's rv.
    assert events[0].object["metadata"]["labels"] == {"app": "web"}
    assert events[0].object["metadata"]["resourceVersion"] == "2"


async def test_watch_with_field_selector_and_namespace(store: Store) -> None:
    with store.subscribe(CM, "ns1", field_selector="metadata.name=wanted") as sub:
        store.create(CM, configmap("wanted", "ns2"))
        store.create(CM, configmap("other", "ns1"))
        store.create(CM, configmap("wanted", "ns1"))
        (event,) = await take(sub, 1)
    assert (event.namespace, event.name, event.rv) == ("ns1", "wanted", 3)


async def test_slow_watcher_is_cut_off_and_can_resume(store: Store) -> None:
    sub = store.subscribe(CM, max_queue=3)
    for i in range(6):
        store.create(CM, configmap(f"cm-{i}"))
    await asyncio.sleep(0)  # let the loop run the deliveries
    for _ in range(10):
        if sub.closed:
            break
        await asyncio.sleep(0.01)
    assert sub.overflowed
    assert await sub.get() is None
    # It resumes from the last rv it handed out (none here: its start).
    with store.subscribe(CM, since_rv=sub.last_rv) as resumed:
        assert [e.rv for e in await take(resumed, 6)] == [1, 2, 3, 4, 5, 6]


async def test_closing_the_store_ends_subscriptions(tmp_path: Path) -> None:
    s = Store(tmp_path / "x.db")
    sub = s.subscribe()
    waiter = asyncio.create_task(sub.get())
    await asyncio.sleep(0)
    s.close()
    assert await asyncio.wait_for(waiter, 5) is None


def test_listeners_get_events_in_order(store: Store) -> None:
    seen: list[int] = []
    listener = store.add_listener(lambda e: seen.append(e.rv))

    def boom(event: WatchEvent) -> None:
        raise RuntimeError("a broken listener must not break writes")

    broken = store.add_listener(boom)
    threads = [
        threading.Thread(target=lambda i=i: store.create(CM, configmap(f"c{i}"))) for i in range(20)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.remove_listener(listener)
    store.remove_listener(broken)
    store.create(CM, configmap("after"))
    assert seen == list(range(1, 21))


# --- restart and helpers ---------------------------------------------------------------------


async def test_restart_keeps_objects_rv_and_history(tmp_path: Path) -> None:
    path = tmp_path / "api.db"
    with Store(path) as first:
        first.create(CM, configmap("a", x="1"))
        created = first.create(DV, datavolume("dv"))
        first.update(CM, configmap("a", x="2"))
    with Store(path) as second:
        assert second.resource_version == "3"
        assert second.get(DV, NS, "dv") == created
        assert second.get(CM, NS, "a")["data"] == {"x": "2"}
        assert second.create(CM, configmap("b"))["metadata"]["resourceVersion"] == "4"
        # A watcher that had seen rv 1 before the restart continues where it was.
        with second.subscribe(since_rv=1) as sub:
            assert [e.rv for e in await take(sub, 3)] == [2, 3, 4]


def test_keys_and_dependents(store: Store) -> None:
    owner = store.create(DV, datavolume("dv"))
    uid = owner["metadata"]["uid"]
    ref = {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume", "name": "dv", "uid": uid}
    pvc = {"metadata": {"name": "dv", "namespace": NS, "ownerReferences": [ref]}, "spec": {}}
    store.create(PVC, pvc)
    store.create(CM, configmap("unrelated"))
    store.create(CM, configmap("elsewhere", "other"))
    assert [(r, o["metadata"]["name"]) for r, o in store.dependents(uid)] == [(PVC, "dv")]
    assert store.dependents("nobody") == []
    assert [(k.resource, k.name) for k in store.keys(namespace=NS)] == [
        (CM, "unrelated"),
        (DV, "dv"),
        (PVC, "dv"),
    ]
    assert len(store.keys()) == 4


def test_closed_store_refuses_work(tmp_path: Path) -> None:
    s = Store(tmp_path / "x.db")
    s.close()
    s.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        s.get(CM, NS, "x")
