"""Snapshots of local volumes: what the CSI external-snapshotter and a driver's CreateSnapshot
do on a cluster, for the all-in-one server.

* one VolumeSnapshotClass, `local-snapshots` (driver = our provisioner name, deletionPolicy
  Delete, the default class), created when missing;
* a VolumeSnapshot whose `spec.source.persistentVolumeClaimName` names a Bound PVC on one of our
  volumes, and whose class is ours (or unset, ours being the default: it is then written into
  the snapshot, as the snapshotter does), gets a cluster-scoped VolumeSnapshotContent
  `snapcontent-<snapshot uid>` whose data is a copy (reflink when possible, `cdi.provisioner.
  copying`) of the volume's data at `<root>/snapshots/<content name>`: a directory for a
  Filesystem volume, a file for a Block one. Content status: readyToUse, restoreSize (the PVC's
  capacity in bytes), snapshotHandle (the data's name), creationTime (ns). Then the snapshot's
  status: boundVolumeSnapshotContentName, readyToUse, restoreSize (a quantity), creationTime;
* a source that is missing or not Bound: `status.error {message, time}`, readyToUse false, and
  the caller retries (and re-queues the snapshot when that PVC changes);
* a deleted snapshot takes its content (deletionPolicy Delete) and the data with it; on every
  relist, contents of ours whose snapshot is gone and data with no content are collected, so a
  deletion missed while the server was down is caught up. Data is only ever removed under
  `<root>/snapshots/` at the path derived from the content's name.

Pre-provisioned snapshots (`spec.source.volumeSnapshotContentName`) and snapshots of other
drivers are left alone. Restores from a snapshot are `cdi.provisioner.sources`' business.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from cdi.api import VolumeMode, format_size, parse_size
from cdi.api.groups import (
    PERSISTENT_VOLUME,
    PERSISTENT_VOLUME_CLAIM,
    SNAPSHOT_API_VERSION,
    VOLUME_SNAPSHOT,
    VOLUME_SNAPSHOT_CLASS,
    VOLUME_SNAPSHOT_CONTENT,
)
from cdi.api.quantity import QuantityError
from cdi.kube.client import Client
from cdi.kube.errors import AlreadyExists, NotFound
from cdi.provisioner.copying import copy_data, partial_path, remove_path
from cdi.provisioner.events import EventRecorder
from cdi.provisioner.volumes import (
    COMPONENT,
    MANAGED_BY,
    PROVISIONER,
    Obj,
    key_of,
    local_data_path,
    now,
    pv_name_for,
    safe_name,
    snapshots_dir,
    volume_mode,
)

log = logging.getLogger(__name__)

SNAPSHOT_CLASS: Final = "local-snapshots"
IS_DEFAULT_SNAPSHOT_CLASS: Final = "snapshot.storage.kubernetes.io/is-default-class"
CONTENT_PREFIX: Final = "snapcontent-"


def snapshot_class() -> Obj:
    """The VolumeSnapshotClass this provisioner serves, as it creates it."""
    return {
        "apiVersion": SNAPSHOT_API_VERSION,
        "kind": "VolumeSnapshotClass",
        "metadata": {
            "name": SNAPSHOT_CLASS,
            "labels": {MANAGED_BY: COMPONENT},
            "annotations": {IS_DEFAULT_SNAPSHOT_CLASS: "true"},
        },
        "driver": PROVISIONER,
        "deletionPolicy": "Delete",
    }


def content_name_for(snapshot: Obj) -> str:
    return f"{CONTENT_PREFIX}{snapshot['metadata']['uid']}"


def content_data_path(root: Path, name: object) -> Path | None:
    """Where the data of content `name` lives; None for a name we could not have made."""
    if not safe_name(name) or not str(name).startswith(CONTENT_PREFIX):
        return None
    return snapshots_dir(root) / str(name)


def is_our_content(content: Obj) -> bool:
    md = content.get("metadata") or {}
    return (
        (content.get("spec") or {}).get("driver") == PROVISIONER
        and (md.get("labels") or {}).get(MANAGED_BY) == COMPONENT
        and content_data_path(Path("/"), md.get("name")) is not None
    )


def source_pvc_name(snapshot: Obj) -> str | None:
    source = (snapshot.get("spec") or {}).get("source") or {}
    name = source.get("persistentVolumeClaimName")
    return str(name) if name else None


def is_ready(snapshot: Obj) -> bool:
    return bool((snapshot.get("status") or {}).get("readyToUse") is True)


@dataclass(frozen=True, slots=True)
class SourceProblem:
    message: str
    retry: bool
    """True when the problem may go away by itself (the PVC is created or binds)."""


@dataclass(frozen=True, slots=True)
class Source:
    pvc: Obj
    pv: Obj
    path: Path
    size: int


class Snapshotter:
    """Snapshot handling for one `LocalProvisioner`; called from its queue, one item at a time,
    so a snapshot's copy never races the volume's reclaim or another snapshot's collection."""

    def __init__(self, client: Client, root: Path, events: EventRecorder) -> None:
        self.client = client
        self.root = root
        self.events = events
        # Snapshot uid -> the error last written to its status. Events can be older than our
        # own writes (a spec patch's echo arrives after the status patch), so the object at
        # hand is not enough to know whether the error is already there.
        self._errors: dict[str, str] = {}

    @property
    def directory(self) -> Path:
        return snapshots_dir(self.root)

    async def ensure_class(self) -> None:
        """Create our class when missing; one that exists is the admin's and is left alone."""
        with contextlib.suppress(AlreadyExists):
            await self.client.create(VOLUME_SNAPSHOT_CLASS, snapshot_class())
            log.info("created volume snapshot class name=%s", SNAPSHOT_CLASS)

    async def _class_for(self, name: str | None) -> Obj | None:
        """The VolumeSnapshotClass a snapshot asks for (None: the default), if it is ours."""
        if name:
            try:
                vsclass = await self.client.get(VOLUME_SNAPSHOT_CLASS, name)
            except NotFound:
                return None
            return vsclass if vsclass.get("driver") == PROVISIONER else None
        classes, _ = await self.client.list(VOLUME_SNAPSHOT_CLASS)
        defaults = [
            c
            for c in classes
            if c.get("driver") == PROVISIONER
            and (c["metadata"].get("annotations") or {}).get(IS_DEFAULT_SNAPSHOT_CLASS) == "true"
        ]
        # As for StorageClasses: when several claim to be the default, the newest wins.
        defaults.sort(key=lambda c: c["metadata"].get("creationTimestamp") or "")
        return defaults[-1] if defaults else None

    # --- taking snapshots ---------------------------------------------------------------------

    async def reconcile(self, snapshot: Obj) -> bool:
        """Take the snapshot if it is ours and not taken yet. False: try again later."""
        md = snapshot["metadata"]
        if md.get("deletionTimestamp"):
            return True
        pvc_name = source_pvc_name(snapshot)
        if pvc_name is None:
            return True  # pre-provisioned: binding an existing content is not ours to do
        content_name = content_name_for(snapshot)
        status = snapshot.get("status") or {}
        if is_ready(snapshot) and status.get("boundVolumeSnapshotContentName") == content_name:
            return True
        class_name = (snapshot.get("spec") or {}).get("volumeSnapshotClassName")
        vsclass = await self._class_for(class_name)
        if vsclass is None:
            return True
        if not class_name:
            snapshot = await self.client.patch(
                VOLUME_SNAPSHOT,
                md["name"],
                {"spec": {"volumeSnapshotClassName": vsclass["metadata"]["name"]}},
                md["namespace"],
            )
        try:
            content = await self.client.get(VOLUME_SNAPSHOT_CONTENT, content_name)
        except NotFound:
            content = None
        if content is None or not (content.get("status") or {}).get("readyToUse"):
            source = await self._source(md["namespace"], pvc_name)
            if isinstance(source, SourceProblem):
                await self._set_error(snapshot, source.message)
                return not source.retry
            content = await self._take(snapshot, vsclass, source, content)
        await self._set_ready(snapshot, content)
        return True

    async def _source(self, namespace: str, name: str) -> Source | SourceProblem:
        try:
            pvc = await self.client.get(PERSISTENT_VOLUME_CLAIM, name, namespace)
        except NotFound:
            return SourceProblem(f"source PersistentVolumeClaim {name} does not exist", True)
        spec, status = pvc.get("spec") or {}, pvc.get("status") or {}
        if status.get("phase") != "Bound" or not spec.get("volumeName"):
            return SourceProblem(f"source PersistentVolumeClaim {name} is not bound", True)
        not_ours = SourceProblem(
            f"source PersistentVolumeClaim {name} is not a volume of {PROVISIONER}", False
        )
        if spec["volumeName"] != pv_name_for(pvc):
            return not_ours
        try:
            pv = await self.client.get(PERSISTENT_VOLUME, spec["volumeName"])
        except NotFound:
            return SourceProblem(f"the volume of PersistentVolumeClaim {name} is gone", True)
        path = local_data_path(self.root, pv)
        if path is None:
            return not_ours
        capacity = (status.get("capacity") or {}).get("storage") or (
            (pv.get("spec") or {}).get("capacity") or {}
        ).get("storage")
        try:
            size = parse_size(str(capacity))
        except QuantityError:
            return SourceProblem(f"source PersistentVolumeClaim {name} has no capacity", True)
        return Source(pvc, pv, path, size)

    async def _take(self, snapshot: Obj, vsclass: Obj, source: Source, content: Obj | None) -> Obj:
        md = snapshot["metadata"]
        name = content_name_for(snapshot)
        data = self.directory / name
        # The data is made complete before the content exists (copy_data renames it into
        # place), so a content never names a half copy; a retry after a crash reuses it.
        if not await asyncio.to_thread(data.exists):
            await copy_data(source.path, data)
        taken_ns = time.time_ns()
        if content is None:
            mode = volume_mode(source.pv)
            manifest: Obj = {
                "apiVersion": SNAPSHOT_API_VERSION,
                "kind": "VolumeSnapshotContent",
                "metadata": {"name": name, "labels": {MANAGED_BY: COMPONENT}},
                "spec": {
                    "driver": PROVISIONER,
                    "deletionPolicy": vsclass.get("deletionPolicy") or "Delete",
                    "source": {"volumeHandle": source.pv["metadata"]["name"]},
                    "sourceVolumeMode": mode.value,
                    "volumeSnapshotClassName": vsclass["metadata"]["name"],
                    "volumeSnapshotRef": {
                        "apiVersion": SNAPSHOT_API_VERSION,
                        "kind": "VolumeSnapshot",
                        "name": md["name"],
                        "namespace": md["namespace"],
                        "uid": md["uid"],
                        "resourceVersion": md.get("resourceVersion"),
                    },
                },
            }
            try:
                content = await self.client.create(VOLUME_SNAPSHOT_CONTENT, manifest)
            except AlreadyExists:
                content = await self.client.get(VOLUME_SNAPSHOT_CONTENT, name)
        content = await self.client.patch(
            VOLUME_SNAPSHOT_CONTENT,
            name,
            {
                "status": {
                    "readyToUse": True,
                    "restoreSize": source.size,
                    "snapshotHandle": name,
                    "creationTime": taken_ns,
                    "error": None,
                }
            },
            subresource="status",
        )
        log.info(
            "%s: snapshot taken content=%s pvc=%s size=%d path=%s",
            key_of(snapshot),
            name,
            source.pvc["metadata"]["name"],
            source.size,
            data,
        )
        return content

    async def _set_ready(self, snapshot: Obj, content: Obj) -> None:
        md = snapshot["metadata"]
        self._errors.pop(md["uid"], None)
        status = content.get("status") or {}
        taken = datetime.fromtimestamp(int(status.get("creationTime") or 0) / 1e9, UTC)
        await self.client.patch(
            VOLUME_SNAPSHOT,
            md["name"],
            {
                "status": {
                    "boundVolumeSnapshotContentName": content["metadata"]["name"],
                    "readyToUse": True,
                    "restoreSize": format_size(int(status.get("restoreSize") or 0)),
                    "creationTime": taken.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "error": None,
                }
            },
            md["namespace"],
            subresource="status",
        )
        await self.events.once(
            {**snapshot, "apiVersion": SNAPSHOT_API_VERSION, "kind": "VolumeSnapshot"},
            "Normal",
            "SnapshotReady",
            f"Snapshot {key_of(snapshot)} is ready to use.",
        )

    async def _set_error(self, snapshot: Obj, message: str) -> None:
        """Say why the snapshot is not taken; written once per message, so that retries and
        our own status writes do not make an endless stream of updates."""
        md = snapshot["metadata"]
        status = snapshot.get("status") or {}
        written = (status.get("error") or {}).get("message") == message
        if self._errors.get(md["uid"]) == message or (
            written and status.get("readyToUse") is False
        ):
            return
        log.info("%s: snapshot waiting error=%s", key_of(snapshot), message)
        await self.client.patch(
            VOLUME_SNAPSHOT,
            md["name"],
            {"status": {"readyToUse": False, "error": {"message": message, "time": now()}}},
            md["namespace"],
            subresource="status",
        )
        self._errors[md["uid"]] = message

    # --- deleting snapshots -------------------------------------------------------------------

    async def deleted(self, snapshot: Obj) -> None:
        """A snapshot is gone: its content goes too when its deletion policy says Delete."""
        self._errors.pop(snapshot["metadata"].get("uid"), None)
        name = content_name_for(snapshot)
        try:
            content = await self.client.get(VOLUME_SNAPSHOT_CONTENT, name)
        except NotFound:
            await self._remove_data(name)  # made, but the content was never created
            return
        ref = (content.get("spec") or {}).get("volumeSnapshotRef") or {}
        if not is_our_content(content) or ref.get("uid") != snapshot["metadata"].get("uid"):
            return
        await self._delete_content(content)

    async def _delete_content(self, content: Obj) -> None:
        name = content["metadata"]["name"]
        if (content.get("spec") or {}).get("deletionPolicy") != "Delete":
            log.info("content=%s retained with its data", name)
            return
        await self._remove_data(name)
        with contextlib.suppress(NotFound):
            await self.client.delete(
                VOLUME_SNAPSHOT_CONTENT, name, uid=content["metadata"].get("uid")
            )
        log.info("content=%s deleted with its data", name)

    async def _remove_data(self, name: str) -> None:
        path = content_data_path(self.root, name)
        if path is None:
            log.warning("content=%s: not removing data for an unexpected name", name)
            return
        await asyncio.to_thread(remove_path, partial_path(path))
        await asyncio.to_thread(remove_path, path)

    async def collect_garbage(self, snapshots: list[Obj]) -> None:
        """After a relist: delete our contents whose snapshot is gone, and data no content
        names (a deletion or a crash this process did not see)."""
        alive = {str(s["metadata"].get("uid")) for s in snapshots}
        contents, _ = await self.client.list(VOLUME_SNAPSHOT_CONTENT)
        kept: set[str] = set()
        for content in contents:
            ref = (content.get("spec") or {}).get("volumeSnapshotRef") or {}
            if is_our_content(content) and str(ref.get("uid")) not in alive:
                await self._delete_content(content)
                if (content.get("spec") or {}).get("deletionPolicy") == "Delete":
                    continue
            kept.add(content["metadata"]["name"])
        entries = await asyncio.to_thread(_entries, self.directory)
        for entry in entries:
            name = entry.removeprefix(".partial-")
            if name in kept or name.removeprefix(CONTENT_PREFIX) in alive:
                continue  # a content's data, or a snapshot being taken
            if content_data_path(self.root, name) is not None:
                log.info("removing snapshot data with no content name=%s", entry)
                await self._remove_data(name)


def _entries(directory: Path) -> list[str]:
    try:
        return sorted(p.name for p in directory.iterdir())
    except FileNotFoundError:
        return []


def restore_mode(content: Obj) -> VolumeMode:
    """The volume mode a restore from this content must have (the snapshotted volume's)."""
    mode = (content.get("spec") or {}).get("sourceVolumeMode")
    return VolumeMode.BLOCK if mode == VolumeMode.BLOCK else VolumeMode.FILESYSTEM
