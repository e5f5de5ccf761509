"""CustomResourceDefinitions: the ones we ship, and what the API server derives from any CRD.

Owns: loading the CRD YAML shipped as package data of `cdi.api` (`crds/*.yaml`, the same files
the Helm chart installs); `crd_resource_info`, which turns a CRD object (ours, or one a user
creates at runtime) into names, scope, versions, subresources and printer columns; and the parts
of kube-apiserver's behaviour that depend on a CRD alone: Kubernetes' version priority, discovery
`APIResource` entries, Table column definitions and cells (the default Age column, simple
JSONPath, human-readable ages), CRD defaulting and validation, and the `Established` status.

Called by the embedded API server. Only `load_crds` reads files (package data); the rest is pure.
"""

from __future__ import annotations

import base64
import copy
import functools
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import yaml

from cdi.kubeapi.schema import (
    FieldError,
    duplicate,
    invalid,
    is_dns1035_label,
    not_supported,
    required,
    structural_errors,
)

__all__ = [
    "AGE_COLUMN",
    "COLUMN_TYPES",
    "CRD_VERBS",
    "SUBRESOURCE_VERBS",
    "CRDError",
    "CRDResourceInfo",
    "CRDVersion",
    "PrinterColumn",
    "ScaleSubresource",
    "column_cell",
    "crd_resource_info",
    "default_crd",
    "established_status",
    "human_duration",
    "json_path_values",
    "load_crds",
    "sort_versions",
    "table_column_definitions",
    "table_row_cells",
    "validate_crd",
    "version_priority_key",
]

CRD_VERBS = ("delete", "deletecollection", "get", "list", "patch", "create", "update", "watch")
SUBRESOURCE_VERBS = ("get", "patch", "update")
COLUMN_TYPES = ("integer", "number", "string", "boolean", "date")

_NAME_DESCRIPTION = (
    "Name must be unique within a namespace. Is required when creating resources, although some "
    "resources may allow a client to request the generation of an appropriate name "
    "automatically. Name is primarily intended for creation idempotence and configuration "
    "definition. Cannot be updated."
)


class CRDError(ValueError):
    """A CRD object lacks what `crd_resource_info` needs (group, names.kind, names.plural)."""


# ---- loading -----------------------------------------------------------------------------------


def load_crds() -> list[dict[str, Any]]:
    """The CRDs we ship, one dict per document, in file-name order. Each call returns fresh
    objects, so callers may default or store them without copying."""
    return copy.deepcopy(list(_parsed_crds()))


@functools.cache
def _parsed_crds() -> tuple[dict[str, Any], ...]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    folder = resources.files("cdi.api").joinpath("crds")
    documents: list[dict[str, Any]] = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".yaml"):
            continue
        for doc in yaml.load_all(entry.read_text(encoding="utf-8"), Loader=loader):
            if doc:
                documents.append(doc)
    return tuple(documents)


# ---- resource info -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PrinterColumn:
    """One `additionalPrinterColumns` entry."""

    name: str
    type: str
    json_path: str
    description: str = ""
    format: str = ""
    priority: int = 0

    def definition(self) -> dict[str, Any]:
        """The `TableColumnDefinition` of this column."""
        return {
            "name": self.name,
            "type": self.type,
            "format": self.format,
            "description": self.description,
            "priority": self.priority,
        }


# Kubernetes shows this one column when a CRD version declares none.
AGE_COLUMN = PrinterColumn(
    "Age",
    "date",
    ".metadata.creationTimestamp",
    "CreationTimestamp is a timestamp representing the server time when this object was created.",
)


@dataclass(frozen=True, slots=True)
class ScaleSubresource:
    spec_replicas_path: str
    status_replicas_path: str
    label_selector_path: str | None = None


@dataclass(frozen=True, slots=True)
class CRDVersion:
    name: str
    served: bool
    storage: bool
    schema: Mapping[str, Any] | None
    status_subresource: bool = False
    scale_subresource: ScaleSubresource | None = None
    printer_columns: tuple[PrinterColumn, ...] = ()
    deprecated: bool = False
    deprecation_warning: str | None = None

    @property
    def columns(self) -> tuple[PrinterColumn, ...]:
        """The columns `kubectl get` shows after NAME: the declared ones, else Age."""
        return self.printer_columns or (AGE_COLUMN,)

    def warning(self, group: str, kind: str) -> str | None:
        """The `Warning` header text for requests to a deprecated version."""
        if not self.deprecated:
            return None
        return self.deprecation_warning or f"{group}/{self.name} {kind} is deprecated"


@dataclass(frozen=True, slots=True)
class CRDResourceInfo:
    """What the API server needs to serve one CRD's resource."""

    name: str
    group: str
    kind: str
    list_kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]
    categories: tuple[str, ...]
    namespaced: bool
    versions: tuple[CRDVersion, ...]

    def version(self, name: str) -> CRDVersion | None:
        return next((v for v in self.versions if v.name == name), None)

    @property
    def served_versions(self) -> tuple[CRDVersion, ...]:
        """Served versions, highest Kubernetes priority first (v1 > v1beta1 > v1alpha1)."""
        served = [v for v in self.versions if v.served]
        return tuple(sorted(served, key=lambda v: version_priority_key(v.name)))

    @property
    def preferred_version(self) -> CRDVersion | None:
        served = self.served_versions
        return served[0] if served else None

    @property
    def storage_version(self) -> CRDVersion:
        """The version objects are stored in (a valid CRD has exactly one)."""
        return next((v for v in self.versions if v.storage), self.versions[0])

    @property
    def storage_version_hash(self) -> str:
        """Discovery's storageVersionHash: base64 of sha256("group/version/kind")[:8]."""
        gvk = f"{self.group}/{self.storage_version.name}/{self.kind}"
        return base64.b64encode(hashlib.sha256(gvk.encode()).digest()[:8]).decode()

    def api_resources(self, version: str) -> list[dict[str, Any]]:
        """The `APIResourceList.resources` entries for this CRD in one served version: the
        resource, then its status and scale subresources."""
        ver = self.version(version)
        if ver is None or not ver.served:
            return []
        main: dict[str, Any] = {
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": list(CRD_VERBS),
        }
        if self.short_names:
            main["shortNames"] = list(self.short_names)
        if self.categories:
            main["categories"] = list(self.categories)
        main["storageVersionHash"] = self.storage_version_hash
        out = [main]
        if ver.status_subresource:
            out.append(
                {
                    "name": f"{self.plural}/status",
                    "singularName": "",
                    "namespaced": self.namespaced,
                    "kind": self.kind,
                    "verbs": list(SUBRESOURCE_VERBS),
                }
            )
        if ver.scale_subresource is not None:
            out.append(
                {
                    "name": f"{self.plural}/scale",
                    "singularName": "",
                    "namespaced": self.namespaced,
                    "group": "autoscaling",
                    "version": "v1",
                    "kind": "Scale",
                    "verbs": list(SUBRESOURCE_VERBS),
                }
            )
        return out

    def matches(self, name: str) -> bool:
        """Whether kubectl's resource argument (plural, singular, kind or short name) names this."""
        lowered = name.lower()
        return lowered in (self.plural, self.singular, self.kind.lower(), *self.short_names)


def _str(value: Any, default: str = "") -> str:
    return value if isinstance(value, str) else default


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _strs(value: Any) -> tuple[str, ...]:
    return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()


def crd_resource_info(crd: Mapping[str, Any]) -> CRDResourceInfo:
    """Read a CRD object (apiextensions.k8s.io/v1) into a `CRDResourceInfo`, applying the
    defaults Kubernetes applies (singular = lower-case kind, listKind = kind + "List")."""
    spec = crd.get("spec")
    if not isinstance(spec, Mapping):
        raise CRDError("CustomResourceDefinition has no spec")
    names = spec.get("names")
    group = _str(spec.get("group"))
    if not isinstance(names, Mapping) or not group:
        raise CRDError("CustomResourceDefinition needs spec.group and spec.names")
    kind = _str(names.get("kind"))
    plural = _str(names.get("plural"))
    if not kind or not plural:
        raise CRDError("CustomResourceDefinition needs spec.names.kind and spec.names.plural")
    versions = tuple(_version_info(v) for v in spec.get("versions") or [] if isinstance(v, Mapping))
    if not versions:
        raise CRDError("CustomResourceDefinition needs at least one version")
    metadata = crd.get("metadata")
    return CRDResourceInfo(
        name=_str(metadata.get("name") if isinstance(metadata, Mapping) else None)
        or f"{plural}.{group}",
        group=group,
        kind=kind,
        list_kind=_str(names.get("listKind")) or f"{kind}List",
        plural=plural,
        singular=_str(names.get("singular")) or kind.lower(),
        short_names=_strs(names.get("shortNames")),
        categories=_strs(names.get("categories")),
        namespaced=spec.get("scope", "Namespaced") != "Cluster",
        versions=versions,
    )


def _version_info(raw: Mapping[str, Any]) -> CRDVersion:
    schema_holder = raw.get("schema")
    schema = schema_holder.get("openAPIV3Schema") if isinstance(schema_holder, Mapping) else None
    subresources = raw.get("subresources")
    subresources = subresources if isinstance(subresources, Mapping) else {}
    scale = subresources.get("scale")
    scale_info = (
        ScaleSubresource(
            spec_replicas_path=_str(scale.get("specReplicasPath")),
            status_replicas_path=_str(scale.get("statusReplicasPath")),
            label_selector_path=_str(scale.get("labelSelectorPath")) or None,
        )
        if isinstance(scale, Mapping)
        else None
    )
    columns = tuple(
        PrinterColumn(
            name=_str(c.get("name")),
            type=_str(c.get("type"), "string"),
            json_path=_str(c.get("jsonPath")),
            description=_str(c.get("description")),
            format=_str(c.get("format")),
            priority=_int(c.get("priority")),
        )
        for c in raw.get("additionalPrinterColumns") or []
        if isinstance(c, Mapping)
    )
    return CRDVersion(
        name=_str(raw.get("name")),
        served=bool(raw.get("served", False)),
        storage=bool(raw.get("storage", False)),
        schema=schema if isinstance(schema, Mapping) else None,
        status_subresource="status" in subresources,
        scale_subresource=scale_info,
        printer_columns=columns,
        deprecated=bool(raw.get("deprecated", False)),
        deprecation_warning=_str(raw.get("deprecationWarning")) or None,
    )


# ---- version priority --------------------------------------------------------------------------

_KUBE_VERSION = re.compile(r"v([1-9][0-9]*)(?:(alpha|beta)([1-9][0-9]*))?")


def version_priority_key(version: str) -> tuple[int, int, int, str]:
    """Sort key giving Kubernetes' version priority in ascending order: GA before beta before
    alpha, higher numbers first within each; other names last, alphabetically."""
    match = _KUBE_VERSION.fullmatch(version)
    if match is None:
        return (3, 0, 0, version)
    major = int(match.group(1))
    stage = match.group(2)
    minor = int(match.group(3)) if match.group(3) else 0
    rank = {None: 0, "beta": 1, "alpha": 2}[stage]
    return (rank, -major, -minor, "")


def sort_versions(versions: Sequence[str]) -> list[str]:
    """Version names, highest priority first; discovery lists a group's versions in this order
    and its preferredVersion is the first."""
    return sorted(set(versions), key=version_priority_key)


# ---- Table output ------------------------------------------------------------------------------


def table_column_definitions(columns: Sequence[PrinterColumn]) -> list[dict[str, Any]]:
    """`Table.columnDefinitions`: the Name column, then the CRD's columns."""
    name = PrinterColumn("Name", "string", ".metadata.name", _NAME_DESCRIPTION, "name")
    return [name.definition(), *(c.definition() for c in columns)]


def table_row_cells(
    columns: Sequence[PrinterColumn], obj: Mapping[str, Any], *, now: datetime | None = None
) -> list[Any]:
    """One `TableRow.cells`: the object's name, then one cell per column."""
    metadata = obj.get("metadata")
    name = metadata.get("name", "") if isinstance(metadata, Mapping) else ""
    return [name, *(column_cell(c, obj, now=now) for c in columns)]


def column_cell(
    column: PrinterColumn, obj: Mapping[str, Any], *, now: datetime | None = None
) -> Any:
    """A cell as kube-apiserver renders it for CRDs: None when the path finds nothing or the value
    has the wrong type, an age such as "5m" for date columns, the value otherwise."""
    try:
        found = json_path_values(obj, column.json_path)
    except ValueError:
        return None
    if not found or found[0] is None:
        return None
    value = found[0]
    if column.type == "string":
        return value if isinstance(value, str) else _text(value)
    if column.type == "integer":
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        return int(value)
    if column.type == "number":
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        return float(value)
    if column.type == "boolean":
        return value if isinstance(value, bool) else None
    if column.type == "date":
        if not isinstance(value, str):
            return None
        try:
            when = datetime.fromisoformat(value.replace("z", "Z"))
        except ValueError:
            return "<invalid>"
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        current = now or datetime.now(UTC)
        return human_duration((current - when).total_seconds())
    return None


def _text(value: Any) -> str:
    # How a string column prints a non-string value (kubectl's JSONPath printer).
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def human_duration(seconds: float) -> str:
    """apimachinery's HumanDuration, the AGE column's format: 45s, 5m3s, 3h, 2d4h, 3y45d."""
    secs = int(seconds)
    if secs < -1:
        return "<invalid>"
    if secs < 0:
        return "0s"
    if secs < 120:
        return f"{secs}s"
    minutes = secs // 60
    if minutes < 10:
        rest = secs % 60
        return f"{minutes}m" if rest == 0 else f"{minutes}m{rest}s"
    if minutes < 180:
        return f"{minutes}m"
    hours = secs // 3600
    if hours < 8:
        rest = minutes % 60
        return f"{hours}h" if rest == 0 else f"{hours}h{rest}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        rest = hours % 24
        return f"{hours // 24}d" if rest == 0 else f"{hours // 24}d{rest}h"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        days = (hours // 24) % 365
        years = hours // 24 // 365
        return f"{years}y" if days == 0 else f"{years}y{days}d"
    return f"{hours // 24 // 365}y"


# ---- JSONPath ----------------------------------------------------------------------------------

_SEGMENT = re.compile(
    r"""\.(?P<field>[A-Za-z0-9_$-]+)
      | \[(?P<index>-?\d+)\]
      | \[(?P<star>\*)\]
      | \[(?P<q>['"])(?P<quoted>.*?)(?P=q)\]
      | \[\?\(@(?P<fpath>(?:\.[A-Za-z0-9_$-]+)+)\s*(?P<op>==|!=)\s*
            (?:(?P<fq>['"])(?P<fval>.*?)(?P=fq)|(?P<fnum>-?\d+(?:\.\d+)?)|(?P<fword>true|false))\s*\)\]
      | \.\*(?P<dotstar>)
    """,
    re.VERBOSE,
)


@functools.lru_cache(maxsize=256)
def _parse_json_path(path: str) -> tuple[tuple[str, Any], ...]:
    text = path.strip()
    if text.startswith("{") and text.endswith("}"):
        text = text[1:-1]
    if text.startswith("$"):
        text = text[1:]
    steps: list[tuple[str, Any]] = []
    pos = 0
    while pos < len(text):
        match = _SEGMENT.match(text, pos)
        if match is None:
            raise ValueError(f"unsupported JSONPath {path!r} at {text[pos:]!r}")
        if match.group("field") is not None:
            steps.append(("field", match.group("field")))
        elif match.group("index") is not None:
            steps.append(("index", int(match.group("index"))))
        elif match.group("star") is not None or match.group("dotstar") is not None:
            steps.append(("all", None))
        elif match.group("quoted") is not None:
            steps.append(("field", match.group("quoted")))
        else:
            if match.group("fval") is not None:
                expected: Any = match.group("fval")
            elif match.group("fnum") is not None:
                expected = json.loads(match.group("fnum"))
            else:
                expected = match.group("fword") == "true"
            keys = tuple(match.group("fpath").split(".")[1:])
            steps.append(("filter", (keys, match.group("op"), expected)))
        pos = match.end()
    return tuple(steps)


def json_path_values(obj: Any, path: str) -> list[Any]:
    """Evaluate the simple JSONPath that printer columns use: `.a.b`, `.a[0]`, `.a[*]`,
    `.a['b.c']` and filters `.a[?(@.type=='Ready')].status` (== and !=). Missing paths give [];
    an unsupported expression raises ValueError."""
    current = [obj]
    for step, arg in _parse_json_path(path):
        following: list[Any] = []
        for value in current:
            if step == "field":
                if isinstance(value, Mapping) and arg in value:
                    following.append(value[arg])
            elif step == "index":
                if isinstance(value, list) and -len(value) <= arg < len(value):
                    following.append(value[arg])
            elif step == "all":
                if isinstance(value, list):
                    following.extend(value)
                elif isinstance(value, Mapping):
                    following.extend(value.values())
            elif isinstance(value, list):
                keys, op, expected = arg
                following.extend(v for v in value if _filter_matches(v, keys, op, expected))
        current = following
    return current


def _filter_matches(value: Any, keys: tuple[str, ...], op: str, expected: Any) -> bool:
    for key in keys:
        if not isinstance(value, Mapping) or key not in value:
            return False
        value = value[key]
    equal = value == expected and isinstance(value, bool) == isinstance(expected, bool)
    return equal if op == "==" else not equal


# ---- CRD objects -------------------------------------------------------------------------------


def default_crd(crd: dict[str, Any]) -> None:
    """Apply, in place, the defaults kube-apiserver sets on a CRD: names.singular, names.listKind,
    conversion strategy None."""
    spec = crd.get("spec")
    if not isinstance(spec, dict):
        return
    names = spec.get("names")
    if isinstance(names, dict) and isinstance(names.get("kind"), str):
        names.setdefault("singular", names["kind"].lower())
        names.setdefault("listKind", names["kind"] + "List")
    spec.setdefault("conversion", {"strategy": "None"})


def validate_crd(crd: Mapping[str, Any]) -> list[FieldError]:
    """The checks kube-apiserver makes on a CRD object that matter to this server: names, scope,
    versions (unique, exactly one storage version), structural schemas and printer columns."""
    errors: list[FieldError] = []
    spec = crd.get("spec")
    if not isinstance(spec, Mapping):
        return [required("spec")]
    group = _str(spec.get("group"))
    raw_names = spec.get("names")
    names: Mapping[str, Any] = raw_names if isinstance(raw_names, Mapping) else {}
    plural = _str(names.get("plural"))
    if not group:
        errors.append(required("spec.group"))
    elif "." not in group:
        errors.append(invalid("spec.group", group, "should be a domain with at least one dot"))
    raw_metadata = crd.get("metadata")
    name = _str(raw_metadata.get("name")) if isinstance(raw_metadata, Mapping) else ""
    if group and plural and name != f"{plural}.{group}":
        errors.append(invalid("metadata.name", name, 'must be spec.names.plural+"."+spec.group'))
    errors.extend(_validate_names(names))
    scope = spec.get("scope")
    if scope not in ("Namespaced", "Cluster"):
        errors.append(
            required("spec.scope")
            if scope is None
            else not_supported("spec.scope", scope, ["Cluster", "Namespaced"])
        )
    errors.extend(_validate_versions(spec.get("versions")))
    return errors


def _validate_names(names: Mapping[str, Any]) -> list[FieldError]:
    errors: list[FieldError] = []
    for key in ("plural", "singular"):
        value = names.get(key)
        if value is None or value == "":
            if key == "plural":
                errors.append(required(f"spec.names.{key}"))
            continue
        if not isinstance(value, str):
            errors.append(invalid(f"spec.names.{key}", value, "must be a string"))
            continue
        errors.extend(invalid(f"spec.names.{key}", value, m) for m in is_dns1035_label(value))
    kind = names.get("kind")
    if not kind:
        errors.append(required("spec.names.kind"))
    for i, short in enumerate(names.get("shortNames") or []):
        if isinstance(short, str):
            errors.extend(
                invalid(f"spec.names.shortNames[{i}]", short, m) for m in is_dns1035_label(short)
            )
    return errors


def _validate_versions(versions: Any) -> list[FieldError]:
    errors: list[FieldError] = []
    if not isinstance(versions, list) or not versions:
        return [
            required("spec.versions", "must have exactly one version marked as storage version")
        ]
    seen: set[str] = set()
    storage = 0
    for i, raw in enumerate(versions):
        path = f"spec.versions[{i}]"
        if not isinstance(raw, Mapping):
            errors.append(invalid(path, raw, "must be an object"))
            continue
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            errors.append(required(f"{path}.name"))
        elif name in seen:
            errors.append(duplicate(f"{path}.name", name))
        else:
            seen.add(name)
            errors.extend(invalid(f"{path}.name", name, m) for m in is_dns1035_label(name))
        if raw.get("storage") is True:
            storage += 1
        schema_holder = raw.get("schema")
        schema = (
            schema_holder.get("openAPIV3Schema") if isinstance(schema_holder, Mapping) else None
        )
        if schema is None:
            errors.append(required(f"{path}.schema.openAPIV3Schema", "schemas are required"))
        else:
            errors.extend(structural_errors(schema, f"{path}.schema.openAPIV3Schema"))
        for j, column in enumerate(raw.get("additionalPrinterColumns") or []):
            errors.extend(_validate_column(column, f"{path}.additionalPrinterColumns[{j}]"))
    if storage != 1:
        errors.append(
            invalid(
                "spec.versions",
                [v.get("name") for v in versions if isinstance(v, Mapping)],
                "must have exactly one version marked as storage version",
            )
        )
    return errors


def _validate_column(column: Any, path: str) -> list[FieldError]:
    if not isinstance(column, Mapping):
        return [invalid(path, column, "must be an object")]
    errors: list[FieldError] = []
    if not column.get("name"):
        errors.append(required(f"{path}.name"))
    col_type = column.get("type")
    if not col_type:
        errors.append(required(f"{path}.type"))
    elif col_type not in COLUMN_TYPES:
        errors.append(not_supported(f"{path}.type", col_type, COLUMN_TYPES))
    json_path = column.get("jsonPath")
    if not json_path:
        errors.append(required(f"{path}.jsonPath"))
    else:
        try:
            _parse_json_path(str(json_path))
        except ValueError:
            errors.append(invalid(f"{path}.jsonPath", json_path, "must be a simple json path"))
    return errors


def established_status(crd: Mapping[str, Any], *, now: datetime | None = None) -> dict[str, Any]:
    """The `status` kube-apiserver gives an accepted CRD: accepted names, the conditions
    NamesAccepted and Established (what `kubectl wait --for condition=established` reads) and
    the stored versions."""
    info = crd_resource_info(crd)
    stamp = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    accepted: dict[str, Any] = {"kind": info.kind, "listKind": info.list_kind}
    accepted["plural"] = info.plural
    if info.short_names:
        accepted["shortNames"] = list(info.short_names)
    if info.categories:
        accepted["categories"] = list(info.categories)
    accepted["singular"] = info.singular
    return {
        "acceptedNames": accepted,
        "conditions": [
            {
                "type": "NamesAccepted",
                "status": "True",
                "lastTransitionTime": stamp,
                "reason": "NoConflicts",
                "message": "no conflicts found",
            },
            {
                "type": "Established",
                "status": "True",
                "lastTransitionTime": stamp,
                "reason": "InitialNamesAccepted",
                "message": "the initial names have been accepted",
            },
        ],
        "storedVersions": [info.storage_version.name],
    }
