"""UploadTokenRequest: `spec.pvcName` in, `status.token` out (reference §1.10, §6.3).

`POST /apis/upload.cdi.kubevirt.io/v1beta1/namespaces/{ns}/uploadtokenrequests` answers the
object it was sent with `status.token`: a PS256 JWT from issuer `cdi-apiserver`, valid for five
minutes, that lets the upload proxy stream into PVC `{ns}/{spec.pvcName}`. Nothing is stored
(as with SubjectAccessReview); the resource is create-only.

Authorization is the host's and is CDI's rule exactly: the caller may `create`
`uploadtokenrequests` (API group `upload.cdi.kubevirt.io`) in the namespace, and nothing more
(in particular no check that the PVC exists or that the caller may write it). Beyond CDI, which
signs a token for an empty name, a request without `spec.pvcName` is refused with a field error.

This module is the logic alone (validate, sign, shape the answer); the host turns
`InvalidUploadTokenRequest` into its 422 `Invalid` and decides who may call.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cdi.api import groups, jwt
from cdi.api.tokens import UPLOAD_TOKEN_LIFETIME_SECONDS

log = logging.getLogger(__name__)

RESOURCE = groups.UPLOAD_TOKEN_REQUEST


@dataclass(frozen=True, slots=True)
class FieldError:
    """One problem with the request, worded as Kubernetes' field errors are."""

    field: str
    reason: str  # FieldValueRequired, FieldValueInvalid, ...
    message: str  # "Required value: ...", as `kubectl` prints it after the field


class InvalidUploadTokenRequest(ValueError):
    def __init__(self, errors: Sequence[FieldError]) -> None:
        super().__init__("; ".join(f"{e.field}: {e.message}" for e in errors))
        self.errors = tuple(errors)


def pvc_name(obj: Mapping[str, Any]) -> str:
    """The PVC the request names; `InvalidUploadTokenRequest` when it names none."""
    spec = obj.get("spec")
    if spec is None:
        spec = {}
    if not isinstance(spec, Mapping):
        raise InvalidUploadTokenRequest(
            [FieldError("spec", "FieldValueInvalid", "Invalid value: must be an object")]
        )
    name = spec.get("pvcName")
    if name is None or name == "":
        raise InvalidUploadTokenRequest(
            [
                FieldError(
                    "spec.pvcName",
                    "FieldValueRequired",
                    "Required value: the name of the PersistentVolumeClaim to upload to",
                )
            ]
        )
    if not isinstance(name, str):
        raise InvalidUploadTokenRequest(
            [FieldError("spec.pvcName", "FieldValueInvalid", "Invalid value: must be a string")]
        )
    return name


def issue(
    obj: Mapping[str, Any],
    namespace: str,
    private_pem: bytes,
    *,
    user: str = "",
    now: float | None = None,
    lifetime: int = UPLOAD_TOKEN_LIFETIME_SECONDS,
) -> dict[str, Any]:
    """The answer to UploadTokenRequest `obj` sent to `namespace`: the object as sent, with
    apiVersion, kind, `metadata.namespace` and `status.token` (valid `lifetime` s) set."""
    name = pvc_name(obj)
    moment = time.time() if now is None else now
    claims = jwt.upload_token_claims(name, namespace, now=moment, lifetime=lifetime)
    token = jwt.sign(private_pem, claims)
    answer = copy.deepcopy(dict(obj))
    answer["apiVersion"] = RESOURCE.api_version
    answer["kind"] = RESOURCE.kind
    metadata = answer.get("metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    answer["metadata"] = {**metadata, "namespace": namespace}
    answer["status"] = {"token": token}
    log.info("upload token issued pvc=%s/%s user=%s", namespace, name, user or "-")
    return answer


__all__ = ["RESOURCE", "FieldError", "InvalidUploadTokenRequest", "issue", "pvc_name"]
