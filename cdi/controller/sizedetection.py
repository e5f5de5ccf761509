"""CDI's size-detection pod (reference §7.4): the virtual size of a clone source's disk image.

A host-assisted clone of a Filesystem source with no size asks for the virtual size of the
source's `disk.img`, which only a pod that mounts the source can read. The pod
`size-detection-<source pvc uid>` (source namespace, source mounted read-only, command
`cdi-image-size-detection -image-path /data/disk.img`) writes the size as its termination
message; the result is cached on the source claim (`cdi.Kubervirt.io/virtualSize`, with the
capacity it was read at in `cdi.Kubervirt.io/sourceCapacity`) and the pod is deleted, so it runs
again only when the source's capacity changed. `detect` answers the size, or `Pending` (with
CDI's reasons SizeDetectionPodCreated / SizeDetectionPodNotReady, or a failure that is
retried) while the pod has not answered.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from cdi.api import annotations as ann
from cdi.api import env
from cdi.api.groups import PERSISTENT_VOLUME_CLAIM, POD
from cdi.api.phases import PodPhase
from cdi.controller import claims
from cdi.controller.importing import IMPORTER_IMAGE
from cdi.controller.podspecs import (
    DATA_VOLUME,
    apply_pod_options,
    pod_resources,
    worker_security_context,
)
from cdi.controller.runtime import Request
from cdi.kube.client import Client
from cdi.kube.errors import AlreadyExists, NotFound

log = logging.getLogger(__name__)

POD_PREFIX: Final = "size-detection-"
COMMAND: Final = "cdi-image-size-detection"
CONTAINER_NAME: Final = "size-detection-volume"
IMAGE_PATH: Final = f"{env.DEFAULT_DATA_DIR}/{env.DISK_IMAGE_NAME}"
REASON_CREATED: Final = "SizeDetectionPodCreated"
REASON_NOT_READY: Final = "SizeDetectionPodNotReady"
REASON_FAILED: Final = "SizeDetectionPodFailed"
REQUESTER_ANNOTATION: Final = "cdi.kubevirt.io/storage.sizeDetection.dataVolume"
"""The DataVolume (<ns>/<name>) that started the pod: its changes wake that DataVolume (others
waiting on the same source look again every few seconds)."""

Obj = dict[str, Any]


@dataclass(frozen=True)
class Pending:
    reason: str
    message: str


def _capacity(src: Mapping[str, Any]) -> str:
    capacity = ((src.get("status") or {}).get("capacity") or {}).get("storage")
    return str(capacity or "")


def cached_size(src: Mapping[str, Any]) -> int | None:
    """The size a pod read before, if the source's capacity is still what it was then."""
    annotations = (src.get("metadata") or {}).get("annotations") or {}
    value = annotations.get(ann.SOURCE_VIRTUAL_SIZE)
    if value is None or annotations.get(ann.SOURCE_CAPACITY) != _capacity(src):
        return None
    with contextlib.suppress(ValueError):
        return int(value)
    return None


def size_pod(
    src: Mapping[str, Any],
    *,
    cdi_config_status: Mapping[str, Any],
    local: bool,
    requester: str = "",
    image: str = IMPORTER_IMAGE,
    command: str = COMMAND,
) -> Obj:
    """The size-detection pod manifest for source claim `src` (pure)."""
    meta = src["metadata"]
    container: Obj = {
        "name": CONTAINER_NAME,
        "image": image,
        "command": [command, "-image-path", IMAGE_PATH],
        "volumeMounts": [
            {"name": DATA_VOLUME, "mountPath": env.DEFAULT_DATA_DIR, "readOnly": True}
        ],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": worker_security_context(local=local),
    }
    if resources := pod_resources(cdi_config_status):
        container["resources"] = resources
    spec: Obj = {
        "containers": [container],
        "volumes": [
            {
                "name": DATA_VOLUME,
                "persistentVolumeClaim": {"claimName": str(meta["name"]), "readOnly": True},
            }
        ],
        "restartPolicy": "Never",
        "enableServiceLinks": False,
        "securityContext": {"fsGroup": env.QEMU_UID},
    }
    apply_pod_options(spec, meta.get("annotations") or {}, cdi_config_status)
    return {
        "apiVersion": POD.api_version,
        "kind": POD.kind,
        "metadata": {
            "name": POD_PREFIX + str(meta.get("uid", "")),
            "namespace": str(meta["namespace"]),
            "labels": {ann.LABEL_APP: ann.LABEL_APP_VALUE},
            "annotations": {REQUESTER_ANNOTATION: requester} if requester else {},
            "ownerReferences": [
                {
                    "apiVersion": PERSISTENT_VOLUME_CLAIM.api_version,
                    "kind": PERSISTENT_VOLUME_CLAIM.kind,
                    "name": str(meta["name"]),
                    "uid": str(meta.get("uid", "")),
                }
            ],
        },
        "spec": spec,
    }


def requester_of_pod(pod: Mapping[str, Any]) -> list[Request]:
    """The DataVolume a size-detection pod answers (for the DataVolume controller's watch)."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    requester = annotations.get(REQUESTER_ANNOTATION) or ""
    namespace, _, name = requester.partition("/")
    return [Request(namespace, name)] if namespace and name else []


def _terminated(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return ((statuses[0].get("state") or {}).get("terminated") or {}) if statuses else {}


async def detect(
    client: Client,
    src: Obj,
    *,
    cdi_config_status: Mapping[str, Any],
    local: bool,
    requester: str,
) -> int | Pending:
    """The virtual size of `src`'s disk image: cached, or read by the pod (see the module)."""
    if (size := cached_size(src)) is not None:
        return size
    meta = src["metadata"]
    namespace, where = str(meta["namespace"]), f"{meta['namespace']}/{meta['name']}"
    name = POD_PREFIX + str(meta.get("uid", ""))
    try:
        pod = await client.get(POD, name, namespace)
    except NotFound:
        manifest = size_pod(
            src, cdi_config_status=cdi_config_status, local=local, requester=requester
        )
        with contextlib.suppress(AlreadyExists):
            await client.create(POD, manifest, namespace)
            log.info("size-detection pod %s/%s created for %s", namespace, name, where)
        return Pending(
            REASON_CREATED,
            f"reading the virtual size of the source PVC {where}'s image (pod {name})",
        )
    phase = (pod.get("status") or {}).get("phase")
    message = str(_terminated(pod).get("message") or "").strip()
    if phase == PodPhase.SUCCEEDED:
        try:
            size = int(message)
        except ValueError:
            size = -1
        if size >= 0:
            cache = {ann.SOURCE_VIRTUAL_SIZE: str(size), ann.SOURCE_CAPACITY: _capacity(src)}
            await claims.annotate(client, src, cache)
            with contextlib.suppress(NotFound):
                await client.delete(POD, name, namespace)
            log.info("virtual size of %s is %d", where, size)
            return size
    if phase in (PodPhase.SUCCEEDED, PodPhase.FAILED):
        with contextlib.suppress(NotFound):
            await client.delete(POD, name, namespace)  # the next look starts a new one
        return Pending(
            REASON_FAILED,
            f"the size-detection pod {name} could not read the image of the source PVC "
            f"{where}: {message or 'no message'}; retrying",
        )
    return Pending(REASON_NOT_READY, f"waiting for the size-detection pod {name} ({phase})")
