"""The local provisioner: PersistentVolumes backed by directories and files under the data dir.

Owns, for the all-in-one server, what a CSI driver plus the external provisioner, resizer and the
PV controller own on a cluster:

* two StorageClasses, created when missing: `local` (the default class, Immediate binding,
  expandable, reclaim Delete) and `local-wffc` (the same with WaitForFirstConsumer);
* binding: each Pending PVC of one of our classes (or of no class, when ours is the default,
  which the PVC then gets, as Kubernetes' retroactive default class assignment does) gets a PV
  named `pvc-<pvc uid>` whose `spec.local.path` is `<root>/volumes/<pv name>`: a directory for
  Filesystem volumes, a sparse file of exactly the requested bytes for Block volumes. PV status
  Bound, PVC `spec.volumeName`, then PVC status `{phase: Bound, capacity, accessModes}`;
* WaitForFirstConsumer: such a PVC is bound only once `volume.kubernetes.io/selected-node` names
  our node (the local node agent sets it when a pod that uses the PVC is waiting, as
  kube-scheduler does on a cluster), or when CDI's `storage.bind.immediate.requested` is set;
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
server) and must not touch volumes of other provisioners, PVCs with a data source (clones and
populators are other components' work), or anything outside `<root>/volumes`.

The node agent (`cdi.agent`) finds a PV's data with `volume_path(pv)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from cdi.api import VolumeMode, parse_size
from cdi.api import annotations as ann
from cdi.api.groups import (
    EVENT,
    PERSISTENT_VOLUME,
    PERSISTENT_VOLUME_CLAIM,
    STORAGE_CLASS,
    Resource,
)
from cdi.api.quantity import QuantityError
from cdi.kube.client import Client, WatchEvent
from cdi.kube.errors import AlreadyExists, ApiError, NotFound
from cdi.kube.informer import Snapshot, list_then_watch

log = logging.getLogger(__name__)

Obj = dict[str, Any]

PROVISIONER: Final = "cdi.kubevirt.io/local"
DEFAULT_CLASS: Final = "local"
WFFC_CLASS: Final = "local-wffc"
DEFAULT_NODE: Final = "cdi-local"
IS_DEFAULT_CLASS: Final = "storageclass.kubernetes.io/is-default-class"
SELECTED_NODE: Final = "volume.kubernetes.io/selected-node"
PROVISIONED_BY: Final = "pv.kubernetes.io/provisioned-by"
BIND_COMPLETED: Final = "pv.kubernetes.io/bind-completed"
BOUND_BY_CONTROLLER: Final = "pv.kubernetes.io/bound-by-controller"
STORAGE_PROVISIONER: Final = "volume.kubernetes.io/storage-provisioner"
BETA_STORAGE_PROVISIONER: Final = "volume.beta.kubernetes.io/storage-provisioner"
HOSTNAME_LABEL: Final = "kubernetes.io/hostname"
WAIT_FOR_FIRST_CONSUMER: Final = "WaitForFirstConsumer"
COMPONENT: Final = "cdi-local-provisioner"


@dataclass(frozen=True, slots=True)
class ProvisionerSettings:
    node_name: str = DEFAULT_NODE
    """The one node of the all-in-one server: PV node affinity and the WFFC selected node."""
    usage_interval: float = 30.0
    """Seconds between usage scans of Filesystem volumes (a `du` of each directory): cheap on
    small trees, and over-capacity is reported, not prevented, so minutes of delay are fine."""
    retry_delay: float = 2.0
    """Seconds before a failed reconcile of one object is tried again."""


def volumes_dir(root: Path) -> Path:
    """Where every volume of this provisioner lives."""
    return root / "volumes"


def pv_name_for(pvc: Obj) -> str:
    return f"pvc-{pvc['metadata']['uid']}"


def volume_path(pv: Obj) -> Path | None:
    """The local path of a PV's data (`spec.local.path` or `spec.hostPath.path`), if it has one.

    For the node agent: a directory (Filesystem) or a file (Block, `spec.volumeMode`)."""
    spec = pv.get("spec") or {}
    for source in ("local", "hostPath"):
        path = (spec.get(source) or {}).get("path")
        if path:
            return Path(path)
    return None


def storage_classes() -> list[Obj]:
    """The two classes this provisioner serves, as it creates them."""

    def make(name: str, binding: str, *, default: bool) -> Obj:
        md: Obj = {"name": name, "labels": {"app.kubernetes.io/managed-by": COMPONENT}}
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


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _key(obj: Obj) -> str:
    md = obj.get("metadata") or {}
    ns = md.get("namespace")
    return f"{ns}/{md.get('name')}" if ns else str(md.get("name"))


def _request(pvc: Obj) -> str | None:
    spec = pvc.get("spec") or {}
    value = ((spec.get("resources") or {}).get("requests") or {}).get("storage")
    return str(value) if value is not None else None


def _is_block(obj: Obj) -> bool:
    return (obj.get("spec") or {}).get("volumeMode") == VolumeMode.BLOCK


def _ours(pv: Obj) -> bool:
    annotations_ = (pv.get("metadata") or {}).get("annotations") or {}
    return bool(annotations_.get(PROVISIONED_BY) == PROVISIONER)


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


def _remove_data(path: Path) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        path.unlink()


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
    """One provisioner: two informers (PVCs, PVs) feed one queue, handled one item at a time so
    that binding, expansion and reclaim never race each other; a usage scan runs beside them."""

    def __init__(self, client: Client, root: Path, settings: ProvisionerSettings) -> None:
        self.client = client
        self.root = root.resolve()
        self.settings = settings
        self._queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._pvcs: dict[str, Obj] = {}
        self._pvs: dict[str, Obj] = {}
        # (claim uid, capacity) of volumes already reported over capacity, so one event is
        # sent per episode rather than one per scan.
        self._over_capacity: set[tuple[str, int]] = set()
        # (object uid, reason, message) of warnings already sent by `_event_once`.
        self._reported: set[tuple[str, str, str]] = set()

    @property
    def volumes(self) -> Path:
        return volumes_dir(self.root)

    async def run(self, stop: asyncio.Event) -> None:
        self.volumes.mkdir(parents=True, exist_ok=True)
        log.info("provisioner started root=%s node=%s", self.volumes, self.settings.node_name)
        tasks = [
            asyncio.create_task(self._pump("pvc", PERSISTENT_VOLUME_CLAIM), name="pvc-informer"),
            asyncio.create_task(self._pump("pv", PERSISTENT_VOLUME), name="pv-informer"),
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
        loop = asyncio.get_running_loop()
        loop.call_later(self.settings.retry_delay, self._queue.put_nowait, (kind, key))

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
            self._pvcs = {_key(o): o for o in item.items}
            for pvc in list(self._pvcs.values()):
                await self._guarded_pvc(pvc)
        elif kind == "pvc" and isinstance(item, WatchEvent):
            key = _key(item.object)
            if item.type == "DELETED":
                self._pvcs.pop(key, None)
                pv = self._pvs.get(pv_name_for(item.object))
                if pv is not None:
                    await self._guarded_pv(pv)
            else:
                self._pvcs[key] = item.object
                await self._guarded_pvc(item.object)
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
        elif kind == "retry-pvc" and item in self._pvcs:
            await self._guarded_pvc(self._pvcs[item])
        elif kind == "retry-pv" and item in self._pvs:
            await self._guarded_pv(self._pvs[item])

    async def _guarded_pvc(self, pvc: Obj) -> None:
        try:
            await self.reconcile_pvc(pvc)
        except (ApiError, OSError) as err:
            log.warning("%s: reconcile failed, retrying error=%s", _key(pvc), err)
            self._retry_later("retry-pvc", _key(pvc))
        except Exception:  # a malformed object: say so, and go on with the others
            log.exception("%s: reconcile failed", _key(pvc))

    async def _guarded_pv(self, pv: Obj) -> None:
        try:
            await self.reconcile_pv(pv)
        except (ApiError, OSError) as err:
            log.warning("%s: reconcile failed, retrying error=%s", _key(pv), err)
            self._retry_later("retry-pv", _key(pv))
        except Exception:
            log.exception("%s: reconcile failed", _key(pv))

    # --- storage classes -------------------------------------------------------------------------

    async def ensure_storage_classes(self) -> None:
        """Create our classes when missing; ones that exist are the admin's and are left alone."""
        for sc in storage_classes():
            with contextlib.suppress(AlreadyExists):
                await self.client.create(STORAGE_CLASS, sc)
                log.info("created storage class name=%s", sc["metadata"]["name"])

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
        key = _key(pvc)
        if class_name is None:
            # Retroactive default class: the PVC says which class it got, as on a cluster.
            pvc = await self.client.patch(
                PERSISTENT_VOLUME_CLAIM,
                md["name"],
                {"spec": {"storageClassName": sc["metadata"]["name"]}},
                md["namespace"],
            )
        if spec.get("dataSource") or spec.get("dataSourceRef"):
            # Clones and populators fill volumes through their own components; binding an empty
            # volume here would hide their failure.
            await self._event_once(
                pvc,
                "Warning",
                "ProvisioningFailed",
                "the local provisioner does not fill volumes from a dataSource; "
                "create the PVC without one",
            )
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
        key = _key(pvc)
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
        request = _request(pvc)
        try:
            size = parse_size(request) if request is not None else None
        except QuantityError:
            size = None
        if request is None or size is None or size <= 0:
            await self._event_once(
                pvc,
                "Warning",
                "ProvisioningFailed",
                f"spec.resources.requests.storage must be a positive size, not {request!r}",
            )
            return
        block = _is_block(pvc)
        name = pv_name_for(pvc)
        path = self.volumes / name
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
            "%s: provisioned pv=%s mode=%s size=%d path=%s",
            key,
            name,
            "Block" if block else "Filesystem",
            size,
            path,
        )
        await self._event(
            pvc, "Normal", "ProvisioningSucceeded", f"Successfully provisioned volume {name}"
        )

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
        key = _key(pvc)
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
                await self._event(pvc, "Warning", "ClaimLost", f"volume {name} no longer exists")
            return
        pv_capacity = str(((pv.get("spec") or {}).get("capacity") or {}).get("storage") or "")
        status = pvc.get("status") or {}
        access_modes = (pv.get("spec") or {}).get("accessModes") or ["ReadWriteOnce"]
        request = _request(pvc)
        try:
            wanted = parse_size(request) if request else 0
            have = parse_size(pv_capacity) if pv_capacity else 0
        except QuantityError:
            return
        if request and wanted > have:
            await self._expand(pvc, pv, request, wanted)
            return
        if request and wanted < have and (status.get("capacity") or {}).get("storage"):
            await self._event_once(
                pvc,
                "Warning",
                "VolumeResizeFailed",
                f"a volume cannot shrink: {request} is less than its capacity {pv_capacity}",
            )
        if status.get("phase") != "Bound" or not (status.get("capacity") or {}).get("storage"):
            await self._set_bound(pvc, pv_capacity, access_modes)

    async def _expand(self, pvc: Obj, pv: Obj, request: str, size: int) -> None:
        key = _key(pvc)
        sc_name = (pv.get("spec") or {}).get("storageClassName")
        sc = await self._class_for(sc_name) if sc_name else None
        if sc is None or not sc.get("allowVolumeExpansion"):
            await self._event_once(
                pvc,
                "Warning",
                "VolumeResizeFailed",
                f"storage class {sc_name!r} does not allow volume expansion",
            )
            return
        name = pv["metadata"]["name"]
        if _is_block(pv):
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
        await self._event(
            pvc, "Normal", "VolumeResizeSuccessful", f"volume {name} expanded to {request}"
        )

    # --- PVs -------------------------------------------------------------------------------------

    async def reconcile_pv(self, pv: Obj) -> None:
        """Release a PV whose claim is gone; with reclaim policy Delete, delete data and PV."""
        if not _ours(pv):
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
        if not _ours(pv):
            return
        spec = pv.get("spec") or {}
        released = (pv.get("status") or {}).get("phase") == "Released"
        if released and spec.get("persistentVolumeReclaimPolicy") == "Delete":
            await self._delete_data(pv)
        elif (
            volume_path(pv) is not None and volume_path(pv) == self.volumes / pv["metadata"]["name"]
        ):
            log.warning(
                "pv=%s deleted while not released; data kept path=%s", _key(pv), volume_path(pv)
            )

    async def _delete_data(self, pv: Obj) -> bool:
        name = pv["metadata"]["name"]
        expected = self.volumes / name
        # Only ever remove what we made: the path derived from the name, and only when the
        # object agrees (a hand-made PV claiming to be ours must not point us at /home).
        if volume_path(pv) != expected or "/" in name or name in ("", ".", ".."):
            log.warning("pv=%s: not removing data at unexpected path=%s", name, volume_path(pv))
            return False
        await asyncio.to_thread(_remove_data, expected)
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
        if not _ours(pv) or _is_block(pv) or (pv.get("status") or {}).get("phase") != "Bound":
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
        await self._event(
            pvc,
            "Warning",
            "VolumeOverCapacity",
            f"volume {name} holds {used} bytes, more than its capacity of {capacity} bytes",
        )

    # --- events ----------------------------------------------------------------------------------

    async def _event_once(self, obj: Obj, kind: str, reason: str, message: str) -> None:
        """An event that level-triggered reconciles would otherwise repeat on every pass."""
        mark = (str(obj["metadata"].get("uid")), reason, message)
        if mark in self._reported:
            return
        self._reported.add(mark)
        log.warning("%s: %s %s", _key(obj), reason, message)
        await self._event(obj, kind, reason, message)

    async def _event(self, obj: Obj, kind: str, reason: str, message: str) -> None:
        md = obj["metadata"]
        now = _now()
        event: Obj = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{md['name']}.", "namespace": md.get("namespace")},
            "involvedObject": {
                "apiVersion": obj.get("apiVersion", "v1"),
                "kind": obj.get("kind", "PersistentVolumeClaim"),
                "name": md["name"],
                "namespace": md.get("namespace"),
                "uid": md.get("uid"),
                "resourceVersion": md.get("resourceVersion"),
            },
            "reason": reason,
            "message": message,
            "type": kind,
            "source": {"component": COMPONENT, "host": self.settings.node_name},
            "reportingComponent": PROVISIONER,
            "reportingInstance": self.settings.node_name,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self.client.create(EVENT, event)
        except ApiError as err:  # an event is a courtesy; never fail the reconcile for it
            log.debug("%s: cannot record event reason=%s error=%s", _key(obj), reason, err)


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
