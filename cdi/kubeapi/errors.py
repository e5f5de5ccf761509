"""The embedded API server's error tree: one class per Kubernetes `Status` reason.

    ApiError(code, reason, message, details)  base; `.to_status()` is the wire `Status`
    ├── BadRequest             400 BadRequest            malformed input: fix the request
    ├── Unauthorized           401 Unauthorized          no or bad credentials
    ├── Forbidden              403 Forbidden             RBAC said no
    ├── NotFound               404 NotFound              no such object
    ├── MethodNotAllowed       405 MethodNotAllowed      verb not served for this resource
    ├── AlreadyExists          409 AlreadyExists         create of a name that is taken
    ├── Conflict               409 Conflict              stale resourceVersion, failed
    │                                                    precondition: re-read and retry
    ├── Gone                   410 Expired               watch/continue too old: list again
    ├── RequestEntityTooLarge  413 RequestEntityTooLarge body or patch too big
    ├── UnsupportedMediaType   415 UnsupportedMediaType  e.g. strategic merge on a CR
    ├── Invalid                422 Invalid               field errors (`causes`)
    └── InternalError          500 InternalError         our bug, never the caller's fault

The store, selectors, patch code and admission raise these; the HTTP layer (`cdi.kubeapi.app`)
turns them into a response exactly once, with `to_status()` as the body and `code` as the status.
Messages use kube-apiserver's wording (`configmaps "x" not found`, `Operation cannot be fulfilled
on ...`) because clients and people match on them. This module does no I/O and knows no HTTP.

Resources are named by their *resource key*, the GroupResource string Kubernetes prints in its
messages: the plural alone for the core group (`persistentvolumeclaims`), `plural.group` otherwise
(`datavolumes.cdi.kubevirt.io`). `resource_key()` and `split_resource_key()` convert.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any, NotRequired, TypedDict


class StatusCause(TypedDict):
    """One field error in `Status.details.causes` (the JSON name of the type is `reason`)."""

    reason: str
    message: str
    field: NotRequired[str]


class StatusDetails(TypedDict, total=False):
    name: str
    group: str
    kind: str
    uid: str
    causes: list[StatusCause]
    retryAfterSeconds: int


def resource_key(group: str, plural: str) -> str:
    """The store's and the messages' name for a resource: `pods`, `datavolumes.cdi.kubevirt.io`."""
    return f"{plural}.{group}" if group else plural


def split_resource_key(key: str) -> tuple[str, str]:
    """`(group, plural)` of a resource key; the core group is ""."""
    plural, _, group = key.partition(".")
    return group, plural


class ApiError(Exception):
    """Base of the tree: an HTTP code, a Kubernetes reason, a one-line message, optional details."""

    code: int = 500
    reason: str = "InternalError"

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        details: StatusDetails | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def __str__(self) -> str:
        return self.message

    def to_status(self) -> dict[str, Any]:
        """The `Status` object kube-apiserver sends for this error."""
        status: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
        }
        if self.details:
            status["details"] = dict(self.details)
        status["code"] = self.code
        return status


class _FixedError(ApiError):
    """An error whose code and reason are fixed by its class; subclasses only vary the text."""

    def __init__(self, message: str, *, details: StatusDetails | None = None) -> None:
        super().__init__(type(self).code, type(self).reason, message, details)


def _details(resource: str, name: str) -> StatusDetails:
    group, plural = split_resource_key(resource)
    details: StatusDetails = {"kind": plural}
    if name:
        details["name"] = name
    if group:
        details["group"] = group
    return details


class BadRequest(_FixedError):
    code = 400
    reason = "BadRequest"


class Unauthorized(_FixedError):
    code = 401
    reason = "Unauthorized"

    def __init__(self, message: str = "Unauthorized", *, details: StatusDetails | None = None):
        super().__init__(message, details=details)


class Forbidden(_FixedError):
    code = 403
    reason = "Forbidden"

    @classmethod
    def of(cls, resource: str, name: str, why: str) -> Forbidden:
        """`pods "x" is forbidden: User "bob" cannot get resource ...` (name may be empty)."""
        what = f'{resource} "{name}"' if name else resource
        return cls(f"{what} is forbidden: {why}", details=_details(resource, name))


class NotFound(_FixedError):
    code = 404
    reason = "NotFound"

    @classmethod
    def of(cls, resource: str, name: str) -> NotFound:
        return cls(f'{resource} "{name}" not found', details=_details(resource, name))


class MethodNotAllowed(_FixedError):
    code = 405
    reason = "MethodNotAllowed"

    @classmethod
    def of(cls, resource: str, action: str) -> MethodNotAllowed:
        """`create is not supported on resources of kind "pods/log"`, as the server says it."""
        return cls(
            f'{action} is not supported on resources of kind "{resource}"',
            details=_details(resource, ""),
        )


class AlreadyExists(_FixedError):
    code = 409
    reason = "AlreadyExists"

    @classmethod
    def of(cls, resource: str, name: str) -> AlreadyExists:
        return cls(f'{resource} "{name}" already exists', details=_details(resource, name))


class Conflict(_FixedError):
    code = 409
    reason = "Conflict"

    @classmethod
    def of(cls, resource: str, name: str, why: str) -> Conflict:
        return cls(
            f'Operation cannot be fulfilled on {resource} "{name}": {why}',
            details=_details(resource, name),
        )

    @classmethod
    def modified(cls, resource: str, name: str) -> Conflict:
        """The stale-resourceVersion conflict every controller retries on."""
        return cls.of(
            resource,
            name,
            "the object has been modified; please apply your changes to the latest version "
            "and try again",
        )


class Gone(_FixedError):
    """The requested history is compacted away; the client must list again (reason Expired)."""

    code = 410
    reason = "Expired"

    @classmethod
    def too_old(cls, requested: int, oldest: int) -> Gone:
        return cls(f"too old resource version: {requested} ({oldest})")

    @classmethod
    def continue_expired(cls) -> Gone:
        return cls(
            "The provided continue parameter is too old to display a consistent list result. "
            "You can start a new list without the continue parameter."
        )


class RequestEntityTooLarge(_FixedError):
    code = 413
    reason = "RequestEntityTooLarge"


class UnsupportedMediaType(_FixedError):
    code = 415
    reason = "UnsupportedMediaType"

    @classmethod
    def of(cls, accepted: Iterable[str]) -> UnsupportedMediaType:
        return cls(
            "the body of the request was in an unknown format - accepted media types include: "
            + ", ".join(accepted)
        )


class Invalid(_FixedError):
    """Field errors. `causes` carries one `StatusCause` per problem, as `kubectl` prints them."""

    code = 422
    reason = "Invalid"

    def __init__(self, message: str, *, details: StatusDetails | None = None) -> None:
        super().__init__(message, details=details)
        self.causes: list[StatusCause] = list((details or {}).get("causes", []))

    @classmethod
    def of(cls, kind: str, name: str, causes: Sequence[StatusCause], *, group: str = "") -> Invalid:
        """`DataVolume.cdi.kubevirt.io "x" is invalid: spec.source: Required value`."""
        qualified = f"{kind}.{group}" if group else kind
        rendered = [_render_cause(c) for c in causes]
        text = rendered[0] if len(rendered) == 1 else "[" + ", ".join(rendered) + "]"
        details: StatusDetails = {"kind": kind, "causes": list(causes)}
        if name:
            details["name"] = name
        if group:
            details["group"] = group
        return cls(f'{qualified} "{name}" is invalid: {text}', details=details)


class InternalError(_FixedError):
    code = 500
    reason = "InternalError"


# Field errors, worded as k8s.io/apimachinery's field.Error renders them, so that `kubectl`
# output and people's searches match what a real cluster says.


def _render_cause(cause: StatusCause) -> str:
    field = cause.get("field")
    return f"{field}: {cause['message']}" if field else cause["message"]


def _value(value: Any) -> str:
    # Go prints strings quoted and numbers bare; JSON gives the same for the values we meet.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _cause(reason: str, field: str, message: str) -> StatusCause:
    return {"reason": reason, "message": message, "field": field}


def field_required(field: str, detail: str = "") -> StatusCause:
    return _cause("FieldValueRequired", field, "Required value" + (f": {detail}" if detail else ""))


def field_invalid(field: str, value: Any, detail: str = "") -> StatusCause:
    message = f"Invalid value: {_value(value)}" + (f": {detail}" if detail else "")
    return _cause("FieldValueInvalid", field, message)


def field_forbidden(field: str, detail: str = "") -> StatusCause:
    return _cause("FieldValueForbidden", field, "Forbidden" + (f": {detail}" if detail else ""))


def field_not_supported(field: str, value: Any, supported: Iterable[str]) -> StatusCause:
    listed = ", ".join(_value(s) for s in supported)
    message = f"Unsupported value: {_value(value)}" + (
        f": supported values: {listed}" if listed else ""
    )
    return _cause("FieldValueNotSupported", field, message)


def field_duplicate(field: str, value: Any) -> StatusCause:
    return _cause("FieldValueDuplicate", field, f"Duplicate value: {_value(value)}")


def field_too_long(field: str, max_length: int) -> StatusCause:
    return _cause("FieldValueTooLong", field, f"Too long: may not be more than {max_length} bytes")


def field_type_invalid(field: str, value: Any, detail: str) -> StatusCause:
    return _cause("FieldValueTypeInvalid", field, f"Invalid value: {_value(value)}: {detail}")


def field_immutable(field: str, value: Any) -> StatusCause:
    return field_invalid(field, value, "field is immutable")
