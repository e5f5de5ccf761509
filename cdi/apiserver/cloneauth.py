"""Who may clone from where, and the clone token: DataVolume admission for clones (reference §7.5,
§6.3, §1.12).

What CDI's `datavolume-mutate` webhook does for a DataVolume that clones (`spec.source.pvc`,
`spec.source.snapshot`, or `spec.sourceRef` naming a DataSource that holds either):

- A source in another namespace needs the requesting user to pass SubjectAccessReviews in the
  *source* namespace: for a PVC, `create datavolumes/source` (group cdi.kubevirt.io, name = the
  PVC) or else `create pods`; for a snapshot, `create datavolumes/source`, or else both
  `create pods` and `create persistentvolumeclaims`. The user is reviewed as the authenticator
  made it (name, uid, groups, extra: a service account with system:serviceaccounts,
  system:serviceaccounts:<ns> and system:authenticated). The same namespace is always allowed.
  A refusal is a 403 with CDI's message, "User <u> has insufficient permissions in clone source
  namespace <ns>", and one cause on the source's namespace field.
- On CREATE an allowed clone gets annotation `cdi.kubevirt.io/storage.clone.token`: a PS256 JWT
  (issuer cdi-apiserver, CDI's 5 minutes) naming the source, with the target in `params`, when
  the server has a signing key. A token the client sent is dropped: tokens are the server's.
- A source namespace (or DataSource) that does not exist is refused as CDI does (400, the
  API's "not found"); DataVolumes marked prePopulated or checkStaticVolume pass without a token
  when the source is missing or the user is refused.
- On UPDATE the source of a clone may not change (CDI's validating webhook refuses any spec
  change, "Cannot update DataVolume Spec"): that is what keeps an authorized clone from being
  re-pointed at a namespace nobody reviewed, so no review is repeated for other updates. Status
  writes are not admitted here: CDI's webhooks are registered for datavolumes, not their status.

Deliberately unlike CDI: the snapshot rule reviews `persistentvolumeclaims` (CDI asks for the
resource "pvcs", which no RBAC rule written for PVCs matches); a refused snapshot source points
at `spec.source.snapshot.namespace` (CDI says `spec.source.PVC.namespace` for every kind); a
DataSource whose source leaves the namespace out means the DataSource's namespace, as the
controller reads it (CDI's webhook would review the target's, letting anyone through).

The logic alone, as `uploadtoken`: the embedded server calls `CloneAdmission` as an admission
hook with the request (user, objects, a SubjectAccessReview function, reads) and turns a
refusal into its Status. Nothing here imports the embedded server.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, NotRequired, Protocol, TypedDict

from cdi.api import annotations as ann
from cdi.api import groups, jwt
from cdi.api.tokens import (
    CLAIM_NAME,
    CLAIM_NAMESPACE,
    CLAIM_OPERATION,
    CLAIM_PARAMS,
    CLAIM_RESOURCE,
    CLONE_TOKEN_LIFETIME_SECONDS,
    ISSUER_APISERVER,
    OPERATION_CLONE,
)

log = logging.getLogger(__name__)

Obj = dict[str, Any]

MUTATING_WEBHOOK: Final = "datavolume-mutate.cdi.kubevirt.io"
"""The webhook CDI authorizes clones in; kube-apiserver quotes its name in a refusal."""
VALIDATING_WEBHOOK: Final = "datavolume-validate.cdi.kubevirt.io"
"""The webhook that refuses spec changes."""
SOURCE_SUBRESOURCE: Final = "source"
PVC_FIELD: Final = "spec.source.PVC.namespace"  # sic: CDI's field path, Go's field name
SNAPSHOT_FIELD: Final = "spec.source.snapshot.namespace"
SOURCE_REF_FIELD: Final = "spec.sourceRef"
SPEC_FIELD: Final = "DataVolume.Spec"  # sic: CDI's field path for "Cannot update DataVolume Spec"
SNAPSHOT_RESOURCE: Final = {
    "group": groups.VOLUME_SNAPSHOT.group,
    "version": groups.VOLUME_SNAPSHOT.version,
    "resource": groups.VOLUME_SNAPSHOT.plural,
}
_NAMESPACES: Final = groups.NAMESPACE.plural  # store keys: the plural, `.group` if any
_DATA_SOURCES: Final = f"{groups.DATA_SOURCE.plural}.{groups.DATA_SOURCE.group}"


# --- what the host passes and gets back ----------------------------------------------------


class User(Protocol):
    """The requesting user as the authenticator made it (`cdi.kubeapi.auth.UserInfo`)."""

    @property
    def name(self) -> str: ...
    @property
    def groups(self) -> tuple[str, ...]: ...
    @property
    def uid(self) -> str: ...
    @property
    def extra(self) -> Mapping[str, tuple[str, ...]]: ...


class ResourceName(Protocol):
    @property
    def group(self) -> str: ...
    @property
    def plural(self) -> str: ...


class Request(Protocol):
    """What the hook reads of `cdi.kubeapi.app.AdmissionRequest`."""

    @property
    def resource(self) -> ResourceName: ...
    @property
    def operation(self) -> str: ...
    @property
    def subresource(self) -> str: ...
    @property
    def namespace(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def obj(self) -> Obj: ...
    @property
    def old(self) -> Obj | None: ...
    @property
    def user(self) -> User: ...
    @property
    def review(self) -> Callable[[Mapping[str, Any]], Mapping[str, Any]]: ...
    @property
    def get(self) -> Callable[[str, str, str], Obj | None]: ...


class Cause(TypedDict):
    """A `Status.details.causes` entry (the JSON name of the type is `reason`)."""

    reason: str
    message: str
    field: NotRequired[str]


@dataclass(frozen=True, slots=True)
class Verdict:
    """The hook's answer, shaped as a webhook's AdmissionResponse."""

    allowed: bool
    patched: Obj | None = None
    webhook: str = ""
    code: int = 0
    reason: str = ""
    message: str = ""
    causes: tuple[Cause, ...] = ()


ALLOWED: Final = Verdict(allowed=True)


def _refused(
    webhook: str, code: int, reason: str, message: str, causes: tuple[Cause, ...] = ()
) -> Verdict:
    return Verdict(
        allowed=False, webhook=webhook, code=code, reason=reason, message=message, causes=causes
    )


# --- the source ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CloneSource:
    kind: Literal["pvc", "snapshot"]
    namespace: str
    name: str
    field: str
    """Where a refusal points."""

    @property
    def token_resource(self) -> dict[str, str]:
        return dict(jwt.PVC_RESOURCE) if self.kind == "pvc" else dict(SNAPSHOT_RESOURCE)


class SourceNotFound(LookupError):
    """A DataSource the DataVolume names is not there; the message is the API's."""


def _named(
    source: Any, default_namespace: str, field: str, kind: Literal["pvc", "snapshot"]
) -> CloneSource | None:
    if not isinstance(source, Mapping):
        return None
    namespace = str(source.get("namespace") or "") or default_namespace
    return CloneSource(kind, namespace, str(source.get("name") or ""), field)


def clone_source(
    dv: Mapping[str, Any], namespace: str, get: Callable[[str, str, str], Obj | None]
) -> CloneSource | None:
    """The PVC or snapshot DataVolume `dv` (in `namespace`) clones from; None if it clones
    nothing. `SourceNotFound` when it names a DataSource that does not exist."""
    spec = dv.get("spec") or {}
    source = spec.get("source") or {}
    if isinstance(source, Mapping):
        if source.get("pvc") is not None:
            return _named(source["pvc"], namespace, PVC_FIELD, "pvc")
        if source.get("snapshot") is not None:
            return _named(source["snapshot"], namespace, SNAPSHOT_FIELD, "snapshot")
    ref = spec.get("sourceRef")
    if not isinstance(ref, Mapping) or ref.get("kind") != groups.DATA_SOURCE.kind:
        return None
    ref_namespace = str(ref.get("namespace") or "") or namespace
    name = str(ref.get("name") or "")
    data_source = get(_DATA_SOURCES, ref_namespace, name)
    if data_source is None:
        raise SourceNotFound(f'{_DATA_SOURCES} "{name}" not found')
    held = (data_source.get("spec") or {}).get("source") or {}
    if not isinstance(held, Mapping):
        return None
    # A source without a namespace is in the DataSource's, as the controller resolves it.
    if held.get("pvc") is not None:
        return _named(held["pvc"], ref_namespace, SOURCE_REF_FIELD, "pvc")
    if held.get("snapshot") is not None:
        return _named(held["snapshot"], ref_namespace, SOURCE_REF_FIELD, "snapshot")
    return None


# --- authorization -------------------------------------------------------------------------


def _attributes(namespace: str, name: str, resource: str, *, explicit: bool = False) -> Obj:
    attrs: Obj = {"namespace": namespace, "verb": "create", "resource": resource, "name": name}
    if explicit:
        attrs["group"] = groups.CDI_GROUP
        attrs["subresource"] = SOURCE_SUBRESOURCE
    return attrs


def _allowed(
    review: Callable[[Mapping[str, Any]], Mapping[str, Any]], user: User, attrs: Obj
) -> bool:
    spec: Obj = {"user": user.name, "groups": list(user.groups), "resourceAttributes": attrs}
    if user.uid:
        spec["uid"] = user.uid
    if user.extra:
        spec["extra"] = {key: list(values) for key, values in user.extra.items()}
    return bool(review(spec).get("allowed"))


def insufficient(user: str, namespace: str) -> str:
    """CDI's words for a refused clone."""
    return f"User {user} has insufficient permissions in clone source namespace {namespace}"


def review_clone(
    source: CloneSource,
    target_namespace: str,
    user: User,
    review: Callable[[Mapping[str, Any]], Mapping[str, Any]],
) -> str:
    """Why `user` may not clone `source` into `target_namespace` (CDI's text); empty if it may."""
    if source.namespace == target_namespace:
        return ""
    ns, name = source.namespace, source.name
    explicit = _attributes(ns, name, groups.DATA_VOLUME.plural, explicit=True)
    pods = _attributes(ns, name, groups.POD.plural)
    if _allowed(review, user, explicit):
        return ""
    if source.kind == "pvc":
        if _allowed(review, user, pods):
            return ""
    else:
        claims = _attributes(ns, name, groups.PERSISTENT_VOLUME_CLAIM.plural)
        if _allowed(review, user, pods) and _allowed(review, user, claims):
            return ""
    return insufficient(user.name, ns)


# --- the token -----------------------------------------------------------------------------


def clone_token_claims(
    source: CloneSource,
    target_namespace: str,
    target_name: str,
    *,
    now: float,
    lifetime: int = CLONE_TOKEN_LIFETIME_SECONDS,
) -> Obj:
    """CDI's clone token claims (token.Payload): the source, and the target in `params`."""
    issued = int(now)
    return {
        "iss": ISSUER_APISERVER,
        "iat": issued,
        "nbf": issued,
        "exp": issued + lifetime,
        CLAIM_OPERATION: OPERATION_CLONE,
        CLAIM_NAME: source.name,
        CLAIM_NAMESPACE: source.namespace,
        CLAIM_RESOURCE: source.token_resource,
        CLAIM_PARAMS: {"targetNamespace": target_namespace, "targetName": target_name},
    }


# --- the hook ------------------------------------------------------------------------------


def _source_of(dv: Mapping[str, Any] | None) -> tuple[Any, Any]:
    spec = (dv or {}).get("spec") or {}
    return spec.get("source"), spec.get("sourceRef")


def _clones(source: Any, source_ref: Any) -> bool:
    cloning = isinstance(source, Mapping) and any(
        source.get(kind) is not None for kind in ("pvc", "snapshot")
    )
    return cloning or source_ref is not None


class CloneAdmission:
    """The admission hook: `CloneAdmission(signing_key)(request)` -> `Verdict`.

    `signing_key`: the private PEM that signs upload tokens; None: clones get no token.
    `clock`: seconds since the epoch, for the token's times."""

    def __init__(
        self,
        signing_key: bytes | None,
        *,
        lifetime: int = CLONE_TOKEN_LIFETIME_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.signing_key = signing_key
        self.lifetime = lifetime
        self.clock = clock

    def __call__(self, request: Request) -> Verdict:
        rt = request.resource
        if (rt.group, rt.plural) != (groups.CDI_GROUP, groups.DATA_VOLUME.plural):
            return ALLOWED
        if request.subresource or (request.obj.get("metadata") or {}).get("deletionTimestamp"):
            return ALLOWED
        if request.operation == "UPDATE":
            return self._update(request)
        if request.operation == "CREATE":
            return self._create(request)
        return ALLOWED

    def _update(self, request: Request) -> Verdict:
        before, after = _source_of(request.old), _source_of(request.obj)
        if before != after and (_clones(*before) or _clones(*after)):
            cause: Cause = {
                "reason": "FieldValueDuplicate",
                "message": "Cannot update DataVolume Spec",
                "field": SPEC_FIELD,
            }
            return _refused(
                VALIDATING_WEBHOOK, 422, "Invalid", "Cannot update DataVolume Spec", (cause,)
            )
        return ALLOWED

    def _create(self, request: Request) -> Verdict:
        dv = request.obj
        target_ns, target_name = request.namespace, request.name
        meta = dv.setdefault("metadata", {})
        notes = meta.get("annotations") or {}
        # Statically provisioned or pre-populated volumes need no token (CDI's ErrNoTokenOkay).
        no_token_okay = ann.PRE_POPULATED in notes or (ann.CHECK_STATIC_VOLUME in notes)
        try:
            source = clone_source(dv, target_ns, request.get)
        except SourceNotFound as err:
            if no_token_okay:
                return ALLOWED
            return _refused(MUTATING_WEBHOOK, 400, "BadRequest", str(err))
        if source is None:
            return ALLOWED
        if isinstance(notes, dict) and ann.CLONE_TOKEN in notes:
            # A token is the server's to give: one the client wrote is never kept.
            notes.pop(ann.CLONE_TOKEN)
            if not notes:
                meta.pop("annotations", None)
        if request.get(_NAMESPACES, "", source.namespace) is None:
            if no_token_okay:
                return Verdict(allowed=True, patched=dv)
            return _refused(
                MUTATING_WEBHOOK,
                400,
                "BadRequest",
                f'{_NAMESPACES} "{source.namespace}" not found',
            )
        why = review_clone(source, target_ns, request.user, request.review)
        if why:
            if no_token_okay:
                return Verdict(allowed=True, patched=dv)
            log.info(
                "clone refused user=%s source=%s/%s target=%s/%s",
                request.user.name,
                source.namespace,
                source.name,
                target_ns,
                target_name or "-",
            )
            cause: Cause = {"reason": "FieldValueInvalid", "message": why, "field": source.field}
            return _refused(MUTATING_WEBHOOK, 403, "Forbidden", why, (cause,))
        if self.signing_key is not None:
            claims = clone_token_claims(
                source, target_ns, target_name, now=self.clock(), lifetime=self.lifetime
            )
            meta.setdefault("annotations", {})[ann.CLONE_TOKEN] = jwt.sign(self.signing_key, claims)
        return Verdict(allowed=True, patched=dv)


__all__ = [
    "MUTATING_WEBHOOK",
    "VALIDATING_WEBHOOK",
    "CloneAdmission",
    "CloneSource",
    "SourceNotFound",
    "Verdict",
    "clone_source",
    "clone_token_claims",
    "insufficient",
    "review_clone",
]
