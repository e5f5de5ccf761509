"""Worker pod specs, built from the target PVC's annotations as CDI builds them (§5.1, §5.2).

Owns `importer_pod(pvc, ...)`: the `importer-<pvc>` pod that fills one claim. Its shape is CDI's
so that tools and people who know CDI read it the same way:

* metadata: labels `app=containerized-data-importer`, `cdi.kubevirt.io=importer`,
  `prometheus.cdi.kubevirt.io=true` plus every label of the PVC; annotation
  `storage.createdByController=yes` plus the allow-listed PVC annotations (§4.4, with the
  sidecar-injection defaults); an ownerReference to the PVC (controller), so deleting the PVC
  deletes the pod;
* one container `importer` (image `image`, command `cdi-importer`), port `metrics` 8443,
  `terminationMessagePolicy: FallbackToLogsOnError`, `restartPolicy: OnFailure`;
* the environment of the importer contract (`cdi.api.env`, README "The importer worker") read
  from the PVC's `storage.import.*` annotations and the CDIConfig status, in CDI's order (an
  empty value is written as a bare name, as the API server returns it);
* volumes: the PVC at `/data` (Filesystem) or as the device `/dev/cdi-block-volume` (Block), the
  scratch PVC at `/scratch`, the CA ConfigMap at `/certs`, the proxy CA copy at `/proxycerts/`,
  each secret of extra headers at `/extraheaders/<i>`; the local node agent maps these paths to
  the worker's `CDI_*` path variables (`cdi.agent.podspec`);
* resources from CDIConfig `defaultPodResourceRequirements`, and CDI's restricted security
  context (all capabilities dropped, RuntimeDefault seccomp, no privilege escalation, non-root
  uid 107, fsGroup 107 when something is mounted).

`local=True` leaves out `runAsUser` and `runAsNonRoot`. The local node agent runs a container
as a process of its own user; it cannot become uid 107 (and as another user it could not write
the server's volume directories anyway). Promising uid 107 would describe the process wrongly,
and when the server runs as root `runAsNonRoot: true` would be false (a kubelet would refuse to
start such a container). Everything else stays, so the pod reads the same on both.

Two deliberate differences from CDI: no `-v=<level>` argument (our `cdi-importer` takes no flags;
its log level is `CDI_LOG_LEVEL`), and extra headers are numbered by their DataVolume order
(CDI walks a Go map, so its numbering varies). Pure function; the reconciler creates the pod,
and copies the proxy CA ConfigMap (`import-proxy-cm-<pvc>`) when it names one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Final
from urllib.parse import urlsplit

from cdi.api import ContentType, SourceType, VolumeMode, env
from cdi.api import annotations as ann
from cdi.api.groups import PERSISTENT_VOLUME_CLAIM, POD
from cdi.controller import naming
from cdi.controller.config import DEFAULT_POD_RESOURCE_REQUIREMENTS, pvc_overhead
from cdi.controller.rendering import RenderError

Obj = dict[str, Any]

CONTAINER_NAME: Final = "importer"
COMMAND: Final = "cdi-importer"
METRICS_PORT_NAME: Final = "metrics"
# Volume names, as CDI names them.
DATA_VOLUME: Final = "cdi-data-vol"
SCRATCH_VOLUME: Final = "cdi-scratch-vol"
CERT_VOLUME: Final = "cdi-cert-vol"
PROXY_CERT_VOLUME: Final = "cdi-proxy-cert-vol"
SECRET_EXTRA_HEADERS_VOLUME: Final = "cdi-secret-extra-headers-vol-{}"

#: PVC annotations copied to worker pods, with the value used when the PVC has none (§4.4).
POD_ANNOTATION_ALLOW_LIST: Final[Mapping[str, str]] = {
    ann.POD_NETWORKS: "",
    ann.POD_SIDECAR_INJECTION: ann.POD_SIDECAR_INJECTION_DEFAULT,
    ann.POD_LINKERD_INJECTION: ann.POD_LINKERD_INJECTION_DEFAULT,
    ann.POD_PRIORITY_CLASS_NAME: "",
    ann.POD_MULTUS_DEFAULT_NETWORK: "",
}

# Go's strconv.ParseBool, which CDI applies to annotation values.
_TRUE: Final = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE: Final = frozenset({"0", "f", "F", "FALSE", "false", "False"})
_INDEXED: Final = re.compile(r"^(\d+)$")


def owner_uid_for(pvc: Mapping[str, Any]) -> str:
    """`OWNER_UID` as CDI chooses it: the PVC's only owner (its DataVolume), else the PVC."""
    metadata = pvc.get("metadata") or {}
    owners = metadata.get("ownerReferences") or []
    if len(owners) == 1:
        return str(owners[0].get("uid", ""))
    return str(metadata.get("uid", ""))


def _source(annotations: Mapping[str, str]) -> SourceType:
    # Unknown or missing means http, as CDI's GetSource.
    try:
        return SourceType(annotations.get(ann.IMPORT_SOURCE, ""))
    except ValueError:
        return SourceType.HTTP


def _indexed(annotations: Mapping[str, str], prefix: str) -> list[str]:
    """Values of `<prefix><i>` annotations in index order (entries with other suffixes last)."""
    found = []
    for key, value in annotations.items():
        if key.startswith(prefix):
            suffix = key[len(prefix) :]
            order = int(suffix) if _INDEXED.match(suffix) else 1 << 30
            found.append((order, key, value))
    return [value for _, _, value in sorted(found)]


def _insecure_tls(
    source: SourceType, annotations: Mapping[str, str], insecure_registries: Iterable[str]
) -> bool:
    endpoint = annotations.get(ann.IMPORT_ENDPOINT, "")
    # The PVC's insecureSkipVerify counts only where the DataVolume API offers it.
    if source in (SourceType.HTTP, SourceType.IMAGEIO) and (
        annotations.get(ann.IMPORT_INSECURE_SKIP_VERIFY) in _TRUE
    ):
        return True
    # Registries named in CDIConfig skip TLS for docker:// URLs (CDI's IsInsecureTLS).
    try:
        parts = urlsplit(endpoint)
    except ValueError:
        return False
    return parts.scheme == "docker" and parts.netloc in set(insecure_registries)


def env_var(name: str, value: str) -> Obj:
    # The API server drops an empty `value`; writing it the same way keeps the pod as read back
    # identical to the pod created (no spurious diffs for reconcilers comparing them).
    return {"name": name, "value": value} if value else {"name": name}


def _secret_env(name: str, secret: str, key: str) -> Obj:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def pod_resources(cdi_config_status: Mapping[str, Any]) -> Obj:
    configured = cdi_config_status.get("defaultPodResourceRequirements")
    source: Mapping[str, Any] = (
        configured if isinstance(configured, Mapping) else DEFAULT_POD_RESOURCE_REQUIREMENTS
    )
    resources: Obj = {}
    for kind in ("limits", "requests"):
        values = source.get(kind)
        # CDI writes "0" for "no limit"; a zero limit on a pod means "none" too, so drop it.
        kept = {k: str(v) for k, v in (values or {}).items() if str(v) not in ("0", "")}
        if kept:
            resources[kind] = kept
    return resources


def worker_security_context(*, local: bool) -> Obj:
    """CDI's restricted container security context; `local` leaves out the uid (see above)."""
    security: Obj = {
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
        "allowPrivilegeEscalation": False,
    }
    if not local:
        security["runAsNonRoot"] = True
        security["runAsUser"] = env.QEMU_UID
    return security


def apply_pod_options(
    pod_spec: Obj, annotations: Mapping[str, str], cdi_config_status: Mapping[str, Any]
) -> None:
    """What every worker pod takes from its PVC's annotations and from CDIConfig: priority
    class, service account, image pull secrets."""
    if priority := annotations.get(ann.POD_PRIORITY_CLASS_NAME):
        pod_spec["priorityClassName"] = priority
    if account := annotations.get(ann.POD_SERVICE_ACCOUNT_NAME):
        pod_spec["serviceAccountName"] = account
    if pull_secrets := cdi_config_status.get("imagePullSecrets"):
        pod_spec["imagePullSecrets"] = [dict(s) for s in pull_secrets]


def importer_pod(
    pvc: Mapping[str, Any],
    *,
    image: str,
    cdi_config_status: Mapping[str, Any],
    scratch_pvc: str | None,
    owner_uid: str,
    local: bool = False,
    insecure_registries: Iterable[str] = (),
    image_pull_policy: str | None = None,
) -> Obj:
    """The importer Pod for `pvc` (which carries the `storage.import.*` annotations).

    `owner_uid` labels the progress metric (`owner_uid_for(pvc)` gives CDI's choice);
    `scratch_pvc` names a scratch claim to mount at `/scratch`; `insecure_registries` is
    CDIConfig `spec.insecureRegistries`. Raises `RenderError` when the PVC lacks what CDI
    requires (an endpoint for a non-blank source, a storage request).
    """
    metadata = pvc.get("metadata") or {}
    spec = pvc.get("spec") or {}
    pvc_name = str(metadata.get("name", ""))
    namespace = str(metadata.get("namespace", ""))
    annotations: Mapping[str, str] = metadata.get("annotations") or {}
    where = f'pvc "{namespace}/{pvc_name}"'

    source = _source(annotations)
    content = (
        ContentType.ARCHIVE
        if annotations.get(ann.CONTENT_TYPE) == ContentType.ARCHIVE
        else ContentType.KUBEVIRT
    )
    image_size = ((spec.get("resources") or {}).get("requests") or {}).get("storage")
    if image_size is None:
        raise RenderError(f"storage request is missing in {where}")
    block = spec.get("volumeMode") == VolumeMode.BLOCK

    endpoint = secret_name = cert_config_map = proxy_ca = ""
    http_proxy = https_proxy = no_proxy = ""
    extra_headers: list[str] = []
    secret_extra_headers: list[str] = []
    insecure = False
    if source is not SourceType.NONE:
        endpoint = annotations.get(ann.IMPORT_ENDPOINT, "")
        if not endpoint:
            verb = "empty" if ann.IMPORT_ENDPOINT in annotations else "missing"
            raise RenderError(f'annotation "{ann.IMPORT_ENDPOINT}" in {where} is {verb}')
        secret_name = annotations.get(ann.IMPORT_SECRET_NAME, "")
        cert_config_map = annotations.get(ann.IMPORT_CERT_CONFIG_MAP, "")
        insecure = _insecure_tls(source, annotations, insecure_registries)
        extra_headers = _indexed(annotations, ann.IMPORT_EXTRA_HEADERS_PREFIX)
        secret_extra_headers = _indexed(annotations, ann.IMPORT_SECRET_EXTRA_HEADERS_PREFIX)
        proxy = cdi_config_status.get("importProxy") or {}
        http_proxy = str(proxy.get("HTTPProxy") or "")
        https_proxy = str(proxy.get("HTTPSProxy") or "")
        no_proxy = str(proxy.get("noProxy") or "")
        proxy_ca = str(proxy.get("trustedCAProxy") or "")

    preallocation = annotations.get(ann.PREALLOCATION_REQUESTED, "") in _TRUE
    cache_mode = (
        env.CACHE_MODE_TRY_NONE if annotations.get(ann.REQUIRES_DIRECT_IO) == "true" else ""
    )
    container_env = [
        env_var(env.IMPORTER_SOURCE, source.value),
        env_var(env.IMPORTER_ENDPOINT, endpoint),
        env_var(env.IMPORTER_CONTENTTYPE, content.value),
        env_var(env.IMPORTER_IMAGE_SIZE, str(image_size)),
        env_var(env.OWNER_UID, owner_uid),
        env_var(env.FILESYSTEM_OVERHEAD, pvc_overhead(pvc, cdi_config_status)),
        env_var(env.INSECURE_TLS, str(insecure).lower()),
        env_var(env.IMPORTER_DISK_ID, annotations.get(ann.IMPORT_DISK_ID, "")),
        env_var(env.IMPORTER_UUID, annotations.get(ann.IMPORT_UUID, "")),
        env_var(env.IMPORTER_PULL_METHOD, ""),
        env_var(env.IMPORTER_READY_FILE, ""),
        env_var(env.IMPORTER_DONE_FILE, ""),
        env_var(env.IMPORTER_BACKING_FILE, annotations.get(ann.IMPORT_BACKING_FILE, "")),
        env_var(env.IMPORTER_THUMBPRINT, annotations.get(ann.IMPORT_VDDK_THUMBPRINT, "")),
        env_var(env.HTTP_PROXY, http_proxy),
        env_var(env.HTTPS_PROXY, https_proxy),
        env_var(env.NO_PROXY, no_proxy),
        env_var(env.IMPORTER_CURRENT_CHECKPOINT, annotations.get(ann.CHECKPOINT_CURRENT, "")),
        env_var(env.IMPORTER_PREVIOUS_CHECKPOINT, annotations.get(ann.CHECKPOINT_PREVIOUS, "")),
        env_var(env.IMPORTER_FINAL_CHECKPOINT, annotations.get(ann.CHECKPOINT_FINAL, "")),
        env_var(env.PREALLOCATION, str(preallocation).lower()),
        env_var(env.CACHE_MODE, cache_mode),
        env_var(env.IMPORTER_CHECKSUM, annotations.get(ann.IMPORT_CHECKSUM, "")),
    ]
    if secret_name:
        container_env += [
            _secret_env(env.IMPORTER_ACCESS_KEY_ID, secret_name, env.SECRET_KEY_ACCESS_KEY_ID),
            _secret_env(env.IMPORTER_SECRET_KEY, secret_name, env.SECRET_KEY_SECRET_KEY),
        ]
    if cert_config_map:
        container_env.append(env_var(env.IMPORTER_CERT_DIR, env.DEFAULT_CERT_DIR))
    if proxy_ca:
        container_env.append(env_var(env.IMPORTER_PROXY_CERT_DIR, env.DEFAULT_PROXY_CERT_DIR))
    for i, header in enumerate(extra_headers):
        container_env.append(env_var(f"{env.IMPORTER_EXTRA_HEADER_PREFIX}{i}", header))

    volumes: list[Obj] = [{"name": DATA_VOLUME, "persistentVolumeClaim": {"claimName": pvc_name}}]
    mounts: list[Obj] = []
    container: Obj = {
        "name": CONTAINER_NAME,
        "image": image,
        "command": [COMMAND],
        "env": container_env,
        "ports": [
            {"name": METRICS_PORT_NAME, "containerPort": env.METRICS_PORT, "protocol": "TCP"}
        ],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if image_pull_policy:
        container["imagePullPolicy"] = image_pull_policy
    if block:
        container["volumeDevices"] = [{"name": DATA_VOLUME, "devicePath": env.DEFAULT_BLOCK_DEVICE}]
    else:
        mounts.append({"name": DATA_VOLUME, "mountPath": env.DEFAULT_DATA_DIR})
    if scratch_pvc:
        volumes.append(
            {"name": SCRATCH_VOLUME, "persistentVolumeClaim": {"claimName": scratch_pvc}}
        )
        mounts.append({"name": SCRATCH_VOLUME, "mountPath": env.DEFAULT_SCRATCH_DIR})
    if cert_config_map:
        volumes.append({"name": CERT_VOLUME, "configMap": {"name": cert_config_map}})
        mounts.append({"name": CERT_VOLUME, "mountPath": env.DEFAULT_CERT_DIR})
    if proxy_ca:
        volumes.append(
            {
                "name": PROXY_CERT_VOLUME,
                "configMap": {"name": naming.import_proxy_config_map_name(pvc_name)},
            }
        )
        mounts.append({"name": PROXY_CERT_VOLUME, "mountPath": env.DEFAULT_PROXY_CERT_DIR})
    for i, secret in enumerate(secret_extra_headers):
        volume_name = SECRET_EXTRA_HEADERS_VOLUME.format(i)
        volumes.append({"name": volume_name, "secret": {"secretName": secret}})
        mounts.append({"name": volume_name, "mountPath": f"{env.DEFAULT_EXTRA_HEADERS_DIR}/{i}"})
    if mounts:
        container["volumeMounts"] = mounts
    if resources := pod_resources(cdi_config_status):
        container["resources"] = resources
    container["securityContext"] = worker_security_context(local=local)

    pod_spec: Obj = {
        "containers": [container],
        "volumes": volumes,
        "restartPolicy": "OnFailure",
        # Service links would put one variable per Service of the namespace into the worker's
        # environment; the importer needs none of them.
        "enableServiceLinks": False,
    }
    if mounts:
        # The qemu group owns what the worker writes, so the VM launcher (also qemu) can use it.
        pod_spec["securityContext"] = {"fsGroup": env.QEMU_UID}
    apply_pod_options(pod_spec, annotations, cdi_config_status)

    labels = {
        ann.LABEL_APP: ann.LABEL_APP_VALUE,
        ann.LABEL_COMPONENT: ann.LABEL_COMPONENT_IMPORTER,
        ann.LABEL_PROMETHEUS: ann.LABEL_PROMETHEUS_VALUE,
    }
    # The PVC's labels win, as CDI merges them last.
    labels.update({str(k): str(v) for k, v in (metadata.get("labels") or {}).items()})
    pod_annotations = {ann.CREATED_BY_CONTROLLER: ann.CREATED_BY_CONTROLLER_VALUE}
    for key, default in POD_ANNOTATION_ALLOW_LIST.items():
        value = annotations.get(key, default)
        if value:
            pod_annotations[key] = value
    checkpoint = annotations.get(ann.CHECKPOINT_CURRENT) or None
    return {
        "apiVersion": POD.api_version,
        "kind": POD.kind,
        "metadata": {
            # The name the PVC recorded wins: a pod made under an older naming rule is found.
            "name": annotations.get(ann.IMPORT_POD_NAME)
            or naming.importer_pod_name(pvc_name, checkpoint),
            "namespace": namespace,
            "labels": labels,
            "annotations": pod_annotations,
            "ownerReferences": [
                {
                    "apiVersion": PERSISTENT_VOLUME_CLAIM.api_version,
                    "kind": PERSISTENT_VOLUME_CLAIM.kind,
                    "name": pvc_name,
                    "uid": str(metadata.get("uid", "")),
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": pod_spec,
    }
