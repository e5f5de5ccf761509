"""What a clone DataVolume needs before its PVC exists: source, size, strategy (CDI §7.1, §7.4).

`plan_clone(client, dv, manifest, ...)` is called by the DataVolume reconciler with the claim it
rendered for a DataVolume whose source is `pvc` or `snapshot`. It answers either `Waiting` (the
DataVolume's phase, a reason and a message; nothing is created yet: a missing source, a source
still being filled, a snapshot being taken) or `Ready` with the claim to create:

* size: with the storage API and no size, the source's size: a Block source's capacity, a
  Filesystem source's usable size (what its disk image may take), inflated by the target's
  filesystem overhead for a Filesystem target. A host-assisted copy of a Filesystem kubevirt
  source takes the virtual size of its image instead, read by CDI's size-detection pod
  (`cdi.controller.sizedetection`; `Waiting` with its reasons until it answered). A target
  smaller than the source is refused (`Failed`, CDI's ErrIncompatiblePVC wording) unless the
  DataVolume is annotated
  `cdi.kubevirt.io/permissiveClone: "true"`. Content types must match.
* strategy: the DataVolume's `cdi.kubevirt.io/clone-strategy` annotation (set by `cdi clone
  --strategy`), else the CDI resource's `spec.cloneStrategyOverride`, else the target class's
  StorageProfile `status.cloneStrategy`, else `snapshot`. `snapshot` and `csi-clone` need the same
  provisioner and volume mode on both sides, expansion when the target is larger, a
  VolumeSnapshotClass for the driver (snapshot) and, here, the same namespace (a cross-namespace
  smart clone needs a PV rebind this controller does not do); otherwise the clone is done by copy
  and the claim carries `cdi.kubevirt.io/cloneFallbackReason`.
* copy: the claim is annotated `k8s.io/CloneRequest: <ns>/<name>` and `uploadClientName` (the
  client certificate CN the target's upload server accepts); `cdi.controller.uploading` starts
  the upload server, `cdi.controller.cloning` the source pod.
* snapshot: a VolumeSnapshot `tmp-snapshot-<dv uid>` of the source (owned by the DataVolume) is
  taken; once ready the claim is created with it as `spec.dataSource`; the snapshot is deleted
  when the claim is Bound (`finish_smart_clone`).
* csi-clone: the claim is created with the source PVC as `spec.dataSource`.
A `snapshot` source is restored directly when it is in the same namespace and its driver and
volume mode fit the target; other cases are refused with a message saying why.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Final

from cdi.api import ContentType, VolumeMode, parse_overhead, parse_size
from cdi.api import annotations as ann
from cdi.api.groups import (
    CDI,
    PERSISTENT_VOLUME_CLAIM,
    SNAPSHOT_API_VERSION,
    SNAPSHOT_GROUP,
    VOLUME_SNAPSHOT,
    VOLUME_SNAPSHOT_CLASS,
)
from cdi.api.phases import CloneStrategy, DataVolumePhase, PodPhase
from cdi.api.quantity import QuantityError
from cdi.api.space import required_size, usable_size
from cdi.controller import sizedetection
from cdi.controller.config import class_overhead
from cdi.controller.rendering import decimal_si
from cdi.kube.client import Client
from cdi.kube.errors import AlreadyExists, ApiError, NotFound

log = logging.getLogger(__name__)

Obj = dict[str, Any]

REASON_NO_SOURCE: Final = "CloneWithoutSource"
REASON_SOURCE_NOT_READY: Final = "CloneSourceNotReady"
REASON_INCOMPATIBLE: Final = "ErrIncompatiblePVC"
REASON_SNAPSHOT_NOT_READY: Final = "SnapshotForSmartCloneInProgress"
DEFAULT_SNAPSHOT_CLASS: Final = "snapshot.storage.kubernetes.io/is-default-class"
SNAPSHOT_PREFIX: Final = "tmp-snapshot-"
#: On every clone target (any strategy): `<namespace>/<name>` of the source, for status messages.
CLONE_SOURCE_ANNOTATION: Final = "cdi.kubevirt.io/storage.clone.source"
WAIT: Final = 2.0
SIZE_POLL: Final = 5.0  # the pod wakes the DataVolume that started it; others look this often
CN_MAX: Final = 64


@dataclass(frozen=True, slots=True)
class CloneSource:
    kind: str  # "pvc" | "snapshot"
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class Waiting:
    phase: DataVolumePhase
    reason: str
    message: str
    requeue: float | None = WAIT


@dataclass(frozen=True, slots=True)
class Ready:
    manifest: Obj
    events: list[tuple[str, str]] = field(default_factory=list)


def clone_source(dv: Mapping[str, Any]) -> CloneSource | None:
    spec = dv.get("spec") or {}
    source = spec.get("source") or {}
    namespace = str((dv.get("metadata") or {}).get("namespace", ""))
    for kind in ("pvc", "snapshot"):
        if (found := source.get(kind)) is not None:
            return CloneSource(kind, str(found.get("namespace") or namespace), str(found["name"]))
    return None


def clone_client_name(source: CloneSource, namespace: str, name: str) -> str:
    """The client certificate CN of a clone's source pod: CDI's `<src ns>/<src>-<ns>/<name>`,
    or, past X.509's 64 characters for a CN, its start with a hash of the whole."""
    full = f"{source}-{namespace}/{name}"
    if len(full) <= CN_MAX:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:16]
    return f"{full[: CN_MAX - len(digest) - 1]}-{digest}"


def _annotations(obj: Mapping[str, Any]) -> Mapping[str, str]:
    return (obj.get("metadata") or {}).get("annotations") or {}


def _bytes(quantity: object) -> int:
    try:
        return parse_size(str(quantity))
    except (QuantityError, ValueError):
        return 0


def claim_capacity(pvc: Mapping[str, Any]) -> int:
    """Bytes a claim holds: its bound capacity, else its request."""
    capacity = ((pvc.get("status") or {}).get("capacity") or {}).get("storage")
    if capacity is None:
        capacity = (
            ((pvc.get("spec") or {}).get("resources") or {}).get("requests", {}).get("storage")
        )
    return _bytes(capacity)


def volume_mode(pvc: Mapping[str, Any]) -> str:
    return str((pvc.get("spec") or {}).get("volumeMode") or VolumeMode.FILESYSTEM.value)


def _overhead(config_status: Mapping[str, Any], pvc: Mapping[str, Any]) -> Fraction:
    if volume_mode(pvc) == VolumeMode.BLOCK:
        return Fraction(0)
    class_name = (pvc.get("spec") or {}).get("storageClassName")
    return parse_overhead(class_overhead(config_status, class_name))


def usable(pvc: Mapping[str, Any], size: int, config_status: Mapping[str, Any]) -> int:
    """Bytes a disk image may take in `pvc` when it holds `size` bytes."""
    if volume_mode(pvc) == VolumeMode.BLOCK:
        return size
    return usable_size(size, _overhead(config_status, pvc))


def _gib(size: int) -> str:
    return f"{size / (1 << 30):.2f} GiB"


def populated(pvc: Mapping[str, Any]) -> bool:
    """A source is ready to copy when no CDI worker is (or will be) filling it."""
    annotations = _annotations(pvc)
    filled_by_cdi = any(
        key in annotations
        for key in (ann.IMPORT_SOURCE, ann.IMPORT_ENDPOINT, ann.UPLOAD_TARGET, ann.CLONE_REQUEST)
    )
    if not filled_by_cdi:
        return True
    return annotations.get(ann.POD_PHASE) == PodPhase.SUCCEEDED


async def _cdi_override(client: Client) -> str | None:
    try:
        items, _ = await client.list(CDI)
    except ApiError:
        return None
    for item in items:
        if value := (item.get("spec") or {}).get("cloneStrategyOverride"):
            return str(value)
    return None


def _find(items: list[Obj], name: object) -> Obj | None:
    return next((i for i in items if i["metadata"]["name"] == name), None)


async def snapshot_class_for(
    client: Client, driver: str, profile: Mapping[str, Any] | None
) -> str | None:
    """The VolumeSnapshotClass for `driver`: the profile's, else the default one, else the first."""
    try:
        classes, _ = await client.list(VOLUME_SNAPSHOT_CLASS)
    except ApiError:
        return None
    matching = [c for c in classes if c.get("driver") == driver]
    wanted = ((profile or {}).get("spec") or {}).get("snapshotClass") or (
        (profile or {}).get("status") or {}
    ).get("snapshotClass")
    if wanted:
        return str(wanted) if _find(matching, wanted) is not None else None
    for c in matching:
        if _annotations(c).get(DEFAULT_SNAPSHOT_CLASS) == "true":
            return str(c["metadata"]["name"])
    return str(matching[0]["metadata"]["name"]) if matching else None


@dataclass(slots=True)
class _Context:
    client: Client
    dv: Mapping[str, Any]
    manifest: Obj
    classes: list[Obj]
    profiles: list[Obj]
    config_status: Mapping[str, Any]
    local: bool = False
    size_from_source: bool = False  # the DataVolume gave no size: `_size` took the source's

    @property
    def namespace(self) -> str:
        return str(self.dv["metadata"]["namespace"])

    @property
    def name(self) -> str:
        return str(self.dv["metadata"]["name"])

    @property
    def target_class(self) -> Obj | None:
        return _find(self.classes, (self.manifest.get("spec") or {}).get("storageClassName"))

    def provisioner_of(self, class_name: object) -> str:
        sc = _find(self.classes, class_name)
        return str((sc or {}).get("provisioner") or "")


async def plan_clone(
    client: Client,
    dv: Mapping[str, Any],
    manifest: Obj,
    *,
    classes: list[Obj],
    profiles: list[Obj],
    config_status: Mapping[str, Any],
    local: bool = False,
) -> Waiting | Ready:
    source = clone_source(dv)
    assert source is not None
    ctx = _Context(client, dv, manifest, classes, profiles, config_status, local)
    if source.kind == "snapshot":
        return await _plan_from_snapshot(ctx, source)
    try:
        src = await client.get(PERSISTENT_VOLUME_CLAIM, source.name, source.namespace)
    except NotFound:
        return Waiting(
            DataVolumePhase.PENDING,
            REASON_NO_SOURCE,
            f"source PVC {source} not found; the clone starts when it exists",
            requeue=5.0,
        )
    if (src.get("status") or {}).get("phase") != "Bound" or not populated(src):
        return Waiting(
            DataVolumePhase.PENDING,
            REASON_SOURCE_NOT_READY,
            f"source PVC {source} is not ready yet (not bound, or still being populated)",
            requeue=5.0,
        )
    if problem := _content_problem(ctx, src):
        return Waiting(DataVolumePhase.FAILED, REASON_INCOMPATIBLE, problem, requeue=None)
    if problem := _size(ctx, src, source):
        return Waiting(DataVolumePhase.FAILED, REASON_INCOMPATIBLE, problem, requeue=None)

    strategy = await _strategy(ctx)
    fallback = await _smart_problem(ctx, src, source, strategy)
    events: list[tuple[str, str]] = []
    annotations = manifest["metadata"].setdefault("annotations", {})
    if strategy != CloneStrategy.COPY and fallback is not None:
        reason, text = fallback
        log.info("%s/%s clone falls back to copy: %s", ctx.namespace, ctx.name, text)
        annotations[ann.CLONE_FALLBACK_REASON] = text
        events.append((reason, text))
        strategy = CloneStrategy.COPY
    annotations[ann.CLONE_TYPE] = strategy.value
    annotations[CLONE_SOURCE_ANNOTATION] = str(source)
    if strategy == CloneStrategy.COPY:
        if waiting := await _detected_size(ctx, src):
            return waiting
        annotations[ann.CLONE_REQUEST] = str(source)
        annotations[ann.UPLOAD_CLIENT_NAME] = clone_client_name(source, ctx.namespace, ctx.name)
        return Ready(manifest, events)
    if strategy == CloneStrategy.CSI_CLONE:
        manifest["spec"]["dataSource"] = {"kind": "PersistentVolumeClaim", "name": source.name}
        return Ready(manifest, events)
    snapshot = await _ensure_snapshot(ctx, source)
    if not (snapshot.get("status") or {}).get("readyToUse"):
        error = ((snapshot.get("status") or {}).get("error") or {}).get("message")
        snap = f"{source.namespace}/{snapshot['metadata']['name']}"
        text = f"snapshot {snap} of {source} is not ready"
        return Waiting(
            DataVolumePhase.SNAPSHOT_FOR_SMART_CLONE_IN_PROGRESS,
            REASON_SNAPSHOT_NOT_READY,
            f"{text}: {error}" if error else text,
            requeue=5.0,  # the snapshot's own events wake the DataVolume (it owns the snapshot)
        )
    manifest["spec"]["dataSource"] = {
        "apiGroup": SNAPSHOT_GROUP,
        "kind": VOLUME_SNAPSHOT.kind,
        "name": snapshot["metadata"]["name"],
    }
    return Ready(manifest, events)


def _content_problem(ctx: _Context, src: Mapping[str, Any]) -> str | None:
    source_content = _annotations(src).get(ann.CONTENT_TYPE) or ContentType.KUBEVIRT.value
    target_content = _annotations(ctx.manifest).get(ann.CONTENT_TYPE) or ContentType.KUBEVIRT.value
    if source_content != target_content:
        return (
            f"source PVC content type {source_content} does not match the DataVolume's "
            f"{target_content}; set spec.contentType to {source_content}"
        )
    if source_content == ContentType.ARCHIVE and volume_mode(src) != volume_mode(ctx.manifest):
        return "archive content can only be cloned between Filesystem volumes"
    return None


def _size(ctx: _Context, src: Mapping[str, Any], source: CloneSource) -> str | None:
    """Fill in an empty size from the source, or check the given one (None when fine)."""
    spec = ctx.manifest["spec"]
    requests = spec.setdefault("resources", {}).setdefault("requests", {})
    source_bytes = usable(src, claim_capacity(src), ctx.config_status)
    if _bytes(requests.get("storage", "0")) == 0:
        ctx.size_from_source = True
        size = source_bytes
        if volume_mode(ctx.manifest) != VolumeMode.BLOCK:
            size = required_size(size, _overhead(ctx.config_status, ctx.manifest))
        requests["storage"] = decimal_si(size)
        return None
    if _annotations(ctx.dv).get(ann.PERMISSIVE_CLONE) == "true":
        return None
    target_bytes = usable(ctx.manifest, _bytes(requests["storage"]), ctx.config_status)
    if target_bytes < source_bytes:
        return (
            f"target resources requests storage size is smaller than the source: the target "
            f"holds {target_bytes} bytes ({_gib(target_bytes)}) of data, the source PVC "
            f"{source} {source_bytes} bytes ({_gib(source_bytes)}); request more, or annotate "
            f"the DataVolume {ann.PERMISSIVE_CLONE}=true"
        )
    return None


async def _detected_size(ctx: _Context, src: Obj) -> Waiting | None:
    """A host-assisted copy with no size, of a Filesystem kubevirt source: the target is sized
    from the virtual size of the source's image, as CDI's size-detection pod reads it (a smart
    clone keeps the source's size: a restored volume cannot be smaller than its snapshot)."""
    content = _annotations(src).get(ann.CONTENT_TYPE) or ContentType.KUBEVIRT.value
    if (
        not ctx.size_from_source
        or volume_mode(src) == VolumeMode.BLOCK
        or content != ContentType.KUBEVIRT
    ):
        return None
    found = await sizedetection.detect(
        ctx.client,
        src,
        cdi_config_status=ctx.config_status,
        local=ctx.local,
        requester=f"{ctx.namespace}/{ctx.name}",
    )
    if isinstance(found, sizedetection.Pending):
        return Waiting(DataVolumePhase.PENDING, found.reason, found.message, requeue=SIZE_POLL)
    size = found
    if volume_mode(ctx.manifest) != VolumeMode.BLOCK:
        size = required_size(size, _overhead(ctx.config_status, ctx.manifest))
    ctx.manifest["spec"]["resources"]["requests"]["storage"] = decimal_si(size)
    return None


async def _strategy(ctx: _Context) -> CloneStrategy:
    candidates: list[object] = [_annotations(ctx.dv).get(ann.STORAGE_CLASS_CLONE_STRATEGY)]
    candidates.append(await _cdi_override(ctx.client))
    class_name = (ctx.manifest.get("spec") or {}).get("storageClassName")
    profile = _find(ctx.profiles, class_name)
    candidates.append(((profile or {}).get("status") or {}).get("cloneStrategy"))
    for value in candidates:
        if value:
            with contextlib.suppress(ValueError):
                return CloneStrategy(str(value))
    return CloneStrategy.SNAPSHOT


async def _smart_problem(
    ctx: _Context, src: Mapping[str, Any], source: CloneSource, strategy: CloneStrategy
) -> tuple[str, str] | None:
    """Why a snapshot or CSI clone cannot be done (CDI's reasons), None when it can."""
    if strategy == CloneStrategy.COPY:
        return None
    source_class = (src.get("spec") or {}).get("storageClassName")
    target_class = (ctx.manifest.get("spec") or {}).get("storageClassName")
    driver = ctx.provisioner_of(source_class)
    if not driver or driver != ctx.provisioner_of(target_class):
        return (
            "IncompatibleProvisioners",
            f"source class {source_class} and target class {target_class} have different "
            "provisioners",
        )
    if volume_mode(src) != volume_mode(ctx.manifest):
        return (
            "IncompatibleVolumeModes",
            f"source volume mode {volume_mode(src)} differs from the target's "
            f"{volume_mode(ctx.manifest)}",
        )
    if source.namespace != ctx.namespace:
        return (
            "CrossNamespaceSmartClone",
            "a smart clone across namespaces needs a PV rebind, which this controller does not "
            "do; copying instead",
        )
    target_size = _bytes(ctx.manifest["spec"]["resources"]["requests"]["storage"])
    if target_size > claim_capacity(src) and not (ctx.target_class or {}).get(
        "allowVolumeExpansion"
    ):
        return (
            "NoVolumeExpansion",
            f"the target is larger than the source and class {target_class} does not allow "
            "volume expansion",
        )
    if strategy == CloneStrategy.SNAPSHOT:
        profile = _find(ctx.profiles, target_class)
        if await snapshot_class_for(ctx.client, driver, profile) is None:
            return ("NoVolumeSnapshotClass", f"no VolumeSnapshotClass for driver {driver}")
    return None


def snapshot_name(dv: Mapping[str, Any]) -> str:
    return f"{SNAPSHOT_PREFIX}{dv['metadata']['uid']}"


async def _ensure_snapshot(ctx: _Context, source: CloneSource) -> Obj:
    name = snapshot_name(ctx.dv)
    with contextlib.suppress(NotFound):
        return await ctx.client.get(VOLUME_SNAPSHOT, name, source.namespace)
    source_class = None
    with contextlib.suppress(NotFound):
        src = await ctx.client.get(PERSISTENT_VOLUME_CLAIM, source.name, source.namespace)
        source_class = (src.get("spec") or {}).get("storageClassName")
    driver = ctx.provisioner_of(source_class)
    class_name = await snapshot_class_for(
        ctx.client, driver, _find(ctx.profiles, (ctx.manifest["spec"]).get("storageClassName"))
    )
    manifest: Obj = {
        "apiVersion": SNAPSHOT_API_VERSION,
        "kind": VOLUME_SNAPSHOT.kind,
        "metadata": {
            "name": name,
            "namespace": source.namespace,
            "labels": {ann.LABEL_APP: ann.LABEL_APP_VALUE},
            "annotations": {ann.OWNER_UID: str(ctx.dv["metadata"]["uid"])},
            "ownerReferences": [
                {
                    "apiVersion": str(ctx.dv.get("apiVersion", "cdi.kubevirt.io/v1beta1")),
                    "kind": "DataVolume",
                    "name": ctx.name,
                    "uid": str(ctx.dv["metadata"]["uid"]),
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {"source": {"persistentVolumeClaimName": source.name}},
    }
    if class_name:
        manifest["spec"]["volumeSnapshotClassName"] = class_name
    try:
        created = await ctx.client.create(VOLUME_SNAPSHOT, manifest, source.namespace)
        log.info("%s/%s snapshot %s of %s created", ctx.namespace, ctx.name, name, source)
        return created
    except AlreadyExists:
        return await ctx.client.get(VOLUME_SNAPSHOT, name, source.namespace)


async def _plan_from_snapshot(ctx: _Context, source: CloneSource) -> Waiting | Ready:
    try:
        snapshot = await ctx.client.get(VOLUME_SNAPSHOT, source.name, source.namespace)
    except NotFound:
        return Waiting(
            DataVolumePhase.PENDING,
            REASON_NO_SOURCE,
            f"source VolumeSnapshot {source} not found; the clone starts when it exists",
            requeue=5.0,
        )
    status = snapshot.get("status") or {}
    if not status.get("readyToUse"):
        return Waiting(
            DataVolumePhase.PENDING,
            REASON_SOURCE_NOT_READY,
            f"source VolumeSnapshot {source} is not ready to use yet",
            requeue=2.0,
        )
    if source.namespace != ctx.namespace:
        return Waiting(
            DataVolumePhase.FAILED,
            REASON_INCOMPATIBLE,
            f"restoring VolumeSnapshot {source} into namespace {ctx.namespace} is not supported "
            "here; clone from a PVC restored in the snapshot's namespace instead",
            requeue=None,
        )
    restore = _bytes(status.get("restoreSize") or "0")
    requests = ctx.manifest["spec"].setdefault("resources", {}).setdefault("requests", {})
    if _bytes(requests.get("storage", "0")) == 0:
        requests["storage"] = decimal_si(restore) if restore else "1Gi"
    annotations = ctx.manifest["metadata"].setdefault("annotations", {})
    annotations[ann.CLONE_TYPE] = CloneStrategy.SNAPSHOT.value
    annotations[CLONE_SOURCE_ANNOTATION] = f"snapshot {source}"
    ctx.manifest["spec"]["dataSource"] = {
        "apiGroup": SNAPSHOT_GROUP,
        "kind": VOLUME_SNAPSHOT.kind,
        "name": source.name,
    }
    return Ready(ctx.manifest)


async def finish_smart_clone(client: Client, dv: Mapping[str, Any]) -> None:
    """The temporary snapshot of a smart clone, deleted once the target is Bound."""
    source = clone_source(dv)
    if source is None or source.kind != "pvc":
        return
    with contextlib.suppress(NotFound):
        await client.delete(VOLUME_SNAPSHOT, snapshot_name(dv), source.namespace)
        log.info("%s snapshot %s deleted", source.namespace, snapshot_name(dv))
