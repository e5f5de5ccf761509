"""What the embedded API server serves: built-in kinds and every CRD it holds, by group/version.

A `ResourceType` knows its URL names, scope, subresources, verbs, how `kubectl get` prints it
(Table columns) and, for custom resources, the schema that validates it. The registry is
rebuilt from stored CRDs whenever one changes, so CRDs created at run time are served at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cdi.api import groups
from cdi.kubeapi.crds import (
    AGE_COLUMN,
    CRD_VERBS,
    CRDResourceInfo,
    PrinterColumn,
    crd_resource_info,
    human_duration,
    sort_versions,
)
from cdi.kubeapi.errors import resource_key

Obj = dict[str, Any]
ALL_VERBS = CRD_VERBS


@dataclass(frozen=True, slots=True)
class Column:
    """A Table column of a built-in kind: its definition and how to compute a cell."""

    name: str
    type: str
    cell: Callable[[Obj], Any]
    priority: int = 0
    description: str = ""


@dataclass(frozen=True, slots=True)
class ResourceType:
    group: str
    version: str
    kind: str
    plural: str
    namespaced: bool
    singular: str = ""
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    verbs: tuple[str, ...] = ALL_VERBS
    subresources: tuple[str, ...] = ("status",)
    columns: tuple[Column, ...] = ()
    crd_columns: tuple[PrinterColumn, ...] | None = None
    schema: Mapping[str, Any] | None = None
    custom: bool = False
    deprecation_warning: str | None = None
    storage_version: str = ""  # custom resources: the version objects are stored as

    @property
    def key(self) -> str:
        """The store key, which is also how Kubernetes names the resource in messages."""
        return resource_key(self.group, self.plural)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def status_subresource(self) -> bool:
        return "status" in self.subresources

    def discovery(self) -> list[Obj]:
        main: Obj = {
            "name": self.plural,
            "singularName": self.singular or self.kind.lower(),
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": list(self.verbs),
        }
        if self.short_names:
            main["shortNames"] = list(self.short_names)
        if self.categories:
            main["categories"] = list(self.categories)
        out = [main]
        for sub in self.subresources:
            verbs = (
                ["get"]
                if sub == "log"
                else ["create"]
                if sub == "eviction"
                else ["get", "patch", "update"]
            )
            kind = "Pod" if sub == "log" else self.kind
            out.append(
                {
                    "name": f"{self.plural}/{sub}",
                    "singularName": "",
                    "namespaced": self.namespaced,
                    "kind": kind,
                    "verbs": verbs,
                }
            )
        return out

    def matches(self, name: str) -> bool:
        lowered = name.lower()
        return lowered in (
            self.plural,
            self.singular or self.kind.lower(),
            self.kind.lower(),
            *self.short_names,
        )


# --- Table cells of built-in kinds -------------------------------------------------------------


def _path(obj: Obj, *keys: str | int) -> Any:
    cur: Any = obj
    for key in keys:
        if isinstance(key, int):
            cur = cur[key] if isinstance(cur, list) and len(cur) > key else None
        else:
            cur = cur.get(key) if isinstance(cur, dict) else None
        if cur is None:
            return None
    return cur


def age(obj: Obj) -> str:
    stamp = _path(obj, "metadata", "creationTimestamp")
    if not isinstance(stamp, str):
        return "<unknown>"
    try:
        when = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return "<invalid>"
    return human_duration((datetime.now(UTC) - when).total_seconds())


def _pod_ready(obj: Obj) -> str:
    statuses = _path(obj, "status", "containerStatuses") or []
    containers = _path(obj, "spec", "containers") or []
    ready = sum(1 for s in statuses if isinstance(s, dict) and s.get("ready"))
    return f"{ready}/{len(containers)}"


def _pod_status(obj: Obj) -> str:
    if _path(obj, "metadata", "deletionTimestamp"):
        return "Terminating"
    for status in _path(obj, "status", "containerStatuses") or []:
        state = status.get("state") or {}
        waiting = state.get("waiting") or {}
        if waiting.get("reason"):
            return str(waiting["reason"])
        terminated = state.get("terminated") or {}
        if terminated.get("reason"):  # kubectl shows Completed, Error, OOMKilled over the phase
            return str(terminated["reason"])
    return str(_path(obj, "status", "phase") or "Pending")


def _pod_restarts(obj: Obj) -> int:
    return sum(
        int(s.get("restartCount", 0)) for s in _path(obj, "status", "containerStatuses") or []
    )


def _access_modes(obj: Obj, *path: str) -> str:
    short = {
        "ReadWriteOnce": "RWO",
        "ReadOnlyMany": "ROX",
        "ReadWriteMany": "RWX",
        "ReadWriteOncePod": "RWOP",
    }
    return ",".join(short.get(m, m) for m in _path(obj, *path) or [])


AGE = Column("Age", "string", age, description="age")
NAME_ONLY: tuple[Column, ...] = (AGE,)


def _col(name: str, cell: Callable[[Obj], Any], type_: str = "string", priority: int = 0) -> Column:
    return Column(name, type_, cell, priority)


POD_COLUMNS = (
    _col("Ready", _pod_ready),
    _col("Status", _pod_status),
    _col("Restarts", _pod_restarts, "integer"),
    AGE,
    _col("IP", lambda o: _path(o, "status", "podIP") or "<none>", priority=1),
    _col("Node", lambda o: _path(o, "spec", "nodeName") or "<none>", priority=1),
)
PVC_COLUMNS = (
    _col("Status", lambda o: _path(o, "status", "phase") or "Pending"),
    _col("Volume", lambda o: _path(o, "spec", "volumeName") or ""),
    _col("Capacity", lambda o: _path(o, "status", "capacity", "storage") or ""),
    _col("Access Modes", lambda o: _access_modes(o, "status", "accessModes")),
    _col("StorageClass", lambda o: _path(o, "spec", "storageClassName") or "<unset>"),
    AGE,
    _col("VolumeMode", lambda o: _path(o, "spec", "volumeMode") or "Filesystem", priority=1),
)
PV_COLUMNS = (
    _col("Capacity", lambda o: _path(o, "spec", "capacity", "storage") or ""),
    _col("Access Modes", lambda o: _access_modes(o, "spec", "accessModes")),
    _col("Reclaim Policy", lambda o: _path(o, "spec", "persistentVolumeReclaimPolicy") or ""),
    _col("Status", lambda o: _path(o, "status", "phase") or ""),
    _col(
        "Claim",
        lambda o: "/".join(
            filter(
                None,
                [_path(o, "spec", "claimRef", "namespace"), _path(o, "spec", "claimRef", "name")],
            )
        ),
    ),
    _col("StorageClass", lambda o: _path(o, "spec", "storageClassName") or ""),
    AGE,
)
NAMESPACE_COLUMNS = (_col("Status", lambda o: _path(o, "status", "phase") or "Active"), AGE)
STORAGE_CLASS_COLUMNS = (
    _col("Provisioner", lambda o: o.get("provisioner", "")),
    _col("ReclaimPolicy", lambda o: o.get("reclaimPolicy", "Delete")),
    _col("VolumeBindingMode", lambda o: o.get("volumeBindingMode", "Immediate")),
    _col("AllowVolumeExpansion", lambda o: bool(o.get("allowVolumeExpansion", False)), "boolean"),
    AGE,
)
SECRET_COLUMNS = (
    _col("Type", lambda o: o.get("type", "Opaque")),
    _col("Data", lambda o: len(o.get("data") or {}), "integer"),
    AGE,
)
CONFIGMAP_COLUMNS = (
    _col("Data", lambda o: len(o.get("data") or {}) + len(o.get("binaryData") or {}), "integer"),
    AGE,
)
SERVICE_COLUMNS = (
    _col("Type", lambda o: _path(o, "spec", "type") or "ClusterIP"),
    _col("Cluster-IP", lambda o: _path(o, "spec", "clusterIP") or "<none>"),
    _col(
        "Port(s)",
        lambda o: (
            ",".join(
                f"{p.get('port')}/{p.get('protocol', 'TCP')}"
                for p in _path(o, "spec", "ports") or []
            )
            or "<none>"
        ),
    ),
    AGE,
)
EVENT_COLUMNS = (
    _col("Last Seen", lambda o: o.get("lastTimestamp") or ""),
    _col("Type", lambda o: o.get("type", "")),
    _col("Reason", lambda o: o.get("reason", "")),
    _col(
        "Object",
        lambda o: "/".join(
            str(_path(o, "involvedObject", k) or "") for k in ("kind", "name")
        ).lower(),
    ),
    _col("Message", lambda o: o.get("message", "")),
)

_NO_STATUS: tuple[str, ...] = ()

BUILTINS: tuple[ResourceType, ...] = (
    ResourceType(
        "",
        "v1",
        "Namespace",
        "namespaces",
        False,
        short_names=("ns",),
        subresources=("status", "finalize"),
        columns=NAMESPACE_COLUMNS,
    ),
    ResourceType(
        "",
        "v1",
        "Pod",
        "pods",
        True,
        short_names=("po",),
        categories=("all",),
        subresources=("status", "log"),
        columns=POD_COLUMNS,
    ),
    ResourceType(
        "",
        "v1",
        "PersistentVolumeClaim",
        "persistentvolumeclaims",
        True,
        short_names=("pvc",),
        columns=PVC_COLUMNS,
    ),
    ResourceType(
        "",
        "v1",
        "PersistentVolume",
        "persistentvolumes",
        False,
        short_names=("pv",),
        columns=PV_COLUMNS,
    ),
    ResourceType(
        "",
        "v1",
        "Service",
        "services",
        True,
        short_names=("svc",),
        categories=("all",),
        columns=SERVICE_COLUMNS,
    ),
    ResourceType(
        "", "v1", "Secret", "secrets", True, subresources=_NO_STATUS, columns=SECRET_COLUMNS
    ),
    ResourceType(
        "",
        "v1",
        "ConfigMap",
        "configmaps",
        True,
        short_names=("cm",),
        subresources=_NO_STATUS,
        columns=CONFIGMAP_COLUMNS,
    ),
    ResourceType(
        "",
        "v1",
        "ServiceAccount",
        "serviceaccounts",
        True,
        short_names=("sa",),
        subresources=_NO_STATUS,
    ),
    ResourceType(
        "",
        "v1",
        "Event",
        "events",
        True,
        short_names=("ev",),
        subresources=_NO_STATUS,
        columns=EVENT_COLUMNS,
    ),
    ResourceType(
        "storage.k8s.io",
        "v1",
        "StorageClass",
        "storageclasses",
        False,
        short_names=("sc",),
        subresources=_NO_STATUS,
        columns=STORAGE_CLASS_COLUMNS,
    ),
    ResourceType("rbac.authorization.k8s.io", "v1", "Role", "roles", True, subresources=_NO_STATUS),
    ResourceType(
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRole",
        "clusterroles",
        False,
        subresources=_NO_STATUS,
    ),
    ResourceType(
        "rbac.authorization.k8s.io",
        "v1",
        "RoleBinding",
        "rolebindings",
        True,
        subresources=_NO_STATUS,
    ),
    ResourceType(
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRoleBinding",
        "clusterrolebindings",
        False,
        subresources=_NO_STATUS,
    ),
    ResourceType(
        "apiextensions.k8s.io",
        "v1",
        "CustomResourceDefinition",
        "customresourcedefinitions",
        False,
        short_names=("crd", "crds"),
        categories=("api-extensions",),
    ),
    ResourceType(
        "authorization.k8s.io",
        "v1",
        "SubjectAccessReview",
        "subjectaccessreviews",
        False,
        verbs=("create",),
        subresources=_NO_STATUS,
    ),
    ResourceType(
        "authorization.k8s.io",
        "v1",
        "SelfSubjectAccessReview",
        "selfsubjectaccessreviews",
        False,
        verbs=("create",),
        subresources=_NO_STATUS,
    ),
)

# --- CDI's own API (cdi.apiserver), served when the server is given a signing key ----------
UPLOAD_TOKEN_REQUESTS = ResourceType(
    groups.UPLOAD_TOKEN_REQUEST.group,
    groups.UPLOAD_TOKEN_REQUEST.version,
    groups.UPLOAD_TOKEN_REQUEST.kind,
    groups.UPLOAD_TOKEN_REQUEST.plural,
    groups.UPLOAD_TOKEN_REQUEST.namespaced,
    short_names=groups.UPLOAD_TOKEN_REQUEST.short_names,
    verbs=("create",),
    subresources=_NO_STATUS,
)
# --- end CDI's own API ---------------------------------------------------------------------

CRD_KEY = resource_key("apiextensions.k8s.io", "customresourcedefinitions")
PREFERRED_VERSIONS = {"": "v1"}


def types_from_crd(crd: Obj) -> list[ResourceType]:
    info: CRDResourceInfo = crd_resource_info(crd)
    storage = info.storage_version.name
    served = [v for v in info.versions if v.served]
    out = []
    for ver in served:
        subs: tuple[str, ...] = ("status",) if ver.status_subresource else ()
        if ver.scale_subresource is not None:
            subs += ("scale",)
        out.append(
            ResourceType(
                info.group,
                ver.name,
                info.kind,
                info.plural,
                info.namespaced,
                singular=info.singular,
                short_names=info.short_names,
                categories=info.categories,
                subresources=subs,
                crd_columns=ver.columns,
                schema=ver.schema,
                custom=True,
                deprecation_warning=ver.warning(info.group, info.kind),
                storage_version=storage,
            )
        )
    return out


class Registry:
    """Thread-safe lookup of served resource types; `reload(crds)` swaps in a new set."""

    def __init__(self, extra: Iterable[ResourceType] = ()) -> None:
        self._lock = threading.Lock()
        self._types: dict[tuple[str, str, str], ResourceType] = {}
        self._extra = tuple(extra)  # served besides BUILTINS (e.g. UPLOAD_TOKEN_REQUESTS)
        self.reload([])

    def reload(self, crds: Iterable[Obj]) -> None:
        types = {(t.group, t.version, t.plural): t for t in (*BUILTINS, *self._extra)}
        for crd in crds:
            if crd.get("metadata", {}).get("deletionTimestamp"):
                continue
            try:
                for t in types_from_crd(crd):
                    types[(t.group, t.version, t.plural)] = t
            except ValueError:
                continue  # an invalid stored CRD is not served, as kube-apiserver does
        with self._lock:
            self._types = types

    def get(self, group: str, version: str, plural: str) -> ResourceType | None:
        with self._lock:
            return self._types.get((group, version, plural))

    def all(self) -> list[ResourceType]:
        with self._lock:
            return list(self._types.values())

    def groups(self) -> dict[str, list[str]]:
        """group -> served versions, preferred first."""
        found: dict[str, set[str]] = {}
        for t in self.all():
            found.setdefault(t.group, set()).add(t.version)
        return {g: sort_versions(sorted(v)) for g, v in found.items()}

    def in_group_version(self, group: str, version: str) -> list[ResourceType]:
        return sorted(
            (t for t in self.all() if t.group == group and t.version == version),
            key=lambda t: t.plural,
        )

    def by_key(self, key: str) -> list[ResourceType]:
        return [t for t in self.all() if t.key == key]


def table_columns(rt: ResourceType) -> list[Obj]:
    if rt.crd_columns is not None:
        from cdi.kubeapi.crds import table_column_definitions  # noqa: PLC0415

        return table_column_definitions(rt.crd_columns)
    columns = rt.columns or NAME_ONLY
    name = {
        "name": "Name",
        "type": "string",
        "format": "name",
        "description": "Name",
        "priority": 0,
    }
    return [name] + [
        {
            "name": c.name,
            "type": c.type,
            "format": "",
            "description": c.description or c.name,
            "priority": c.priority,
        }
        for c in columns
    ]


def table_cells(rt: ResourceType, obj: Obj) -> list[Any]:
    if rt.crd_columns is not None:
        from cdi.kubeapi.crds import table_row_cells  # noqa: PLC0415

        return table_row_cells(rt.crd_columns, obj)
    columns: Sequence[Column] = rt.columns or NAME_ONLY
    return [_path(obj, "metadata", "name") or "", *(c.cell(obj) for c in columns)]


__all__ = [
    "AGE_COLUMN",
    "BUILTINS",
    "CRD_KEY",
    "UPLOAD_TOKEN_REQUESTS",
    "Registry",
    "ResourceType",
    "table_cells",
    "table_columns",
]
