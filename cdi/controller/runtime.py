"""The controller reactor: watch kinds, queue object keys, run one reconcile per key at a time.

Owns the machinery every reconciler shares, in the spirit of controller-runtime and kopf:

* Watching. One list-then-watch (`cdi.kube.informer`) per watched kind: the primary kind, kinds
  whose objects are owned by a primary (`watch_owned`: ownerReferences with `controller: true`),
  and kinds related some other way (`watch_mapped`, e.g. a PVC annotation naming a DataVolume).
  Every event is turned into `Request`s (namespace and name of a primary); objects are not kept.
  A (re)list after a broken watch or 410 Gone enqueues what changed while nobody watched,
  including objects that disappeared, so no key is lost.
* Queueing. Level-triggered: a key is in the queue at most once, however many events arrive.
  A key is reconciled by one worker at a time; events arriving during its reconcile coalesce into
  exactly one more run afterwards. Different keys run in parallel, at most `workers` at once;
  a reconcile is a task that exists only while it runs.
* Retrying. An exception from the reconciler (a `cdi.kube.Conflict` included) requeues the key
  after a per-key exponential back-off (`BackoffSettings`), reset by the next success. While a
  key backs off, events for it wait for the back-off to end (as kopf throttles errors): a
  reconciler that writes status and then fails must not spin on its own writes.
  `Result.requeue_after` schedules a timed run; any event runs the key sooner, and each run
  replaces the schedule with its own result.
* Stopping. `run` returns after `stop` is set: watches end, queued keys are dropped (the next
  start lists everything again), reconciles in flight may finish within `drain_timeout` and are
  cancelled after it.

Called by the control plane (`cdi server`, the controller command) with one `Controller` per
reconciler. It must not interpret objects, write to the API or cache objects for reconcilers:
a reconciler gets only the key and reads what it needs itself, so it sees NotFound for a deleted
object and cleans up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from cdi.api.groups import Resource
from cdi.kube.client import Client, WatchEvent
from cdi.kube.errors import Conflict
from cdi.kube.informer import Snapshot, list_then_watch

log = logging.getLogger(__name__)

Obj = dict[str, Any]

#: Seconds a stopping controller lets reconciles in flight finish before cancelling them: long
#: enough for a few API round trips, short enough for a prompt Ctrl-C.
DEFAULT_DRAIN_TIMEOUT: Final = 10.0


@dataclass(frozen=True, slots=True)
class Request:
    """What a reconcile is about: one primary object. `namespace` is "" for cluster scope."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name


@dataclass(frozen=True, slots=True)
class Result:
    """What a successful reconcile asks for next."""

    requeue_after: float | None = None
    """Seconds until this key is reconciled again even without an event (polling something that
    sends no events, such as a worker's progress); None: only on the next event."""


Reconciler = Callable[[Request], Awaitable[Result]]
"""Reconcile one key: read the object (NotFound means deleted: clean up), converge, return."""

Mapper = Callable[[Obj], list[Request]]
"""The primaries a watched object concerns, from the object alone (no I/O)."""


@dataclass(frozen=True, slots=True)
class BackoffSettings:
    """Per-key delays after failed reconciles: initial, initial*factor, ... capped at maximum."""

    initial: float = 0.5
    """Seconds before the first retry: long enough to let a conflicting writer finish, short
    enough that a transient API error costs the user nothing visible."""
    maximum: float = 60.0
    """Cap in seconds: a broken object is retried once a minute, which keeps the log and the API
    quiet while still healing without a restart once the cause is fixed."""
    factor: float = 2.0
    """Growth per consecutive failure (>= 1); 2 reaches the cap from 0.5 s in 7 failures."""

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.maximum < self.initial or self.factor < 1:
            raise ValueError(
                f"back-off needs 0 < initial <= maximum and factor >= 1, got initial="
                f"{self.initial} maximum={self.maximum} factor={self.factor}"
            )

    def delay(self, failures: int) -> float:
        """Seconds to wait after the `failures`-th consecutive failure (1-based)."""
        try:
            delay = self.initial * self.factor ** max(failures - 1, 0)
        except OverflowError:  # thousands of failures: the cap was reached long ago
            return self.maximum
        return min(delay, self.maximum)


@dataclass(slots=True)
class _Source:
    """One watched kind and how its objects map to primary keys."""

    resource: Resource
    mapper: Mapper
    known: dict[tuple[str, str], tuple[str, frozenset[Request]]] = field(default_factory=dict)
    """Per watched object: resourceVersion and the keys it mapped to when last seen; lets a relist
    skip unchanged objects and still notify the primaries of objects deleted meanwhile."""


def _object_key(obj: Obj) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


class Controller:
    """Drives one reconciler: see the module docstring for the guarantees it gives.

    `name` labels log lines and tasks; `primary` is the kind whose keys are reconciled;
    `workers` bounds reconciles running at once (across keys; one key never runs twice at
    once); `backoff` spaces retries of a failing key; `drain_timeout` (seconds) is how long a
    stop waits for reconciles in flight. Declare watches, then `run`; `run` may be called again
    after it returned, and starts from a fresh list. Call everything from the event loop.
    """

    def __init__(
        self,
        client: Client,
        *,
        name: str,
        primary: Resource,
        reconcile: Reconciler,
        workers: int = 4,
        backoff: BackoffSettings = BackoffSettings(),  # frozen: safe to share
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.name = name
        self.primary = primary
        self.workers = workers
        self.backoff = backoff
        self.drain_timeout = drain_timeout
        self._client = client
        self._reconcile = reconcile
        self._sources = [_Source(primary, self._map_primary)]
        self._running = False
        self._stopping = False
        # The queue proper: `_ready` holds keys in order, `_dirty` says which keys want a run
        # (queued, or waiting for their current run to end), `_active` which keys are running.
        # A key is in `_ready` only if it is dirty and not active: that is the coalescing.
        self._ready: asyncio.Queue[Request] = asyncio.Queue()
        self._dirty: set[Request] = set()
        self._active: set[Request] = set()
        self._timers: dict[Request, asyncio.TimerHandle] = {}
        self._throttled: set[Request] = set()
        self._failures: dict[Request, int] = {}
        self._last_error: dict[Request, tuple[type[BaseException], str]] = {}
        self._in_flight: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(workers)

    # --- declaring what to watch --------------------------------------------------------------
    def watch_owned(self, resource: Resource, *, owner_kind: str) -> None:
        """Reconcile the controlling owner (ownerReference of `owner_kind`, `controller: true`)
        whenever an object of `resource` changes or goes away."""

        def owners(obj: Obj) -> list[Request]:
            namespace = _object_key(obj)[0] if self.primary.namespaced else ""
            refs = (obj.get("metadata") or {}).get("ownerReferences") or []
            return [
                Request(namespace, str(ref["name"]))
                for ref in refs
                if ref.get("kind") == owner_kind and ref.get("controller") is True
            ]

        self._add_source(resource, owners)

    def watch_mapped(self, resource: Resource, mapper: Mapper) -> None:
        """Reconcile the keys `mapper` returns whenever an object of `resource` changes or goes
        away. On an update, the keys the object mapped to before are reconciled too, so that a
        primary hears about a relation that ended."""
        self._add_source(resource, mapper)

    def _add_source(self, resource: Resource, mapper: Mapper) -> None:
        if self._running:
            raise RuntimeError(f"controller {self.name} is running: declare watches before run()")
        self._sources.append(_Source(resource, mapper))

    def _map_primary(self, obj: Obj) -> list[Request]:
        return [Request(*_object_key(obj))]

    # --- the queue ----------------------------------------------------------------------------
    def enqueue(self, request: Request, *, after: float = 0.0) -> None:
        """Ask for a reconcile of `request`, now or in `after` seconds (an earlier request wins).

        Ignored while the key backs off from a failure: its retry is already scheduled."""
        if self._stopping or request in self._throttled:
            return
        if after <= 0:
            self._add(request)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + after
        timer = self._timers.get(request)
        if timer is not None:
            if timer.when() <= deadline:
                return
            timer.cancel()
        self._timers[request] = loop.call_at(deadline, self._fire, request)

    def _add(self, request: Request) -> None:
        if self._stopping or request in self._throttled or request in self._dirty:
            return
        self._dirty.add(request)
        if request not in self._active:
            self._ready.put_nowait(request)

    def _fire(self, request: Request) -> None:
        self._timers.pop(request, None)
        self._throttled.discard(request)
        self._add(request)

    # --- running ------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Watch and reconcile until `stop` is set, then drain (see the module docstring).

        Raises only if the reactor itself breaks (a bug), after stopping everything it started."""
        if self._running:
            raise RuntimeError(f"controller {self.name} is already running")
        self._running, self._stopping = True, False
        for source in self._sources:
            source.known = {}  # a fresh start reconciles every object again
        kinds = ",".join(s.resource.plural for s in self._sources)
        log.info(
            "controller starting controller=%s watches=%s workers=%d",
            self.name,
            kinds,
            self.workers,
        )
        watchers = [
            asyncio.create_task(self._watch(s), name=f"{self.name}:watch:{s.resource.plural}")
            for s in self._sources
        ]
        dispatcher = asyncio.create_task(self._dispatch(), name=f"{self.name}:dispatch")
        stopped = asyncio.create_task(stop.wait(), name=f"{self.name}:stop")
        broken: asyncio.Task[Any] | None = None
        graceful = False
        try:
            done, _ = await asyncio.wait(
                {stopped, dispatcher, *watchers}, return_when=asyncio.FIRST_COMPLETED
            )
            broken = next((t for t in done if t is not stopped), None)
            graceful = True
        finally:
            # A cancelled run() (not a stop) cancels its reconciles at once: the caller is
            # tearing down and must not wait for drain_timeout.
            await self._shutdown([stopped, dispatcher, *watchers], graceful=graceful)
        if broken is not None:
            log.error("controller stopped: the reactor broke controller=%s", self.name)
            broken.result()  # re-raise its error: a silent half-dead controller is worse
            raise RuntimeError(f"controller {self.name}: task {broken.get_name()} ended")

    async def _watch(self, source: _Source) -> None:
        # Handling an event never awaits, so cancellation always lands inside the stream's own
        # await, which closes the stream (and its HTTP response) as it unwinds.
        async for change in list_then_watch(self._client, source.resource):
            if isinstance(change, Snapshot):
                self._resync(source, change)
            else:
                self._observe(source, change)

    def _resync(self, source: _Source, snapshot: Snapshot) -> None:
        seen: dict[tuple[str, str], tuple[str, frozenset[Request]]] = {}
        wanted: set[Request] = set()
        for obj in snapshot.items:
            key = _object_key(obj)
            version = str((obj.get("metadata") or {}).get("resourceVersion") or "")
            requests = self._map(source, obj)
            seen[key] = (version, requests)
            before = source.known.get(key)
            if before is None or before[0] != version:
                wanted |= requests | (before[1] if before else frozenset())
        for key, (_, requests) in source.known.items():
            if key not in seen:  # deleted while the watch was down: its primaries must hear
                wanted |= requests
        source.known = seen
        log.debug(
            "listed controller=%s resource=%s objects=%d enqueued=%d",
            self.name,
            source.resource.plural,
            len(seen),
            len(wanted),
        )
        self._add_all(wanted)

    def _observe(self, source: _Source, event: WatchEvent) -> None:
        key = _object_key(event.object)
        before = source.known.pop(key, None)
        requests = self._map(source, event.object)
        if event.type != "DELETED":
            version = str((event.object.get("metadata") or {}).get("resourceVersion") or "")
            source.known[key] = (version, requests)
        self._add_all(requests | (before[1] if before else frozenset()))

    def _map(self, source: _Source, obj: Obj) -> frozenset[Request]:
        try:
            return frozenset(source.mapper(obj))
        except Exception:  # a mapper bug must not stop the watch for every other object
            namespace, name = _object_key(obj)
            log.exception(
                "%s/%s mapping failed controller=%s resource=%s",
                namespace,
                name,
                self.name,
                source.resource.plural,
            )
            return frozenset()

    def _add_all(self, requests: Iterable[Request]) -> None:
        for request in requests:
            self._add(request)

    async def _dispatch(self) -> None:
        while True:
            # Take a slot before a key, so that a key never waits outside the queue, where
            # new events for it could not coalesce with it.
            await self._slots.acquire()
            try:
                request = await self._ready.get()
            except BaseException:
                self._slots.release()
                raise
            self._dirty.discard(request)
            self._active.add(request)
            # This run decides afresh when the key is due next (its own Result or failure).
            if (timer := self._timers.pop(request, None)) is not None:
                timer.cancel()
            task = asyncio.create_task(self._process(request), name=f"{self.name}:{request}")
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    async def _process(self, request: Request) -> None:
        started = time.monotonic()
        try:
            result = await self._reconcile(request)
        except asyncio.CancelledError:
            log.warning(
                "%s reconcile cancelled controller=%s seconds=%.3f",
                request,
                self.name,
                time.monotonic() - started,
            )
            raise
        except Exception as err:
            self._failed(request, err)
        else:
            self._succeeded(request, result, time.monotonic() - started)
        finally:
            self._active.discard(request)
            self._slots.release()
            if request in self._dirty and not self._stopping:
                self._ready.put_nowait(request)

    def _succeeded(self, request: Request, result: Result, seconds: float) -> None:
        failures = self._failures.pop(request, 0)
        self._last_error.pop(request, None)
        if failures:
            log.info(
                "%s reconcile recovered controller=%s failures=%d", request, self.name, failures
            )
        log.debug(
            "%s reconciled controller=%s seconds=%.3f requeue_after=%s",
            request,
            self.name,
            seconds,
            result.requeue_after,
        )
        if result.requeue_after is not None:
            self.enqueue(request, after=result.requeue_after)

    def _failed(self, request: Request, err: Exception) -> None:
        failures = self._failures.get(request, 0) + 1
        self._failures[request] = failures
        delay = self.backoff.delay(failures)
        signature = (type(err), str(err))
        repeated = self._last_error.get(request) == signature
        self._last_error[request] = signature
        if isinstance(err, Conflict):
            # Optimistic concurrency at work, not a fault: the retry reads the newer object.
            log.info(
                "%s reconcile conflict controller=%s failures=%d retry_in=%.3f error=%s",
                request,
                self.name,
                failures,
                delay,
                err,
            )
        else:
            # One line per back-off step; the traceback only when the error is new for this key.
            log.warning(
                "%s reconcile failed controller=%s failures=%d retry_in=%.3f error=%s: %s",
                request,
                self.name,
                failures,
                delay,
                type(err).__name__,
                err,
                exc_info=None if repeated else err,
            )
        # Throttle: the retry runs when the back-off ends, and events until then coalesce into
        # it (see `_add`), so a failing key cannot spin on events it causes itself.
        self._dirty.discard(request)
        if self._stopping:  # the next start reconciles every key anyway
            return
        if (timer := self._timers.pop(request, None)) is not None:
            timer.cancel()
        self._throttled.add(request)
        loop = asyncio.get_running_loop()
        self._timers[request] = loop.call_later(delay, self._fire, request)

    async def _shutdown(self, tasks: list[asyncio.Task[Any]], *, graceful: bool) -> None:
        began = time.monotonic()
        self._stopping = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        running = set(self._in_flight)
        cancelled = 0
        if running and graceful:
            _, pending = await asyncio.wait(running, timeout=self.drain_timeout)
        else:
            pending = running
        for task in pending:
            task.cancel()
            cancelled += 1
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        for timer in self._timers.values():  # after the drain: reconciles above may add some
            timer.cancel()
        # Nothing survives a stop: the next run lists every object again and rebuilds all of it.
        self._ready = asyncio.Queue()
        self._dirty.clear()
        self._active.clear()
        self._timers.clear()
        self._throttled.clear()
        self._failures.clear()
        self._last_error.clear()
        self._in_flight.clear()
        self._slots = asyncio.Semaphore(self.workers)
        self._running = self._stopping = False  # keys enqueued from now on wait for the next run
        log.info(
            "controller stopped controller=%s drained=%d cancelled=%d seconds=%.3f",
            self.name,
            len(running) - cancelled,
            cancelled,
            time.monotonic() - began,
        )
