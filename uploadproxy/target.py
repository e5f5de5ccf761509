"""Where an authorized upload goes: the PVC's readiness, the path, the upload server's address.

`wait_until_ready` polls the PVC the token names (reference §6.5, CDI's `uploadReady`) until it
exists, is an upload target (ann `storage.upload.target`), has not finished (ann
`storage.pod.phase` ≠ Succeeded) and its upload server is ready (ann `storage.pod.ready`, read
as Go's `strconv.ParseBool`), for at most `ready_wait` seconds, looking every `ready_poll`.
A PVC filled by the upload populator (`spec.dataSourceRef` a VolumeUploadSource) is followed
to its PVC' (ann `storage.populator.pvcPrime`), which is what the upload server fills.
A PVC that already finished is refused at once; the other states may still change, so they are
waited out and the last one seen is the 503's text. (CDI also refuses a missing PVC or one
that is not an upload target at once; waiting covers a client that asks right after creating
it, and costs a refused client at most `ready_wait`.)

`upload_path` picks the server path by the PVC's content type (`archive` → `upload-archive`)
and `upstream_endpoint` the address: `https://<svc>.<ns>.svc:<port>` (CDI's
`GetUploadServerURL`) or, in pod-ip mode, the upload pod's IP with TLS still checking that name.
The texts of refusals are CDI's, HTML-escaped as CDI escapes them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from cdi.api import ContentType, PodPhase
from cdi.api import annotations as ann
from cdi.api.groups import CDI_GROUP, PERSISTENT_VOLUME_CLAIM, POD, VOLUME_UPLOAD_SOURCE
from cdi.kube.client import Client
from cdi.kube.errors import ApiError, NotFound
from uploadproxy import naming
from uploadproxy.auth import UploadClaim
from uploadproxy.errors import Rejection, go_html_escape
from uploadproxy.settings import ProxySettings, ResolveMode

log = logging.getLogger(__name__)

VERSIONS: Final = ("v1beta1", "v1alpha1")
#: The paths the proxy serves (CDI's `common.ProxyPaths`); `upload-archive` is server-only.
UPLOAD_PATHS: Final = tuple(
    f"/{version}/{endpoint}"
    for version in VERSIONS
    for endpoint in ("upload", "upload-async", "upload-form", "upload-form-async")
)
ARCHIVE_PATH: Final = "/v1beta1/upload-archive"
ARCHIVE_ALPHA_PATH: Final = "/v1alpha1/upload-archive"

# Go's strconv.ParseBool, which CDI applies to `storage.pod.ready`.
_TRUE: Final = frozenset({"1", "t", "T", "TRUE", "true", "True"})

Obj = dict[str, Any]


def _annotations(obj: Mapping[str, Any]) -> Mapping[str, str]:
    return (obj.get("metadata") or {}).get("annotations") or {}


def _name(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name", ""))


def _namespace(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("namespace", ""))


def is_upload_populated(pvc: Mapping[str, Any]) -> bool:
    """Whether the upload populator fills `pvc` (through a PVC'), as CDI's
    `IsPVCDataSourceRefKind(pvc, VolumeUploadSource)`."""
    ref = (pvc.get("spec") or {}).get("dataSourceRef") or {}
    return ref.get("apiGroup") == CDI_GROUP and ref.get("kind") == VOLUME_UPLOAD_SOURCE.kind


def _api_failure(err: ApiError) -> Rejection:
    return Rejection(503, go_html_escape(str(err)))


async def _look(client: Client, claim: UploadClaim) -> tuple[Obj | None, str]:
    """The PVC to upload into when it is ready, else None and why not yet; `Rejection` for
    what waiting cannot change."""
    name = claim.name
    try:
        pvc = await client.get(PERSISTENT_VOLUME_CLAIM, name, claim.namespace)
    except NotFound:
        return None, f"rejecting Upload Request for PVC {name} that doesn't exist"
    except ApiError as err:
        raise _api_failure(err) from None
    if is_upload_populated(pvc):
        prime = _annotations(pvc).get(ann.PVC_PRIME)
        if not prime:
            return None, f"PVC {name} has no PVC' yet"
        try:
            pvc = await client.get(PERSISTENT_VOLUME_CLAIM, prime, claim.namespace)
        except NotFound:
            return None, f"rejecting Upload Request for PVC {name}, PVC' wasn't created yet"
        except ApiError as err:
            raise _api_failure(err) from None
    annotations = _annotations(pvc)
    if ann.UPLOAD_TARGET not in annotations:
        return None, f"PVC {_name(pvc)} is not an upload target"
    if annotations.get(ann.POD_PHASE) == PodPhase.SUCCEEDED:
        raise Rejection(
            503,
            go_html_escape(
                f"rejecting Upload Request for PVC {name} that already finished uploading"
            ),
        )
    if annotations.get(ann.POD_READY, "") in _TRUE:
        return pvc, ""
    return None, ""


async def wait_until_ready(client: Client, claim: UploadClaim, settings: ProxySettings) -> Obj:
    """The PVC (or PVC') whose upload server will take the upload, once ready; else a 503."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.ready_wait
    while True:
        pvc, pending = await _look(client, claim)
        if pvc is not None:
            return pvc
        remaining = deadline - loop.time()
        if remaining <= 0:
            text = pending or (
                f"timed out after {settings.ready_wait:g}s waiting for the upload server of "
                f"PVC {claim.name} to be ready"
            )
            raise Rejection(503, go_html_escape(text))
        await asyncio.sleep(min(settings.ready_poll, remaining))


def upload_path(pvc: Mapping[str, Any], claim: UploadClaim, request_path: str) -> str:
    """The upload server's path for `request_path` (CDI's `resolveUploadPath`)."""
    content_type = _annotations(pvc).get(ann.CONTENT_TYPE, "")
    if content_type in ("", ContentType.KUBEVIRT):
        return request_path
    if content_type == ContentType.ARCHIVE:
        return ARCHIVE_ALPHA_PATH if "alpha" in request_path else ARCHIVE_PATH
    raise Rejection(
        503,
        go_html_escape(
            f"rejecting upload request for PVC {claim.name} - upload content-type "
            f"{content_type} is invalid"
        ),
    )


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where to send one upload: the URL to connect to and the name TLS checks."""

    url: str
    server_hostname: str
    pod_name: str

    @property
    def host_header(self) -> str:
        return self.server_hostname


async def upstream_endpoint(
    client: Client, settings: ProxySettings, pvc: Mapping[str, Any], path: str, query: str
) -> Endpoint:
    """The upload server of `pvc` (the pod named in ann `storage.uploadPodName`, else by CDI's
    rule) at `path?query`."""
    namespace = _namespace(pvc)
    pod_name = _annotations(pvc).get(ann.UPLOAD_POD_NAME) or naming.upload_pod_name(_name(pvc))
    tls_name = f"{naming.service_name(pod_name)}.{namespace}.svc"
    host = tls_name
    if settings.resolve is ResolveMode.POD_IP:
        try:
            pod = await client.get(POD, pod_name, namespace)
        except NotFound:
            raise Rejection(
                503, go_html_escape(f"error in upload-proxy: upload pod {pod_name} not found")
            ) from None
        except ApiError as err:
            raise Rejection(503, go_html_escape(f"error in upload-proxy: {err}")) from None
        ip = str((pod.get("status") or {}).get("podIP") or "")
        if not ip:
            raise Rejection(
                503, go_html_escape(f"error in upload-proxy: upload pod {pod_name} has no IP yet")
            )
        host = f"[{ip}]" if ":" in ip else ip
    url = f"https://{host}:{settings.upstream_port}{path}"
    if query:
        url += f"?{query}"
    return Endpoint(url, tls_name, pod_name)
