"""Garbage collection and namespace finalization for the embedded API server.

Kubernetes semantics, done by one background task reacting to the store's events:
- background propagation: an object whose owners (ownerReferences) are all gone is deleted;
- foreground: an owner marked with the `foregroundDeletion` finalizer has its dependents deleted,
  then loses the finalizer (and so goes);
- orphan: dependents of an owner with the `orphan` finalizer lose their reference to it first;
- a namespace being deleted (finalizer `kubernetes`) is emptied, then goes.
A periodic sweep repeats the same decisions so nothing waits on a missed event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from cdi.kubeapi.errors import ApiError, NotFound
from cdi.kubeapi.registry import Registry
from cdi.kubeapi.store import Store, Subscription

log = logging.getLogger(__name__)

Obj = dict[str, Any]
FOREGROUND = "foregroundDeletion"
ORPHAN = "orphan"
NAMESPACE_FINALIZER = "kubernetes"
SWEEP_SECONDS = 10.0  # events do the work; the sweep only catches what was missed


class GarbageCollector:
    def __init__(self, store: Store, registry: Registry) -> None:
        self.store = store
        self.registry = registry
        self._sub: Subscription | None = None

    def _resource_for(self, api_version: str, kind: str) -> tuple[str, bool] | None:
        group = api_version.rpartition("/")[0] if "/" in api_version else ""
        for rt in self.registry.all():
            if rt.group == group and rt.kind == kind:
                return rt.key, rt.namespaced
        return None

    def _owner_exists(self, ref: Obj, namespace: str) -> bool:
        found = self._resource_for(str(ref.get("apiVersion", "")), str(ref.get("kind", "")))
        if found is None:
            return False
        key, namespaced = found
        try:
            owner = self.store.get(key, namespace if namespaced else "", str(ref.get("name", "")))
        except NotFound:
            return False
        return bool(owner["metadata"].get("uid") == ref.get("uid"))

    def _delete(self, resource: str, namespace: str, name: str) -> None:
        with contextlib.suppress(NotFound):
            self.store.delete(resource, namespace, name)

    def _drop_finalizer(self, resource: str, namespace: str, name: str, finalizer: str) -> None:
        def mutate(obj: Obj) -> Obj:
            obj["metadata"]["finalizers"] = [
                f for f in obj["metadata"].get("finalizers") or [] if f != finalizer
            ]
            return obj

        with contextlib.suppress(NotFound):
            self.store.modify(resource, namespace, name, mutate, status_subresource=False)

    # --- decisions ---------------------------------------------------------------------------
    def collect_orphans_of(self, owner_uid: str) -> None:
        """Background propagation: delete dependents none of whose owners still exist."""
        for resource, dep in self.store.dependents(owner_uid):
            md = dep["metadata"]
            ns = md.get("namespace", "")
            if not any(self._owner_exists(ref, ns) for ref in md.get("ownerReferences") or []):
                log.info("gc delete %s %s/%s owner=%s", resource, ns, md["name"], owner_uid)
                self._delete(resource, ns, md["name"])

    def finalize(self, resource: str, obj: Obj) -> None:
        md = obj["metadata"]
        if not md.get("deletionTimestamp"):
            return
        finalizers = md.get("finalizers") or []
        ns, name, uid = md.get("namespace", ""), md["name"], md.get("uid", "")
        if ORPHAN in finalizers:
            for dep_resource, dep in self.store.dependents(uid):
                dmd = dep["metadata"]

                def unown(o: Obj) -> Obj:
                    refs = [
                        r for r in o["metadata"].get("ownerReferences") or [] if r.get("uid") != uid
                    ]
                    o["metadata"]["ownerReferences"] = refs
                    return o

                with contextlib.suppress(NotFound):
                    self.store.modify(
                        dep_resource,
                        dmd.get("namespace", ""),
                        dmd["name"],
                        unown,
                        status_subresource=False,
                    )
            self._drop_finalizer(resource, ns, name, ORPHAN)
        if FOREGROUND in finalizers:
            dependents = self.store.dependents(uid)
            for dep_resource, dep in dependents:
                dmd = dep["metadata"]
                if not dmd.get("deletionTimestamp"):
                    self._delete(dep_resource, dmd.get("namespace", ""), dmd["name"])
            if not self.store.dependents(uid):
                self._drop_finalizer(resource, ns, name, FOREGROUND)
        if resource == "namespaces" and NAMESPACE_FINALIZER in finalizers:
            keys = self.store.keys(namespace=name)
            for key in keys:
                self._delete(key.resource, key.namespace, key.name)
            if not self.store.keys(namespace=name):
                self._drop_finalizer(resource, "", name, NAMESPACE_FINALIZER)

    def sweep(self) -> None:
        """Everything the event handler would do, for every object: the safety net.

        One list per resource type rather than one read per object: the sweep must stay cheap
        next to the requests it shares the store with."""
        objects: list[tuple[str, Obj]] = []
        for key in {rt.key for rt in self.registry.all()}:
            objects.extend((key, obj) for obj in self.store.list(key).items)
        uids = {obj["metadata"].get("uid", "") for _, obj in objects}
        for resource, obj in objects:
            md = obj["metadata"]
            if md.get("deletionTimestamp"):
                self.finalize(resource, obj)
            refs = md.get("ownerReferences") or []
            if refs and not any(r.get("uid") in uids for r in refs):
                ns = md.get("namespace", "")
                if not any(self._owner_exists(r, ns) for r in refs):
                    self._delete(resource, ns, md["name"])

    # --- the task ----------------------------------------------------------------------------
    def wake(self) -> None:
        """Make `run` notice `stop` now (it may be waiting for an event)."""
        if self._sub is not None:
            self._sub.close()

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop` is set (then call `wake`). Never cancel it instead: a step in progress
        runs in a thread that cancellation would leave using a store about to be closed."""
        sub = self._sub = self.store.subscribe()
        next_sweep = 0.0
        loop = asyncio.get_running_loop()
        try:
            while not stop.is_set():
                if loop.time() >= next_sweep:
                    await self._safely(self.sweep)
                    next_sweep = loop.time() + SWEEP_SECONDS
                try:
                    event = await asyncio.wait_for(sub.get(), timeout=SWEEP_SECONDS)
                except TimeoutError:
                    continue
                if event is None:
                    if stop.is_set():
                        break
                    sub = self._sub = self.store.subscribe()
                    continue
                obj = event.object
                if event.type == "DELETED":
                    uid = obj["metadata"].get("uid", "")
                    await self._safely(lambda uid=uid: self.collect_orphans_of(uid))
                    # An owner or namespace waiting on this deletion may now be done.
                    for ref in obj["metadata"].get("ownerReferences") or []:
                        await self._safely(lambda ref=ref, o=obj: self._recheck_owner(ref, o))
                    if ns := obj["metadata"].get("namespace"):
                        await self._safely(lambda ns=ns: self._recheck("namespaces", "", ns))
                elif obj["metadata"].get("deletionTimestamp"):
                    await self._safely(lambda r=event.resource, o=obj: self.finalize(r, o))
        finally:
            sub.close()

    def _recheck(self, resource: str, namespace: str, name: str) -> None:
        with contextlib.suppress(NotFound):
            self.finalize(resource, self.store.get(resource, namespace, name))

    def _recheck_owner(self, ref: Obj, dependent: Obj) -> None:
        found = self._resource_for(str(ref.get("apiVersion", "")), str(ref.get("kind", "")))
        if found is not None:
            key, namespaced = found
            ns = dependent["metadata"].get("namespace", "") if namespaced else ""
            self._recheck(key, ns, str(ref.get("name", "")))

    async def _safely(self, work: Any) -> None:
        try:
            await asyncio.to_thread(work)
        except ApiError as err:
            log.warning("gc step failed: %s", err)
        except Exception:
            log.exception("gc step failed")
