"""OpenAPI v3 schema handling for custom resources, as kube-apiserver does it for CRDs.

Owns: pruning of unknown fields, defaulting, and validation of an object against a CRD version's
`openAPIV3Schema`; the structural-schema check run when a CRD is created; and the object name
rules (DNS-1123 subdomain and label, DNS-1035 label) with Kubernetes' exact messages.

The order is Kubernetes' (`check_custom_resource`): prune unknown fields (recording their paths for
the `Warning: unknown field "spec.foo"` header, or for the 400 of `fieldValidation=Strict`), drop
nulls that the schema does not allow, apply defaults, then validate. Errors are `FieldError`s
shaped like apimachinery's `field.Error`: `str(err)` is what kubectl prints after "is invalid:",
and `err.to_cause()` is the `StatusCause` for the 422 `Status`.

Supported keywords: type (object, array, string, integer, number, boolean), nullable, required,
enum, format (date-time and date checked leniently; int32/int64 accepted as any integer, like
Kubernetes), minimum/maximum (+ exclusive), multipleOf, minLength/maxLength, pattern,
minItems/maxItems, items, minProperties/maxProperties, properties, additionalProperties (bool or
schema), default, allOf/anyOf/oneOf/not, x-kubernetes-int-or-string,
x-kubernetes-preserve-unknown-fields, x-kubernetes-embedded-resource (apiVersion/kind required,
metadata kept), x-kubernetes-list-type set/map (duplicates). CEL rules
(`x-kubernetes-validations`) are not evaluated.

`metadata`, `apiVersion` and `kind` of the resource itself are left to the caller: they are
never pruned here, and ObjectMeta validation is not done here (only the name helpers are).
Pure functions, no I/O; the only state is a cache of compiled patterns.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any, Literal

__all__ = [
    "DNS1035_LABEL_MAX_LENGTH",
    "DNS1123_LABEL_MAX_LENGTH",
    "DNS1123_SUBDOMAIN_MAX_LENGTH",
    "FieldError",
    "FieldErrorType",
    "FieldValidation",
    "SchemaResult",
    "apply_defaults",
    "check_custom_resource",
    "duplicate",
    "forbidden",
    "format_value",
    "invalid",
    "is_dns1035_label",
    "is_dns1123_label",
    "is_dns1123_subdomain",
    "not_supported",
    "prune",
    "required",
    "structural_errors",
    "too_long",
    "too_many",
    "type_invalid",
    "validate",
    "validate_object_name",
]

Schema = Mapping[str, Any]
FieldValidation = Literal["Ignore", "Warn", "Strict"]

PRESERVE = "x-kubernetes-preserve-unknown-fields"
INT_OR_STRING = "x-kubernetes-int-or-string"
EMBEDDED = "x-kubernetes-embedded-resource"
# Fields of the resource (and of embedded resources) that the schema does not own.
_RESOURCE_FIELDS = ("apiVersion", "kind", "metadata")


# ---- field errors ------------------------------------------------------------------------------


class FieldErrorType(StrEnum):
    """apimachinery's field.ErrorType, spelled as the `reason` of a StatusCause."""

    REQUIRED = "FieldValueRequired"
    INVALID = "FieldValueInvalid"
    NOT_SUPPORTED = "FieldValueNotSupported"
    TYPE_INVALID = "FieldValueTypeInvalid"
    TOO_LONG = "FieldValueTooLong"
    TOO_MANY = "FieldValueTooMany"
    DUPLICATE = "FieldValueDuplicate"
    FORBIDDEN = "FieldValueForbidden"


# What each type prints first in the message body (field.ErrorType.String()).
_TYPE_TEXT = {
    FieldErrorType.REQUIRED: "Required value",
    FieldErrorType.INVALID: "Invalid value",
    FieldErrorType.NOT_SUPPORTED: "Unsupported value",
    FieldErrorType.TYPE_INVALID: "Invalid value",
    FieldErrorType.TOO_LONG: "Too long",
    FieldErrorType.TOO_MANY: "Too many",
    FieldErrorType.DUPLICATE: "Duplicate value",
    FieldErrorType.FORBIDDEN: "Forbidden",
}


@dataclass(frozen=True, slots=True)
class FieldError:
    """One validation failure: `field` is a path like `spec.source.http.url` or `spec.x[0].y`;
    `message` is the body (`Required value`, `Unsupported value: "disk": supported values: ...`)."""

    field: str
    type: FieldErrorType
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"

    def to_cause(self) -> dict[str, str]:
        """The `StatusCause` Kubernetes puts in `Status.details.causes`."""
        return {"reason": str(self.type), "message": self.message, "field": self.field}


def _body(kind: FieldErrorType, value: Any, detail: str, *, show_value: bool = True) -> str:
    text = _TYPE_TEXT[kind]
    if show_value:
        text = f"{text}: {format_value(value)}"
    return f"{text}: {detail}" if detail else text


def required(field: str, detail: str = "") -> FieldError:
    return FieldError(
        field,
        FieldErrorType.REQUIRED,
        _body(FieldErrorType.REQUIRED, None, detail, show_value=False),
    )


def invalid(field: str, value: Any, detail: str) -> FieldError:
    return FieldError(field, FieldErrorType.INVALID, _body(FieldErrorType.INVALID, value, detail))


def type_invalid(field: str, value: Any, detail: str) -> FieldError:
    return FieldError(
        field, FieldErrorType.TYPE_INVALID, _body(FieldErrorType.TYPE_INVALID, value, detail)
    )


def not_supported(field: str, value: Any, supported: Iterable[str]) -> FieldError:
    quoted = ", ".join(json.dumps(s, ensure_ascii=False) for s in supported)
    detail = f"supported values: {quoted}" if quoted else ""
    return FieldError(
        field, FieldErrorType.NOT_SUPPORTED, _body(FieldErrorType.NOT_SUPPORTED, value, detail)
    )


def too_long(field: str, max_length: int) -> FieldError:
    unit = "byte" if max_length == 1 else "bytes"
    detail = f"may not be more than {max_length} {unit}" if max_length >= 0 else "value is too long"
    return FieldError(
        field,
        FieldErrorType.TOO_LONG,
        _body(FieldErrorType.TOO_LONG, None, detail, show_value=False),
    )


def too_many(field: str, actual: int, max_items: int) -> FieldError:
    detail = f"must have at most {max_items} items"
    return FieldError(
        field, FieldErrorType.TOO_MANY, _body(FieldErrorType.TOO_MANY, actual, detail)
    )


def duplicate(field: str, value: Any) -> FieldError:
    return FieldError(field, FieldErrorType.DUPLICATE, _body(FieldErrorType.DUPLICATE, value, ""))


def forbidden(field: str, detail: str) -> FieldError:
    return FieldError(
        field,
        FieldErrorType.FORBIDDEN,
        _body(FieldErrorType.FORBIDDEN, None, detail, show_value=False),
    )


def format_value(value: Any) -> str:
    """A value as Go's field.Error prints it: strings quoted, numbers and booleans bare, null as
    `"null"`. Objects and arrays are printed as JSON (Go prints its own struct syntax there)."""
    if value is None:
        return '"null"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _go_float(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def _go_float(value: float) -> str:
    """Go's %v for a float64 (%g with the shortest digits): 1.5, 100, 1e+06, 1.5e-05."""
    if math.isnan(value):
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    digits, exponent = _shortest(value)
    sign = "-" if value < 0 else ""
    nd = len(digits)
    point = nd + exponent  # position of the decimal point relative to the digits
    exp10 = point - 1
    # strconv uses the exponent form below 1e-4 and, for shortest digits, from 1e+06 up.
    if exp10 < -4 or exp10 >= 6:
        mantissa = digits[0] + ("." + digits[1:] if nd > 1 else "")
        return f"{sign}{mantissa}e{'-' if exp10 < 0 else '+'}{abs(exp10):02d}"
    if point <= 0:
        return f"{sign}0.{'0' * -point}{digits}"
    if point >= nd:
        return f"{sign}{digits}{'0' * (point - nd)}"
    return f"{sign}{digits[:point]}.{digits[point:]}"


def _shortest(value: float) -> tuple[str, int]:
    """Shortest round-tripping decimal digits of abs(value), and the exponent of the last digit."""
    if value == 0:
        return "0", 0
    parts = Decimal(repr(abs(value))).normalize().as_tuple()
    digits = "".join(str(d) for d in parts.digits)
    exponent = parts.exponent
    assert isinstance(exponent, int)
    return digits, exponent


# ---- paths -------------------------------------------------------------------------------------


def _child(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _index(path: str, i: int) -> str:
    return f"{path}[{i}]"


# ---- JSON typing -------------------------------------------------------------------------------


def _json_type(value: Any) -> str:
    """The OpenAPI type name of a decoded JSON value: what kube-openapi reports as actual type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, list | tuple):
        return "array"
    return type(value).__name__


def _type_matches(expected: str, value: Any) -> bool:
    actual = _json_type(value)
    if expected == actual:
        return True
    # A JSON number with no fraction (1.0) is an integer; any integer is a number.
    if expected == "integer" and actual == "number":
        return float(value).is_integer()
    return expected == "number" and actual == "integer"


def _json_equal(a: Any, b: Any) -> bool:
    """JSON equality: unlike Python's ==, true is not 1 and 1 is 1.0."""
    ta, tb = _json_type(a), _json_type(b)
    numeric = {"integer", "number"}
    if ta in numeric and tb in numeric:
        return bool(a == b)
    if ta != tb:
        return False
    if ta == "object":
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if ta == "array":
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _is_nullable(schema: Schema) -> bool:
    return bool(schema.get("nullable", False))


# ---- pruning and defaulting --------------------------------------------------------------------


def prune(obj: Any, schema: Schema, *, is_resource_root: bool = True) -> list[str]:
    """Remove, in place, every field the schema does not specify, and null values of fields that
    are not nullable and have no default (Kubernetes drops those silently before defaulting).

    Returns the paths of the removed unknown fields (`spec.foo`, `spec.list[0].bar`), in document
    order; dropped nulls are not reported, as in Kubernetes. At the resource root, and in
    embedded resources, `apiVersion`, `kind` and `metadata` are kept whatever the schema says.
    """
    pruned: list[str] = []
    _prune(obj, schema, "", pruned, root=is_resource_root)
    return pruned


def _prune(value: Any, schema: Schema, path: str, pruned: list[str], *, root: bool) -> None:
    if isinstance(value, dict):
        _prune_object(value, schema, path, pruned, root=root)
    elif isinstance(value, list):
        items = schema.get("items")
        if isinstance(items, Mapping):
            for i, item in enumerate(value):
                _prune(item, items, _index(path, i), pruned, root=False)


def _prune_object(
    value: dict[str, Any], schema: Schema, path: str, pruned: list[str], *, root: bool
) -> None:
    properties: Mapping[str, Schema] = schema.get("properties") or {}
    additional = schema.get("additionalProperties")
    preserve = bool(schema.get(PRESERVE, False))
    keep_resource_fields = root or bool(schema.get(EMBEDDED, False))
    for key in list(value):
        child = value[key]
        if keep_resource_fields and key in _RESOURCE_FIELDS and key not in properties:
            continue
        sub = properties.get(key)
        if sub is not None:
            if child is None and not _is_nullable(sub) and "default" not in sub:
                del value[key]
            elif keep_resource_fields and key == "metadata":
                # ObjectMeta of the resource belongs to the caller even when the schema names it.
                continue
            else:
                _prune(child, sub, _child(path, key), pruned, root=False)
        elif isinstance(additional, Mapping):
            _prune(child, additional, _child(path, key), pruned, root=False)
        elif additional is True or preserve:
            continue
        else:
            del value[key]
            pruned.append(_child(path, key))


def apply_defaults(obj: Any, schema: Schema) -> None:
    """Set, in place, the `default` of every specified field that is absent (or null without
    `nullable`), recursing into objects, arrays and maps, as Kubernetes defaults custom
    resources."""
    if isinstance(obj, dict):
        properties: Mapping[str, Schema] = schema.get("properties") or {}
        for key, sub in properties.items():
            if "default" in sub and (
                key not in obj or (obj[key] is None and not _is_nullable(sub))
            ):
                obj[key] = copy.deepcopy(sub["default"])
            if key in obj:
                apply_defaults(obj[key], sub)
        additional = schema.get("additionalProperties")
        if isinstance(additional, Mapping):
            for key, child in obj.items():
                if key not in properties:
                    apply_defaults(child, additional)
    elif isinstance(obj, list):
        items = schema.get("items")
        if isinstance(items, Mapping):
            for item in obj:
                apply_defaults(item, items)


# ---- validation --------------------------------------------------------------------------------


def validate(value: Any, schema: Schema, path: str = "") -> list[FieldError]:
    """Validate a (pruned, defaulted) value against a schema; `path` prefixes every field."""
    errors: list[FieldError] = []
    _validate(value, schema, path, errors)
    return errors


def _where(path: str) -> str:
    # kube-openapi names the value "<path> in body"; the root is "." there.
    return f"{path or '.'} in body"


def _validate(value: Any, schema: Schema, path: str, errors: list[FieldError]) -> None:
    if value is None:
        expected = _expected_type(schema)
        if expected and not _is_nullable(schema):
            errors.append(
                type_invalid(path, "null", f'{_where(path)} must be of type {expected}: "null"')
            )
        return
    expected = _expected_type(schema)
    if expected and not any(_type_matches(t, value) for t in expected.split(",")):
        actual = _json_type(value)
        errors.append(
            type_invalid(path, actual, f'{_where(path)} must be of type {expected}: "{actual}"')
        )
        return
    if isinstance(value, str):
        _validate_format(value, schema, path, errors)
    if "enum" in schema:
        _validate_enum(value, schema["enum"], path, errors)
    if isinstance(value, str):
        _validate_string(value, schema, path, errors)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        _validate_number(value, schema, path, errors)
    elif isinstance(value, list):
        _validate_array(value, schema, path, errors)
    elif isinstance(value, dict):
        _validate_object(value, schema, path, errors)
    _validate_junctors(value, schema, path, errors)


def _expected_type(schema: Schema) -> str:
    if schema.get(INT_OR_STRING):
        return "integer,string"
    declared = schema.get("type")
    return declared if isinstance(declared, str) else ""


_DATE_TIME = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:?\d{2})?", re.ASCII
)
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)


def _validate_format(value: str, schema: Schema, path: str, errors: list[FieldError]) -> None:
    fmt = schema.get("format")
    if fmt in ("date-time", "datetime"):
        ok = _DATE_TIME.fullmatch(value) is not None and _parses_as_datetime(value)
    elif fmt == "date":
        ok = _DATE.fullmatch(value) is not None and _parses_as_date(value)
    else:
        # int32, int64, byte, uuid, ...: accepted as Kubernetes does for the integer ones, and
        # leniently for the rest: the controllers that read them check what they need.
        return
    if not ok:
        errors.append(
            type_invalid(
                path, value, f"{_where(path)} must be of type {fmt}: {format_value(value)}"
            )
        )


def _parses_as_datetime(value: str) -> bool:
    text = value.replace("z", "Z").replace("t", "T")
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


def _parses_as_date(value: str) -> bool:
    try:
        date.fromisoformat(value)
    except ValueError:
        return False
    return True


def _validate_enum(value: Any, allowed: Any, path: str, errors: list[FieldError]) -> None:
    if not isinstance(allowed, list) or any(_json_equal(value, a) for a in allowed):
        return
    names = [a if isinstance(a, str) else json.dumps(a) for a in allowed]
    errors.append(not_supported(path, value, names))


def _go_anchors(pattern: str) -> str:
    r"""Rewrite Go (RE2) end anchors for Python: outside a character class, Go's `$` matches only
    at the end of the text (Python's also before a final newline) and Go's `\z` is Python's
    `\Z`."""
    out: list[str] = []
    in_class = False
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\" and i + 1 < len(pattern):
            pair = pattern[i : i + 2]
            out.append("\\Z" if pair == "\\z" and not in_class else pair)
            i += 2
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
            # A "]" right after "[" or "[^" is a literal member, not the end of the class.
            if pattern.startswith("]", i + 1) or pattern.startswith("^]", i + 1):
                end = i + (2 if pattern[i + 1] == "]" else 3)
                out.append(pattern[i:end])
                i = end
                continue
        elif char == "$":
            char = "\\Z"
        out.append(char)
        i += 1
    return "".join(out)


@functools.lru_cache(maxsize=512)
def _compile(pattern: str) -> re.Pattern[str] | None:
    try:
        # RE2's \d, \w, \s and \b are ASCII-only.
        return re.compile(_go_anchors(pattern), re.ASCII)
    except re.error:
        # An ECMA/RE2 construct Python lacks: the pattern is not enforced rather than refusing
        # every object (Kubernetes accepted the CRD, so the pattern itself is not the user's fault).
        return None


def _validate_string(value: str, schema: Schema, path: str, errors: list[FieldError]) -> None:
    max_length = schema.get("maxLength")
    if isinstance(max_length, int) and len(value) > max_length:
        errors.append(too_long(path, max_length))
    min_length = schema.get("minLength")
    if isinstance(min_length, int) and len(value) < min_length:
        detail = f"{_where(path)} should be at least {min_length} chars long"
        errors.append(invalid(path, value, detail))
    pattern = schema.get("pattern")
    if isinstance(pattern, str):
        compiled = _compile(pattern)
        if compiled is not None and compiled.search(value) is None:
            errors.append(invalid(path, value, f"{_where(path)} should match '{pattern}'"))


def _validate_number(value: float, schema: Schema, path: str, errors: list[FieldError]) -> None:
    minimum = schema.get("minimum")
    if isinstance(minimum, int | float):
        exclusive = bool(schema.get("exclusiveMinimum", False))
        if value < minimum or (exclusive and value == minimum):
            word = "greater than" if exclusive else "greater than or equal to"
            detail = f"{_where(path)} should be {word} {format_value(minimum)}"
            errors.append(invalid(path, value, detail))
    maximum = schema.get("maximum")
    if isinstance(maximum, int | float):
        exclusive = bool(schema.get("exclusiveMaximum", False))
        if value > maximum or (exclusive and value == maximum):
            word = "less than" if exclusive else "less than or equal to"
            detail = f"{_where(path)} should be {word} {format_value(maximum)}"
            errors.append(invalid(path, value, detail))
    multiple = schema.get("multipleOf")
    if isinstance(multiple, int | float) and multiple > 0:
        quotient = Decimal(repr(value)) / Decimal(repr(multiple))
        if quotient != quotient.to_integral_value():
            detail = f"{_where(path)} should be a multiple of {format_value(multiple)}"
            errors.append(invalid(path, value, detail))


def _validate_array(value: list[Any], schema: Schema, path: str, errors: list[FieldError]) -> None:
    max_items = schema.get("maxItems")
    if isinstance(max_items, int) and len(value) > max_items:
        errors.append(too_many(path, len(value), max_items))
    min_items = schema.get("minItems")
    if isinstance(min_items, int) and len(value) < min_items:
        detail = f"{_where(path)} should have at least {min_items} items"
        errors.append(invalid(path, len(value), detail))
    items = schema.get("items")
    if isinstance(items, Mapping):
        for i, item in enumerate(value):
            _validate(item, items, _index(path, i), errors)
    list_type = schema.get("x-kubernetes-list-type")
    if list_type == "set":
        _check_unique(value, [(i, item) for i, item in enumerate(value)], path, errors)
    elif list_type == "map":
        keys = [k for k in schema.get("x-kubernetes-list-map-keys") or [] if isinstance(k, str)]
        entries = [
            (i, {k: item.get(k) for k in keys})
            for i, item in enumerate(value)
            if isinstance(item, dict)
        ]
        _check_unique(value, entries, path, errors)


def _check_unique(
    value: list[Any], entries: Sequence[tuple[int, Any]], path: str, errors: list[FieldError]
) -> None:
    seen: list[Any] = []
    for i, key in entries:
        if any(_json_equal(key, s) for s in seen):
            errors.append(duplicate(_index(path, i), key))
        else:
            seen.append(key)


def _validate_object(
    value: dict[str, Any], schema: Schema, path: str, errors: list[FieldError]
) -> None:
    max_props = schema.get("maxProperties")
    if isinstance(max_props, int) and len(value) > max_props:
        errors.append(too_many(path, len(value), max_props))
    min_props = schema.get("minProperties")
    if isinstance(min_props, int) and len(value) < min_props:
        detail = f"{_where(path)} should have at least {min_props} properties"
        errors.append(invalid(path, len(value), detail))
    if schema.get(EMBEDDED):
        for key in ("apiVersion", "kind"):
            if key not in value:
                errors.append(required(_child(path, key), "must not be empty"))
    for key in schema.get("required") or []:
        if key not in value:
            errors.append(required(_child(path, key)))
    properties: Mapping[str, Schema] = schema.get("properties") or {}
    additional = schema.get("additionalProperties")
    for key, child in value.items():
        sub = properties.get(key)
        if sub is not None:
            _validate(child, sub, _child(path, key), errors)
        elif isinstance(additional, Mapping):
            _validate(child, additional, _child(path, key), errors)
        elif additional is False and not (
            path == "" and key in _RESOURCE_FIELDS
        ):  # only reachable when the caller skipped pruning
            detail = f"{_child(path, key)} in body is a forbidden property"
            errors.append(invalid(path, key, detail))


def _only_int_or_string(branches: Sequence[Schema]) -> bool:
    """The `anyOf: [{type: integer}, {type: string}]` that travels with x-kubernetes-int-or-string
    restates the type check already done; evaluating it again would only duplicate errors."""
    return all(set(b) == {"type"} and b["type"] in ("integer", "string") for b in branches)


def _fewest(results: Sequence[list[FieldError]]) -> list[FieldError]:
    """The errors of the branch that came closest to passing (kube-openapi merges those)."""
    best = results[0]
    for result in results[1:]:
        if len(result) < len(best):
            best = result
    return best


def _validate_junctors(value: Any, schema: Schema, path: str, errors: list[FieldError]) -> None:
    for sub in schema.get("allOf") or []:
        _validate(value, sub, path, errors)
    any_of = schema.get("anyOf") or []
    if any_of and not (schema.get(INT_OR_STRING) and _only_int_or_string(any_of)):
        results = [validate(value, sub, path) for sub in any_of]
        if all(results):
            detail = f"{_where(path)} must validate at least one schema (anyOf)"
            errors.append(invalid(path, value, detail))
            errors.extend(_fewest(results))
    one_of = schema.get("oneOf") or []
    if one_of:
        results = [validate(value, sub, path) for sub in one_of]
        passed = sum(1 for r in results if not r)
        if passed != 1:
            found = "Found none valid" if passed == 0 else f"Found {passed} valid alternatives"
            detail = f"{_where(path)} must validate one and only one schema (oneOf). {found}"
            errors.append(invalid(path, value, detail))
            if passed == 0:
                errors.extend(_fewest(results))
    not_schema = schema.get("not")
    if isinstance(not_schema, Mapping) and not validate(value, not_schema, path):
        errors.append(invalid(path, value, f"{_where(path)} must not validate the schema (not)"))


# ---- the whole pipeline ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SchemaResult:
    """What `check_custom_resource` found. `errors` make a 422 Invalid; `strict_error`, when set,
    makes a 400 BadRequest (checked first, as decoding comes before validation)."""

    errors: tuple[FieldError, ...]
    unknown_fields: tuple[str, ...]
    field_validation: FieldValidation = "Warn"

    @property
    def warnings(self) -> tuple[str, ...]:
        """Texts for `Warning: 299 - "<text>"` headers (fieldValidation=Warn, kubectl's default
        before it asks for Strict)."""
        if self.field_validation != "Warn":
            return ()
        return tuple(f'unknown field "{p}"' for p in self.unknown_fields)

    @property
    def strict_error(self) -> str | None:
        if self.field_validation != "Strict" or not self.unknown_fields:
            return None
        listed = ", ".join(f'unknown field "{p}"' for p in self.unknown_fields)
        return f"strict decoding error: {listed}"

    @property
    def ok(self) -> bool:
        return not self.errors and self.strict_error is None


def check_custom_resource(
    obj: dict[str, Any], schema: Schema, *, field_validation: FieldValidation = "Warn"
) -> SchemaResult:
    """Prune, default and validate a custom resource in place, in Kubernetes' order.

    `obj` is the whole object (apiVersion, kind, metadata, spec, status); `schema` is the CRD
    version's `openAPIV3Schema`. The object is always pruned: the caller stores it only if
    `result.ok`, and turns `strict_error` into a 400 and `errors` into a 422.
    """
    unknown = prune(obj, schema, is_resource_root=True)
    apply_defaults(obj, schema)
    errors = validate(obj, schema)
    return SchemaResult(tuple(errors), tuple(unknown), field_validation)


# ---- structural schemas ------------------------------------------------------------------------

_JUNCTORS = ("allOf", "anyOf", "oneOf")
# Keywords a v1 CRD schema may not use at all.
_UNSUPPORTED = ("$ref", "definitions", "dependencies", "patternProperties", "additionalItems", "id")
# Keywords that may not appear inside allOf/anyOf/oneOf/not of a structural schema.
_NOT_IN_JUNCTOR = (
    "type",
    "description",
    "default",
    "additionalProperties",
    "nullable",
    PRESERVE,
    EMBEDDED,
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
)


def structural_errors(
    schema: Any, path: str = "spec.validation.openAPIV3Schema"
) -> list[FieldError]:
    """Why a CRD schema is not structural (empty when it is), as kube-apiserver refuses a CRD:
    every specified field and array item has a type unless it is int-or-string or keeps unknown
    fields; junctors only add value checks; root metadata restricts name/generateName only."""
    errors: list[FieldError] = []
    if not isinstance(schema, Mapping):
        return [required(path, "schemas are required")]
    if "type" not in schema:
        errors.append(required(_child(path, "type"), "must not be empty at the root"))
    elif schema["type"] != "object":
        errors.append(invalid(_child(path, "type"), schema["type"], "must be object at the root"))
    _structural(schema, path, errors, in_junctor=False, need_type=None)
    metadata = (schema.get("properties") or {}).get("metadata")
    if isinstance(metadata, Mapping):
        _structural_metadata(metadata, f"{path}.properties[metadata]", errors)
    return errors


def _structural(
    node: Any, path: str, errors: list[FieldError], *, in_junctor: bool, need_type: str | None
) -> None:
    if not isinstance(node, Mapping):
        errors.append(invalid(path, node, "must be a schema object"))
        return
    for key in _UNSUPPORTED:
        if key in node:
            errors.append(forbidden(_child(path, key), f"{key} is not supported"))
    if node.get("uniqueItems") is True:
        errors.append(
            forbidden(
                _child(path, "uniqueItems"),
                "uniqueItems cannot be set to true since the runtime complexity becomes quadratic",
            )
        )
    int_or_string = node.get(INT_OR_STRING) is True
    preserve = node.get(PRESERVE)
    if in_junctor:
        for key in _NOT_IN_JUNCTOR:
            if key in node:
                errors.append(forbidden(_child(path, key), "must be empty to be structural"))
    else:
        if preserve is not None and preserve is not True:
            errors.append(invalid(_child(path, PRESERVE), preserve, "must be true or undefined"))
        if need_type and "type" not in node and not int_or_string and preserve is not True:
            errors.append(required(_child(path, "type"), f"must not be empty for {need_type}"))
        node_type = node.get("type")
        if int_or_string and node_type is not None:
            errors.append(
                invalid(
                    _child(path, "type"), node_type, f"must be empty if {INT_OR_STRING} is true"
                )
            )
        if node_type is not None and node_type not in (
            "object",
            "array",
            "string",
            "integer",
            "number",
            "boolean",
        ):
            errors.append(
                not_supported(
                    _child(path, "type"),
                    node_type,
                    ["array", "boolean", "integer", "number", "object", "string"],
                )
            )
        if node_type == "array" and "items" not in node:
            errors.append(required(_child(path, "items"), "must be specified"))
        if node.get(EMBEDDED) is True:
            if node_type != "object":
                errors.append(
                    invalid(
                        _child(path, "type"),
                        node_type or "",
                        f"must be object if {EMBEDDED} is true",
                    )
                )
            if preserve is not True and not node.get("properties"):
                errors.append(
                    required(
                        _child(path, "properties"),
                        f"must not be empty if {EMBEDDED} is true without {PRESERVE}",
                    )
                )
    additional = node.get("additionalProperties")
    if additional is not None and node.get("properties"):
        errors.append(
            forbidden(
                _child(path, "additionalProperties"),
                "additionalProperties and properties are mutual exclusive",
            )
        )
    if additional is False:
        errors.append(
            forbidden(_child(path, "additionalProperties"), "must not be false in a CRD schema")
        )
    properties = node.get("properties") or {}
    if not isinstance(properties, Mapping):
        errors.append(invalid(_child(path, "properties"), properties, "must be a map of schemas"))
        properties = {}
    for key, sub in properties.items():
        _structural(
            sub,
            f"{path}.properties[{key}]",
            errors,
            in_junctor=in_junctor,
            need_type="specified object fields",
        )
    if isinstance(additional, Mapping):
        _structural(
            additional,
            _child(path, "additionalProperties"),
            errors,
            in_junctor=in_junctor,
            need_type="specified object fields",
        )
    items = node.get("items")
    if items is not None:
        if isinstance(items, list):
            errors.append(
                forbidden(_child(path, "items"), "items must be a schema object and not an array")
            )
        else:
            _structural(
                items,
                _child(path, "items"),
                errors,
                in_junctor=in_junctor,
                need_type="specified array items",
            )
    for junctor in _JUNCTORS:
        branches = node.get(junctor)
        if branches is None:
            continue
        if not isinstance(branches, list):
            errors.append(invalid(_child(path, junctor), branches, "must be a list of schemas"))
            continue
        allowed_types = int_or_string and junctor == "anyOf" and _only_int_or_string(branches)
        for i, branch in enumerate(branches):
            if allowed_types:
                continue
            branch_path = f"{path}.{junctor}[{i}]"
            _structural(branch, branch_path, errors, in_junctor=True, need_type=None)
            _outside(branch, node, branch_path, errors)
    not_node = node.get("not")
    if not_node is not None:
        _structural(not_node, _child(path, "not"), errors, in_junctor=True, need_type=None)
        _outside(not_node, node, _child(path, "not"), errors)


def _outside(branch: Any, node: Mapping[str, Any], path: str, errors: list[FieldError]) -> None:
    """Fields that a junctor branch constrains must also be specified outside of it."""
    if not isinstance(branch, Mapping):
        return
    outer = node.get("properties") or {}
    for key in branch.get("properties") or {}:
        if key not in outer:
            errors.append(
                required(
                    f"{path}.properties[{key}]",
                    "must be specified also outside of the logical junctor",
                )
            )
    if "items" in branch and "items" not in node:
        errors.append(
            required(_child(path, "items"), "must be specified also outside of the logical junctor")
        )


def _structural_metadata(metadata: Mapping[str, Any], path: str, errors: list[FieldError]) -> None:
    extra = set(metadata) - {"type", "properties", "description"}
    props = metadata.get("properties") or {}
    if extra or set(props) - {"name", "generateName"}:
        errors.append(
            forbidden(
                path,
                "must not specify anything other than name and generateName, but metadata is "
                "implicitly specified",
            )
        )
    if metadata.get("type") not in (None, "object"):
        errors.append(invalid(_child(path, "type"), metadata.get("type"), "must be object"))


# ---- object names ------------------------------------------------------------------------------

DNS1123_SUBDOMAIN_MAX_LENGTH = 253
DNS1123_LABEL_MAX_LENGTH = 63
DNS1035_LABEL_MAX_LENGTH = 63

_DNS1123_LABEL_FMT = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN_FMT = _DNS1123_LABEL_FMT + "(\\." + _DNS1123_LABEL_FMT + ")*"
_DNS1035_LABEL_FMT = "[a-z]([-a-z0-9]*[a-z0-9])?"
# fullmatch, never "$": Python's "$" also matches before a trailing newline, Go's does not.
_DNS1123_LABEL_RE = re.compile(_DNS1123_LABEL_FMT)
_DNS1123_SUBDOMAIN_RE = re.compile(_DNS1123_SUBDOMAIN_FMT)
_DNS1035_LABEL_RE = re.compile(_DNS1035_LABEL_FMT)


def _regex_error(msg: str, fmt: str, *examples: str) -> str:
    # Same assembly as apimachinery's RegexError, including its ",  or" for two examples.
    if not examples:
        return f"{msg} (regex used for validation is '{fmt}')"
    text = msg + " (e.g. "
    for i, example in enumerate(examples):
        if i > 0:
            text += " or "
        text += f"'{example}', "
    return text + f"regex used for validation is '{fmt}')"


def _max_len_error(length: int) -> str:
    return f"must be no more than {length} characters"


def is_dns1123_subdomain(value: str) -> list[str]:
    """Kubernetes' IsDNS1123Subdomain: the messages for a value that is not one (empty if it is)."""
    errs: list[str] = []
    if len(value) > DNS1123_SUBDOMAIN_MAX_LENGTH:
        errs.append(_max_len_error(DNS1123_SUBDOMAIN_MAX_LENGTH))
    if _DNS1123_SUBDOMAIN_RE.fullmatch(value) is None:
        errs.append(
            _regex_error(
                "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric "
                "characters, '-' or '.', and must start and end with an alphanumeric character",
                _DNS1123_SUBDOMAIN_FMT,
                "example.com",
            )
        )
    return errs


def is_dns1123_label(value: str) -> list[str]:
    """Kubernetes' IsDNS1123Label (namespaces, services, ...)."""
    errs: list[str] = []
    if len(value) > DNS1123_LABEL_MAX_LENGTH:
        errs.append(_max_len_error(DNS1123_LABEL_MAX_LENGTH))
    if _DNS1123_LABEL_RE.fullmatch(value) is None:
        errs.append(
            _regex_error(
                "a lowercase RFC 1123 label must consist of lower case alphanumeric characters "
                "or '-', and must start and end with an alphanumeric character",
                _DNS1123_LABEL_FMT,
                "my-name",
                "123-abc",
            )
        )
    return errs


def is_dns1035_label(value: str) -> list[str]:
    """Kubernetes' IsDNS1035Label (CRD plural and singular names, version names)."""
    errs: list[str] = []
    if len(value) > DNS1035_LABEL_MAX_LENGTH:
        errs.append(_max_len_error(DNS1035_LABEL_MAX_LENGTH))
    if _DNS1035_LABEL_RE.fullmatch(value) is None:
        errs.append(
            _regex_error(
                "a DNS-1035 label must consist of lower case alphanumeric characters or '-', "
                "start with an alphabetic character, and end with an alphanumeric character",
                _DNS1035_LABEL_FMT,
                "my-name",
                "abc-123",
            )
        )
    return errs


def validate_object_name(
    name: str | None, *, label: bool = False, path: str = "metadata.name"
) -> list[FieldError]:
    """ObjectMeta name rules: required, then a DNS-1123 subdomain (most kinds, ≤253) or label
    (`label=True`: namespaces and the like, ≤63). Callers that accept generateName check that
    first and pass the generated name here."""
    if not name:
        return [required(path, "name or generateName is required")]
    messages = is_dns1123_label(name) if label else is_dns1123_subdomain(name)
    return [invalid(path, name, msg) for msg in messages]
