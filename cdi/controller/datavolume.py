"""The DataVolume reconciler: the DV's PVC, and the DV status derived from that PVC (CDI §3).

Owns, per DataVolume (the primary key; PVCs it controls are watched): creating its PVC
(`rendering.render_pvc`, owned by the DV), refusing to take over a PVC someone else owns
(event `ErrResourceExists`, unless the DV is annotated `cdi.kubevirt.io/allowClaimAdoption`),
and `status` — phase, `progress` (from the importer's metrics while it runs), `restartCount`,
conditions Bound/Ready/Running and `claimName` — written through the status subresource only
when it changed. Emits the events CDI emits on phase changes.

Uploads (`source.upload`, PVC annotation `storage.upload.target`) go Pending, UploadScheduled
(pod made, not ready yet), UploadReady (`storage.pod.ready=true`), Succeeded, as CDI's; their
events are CDI's upload ones (UploadScheduled, UploadReady, UploadSucceeded, UploadFailed).

Called by `cdi.controller.manager` through a `Controller`. Must not create or delete pods or
write PVC annotations: the worker pods and the `storage.*` bookkeeping are
`cdi.controller.importing`'s and `cdi.controller.uploading`'s; this module only reads them.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import re
from collections.abc import Mapping
from typing import Any, Final

import aiohttp

from cdi.api import annotations as ann
from cdi.api.groups import (
    CDI_CONFIG,
    CDI_CONFIG_NAME,
    DATA_VOLUME,
    PERSISTENT_VOLUME_CLAIM,
    POD,
    STORAGE_CLASS,
    STORAGE_PROFILE,
)
from cdi.api.phases import (
    ConditionReason,
    ConditionStatus,
    ConditionType,
    DataVolumePhase,
    PodPhase,
    PVCPhase,
)
from cdi.controller.cloneplan import (
    CLONE_SOURCE_ANNOTATION,
    Waiting,
    clone_source,
    finish_smart_clone,
    plan_clone,
)
from cdi.controller.events import WARNING, record_event
from cdi.controller.podspecs import owner_uid_for
from cdi.controller.rendering import RenderError, render_pvc
from cdi.controller.runtime import Request, Result
from cdi.kube.client import Client
from cdi.kube.errors import AlreadyExists, NotFound

log = logging.getLogger(__name__)

Obj = dict[str, Any]

IMPORT_PROGRESS_METRIC: Final = "kubevirt_cdi_import_progress_total"
CLONE_PROGRESS_METRIC: Final = "kubevirt_cdi_clone_progress_total"
PROGRESS_POLL: Final = 2.0
"""Seconds between progress polls while the importer runs (CDI's requeue)."""
METRICS_TIMEOUT: Final = 2.0
METRICS_PORT: Final = 8443
WAIT_POLL: Final = 5.0
"""Seconds between looks at a DV that waits for something that sends it no event."""
CONFIG_POLL: Final = 1.0
"""Seconds between looks while the CDIConfig status (written by the manager) is missing."""
PROGRESS_NONE: Final = "N/A"
PROGRESS_DONE: Final = "100.0%"
REASON_RESOURCE_EXISTS: Final = "ErrResourceExists"
MESSAGE_NO_PROFILE_YET: Final = "cannot get StorageProfile"

_IN_PROGRESS_PHASES: Final = frozenset(
    {DataVolumePhase.IMPORT_SCHEDULED, DataVolumePhase.IMPORT_IN_PROGRESS}
)
_PHASE_EVENTS: Final[Mapping[str, tuple[str, str]]] = {
    DataVolumePhase.IMPORT_SCHEDULED: ("ImportScheduled", "Import into {} scheduled"),
    DataVolumePhase.IMPORT_IN_PROGRESS: ("ImportInProgress", "Import into {} in progress"),
    DataVolumePhase.SUCCEEDED: ("ImportSucceeded", "Successfully imported into PVC {}"),
    DataVolumePhase.FAILED: ("ErrImportFailed", "Failed to import into PVC {}"),
    DataVolumePhase.PENDING: ("Pending", "PVC {} Pending"),
    DataVolumePhase.PVC_BOUND: ("Bound", "PVC {} Bound"),
}
#: An upload's own events for the phases they share with imports (CDI's wording).
_UPLOAD_PHASE_EVENTS: Final[Mapping[str, tuple[str, str]]] = {
    **_PHASE_EVENTS,
    DataVolumePhase.UPLOAD_SCHEDULED: ("UploadScheduled", "Upload into {} scheduled"),
    DataVolumePhase.UPLOAD_READY: ("UploadReady", "Upload into {} ready"),
    DataVolumePhase.SUCCEEDED: ("UploadSucceeded", "Successfully uploaded into {}"),
    DataVolumePhase.FAILED: ("UploadFailed", "Upload into {} failed"),
}


#: Smart clone phases while the target is Pending, by strategy.
_SMART_PHASES: Final[Mapping[str, DataVolumePhase]] = {
    "snapshot": DataVolumePhase.SMART_CLONE_PVC_IN_PROGRESS,
    "csi-clone": DataVolumePhase.CSI_CLONE_IN_PROGRESS,
}
_CLONE_PHASE_EVENTS: Final[Mapping[str, tuple[str, str]]] = {
    **_PHASE_EVENTS,
    DataVolumePhase.CLONE_SCHEDULED: ("CloneScheduled", "Cloning from {source} into {} scheduled"),
    DataVolumePhase.CLONE_IN_PROGRESS: (
        "CloneInProgress",
        "Cloning from {source} into {} in progress",
    ),
    DataVolumePhase.SMART_CLONE_PVC_IN_PROGRESS: (
        "SmartClonePVCInProgress",
        "Creating PVC {} from a snapshot of {source}",
    ),
    DataVolumePhase.CSI_CLONE_IN_PROGRESS: ("CSICloneInProgress", "CSI clone of {source} into {}"),
    DataVolumePhase.SUCCEEDED: ("CloneSucceeded", "Successfully cloned from {source} into {}"),
    DataVolumePhase.FAILED: ("CloneFailed", "Cloning from {source} into {} failed"),
}


def progress_regex(owner_uid: str, metric: str = IMPORT_PROGRESS_METRIC) -> re.Pattern[str]:
    return re.compile(
        re.escape(metric) + r"\{ownerUID=\"" + re.escape(owner_uid) + r"\"\} ([0-9.eE+-]+)"
    )


async def read_progress(
    pod_ip: str, owner_uid: str, *, metric: str = IMPORT_PROGRESS_METRIC
) -> str | None:
    """ "NN.NN%" from a worker's metrics endpoint (the importer's, or with `metric` the
    cloner's), None when it cannot be read (yet)."""
    url = f"https://{pod_ip}:{METRICS_PORT}/metrics"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=METRICS_TIMEOUT)) as s,
            s.get(url, ssl=False) as resp,
        ):
            text = await resp.text()
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None
    match = progress_regex(owner_uid, metric).search(text)
    if match is None:
        return None
    try:
        return f"{float(match.group(1)):.2f}%"
    except ValueError:
        return None


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(text: str) -> datetime.datetime:
    try:
        return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    except ValueError:
        return datetime.datetime.now(datetime.UTC)


def upload_phase(annotations: Mapping[str, str]) -> DataVolumePhase:
    """CDI's phase of an upload DataVolume whose PVC is Bound: UploadScheduled until the upload
    pod runs and is ready (`storage.pod.ready`), then UploadReady until it succeeds (CDI shows no
    "in progress" for uploads); Failed only when the upload failed for good."""
    if annotations.get(ann.FATAL_ERROR) == "true":
        return DataVolumePhase.FAILED
    pod_phase = annotations.get(ann.POD_PHASE, "")
    if pod_phase == PodPhase.SUCCEEDED:
        return DataVolumePhase.SUCCEEDED
    if pod_phase == PodPhase.RUNNING and annotations.get(ann.POD_READY) == "true":
        return DataVolumePhase.UPLOAD_READY
    return DataVolumePhase.UPLOAD_SCHEDULED


def clone_phase(annotations: Mapping[str, str]) -> DataVolumePhase:
    """A host-assisted clone whose target is Bound: CloneScheduled until the source pod runs,
    CloneInProgress while it does, Succeeded when the target's upload server succeeded."""
    if annotations.get(ann.FATAL_ERROR) == "true":
        return DataVolumePhase.FAILED
    if annotations.get(ann.POD_PHASE) == PodPhase.SUCCEEDED:
        return DataVolumePhase.SUCCEEDED
    if annotations.get(ann.CONDITION_SOURCE_RUNNING) == "true":
        return DataVolumePhase.CLONE_IN_PROGRESS
    return DataVolumePhase.CLONE_SCHEDULED


def _condition(type_: str, status: str, reason: str, message: str) -> Obj:
    return {"type": type_, "status": status, "reason": reason, "message": message}


def _is_owned_by(pvc: Mapping[str, Any], dv: Mapping[str, Any]) -> bool:
    uid = (dv.get("metadata") or {}).get("uid")
    refs = (pvc.get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("uid") == uid and ref.get("controller") is True for ref in refs)


class DataVolumeReconciler:
    """Reconciles one DataVolume key; see the module docstring."""

    def __init__(self, client: Client, *, local: bool = False) -> None:
        self.client = client
        self.local = local  # pods (size detection) run on the local node agent

    async def __call__(self, request: Request) -> Result:
        try:
            dv = await self.client.get(DATA_VOLUME, request.name, request.namespace)
        except NotFound:
            return Result()  # its PVC is owned by it: the garbage collector removes it
        if (dv.get("metadata") or {}).get("deletionTimestamp"):
            return Result()
        try:
            pvc: Obj | None = await self.client.get(
                PERSISTENT_VOLUME_CLAIM, request.name, request.namespace
            )
        except NotFound:
            pvc = None
        if pvc is None:
            created = await self._create_pvc(dv)
            if created is None:
                return Result(requeue_after=CONFIG_POLL)
            if isinstance(created, Result):
                return created
            pvc = created
        elif not _is_owned_by(pvc, dv) and not await self._adopt(dv, pvc):
            return Result(requeue_after=WAIT_POLL)
        return await self._update_status(dv, pvc)

    # --- the PVC ----------------------------------------------------------------------------
    async def _create_pvc(self, dv: Obj) -> Obj | Result | None:
        ns, name = dv["metadata"]["namespace"], dv["metadata"]["name"]
        try:
            config = await self.client.get(CDI_CONFIG, CDI_CONFIG_NAME)
        except NotFound:
            log.info("%s/%s waiting for CDIConfig %s", ns, name, CDI_CONFIG_NAME)
            return None
        if not config.get("status"):
            return None
        classes, _ = await self.client.list(STORAGE_CLASS)
        profiles, _ = await self.client.list(STORAGE_PROFILE)
        try:
            manifest = render_pvc(
                dv,
                storage_classes=classes,
                storage_profiles=profiles,
                cdi_config_status=dict(config["status"]),
            )
        except RenderError as err:
            if str(err).startswith(MESSAGE_NO_PROFILE_YET) and len(profiles) < len(classes):
                # A class the config pass has not seen yet: its profile is moments away.
                log.info("%s/%s waiting for a StorageProfile: %s", ns, name, err)
                return None
            log.warning("%s/%s cannot render the PVC reason=%s error=%s", ns, name, err.reason, err)
            await self._set_status(
                dv,
                phase=DataVolumePhase.PENDING,
                progress=PROGRESS_NONE,
                restarts=0,
                conditions=[
                    _condition(ConditionType.BOUND, ConditionStatus.FALSE, err.reason, str(err)),
                    _condition(ConditionType.READY, ConditionStatus.FALSE, err.reason, str(err)),
                    _condition(ConditionType.RUNNING, ConditionStatus.FALSE, "", ""),
                ],
                claim=None,
                event=(err.reason, str(err)),
            )
            return None
        if clone_source(dv) is not None:
            plan = await plan_clone(
                self.client,
                dv,
                manifest,
                classes=classes,
                profiles=profiles,
                config_status=dict(config["status"]),
                local=self.local,
            )
            if isinstance(plan, Waiting):
                return await self._clone_waiting(dv, plan)
            for reason, message in plan.events:
                await record_event(
                    self.client,
                    {**dv, "apiVersion": DATA_VOLUME.api_version, "kind": DATA_VOLUME.kind},
                    reason,
                    message,
                )
            manifest = plan.manifest
        try:
            pvc = await self.client.create(PERSISTENT_VOLUME_CLAIM, manifest, ns)
            log.info("%s/%s PVC created", ns, name)
        except AlreadyExists:
            pvc = await self.client.get(PERSISTENT_VOLUME_CLAIM, name, ns)
            if not _is_owned_by(pvc, dv):
                return pvc if await self._adopt(dv, pvc) else None
        return pvc

    async def _clone_waiting(self, dv: Obj, plan: Waiting) -> Result:
        """A clone that cannot create its PVC yet (or ever: Failed): say why, once."""
        old: Mapping[str, Any] = dv.get("status") or {}
        bound: Mapping[str, Any] = next(
            (c for c in old.get("conditions") or [] if c.get("type") == ConditionType.BOUND), {}
        )
        fresh = bound.get("message") != plan.message or old.get("phase") != plan.phase
        ready_reason = plan.reason if plan.phase == DataVolumePhase.FAILED else ""
        await self._set_status(
            dv,
            phase=plan.phase,
            progress=PROGRESS_NONE,
            restarts=0,
            conditions=[
                _condition(ConditionType.BOUND, ConditionStatus.FALSE, plan.reason, plan.message),
                _condition(ConditionType.READY, ConditionStatus.FALSE, ready_reason, plan.message),
                _condition(ConditionType.RUNNING, ConditionStatus.FALSE, "", ""),
            ],
            claim=None,
            event=(plan.reason, plan.message) if fresh else None,
        )
        return Result(requeue_after=plan.requeue)

    async def _adopt(self, dv: Obj, pvc: Obj) -> bool:
        ns, name = dv["metadata"]["namespace"], dv["metadata"]["name"]
        dv_annotations = dv["metadata"].get("annotations") or {}
        if dv_annotations.get(ann.ALLOW_CLAIM_ADOPTION) != "true":
            message = f"Resource {name} already exists and is not managed by DataVolume"
            log.warning("%s/%s PVC exists and is not ours", ns, name)
            await self._set_status(
                dv,
                phase=DataVolumePhase.PENDING,
                progress=PROGRESS_NONE,
                restarts=0,
                conditions=[
                    _condition(
                        ConditionType.BOUND, ConditionStatus.FALSE, REASON_RESOURCE_EXISTS, message
                    ),
                    _condition(
                        ConditionType.READY, ConditionStatus.FALSE, REASON_RESOURCE_EXISTS, message
                    ),
                    _condition(ConditionType.RUNNING, ConditionStatus.FALSE, "", ""),
                ],
                claim=None,
                event=(REASON_RESOURCE_EXISTS, message),
            )
            return False
        refs = [r for r in pvc["metadata"].get("ownerReferences") or [] if not r.get("controller")]
        refs.append(
            {
                "apiVersion": DATA_VOLUME.api_version,
                "kind": DATA_VOLUME.kind,
                "name": name,
                "uid": dv["metadata"]["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }
        )
        patch = {
            "metadata": {
                "ownerReferences": refs,
                "resourceVersion": pvc["metadata"].get("resourceVersion"),
                # An adopted claim holds its data already: nothing to import into it.
                "annotations": {ann.POD_PHASE: PodPhase.SUCCEEDED.value},
            }
        }
        updated = await self.client.patch(PERSISTENT_VOLUME_CLAIM, name, patch, ns)
        pvc.clear()
        pvc.update(updated)
        log.info("%s/%s PVC adopted", ns, name)
        return True

    # --- the status -------------------------------------------------------------------------
    async def _wffc(self, pvc: Mapping[str, Any]) -> bool:
        annotations = pvc["metadata"].get("annotations") or {}
        if annotations.get(ann.BIND_IMMEDIATE_REQUESTED) is not None:
            return False
        class_name = (pvc.get("spec") or {}).get("storageClassName")
        if not class_name:
            return False
        try:
            sc = await self.client.get(STORAGE_CLASS, str(class_name))
        except NotFound:
            return False
        return bool(sc.get("volumeBindingMode") == "WaitForFirstConsumer")

    async def _update_status(self, dv: Obj, pvc: Obj) -> Result:
        ns, name = dv["metadata"]["namespace"], dv["metadata"]["name"]
        old: Mapping[str, Any] = dv.get("status") or {}
        annotations: Mapping[str, str] = pvc["metadata"].get("annotations") or {}
        pvc_phase = (pvc.get("status") or {}).get("phase") or PVCPhase.PENDING
        pod_phase = annotations.get(ann.POD_PHASE, "")
        progress = str(old.get("progress") or PROGRESS_NONE)
        requeue: float | None = None
        old_phase = str(old.get("phase") or "")
        upload = ann.UPLOAD_TARGET in annotations
        host_clone = ann.CLONE_REQUEST in annotations and not upload
        smart_clone = ann.CLONE_TYPE in annotations and not host_clone and not upload
        clone = host_clone or smart_clone

        if pvc_phase == PVCPhase.PENDING and smart_clone:
            phase = _SMART_PHASES.get(
                annotations.get(ann.CLONE_TYPE, ""), DataVolumePhase.SMART_CLONE_PVC_IN_PROGRESS
            )
            requeue = WAIT_POLL
            bound = _condition(
                ConditionType.BOUND, ConditionStatus.FALSE, "Pending", f"PVC {name} Pending"
            )
        elif pvc_phase == PVCPhase.PENDING:
            waiting = await self._wffc(pvc)
            phase = DataVolumePhase.WAIT_FOR_FIRST_CONSUMER if waiting else DataVolumePhase.PENDING
            if waiting:
                requeue = WAIT_POLL
            bound = _condition(
                ConditionType.BOUND, ConditionStatus.FALSE, "Pending", f"PVC {name} Pending"
            )
        elif pvc_phase == PVCPhase.BOUND:
            bound = _condition(
                ConditionType.BOUND, ConditionStatus.TRUE, "Bound", f"PVC {name} Bound"
            )
            if upload:
                phase = upload_phase(annotations)
                if phase == DataVolumePhase.SUCCEEDED:
                    progress = PROGRESS_DONE
            elif smart_clone:
                phase = DataVolumePhase.SUCCEEDED
                progress = PROGRESS_DONE
                await finish_smart_clone(self.client, dv)
            elif host_clone:
                phase = clone_phase(annotations)
                if phase == DataVolumePhase.SUCCEEDED:
                    progress = PROGRESS_DONE
                elif phase == DataVolumePhase.CLONE_IN_PROGRESS:
                    requeue = PROGRESS_POLL
            elif annotations.get(ann.FATAL_ERROR) == "true":
                phase = DataVolumePhase.FAILED
            elif pod_phase == PodPhase.SUCCEEDED:
                phase = DataVolumePhase.SUCCEEDED
                progress = PROGRESS_DONE
            elif pod_phase == PodPhase.RUNNING:
                phase = DataVolumePhase.IMPORT_IN_PROGRESS
                requeue = PROGRESS_POLL
            elif pod_phase == PodPhase.PENDING:
                phase = DataVolumePhase.IMPORT_SCHEDULED
            elif pod_phase == PodPhase.FAILED:
                # retrying: keep showing where it was
                phase = (
                    DataVolumePhase(old_phase)
                    if old_phase in _IN_PROGRESS_PHASES
                    else DataVolumePhase.IMPORT_SCHEDULED
                )
            elif ann.IMPORT_SOURCE in annotations or ann.IMPORT_ENDPOINT in annotations:
                phase = DataVolumePhase.IMPORT_SCHEDULED
            else:
                phase = DataVolumePhase.PVC_BOUND
        elif pvc_phase == PVCPhase.LOST:
            phase = DataVolumePhase.FAILED
            bound = _condition(
                ConditionType.BOUND, ConditionStatus.FALSE, ConditionReason.CLAIM_LOST, "Claim Lost"
            )
        else:
            phase = DataVolumePhase.UNKNOWN
            bound = _condition(ConditionType.BOUND, ConditionStatus.UNKNOWN, "", "")
        if bound_reason := annotations.get(ann.CONDITION_BOUND_REASON):
            bound["reason"] = bound_reason
            bound["message"] = annotations.get(ann.CONDITION_BOUND_MESSAGE, "")

        run_status = (
            ConditionStatus.TRUE
            if annotations.get(ann.CONDITION_RUNNING) == "true"
            else ConditionStatus.FALSE
        )
        running = _condition(
            ConditionType.RUNNING,
            run_status,
            annotations.get(ann.CONDITION_RUNNING_REASON, ""),
            annotations.get(ann.CONDITION_RUNNING_MESSAGE, ""),
        )
        if phase == DataVolumePhase.SUCCEEDED:
            ready = _condition(ConditionType.READY, ConditionStatus.TRUE, "", "")
        elif phase == DataVolumePhase.UNKNOWN:
            ready = _condition(ConditionType.READY, ConditionStatus.UNKNOWN, "", "")
        elif run_status == ConditionStatus.TRUE:
            ready = _condition(
                ConditionType.READY, ConditionStatus.FALSE, ConditionReason.TRANSFER_RUNNING, ""
            )
        else:
            ready = _condition(ConditionType.READY, ConditionStatus.FALSE, "", "")

        if (
            host_clone
            and ann.CONDITION_SOURCE_RUNNING in annotations
            and phase != DataVolumePhase.FAILED
        ):
            # What runs (or waits, or lost its source) is the source pod; the upload server on
            # the target only listens. A fatal failure is the server's, shown as it reported.
            running = _condition(
                ConditionType.RUNNING,
                ConditionStatus.TRUE
                if annotations.get(ann.CONDITION_SOURCE_RUNNING) == "true"
                else ConditionStatus.FALSE,
                annotations.get(ann.CONDITION_SOURCE_RUNNING_REASON, running["reason"]),
                annotations.get(ann.CONDITION_SOURCE_RUNNING_MESSAGE, running["message"]),
            )
        if phase == DataVolumePhase.IMPORT_IN_PROGRESS:
            fresh = await self._progress(pvc)
        elif phase == DataVolumePhase.CLONE_IN_PROGRESS:
            fresh = await self._clone_progress(pvc)
        else:
            fresh = None
        if fresh is not None:
            progress = fresh
        try:
            restarts = int(annotations.get(ann.POD_RESTARTS) or 0)
        except ValueError:
            restarts = 0
        event: tuple[str, str] | None = None
        phase_events = (
            _UPLOAD_PHASE_EVENTS if upload else _CLONE_PHASE_EVENTS if clone else _PHASE_EVENTS
        )
        if phase != old_phase and phase in phase_events:
            reason, pattern = phase_events[phase]
            source = annotations.get(CLONE_SOURCE_ANNOTATION, "")
            message = pattern.format(name, source=source)
            if phase == DataVolumePhase.FAILED:
                message = annotations.get(ann.CONDITION_RUNNING_MESSAGE) or message
            event = (reason, message)
        await self._set_status(
            dv,
            phase=phase,
            progress=progress,
            restarts=restarts,
            conditions=[bound, ready, running],
            claim=name,
            event=event,
        )
        if phase == DataVolumePhase.SUCCEEDED:
            return await self._collect_garbage(dv, pvc)
        if phase == DataVolumePhase.FAILED:
            return Result()
        log.debug("%s/%s status phase=%s progress=%s", ns, name, phase, progress)
        return Result(requeue_after=requeue)

    async def _collect_garbage(self, dv: Obj, pvc: Obj) -> Result:
        """Opt-in DataVolume garbage collection: with CDIConfig `spec.dataVolumeTTLSeconds` set
        (>= 0), a DataVolume that Succeeded that long ago is deleted and its PVC kept, handed to
        the DataVolume's own owners. Off by default: deleting objects users applied breaks
        GitOps tools, which then re-create them (CDI's default GC did exactly that). A DV
        annotated `cdi.kubevirt.io/storage.deleteAfterCompletion: "false"` is always kept."""
        annotations = dv["metadata"].get("annotations") or {}
        if annotations.get(ann.DELETE_AFTER_COMPLETION) == "false":
            return Result()
        try:
            config = await self.client.get(CDI_CONFIG, CDI_CONFIG_NAME)
        except NotFound:
            return Result()
        ttl = (config.get("spec") or {}).get("dataVolumeTTLSeconds")
        if not isinstance(ttl, int) or ttl < 0:
            return Result()
        ready: Mapping[str, Any] = next(
            (c for c in dv["status"].get("conditions") or [] if c.get("type") == "Ready"), {}
        )
        since = _parse_time(str(ready.get("lastTransitionTime") or ""))
        left = ttl - (datetime.datetime.now(datetime.UTC) - since).total_seconds()
        if left > 0:
            return Result(requeue_after=left)
        ns, name = dv["metadata"]["namespace"], dv["metadata"]["name"]
        uid = dv["metadata"]["uid"]
        refs = [r for r in pvc["metadata"].get("ownerReferences") or [] if r.get("uid") != uid]
        refs += [dict(r) for r in dv["metadata"].get("ownerReferences") or []]
        await self.client.patch(
            PERSISTENT_VOLUME_CLAIM,
            name,
            {
                "metadata": {
                    "ownerReferences": refs or None,
                    "resourceVersion": pvc["metadata"].get("resourceVersion"),
                }
            },
            ns,
        )
        log.info("%s/%s garbage collected after %ss; PVC kept", ns, name, ttl)
        await record_event(
            self.client,
            {**dv, "apiVersion": DATA_VOLUME.api_version, "kind": DATA_VOLUME.kind},
            "GarbageCollected",
            f"DataVolume {name} deleted {ttl}s after it succeeded (CDIConfig "
            "dataVolumeTTLSeconds); its PVC is kept",
        )
        with contextlib.suppress(NotFound):
            await self.client.delete(DATA_VOLUME, name, ns, uid=uid)
        return Result()

    async def _progress(self, pvc: Mapping[str, Any]) -> str | None:
        annotations = pvc["metadata"].get("annotations") or {}
        pod_name = annotations.get(ann.IMPORT_POD_NAME)
        if not pod_name:
            return None
        try:
            pod = await self.client.get(POD, pod_name, pvc["metadata"]["namespace"])
        except NotFound:
            return None
        ip = (pod.get("status") or {}).get("podIP")
        if not ip:
            return None
        return await read_progress(str(ip), owner_uid_for(pvc))

    async def _clone_progress(self, pvc: Mapping[str, Any]) -> str | None:
        annotations = pvc["metadata"].get("annotations") or {}
        pod_name = annotations.get(ann.SOURCE_CLONE_POD_NAME)
        source = annotations.get(ann.CLONE_REQUEST, "")
        if not pod_name or "/" not in source:
            return None
        try:
            pod = await self.client.get(POD, pod_name, source.partition("/")[0])
        except NotFound:
            return None
        ip = (pod.get("status") or {}).get("podIP")
        if not ip:
            return None
        return await read_progress(str(ip), owner_uid_for(pvc), metric=CLONE_PROGRESS_METRIC)

    async def _set_status(
        self,
        dv: Obj,
        *,
        phase: DataVolumePhase,
        progress: str,
        restarts: int,
        conditions: list[Obj],
        claim: str | None,
        event: tuple[str, str] | None,
    ) -> None:
        old: Mapping[str, Any] = dv.get("status") or {}
        old_conditions = {c.get("type"): c for c in old.get("conditions") or []}
        now = _now()
        for cond in conditions:
            before = old_conditions.get(cond["type"])
            same = before is not None and all(
                before.get(k) == cond[k] for k in ("status", "reason", "message")
            )
            cond["lastTransitionTime"] = (
                before.get("lastTransitionTime", now) if same and before else now
            )
            cond["lastHeartbeatTime"] = (
                before.get("lastHeartbeatTime", now) if same and before else now
            )
        status: Obj = {
            "phase": phase.value,
            "progress": progress,
            "restartCount": restarts,
            "conditions": conditions,
        }
        if claim:
            status["claimName"] = claim
        if status == {k: old.get(k) for k in status} and set(old) <= set(status):
            return
        body = dict(dv)
        body["status"] = {**old, **status}
        updated = await self.client.replace_status(DATA_VOLUME, body)
        dv["metadata"], dv["status"] = updated["metadata"], updated.get("status") or {}
        meta = dv["metadata"]
        log.info(
            "%s/%s status phase=%s progress=%s restarts=%d",
            meta["namespace"],
            meta["name"],
            phase.value,
            progress,
            restarts,
        )
        if event is not None:
            reason, message = event
            warn = reason.startswith("Err") or phase == DataVolumePhase.FAILED
            await record_event(
                self.client,
                {**dv, "apiVersion": DATA_VOLUME.api_version, "kind": DATA_VOLUME.kind},
                reason,
                message,
                type_=WARNING if warn else "Normal",
            )
