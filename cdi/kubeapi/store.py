"""The embedded API server's object store: Kubernetes objects as JSON rows in one SQLite file.

Owns what etcd plus the generic registry own on a real cluster: object identity (uid, name,
generateName), the one global, strictly increasing resourceVersion, optimistic concurrency
(409 Conflict on a stale resourceVersion), system metadata (creationTimestamp, generation,
deletionTimestamp), the split between the main resource and its `status` subresource, graceful
deletion with finalizers, consistent paginated lists, and the history watches resume from.

    objects(resource, namespace, name) -> rv, JSON    the current state
    events(rv) -> type, key, JSON, previous JSON     one row per write, the last N kept
    meta(key) -> integer                             `rv` and `compacted_rv`

Every write takes the writer lock, runs in one SQLite transaction that bumps `rv`, updates the
object and appends its event, then (still under the lock, so in rv order) tells the listeners.
Reads use a per-thread connection in its own read transaction, so a list sees one snapshot (WAL)
and never waits for writers. Everything is synchronous and thread-safe: the async HTTP layer calls
it through `asyncio.to_thread` and gets watch events through `Store.subscribe()`, an async
iterator fed from the writer thread without polling.

Consistent lists: a page of a paginated list is served *at the first page's resourceVersion*,
as etcd does. The state at an older rv is today's state with every later write undone, which the
events table allows because each event keeps the object as it was before the write. When those
events are compacted away the continue token expires (410 Expired), as on a real cluster.

Resources are keys (`pods`, `datavolumes.cdi.kubevirt.io`, see `errors.resource_key`): the store
does not know kinds, versions, scopes or schemas. Validation, defaulting, admission, RBAC and
which resources have a status subresource are the callers' business; the store trusts its input
to be a JSON object with `metadata`. It does no HTTP and no garbage collection (it only offers
`dependents()` so that the collector need not scan).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import secrets
import sqlite3
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, NamedTuple, Self

from cdi.kubeapi.errors import (
    AlreadyExists,
    BadRequest,
    Conflict,
    Gone,
    Invalid,
    NotFound,
    field_forbidden,
    field_immutable,
    field_required,
)
from cdi.kubeapi.selectors import FieldSelector, LabelSelector

log = logging.getLogger(__name__)

Obj = dict[str, Any]
# `Store.list` shadows the builtin in the class body, so annotations there use these names.
Objs = list[Obj]
Events = list["WatchEvent"]
_Keys = list["ObjectKey"]
_Owned = list[tuple[str, Obj]]
_Args = list[Any]
_Listeners = list["Listener"]
_Connections = list[sqlite3.Connection]
EventType = Literal["ADDED", "MODIFIED", "DELETED"]
Clock = Callable[[], datetime]

#: Events kept for watches to resume from, unless the caller says otherwise.
DEFAULT_EVENT_RETENTION: Final = 10_000
#: Kubernetes' generateName suffix: 5 characters from an alphabet without vowels or look-alikes.
_SUFFIX_ALPHABET: Final = "bcdfghjklmnpqrstvwxz2456789"
_SUFFIX_LENGTH: Final = 5
_MAX_GENERATED_PREFIX: Final = 63 - _SUFFIX_LENGTH
_GENERATE_ATTEMPTS: Final = 8
#: Live events a slow watcher may have queued before it is cut off (it resumes from its rv).
DEFAULT_WATCH_QUEUE: Final = 10_000

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS objects (
    resource  TEXT NOT NULL,
    namespace TEXT NOT NULL,
    name      TEXT NOT NULL,
    rv        INTEGER NOT NULL,
    data      TEXT NOT NULL,
    PRIMARY KEY (resource, namespace, name)
);
CREATE TABLE IF NOT EXISTS events (
    rv        INTEGER PRIMARY KEY,
    type      TEXT NOT NULL,
    resource  TEXT NOT NULL,
    namespace TEXT NOT NULL,
    name      TEXT NOT NULL,
    data      TEXT NOT NULL,
    prev      TEXT
);
CREATE INDEX IF NOT EXISTS events_by_resource ON events (resource, rv);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('rv', 0), ('compacted_rv', 0);
"""


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _copy(obj: Obj) -> Obj:
    """A private deep copy of a JSON object (faster than copy.deepcopy for JSON data)."""
    copied: Obj = json.loads(_dumps(obj))
    return copied


def _utcnow() -> datetime:
    return datetime.now(UTC)


def format_time(moment: datetime) -> str:
    """RFC 3339 in UTC with whole seconds, as `metav1.Time` serializes."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(slots=True)
class _Transaction:
    """What one write transaction has done so far; applied to the store only on commit."""

    rv: int
    compacted: int | None = None
    events: list[WatchEvent] = field(default_factory=list)


class ObjectKey(NamedTuple):
    resource: str
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One write as a watch sees it. `object` is shared between subscribers: do not change it.

    `prev` is the object before the write (None for ADDED); watches with selectors need it to
    turn a label change into ADDED or DELETED, and consistent lists to undo the write.
    """

    type: EventType
    rv: int
    resource: str
    namespace: str
    name: str
    object: Obj
    prev: Obj | None = None

    def to_wire(self) -> Obj:
        """The `{"type", "object"}` frame of a watch stream."""
        return {"type": self.type, "object": self.object}


@dataclass(frozen=True, slots=True)
class ListResult:
    items: list[Obj]
    #: The list's resourceVersion (decimal string): the snapshot every page is served at.
    resource_version: str
    #: Opaque token for the next page, or None when this page is the last.
    continue_token: str | None = None


@dataclass(frozen=True, slots=True)
class DeleteResult:
    #: The object as deleted (DELETED event payload) or as marked for deletion.
    object: Obj
    #: True when the object is gone; False when it waits on finalizers or a grace period.
    deleted: bool


def select_event(
    event: WatchEvent, labels: LabelSelector, fields: FieldSelector
) -> WatchEvent | None:
    """What a watcher with selectors sees of `event`, as kube-apiserver's watch cache decides.

    An object that starts matching arrives as ADDED, one that stops matching leaves as DELETED
    (with its old content and the event's rv), and events for objects never matching are None.
    """
    if labels.empty and fields.empty:
        return event

    def passes(obj: Obj | None) -> bool:
        return obj is not None and labels.matches_object(obj) and fields.matches(obj)

    now = passes(event.object) if event.type != "DELETED" else False
    before = passes(event.prev) if event.type != "DELETED" else passes(event.object)
    if event.type == "DELETED":
        return event if before else None
    if now and before:
        return event
    if now:
        return replace(event, type="ADDED")
    if before and event.prev is not None:
        gone = json.loads(_dumps(event.prev))
        gone.setdefault("metadata", {})["resourceVersion"] = str(event.rv)
        return replace(event, type="DELETED", object=gone)
    return None


def _encode_continue(rv: int, namespace: str, name: str) -> str:
    raw = _dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": [namespace, name]})
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_continue(token: str) -> tuple[int, str, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        rv, (namespace, name) = data["rv"], data["start"]
        if data.get("v") != "meta.k8s.io/v1" or not isinstance(rv, int) or rv < 0:
            raise ValueError("unknown continue token version")
        if not isinstance(namespace, str) or not isinstance(name, str):
            raise ValueError("bad start key")
    except (binascii.Error, ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
        raise BadRequest(f"continue key is not valid: {exc}") from exc
    return rv, namespace, name


def _metadata(obj: Obj) -> Obj:
    md = obj.get("metadata")
    if md is None:
        md = obj["metadata"] = {}
    if not isinstance(md, dict):
        raise BadRequest("metadata must be an object")
    return md


def _spec_part(obj: Obj, *, with_status: bool) -> Obj:
    # What `generation` counts: everything but metadata (and status when it has its own
    # subresource). apiVersion/kind are left out since the same object may be written as
    # another version of its group.
    skip = {"metadata", "apiVersion", "kind"} | ({"status"} if not with_status else set())
    return {k: v for k, v in obj.items() if k not in skip}


def _kind_of(obj: Mapping[str, Any], resource: str) -> tuple[str, str]:
    """(kind, group) for an Invalid message: the object's kind if it says, else the resource."""
    group = resource.partition(".")[2]
    kind = obj.get("kind")
    return (kind if isinstance(kind, str) and kind else resource.partition(".")[0]), group


class Listener:
    """A registered callback; see `Store.add_listener`. `on_close` runs when the store closes."""

    def __init__(
        self,
        callback: Callable[[WatchEvent], None],
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.callback = callback
        self.on_close = on_close


class Subscription:
    """A watch's live feed: an async iterator of `WatchEvent`s in resourceVersion order.

    Made by `Store.subscribe()`, which fills it with the backlog since the requested rv and then
    registers it, both under the writer lock, so there is no gap and no duplicate between history
    and live events. The store's writer thread hands events to the subscriber's event loop with
    `call_soon_threadsafe`; selectors are applied on the loop. A subscriber that falls
    `max_queue` events behind is cut off (`overflowed` is True, iteration ends): like a real API
    server closing a slow watch, the client resumes from the last rv it saw.
    """

    def __init__(
        self,
        store: Store,
        *,
        resource: str | None,
        namespace: str | None,
        labels: LabelSelector,
        fields: FieldSelector,
        loop: asyncio.AbstractEventLoop,
        start_rv: int,
        max_queue: int,
    ) -> None:
        self._store = store
        self.resource = resource
        self.namespace = namespace
        self.labels = labels
        self.fields = fields
        self._loop = loop
        #: The rv the watch starts after; events delivered all have a larger rv.
        self.start_rv = start_rv
        self._max_queue = max_queue
        self._queue: deque[WatchEvent] = deque()
        self._wakeup = asyncio.Event()
        self._listener = Listener(self._from_writer, self._store_closed)
        self.closed = False
        self.overflowed = False
        #: The rv of the last event handed out (or start_rv), where a client would resume.
        self.last_rv = start_rv
        self._seen_rv = start_rv

    def _wants(self, event: WatchEvent) -> bool:
        return (self.resource is None or event.resource == self.resource) and (
            self.namespace is None or event.namespace == self.namespace
        )

    def _accept(self, event: WatchEvent) -> bool:
        """Queue `event` if this watch wants it; False when the queue overflowed instead."""
        # A client may resume from an rv this store has not reached (its database was reset);
        # it has not seen those events, but it believes it has, so they are not sent.
        if self.closed or event.rv <= self.start_rv or not self._wants(event):
            return True
        self._seen_rv = max(self._seen_rv, event.rv)
        selected = select_event(event, self.labels, self.fields)
        if selected is None:
            return True
        if len(self._queue) >= self._max_queue:
            return False
        self._queue.append(selected)
        return True

    @property
    def bookmark_rv(self) -> int:
        """The rv a BOOKMARK may carry now: every event up to it is handed out or filtered out.

        For a watch with selectors this runs ahead of `last_rv`, which lets a client resume
        after a long quiet spell without replaying (or losing) history.
        """
        return self._seen_rv if not self._queue else self.last_rv

    def _push(self, event: WatchEvent) -> None:
        """Runs on the subscriber's loop, one call per event, in rv order."""
        if not self._accept(event):
            self.overflowed = True
            log.warning(
                "watch cut off: too far behind resource=%s queued=%d",
                self.resource,
                self._max_queue,
            )
            self._queue.clear()
            self._stop()
            return
        self._wakeup.set()

    def _store_closed(self) -> None:
        """Runs in the thread closing the store: end the iteration on the subscriber's loop."""
        try:
            self._loop.call_soon_threadsafe(self._stop)
        except RuntimeError:  # that loop is already closed
            self.closed = True

    def _from_writer(self, event: WatchEvent) -> None:
        """The listener callback: runs in the writer's thread with the writer lock held."""
        if self.closed or not self._wants(event):
            return
        try:
            self._loop.call_soon_threadsafe(self._push, event)
        except RuntimeError:  # the subscriber's loop is closed: nobody is listening any more
            self.closed = True
            self._store.remove_listener(self._listener)

    def _stop(self) -> None:
        self.closed = True
        self._store.remove_listener(self._listener)
        self._wakeup.set()

    def close(self) -> None:
        """Stop receiving; pending events are dropped and iteration ends."""
        self._queue.clear()
        self._stop()

    async def get(self) -> WatchEvent | None:
        """The next event, waiting as long as it takes; None once the subscription has ended."""
        while True:
            if self._queue:
                event = self._queue.popleft()
                self.last_rv = event.rv
                return event
            if self.closed:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> WatchEvent:
        event = await self.get()
        if event is None:
            raise StopAsyncIteration
        return event

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Store:
    """The SQLite object store. Thread-safe; one instance per database file per process."""

    def __init__(
        self,
        path: str | Path,
        *,
        event_retention: int = DEFAULT_EVENT_RETENTION,
        clock: Clock = _utcnow,
    ) -> None:
        if event_retention < 1:
            raise ValueError("event_retention must be at least 1")
        self.path = Path(path)
        self.event_retention = event_retention
        self._clock = clock
        self._lock = threading.RLock()
        self._listeners: _Listeners = []
        self._readers: _Connections = []
        self._readers_lock = threading.Lock()
        self._local = threading.local()
        self._closed = False
        # The open write transaction's state; only touched with the lock held.
        self._tx = _Transaction(0)
        # Compaction runs in batches (a tenth of the retention) so that it is not every write.
        self._compact_slack = event_retention // 10
        self._writer = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            self._writer.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a crash of the process loses nothing; a power cut may lose the
            # last transactions, never consistency. kube-apiserver makes the same trade with
            # etcd's batching.
            self._writer.execute("PRAGMA synchronous=NORMAL")
            self._writer.execute("PRAGMA busy_timeout=10000")
            self._writer.executescript(_SCHEMA)
            self._rv = self._meta(self._writer, "rv")
            self._compacted_rv = self._meta(self._writer, "compacted_rv")
            self._tx = _Transaction(self._rv)
        except BaseException:
            self._writer.close()
            raise
        log.info(
            "store opened path=%s rv=%d compacted_rv=%d", self.path, self._rv, self._compacted_rv
        )

    # --- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            listeners, self._listeners = self._listeners, []
            for listener in listeners:
                if listener.on_close is not None:
                    listener.on_close()
            with self._readers_lock:
                for conn in self._readers:
                    conn.close()
                self._readers.clear()
            self._writer.close()
        log.info("store closed path=%s rv=%d", self.path, self._rv)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def resource_version(self) -> str:
        """The store's current resourceVersion (of the last write), as a decimal string."""
        return str(self._rv)

    # --- low-level helpers ----------------------------------------------------------------

    @staticmethod
    def _meta(conn: sqlite3.Connection, key: str) -> int:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the store is closed")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction on this thread's own connection: one consistent snapshot."""
        self._check_open()
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA query_only=ON")
            conn.execute("PRAGMA busy_timeout=10000")
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; the caller holds the lock.

        On commit, the store's rv advances and the transaction's events go to the listeners
        (still under the lock, hence in rv order); on any error everything is rolled back and
        nobody hears of it.
        """
        self._check_open()
        conn = self._writer
        tx = self._tx = _Transaction(self._rv)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._tx = _Transaction(self._rv)
            raise
        self._rv = tx.rv
        if tx.compacted is not None:
            self._compacted_rv = tx.compacted
        for event in tx.events:
            self._publish(event)

    def _row(self, conn: sqlite3.Connection, key: ObjectKey) -> Obj | None:
        row = conn.execute(
            "SELECT data FROM objects WHERE resource = ? AND namespace = ? AND name = ?", key
        ).fetchone()
        return json.loads(row[0]) if row else None

    def _commit_event(
        self,
        conn: sqlite3.Connection,
        kind: EventType,
        key: ObjectKey,
        obj: Obj,
        prev: Obj | None,
    ) -> WatchEvent:
        """Write `obj` (already carrying `_next_rv()`) and its event inside the transaction."""
        tx = self._tx
        rv = tx.rv = tx.rv + 1
        data = _dumps(obj)
        if kind == "DELETED":
            conn.execute(
                "DELETE FROM objects WHERE resource = ? AND namespace = ? AND name = ?", key
            )
        else:
            conn.execute(
                "INSERT INTO objects (resource, namespace, name, rv, data) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (resource, namespace, name) DO UPDATE"
                " SET rv = excluded.rv, data = excluded.data",
                (*key, rv, data),
            )
        conn.execute(
            "INSERT INTO events (rv, type, resource, namespace, name, data, prev)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (rv, kind, *key, data, None if prev is None else _dumps(prev)),
        )
        conn.execute("UPDATE meta SET value = ? WHERE key = 'rv'", (rv,))
        compacted = tx.compacted or self._compacted_rv
        if rv - compacted > self.event_retention + self._compact_slack:
            compacted = rv - self.event_retention
            conn.execute("DELETE FROM events WHERE rv <= ?", (compacted,))
            conn.execute("UPDATE meta SET value = ? WHERE key = 'compacted_rv'", (compacted,))
            tx.compacted = compacted
        event = WatchEvent(kind, rv, key.resource, key.namespace, key.name, obj, prev)
        tx.events.append(event)
        return event

    def _publish(self, event: WatchEvent) -> None:
        """After commit, with the lock held: tell every listener, in rv order."""
        for listener in list(self._listeners):
            try:
                listener.callback(event)
            except Exception:  # one broken listener must not stop the others or the write
                log.exception("watch listener failed rv=%d", event.rv)

    def _next_rv(self) -> str:
        """The rv the next write of the open transaction will get."""
        return str(self._tx.rv + 1)

    # --- reads ------------------------------------------------------------------------------

    def get(self, resource: str, namespace: str, name: str) -> Obj:
        """The current object; NotFound if there is none. The caller owns the returned dict."""
        with self._read() as conn:
            obj = self._row(conn, ObjectKey(resource, namespace, name))
        if obj is None:
            raise NotFound.of(resource, name)
        return obj

    def list(
        self,
        resource: str,
        namespace: str | None = None,
        *,
        label_selector: LabelSelector | str | None = None,
        field_selector: FieldSelector | str | None = None,
        limit: int | None = None,
        continue_token: str | None = None,
    ) -> ListResult:
        """Objects of `resource` (in `namespace`, or all namespaces when None), sorted by key.

        With `limit`, at most that many matching items and a continue token if more may follow;
        the next call with the token returns the next page *as of the first page's rv*, whatever
        was written in between. A token older than the kept history is 410 Expired; a garbled
        one is 400.
        """
        labels = (
            label_selector
            if isinstance(label_selector, LabelSelector)
            else LabelSelector.parse(label_selector)
        )
        fields = (
            field_selector
            if isinstance(field_selector, FieldSelector)
            else FieldSelector.parse(field_selector)
        )
        if limit is not None and limit <= 0:
            limit = None  # Kubernetes treats limit=0 as "no limit"
        start: tuple[str, str] | None = None
        at_rv: int | None = None
        if continue_token:
            at_rv, start_ns, start_name = _decode_continue(continue_token)
            start = (start_ns, start_name)
        # metadata.namespace / metadata.name equality selectors narrow the SQL scan.
        exact_ns = fields.exact("metadata.namespace")
        if exact_ns is not None:
            if namespace is not None and namespace != exact_ns:
                return ListResult([], self.resource_version)
            namespace = exact_ns
        exact_name = fields.exact("metadata.name")

        with self._read() as conn:
            current = self._meta(conn, "rv")
            if at_rv is None:
                at_rv = current
            elif at_rv < self._meta(conn, "compacted_rv"):
                raise Gone.continue_expired()
            elif at_rv > current:
                raise BadRequest("continue key is not valid: resourceVersion is in the future")
            items, last, more = self._page(
                conn,
                resource=resource,
                namespace=namespace,
                name=exact_name,
                at_rv=at_rv,
                start=start,
                labels=labels,
                fields=fields,
                limit=limit,
            )
        token = _encode_continue(at_rv, *last) if more and last is not None else None
        return ListResult(items, str(at_rv), token)

    def _page(
        self,
        conn: sqlite3.Connection,
        *,
        resource: str,
        namespace: str | None,
        name: str | None,
        at_rv: int,
        start: tuple[str, str] | None,
        labels: LabelSelector,
        fields: FieldSelector,
        limit: int | None,
    ) -> tuple[Objs, tuple[str, str] | None, bool]:
        where = ["resource = ?"]
        args: _Args = [resource]
        if namespace is not None:
            where.append("namespace = ?")
            args.append(namespace)
        if name is not None:
            where.append("name = ?")
            args.append(name)
        # Keys written after `at_rv` are served as they were then: the `prev` of their first
        # later event (None: did not exist yet).
        then: dict[tuple[str, str], str | None] = {}
        if at_rv < self._meta(conn, "rv"):
            for ns, nm, prev in conn.execute(
                f"SELECT namespace, name, prev FROM events WHERE {' AND '.join(where)}"  # noqa: S608 - only fixed column names are interpolated
                " AND rv > ? ORDER BY rv",
                (*args, at_rv),
            ):
                then.setdefault((ns, nm), prev)
        if start is not None:
            where.append("(namespace, name) > (?, ?)")
            args.extend(start)
        rows: Iterable[tuple[str, str, str]] = conn.execute(
            f"SELECT namespace, name, data FROM objects WHERE {' AND '.join(where)}"  # noqa: S608 - only fixed column names are interpolated
            " ORDER BY namespace, name",
            args,
        )
        old = sorted(
            (key, data)
            for key, data in then.items()
            if data is not None and (start is None or key > start)
        )
        current = (((ns, nm), data) for ns, nm, data in rows if (ns, nm) not in then)
        items: Objs = []
        last: tuple[str, str] | None = None
        for key, data in _merge_sorted(current, old):
            if limit is not None and len(items) >= limit:
                return items, last, True
            obj = json.loads(data)
            if labels.matches_object(obj) and fields.matches(obj):
                items.append(obj)
                last = key
        return items, last, False

    def keys(self, *, namespace: str | None = None) -> _Keys:
        """Every object's key (of every resource), e.g. to empty a namespace being deleted."""
        with self._read() as conn:
            if namespace is None:
                rows = conn.execute(
                    "SELECT resource, namespace, name FROM objects ORDER BY 1, 2, 3"
                )
            else:
                rows = conn.execute(
                    "SELECT resource, namespace, name FROM objects WHERE namespace = ?"
                    " ORDER BY 1, 2, 3",
                    (namespace,),
                )
            return [ObjectKey(*row) for row in rows]

    def dependents(self, owner_uid: str) -> _Owned:
        """(resource, object) of every object with an ownerReference to `owner_uid`."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT resource, data FROM objects WHERE EXISTS ("
                " SELECT 1 FROM json_each(objects.data, '$.metadata.ownerReferences')"
                " WHERE json_extract(json_each.value, '$.uid') = ?)",
                (owner_uid,),
            ).fetchall()
        return [(resource, json.loads(data)) for resource, data in rows]

    def events_since(
        self, rv: int | str, resource: str | None = None, namespace: str | None = None
    ) -> Events:
        """Every kept event after `rv`, oldest first; Gone (410 Expired) if some were compacted."""
        since = _parse_rv(rv)
        with self._read() as conn:
            return self._events_since(conn, since, resource, namespace)

    def _events_since(
        self, conn: sqlite3.Connection, since: int, resource: str | None, namespace: str | None
    ) -> Events:
        compacted = self._meta(conn, "compacted_rv")
        if since < compacted:
            raise Gone.too_old(since, compacted + 1)
        where: list[str] = ["rv > ?"]
        args: _Args = [since]
        if resource is not None:
            where.append("resource = ?")
            args.append(resource)
        if namespace is not None:
            where.append("namespace = ?")
            args.append(namespace)
        rows = conn.execute(
            "SELECT rv, type, resource, namespace, name, data, prev FROM events"  # noqa: S608 - only fixed column names are interpolated
            f" WHERE {' AND '.join(where)} ORDER BY rv",
            args,
        )
        return [
            WatchEvent(kind, erv, res, ns, nm, json.loads(data), json.loads(prev) if prev else None)
            for erv, kind, res, ns, nm, data, prev in rows
        ]

    # --- watch ------------------------------------------------------------------------------

    def add_listener(self, callback: Callable[[WatchEvent], None]) -> Listener:
        """Call `callback` with every event, in rv order, right after its write commits.

        It runs in the writing thread with the writer lock held: it must be quick and must not
        write to the store (hand the event to a queue or loop instead, as `Subscription` does).
        """
        listener = Listener(callback)
        with self._lock:
            self._listeners.append(listener)
        return listener

    def remove_listener(self, listener: Listener) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def subscribe(
        self,
        resource: str | None = None,
        namespace: str | None = None,
        *,
        since_rv: int | str | None = None,
        label_selector: LabelSelector | str | None = None,
        field_selector: FieldSelector | str | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        max_queue: int = DEFAULT_WATCH_QUEUE,
    ) -> Subscription:
        """A watch from `since_rv` (exclusive; None: from now) as an async iterator.

        Events already in history after `since_rv` come first, then live ones, without gap or
        duplicate. Raises Gone (410 Expired) when `since_rv` is older than the kept history. The
        subscription delivers on `loop` (default: the running loop, so call it from async code
        or pass the loop when calling from a worker thread).
        """
        labels = (
            label_selector
            if isinstance(label_selector, LabelSelector)
            else LabelSelector.parse(label_selector)
        )
        fields = (
            field_selector
            if isinstance(field_selector, FieldSelector)
            else FieldSelector.parse(field_selector)
        )
        target_loop = loop or asyncio.get_running_loop()
        with self._lock:
            self._check_open()
            start = self._rv if since_rv is None else _parse_rv(since_rv)
            backlog = (
                self._events_since(self._writer, start, resource, namespace)
                if start < self._rv
                else []
            )
            sub = Subscription(
                self,
                resource=resource,
                namespace=namespace,
                labels=labels,
                fields=fields,
                loop=target_loop,
                start_rv=start,
                max_queue=max(max_queue, len(backlog) + 1),
            )
            # The backlog goes straight into the queue: nobody awaits it yet, and setting the
            # asyncio.Event from this (maybe foreign) thread would not be safe.
            for event in backlog:
                sub._accept(event)
            self._listeners.append(sub._listener)
        return sub

    # --- writes -----------------------------------------------------------------------------

    def create(self, resource: str, obj: Obj, *, status_subresource: bool = True) -> Obj:
        """Store a new object and return it as stored (the caller's dict is not changed).

        Sets uid, creationTimestamp, generation 1 and resourceVersion; clears deletion fields;
        `generateName` gives a free name with a 5-character suffix. With `status_subresource`
        (the default, true of almost every kind) the `status` sent is dropped, as the real
        server's create strategies do. AlreadyExists when the name is taken.
        """
        new: Obj = json.loads(_dumps(obj))
        md = _metadata(new)
        namespace = str(md.get("namespace") or "")
        name = md.get("name") or ""
        generate = md.get("generateName") or ""
        if not name and not generate:
            kind, group = _kind_of(new, resource)
            raise Invalid.of(
                kind,
                "",
                [field_required("metadata.name", "name or generateName is required")],
                group=group,
            )
        for system_field in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds"):
            md.pop(system_field, None)
        md.pop("selfLink", None)
        md["uid"] = str(uuid.uuid4())
        md["creationTimestamp"] = format_time(self._clock())
        md["generation"] = 1
        if status_subresource:
            new.pop("status", None)
        with self._lock:
            attempts = _GENERATE_ATTEMPTS if not name else 1
            for _ in range(attempts):
                candidate = name or _generate_name(str(generate))
                key = ObjectKey(resource, namespace, candidate)
                with self._write() as conn:
                    if self._row(conn, key) is not None:
                        if name:
                            raise AlreadyExists.of(resource, name)
                        continue
                    md["name"] = candidate
                    md["resourceVersion"] = self._next_rv()
                    self._commit_event(conn, "ADDED", key, new, None)
                return _copy(new)
        raise AlreadyExists(
            f'{resource} "{generate}" already exists, the server was not able to generate a '
            "unique name for the object",
        )

    def update(
        self,
        resource: str,
        obj: Obj,
        *,
        subresource: Literal["status"] | None = None,
        expect_rv: str | None = None,
        status_subresource: bool = True,
    ) -> Obj:
        """Replace an object (PUT) and return it as stored.

        Optimistic concurrency: when `expect_rv` or the object's `metadata.resourceVersion` is
        set and is not the stored one, Conflict; when neither is, the update is unconditional.
        Main resource: keeps the stored `status` (if `status_subresource`), uid, creation and
        deletion timestamps; bumps `generation` when anything outside metadata/status changed.
        Subresource "status": keeps everything but `status`. Adding finalizers to an object being
        deleted is Invalid; removing its last finalizer deletes it (DELETED event). A write that
        changes nothing is not stored and creates no event, as in Kubernetes.
        """
        md = _metadata(obj)
        key = ObjectKey(resource, str(md.get("namespace") or ""), str(md.get("name") or ""))
        wanted = expect_rv or md.get("resourceVersion") or None
        with self._lock, self._write() as conn:
            current = self._row(conn, key)
            if current is None:
                raise NotFound.of(resource, key.name)
            return self._update_locked(
                conn,
                key,
                current,
                json.loads(_dumps(obj)),
                wanted=str(wanted) if wanted is not None else None,
                subresource=subresource,
                status_subresource=status_subresource,
            )

    def modify(
        self,
        resource: str,
        namespace: str,
        name: str,
        mutate: Callable[[Obj], Obj],
        *,
        subresource: Literal["status"] | None = None,
        status_subresource: bool = True,
    ) -> Obj:
        """Atomic read-modify-write, for PATCH: `mutate(current)` returns the new object.

        `mutate` gets a private copy and runs under the writer lock, so no other write can slip
        in between (no lost update, no retry loop); it must be quick and must not use the store.
        If its result carries a resourceVersion other than the current one (a patch that sets
        it), that is a Conflict, as on a real server. Errors it raises propagate unchanged.
        """
        key = ObjectKey(resource, namespace, name)
        with self._lock, self._write() as conn:
            current = self._row(conn, key)
            if current is None:
                raise NotFound.of(resource, name)
            new = mutate(_copy(current))
            if not isinstance(new, dict):
                raise BadRequest("the patched document is not a JSON object")
            new = _copy(new)
            md = _metadata(new)
            if (md.get("name") or name) != name or (md.get("namespace") or "") != namespace:
                raise BadRequest("the name or namespace of the object cannot be changed by a patch")
            md["name"] = name
            if namespace:
                md["namespace"] = namespace
            wanted = md.get("resourceVersion") or None
            return self._update_locked(
                conn,
                key,
                current,
                new,
                wanted=str(wanted) if wanted is not None else None,
                subresource=subresource,
                status_subresource=status_subresource,
            )

    def _update_locked(
        self,
        conn: sqlite3.Connection,
        key: ObjectKey,
        current: Obj,
        new: Obj,
        *,
        wanted: str | None,
        subresource: Literal["status"] | None,
        status_subresource: bool,
    ) -> Obj:
        """The checks and merge rules of update and modify, inside their write transaction."""
        resource, _, name = key
        cur_md = current["metadata"]
        if wanted is not None and wanted != str(cur_md.get("resourceVersion")):
            raise Conflict.modified(resource, name)

        if subresource == "status":
            result = _copy(current)
            if "status" in new:
                result["status"] = new["status"]
            else:
                result.pop("status", None)
        elif subresource is None:
            result = new
            md = _metadata(result)
            uid = md.get("uid")
            if uid and uid != cur_md.get("uid"):
                kind, group = _kind_of(current, resource)
                raise Invalid.of(kind, name, [field_immutable("metadata.uid", uid)], group=group)
            for kept in ("uid", "creationTimestamp", "deletionTimestamp"):
                if kept in cur_md:
                    md[kept] = cur_md[kept]
                else:
                    md.pop(kept, None)
            if "deletionGracePeriodSeconds" in cur_md:
                md["deletionGracePeriodSeconds"] = cur_md["deletionGracePeriodSeconds"]
            else:
                md.pop("deletionGracePeriodSeconds", None)
            if status_subresource:
                if "status" in current:
                    result["status"] = current["status"]
                else:
                    result.pop("status", None)
            generation = int(cur_md.get("generation") or 1)
            if _spec_part(result, with_status=not status_subresource) != _spec_part(
                current, with_status=not status_subresource
            ):
                generation += 1
            md["generation"] = generation
            if "deletionTimestamp" in cur_md:
                added = [
                    f
                    for f in md.get("finalizers") or []
                    if f not in (cur_md.get("finalizers") or [])
                ]
                if added:
                    kind, group = _kind_of(current, resource)
                    quoted = ", ".join(json.dumps(f) for f in added)
                    raise Invalid.of(
                        kind,
                        name,
                        [
                            field_forbidden(
                                "metadata.finalizers",
                                "no new finalizers can be added if the object is being deleted, "
                                f"found new finalizers []string{{{quoted}}}",
                            )
                        ],
                        group=group,
                    )
        else:
            raise BadRequest(f"unknown subresource {subresource!r}")

        md = result["metadata"]
        md["resourceVersion"] = cur_md.get("resourceVersion")
        if result == current:
            return result  # a no-op write: no new rv, no event
        md["resourceVersion"] = self._next_rv()
        # Kubernetes' rule (ShouldDeleteDuringUpdate): the last finalizer of an object whose
        # deletion is due (grace period 0) is gone, so the object goes too.
        finished = (
            "deletionTimestamp" in md
            and not md.get("finalizers")
            and md.get("deletionGracePeriodSeconds") == 0
        )
        self._commit_event(conn, "DELETED" if finished else "MODIFIED", key, result, current)
        return _copy(result)

    def delete(
        self,
        resource: str,
        namespace: str,
        name: str,
        *,
        precondition_uid: str | None = None,
        precondition_rv: str | None = None,
        grace_period_seconds: int | None = None,
        add_finalizers: Sequence[str] = (),
    ) -> DeleteResult:
        """Delete an object, or mark it for deletion while finalizers (or a grace period) remain.

        With finalizers (after adding `add_finalizers`, which is how the HTTP layer asks for
        `orphan` or `foregroundDeletion`), the object gets `deletionTimestamp` and
        `deletionGracePeriodSeconds: 0` and stays (MODIFIED); it goes once an update empties its
        finalizers. A positive `grace_period_seconds` (pods) marks it the same way with that
        grace; a later delete with 0 removes it. Preconditions that do not hold are Conflict.
        """
        key = ObjectKey(resource, namespace, name)
        with self._lock:
            with self._write() as conn:
                current = self._row(conn, key)
                if current is None:
                    raise NotFound.of(resource, name)
                md = current["metadata"]
                if precondition_uid is not None and precondition_uid != md.get("uid"):
                    raise Conflict.of(
                        resource,
                        name,
                        f"Precondition failed: UID in precondition: {precondition_uid}, "
                        f"UID in object meta: {md.get('uid')}",
                    )
                if precondition_rv is not None and str(precondition_rv) != str(
                    md.get("resourceVersion")
                ):
                    raise Conflict.of(
                        resource,
                        name,
                        f"Precondition failed: ResourceVersion in precondition: "
                        f"{precondition_rv}, ResourceVersion in object meta: "
                        f"{md.get('resourceVersion')}",
                    )
                result = _copy(current)
                rmd = result["metadata"]
                finalizers = list(rmd.get("finalizers") or [])
                finalizers += [f for f in add_finalizers if f not in finalizers]
                deleting = "deletionTimestamp" in rmd
                grace = grace_period_seconds or 0
                if finalizers or (grace > 0 and not deleting):
                    rmd["finalizers"] = finalizers
                    if not finalizers:
                        rmd.pop("finalizers")
                    if not deleting:
                        # First deletion request: Kubernetes bumps generation so that
                        # controllers see the object change meaning.
                        now = self._clock()
                        rmd["deletionTimestamp"] = format_time(now + timedelta(seconds=grace))
                        rmd["deletionGracePeriodSeconds"] = grace
                        rmd["generation"] = int(rmd.get("generation") or 1) + 1
                    elif grace == 0 and rmd.get("deletionGracePeriodSeconds"):
                        rmd["deletionGracePeriodSeconds"] = 0
                    if result == current:
                        return DeleteResult(result, False)
                    rmd["resourceVersion"] = self._next_rv()
                    event = self._commit_event(conn, "MODIFIED", key, result, current)
                else:
                    rmd["resourceVersion"] = self._next_rv()
                    event = self._commit_event(conn, "DELETED", key, result, current)
            return DeleteResult(_copy(event.object), event.type == "DELETED")

    def compact(self) -> int:
        """Drop events beyond the retention now; returns the new compacted rv."""
        with self._lock:
            target = max(self._rv - self.event_retention, self._compacted_rv)
            with self._write() as conn:
                conn.execute("DELETE FROM events WHERE rv <= ?", (target,))
                conn.execute("UPDATE meta SET value = ? WHERE key = 'compacted_rv'", (target,))
                self._tx.compacted = target
            return target


def _parse_rv(rv: int | str) -> int:
    if isinstance(rv, int):
        value = rv
    else:
        try:
            value = int(rv)
        except ValueError:
            raise BadRequest(f'invalid resourceVersion "{rv}": not a decimal number') from None
    if value < 0:
        raise BadRequest(f'invalid resourceVersion "{rv}": negative')
    return value


def _generate_name(prefix: str) -> str:
    suffix = "".join(secrets.choice(_SUFFIX_ALPHABET) for _ in range(_SUFFIX_LENGTH))
    return prefix[:_MAX_GENERATED_PREFIX] + suffix


def _merge_sorted(
    a: Iterable[tuple[tuple[str, str], str]], b: Sequence[tuple[tuple[str, str], str]]
) -> Iterator[tuple[tuple[str, str], str]]:
    """Merge two key-sorted streams; `b` is small (objects changed since the snapshot)."""
    pending = deque(b)
    for item in a:
        while pending and pending[0][0] < item[0]:
            yield pending.popleft()
        yield item
    yield from pending
