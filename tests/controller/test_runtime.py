"""The controller runtime against the real embedded API server, in-process.

What is real: the API server (objects, watches, resourceVersions, owner references, label
selectors), the client and the informer. What is made up: the reconcilers, small functions that
record what they were asked and when, with millisecond-scale back-off. The one stand-in is a
`Client` subclass whose first watch ends in 410 Gone, our own boundary, for the relist case.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from cdi.api.groups import CONFIG_MAP, DATA_VOLUME, SECRET, Resource
from cdi.controller.runtime import BackoffSettings, Controller, Request, Result
from cdi.kube.client import Client, WatchEvent
from cdi.kube.errors import ApiError, Conflict, Gone, NotFound
from tests.support.cluster import Cluster, eventually

NS = "default"
STOP_TIMEOUT = 10.0
FAST = BackoffSettings(initial=0.05, maximum=0.3, factor=2.0)
#: Slack for timer jitter: asyncio may fire a timer up to its clock resolution early.
EARLY = 0.01
OWNER_LABEL = "test.cdi.kubevirt.io/owner"
FOR_ANNOTATION = "test.cdi.kubevirt.io/for"
RUNTIME_LOGGER = "cdi.controller.runtime"


@contextlib.asynccontextmanager
async def running(controller: Controller) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(controller.run(stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, STOP_TIMEOUT)


async def until(predicate: Callable[[], bool], *, what: str, within: float = 5.0) -> None:
    async def probe() -> bool:
        return predicate()

    await eventually(probe, within=within, what=what)


def configmap(
    name: str, *, data: dict[str, str] | None = None, owners: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": NS}
    if owners:
        metadata["ownerReferences"] = owners
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data or {}}


def datavolume(name: str) -> dict[str, Any]:
    return {
        "apiVersion": DATA_VOLUME.api_version,
        "kind": "DataVolume",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "source": {"blank": {}},
            "storage": {"resources": {"requests": {"storage": "1Mi"}}},
        },
    }


def owner_ref(owner: dict[str, Any], *, controller: bool = True) -> dict[str, Any]:
    return {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"],
        "controller": controller,
    }


def key(name: str) -> Request:
    return Request(NS, name)


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


class Recorder:
    """A reconciler that counts calls per key and returns a fixed result."""

    def __init__(self, result: Result | None = None) -> None:
        self.result = result or Result()
        self.calls: Counter[Request] = Counter()
        self.times: dict[Request, list[float]] = {}

    async def __call__(self, request: Request) -> Result:
        self.calls[request] += 1
        self.times.setdefault(request, []).append(time.monotonic())
        return self.result


# --- seeing objects -------------------------------------------------------------------------


async def test_existing_and_new_objects_are_reconciled(cluster: Cluster) -> None:
    client = cluster.client
    await client.create(CONFIG_MAP, configmap("before"))
    recorder = Recorder()
    controller = Controller(client, name="test", primary=CONFIG_MAP, reconcile=recorder)
    async with running(controller):
        await until(lambda: recorder.calls[key("before")] == 1, what="the listed object")
        await client.create(CONFIG_MAP, configmap("after"))
        await until(lambda: recorder.calls[key("after")] == 1, what="the created object")
    assert set(recorder.calls) == {key("before"), key("after")}


async def test_deleted_object_is_reconciled_and_sees_not_found(cluster: Cluster) -> None:
    client = cluster.client
    await client.create(CONFIG_MAP, configmap("doomed"))
    outcomes: list[str] = []

    async def reconcile(request: Request) -> Result:
        try:
            await client.get(CONFIG_MAP, request.name, request.namespace)
        except NotFound:
            outcomes.append("gone")
        else:
            outcomes.append("present")
        return Result()

    controller = Controller(client, name="test", primary=CONFIG_MAP, reconcile=reconcile)
    async with running(controller):
        await until(lambda: outcomes == ["present"], what="the first reconcile")
        await client.delete(CONFIG_MAP, "doomed", NS)
        await until(lambda: outcomes[-1:] == ["gone"], what="the reconcile after deletion")


# --- queueing -------------------------------------------------------------------------------


async def test_rapid_updates_coalesce_and_the_last_state_is_seen(cluster: Cluster) -> None:
    client = cluster.client
    await client.create(CONFIG_MAP, configmap("busy", data={"n": "start"}))
    seen: list[str] = []

    async def reconcile(request: Request) -> Result:
        obj = await client.get(CONFIG_MAP, request.name, request.namespace)
        seen.append(obj["data"]["n"])
        await asyncio.sleep(0.2)  # a slow reconcile: updates pile up behind it
        return Result()

    controller = Controller(client, name="test", primary=CONFIG_MAP, reconcile=reconcile)
    async with running(controller):
        await until(lambda: seen == ["start"], what="the first reconcile")
        for n in range(10):
            await client.patch(CONFIG_MAP, "busy", {"data": {"n": str(n)}}, NS)
        await until(lambda: seen[-1] == "9", what="the last update")
        await asyncio.sleep(0.5)  # nothing more may come: every event was consumed
    updates = seen[1:]
    assert updates[-1] == "9"
    assert 1 <= len(updates) <= 3, updates


async def test_one_reconcile_per_key_while_keys_run_in_parallel(cluster: Cluster) -> None:
    client = cluster.client
    names = [f"cm{i}" for i in range(6)]
    for name in names:
        await client.create(CONFIG_MAP, configmap(name, data={"round": "0"}))
    per_key: Counter[Request] = Counter()
    most_per_key = 0
    total = most_total = 0
    calls: Counter[Request] = Counter()

    async def reconcile(request: Request) -> Result:
        nonlocal most_per_key, total, most_total
        per_key[request] += 1
        total += 1
        most_per_key = max(most_per_key, per_key[request])
        most_total = max(most_total, total)
        try:
            await asyncio.sleep(0.1)
        finally:
            per_key[request] -= 1
            total -= 1
        calls[request] += 1
        return Result()

    controller = Controller(client, name="test", primary=CONFIG_MAP, reconcile=reconcile, workers=3)
    async with running(controller):
        await until(lambda: all(calls[key(n)] == 1 for n in names), what="the first pass")
        # Updates land while the same keys are being reconciled.
        for round_ in range(1, 4):
            for name in names:
                await client.patch(CONFIG_MAP, name, {"data": {"round": str(round_)}}, NS)
            await asyncio.sleep(0.03)
        await until(
            lambda: all(calls[key(n)] >= 2 for n in names) and total == 0,
            what="every key reconciled again after its updates",
        )
    assert most_per_key == 1
    assert most_total == 3


# --- retrying -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [RuntimeError("boom"), Conflict(409, "Conflict", "the object has been modified")],
    ids=["exception", "conflict"],
)
async def test_failures_back_off_and_a_success_resets(
    cluster: Cluster, error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    client = cluster.client
    await client.create(CONFIG_MAP, configmap("flaky", data={"v": "1"}))
    times: list[float] = []
    failing = 4

    async def reconcile(request: Request) -> Result:
        nonlocal failing
        times.append(time.monotonic())
        if failing:
            failing -= 1
            raise error
        return Result()

    controller = Controller(
        client, name="test", primary=CONFIG_MAP, reconcile=reconcile, backoff=FAST
    )
    async with running(controller):
        await until(lambda: len(times) == 5, what="four failures, then a success")
        expected = [0.05, 0.1, 0.2, 0.3]  # doubling from 0.05, capped at 0.3
        for gap, delay in zip(gaps(times), expected, strict=True):
            assert delay - EARLY <= gap < delay + 0.25, (gaps(times), expected)
        # After the success, the next failure starts from the initial delay again.
        failing = 1
        await client.patch(CONFIG_MAP, "flaky", {"data": {"v": "2"}}, NS)
        await until(lambda: len(times) == 7, what="a failure, then a success")
        assert 0.05 - EARLY <= times[6] - times[5] < 0.2
    records = [
        r for r in caplog.records if r.name == RUNTIME_LOGGER and "default/flaky" in r.getMessage()
    ]
    if isinstance(error, Conflict):
        assert not [r for r in records if r.levelno >= logging.WARNING]
        assert len([r for r in records if "conflict" in r.getMessage()]) == 5
    else:
        warnings = [r for r in records if r.levelno == logging.WARNING]
        assert len(warnings) == 5  # one line per back-off step
        # The traceback only when the error is new for the key: first, and after the reset.
        assert len([r for r in warnings if r.exc_info]) == 2


async def test_events_during_back_off_wait_for_it(cluster: Cluster) -> None:
    """A reconciler that writes and then fails must not spin on its own writes."""
    client = cluster.client
    await client.create(CONFIG_MAP, configmap("noisy", data={"n": "0"}))
    times: list[float] = []

    async def reconcile(request: Request) -> Result:
        times.append(time.monotonic())
        if len(times) == 1:
            await client.patch(CONFIG_MAP, request.name, {"data": {"n": "1"}}, request.namespace)
            raise RuntimeError("failed after writing")
        return Result()

    backoff = BackoffSettings(initial=0.5, maximum=1.0)
    controller = Controller(
        client, name="test", primary=CONFIG_MAP, reconcile=reconcile, backoff=backoff
    )
    async with running(controller):
        await until(lambda: len(times) == 2, what="the retry")
        await client.patch(CONFIG_MAP, "noisy", {"data": {"n": "2"}}, NS)
        await until(lambda: len(times) == 3, what="the reconcile of a later update")
    assert times[1] - times[0] >= 0.5 - EARLY
    assert times[2] - times[1] < 0.4  # after a success, events run at once again


async def test_requeue_after_is_honoured_and_an_event_comes_sooner(cluster: Cluster) -> None:
    client = cluster.client
    await client.create(CONFIG_MAP, configmap("polled"))
    polled = Recorder(Result(requeue_after=0.2))
    controller = Controller(client, name="test", primary=CONFIG_MAP, reconcile=polled)
    async with running(controller):
        await until(lambda: polled.calls[key("polled")] >= 4, what="three timed reconciles")
    for gap in gaps(polled.times[key("polled")])[:3]:
        assert 0.2 - EARLY <= gap < 0.5

    waiting = Recorder(Result(requeue_after=30.0))
    controller = Controller(client, name="test", primary=CONFIG_MAP, reconcile=waiting)
    async with running(controller):
        await until(lambda: waiting.calls[key("polled")] == 1, what="the first reconcile")
        await client.patch(CONFIG_MAP, "polled", {"data": {"x": "y"}}, NS)
        await until(lambda: waiting.calls[key("polled")] == 2, what="the event", within=2.0)


async def test_enqueue_by_hand_now_and_later(cluster: Cluster) -> None:
    """Keys need no object: the reconciler decides what a key without one means."""
    recorder = Recorder()
    controller = Controller(cluster.client, name="test", primary=CONFIG_MAP, reconcile=recorder)
    controller.enqueue(key("early"))  # before run: kept for it
    async with running(controller):
        await until(lambda: recorder.calls[key("early")] == 1, what="the key enqueued early")
        asked = time.monotonic()
        controller.enqueue(key("later"), after=1.0)
        controller.enqueue(key("later"), after=0.2)  # the earlier time wins
        controller.enqueue(key("later"), after=5.0)
        await until(lambda: recorder.calls[key("later")] == 1, what="the delayed key")
        assert 0.2 - EARLY <= recorder.times[key("later")][0] - asked < 0.9
        await asyncio.sleep(0.9)  # past the replaced 1 s timer: it must not fire
    assert recorder.calls[key("later")] == 1


# --- relations ------------------------------------------------------------------------------


async def test_owned_object_events_reconcile_the_owner(cluster: Cluster) -> None:
    client = cluster.client
    owner = await client.create(DATA_VOLUME, datavolume("dv1"))
    recorder = Recorder()
    controller = Controller(client, name="test", primary=DATA_VOLUME, reconcile=recorder)
    controller.watch_owned(CONFIG_MAP, owner_kind="DataVolume")
    ghost = {**owner, "metadata": {**owner["metadata"], "name": "ghost"}}
    not_ours = {**ghost, "kind": "VirtualMachine", "apiVersion": "kubevirt.io/v1"}

    async def step(action: Callable[[], Any], what: str) -> None:
        before = recorder.calls[key("dv1")]
        await action()
        await until(lambda: recorder.calls[key("dv1")] > before, what=what)

    async with running(controller):
        await until(lambda: recorder.calls[key("dv1")] == 1, what="the owner itself")
        # Neither of these may wake "ghost": not a controller reference, not the owner kind.
        await client.create(
            CONFIG_MAP, configmap("loose", owners=[owner_ref(ghost, controller=False)])
        )
        await client.create(CONFIG_MAP, configmap("foreign", owners=[owner_ref(not_ours)]))
        owned = configmap("owned", owners=[owner_ref(owner)])
        await step(lambda: client.create(CONFIG_MAP, owned), "the owned object's creation")
        await step(
            lambda: client.patch(CONFIG_MAP, "owned", {"data": {"a": "b"}}, NS), "its update"
        )
        await step(lambda: client.delete(CONFIG_MAP, "owned", NS), "its deletion")
    assert set(recorder.calls) == {key("dv1")}


async def test_mapped_objects_reconcile_the_primaries_they_name(cluster: Cluster) -> None:
    client = cluster.client
    recorder = Recorder()

    def named(obj: dict[str, Any]) -> list[Request]:
        target = (obj["metadata"].get("annotations") or {}).get(FOR_ANNOTATION)
        return [Request(obj["metadata"]["namespace"], target)] if target else []

    controller = Controller(client, name="test", primary=CONFIG_MAP, reconcile=recorder)
    controller.watch_mapped(SECRET, named)
    secret: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "s", "namespace": NS, "annotations": {FOR_ANNOTATION: "a"}},
    }
    async with running(controller):
        await client.create(SECRET, secret)
        await until(lambda: recorder.calls[key("a")] == 1, what="the named primary")
        # The relation moves from a to b: both hear about it, a because it lost the secret.
        await client.patch(SECRET, "s", {"metadata": {"annotations": {FOR_ANNOTATION: "b"}}}, NS)
        await until(
            lambda: recorder.calls[key("a")] == 2 and recorder.calls[key("b")] == 1,
            what="the old and the new primary",
        )


class ExpiringWatch(Client):
    """The real client, except that its first watch changes objects behind the controller's back
    and then ends in 410 Gone, as a watch that fell too far behind does."""

    def __init__(self, cluster: Cluster) -> None:
        super().__init__(cluster.client.config, backoff=(0.1,))
        self.expired = False
        self.may_expire = asyncio.Event()

    async def watch(
        self, res: Resource, namespace: str | None = None, **options: Any
    ) -> AsyncIterator[WatchEvent]:
        if not self.expired:
            self.expired = True
            await self.may_expire.wait()
            await self.delete(CONFIG_MAP, "goes", NS)
            await self.create(CONFIG_MAP, configmap("arrives"))
            raise Gone(410, "Expired", "too old resource version")
        async for event in super().watch(res, namespace, **options):
            yield event


async def test_relist_after_gone_loses_no_key(cluster: Cluster) -> None:
    for name in ("stays", "goes"):
        await cluster.client.create(CONFIG_MAP, configmap(name))
    outcomes: dict[str, list[str]] = {}

    async with ExpiringWatch(cluster) as client:

        async def reconcile(request: Request) -> Result:
            try:
                await client.get(CONFIG_MAP, request.name, request.namespace)
                outcome = "present"
            except NotFound:
                outcome = "gone"
            outcomes.setdefault(request.name, []).append(outcome)
            if "stays" in outcomes and "goes" in outcomes:
                client.may_expire.set()  # what was listed has been seen: now lose the watch
            return Result()

        controller = Controller(client, name="test", primary=CONFIG_MAP, reconcile=reconcile)
        async with running(controller):
            await until(lambda: client.expired, what="the expired watch")
            await until(
                lambda: (
                    outcomes.get("goes") == ["present", "gone"]
                    and outcomes.get("arrives") == ["present"]
                ),
                what="the relist",
            )
            await asyncio.sleep(0.3)
    assert outcomes["stays"] == ["present"]  # unchanged across the relist: not run again
    assert outcomes["goes"] == ["present", "gone"]


# --- restarting and stopping ----------------------------------------------------------------


async def test_restarts_converge_without_duplicates(cluster: Cluster) -> None:
    """Stop the controller at random moments, change things while it is down, start it again:
    one config map per DataVolume in the end, made by a create-if-missing reconciler. That
    reconciler only stays idempotent if one key never runs twice at once."""
    client = cluster.client
    rng = random.Random(5)
    runs: list[Counter[str]] = []

    async def reconcile(request: Request) -> Result:
        runs[-1][request.name] += 1
        try:
            dv = await client.get(DATA_VOLUME, request.name, request.namespace)
        except NotFound:
            return Result()
        children, _ = await client.list(
            CONFIG_MAP, request.namespace, label_selector=f"{OWNER_LABEL}={request.name}"
        )
        # Widen the check-then-act window that a stop, or a second run of the key, could hit.
        await asyncio.sleep(rng.uniform(0.01, 0.05))
        if not children:
            await client.create(
                CONFIG_MAP,
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {
                        "generateName": f"{request.name}-",
                        "namespace": request.namespace,
                        "labels": {OWNER_LABEL: request.name},
                        "ownerReferences": [owner_ref(dv)],
                    },
                },
            )
        return Result()

    async def touch(names: list[str]) -> None:
        """Events for keys that are being reconciled right now."""
        for n in range(3):
            for name in names:
                patch = {"metadata": {"annotations": {"touched": str(n)}}}
                await client.patch(DATA_VOLUME, name, patch, NS)
            await asyncio.sleep(0.01)

    async def children_per_dv() -> Counter[str]:
        items, _ = await client.list(CONFIG_MAP, NS, label_selector=OWNER_LABEL)
        return Counter(i["metadata"]["labels"][OWNER_LABEL] for i in items)

    names = [f"dv{i}" for i in range(8)]
    for name in names:
        await client.create(DATA_VOLUME, datavolume(name))
    # More workers than keys: a free worker is always there to run a key twice if it could.
    controller = Controller(
        client, name="test", primary=DATA_VOLUME, reconcile=reconcile, workers=16
    )
    # The children's own events wake their owner while it may still be running.
    controller.watch_owned(CONFIG_MAP, owner_kind="DataVolume")
    for round_ in range(3):
        runs.append(Counter())
        async with running(controller):
            await touch(names)
            await asyncio.sleep(rng.uniform(0, 0.05))
        new = f"dv-late{round_}"
        names.append(new)
        await client.create(DATA_VOLUME, datavolume(new))
        # Children lost while the controller is down must come back, once each: every start
        # then creates under a stream of events for the keys it is creating for.
        items, _ = await client.list(CONFIG_MAP, NS, label_selector=OWNER_LABEL)
        for item in items:
            await client.delete(CONFIG_MAP, item["metadata"]["name"], NS)

    runs.append(Counter())
    async with running(controller):

        async def converged() -> bool:
            children = await children_per_dv()
            assert max(children.values(), default=0) <= 1, f"duplicate children: {children}"
            return children == Counter(dict.fromkeys(names, 1))

        await touch(names)
        await eventually(converged, what="one child per DataVolume")
        await asyncio.sleep(0.3)  # late events must not add anything
    assert await children_per_dv() == Counter(dict.fromkeys(names, 1))
    assert set(runs[-1]) == set(names)  # the last start reconciled every object again


async def test_stop_drains_running_reconciles_and_starts_no_new_ones(cluster: Cluster) -> None:
    client = cluster.client
    for name in ("a", "b", "c"):
        await client.create(CONFIG_MAP, configmap(name))
    started: list[Request] = []
    finished: list[Request] = []

    async def reconcile(request: Request) -> Result:
        started.append(request)
        await asyncio.sleep(0.4)
        finished.append(request)
        return Result()

    controller = Controller(client, name="test", primary=CONFIG_MAP, reconcile=reconcile, workers=1)
    stop = asyncio.Event()
    task = asyncio.create_task(controller.run(stop))
    await until(lambda: len(started) == 1, what="the first reconcile")
    stop.set()
    began = time.monotonic()
    await asyncio.wait_for(task, STOP_TIMEOUT)
    assert time.monotonic() - began < 1.0
    assert finished == started  # the running one finished; the queued ones never started


async def test_stop_cancels_a_stuck_reconcile_after_the_drain_timeout(cluster: Cluster) -> None:
    client = cluster.client
    await client.create(CONFIG_MAP, configmap("stuck"))
    entered = asyncio.Event()
    cancelled = False

    async def reconcile(request: Request) -> Result:
        nonlocal cancelled
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled = True
            raise
        return Result()

    controller = Controller(
        client, name="test", primary=CONFIG_MAP, reconcile=reconcile, drain_timeout=0.3
    )
    stop = asyncio.Event()
    task = asyncio.create_task(controller.run(stop))
    await asyncio.wait_for(entered.wait(), STOP_TIMEOUT)
    stop.set()
    began = time.monotonic()
    await asyncio.wait_for(task, STOP_TIMEOUT)
    assert 0.3 - EARLY <= time.monotonic() - began < 1.3
    assert cancelled


async def test_reconcile_errors_do_not_reach_run(cluster: Cluster) -> None:
    """An API error out of a reconciler is the key's business; the controller keeps going."""
    client = cluster.client
    await client.create(CONFIG_MAP, configmap("bad"))
    await client.create(CONFIG_MAP, configmap("good"))
    recorder = Recorder()

    async def reconcile(request: Request) -> Result:
        if request.name == "bad":
            raise ApiError(400, "BadRequest", "nope")
        return await recorder(request)

    controller = Controller(
        client, name="test", primary=CONFIG_MAP, reconcile=reconcile, backoff=FAST
    )
    async with running(controller) as task:
        await until(lambda: recorder.calls[key("good")] == 1, what="the good key")
        await asyncio.sleep(0.3)  # several back-off steps of the bad key
        assert not task.done()


def test_backoff_settings_are_checked_and_capped() -> None:
    settings = BackoffSettings(initial=0.5, maximum=60.0, factor=2.0)
    assert [settings.delay(n) for n in (1, 2, 3, 8, 100_000)] == [0.5, 1.0, 2.0, 60.0, 60.0]
    with pytest.raises(ValueError, match="back-off"):
        BackoffSettings(initial=0)
    with pytest.raises(ValueError, match="back-off"):
        BackoffSettings(initial=2, maximum=1)
    with pytest.raises(ValueError, match="back-off"):
        BackoffSettings(factor=0.5)
