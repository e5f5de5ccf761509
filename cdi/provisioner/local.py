"""The local provisioner: PersistentVolumes backed by directories and files under the data dir.

Owns, for the all-in-one server, what a CSI driver plus the external provisioner, snapshotter,
resizer and the PV controller own on a cluster:

* two StorageClasses, created when missing: `local` (the default class, Immediate binding,
  expandable, reclaim Delete) and `local-wffc` (the same with WaitForFirstConsumer); and the
  VolumeSnapshotClass `local-snapshots` (the default one, deletionPolicy Delete);
* binding: each Pending PVC of one of our classes (or of no class, when ours is the default,
  which the PVC then gets, as Kubernetes' retroactive default class assignment does) gets a PV
  named `pvc-<pvc uid>` whose `spec.local.path` is `<root>/volumes/<pv name>`: a directory for
  Filesystem volumes, a sparse file of exactly the requested bytes for Block volumes. PV status
  Bound, PVC `spec.volumeName`, then PVC status `{phase: Bound, capacity, accessModes}`;
* data sources (`cdi.provisioner.sources`): a PVC whose `dataSourceRef`/`dataSource` is a
  VolumeSnapshot of ours (restore) or a Bound PVC on one of our volumes (CSI clone), in the same
  namespace, is bound to a copy of that data (reflink when the file system can,
  `cdi.provisioner.copying`), grown to the request; a source not there yet keeps it Pending
  and is retried, one that cannot fit (smaller request, other volume mode) gives a Warning
  `ProvisioningFailed`. Any other data source (CDI's populators, VolumeImportSource and
  friends) is another component's: such PVCs are left alone;
* snapshots (`cdi.provisioner.snapshots`): VolumeSnapshots of our volumes get a
  VolumeSnapshotContent and a copy of the data under `<root>/snapshots`, removed with them;
* WaitForFirstConsumer: such a PVC is bound only once `volume.kubernetes.io/selected-node` names
  our node (the local node agent sets it when a pod that uses the PVC is waiting, as
  kube-scheduler does on a cluster), or when CDI's `storage.bind.immediate.requested` is set;
  this holds for PVCs with a data source too;
* expansion: a larger request on a Bound PVC grows the PV's capacity, the Block file, and the
  PVC's `status.capacity` (shrinking is refused, as Kubernetes refuses it);
* capacity: a Block volume is a fixed-size file; a Filesystem volume is a directory with no size
  of its own, so the node agent runs workers with RLIMIT_FSIZE set to the capacity (no single
  file can outgrow the volume) and this loop measures each volume's usage (allocated blocks,
  sparse-aware) every `usage_interval` seconds and puts a Warning event `VolumeOverCapacity` on
  the PVC when the directory holds more than its capacity;
* reclaim: when a PV's claim is gone the PV becomes Released; with reclaim policy Delete its data
  is removed and then the PV object is deleted. Data is only ever removed at the path this module
  derives from the PV's name under `<root>/volumes`, never at a path read from the object.

Started by `cdi server` next to the API server, as a task: `run_provisioner(client, root=...,
stop=...)`. It talks to the API only through `cdi.kube.Client` (so it would work against any API
server) and must not touch volumes of other provisioners, PVCs filled by populators, or anything
outside `<root>/volumes` and `<root>/snapshots`. Copies run in a child process (`cp`), so the
event loop keeps serving; the queue, though, waits for them, which keeps a snapshot's copy from
racing the reclaim of its source.

The node agent (`cdi.agent`) finds a PV's data with `volume_path(pv)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cdi.api import VolumeMode, parse_size
from cdi.api import annotations as ann
from cdi.api.groups import (
    PERSISTENT_VOLUME,
    PERSISTENT_VOLUME_CLAIM,
    STORAGE_CLASS,
    VOLUME_SNAPSHOT,
    Resource,
)
from cdi.api.quantity import QuantityError
from cdi.kube.client import Client, WatchEvent
from cdi.kube.errors import AlreadyExists, ApiError, NotFound
from cdi.kube.informer import Snapshot, list_then_watch
from cdi.provisioner import sources
from cdi.provisioner.copying import copy_data, reflink_supported, remove_path
from cdi.provisioner.events import EventRecorder
from cdi.provisioner.snapshots import Snapshotter, is_ready, source_pvc_name
from cdi.provisioner.volumes import (
    COMPONENT,
    MANAGED_BY,
    PROVISIONED_BY,
    PROVISIONER,
    Obj,
    is_block,
    is_ours,
    key_of,
    pv_name_for,
    request_of,
    snapshots_dir,
    volume_path,
    volumes_dir,
)

__all__ = [
    "DEFAULT_CLASS",
    "PROVISIONER",
    "WFFC_CLASS",
    "LocalProvisioner",
    "ProvisionerSettings",
    "disk_usage",
    "pv_name_for",
    "run_provisioner",
    "storage_classes",
    "volume_path",
    "volumes_dir",
]

log = logging.getLogger(__name__)

DEFAULT_CLASS: Final = "local"
WFFC_CLASS: Final = "local-wffc"
DEFAULT_NODE: Final = "cdi-local"
IS_DEFAULT_CLASS: Final = "storageclass.kubernetes.io/is-default-class"
SELECTED_NODE: Final = "volume.kubernetes.io/selected-node"
BIND_COMPLETED: Final = "pv.kubernetes.io/bind-completed"
BOUND_BY_CONTROLLER: Final = "pv.kubernetes.io/bound-by-controller"
STORAGE_PROVISIONER: Final = "volume.kubernetes.io/storage-provisioner"
BETA_STORAGE_PROVISIONER: Final = "volume.beta.kubernetes.io/storage-provisioner"
HOSTNAME_LABEL: Final = "kubernetes.io/hostname"
WAIT_FOR_FIRST_CONSUMER: Final = "WaitForFirstConsumer"


@dataclass(frozen=True, slots=True)
class ProvisionerSettings:
    node_name: str = DEFAULT_NODE
    """The one node of the all-in-one server: PV node affinity and the WFFC selected node."""
    usage_interval: float = 30.0
    """Seconds between usage scans of Filesystem volumes (a `du` of each directory): cheap on
    small trees, and over-capacity is reported, not prevented, so minutes of delay are fine."""
    retry_delay: float = 2.0
    """Seconds before a failed reconcile of one object is tried again."""


def storage_classes() -> list[Obj]:
    """The two classes this provisioner serves, as it creates them."""

    def make(name: str, binding: str, *, default: bool) -> Obj:
        md: Obj = {"name": name, "labels": {MANAGED_BY: COMPONENT}}
        if default:
            md["annotations"] = {IS_DEFAULT_CLASS: "true"}
        return {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": md,
            "provisioner": PROVISIONER,
            "reclaimPolicy": "Delete",
            "volumeBindingMode": binding,
            "allowVolumeExpansion": True,
        }

    return [
        make(DEFAULT_CLASS, "Immediate", default=True),
        make(WFFC_CLASS, WAIT_FOR_FIRST_CONSUMER, default=False),
    ]


# --- file system work (run in a thread) --------------------------------------------------------


def _create_data(path: Path, *, block: bool, size: int) -> None:
    """Make the volume's data: a directory, or a sparse file of exactly `size` bytes. Idempotent;
    a Block file that exists is only ever grown (its data is the user's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not block:
        path.mkdir(mode=0o775, exist_ok=True)
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o660)
    try:
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def _grow_file(path: Path, size: int) -> None:
    with path.open("r+b") as f:
        if os.fstat(f.fileno()).st_size < size:
            os.ftruncate(f.fileno(), size)
            os.fsync(f.fileno())


def disk_usage(path: Path) -> int:
    """Bytes allocated under `path` (st_blocks, so holes in sparse files do not count), not
    following symlinks, as `du -s` does. Files vanishing during the walk are skipped."""
    total = 0
    stack = [path]
    while stack:
        current = stack.pop()
        try:
            entries = list(os.scandir(current))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            total += st.st_blocks * 512
            if stat.S_ISDIR(st.st_mode):
                stack.append(Path(entry.path))
    return total


# --- the loop ------------------------------------------------------------------------------------


class LocalProvisioner:
    """One provisioner: three informers (PVCs, PVs, VolumeSnapshots) feed one queue, handled one
    item at a time so that binding, copying, expansion and reclaim never race each other; a
    usage scan runs beside them."""

    def __init__(self, client: Client, root: Path, settings: ProvisionerSettings) -> None:
        self.client = client
        self.root = root.resolve()
        self.settings = settings
        self.events = EventRecorder(client, settings.node_name)
        self.snapshotter = Snapshotter(client, self.root, self.events)
        self._queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._pvcs: dict[str, Obj] = {}
        self._pvs: dict[str, Obj] = {}
        self._snapshots: dict[str, Obj] = {}
        # Retries already waiting on the timer: a reconcile that both writes (and so triggers
        # itself again) and retries must not multiply its timers.
        self._scheduled: set[tuple[str, str]] = set()
        # (claim uid, capacity) of volumes already reported over capacity, so one event is
        # sent per episode rather than one per scan.
        self._over_capacity: set[tuple[str, int]] = set()

    @property
    def volumes(self) -> Path:
        return volumes_dir(self.root)

    async def run(self, stop: asyncio.Event) -> None:
        self.volumes.mkdir(parents=True, exist_ok=True)
        snapshots = snapshots_dir(self.root)
        reflink = await asyncio.to_thread(reflink_supported, snapshots)
        log.info(
            "provisioner started root=%s node=%s reflink=%s",
            self.volumes,
            self.settings.node_name,
            "yes" if reflink else "no (sparse copies)",
        )
        tasks = [
            asyncio.create_task(self._pump("pvc", PERSISTENT_VOLUME_CLAIM), name="pvc-informer"),
            asyncio.create_task(self._pump("pv", PERSISTENT_VOLUME), name="pv-informer"),
            asyncio.create_task(self._pump("vs", VOLUME_SNAPSHOT), name="snapshot-informer"),
            asyncio.create_task(self._consume(), name="provisioner"),
            asyncio.create_task(self._scan_usage(), name="usage-scan"),
        ]
        stopping = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait([stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopping:
                    task.result()  # a loop that ended by itself crashed: say so
        finally:
            for task in (stopping, *tasks):
                task.cancel()
            await asyncio.gather(stopping, *tasks, return_exceptions=True)
            log.info("provisioner stopped")

    async def _pump(self, kind: str, resource: Resource) -> None:
        async for change in list_then_watch(self.client, resource):
            await self._queue.put((kind, change))

    def _retry_later(self, kind: str, key: str) -> None:
        mark = (kind, key)
        if mark in self._scheduled:
            return
        self._scheduled.add(mark)

        def fire() -> None:
            self._scheduled.discard(mark)
            self._queue.put_nowait(mark)

        asyncio.get_running_loop().call_later(self.settings.retry_delay, fire)

    async def _consume(self) -> None:
        while True:
            kind, item = await self._queue.get()
            try:
                await self._handle(kind, item)
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad object must not stop provisioning for the others
                log.exception("provisioner failed kind=%s", kind)

    async def _handle(self, kind: str, item: Any) -> None:
        if kind == "pvc" and isinstance(item, Snapshot):
            await self.ensure_storage_classes()
            self._pvcs = {key_of(o): o for o in item.items}
            for pvc in list(self._pvcs.values()):
                await self._guarded_pvc(pvc)
        elif kind == "pvc" and isinstance(item, WatchEvent):
            key = key_of(item.object)
            if item.type == "DELETED":
                self._pvcs.pop(key, None)
                pv = self._pvs.get(pv_name_for(item.object))
                if pv is not None:
                    await self._guarded_pv(pv)
            else:
                self._pvcs[key] = item.object
                await self._guarded_pvc(item.object)
                self._wake_dependents_of_pvc(item.object)
        elif kind == "pv" and isinstance(item, Snapshot):
            self._pvs = {o["metadata"]["name"]: o for o in item.items}
            for pv in list(self._pvs.values()):
                await self._guarded_pv(pv)
        elif kind == "pv" and isinstance(item, WatchEvent):
            name = item.object["metadata"]["name"]
            if item.type == "DELETED":
                self._pvs.pop(name, None)
                await self._pv_deleted(item.object)
            else:
                self._pvs[name] = item.object
                await self._guarded_pv(item.object)
        elif kind == "vs" and isinstance(item, Snapshot):
            await self.ensure_storage_classes()
            self._snapshots = {key_of(o): o for o in item.items}
            await self._guarded("snapshot garbage", self.snapshotter.collect_garbage(item.items))
            for snapshot in list(self._snapshots.values()):
                await self._guarded_snapshot(snapshot)
        elif kind == "vs" and isinstance(item, WatchEvent):
            key = key_of(item.object)
            if item.type == "DELETED":
                self._snapshots.pop(key, None)
                await self._guarded(key, self.snapshotter.deleted(item.object))
            else:
                self._snapshots[key] = item.object
                await self._guarded_snapshot(item.object)
                if is_ready(item.object):
                    md = item.object["metadata"]
                    self._wake_pvcs(sources.Kind.SNAPSHOT, md["namespace"], md["name"])
        elif kind == "retry-pvc" and item in self._pvcs:
            await self._guarded_pvc(self._pvcs[item])
        elif kind == "retry-pv" and item in self._pvs:
            await self._guarded_pv(self._pvs[item])
        elif kind == "retry-vs" and item in self._snapshots:
            await self._guarded_snapshot(self._snapshots[item])

    def _wake_dependents_of_pvc(self, pvc: Obj) -> None:
        """A PVC changed: snapshots of it and clones from it waiting for it may go on now. Cheap
        (a scan of our caches) and only queues; the reconciles decide."""
        md = pvc["metadata"]
        namespace, name = md.get("namespace"), md.get("name")
        for key, snapshot in self._snapshots.items():
            if (
                snapshot["metadata"].get("namespace") == namespace
                and source_pvc_name(snapshot) == name
                and not is_ready(snapshot)
            ):
                self._queue.put_nowait(("retry-vs", key))
        self._wake_pvcs(sources.Kind.PVC, str(namespace), str(name))

    def _wake_pvcs(self, kind: sources.Kind, namespace: str, name: str) -> None:
        for key, pvc in self._pvcs.items():
            pending = not (pvc.get("spec") or {}).get("volumeName")
            if pending and sources.names_source(pvc, kind, namespace, name):
                self._queue.put_nowait(("retry-pvc", key))

    async def _guarded(self, what: str, work: Awaitable[Any]) -> None:
        try:
            await work
        except (ApiError, OSError) as err:  # the next relist or event tries again
            log.warning("%s: failed error=%s", what, err)
        except Exception:
            log.exception("%s: failed", what)

    async def _guarded_pvc(self, pvc: Obj) -> None:
        try:
            await self.reconcile_pvc(pvc)
        except (ApiError, OSError) as err:
            log.warning("%s: reconcile failed, retrying error=%s", key_of(pvc), err)
            self._retry_later("retry-pvc", key_of(pvc))
        except Exception:  # a malformed object: say so, and go on with the others
            log.exception("%s: reconcile failed", key_of(pvc))

    async def _guarded_pv(self, pv: Obj) -> None:
        try:
            await self.reconcile_pv(pv)
        except (ApiError, OSError) as err:
            log.warning("%s: reconcile failed, retrying error=%s", key_of(pv), err)
            self._retry_later("retry-pv", key_of(pv))
        except Exception:
            log.exception("%s: reconcile failed", key_of(pv))

    async def _guarded_snapshot(self, snapshot: Obj) -> None:
        try:
            done = await self.snapshotter.reconcile(snapshot)
        except (ApiError, OSError) as err:
            log.warning("%s: snapshot failed, retrying error=%s", key_of(snapshot), err)
            done = False
        except Exception:
            log.exception("%s: snapshot failed", key_of(snapshot))
            return
        if not done:
            self._retry_later("retry-vs", key_of(snapshot))

    # --- storage classes -------------------------------------------------------------------------

    async def ensure_storage_classes(self) -> None:
        """Create our classes when missing; ones that exist are the admin's and are left alone."""
        for sc in storage_classes():
            with contextlib.suppress(AlreadyExists):
                await self.client.create(STORAGE_CLASS, sc)
                log.info("created storage class name=%s", sc["metadata"]["name"])
        # Without the snapshot CRDs there are no snapshots, but volumes must still be served.
        await self._guarded("volume snapshot class", self.snapshotter.ensure_class())

    async def _class_for(self, name: str | None) -> Obj | None:
        """The StorageClass a PVC asks for (None: the default class), if it is ours."""
        if name is None:
            classes, _ = await self.client.list(STORAGE_CLASS)
            defaults = [
                sc
                for sc in classes
                if ((sc["metadata"].get("annotations") or {}).get(IS_DEFAULT_CLASS)) == "true"
            ]
            if not defaults:
                return None
            # Kubernetes' rule when several classes claim to be the default: the newest wins.
            defaults.sort(key=lambda sc: sc["metadata"].get("creationTimestamp") or "")
            sc = defaults[-1]
        else:
            try:
                sc = await self.client.get(STORAGE_CLASS, name)
            except NotFound:
                return None
        return sc if sc.get("provisioner") == PROVISIONER else None

    # --- PVCs ------------------------------------------------------------------------------------

    async def reconcile_pvc(self, pvc: Obj) -> None:
        md = pvc["metadata"]
        spec = pvc.get("spec") or {}
        if md.get("deletionTimestamp"):
            return
        if spec.get("volumeName"):
            if spec["volumeName"] == pv_name_for(pvc):
                await self._sync_bound(pvc)
            return
        class_name = spec.get("storageClassName")
        if class_name == "":
            return  # explicitly no class: static binding only, not ours to provision
        sc = await self._class_for(class_name)
        if sc is None:
            return
        key = key_of(pvc)
        if class_name is None:
            # Retroactive default class: the PVC says which class it got, as on a cluster.
            pvc = await self.client.patch(
                PERSISTENT_VOLUME_CLAIM,
                md["name"],
                {"spec": {"storageClassName": sc["metadata"]["name"]}},
                md["namespace"],
            )
        if sources.kind_of(pvc) is sources.Kind.FOREIGN:
            # A populator's PVC (CDI's VolumeImportSource and the like): the populator fills a
            # PVC' of its own and hands its volume over; binding an empty volume here would
            # hide the populator's failure.
            log.debug("%s: data source is a populator's, left alone", key)
            return
        if sc.get("volumeBindingMode") == WAIT_FOR_FIRST_CONSUMER:
            notes = md.get("annotations") or {}
            selected = notes.get(SELECTED_NODE)
            immediate = notes.get(ann.BIND_IMMEDIATE_REQUESTED) is not None
            if not immediate and selected != self.settings.node_name:
                log.debug("%s: waiting for first consumer selected_node=%s", key, selected)
                return
        await self._provision(pvc, sc)

    async def _provision(self, pvc: Obj, sc: Obj) -> None:
        key = key_of(pvc)
        # Events queue up behind our own writes: one from before the binding would provision
        # again (harmless, but twice the work and events). The PVC as it is now decides.
        try:
            fresh = await self.client.get(
                PERSISTENT_VOLUME_CLAIM, pvc["metadata"]["name"], pvc["metadata"]["namespace"]
            )
        except NotFound:
            return
        if fresh["metadata"].get("uid") != pvc["metadata"].get("uid"):
            return
        if (fresh.get("spec") or {}).get("volumeName") or fresh["metadata"].get(
            "deletionTimestamp"
        ):
            return
        pvc = fresh
        md = pvc["metadata"]
        request = request_of(pvc)
        try:
            size = parse_size(request) if request is not None else None
        except QuantityError:
            size = None
        if request is None or size is None or size <= 0:
            await self.events.once(
                pvc,
                "Warning",
                "ProvisioningFailed",
                f"spec.resources.requests.storage must be a positive size, not {request!r}",
            )
            return
        fill: sources.Fill | None = None
        if sources.kind_of(pvc) is not sources.Kind.NONE:
            decision = await sources.resolve(
                self.client, self.root, pvc, request=request, size=size
            )
            if not isinstance(decision, sources.Fill):
                await self._hold(pvc, decision)
                return
            fill = decision
        block = is_block(pvc)
        name = pv_name_for(pvc)
        path = self.volumes / name
        # A copy lands whole or not at all (copy_data), so an existing path is a finished one.
        if fill is not None and not await asyncio.to_thread(path.exists):
            await copy_data(fill.path, path)
        # Also grows a restored Block file to the request: the tail reads as zeros.
        await asyncio.to_thread(_create_data, path, block=block, size=size)
        spec = pvc.get("spec") or {}
        access_modes = spec.get("accessModes") or ["ReadWriteOnce"]
        pv: Obj = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {
                "name": name,
                "annotations": {PROVISIONED_BY: PROVISIONER},
                "labels": {HOSTNAME_LABEL: self.settings.node_name},
            },
            "spec": {
                "capacity": {"storage": request},
                "accessModes": access_modes,
                "volumeMode": VolumeMode.BLOCK if block else VolumeMode.FILESYSTEM,
                "persistentVolumeReclaimPolicy": sc.get("reclaimPolicy") or "Delete",
                "storageClassName": sc["metadata"]["name"],
                "claimRef": {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "namespace": md["namespace"],
                    "name": md["name"],
                    "uid": md["uid"],
                    "resourceVersion": md.get("resourceVersion"),
                },
                "local": {"path": str(path)},
                "nodeAffinity": {
                    "required": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {
                                        "key": HOSTNAME_LABEL,
                                        "operator": "In",
                                        "values": [self.settings.node_name],
                                    }
                                ]
                            }
                        ]
                    }
                },
            },
        }
        with contextlib.suppress(AlreadyExists):  # a previous attempt got this far: carry on
            await self.client.create(PERSISTENT_VOLUME, pv)
        await self.client.patch(
            PERSISTENT_VOLUME, name, {"status": {"phase": "Bound"}}, subresource="status"
        )
        await self.client.patch(
            PERSISTENT_VOLUME_CLAIM,
            md["name"],
            {
                "metadata": {
                    "annotations": {
                        BIND_COMPLETED: "yes",
                        BOUND_BY_CONTROLLER: "yes",
                        STORAGE_PROVISIONER: PROVISIONER,
                        BETA_STORAGE_PROVISIONER: PROVISIONER,
                    }
                },
                "spec": {"volumeName": name},
            },
            md["namespace"],
        )
        await self._set_bound(pvc, request, access_modes)
        log.info(
            "%s: provisioned pv=%s mode=%s size=%d path=%s source=%s",
            key,
            name,
            "Block" if block else "Filesystem",
            size,
            path,
            fill.description if fill is not None else "none",
        )
        origin = f" from {fill.description}" if fill is not None else ""
        await self.events.emit(
            pvc,
            "Normal",
            "ProvisioningSucceeded",
            f"Successfully provisioned volume {name}{origin}",
        )

    async def _hold(self, pvc: Obj, decision: sources.Wait | sources.Refuse) -> None:
        """Keep the PVC Pending: until its data source is ready (retried, and woken when the
        source changes), or for good, saying why (its spec is what must change)."""
        if isinstance(decision, sources.Wait):
            await self.events.once(pvc, "Normal", "WaitingForDataSource", decision.message)
            self._retry_later("retry-pvc", key_of(pvc))
        else:
            await self.events.once(pvc, "Warning", "ProvisioningFailed", decision.message)

    async def _set_bound(self, pvc: Obj, capacity: str, access_modes: list[str]) -> None:
        md = pvc["metadata"]
        await self.client.patch(
            PERSISTENT_VOLUME_CLAIM,
            md["name"],
            {
                "status": {
                    "phase": "Bound",
                    "capacity": {"storage": capacity},
                    "accessModes": access_modes,
                }
            },
            md["namespace"],
            subresource="status",
        )

    async def _sync_bound(self, pvc: Obj) -> None:
        """A PVC bound to our PV: finish a binding cut short, and grow the volume when asked."""
        md = pvc["metadata"]
        key = key_of(pvc)
        name = pv_name_for(pvc)
        try:
            pv = await self.client.get(PERSISTENT_VOLUME, name)
        except NotFound:
            if (pvc.get("status") or {}).get("phase") != "Lost":
                log.warning("%s: bound volume %s is gone", key, name)
                await self.client.patch(
                    PERSISTENT_VOLUME_CLAIM,
                    md["name"],
                    {"status": {"phase": "Lost"}},
                    md["namespace"],
                    subresource="status",
                )
                await self.events.emit(
                    pvc, "Warning", "ClaimLost", f"volume {name} no longer exists"
                )
            return
        pv_capacity = str(((pv.get("spec") or {}).get("capacity") or {}).get("storage") or "")
        status = pvc.get("status") or {}
        access_modes = (pv.get("spec") or {}).get("accessModes") or ["ReadWriteOnce"]
        request = request_of(pvc)
        try:
            wanted = parse_size(request) if request else 0
            have = parse_size(pv_capacity) if pv_capacity else 0
        except QuantityError:
            return
        if request and wanted > have:
            await self._expand(pvc, pv, request, wanted)
            return
        if request and wanted < have and (status.get("capacity") or {}).get("storage"):
            await self.events.once(
                pvc,
                "Warning",
                "VolumeResizeFailed",
                f"a volume cannot shrink: {request} is less than its capacity {pv_capacity}",
            )
        if status.get("phase") != "Bound" or not (status.get("capacity") or {}).get("storage"):
            await self._set_bound(pvc, pv_capacity, access_modes)

    async def _expand(self, pvc: Obj, pv: Obj, request: str, size: int) -> None:
        key = key_of(pvc)
        sc_name = (pv.get("spec") or {}).get("storageClassName")
        sc = await self._class_for(sc_name) if sc_name else None
        if sc is None or not sc.get("allowVolumeExpansion"):
            await self.events.once(
                pvc,
                "Warning",
                "VolumeResizeFailed",
                f"storage class {sc_name!r} does not allow volume expansion",
            )
            return
        name = pv["metadata"]["name"]
        if is_block(pv):
            expected = self.volumes / name
            if volume_path(pv) != expected:
                log.warning("%s: refusing to grow pv=%s at an unexpected path", key, name)
                return
            await asyncio.to_thread(_grow_file, expected, size)
        await self.client.patch(
            PERSISTENT_VOLUME, name, {"spec": {"capacity": {"storage": request}}}
        )
        access_modes = (pv.get("spec") or {}).get("accessModes") or ["ReadWriteOnce"]
        await self._set_bound(pvc, request, access_modes)
        log.info("%s: expanded pv=%s size=%d", key, name, size)
        await self.events.emit(
            pvc, "Normal", "VolumeResizeSuccessful", f"volume {name} expanded to {request}"
        )

    # --- PVs -------------------------------------------------------------------------------------

    async def reconcile_pv(self, pv: Obj) -> None:
        """Release a PV whose claim is gone; with reclaim policy Delete, delete data and PV."""
        if not is_ours(pv):
            return
        md = pv["metadata"]
        spec = pv.get("spec") or {}
        claim = spec.get("claimRef") or {}
        if md.get("deletionTimestamp"):
            return
        if claim:
            try:
                pvc = await self.client.get(
                    PERSISTENT_VOLUME_CLAIM, claim["name"], claim.get("namespace")
                )
            except NotFound:
                pvc = None
            if pvc is not None and pvc["metadata"].get("uid") == claim.get("uid"):
                return  # still claimed
        name = md["name"]
        if (pv.get("status") or {}).get("phase") != "Released":
            await self.client.patch(
                PERSISTENT_VOLUME, name, {"status": {"phase": "Released"}}, subresource="status"
            )
            log.info("pv=%s released claim=%s/%s", name, claim.get("namespace"), claim.get("name"))
        if spec.get("persistentVolumeReclaimPolicy") != "Delete":
            return
        if not await self._delete_data(pv):
            return
        with contextlib.suppress(NotFound):
            await self.client.delete(PERSISTENT_VOLUME, name, uid=md.get("uid"))
        log.info("pv=%s deleted with its data", name)

    async def _pv_deleted(self, pv: Obj) -> None:
        """One of our PVs is gone. Its data goes too only if it was Released with policy Delete
        (we were deleting it); a PV deleted while in use keeps its data, as a CSI volume would,
        rather than pulling the disk from under a running worker."""
        if not is_ours(pv):
            return
        spec = pv.get("spec") or {}
        released = (pv.get("status") or {}).get("phase") == "Released"
        if released and spec.get("persistentVolumeReclaimPolicy") == "Delete":
            await self._delete_data(pv)
        elif (
            volume_path(pv) is not None and volume_path(pv) == self.volumes / pv["metadata"]["name"]
        ):
            log.warning(
                "pv=%s deleted while not released; data kept path=%s", key_of(pv), volume_path(pv)
            )

    async def _delete_data(self, pv: Obj) -> bool:
        name = pv["metadata"]["name"]
        expected = self.volumes / name
        # Only ever remove what we made: the path derived from the name, and only when the
        # object agrees (a hand-made PV claiming to be ours must not point us at /home).
        if volume_path(pv) != expected or "/" in name or name in ("", ".", ".."):
            log.warning("pv=%s: not removing data at unexpected path=%s", name, volume_path(pv))
            return False
        await asyncio.to_thread(remove_path, expected)
        log.info("pv=%s data removed path=%s", name, expected)
        return True

    # --- usage -----------------------------------------------------------------------------------

    async def _scan_usage(self) -> None:
        while True:
            await asyncio.sleep(self.settings.usage_interval)
            for pv in list(self._pvs.values()):
                try:
                    await self._check_usage(pv)
                except (ApiError, OSError, QuantityError) as err:
                    log.warning("pv=%s usage check failed error=%s", pv["metadata"]["name"], err)

    async def _check_usage(self, pv: Obj) -> None:
        if not is_ours(pv) or is_block(pv) or (pv.get("status") or {}).get("phase") != "Bound":
            return
        name = pv["metadata"]["name"]
        path = self.volumes / name
        if volume_path(pv) != path:
            return
        spec = pv.get("spec") or {}
        capacity = parse_size(str((spec.get("capacity") or {}).get("storage") or "0"))
        used = await asyncio.to_thread(disk_usage, path)
        claim = spec.get("claimRef") or {}
        mark = (str(claim.get("uid")), capacity)
        if used <= capacity:
            self._over_capacity.discard(mark)
            return
        if mark in self._over_capacity:
            return
        self._over_capacity.add(mark)
        key = f"{claim.get('namespace')}/{claim.get('name')}"
        log.warning("%s: over capacity pv=%s used=%d capacity=%d", key, name, used, capacity)
        try:
            pvc = await self.client.get(
                PERSISTENT_VOLUME_CLAIM, claim["name"], claim.get("namespace")
            )
        except NotFound:
            return
        await self.events.emit(
            pvc,
            "Warning",
            "VolumeOverCapacity",
            f"volume {name} holds {used} bytes, more than its capacity of {capacity} bytes",
        )


async def run_provisioner(
    client: Client,
    *,
    root: Path,
    stop: asyncio.Event,
    settings: ProvisionerSettings | None = None,
) -> None:
    """Serve the local StorageClasses until `stop` is set. `root` is the server's data dir;
    volumes live in `<root>/volumes`."""
    await LocalProvisioner(client, root, settings or ProvisionerSettings()).run(stop)
