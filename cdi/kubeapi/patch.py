"""The three patch formats the API server accepts, applied to plain JSON objects.

- `apply_merge_patch`: JSON merge patch (RFC 7386): objects merge, `null` deletes, anything else
  (lists included) replaces.
- `apply_json_patch`: JSON patch (RFC 6902): add, remove, replace, move, copy, test, with JSON
  pointers (RFC 6901, `~0`/`~1` escapes, `-` appends). All operations apply or none does. A patch
  that is not an array of objects is a 400 `BadRequest`; an operation that cannot apply, a failed
  `test` included, is a 422 `Invalid`, as kube-apiserver answers (it maps every apply error of
  a JSON patch to 422, never 409).
- `apply_strategic_merge_patch`: the subset of Kubernetes' strategic merge patch that `kubectl`
  sends for built-in kinds: maps merge, `null` deletes, lists named in a `MergeSchema` merge
  element-wise by their merge key (containers by `name`, ports by `containerPort`, conditions by
  `type`, ...) or as sets (finalizers), other lists replace. Directives: `$patch: replace | merge
  | delete` in maps and list elements, `$deleteFromPrimitiveList/<field>`, `$setElementOrder/
  <field>` (honoured: listed elements take that relative order, others keep their places) and
  `$retainKeys`. Custom resources have no Go struct tags, so Kubernetes refuses strategic merge
  for them with 415; `strategic_merge_schema()` returns None for any resource without a table
  here, and `apply_patch()` turns that into the same 415.

Every function returns a new object and never changes its inputs. Called by the HTTP layer's
PATCH handler (usually inside `Store.modify`, so read-patch-write is atomic). No I/O here, and no
knowledge of resourceVersion or validation: the store and admission check the result.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from cdi.kubeapi.errors import BadRequest, Invalid, RequestEntityTooLarge, UnsupportedMediaType

Obj = dict[str, Any]

JSON_PATCH: Final = "application/json-patch+json"
MERGE_PATCH: Final = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH: Final = "application/strategic-merge-patch+json"

#: kube-apiserver's cap on the operations of one JSON patch (a 413 beyond it).
MAX_JSON_PATCH_OPERATIONS: Final = 10000


def _clone(value: Any) -> Any:
    # A JSON round trip is both the fastest deep copy of JSON data and a check that it is JSON.
    return json.loads(json.dumps(value))


def json_equal(a: Any, b: Any) -> bool:
    """Equality as JSON defines it: 1 == 1.0, but true != 1 (Python's `==` says otherwise)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    if a is None or b is None:
        return a is None and b is None
    return type(a) is type(b) and bool(a == b)


# --- JSON merge patch (RFC 7386) ------------------------------------------------------------


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """Apply an RFC 7386 merge patch; a non-object patch replaces the target wholesale."""
    if not isinstance(patch, dict):
        return _clone(patch)
    result = _clone(target) if isinstance(target, dict) else {}
    _merge_into(result, patch)
    return result


def _merge_into(target: Obj, patch: Obj) -> None:
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict):
            current = target.get(key)
            if not isinstance(current, dict):
                current = {}
                target[key] = current
            _merge_into(current, value)
        else:
            target[key] = _clone(value)


# --- JSON patch (RFC 6902) ------------------------------------------------------------------


def _rejected(detail: str) -> Invalid:
    # kube-apiserver's own text is the first half; the second says what went wrong, which the
    # real server leaves out and users then have to guess.
    return Invalid(
        f"the server rejected our request due to an error in our request: {detail}",
        details={"causes": [{"reason": "FieldValueInvalid", "message": detail, "field": "patch"}]},
    )


_BAD_ESCAPE = re.compile(r"~(?![01])")
_INDEX = re.compile(r"^(0|[1-9][0-9]*)$")


def _pointer(path: Any, name: str = "path") -> list[str]:
    if not isinstance(path, str):
        raise _rejected(f"{name} must be a string JSON pointer")
    if path == "":
        return []
    if not path.startswith("/"):
        raise _rejected(f'{name} "{path}" is not a JSON pointer: it must start with "/"')
    tokens = path[1:].split("/")
    for token in tokens:
        if _BAD_ESCAPE.search(token):
            raise _rejected(f'{name} "{path}" has an invalid "~" escape')
    # ~1 first, then ~0, so that "~01" means the two characters "~1" (RFC 6901 section 4).
    return [t.replace("~1", "/").replace("~0", "~") for t in tokens]


def _index(token: str, length: int, path: str, *, for_insert: bool) -> int:
    if token == "-" and for_insert:
        return length
    if not _INDEX.match(token):
        raise _rejected(f'"{token}" in "{path}" is not a valid array index')
    index = int(token)
    if index > length or (index == length and not for_insert):
        raise _rejected(f'array index {index} in "{path}" is out of range (length {length})')
    return index


def _walk(doc: Any, tokens: list[str], path: str) -> Any:
    node = doc
    for token in tokens:
        if isinstance(node, dict):
            if token not in node:
                raise _rejected(f'path "{path}" does not exist: no "{token}"')
            node = node[token]
        elif isinstance(node, list):
            node = node[_index(token, len(node), path, for_insert=False)]
        else:
            raise _rejected(f'path "{path}" does not exist: "{token}" is inside a scalar')
    return node


def _add(doc: Any, tokens: list[str], value: Any, path: str) -> Any:
    if not tokens:
        return value
    parent = _walk(doc, tokens[:-1], path)
    last = tokens[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        parent.insert(_index(last, len(parent), path, for_insert=True), value)
    else:
        raise _rejected(f'cannot add at "{path}": the parent is not an object or array')
    return doc


def _remove(doc: Any, tokens: list[str], path: str) -> tuple[Any, Any]:
    """Remove the value at `tokens`; returns (document, removed value)."""
    if not tokens:
        raise _rejected("cannot remove the whole document")
    parent = _walk(doc, tokens[:-1], path)
    last = tokens[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise _rejected(f'cannot remove "{path}": it does not exist')
        return doc, parent.pop(last)
    if isinstance(parent, list):
        return doc, parent.pop(_index(last, len(parent), path, for_insert=False))
    raise _rejected(f'cannot remove "{path}": the parent is not an object or array')


def _replace(doc: Any, tokens: list[str], value: Any, path: str) -> Any:
    if not tokens:
        return value
    parent = _walk(doc, tokens[:-1], path)
    last = tokens[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise _rejected(f'cannot replace "{path}": it does not exist')
        parent[last] = value
    elif isinstance(parent, list):
        parent[_index(last, len(parent), path, for_insert=False)] = value
    else:
        raise _rejected(f'cannot replace "{path}": the parent is not an object or array')
    return doc


def _value_of(op: Mapping[str, Any], name: str) -> Any:
    if "value" not in op:
        raise _rejected(f'"{name}" operation is missing "value"')
    return _clone(op["value"])


def _apply_op(doc: Any, op: Mapping[str, Any]) -> Any:
    name = op.get("op")
    path = op.get("path")
    tokens = _pointer(path)
    where = str(path)
    match name:
        case "add":
            return _add(doc, tokens, _value_of(op, "add"), where)
        case "remove":
            return _remove(doc, tokens, where)[0]
        case "replace":
            return _replace(doc, tokens, _value_of(op, "replace"), where)
        case "move" | "copy":
            if "from" not in op:
                raise _rejected(f'"{name}" operation is missing "from"')
            source = _pointer(op["from"], "from")
            origin = str(op["from"])
            if name == "copy":
                return _add(doc, tokens, _clone(_walk(doc, source, origin)), where)
            if source == tokens:
                _walk(doc, source, origin)  # still an error when it does not exist
                return doc
            if tokens[: len(source)] == source:
                raise _rejected(f'cannot move "{origin}" into its own child "{where}"')
            doc, value = _remove(doc, source, origin)
            return _add(doc, tokens, value, where)
        case "test":
            expected = _value_of(op, "test")
            actual = _walk(doc, tokens, where)
            if not json_equal(actual, expected):
                raise _rejected(
                    f'test failed: "{where}" is {json.dumps(actual)}, not {json.dumps(expected)}'
                )
            return doc
    raise _rejected(f"unknown operation {json.dumps(name)}")


def apply_json_patch(doc: Any, ops: Any) -> Any:
    """Apply an RFC 6902 patch atomically: on any failure the input is untouched and it raises."""
    if not isinstance(ops, list) or not all(isinstance(op, dict) for op in ops):
        raise BadRequest("a JSON patch must be a JSON array of operation objects")
    if len(ops) > MAX_JSON_PATCH_OPERATIONS:
        raise RequestEntityTooLarge(
            f"The allowed maximum operations in a JSON patch is {MAX_JSON_PATCH_OPERATIONS}, "
            f"got {len(ops)}"
        )
    result = _clone(doc)
    for op in ops:
        result = _apply_op(result, op)
    return result


# --- strategic merge patch -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FieldStrategy:
    """How one field merges under a strategic merge patch (Kubernetes' `patchStrategy` tags).

    `merge_key`: a list of objects merged element-wise by this key. `merge_primitives`: a list
    of scalars merged as a set. Neither: the list is replaced. `fields`: strategies for the
    field's own children (of the object, or of each list element).
    """

    merge_key: str | None = None
    merge_primitives: bool = False
    fields: Mapping[str, FieldStrategy] = field(default_factory=dict)


#: Strategies of an object's top-level fields; fields not listed merge (maps) or replace (lists).
MergeSchema = Mapping[str, FieldStrategy]

_DEFAULT = FieldStrategy()


def _by(key: str, fields: Mapping[str, FieldStrategy] | None = None) -> FieldStrategy:
    return FieldStrategy(merge_key=key, fields=fields or {})


def _fields(**children: FieldStrategy) -> FieldStrategy:
    return FieldStrategy(fields=children)


# The patch tags of the core/v1 (and friends) Go types we serve, from the `+patchMergeKey` and
# `+patchStrategy` markers of k8s.io/api; only the fields whose lists merge need listing.
_METADATA = _fields(ownerReferences=_by("uid"), finalizers=FieldStrategy(merge_primitives=True))
_CONDITIONS = _by("type")
_CONTAINER = {
    "env": _by("name"),
    "ports": _by("containerPort"),
    "volumeMounts": _by("mountPath"),
    "volumeDevices": _by("devicePath"),
    "resizePolicy": _by("resourceName"),
}
_POD_SPEC = _fields(
    containers=_by("name", _CONTAINER),
    initContainers=_by("name", _CONTAINER),
    ephemeralContainers=_by("name", _CONTAINER),
    volumes=_by("name"),
    imagePullSecrets=_by("name"),
    hostAliases=_by("ip"),
    topologySpreadConstraints=_by("topologyKey"),
    schedulingGates=_by("name"),
    resourceClaims=_by("name"),
)
_POD_STATUS = _fields(conditions=_CONDITIONS, podIPs=_by("ip"), hostIPs=_by("ip"))
_WITH_CONDITIONS = _fields(conditions=_CONDITIONS)


def _schema(**top: FieldStrategy) -> MergeSchema:
    return {"metadata": _METADATA, **top}


#: Built-in resources (by resource key) that accept strategic merge, with their list strategies.
STRATEGIC_MERGE_SCHEMAS: Final[Mapping[str, MergeSchema]] = {
    "pods": _schema(spec=_POD_SPEC, status=_POD_STATUS),
    "persistentvolumeclaims": _schema(status=_WITH_CONDITIONS),
    "persistentvolumes": _schema(),
    "namespaces": _schema(status=_WITH_CONDITIONS),
    "services": _schema(spec=_fields(ports=_by("port")), status=_WITH_CONDITIONS),
    "secrets": _schema(),
    "configmaps": _schema(),
    "events": _schema(),
    "storageclasses.storage.k8s.io": _schema(),
    "roles.rbac.authorization.k8s.io": _schema(),
    "clusterroles.rbac.authorization.k8s.io": _schema(),
    "rolebindings.rbac.authorization.k8s.io": _schema(),
    "clusterrolebindings.rbac.authorization.k8s.io": _schema(),
    "customresourcedefinitions.apiextensions.k8s.io": _schema(),
}


def strategic_merge_schema(resource: str) -> MergeSchema | None:
    """The merge schema of a built-in resource; None (strategic merge refused) for the rest."""
    return STRATEGIC_MERGE_SCHEMAS.get(resource)


def allows_strategic_merge(resource: str) -> bool:
    return resource in STRATEGIC_MERGE_SCHEMAS


def accepted_patch_types(resource: str) -> tuple[str, ...]:
    """The PATCH content types the resource accepts, in the order the 415 message lists them."""
    if allows_strategic_merge(resource):
        return (JSON_PATCH, MERGE_PATCH, STRATEGIC_MERGE_PATCH)
    return (JSON_PATCH, MERGE_PATCH)


_PATCH_KEY = "$patch"
_RETAIN_KEYS = "$retainKeys"
_SET_ORDER = "$setElementOrder/"
_DELETE_FROM = "$deleteFromPrimitiveList/"


class _Deleted:
    """Marker: the patch deletes this value (`$patch: delete` on a map)."""


_DELETED: Final = _Deleted()


def apply_strategic_merge_patch(obj: Obj, patch: Any, merge_keys: MergeSchema | None) -> Obj:
    """Apply a strategic merge patch; `merge_keys` is the resource's schema (None: all default)."""
    if not isinstance(patch, dict):
        raise BadRequest("a strategic merge patch must be a JSON object")
    merged = _merge_map(_clone(obj), patch, merge_keys or {})
    return {} if isinstance(merged, _Deleted) else merged


def _directive(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if value not in ("replace", "merge", "delete"):
        raise BadRequest(f"unknown patch type {json.dumps(value)} in {where}")
    return str(value)


def _merge_map(original: Obj, patch: Obj, schema: Mapping[str, FieldStrategy]) -> Obj | _Deleted:
    """Merge `patch` into `original` (owned by the caller, changed in place)."""
    directive = _directive(patch.get(_PATCH_KEY), "map")
    if directive == "delete":
        return _DELETED
    if directive == "replace":
        # The map is taken as written; merging it into nothing still drops directives and nulls.
        rest = {k: v for k, v in patch.items() if k != _PATCH_KEY}
        return _merge_map({}, rest, schema)

    retain = patch.get(_RETAIN_KEYS)
    if retain is not None and (
        not isinstance(retain, list) or not all(isinstance(k, str) for k in retain)
    ):
        raise BadRequest("invalid patch format of retainKeys")

    # Deletions from sets come first so that the same patch can delete and add.
    for key, values in patch.items():
        if key.startswith(_DELETE_FROM):
            target = key[len(_DELETE_FROM) :]
            if not isinstance(values, list):
                raise BadRequest("invalid patch format of primitive list")
            current = original.get(target)
            if isinstance(current, list):
                original[target] = [x for x in current if not any(json_equal(x, v) for v in values)]

    for key, value in patch.items():
        if key.startswith("$"):
            if key in (_PATCH_KEY, _RETAIN_KEYS) or key.startswith((_SET_ORDER, _DELETE_FROM)):
                continue
            raise BadRequest(f"unknown strategic merge patch directive {json.dumps(key)}")
        if retain is not None and value is not None and key not in retain:
            raise Invalid(
                "patch content doesn't match retainKeys list",
                details={
                    "causes": [
                        {
                            "reason": "FieldValueInvalid",
                            "message": f'"{key}" is not in $retainKeys',
                            "field": "patch",
                        }
                    ]
                },
            )
        if value is None:
            original.pop(key, None)
            continue
        merged = _merge_value(original.get(key), value, schema.get(key, _DEFAULT))
        if isinstance(merged, _Deleted):
            original.pop(key, None)
        else:
            original[key] = merged

    for key, order in patch.items():
        if key.startswith(_SET_ORDER):
            target = key[len(_SET_ORDER) :]
            if not isinstance(order, list):
                raise BadRequest("invalid patch format of setElementOrder list")
            current = original.get(target)
            if isinstance(current, list):
                original[target] = _reorder(current, order, schema.get(target, _DEFAULT))

    if retain is not None:
        for key in [k for k in original if k not in retain]:
            del original[key]
    return original


def _merge_value(original: Any, value: Any, strategy: FieldStrategy) -> Any:
    if isinstance(value, dict):
        return _merge_map(original if isinstance(original, dict) else {}, value, strategy.fields)
    if isinstance(value, list):
        current = original if isinstance(original, list) else []
        if strategy.merge_key:
            return _merge_keyed_list(current, value, strategy.merge_key, strategy.fields)
        if strategy.merge_primitives:
            return _merge_set(current, value)
        return _literal_list(value, strategy.fields)
    return _clone(value)


def _literal_list(items: list[Any], fields: Mapping[str, FieldStrategy]) -> list[Any]:
    """A list taken as written, minus directive-only elements and directive keys."""
    out: list[Any] = []
    for item in items:
        if isinstance(item, dict):
            if _directive(item.get(_PATCH_KEY), "list") in ("replace", "delete"):
                continue
            merged = _merge_map({}, item, fields)
            if not isinstance(merged, _Deleted):
                out.append(merged)
        else:
            out.append(_clone(item))
    return out


def _merge_keyed_list(
    original: list[Any], patch: list[Any], key: str, fields: Mapping[str, FieldStrategy]
) -> list[Any]:
    if any(isinstance(e, dict) and e.get(_PATCH_KEY) == "replace" for e in patch):
        return _literal_list(patch, fields)
    result = list(original)
    for element in patch:
        if isinstance(element, list):
            raise Invalid("lists of lists are not supported")
        if not isinstance(element, dict):
            raise BadRequest(
                f"list element {json.dumps(element)} is not an object, but the list merges "
                f"by key {json.dumps(key)}"
            )
        if key not in element:
            raise BadRequest(
                f"map: {json.dumps(element)} does not contain declared merge key: {key}"
            )
        wanted = element[key]
        directive = _directive(element.get(_PATCH_KEY), "list element")
        if directive == "delete":
            # Every element with that key goes, as Kubernetes does with duplicates.
            result = [
                x for x in result if not (isinstance(x, dict) and json_equal(x.get(key), wanted))
            ]
            continue
        for i, existing in enumerate(result):
            if isinstance(existing, dict) and json_equal(existing.get(key), wanted):
                merged = _merge_map(existing, element, fields)
                if isinstance(merged, _Deleted):
                    del result[i]
                else:
                    result[i] = merged
                break
        else:
            merged = _merge_map({}, element, fields)
            if not isinstance(merged, _Deleted):
                result.append(merged)
    return result


def _merge_set(original: list[Any], patch: list[Any]) -> list[Any]:
    result = list(original)
    for value in patch:
        if isinstance(value, dict | list):
            raise BadRequest("invalid patch format of primitive list")
        if not any(json_equal(value, x) for x in result):
            result.append(value)
    return result


def _identity(item: Any, key: str | None) -> str | None:
    if key is not None:
        return json.dumps(item.get(key), sort_keys=True) if isinstance(item, dict) else None
    if isinstance(item, dict | list):
        return None
    return json.dumps(item)


def _reorder(current: list[Any], order: list[Any], strategy: FieldStrategy) -> list[Any]:
    """Put the elements named by `$setElementOrder` in that order; the rest keep their slots."""
    key = strategy.merge_key
    position: dict[str, int] = {}
    for i, entry in enumerate(order):
        ident = _identity(entry, key)
        if ident is None:
            raise BadRequest("invalid patch format of setElementOrder list")
        position.setdefault(ident, i)

    def rank(item: Any) -> int | None:
        ident = _identity(item, key)
        return position.get(ident) if ident is not None else None

    ordered = iter(sorted((x for x in current if rank(x) is not None), key=lambda x: rank(x) or 0))
    return [next(ordered) if rank(x) is not None else x for x in current]


# --- one entry point for the HTTP layer -------------------------------------------------------


def apply_patch(obj: Obj, content_type: str, patch: Any, *, resource: str) -> Obj:
    """Apply a decoded PATCH body of `content_type` to `obj` as the server does for `resource`.

    415 for an unknown type or for strategic merge on a resource without a merge schema
    (custom resources); the result must still be a JSON object.
    """
    media = content_type.split(";", 1)[0].strip().lower()
    result: Any
    if media == JSON_PATCH:
        result = apply_json_patch(obj, patch)
    elif media == MERGE_PATCH:
        result = apply_merge_patch(obj, patch)
    elif media == STRATEGIC_MERGE_PATCH and allows_strategic_merge(resource):
        result = apply_strategic_merge_patch(obj, patch, strategic_merge_schema(resource))
    else:
        raise UnsupportedMediaType.of(accepted_patch_types(resource))
    if not isinstance(result, dict):
        raise BadRequest("the patched document is not a JSON object")
    return result
