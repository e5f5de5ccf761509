"""Host-assisted clone: the source pod that streams the source volume to the target (CDI §7.3).

Owns, per target PVC annotated `k8s.io/CloneRequest: <ns>/<name>` (the primary key; the upload
server on the target is `cdi.controller.uploading`'s), once the target is Bound and its upload
server runs (`storage.pod.phase=Running`; the cloner waits until it listens, so the readiness
probe's initial delay is not paid on every clone):

* the source pod `<target uid>-source-pod` in the *source* namespace, running `cdi-cloner` with
  the source PVC mounted read-only at `/var/run/cdi/clone/source` (Filesystem) or as the device
  `/dev/cdi-block-volume` (Block), and the Secret of the same name holding its client
  certificate (CN = the target's `uploadClientName`, issued by the upload client signer) and the
  server CA. On one machine service names do not resolve: the pod is also told the upload
  pod's address (`UPLOAD_SERVER_ADDRESS`), and replaced if that address changes. Objects in
  another namespace cannot be owned by the target, so they are labelled with it and deleted here;
* source in use: while another running pod mounts the source read-write, no source pod is made
  and the target gets a `CloneSourceInUse` event; a source PVC that disappears stops the clone
  (its pod is deleted) until it is back;
* mirroring the source pod into the target's `storage.sourceClonePodName` and
  `storage.condition.source.running*` annotations (the DataVolume shows CloneInProgress while the
  source pod runs, with its progress metric);
* the end: when the upload server succeeded (`storage.pod.phase=Succeeded`) or failed for good
  (`storage.import.fatalError`), or the target is going away, the source pod and Secret are
  deleted (a successful pod is kept when the target says `storage.pod.retainAfterCompletion`);
  success also sets `k8s.io/CloneOf: "true"` on the target.

Called by `cdi.controller.manager` through a `Controller` (PVCs, and source pods mapped back to
their target through their annotation). Must not write DataVolumes.
"""

from __future__ import annotations

import base64
import contextlib
import logging
from collections.abc import Mapping
from typing import Any, Final

from cdi.api import ContentType, VolumeMode, env
from cdi.api import annotations as ann
from cdi.api.groups import PERSISTENT_VOLUME_CLAIM, POD, SECRET
from cdi.api.phases import PodPhase
from cdi.controller import claims, naming
from cdi.controller.certs import CDI_NAMESPACE, ensure_upload_pki, issue_client_cert
from cdi.controller.events import WARNING, record_event
from cdi.controller.importing import running_annotations
from cdi.controller.podspecs import (
    DATA_VOLUME,
    apply_pod_options,
    env_var,
    owner_uid_for,
    pod_resources,
    worker_security_context,
)
from cdi.controller.runtime import Request, Result
from cdi.kube.client import Client
from cdi.kube.errors import AlreadyExists, Conflict, NotFound

log = logging.getLogger(__name__)

Obj = dict[str, Any]

CONTAINER_NAME: Final = "cdi-clone-source"
COMMAND: Final = "cdi-cloner"
IMAGE: Final = "quay.io/kubevirt/cdi-cloner:latest"
#: On the source pod: the target it feeds, `<namespace>/<name>` (maps pod events back).
TARGET_ANNOTATION: Final = "cdi.kubevirt.io/storage.clone.target"
#: On the source pod: the upload server address it was given (one machine only).
ADDRESS_ANNOTATION: Final = "cdi.kubevirt.io/storage.clone.uploadServerAddress"
REASON_SOURCE_IN_USE: Final = "CloneSourceInUse"
REASON_SOURCE_GONE: Final = "CloneSourceMissing"
WAIT_POLL: Final = 2.0
_TERMINAL: Final = frozenset({PodPhase.SUCCEEDED, PodPhase.FAILED})
_UPLOAD_SERVER_PORT: Final = env.UPLOAD_SERVER_PORT


def is_clone_target(pvc: Mapping[str, Any]) -> bool:
    annotations = (pvc.get("metadata") or {}).get("annotations") or {}
    return ann.CLONE_REQUEST in annotations and ann.UPLOAD_TARGET not in annotations


def source_of(pvc: Mapping[str, Any]) -> tuple[str, str]:
    annotations = (pvc.get("metadata") or {}).get("annotations") or {}
    namespace, _, name = str(annotations[ann.CLONE_REQUEST]).partition("/")
    return namespace, name


def target_of_pod(pod: Mapping[str, Any]) -> list[Request]:
    """The target PVC a source pod feeds (for the controller's pod watch)."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    target = annotations.get(TARGET_ANNOTATION)
    if not target or "/" not in target:
        return []
    namespace, _, name = target.partition("/")
    return [Request(namespace, name)]


def _upload_server_runs(annotations: Mapping[str, str]) -> bool:
    """The target's upload server is running (ready or not: the cloner waits for it to
    listen, which saves the readiness probe's initial delay on every clone)."""
    return annotations.get(ann.POD_READY) == "true" or (
        annotations.get(ann.POD_PHASE) == PodPhase.RUNNING
    )


def _phase(pod: Mapping[str, Any]) -> str:
    return str((pod.get("status") or {}).get("phase") or PodPhase.PENDING)


def _writes_claim(pod: Mapping[str, Any], claim: str) -> bool:
    for volume in (pod.get("spec") or {}).get("volumes") or []:
        source = volume.get("persistentVolumeClaim") or {}
        if source.get("claimName") == claim and not source.get("readOnly"):
            return True
    return False


def source_pod(
    target: Mapping[str, Any],
    source: Mapping[str, Any],
    *,
    name: str,
    upload_address: str | None,
    cdi_config_status: Mapping[str, Any],
    local: bool,
    image: str = IMAGE,
    command: str = COMMAND,
) -> Obj:
    """The source pod manifest (pure: no API calls)."""
    meta = target["metadata"]
    target_ns, target_name = str(meta["namespace"]), str(meta["name"])
    annotations: Mapping[str, str] = meta.get("annotations") or {}
    source_meta = source["metadata"]
    upload_pod = annotations.get(ann.UPLOAD_POD_NAME) or naming.upload_pod_name(target_name)
    service = naming.service_name(upload_pod)
    block = (source.get("spec") or {}).get("volumeMode") == VolumeMode.BLOCK
    content = annotations.get(ann.CONTENT_TYPE) or ContentType.KUBEVIRT.value
    container_env = [
        env_var(
            env.UPLOAD_URL,
            f"https://{service}.{target_ns}.svc:{_UPLOAD_SERVER_PORT}/v1beta1/upload",
        ),
        {"name": env.CLIENT_CERT, "valueFrom": {"secretKeyRef": {"name": name, "key": "tls.crt"}}},
        {"name": env.CLIENT_KEY, "valueFrom": {"secretKeyRef": {"name": name, "key": "tls.key"}}},
        {
            "name": env.SERVER_CA_CERT,
            "valueFrom": {"secretKeyRef": {"name": name, "key": "ca.crt"}},
        },
        env_var(env.OWNER_UID, owner_uid_for(target)),
        env_var(env.VOLUME_MODE, "block" if block else "filesystem"),
        env_var(env.MOUNT_POINT, env.CLONE_SOURCE_MOUNT),
        env_var(env.PREALLOCATION, annotations.get(ann.PREALLOCATION_REQUESTED, "false")),
        env_var("CLONE_CONTENT_TYPE", content),
    ]
    if upload_address:
        container_env.append(env_var("UPLOAD_SERVER_ADDRESS", upload_address))
    claim = str(source_meta["name"])
    container: Obj = {
        "name": CONTAINER_NAME,
        "image": image,
        "command": [command],
        "env": container_env,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": worker_security_context(local=local),
    }
    if block:
        container["volumeDevices"] = [{"name": DATA_VOLUME, "devicePath": env.DEFAULT_BLOCK_DEVICE}]
    else:
        container["volumeMounts"] = [
            {"name": DATA_VOLUME, "mountPath": env.CLONE_SOURCE_MOUNT, "readOnly": True}
        ]
    if resources := pod_resources(cdi_config_status):
        container["resources"] = resources
    pod_spec: Obj = {
        "containers": [container],
        "volumes": [
            {
                "name": DATA_VOLUME,
                "persistentVolumeClaim": {"claimName": claim, "readOnly": True},
            }
        ],
        "restartPolicy": "OnFailure",
        "enableServiceLinks": False,
        "securityContext": {"fsGroup": env.QEMU_UID},
    }
    apply_pod_options(pod_spec, annotations, cdi_config_status)
    pod_annotations = {
        TARGET_ANNOTATION: f"{target_ns}/{target_name}",
        ann.OWNER_UID: str(meta.get("uid", "")),
    }
    if upload_address:
        pod_annotations[ADDRESS_ANNOTATION] = upload_address
    return {
        "apiVersion": POD.api_version,
        "kind": POD.kind,
        "metadata": {
            "name": name,
            "namespace": str(source_meta["namespace"]),
            "labels": {
                ann.LABEL_APP: ann.LABEL_APP_VALUE,
                ann.LABEL_COMPONENT: ann.LABEL_COMPONENT_CLONE_SOURCE,
                ann.LABEL_CLONE_SOURCE_PVC_UID: str(source_meta.get("uid", "")),
            },
            "annotations": pod_annotations,
        },
        "spec": pod_spec,
    }


class CloneReconciler:
    """Reconciles one target PVC key; see the module docstring."""

    def __init__(
        self,
        client: Client,
        *,
        local: bool,
        command: str = COMMAND,
        image: str = IMAGE,
        cdi_namespace: str = CDI_NAMESPACE,
    ) -> None:
        self.client = client
        self.local = local
        self.command = command
        self.image = image
        self.cdi_namespace = cdi_namespace
        self._in_use: dict[tuple[str, str], frozenset[str]] = {}

    async def __call__(self, request: Request) -> Result:
        try:
            pvc = await self.client.get(PERSISTENT_VOLUME_CLAIM, request.name, request.namespace)
        except NotFound:
            await self._delete_sources_of(request, uid=None)
            return Result()
        if not is_clone_target(pvc):
            return Result()
        meta = pvc["metadata"]
        annotations: Mapping[str, str] = meta.get("annotations") or {}
        src_ns, src_name = source_of(pvc)
        pod_name = naming.clone_source_pod_name(str(meta["uid"]))
        done = annotations.get(ann.POD_PHASE) == PodPhase.SUCCEEDED
        if meta.get("deletionTimestamp") or done or annotations.get(ann.FATAL_ERROR) == "true":
            # CDI's retainAfterCompletion keeps the finished pod (and its log) for inspection.
            retain = done and annotations.get(ann.POD_RETAIN_AFTER_COMPLETION) == "true"
            await self._delete_source(src_ns, pod_name, pod=not retain)
            if done and annotations.get(ann.CLONE_OF) != "true":
                await self._annotate(pvc, {ann.CLONE_OF: "true"})
            return Result()
        if (pvc.get("status") or {}).get("phase") != "Bound":
            return Result()
        try:
            source = await self.client.get(PERSISTENT_VOLUME_CLAIM, src_name, src_ns)
        except NotFound:
            await self._delete_source(src_ns, pod_name)
            message = f"the clone source PVC {src_ns}/{src_name} is gone; waiting for it"
            if annotations.get(ann.CONDITION_SOURCE_RUNNING_MESSAGE) != message:
                await record_event(self.client, pvc, REASON_SOURCE_GONE, message, type_=WARNING)
            await self._annotate(
                pvc,
                {
                    ann.CONDITION_SOURCE_RUNNING: "false",
                    ann.CONDITION_SOURCE_RUNNING_REASON: REASON_SOURCE_GONE,
                    ann.CONDITION_SOURCE_RUNNING_MESSAGE: message,
                },
            )
            return Result(requeue_after=WAIT_POLL * 2)
        try:
            pod: Obj | None = await self.client.get(POD, pod_name, src_ns)
        except NotFound:
            pod = None
        if pod is not None and pod["metadata"].get("deletionTimestamp"):
            return Result(requeue_after=0.5)
        if not _upload_server_runs(annotations):
            if pod is not None:
                return await self._mirror(pvc, pod)
            return Result()  # the upload reconciler's annotation change wakes us
        address = await self._upload_address(pvc) if self.local else None
        if self.local and address is None:
            return Result(requeue_after=WAIT_POLL)
        if pod is not None and _phase(pod) not in _TERMINAL:
            given = (pod["metadata"].get("annotations") or {}).get(ADDRESS_ANNOTATION)
            if self.local and given != address:
                log.info("%s upload server moved to %s: new source pod", request, address)
                await self._delete_source(src_ns, pod_name, secret=False)
                return Result(requeue_after=0.5)
        if pod is None:
            return await self._start(pvc, source, pod_name, address)
        return await self._mirror(pvc, pod)

    # --- creating ---------------------------------------------------------------------------

    async def _users(self, source: Obj, own: str) -> list[str]:
        ns, claim = str(source["metadata"]["namespace"]), str(source["metadata"]["name"])
        items, _ = await self.client.list(POD, ns)
        return sorted(
            str(p["metadata"]["name"])
            for p in items
            if p["metadata"]["name"] != own
            and _phase(p) not in _TERMINAL
            and _writes_claim(p, claim)
            and ((p["metadata"].get("labels") or {}).get(ann.LABEL_COMPONENT))
            != ann.LABEL_COMPONENT_CLONE_SOURCE
        )

    async def _start(self, pvc: Obj, source: Obj, pod_name: str, address: str | None) -> Result:
        meta = pvc["metadata"]
        key = (str(meta["namespace"]), str(meta["name"]))
        users = await self._users(source, pod_name)
        if users:
            if self._in_use.get(key) != frozenset(users):
                self._in_use[key] = frozenset(users)
                src = f"{source['metadata']['namespace']}/{source['metadata']['name']}"
                for user in users:
                    await record_event(
                        self.client,
                        pvc,
                        REASON_SOURCE_IN_USE,
                        f"pod {source['metadata']['namespace']}/{user} using "
                        f"PersistentVolumeClaim {src}; the clone waits until it ends",
                        type_=WARNING,
                    )
                await self._annotate(
                    pvc,
                    {
                        ann.CONDITION_SOURCE_RUNNING: "false",
                        ann.CONDITION_SOURCE_RUNNING_REASON: REASON_SOURCE_IN_USE,
                        ann.CONDITION_SOURCE_RUNNING_MESSAGE: "source in use by "
                        + ", ".join(users),
                    },
                )
            return Result(requeue_after=WAIT_POLL)
        self._in_use.pop(key, None)
        config = await self._config_status()
        pki = await ensure_upload_pki(self.client, self.cdi_namespace)
        client_name = str((meta.get("annotations") or {}).get(ann.UPLOAD_CLIENT_NAME) or "")
        assert pki.client_signer is not None
        pair = issue_client_cert(pki.client_signer, client_name)
        src_ns = str(source["metadata"]["namespace"])
        secret: Obj = {
            "apiVersion": SECRET.api_version,
            "kind": SECRET.kind,
            "metadata": {
                "name": pod_name,
                "namespace": src_ns,
                "labels": {
                    ann.LABEL_APP: ann.LABEL_APP_VALUE,
                    ann.LABEL_COMPONENT: ann.LABEL_COMPONENT_CLONE_SOURCE,
                },
                "annotations": {TARGET_ANNOTATION: f"{key[0]}/{key[1]}"},
            },
            "type": "Opaque",
            "data": {
                "tls.crt": base64.b64encode(pair.cert).decode(),
                "tls.key": base64.b64encode(pair.key).decode(),
                "ca.crt": base64.b64encode(pki.server_signer.cert).decode(),
            },
        }
        try:
            await self.client.create(SECRET, secret, src_ns)
        except AlreadyExists:
            current = await self.client.get(SECRET, pod_name, src_ns)
            secret["metadata"]["resourceVersion"] = current["metadata"].get("resourceVersion")
            await self.client.replace(SECRET, secret)
        manifest = source_pod(
            pvc,
            source,
            name=pod_name,
            upload_address=address,
            cdi_config_status=config,
            local=self.local,
            image=self.image,
            command=self.command,
        )
        try:
            pod = await self.client.create(POD, manifest, src_ns)
            log.info("%s/%s clone source pod created pod=%s/%s", *key, src_ns, pod_name)
        except AlreadyExists:
            pod = await self.client.get(POD, pod_name, src_ns)
        return await self._mirror(pvc, pod)

    async def _config_status(self) -> Obj:
        return await claims.config_status(self.client)

    async def _upload_address(self, pvc: Obj) -> str | None:
        annotations = pvc["metadata"].get("annotations") or {}
        name = annotations.get(ann.UPLOAD_POD_NAME)
        if not name:
            return None
        try:
            pod = await self.client.get(POD, name, pvc["metadata"]["namespace"])
        except NotFound:
            return None
        ip = (pod.get("status") or {}).get("podIP")
        return f"{ip}:{_UPLOAD_SERVER_PORT}" if ip else None

    # --- following ---------------------------------------------------------------------------

    async def _mirror(self, pvc: Obj, pod: Obj) -> Result:
        running = running_annotations(pod)
        wanted = {ann.SOURCE_CLONE_POD_NAME: str(pod["metadata"]["name"])}
        for key, source_key in (
            (ann.CONDITION_RUNNING, ann.CONDITION_SOURCE_RUNNING),
            (ann.CONDITION_RUNNING_REASON, ann.CONDITION_SOURCE_RUNNING_REASON),
            (ann.CONDITION_RUNNING_MESSAGE, ann.CONDITION_SOURCE_RUNNING_MESSAGE),
        ):
            if key in running:
                wanted[source_key] = running[key]
        wanted[ann.POD_RESTARTS] = claims.restarts(pvc, pod)
        await self._annotate(pvc, wanted)
        # The source pod's progress is polled by the DataVolume reconciler; its end arrives as
        # a pod event. Nothing to wait for here.
        return Result()

    # --- API helpers ------------------------------------------------------------------------

    async def _annotate(self, pvc: Obj, wanted: Mapping[str, str]) -> None:
        await claims.annotate(self.client, pvc, wanted)

    async def _delete_source(
        self, namespace: str, name: str, *, secret: bool = True, pod: bool = True
    ) -> None:
        kinds = ((POD,) if pod else ()) + ((SECRET,) if secret else ())
        for resource in kinds:
            with contextlib.suppress(NotFound, Conflict):
                existing = await self.client.get(resource, name, namespace)
                if not existing["metadata"].get("deletionTimestamp"):
                    await self.client.delete(resource, name, namespace)
                    log.info("%s/%s deleted kind=%s", namespace, name, resource.kind)

    async def _delete_sources_of(self, request: Request, uid: str | None) -> None:
        """Source pods and Secrets of a target that is gone (found by their annotation)."""
        target = f"{request.namespace}/{request.name}"
        selector = f"{ann.LABEL_COMPONENT}={ann.LABEL_COMPONENT_CLONE_SOURCE}"
        for resource in (POD, SECRET):
            items, _ = await self.client.list(resource, None, label_selector=selector)
            for item in items:
                meta = item["metadata"]
                if (meta.get("annotations") or {}).get(TARGET_ANNOTATION) != target:
                    continue
                if uid is not None and (meta.get("annotations") or {}).get(ann.OWNER_UID) != uid:
                    continue
                with contextlib.suppress(NotFound, Conflict):
                    await self.client.delete(resource, meta["name"], meta["namespace"])
                    log.info("%s deleted kind=%s", meta["name"], resource.kind)
