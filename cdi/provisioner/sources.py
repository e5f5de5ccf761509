"""Where a new local volume's data comes from: a PVC's `spec.dataSourceRef` (or `dataSource`).

* none: an empty volume;
* `snapshot.storage.k8s.io` VolumeSnapshot (same namespace, ready to use, taken by us): a copy
  of the snapshot's data (restore);
* core PersistentVolumeClaim (same namespace, Bound, on one of our volumes): a copy of that
  volume's data (CSI clone);
* anything else (CDI's VolumeImportSource and the other populator kinds): `FOREIGN`, another
  component fills the volume and the provisioner leaves the PVC alone.

The volume mode must be the source's, and the request at least the source's size (a larger
request gives a larger volume: the Block file is grown, a Filesystem volume's capacity is the
request). `resolve` only reads objects; the caller copies and binds.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Final

from cdi.api import format_size, parse_size
from cdi.api.groups import (
    PERSISTENT_VOLUME,
    PERSISTENT_VOLUME_CLAIM,
    SNAPSHOT_GROUP,
    VOLUME_SNAPSHOT,
    VOLUME_SNAPSHOT_CONTENT,
)
from cdi.api.quantity import QuantityError
from cdi.kube.client import Client
from cdi.kube.errors import NotFound
from cdi.provisioner.snapshots import content_data_path, is_our_content, restore_mode
from cdi.provisioner.volumes import (
    PROVISIONER,
    Obj,
    local_data_path,
    pv_name_for,
    volume_mode,
)

SNAPSHOT_KIND: Final = "VolumeSnapshot"
PVC_KIND: Final = "PersistentVolumeClaim"


class Kind(Enum):
    NONE = "none"
    SNAPSHOT = "snapshot"
    PVC = "pvc"
    FOREIGN = "foreign"


@dataclass(frozen=True, slots=True)
class Fill:
    """Copy `path` (a directory or a file) into the new volume."""

    path: Path
    description: str


@dataclass(frozen=True, slots=True)
class Wait:
    """The source is not there or not ready yet: stay Pending, try again later."""

    message: str


@dataclass(frozen=True, slots=True)
class Refuse:
    """The source can never fill this PVC as it is: stay Pending and say why."""

    message: str


Decision = Fill | Wait | Refuse


def data_source(pvc: Obj) -> Obj | None:
    """`dataSourceRef` when set (it is the more general field), else `dataSource`."""
    spec = pvc.get("spec") or {}
    ref = spec.get("dataSourceRef") or spec.get("dataSource")
    return ref if isinstance(ref, dict) and ref else None


def kind_of(pvc: Obj) -> Kind:
    ref = data_source(pvc)
    if ref is None:
        return Kind.NONE
    group, kind = ref.get("apiGroup") or "", ref.get("kind")
    if group == SNAPSHOT_GROUP and kind == SNAPSHOT_KIND:
        return Kind.SNAPSHOT
    if group == "" and kind == PVC_KIND:
        return Kind.PVC
    return Kind.FOREIGN


def names_source(pvc: Obj, kind: Kind, namespace: str, name: str) -> bool:
    """Whether `pvc` is filled from the object `namespace/name` of `kind` (to re-queue it when
    that object changes)."""
    ref = data_source(pvc) or {}
    md = pvc.get("metadata") or {}
    return (
        kind_of(pvc) is kind
        and md.get("namespace") == namespace
        and ref.get("name") == name
        and ref.get("namespace") in (None, namespace)
    )


async def resolve(client: Client, root: Path, pvc: Obj, *, request: str, size: int) -> Decision:
    """What fills the PVC, which has a data source of kind SNAPSHOT or PVC."""
    ref = data_source(pvc) or {}
    namespace = pvc["metadata"]["namespace"]
    name = ref.get("name")
    if not name:
        return Refuse("spec.dataSource has no name")
    if ref.get("namespace") not in (None, namespace):
        return Refuse("a data source in another namespace is not supported")
    if kind_of(pvc) is Kind.SNAPSHOT:
        return await _from_snapshot(client, root, pvc, str(name), request=request, size=size)
    return await _from_pvc(client, root, pvc, str(name), request=request, size=size)


async def _from_snapshot(
    client: Client, root: Path, pvc: Obj, name: str, *, request: str, size: int
) -> Decision:
    namespace = pvc["metadata"]["namespace"]
    try:
        snapshot = await client.get(VOLUME_SNAPSHOT, name, namespace)
    except NotFound:
        return Wait(f"waiting for VolumeSnapshot {name}: it does not exist")
    status = snapshot.get("status") or {}
    content_name = status.get("boundVolumeSnapshotContentName")
    if status.get("readyToUse") is not True or not content_name:
        return Wait(f"waiting for VolumeSnapshot {name} to be ready to use")
    try:
        content = await client.get(VOLUME_SNAPSHOT_CONTENT, str(content_name))
    except NotFound:
        return Wait(f"waiting for VolumeSnapshotContent {content_name} of VolumeSnapshot {name}")
    path = content_data_path(root, content_name)
    if not is_our_content(content) or path is None:
        return Refuse(f"VolumeSnapshot {name} was not taken by {PROVISIONER}")
    source_mode = restore_mode(content)
    if volume_mode(pvc) is not source_mode:
        return Refuse(
            f"volume mode {volume_mode(pvc).value} does not match the snapshot's source "
            f"volume mode {source_mode.value}"
        )
    restore_size = int((content.get("status") or {}).get("restoreSize") or 0)
    if size < restore_size:
        return Refuse(
            f"requested {request} is smaller than the snapshot's restore size "
            f"{format_size(restore_size)}"
        )
    return Fill(path, f"VolumeSnapshot {name}")


async def _from_pvc(
    client: Client, root: Path, pvc: Obj, name: str, *, request: str, size: int
) -> Decision:
    namespace = pvc["metadata"]["namespace"]
    try:
        source = await client.get(PERSISTENT_VOLUME_CLAIM, name, namespace)
    except NotFound:
        return Wait(f"waiting for source PersistentVolumeClaim {name}: it does not exist")
    spec, status = source.get("spec") or {}, source.get("status") or {}
    if status.get("phase") != "Bound" or not spec.get("volumeName"):
        return Wait(f"waiting for source PersistentVolumeClaim {name} to be bound")
    not_ours = Refuse(f"source PersistentVolumeClaim {name} is not a volume of {PROVISIONER}")
    if spec["volumeName"] != pv_name_for(source):
        return not_ours
    try:
        pv = await client.get(PERSISTENT_VOLUME, spec["volumeName"])
    except NotFound:
        return Wait(f"waiting for the volume of source PersistentVolumeClaim {name}")
    path = local_data_path(root, pv)
    if path is None:
        return not_ours
    if volume_mode(pvc) is not volume_mode(pv):
        return Refuse(
            f"volume mode {volume_mode(pvc).value} does not match the source volume mode "
            f"{volume_mode(pv).value}"
        )
    capacity = str(((pv.get("spec") or {}).get("capacity") or {}).get("storage") or "0")
    try:
        source_size = parse_size(capacity)
    except QuantityError:
        return Refuse(f"source PersistentVolumeClaim {name} has an invalid capacity {capacity!r}")
    if size < source_size:
        return Refuse(
            f"requested {request} is smaller than the source volume's size "
            f"{format_size(source_size)}"
        )
    return Fill(path, f"PersistentVolumeClaim {name}")
