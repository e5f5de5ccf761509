"""The upload reconciler: one upload server per PVC annotated `storage.upload.target` (§6).

Owns, per target PVC (the primary key; pods it owns are watched), once the PVC is Bound:

* the upload PKI (`certs.ensure_upload_pki`: signers, bundles, the proxy's client certificate);
* the Secret `cdi-upload-<pvc>` (a server certificate for the Service's DNS names, fresh for each
  pod, and the client CA), the headless Service and the upload server Pod
  (`uploadpod`: names from `naming.upload_pod_name`, recorded in `storage.uploadPodName`), all
  owned by the PVC; and the scratch PVC `<pvc>-scratch` (`render_scratch_pvc`, owned by the pod)
  for disk images (archives are unpacked straight into the volume);
* mirroring the pod into the PVC annotations CDI writes: `storage.pod.phase`, `storage.pod.ready`
  ("true" while the pod's Ready condition is True), `storage.pod.restarts`,
  `storage.condition.running*` (`importing.running_annotations`), `storage.uploadPodName`,
  `storage.preallocation`;
* the deadline: a pod that ends with `deadlinePassed` in its termination message ("Deadline
  Passed", nobody uploaded in time) is deleted with its scratch PVC, `storage.pod.phase` is reset
  to "" and `storage.pod.ready` to "false", and a new pod with a fresh certificate is made;
* success: event `UploadSucceeded` "Upload Successful" on the PVC, then the pod, Service, Secret
  and scratch PVC are deleted;
* clone targets (`k8s.io/CloneRequest` without `storage.upload.target`, host-assisted copies)
  get the same server, without scratch, accepting the client certificate CN of their
  `uploadClientName` annotation (the clone's source pod, `cdi.controller.cloning`);
* refusals: a PVC with both the upload and the clone annotation gets an error in the
  Running condition and no pod; a PVC another running pod mounts gets event `UploadTargetInUse`
  and waits; a pod that failed for good (the importer's fatal messages) sets
  `storage.import.fatalError`, so the DataVolume ends Failed, as imports do.

Called by `cdi.controller.manager` through a `Controller`. Must not write DataVolumes (their
status is `cdi.controller.datavolume`'s, derived from these annotations). Idempotent like the
import reconciler: deterministic names, AlreadyExists is success, a controller killed at any
point converges on restart without duplicates.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from cdi.api import ContentType
from cdi.api import annotations as ann
from cdi.api.groups import (
    PERSISTENT_VOLUME_CLAIM,
    POD,
    SECRET,
    SERVICE,
    Resource,
)
from cdi.api.phases import ConditionReason, PodPhase, PVCPhase
from cdi.api.termination import TerminationMessage, TerminationMessageError
from cdi.api.tokens import UPLOAD_CLIENT_NAME
from cdi.controller import claims, naming
from cdi.controller.certs import (
    CDI_NAMESPACE,
    SERVER_CERT_LIFETIME,
    UploadPKI,
    ensure_upload_pki,
    issue_server_cert,
)
from cdi.controller.events import WARNING, record_event
from cdi.controller.importing import (
    first_line,
    running_annotations,
    worker_failure,
)
from cdi.controller.rendering import RenderError, render_scratch_pvc
from cdi.controller.runtime import Request, Result
from cdi.controller.uploadpod import (
    COMMAND,
    IMAGE,
    service_dns_names,
    upload_pod,
    upload_secret,
    upload_service,
)
from cdi.kube.client import Client
from cdi.kube.errors import AlreadyExists, Conflict, NotFound

log = logging.getLogger(__name__)

Obj = dict[str, Any]

#: How long an upload pod waits for an upload before it is replaced (CDI: 12 h, its certificate
#: refresh period).
DEFAULT_DEADLINE: Final = datetime.timedelta(hours=12)
#: Seconds between polls while a pod or scratch PVC we deleted is still going away.
GONE_POLL: Final = 0.5
#: Seconds between looks while the CDIConfig status (written by the manager) is missing.
CONFIG_POLL: Final = 1.0
#: Seconds between looks at a target another pod mounts (its end sends us no event).
WAIT_POLL: Final = 2.0

REASON_SUCCEEDED: Final = "UploadSucceeded"
MESSAGE_SUCCEEDED: Final = "Upload Successful"
REASON_CLONE_SUCCEEDED: Final = "CloneSucceeded"
MESSAGE_CLONED: Final = "Clone Successful"
REASON_TARGET_IN_USE: Final = "UploadTargetInUse"
REASON_FAILED: Final = "UploadFailed"
MESSAGE_CLONE_AND_UPLOAD: Final = "PVC has both clone and upload annotations"
_TERMINAL: Final = frozenset({PodPhase.SUCCEEDED, PodPhase.FAILED})


@dataclass(frozen=True, slots=True)
class UploadSettings:
    """How upload pods are made."""

    image: str = IMAGE
    """The upload server image (a kubelet pulls it; the local agent runs `command`)."""
    command: str = COMMAND
    """The server's command: `cdi-uploadserver`, looked up on PATH by the local agent, the
    image's own binary on a cluster. Tests name a stand-in here."""
    deadline: datetime.timedelta = DEFAULT_DEADLINE
    """How long a pod waits for an upload (its DEADLINE) before it is replaced with a fresh
    certificate. Shorter than the certificate's lifetime (`certs.SERVER_CERT_LIFETIME`)."""
    cdi_namespace: str = CDI_NAMESPACE
    """Where the signer Secrets and bundle ConfigMaps live."""
    image_pull_policy: str | None = field(default=None)

    def __post_init__(self) -> None:
        if not datetime.timedelta(0) < self.deadline < SERVER_CERT_LIFETIME:
            raise ValueError(
                f"upload deadline {self.deadline} must be positive and shorter than the "
                f"server certificate lifetime {SERVER_CERT_LIFETIME}"
            )


def is_upload_pvc(pvc: Mapping[str, Any]) -> bool:
    """An upload target, or a host-assisted clone target (whose upload server the source pod
    of `cdi.controller.cloning` streams to)."""
    annotations = (pvc.get("metadata") or {}).get("annotations") or {}
    return ann.UPLOAD_TARGET in annotations or ann.CLONE_REQUEST in annotations


def is_clone_pvc(pvc: Mapping[str, Any]) -> bool:
    annotations = (pvc.get("metadata") or {}).get("annotations") or {}
    return ann.CLONE_REQUEST in annotations and ann.UPLOAD_TARGET not in annotations


def pod_ready(pod: Mapping[str, Any]) -> bool:
    """The pod's Ready condition is True (its readiness probe passes) and it is Running."""
    status = pod.get("status") or {}
    if status.get("phase") != PodPhase.RUNNING:
        return False
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )


def _controlled_by(obj: Mapping[str, Any], owner_uid: str) -> bool:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("uid") == owner_uid and r.get("controller") is True for r in refs)


def _uses_claim(pod: Mapping[str, Any], claim: str) -> bool:
    return any(
        (v.get("persistentVolumeClaim") or {}).get("claimName") == claim
        for v in (pod.get("spec") or {}).get("volumes") or []
    )


def _termination(pod: Mapping[str, Any]) -> TerminationMessage:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    terminated = ((statuses[0].get("state") or {}).get("terminated") or {}) if statuses else {}
    text = str(terminated.get("message") or "")
    try:
        return TerminationMessage.from_json(text)
    except TerminationMessageError:
        return TerminationMessage(message=first_line(text))


class UploadReconciler:
    """Reconciles one PVC key; see the module docstring."""

    def __init__(
        self, client: Client, *, local: bool, settings: UploadSettings | None = None
    ) -> None:
        self.client = client
        self.local = local
        self.settings = settings or UploadSettings()
        self._pki_lock = asyncio.Lock()
        # Pods last reported as using a target, so UploadTargetInUse is not repeated every poll.
        self._in_use: dict[tuple[str, str], frozenset[str]] = {}

    async def __call__(self, request: Request) -> Result:
        try:
            pvc = await self.client.get(PERSISTENT_VOLUME_CLAIM, request.name, request.namespace)
        except NotFound:
            self._in_use.pop((request.namespace, request.name), None)
            return Result()  # pod, service, secret and scratch are owned: the GC removes them
        meta = pvc["metadata"]
        annotations: dict[str, str] = meta.get("annotations") or {}
        pod_name = annotations.get(ann.UPLOAD_POD_NAME) or naming.upload_pod_name(request.name)
        if not is_upload_pvc(pvc):
            if ann.UPLOAD_POD_NAME in annotations and ann.CLONE_REQUEST not in annotations:
                # No longer an upload target (the annotation was removed): stop serving it. A
                # clone target's upload server is the clone flow's to manage.
                await self._cleanup(request, pod_name)
            return Result()
        if meta.get("deletionTimestamp"):
            await self._cleanup(request, pod_name)
            return Result()
        if ann.CLONE_REQUEST in annotations and ann.UPLOAD_TARGET in annotations:
            log.warning("%s %s", request, MESSAGE_CLONE_AND_UPLOAD)
            await self._annotate(
                pvc,
                {
                    ann.CONDITION_RUNNING: "false",
                    ann.CONDITION_RUNNING_REASON: ConditionReason.ERROR.value,
                    ann.CONDITION_RUNNING_MESSAGE: MESSAGE_CLONE_AND_UPLOAD,
                },
            )
            return Result()
        if (
            annotations.get(ann.POD_PHASE) == PodPhase.SUCCEEDED
            or annotations.get(ann.FATAL_ERROR) == "true"
        ):
            await self._cleanup(request, pod_name)
            return Result()
        if (pvc.get("status") or {}).get("phase") != PVCPhase.BOUND:
            return Result()
        try:
            pod: Obj | None = await self.client.get(POD, pod_name, request.namespace)
        except NotFound:
            pod = None
        if pod is not None and pod["metadata"].get("deletionTimestamp"):
            return Result(requeue_after=GONE_POLL)
        if pod is not None and not _controlled_by(pod, str(meta.get("uid", ""))):
            message = f"{pod_name} pod not controlled by pvc {request.name}"
            log.warning("%s %s", request, message)
            await self._annotate(
                pvc,
                {
                    ann.CONDITION_RUNNING: "false",
                    ann.CONDITION_RUNNING_REASON: ConditionReason.ERROR.value,
                    ann.CONDITION_RUNNING_MESSAGE: message,
                },
            )
            return Result(requeue_after=WAIT_POLL)
        if pod is None:
            return await self._start(pvc, pod_name)
        await self._ensure_service(pvc, pod_name)
        if self._scratch_name(pvc) and pod_phase(pod) not in _TERMINAL:
            await self._ensure_scratch(pvc, pod)
        return await self._mirror(pvc, pod)

    # --- creating ---------------------------------------------------------------------------

    def _scratch_name(self, pvc: Mapping[str, Any]) -> str | None:
        """The scratch claim of a disk-image upload; archives need none."""
        annotations = pvc["metadata"].get("annotations") or {}
        if annotations.get(ann.CONTENT_TYPE) == ContentType.ARCHIVE or is_clone_pvc(pvc):
            return None  # archives are unpacked in place; clones arrive as raw extents
        return naming.scratch_pvc_name(str(pvc["metadata"]["name"]))

    async def _config_status(self) -> Obj:
        return await claims.config_status(self.client)

    async def _pki(self) -> UploadPKI:
        async with self._pki_lock:
            return await ensure_upload_pki(self.client, self.settings.cdi_namespace)

    async def _users(self, pvc: Obj, pod_name: str) -> list[str]:
        """Other pods, not finished, that mount the target."""
        meta = pvc["metadata"]
        ns, name = str(meta["namespace"]), str(meta["name"])
        items, _ = await self.client.list(POD, ns)
        return sorted(
            str(p["metadata"]["name"])
            for p in items
            if p["metadata"]["name"] != pod_name
            and pod_phase(p) not in _TERMINAL
            and _uses_claim(p, name)
        )

    async def _start(self, pvc: Obj, pod_name: str) -> Result:
        meta = pvc["metadata"]
        ns, name = str(meta["namespace"]), str(meta["name"])
        key = (ns, name)
        users = await self._users(pvc, pod_name)
        if users:
            if self._in_use.get(key) != frozenset(users):
                self._in_use[key] = frozenset(users)
                for user in users:
                    log.info("%s/%s upload target in use by pod=%s", ns, name, user)
                    await record_event(
                        self.client,
                        pvc,
                        REASON_TARGET_IN_USE,
                        f"pod {ns}/{user} using PersistentVolumeClaim {name}",
                        type_=WARNING,
                    )
            return Result(requeue_after=WAIT_POLL)
        self._in_use.pop(key, None)
        status = await self._config_status()
        if not status:
            log.info("%s/%s waiting for the CDIConfig status", ns, name)
            return Result(requeue_after=CONFIG_POLL)
        scratch = self._scratch_name(pvc)
        if scratch and (wait := await self._scratch_left_over(pvc, scratch)) is not None:
            return Result(requeue_after=wait)
        if ann.UPLOAD_POD_NAME not in (meta.get("annotations") or {}):
            # Recorded first, as CDI does: a pod made under this name is found after a restart
            # even if the naming rule changes.
            await self._annotate(pvc, {ann.UPLOAD_POD_NAME: pod_name})
        try:
            manifest = upload_pod(
                pvc,
                name=pod_name,
                image=self.settings.image,
                command=self.settings.command,
                cdi_config_status=status,
                deadline=datetime.datetime.now(datetime.UTC) + self.settings.deadline,
                scratch_pvc=scratch,
                client_name=_client_name(pvc),
                local=self.local,
                image_pull_policy=self.settings.image_pull_policy,
            )
        except RenderError as err:
            log.warning("%s/%s upload pod not valid error=%s", ns, name, err)
            await self._annotate(
                pvc,
                {
                    ann.CONDITION_RUNNING: "false",
                    ann.CONDITION_RUNNING_REASON: err.reason,
                    ann.CONDITION_RUNNING_MESSAGE: str(err),
                },
            )
            return Result()
        pki = await self._pki()
        service = naming.service_name(pod_name)
        server = issue_server_cert(pki.server_signer, service_dns_names(service, ns))
        await self._put_secret(
            upload_secret(
                pvc,
                name=pod_name,
                tls_key=server.key,
                tls_cert=server.cert,
                client_ca=pki.client_ca,
            )
        )
        await self._ensure_service(pvc, pod_name)
        try:
            pod = await self.client.create(POD, manifest, ns)
            log.info("%s/%s upload pod created pod=%s scratch=%s", ns, name, pod_name, scratch)
        except AlreadyExists:
            pod = await self.client.get(POD, pod_name, ns)
        wanted = {ann.UPLOAD_POD_NAME: pod_name, ann.POD_READY: "false"}
        if (meta.get("annotations") or {}).get(ann.POD_PHASE) not in (
            PodPhase.RUNNING,
            PodPhase.FAILED,
        ):
            wanted[ann.POD_PHASE] = PodPhase.PENDING.value
        await self._annotate(pvc, wanted)
        if scratch:
            await self._ensure_scratch(pvc, pod)
        return Result()

    async def _scratch_left_over(self, pvc: Obj, scratch: str) -> float | None:
        """Seconds to wait while a scratch claim of an earlier pod (deleted at its deadline) goes
        away: the next pod would otherwise mount a claim the GC is about to delete. None when
        there is none. A claim of that name we did not make is left alone, and waited out."""
        ns = str(pvc["metadata"]["namespace"])
        try:
            existing = await self.client.get(PERSISTENT_VOLUME_CLAIM, scratch, ns)
        except NotFound:
            return None
        if existing["metadata"].get("deletionTimestamp"):
            return GONE_POLL
        if not _is_ours(existing):
            message = f"{scratch} scratch PVC exists and was not made for an upload pod"
            log.warning("%s/%s %s", ns, pvc["metadata"]["name"], message)
            await self._annotate(
                pvc,
                {
                    ann.CONDITION_RUNNING: "false",
                    ann.CONDITION_RUNNING_REASON: ConditionReason.ERROR.value,
                    ann.CONDITION_RUNNING_MESSAGE: message,
                },
            )
            return WAIT_POLL
        await self._delete(PERSISTENT_VOLUME_CLAIM, scratch, ns)
        return GONE_POLL

    async def _put_secret(self, secret: Obj) -> None:
        """Create the pod's Secret, or overwrite an older one: each pod gets fresh certificates."""
        meta = secret["metadata"]
        ns, name = str(meta["namespace"]), str(meta["name"])
        try:
            await self.client.create(SECRET, secret, ns)
            return
        except AlreadyExists:
            pass
        current = await self.client.get(SECRET, name, ns)
        meta["resourceVersion"] = current["metadata"].get("resourceVersion")
        await self.client.replace(SECRET, secret)  # a Conflict fails the reconcile: retried

    async def _ensure_service(self, pvc: Obj, pod_name: str) -> None:
        manifest = upload_service(pvc, pod_name=pod_name)
        ns, name = str(manifest["metadata"]["namespace"]), str(manifest["metadata"]["name"])
        try:
            await self.client.get(SERVICE, name, ns)
            return
        except NotFound:
            pass
        try:
            await self.client.create(SERVICE, manifest, ns)
            log.info("%s/%s upload service created service=%s", ns, pvc["metadata"]["name"], name)
        except AlreadyExists:
            pass

    async def _ensure_scratch(self, pvc: Obj, pod: Obj) -> None:
        manifest = render_scratch_pvc(pvc, pod=pod, cdi_config_status=await self._config_status())
        try:
            await self.client.create(PERSISTENT_VOLUME_CLAIM, manifest)
            log.info(
                "%s/%s scratch PVC created scratch=%s",
                pvc["metadata"]["namespace"],
                pvc["metadata"]["name"],
                manifest["metadata"]["name"],
            )
        except AlreadyExists:
            pass

    # --- following the pod ------------------------------------------------------------------

    async def _mirror(self, pvc: Obj, pod: Obj) -> Result:
        meta = pvc["metadata"]
        ns, name = str(meta["namespace"]), str(meta["name"])
        annotations: dict[str, str] = meta.get("annotations") or {}
        pod_name = str(pod["metadata"]["name"])
        phase = pod_phase(pod)
        wanted = {
            ann.POD_RESTARTS: claims.restarts(pvc, pod),
            ann.UPLOAD_POD_NAME: pod_name,
            ann.POD_READY: str(pod_ready(pod)).lower(),
        }
        wanted.update(running_annotations(pod))

        if phase == PodPhase.SUCCEEDED:
            message = _termination(pod)
            if message.deadline_passed:
                log.info("%s/%s upload deadline passed, new pod pod=%s", ns, name, pod_name)
                wanted.update({ann.POD_PHASE: "", ann.POD_READY: "false"})
                await self._annotate(pvc, wanted)
                await self._delete(POD, pod_name, ns, uid=str(pod["metadata"].get("uid", "")))
                if scratch := self._scratch_name(pvc):
                    await self._delete(PERSISTENT_VOLUME_CLAIM, scratch, ns)
                return Result(requeue_after=GONE_POLL)
            wanted[ann.POD_PHASE] = PodPhase.SUCCEEDED.value
            if message.preallocation_applied is not None:
                wanted[ann.PREALLOCATION_APPLIED] = str(message.preallocation_applied).lower()
            await self._annotate(pvc, wanted)
            log.info("%s/%s upload succeeded pod=%s", ns, name, pod_name)
            if is_clone_pvc(pvc):
                await record_event(self.client, pvc, REASON_CLONE_SUCCEEDED, MESSAGE_CLONED)
            else:
                await record_event(self.client, pvc, REASON_SUCCEEDED, MESSAGE_SUCCEEDED)
            await self._cleanup(Request(ns, name), pod_name)
            return Result()

        failed = worker_failure(pod)
        if failed is not None:
            text, detail, reason = failed.text, failed.detail, failed.reason
            if reason is not None:
                log.warning(
                    "%s/%s upload failed for good pod=%s message=%s", ns, name, pod_name, detail
                )
                wanted.update(
                    {
                        ann.FATAL_ERROR: "true",
                        ann.POD_PHASE: PodPhase.FAILED.value,
                        ann.POD_READY: "false",
                        ann.CONDITION_RUNNING: "false",
                        ann.CONDITION_RUNNING_REASON: reason,
                        ann.CONDITION_RUNNING_MESSAGE: text,
                    }
                )
                await self._annotate(pvc, wanted)
                await record_event(self.client, pvc, REASON_FAILED, detail, type_=WARNING)
                await self._cleanup(Request(ns, name), pod_name)
                return Result()
            if annotations.get(ann.CONDITION_RUNNING_MESSAGE) != text and text:
                await record_event(self.client, pvc, REASON_FAILED, text, type_=WARNING)
        if phase in (PodPhase.PENDING, PodPhase.RUNNING, PodPhase.FAILED, PodPhase.UNKNOWN):
            wanted[ann.POD_PHASE] = phase
        await self._annotate(pvc, wanted)
        return Result()

    # --- API helpers ------------------------------------------------------------------------

    async def _annotate(self, pvc: Obj, wanted: Mapping[str, str]) -> None:
        await claims.annotate(self.client, pvc, wanted)

    async def _delete(
        self, resource: Resource, name: str, namespace: str, *, uid: str | None = None
    ) -> None:
        try:
            await self.client.delete(resource, name, namespace, uid=uid or None)
            log.info("%s/%s deleted kind=%s", namespace, name, resource.kind)
        except (NotFound, Conflict):
            pass  # gone already, or (uid precondition) a newer object of that name: not ours

    async def _cleanup(self, request: Request, pod_name: str) -> None:
        """Pod, Service, Secret and scratch claim of the target, whichever exist."""
        ns = request.namespace
        objects: list[tuple[Resource, str]] = [
            (POD, pod_name),
            (SERVICE, naming.service_name(pod_name)),
            (SECRET, pod_name),
            (PERSISTENT_VOLUME_CLAIM, naming.scratch_pvc_name(request.name)),
        ]
        for resource, name in objects:
            try:
                existing = await self.client.get(resource, name, ns)
            except NotFound:
                continue
            if resource is PERSISTENT_VOLUME_CLAIM and not _is_ours(existing):
                continue
            if not existing["metadata"].get("deletionTimestamp"):
                await self._delete(resource, name, ns)


def _client_name(pvc: Mapping[str, Any]) -> str:
    """The client certificate CN the server accepts: the proxy's, or a clone's source pod's."""
    annotations = (pvc.get("metadata") or {}).get("annotations") or {}
    if is_clone_pvc(pvc) and annotations.get(ann.UPLOAD_CLIENT_NAME):
        return str(annotations[ann.UPLOAD_CLIENT_NAME])
    return UPLOAD_CLIENT_NAME


def pod_phase(pod: Mapping[str, Any]) -> str:
    return str((pod.get("status") or {}).get("phase") or PodPhase.PENDING)


def _is_ours(scratch: Mapping[str, Any]) -> bool:
    """A scratch claim we made: owned by a pod (never delete a user's claim of that name)."""
    refs = (scratch.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("kind") == POD.kind for r in refs)
