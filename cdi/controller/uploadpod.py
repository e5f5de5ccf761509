"""The upload server's objects, built from the target PVC as CDI builds them (§6.1, §6.2).

Owns, as pure functions over plain JSON dicts:

* `upload_pod(pvc, ...)`: the `cdi-upload-<pvc>` pod that receives one upload. Labels
  `app=containerized-data-importer`, `cdi.kubevirt.io=cdi-upload-server`, `service=<service>`
  (the Service's selector) and `cdi.kubevirt.io/uploadTarget=<pvc uid>`; annotations
  `storage.createdByUploadController=yes`, the allow-listed PVC annotations (§4.4) and OVN's
  `k8s.ovn.org/open-default-ports` for 8443; owned (controller) by the PVC. One container
  `cdi-upload-server` (command `cdi-uploadserver`) with the env of the upload server contract:
  TLS_KEY_FILE, TLS_CERT_FILE, CLIENT_CERT_FILE (files of the Secret mounted at `/etc/tls`),
  FILESYSTEM_OVERHEAD, UPLOAD_IMAGE_SIZE (the PVC's request), CLIENT_NAME, PREALLOCATION,
  DEADLINE (RFC 3339) and, for Block, DESTINATION=/dev/cdi-block-volume; the PVC at `/data` or
  as the device `/dev/cdi-block-volume`; the scratch PVC at `/scratch` when given; an HTTPS
  readiness probe on `/healthz` port 8443 (initial delay 2 s, period 5 s); resources and the
  restricted security context as the importer pod has them. `local=True` (the all-in-one
  node) leaves out runAsUser and runAsNonRoot (see `cdi.controller.podspecs`) and sets
  LISTEN_ADDRESS to the pod's IP (every local pod shares the machine's network).
* `upload_service(pvc, pod_name=...)`: the headless Service (`clusterIP: None`, port 8443,
  selector `service=<name>`) whose DNS names the server certificate carries; owned by the PVC.
* `upload_secret(pvc, name=..., ...)`: the Secret the pod mounts at `/etc/tls`: `tls.key`,
  `tls.crt` (the server certificate) and `ca.crt` (the CA of the client certificate the proxy
  presents); owned by the PVC.
* `service_dns_names(service, namespace)`: the names the server certificate is issued for.

Nothing here talks to the API or makes keys: `cdi.controller.uploading` creates the objects,
`cdi.controller.certs` makes the certificates. Where we differ from CDI: no `-v=<level>`
argument and no TLS_CIPHERS/TLS_MIN_VERSION (we have no TLS security profile in CDIConfig yet);
the container command is set, as for the importer, because the local node agent runs processes,
not images.
"""

from __future__ import annotations

import base64
import datetime
import json
from collections.abc import Mapping
from typing import Any, Final

from cdi.api import VolumeMode, env
from cdi.api import annotations as ann
from cdi.api.groups import PERSISTENT_VOLUME_CLAIM, POD, SECRET, SERVICE
from cdi.api.tokens import UPLOAD_CLIENT_NAME
from cdi.controller import naming
from cdi.controller.config import pvc_overhead
from cdi.controller.podspecs import (
    DATA_VOLUME,
    POD_ANNOTATION_ALLOW_LIST,
    SCRATCH_VOLUME,
    apply_pod_options,
    env_var,
    pod_resources,
    worker_security_context,
)
from cdi.controller.rendering import RenderError

Obj = dict[str, Any]

CONTAINER_NAME: Final = "cdi-upload-server"
COMMAND: Final = "cdi-uploadserver"
IMAGE: Final = "quay.io/kubevirt/cdi-uploadserver:latest"
PORT_NAME: Final = "uploadserver"
TLS_VOLUME: Final = "tls-secret"
TLS_DIR: Final = "/etc/tls"
TLS_KEY_PATH: Final = f"{TLS_DIR}/tls.key"
TLS_CERT_PATH: Final = f"{TLS_DIR}/tls.crt"
CLIENT_CA_PATH: Final = f"{TLS_DIR}/ca.crt"
HEALTHZ_PATH: Final = "/healthz"
PROBE_INITIAL_DELAY: Final = 2
PROBE_PERIOD: Final = 5
#: Opens the upload port on OVN-Kubernetes clusters whose network policies deny by default.
OVN_OPEN_PORTS: Final = "k8s.ovn.org/open-default-ports"
OVN_OPEN_PORTS_VALUE: Final = json.dumps(
    [{"protocol": "tcp", "port": env.UPLOAD_SERVER_PORT}], separators=(",", ":")
)
CLUSTER_DOMAIN: Final = "cluster.local"

# Go's strconv.ParseBool, which CDI applies to annotation values.
_TRUE: Final = frozenset({"1", "t", "T", "TRUE", "true", "True"})


def format_deadline(when: datetime.datetime) -> str:
    """RFC 3339 in UTC, seconds precision, as Go's time.RFC3339 prints it."""
    return when.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def service_dns_names(service: str, namespace: str) -> list[str]:
    """`<svc>`, `<svc>.<ns>`, `<svc>.<ns>.svc`, `<svc>.<ns>.svc.cluster.local`."""
    return [
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.{CLUSTER_DOMAIN}",
    ]


def _owner(pvc: Mapping[str, Any]) -> Obj:
    metadata = pvc.get("metadata") or {}
    return {
        "apiVersion": PERSISTENT_VOLUME_CLAIM.api_version,
        "kind": PERSISTENT_VOLUME_CLAIM.kind,
        "name": str(metadata.get("name", "")),
        "uid": str(metadata.get("uid", "")),
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _labels(component: str) -> dict[str, str]:
    return {ann.LABEL_APP: ann.LABEL_APP_VALUE, ann.LABEL_COMPONENT: component}


def upload_pod(
    pvc: Mapping[str, Any],
    *,
    name: str,
    image: str,
    cdi_config_status: Mapping[str, Any],
    deadline: datetime.datetime,
    scratch_pvc: str | None,
    client_name: str = UPLOAD_CLIENT_NAME,
    command: str = COMMAND,
    local: bool = False,
    image_pull_policy: str | None = None,
) -> Obj:
    """The upload server Pod `name` for `pvc` (which carries `storage.upload.target`).

    `deadline`: when the server gives up waiting for an upload (it then exits with
    `deadlinePassed` and the controller replaces it, with fresh certificates); `scratch_pvc`
    names a scratch claim to mount at `/scratch` (disk images; not archives). Raises
    `RenderError` when the PVC has no storage request.
    """
    metadata = pvc.get("metadata") or {}
    spec = pvc.get("spec") or {}
    pvc_name = str(metadata.get("name", ""))
    namespace = str(metadata.get("namespace", ""))
    annotations: Mapping[str, str] = metadata.get("annotations") or {}
    image_size = ((spec.get("resources") or {}).get("requests") or {}).get("storage")
    if image_size is None:
        raise RenderError(f'storage request is missing in pvc "{namespace}/{pvc_name}"')
    block = spec.get("volumeMode") == VolumeMode.BLOCK
    preallocation = annotations.get(ann.PREALLOCATION_REQUESTED, "") in _TRUE
    service = naming.service_name(name)

    container_env = [
        env_var(env.TLS_KEY_FILE, TLS_KEY_PATH),
        env_var(env.TLS_CERT_FILE, TLS_CERT_PATH),
        env_var(env.CLIENT_CERT_FILE, CLIENT_CA_PATH),
        env_var(env.FILESYSTEM_OVERHEAD, pvc_overhead(pvc, cdi_config_status)),
        env_var(env.UPLOAD_IMAGE_SIZE, str(image_size)),
        env_var(env.CLIENT_NAME, client_name),
        env_var(env.PREALLOCATION, str(preallocation).lower()),
        env_var(env.DEADLINE, format_deadline(deadline)),
    ]
    volumes: list[Obj] = [
        {"name": DATA_VOLUME, "persistentVolumeClaim": {"claimName": pvc_name}},
        {"name": TLS_VOLUME, "secret": {"secretName": name}},
    ]
    mounts: list[Obj] = [{"name": TLS_VOLUME, "mountPath": TLS_DIR, "readOnly": True}]
    container: Obj = {
        "name": CONTAINER_NAME,
        "image": image,
        "command": [command],
        "env": container_env,
        "ports": [{"name": PORT_NAME, "containerPort": env.UPLOAD_SERVER_PORT, "protocol": "TCP"}],
        "readinessProbe": {
            "httpGet": {
                "path": HEALTHZ_PATH,
                "port": env.UPLOAD_SERVER_PORT,
                "scheme": "HTTPS",
            },
            "initialDelaySeconds": PROBE_INITIAL_DELAY,
            "periodSeconds": PROBE_PERIOD,
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if image_pull_policy:
        container["imagePullPolicy"] = image_pull_policy
    if block:
        container["volumeDevices"] = [{"name": DATA_VOLUME, "devicePath": env.DEFAULT_BLOCK_DEVICE}]
        container_env.append(env_var(env.DESTINATION, env.DEFAULT_BLOCK_DEVICE))
    else:
        mounts.insert(0, {"name": DATA_VOLUME, "mountPath": env.DEFAULT_DATA_DIR})
    if local:
        # Pods of the local node share this machine's network, each with a loopback address of
        # its own: the server listens there, not on every address (two upload servers, or an
        # importer's metrics, would otherwise fight over port 8443).
        container_env.append(
            {
                "name": env.LISTEN_ADDRESS,
                "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}},
            }
        )
    if scratch_pvc:
        volumes.append(
            {"name": SCRATCH_VOLUME, "persistentVolumeClaim": {"claimName": scratch_pvc}}
        )
        mounts.append({"name": SCRATCH_VOLUME, "mountPath": env.DEFAULT_SCRATCH_DIR})
    container["volumeMounts"] = mounts
    if resources := pod_resources(cdi_config_status):
        container["resources"] = resources
    container["securityContext"] = worker_security_context(local=local)

    pod_spec: Obj = {
        "containers": [container],
        "volumes": volumes,
        "restartPolicy": "OnFailure",
        "enableServiceLinks": False,
        # The qemu group owns what the server writes, so the VM launcher (also qemu) can use it.
        "securityContext": {"fsGroup": env.QEMU_UID},
    }
    apply_pod_options(pod_spec, annotations, cdi_config_status)

    labels = _labels(ann.LABEL_COMPONENT_UPLOAD_SERVER)
    labels[ann.LABEL_SERVICE] = service
    labels[ann.LABEL_UPLOAD_TARGET] = str(metadata.get("uid", ""))
    pod_annotations = {
        ann.CREATED_BY_UPLOAD_CONTROLLER: ann.CREATED_BY_CONTROLLER_VALUE,
        OVN_OPEN_PORTS: OVN_OPEN_PORTS_VALUE,
    }
    for key, default in POD_ANNOTATION_ALLOW_LIST.items():
        value = annotations.get(key, default)
        if value:
            pod_annotations[key] = value
    return {
        "apiVersion": POD.api_version,
        "kind": POD.kind,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "annotations": pod_annotations,
            "ownerReferences": [_owner(pvc)],
        },
        "spec": pod_spec,
    }


def upload_service(pvc: Mapping[str, Any], *, pod_name: str) -> Obj:
    """The headless Service in front of upload pod `pod_name` (named after it, §4.6)."""
    metadata = pvc.get("metadata") or {}
    name = naming.service_name(pod_name)
    return {
        "apiVersion": SERVICE.api_version,
        "kind": SERVICE.kind,
        "metadata": {
            "name": name,
            "namespace": str(metadata.get("namespace", "")),
            "labels": _labels(ann.LABEL_COMPONENT_UPLOAD_SERVER),
            "annotations": {ann.CREATED_BY_UPLOAD_CONTROLLER: ann.CREATED_BY_CONTROLLER_VALUE},
            "ownerReferences": [_owner(pvc)],
        },
        "spec": {
            "clusterIP": "None",
            "ports": [
                {
                    "name": PORT_NAME,
                    "protocol": "TCP",
                    "port": env.UPLOAD_SERVER_PORT,
                    "targetPort": env.UPLOAD_SERVER_PORT,
                }
            ],
            "selector": {ann.LABEL_SERVICE: name},
        },
    }


def upload_secret(
    pvc: Mapping[str, Any], *, name: str, tls_key: bytes, tls_cert: bytes, client_ca: bytes
) -> Obj:
    """The Secret upload pod `name` mounts at `/etc/tls` (named as the pod, §4.6)."""
    metadata = pvc.get("metadata") or {}

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return {
        "apiVersion": SECRET.api_version,
        "kind": SECRET.kind,
        "metadata": {
            "name": name,
            "namespace": str(metadata.get("namespace", "")),
            "labels": _labels(ann.LABEL_COMPONENT_UPLOAD_SERVER),
            "annotations": {ann.CREATED_BY_UPLOAD_CONTROLLER: ann.CREATED_BY_CONTROLLER_VALUE},
            "ownerReferences": [_owner(pvc)],
        },
        "type": "Opaque",
        "data": {"tls.key": b64(tls_key), "tls.crt": b64(tls_cert), "ca.crt": b64(client_ca)},
    }
