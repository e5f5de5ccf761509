"""The import reconciler: one importer pod per PVC that carries `storage.import.*` annotations.

Owns, per target PVC (the primary key; pods it owns are watched): creating the importer pod
(`podspecs.importer_pod`, name from `naming.importer_pod_name`, recorded in
`storage.import.importPodName`) once the PVC is Bound; the scratch PVC (`render_scratch_pvc`)
when `storage.import.requiresScratch=true`; mirroring the pod into the PVC annotations CDI
writes (`storage.pod.phase`, `storage.pod.restarts`, `storage.condition.running*`,
`storage.preallocation`, `storage.import.fatalError`); deleting the pod and the scratch PVC when
the import is done, and the pod when it failed permanently (checksum mismatch, unsafe image,
image larger than the PVC: better than CDI, which restarts such pods forever).

Called by `cdi.controller.manager` through a `Controller`. Must not write DataVolumes (their
status is `cdi.controller.datavolume`'s, derived from the annotations written here) and must
stay idempotent: names are deterministic and AlreadyExists counts as success, so a controller
killed at any point converges on restart without duplicate pods or PVCs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from cdi.api import SourceType, VolumeMode
from cdi.api import annotations as ann
from cdi.api.groups import CDI_CONFIG, CDI_CONFIG_NAME, CONFIG_MAP, PERSISTENT_VOLUME_CLAIM, POD
from cdi.api.phases import ConditionReason, PodPhase, PVCPhase
from cdi.api.termination import TerminationMessage, TerminationMessageError
from cdi.controller import claims, naming
from cdi.controller.events import WARNING, record_event
from cdi.controller.podspecs import importer_pod, owner_uid_for
from cdi.controller.rendering import RenderError, render_scratch_pvc
from cdi.controller.runtime import Request, Result
from cdi.kube.client import Client
from cdi.kube.errors import AlreadyExists, NotFound

log = logging.getLogger(__name__)

Obj = dict[str, Any]

IMPORTER_IMAGE: Final = "quay.io/kubevirt/cdi-importer:latest"
#: Where CDI's own objects live (the import proxy's CA ConfigMap among them).
CDI_NAMESPACE: Final = "cdi"
#: Substrings of an importer failure message that no retry can fix.
FATAL_MARKERS: Final = ("checksum mismatch", "refusing unsafe", "A larger PVC is required")
#: Seconds between polls while a pod we deleted is still going away.
GONE_POLL: Final = 0.5
#: Seconds between looks while the CDIConfig status (written by the manager) is missing.
CONFIG_POLL: Final = 1.0
#: Seconds between looks for something that sends no event (the proxy CA ConfigMap).
WAIT_POLL: Final = 2.0


def is_import_pvc(pvc: Mapping[str, Any]) -> bool:
    annotations = (pvc.get("metadata") or {}).get("annotations") or {}
    return ann.IMPORT_SOURCE in annotations or ann.IMPORT_ENDPOINT in annotations


def fatal_reason(message: str) -> str | None:
    """The Running reason for a permanent failure message, None when a retry may help."""
    if "checksum mismatch" in message:
        return ConditionReason.CHECKSUM_ERROR.value
    if any(marker in message for marker in FATAL_MARKERS):
        return ConditionReason.ERROR.value
    return None


#: Messages CDI normalises to MESSAGE_TOO_SMALL (§3.2).
SIZE_MARKERS: Final = (
    "is larger than the reported available",
    "no space left on device",
    "file largest block is bigger than maxblock",
    "disk quota exceeded",
)
MESSAGE_TOO_SMALL: Final = "DataVolume too small to contain image"


def first_line(text: str) -> str:
    stripped = text.strip()
    line = stripped.splitlines()[0] if stripped else ""
    return MESSAGE_TOO_SMALL if any(m in line for m in SIZE_MARKERS) else line


def _terminated_message(terminated: Mapping[str, Any]) -> str:
    text = str(terminated.get("message") or "")
    if int(terminated.get("exitCode") or 0) == 0:
        try:
            parsed = TerminationMessage.from_json(text)
        except TerminationMessageError:
            return first_line(text)
        return parsed.message or ""
    return first_line(text)


#: Waiting reasons that mean the image could not be pulled (CDI: reason ImagePullFailed).
IMAGE_PULL_WAITING: Final = frozenset({"ImagePullBackOff", "ErrImagePull", "InvalidImageName"})
#: Waiting reasons that say nothing new: the last termination explains more.
UNINFORMATIVE_WAITING: Final = frozenset({"CrashLoopBackOff", "ContainerCreating", ""})
MESSAGE_UNSCHEDULABLE: Final = "Importer pod cannot be scheduled"
PULL_FAILED_MARKER: Final = "failed to pull image"


def _schedulable(pod: Mapping[str, Any]) -> str | None:
    """`storage.pod.schedulable`: "false" while the pod is Unschedulable, "true" once it was
    scheduled, None while the pod says neither."""
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") != "PodScheduled":
            continue
        if cond.get("status") == "True":
            return "true"
        if cond.get("reason") == ConditionReason.UNSCHEDULABLE:
            return "false"
    return None


def running_annotations(pod: Mapping[str, Any]) -> dict[str, str]:
    """`storage.condition.running*` and `storage.pod.schedulable` from the importer pod (CDI
    §3.2): running, then a terminated state, then an informative waiting state (a missing
    secret, a failed pull), then the previous termination, then an Unschedulable pod."""
    scheduled = _schedulable(pod)
    schedulable = {ann.POD_SCHEDULABLE: scheduled} if scheduled else {}
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    status = statuses[0] if statuses else {}
    state = status.get("state") or {}
    last = status.get("lastState") or {}
    waiting = state.get("waiting") or {}
    waiting_reason = str(waiting.get("reason") or "")
    if "running" in state:
        running = ("true", ConditionReason.POD_RUNNING.value, "")
    elif terminated := state.get("terminated"):
        running = _terminated(terminated)
    elif waiting_reason in IMAGE_PULL_WAITING:
        image = str(status.get("image") or "")
        message = f"{PULL_FAILED_MARKER}: {image}" if image else PULL_FAILED_MARKER
        running = ("false", ConditionReason.IMAGE_PULL_FAILED.value, message)
    elif waiting and waiting_reason not in UNINFORMATIVE_WAITING:
        running = ("false", waiting_reason, str(waiting.get("message") or ""))
    elif terminated := last.get("terminated"):
        running = _terminated(terminated)
    elif scheduled == "false":
        running = ("false", ConditionReason.UNSCHEDULABLE.value, MESSAGE_UNSCHEDULABLE)
    elif waiting:
        running = ("false", waiting_reason, str(waiting.get("message") or ""))
    else:
        return schedulable
    flag, reason, message = running
    return {
        **schedulable,
        ann.CONDITION_RUNNING: flag,
        ann.CONDITION_RUNNING_REASON: reason,
        ann.CONDITION_RUNNING_MESSAGE: message,
    }


def _terminated(terminated: Mapping[str, Any]) -> tuple[str, str, str]:
    message = _terminated_message(terminated)
    reason = str(terminated.get("reason") or "Error")
    if PULL_FAILED_MARKER in message:
        reason = ConditionReason.IMAGE_PULL_FAILED.value
    return "false", reason, message


@dataclass(frozen=True, slots=True)
class WorkerFailure:
    """A worker container's last failed run, as the reconcilers judge it."""

    text: str
    """For the Running condition: the first line, in CDI's wording (size errors normalised)."""
    detail: str
    """The worker's own first line (with the sizes of a too-small volume): events and logs."""
    reason: str | None
    """The Running reason when no retry can help (`fatal_reason`), else None."""


def worker_failure(pod: Mapping[str, Any]) -> WorkerFailure | None:
    """The worker's current or previous termination with a non-zero exit, judged; None when
    it has not failed."""
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    if not statuses:
        return None
    for where in ("state", "lastState"):
        terminated = (statuses[0].get(where) or {}).get("terminated")
        if terminated and int(terminated.get("exitCode") or 0) != 0:
            full = str(terminated.get("message") or "").strip()
            detail = full.splitlines()[0] if full else ""
            # The worker's own line decides finality: the normalised one hides the marker.
            return WorkerFailure(first_line(full), detail, fatal_reason(detail))
    return None


class ImportReconciler:
    """Reconciles one PVC key; see the module docstring."""

    def __init__(
        self,
        client: Client,
        *,
        local: bool,
        image: str = IMPORTER_IMAGE,
        cdi_namespace: str = CDI_NAMESPACE,
    ) -> None:
        self.client = client
        self.local = local
        self.image = image
        self.cdi_namespace = cdi_namespace

    async def __call__(self, request: Request) -> Result:
        try:
            pvc = await self.client.get(PERSISTENT_VOLUME_CLAIM, request.name, request.namespace)
        except NotFound:
            return Result()  # the pod and the scratch PVC are owned: the GC removes them
        if not is_import_pvc(pvc) or (pvc.get("metadata") or {}).get("deletionTimestamp"):
            return Result()
        annotations: dict[str, str] = pvc["metadata"].get("annotations") or {}
        pod_name = annotations.get(ann.IMPORT_POD_NAME) or naming.importer_pod_name(request.name)
        if annotations.get(ann.POD_PHASE) == PodPhase.SUCCEEDED:
            await self._cleanup(request, pod_name, scratch=True)
            return Result()
        if annotations.get(ann.FATAL_ERROR) == "true":
            await self._cleanup(request, pod_name, scratch=True)
            return Result()
        if (pvc.get("status") or {}).get("phase") != PVCPhase.BOUND:
            return Result()
        if self._blank_without_pod(pvc):
            log.info("%s blank block volume needs no importer pod", request)
            await self._annotate(
                pvc,
                {
                    ann.POD_PHASE: PodPhase.SUCCEEDED.value,
                    ann.CONDITION_RUNNING: "false",
                    ann.CONDITION_RUNNING_REASON: ConditionReason.COMPLETED.value,
                    ann.CONDITION_RUNNING_MESSAGE: "Import Complete",
                },
            )
            return Result()
        try:
            pod: Obj | None = await self.client.get(POD, pod_name, request.namespace)
        except NotFound:
            pod = None
        if pod is not None and (pod.get("metadata") or {}).get("deletionTimestamp"):
            return Result(requeue_after=GONE_POLL)
        if pod is None:
            return await self._start(pvc, pod_name)
        if annotations.get(ann.REQUIRES_SCRATCH) == "true":
            await self._ensure_scratch(pvc, pod)
        if (pod.get("status") or {}).get("phase", PodPhase.PENDING) == PodPhase.PENDING:
            status, _ = await self._config()
            if not await self._copy_proxy_ca(pvc, status):
                await self._mirror(pvc, pod)
                return Result(requeue_after=WAIT_POLL)
        return await self._mirror(pvc, pod)

    def _blank_without_pod(self, pvc: Mapping[str, Any]) -> bool:
        annotations = pvc["metadata"].get("annotations") or {}
        return (
            annotations.get(ann.IMPORT_SOURCE) == SourceType.NONE
            and (pvc.get("spec") or {}).get("volumeMode") == VolumeMode.BLOCK
            and annotations.get(ann.PREALLOCATION_REQUESTED) != "true"
        )

    async def _config(self) -> tuple[Obj, Obj]:
        try:
            config = await self.client.get(CDI_CONFIG, CDI_CONFIG_NAME)
        except NotFound:
            return {}, {}
        return dict(config.get("status") or {}), dict(config.get("spec") or {})

    async def _start(self, pvc: Obj, pod_name: str) -> Result:
        meta = pvc["metadata"]
        ns, name = str(meta["namespace"]), str(meta["name"])
        annotations = meta.get("annotations") or {}
        status, spec = await self._config()
        if not status:
            log.info("%s/%s waiting for the CDIConfig status", ns, name)
            return Result(requeue_after=CONFIG_POLL)
        scratch = annotations.get(ann.REQUIRES_SCRATCH) == "true"
        try:
            manifest = importer_pod(
                pvc,
                image=self.image,
                cdi_config_status=status,
                scratch_pvc=naming.scratch_pvc_name(name) if scratch else None,
                owner_uid=owner_uid_for(pvc),
                local=self.local,
                insecure_registries=[str(r) for r in spec.get("insecureRegistries") or []],
            )
        except RenderError as err:
            log.warning("%s/%s importer pod not valid error=%s", ns, name, err)
            await self._annotate(
                pvc,
                {
                    ann.CONDITION_RUNNING: "false",
                    ann.CONDITION_RUNNING_REASON: err.reason,
                    ann.CONDITION_RUNNING_MESSAGE: str(err),
                },
            )
            return Result()
        manifest["metadata"]["name"] = pod_name
        await self._copy_proxy_ca(pvc, status)
        try:
            pod = await self.client.create(POD, manifest, ns)
            log.info("%s/%s importer pod created pod=%s scratch=%s", ns, name, pod_name, scratch)
        except AlreadyExists:
            pod = await self.client.get(POD, pod_name, ns)
        wanted = {ann.IMPORT_POD_NAME: pod_name}
        if not annotations.get(ann.POD_PHASE) or annotations.get(ann.POD_PHASE) not in (
            PodPhase.RUNNING,
            PodPhase.FAILED,
        ):
            wanted[ann.POD_PHASE] = PodPhase.PENDING.value
        await self._annotate(pvc, wanted)
        if scratch:
            await self._ensure_scratch(pvc, pod)
        return Result()

    async def _copy_proxy_ca(self, pvc: Obj, cdi_config_status: Mapping[str, Any]) -> bool:
        """Copy CDIConfig importProxy.trustedCAProxy (a ConfigMap of the CDI namespace) next to
        the PVC as `import-proxy-cm-<pvc>`, owned by the PVC: pods mount only ConfigMaps of
        their own namespace. A missing source leaves the pod waiting for the copy, as CDI, and
        answers False: nothing sends us an event when it appears."""
        proxy = cdi_config_status.get("importProxy") or {}
        source_name = str(proxy.get("trustedCAProxy") or "")
        if not source_name:
            return True
        meta = pvc["metadata"]
        ns, name = str(meta["namespace"]), str(meta["name"])
        copy_name = naming.import_proxy_config_map_name(name)
        try:
            await self.client.get(CONFIG_MAP, copy_name, ns)
            return True
        except NotFound:
            pass
        try:
            source = await self.client.get(CONFIG_MAP, source_name, self.cdi_namespace)
        except NotFound:
            log.warning(
                "%s/%s import proxy CA configmap %s/%s not found",
                ns,
                name,
                self.cdi_namespace,
                source_name,
            )
            return False
        copy = {
            "apiVersion": CONFIG_MAP.api_version,
            "kind": CONFIG_MAP.kind,
            "metadata": {
                "name": copy_name,
                "namespace": ns,
                "labels": {ann.LABEL_APP: ann.LABEL_APP_VALUE},
                "ownerReferences": [
                    {
                        "apiVersion": PERSISTENT_VOLUME_CLAIM.api_version,
                        "kind": PERSISTENT_VOLUME_CLAIM.kind,
                        "name": name,
                        "uid": str(meta.get("uid", "")),
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "data": dict(source.get("data") or {}),
        }
        try:
            await self.client.create(CONFIG_MAP, copy, ns)
            log.info("%s/%s import proxy CA copied configmap=%s", ns, name, copy_name)
        except AlreadyExists:
            pass
        return True

    async def _ensure_scratch(self, pvc: Obj, pod: Obj) -> None:
        status, _ = await self._config()
        scratch = render_scratch_pvc(pvc, pod=pod, cdi_config_status=status)
        try:
            await self.client.create(PERSISTENT_VOLUME_CLAIM, scratch)
            log.info(
                "%s/%s scratch PVC created scratch=%s",
                pvc["metadata"]["namespace"],
                pvc["metadata"]["name"],
                scratch["metadata"]["name"],
            )
        except AlreadyExists:
            pass

    async def _mirror(self, pvc: Obj, pod: Obj) -> Result:
        meta = pvc["metadata"]
        ns, name = str(meta["namespace"]), str(meta["name"])
        annotations: dict[str, str] = meta.get("annotations") or {}
        pod_status = pod.get("status") or {}
        phase = str(pod_status.get("phase") or PodPhase.PENDING)
        wanted = {
            ann.POD_RESTARTS: claims.restarts(pvc, pod),
            ann.IMPORT_POD_NAME: str(pod["metadata"]["name"]),
        }
        wanted.update(running_annotations(pod))
        pod_name = str(pod["metadata"]["name"])

        if phase == PodPhase.SUCCEEDED:
            statuses = pod_status.get("containerStatuses") or []
            terminated = (
                ((statuses[0].get("state") or {}).get("terminated") or {}) if statuses else {}
            )
            text = str(terminated.get("message") or "")
            try:
                message = TerminationMessage.from_json(text)
            except TerminationMessageError:
                message = TerminationMessage(message=first_line(text))
            if message.scratch_space_required:
                log.info("%s/%s importer asks for scratch space pod=%s", ns, name, pod_name)
                wanted.update(
                    {
                        ann.REQUIRES_SCRATCH: "true",
                        ann.POD_PHASE: PodPhase.PENDING.value,
                        ann.CONDITION_RUNNING: "false",
                        ann.CONDITION_RUNNING_REASON: ConditionReason.SCRATCH_SPACE_REQUIRED.value,
                        ann.CONDITION_RUNNING_MESSAGE: message.message
                        or "scratch space required and none found",
                    }
                )
                await self._annotate(pvc, wanted)
                await self._delete(POD, pod_name, ns)
                return Result(requeue_after=GONE_POLL)
            wanted[ann.POD_PHASE] = PodPhase.SUCCEEDED.value
            if message.preallocation_applied is not None:
                wanted[ann.PREALLOCATION_APPLIED] = str(message.preallocation_applied).lower()
            await self._annotate(pvc, wanted)
            log.info("%s/%s import succeeded pod=%s", ns, name, pod_name)
            await self._cleanup(Request(ns, name), pod_name, scratch=True)
            return Result()

        failed = worker_failure(pod)
        if failed is not None:
            text, detail, reason = failed.text, failed.detail, failed.reason
            if reason is not None:
                log.warning(
                    "%s/%s import failed for good pod=%s message=%s", ns, name, pod_name, detail
                )
                wanted.update(
                    {
                        ann.FATAL_ERROR: "true",
                        ann.POD_PHASE: PodPhase.FAILED.value,
                        ann.CONDITION_RUNNING: "false",
                        ann.CONDITION_RUNNING_REASON: reason,
                        ann.CONDITION_RUNNING_MESSAGE: text,
                    }
                )
                await self._annotate(pvc, wanted)
                await record_event(self.client, pvc, "ErrImportFailed", detail, type_=WARNING)
                await self._delete(POD, pod_name, ns)
                return Result()
            if annotations.get(ann.CONDITION_RUNNING_MESSAGE) != text and text:
                await record_event(self.client, pvc, "ErrImportFailed", text, type_=WARNING)
        if phase in (PodPhase.PENDING, PodPhase.RUNNING, PodPhase.FAILED, PodPhase.UNKNOWN):
            wanted[ann.POD_PHASE] = phase
        await self._annotate(pvc, wanted)
        return Result()

    async def _annotate(self, pvc: Obj, wanted: Mapping[str, str]) -> None:
        await claims.annotate(self.client, pvc, wanted)

    async def _delete(self, resource: Any, name: str, namespace: str) -> None:
        try:
            await self.client.delete(resource, name, namespace)
            log.info("%s/%s deleted kind=%s", namespace, name, resource.kind)
        except NotFound:
            pass

    async def _cleanup(self, request: Request, pod_name: str, *, scratch: bool) -> None:
        try:
            await self.client.get(POD, pod_name, request.namespace)
        except NotFound:
            pass
        else:
            await self._delete(POD, pod_name, request.namespace)
        copy_name = naming.import_proxy_config_map_name(request.name)
        try:
            await self.client.get(CONFIG_MAP, copy_name, request.namespace)
        except NotFound:
            pass
        else:
            await self._delete(CONFIG_MAP, copy_name, request.namespace)
        if scratch:
            scratch_name = naming.scratch_pvc_name(request.name)
            try:
                await self.client.get(PERSISTENT_VOLUME_CLAIM, scratch_name, request.namespace)
            except NotFound:
                return
            await self._delete(PERSISTENT_VOLUME_CLAIM, scratch_name, request.namespace)
