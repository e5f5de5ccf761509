"""Label and field selectors: parsed once per request, matched against many objects.

Label selectors follow Kubernetes' grammar (k8s.io/apimachinery `labels.Parse`):

    selector    := requirement ("," requirement)*          comma means AND
    requirement := key | "!" key                           exists / does not exist
                 | key ("=" | "==" | "!=") value
                 | key ("in" | "notin") "(" value ("," value)* ")"
                 | key (">" | "<") integer

`!=` and `notin` also match objects that do not carry the key, as in Kubernetes. Keys are
qualified names (`[prefix/]name`), values are label values; a bad selector is a `BadRequest`
with the reason in the message. `LabelSelector.from_struct` builds the same thing from a
`metav1.LabelSelector` (`matchLabels` / `matchExpressions`), as found in PVC or Service specs.

Field selectors are `path=value`, `path==value` or `path!=value` terms joined by commas, with
`\\`, `\\,` and `\\=` escapes in values. Any dotted path works (`metadata.name`, `status.phase`,
`spec.nodeName`); a missing field compares as "". Which paths a resource accepts is the HTTP
layer's policy (`FieldSelector.fields` tells it what was asked), not this module's.

Called by the store (list, watch filtering) and the HTTP layer. No I/O, no knowledge of kinds.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from cdi.kubeapi.errors import BadRequest

LabelOp = Literal["=", "!=", "in", "notin", "exists", "!", "gt", "lt"]
FieldOp = Literal["=", "!="]

_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_INTEGER = re.compile(r"^-?[0-9]+$")
#: Characters that end an identifier in the label selector lexer.
_SPECIAL = "=!(),<>"


def _key_problem(key: str) -> str | None:
    """Why `key` is not a qualified name, or None when it is."""
    prefix, slash, name = key.rpartition("/")
    if slash and not prefix:
        return "prefix part must be non-empty"
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return "prefix part must be a lowercase RFC 1123 subdomain"
    if not name:
        return "name part must be non-empty"
    if len(name) > 63:
        return "name part must be no more than 63 characters"
    if not _NAME.match(name):
        return (
            "name part must consist of alphanumeric characters, '-', '_' or '.', "
            "and must start and end with an alphanumeric character"
        )
    return None


def _value_problem(value: str) -> str | None:
    if len(value) > 63:
        return "must be no more than 63 characters"
    if value and not _NAME.match(value):
        return (
            "a valid label must be an empty string or consist of alphanumeric characters, "
            "'-', '_' or '.', and must start and end with an alphanumeric character"
        )
    return None


@dataclass(frozen=True, slots=True)
class Requirement:
    """One AND-ed term of a label selector. `values` is empty for exists / does-not-exist."""

    key: str
    op: LabelOp
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key, "")
        match self.op:
            case "exists":
                return present
            case "!":
                return not present
            case "=" | "in":
                return present and value in self.values
            case "!=" | "notin":
                return not present or value not in self.values
            case "gt" | "lt":
                if not present or not _INTEGER.match(value):
                    return False
                bound = int(self.values[0])
                return int(value) > bound if self.op == "gt" else int(value) < bound

    def __str__(self) -> str:
        match self.op:
            case "exists":
                return self.key
            case "!":
                return f"!{self.key}"
            case "=" | "!=":
                return f"{self.key}{self.op}{self.values[0]}"
            case "in" | "notin":
                return f"{self.key} {self.op} ({','.join(self.values)})"
            case "gt":
                return f"{self.key}>{self.values[0]}"
            case "lt":
                return f"{self.key}<{self.values[0]}"


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """A parsed label selector; the empty selector matches everything."""

    requirements: tuple[Requirement, ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> LabelSelector:
        if text is None or not text.strip():
            return cls()
        return cls(tuple(_LabelParser(text).parse()))

    @classmethod
    def from_struct(cls, selector: Mapping[str, Any] | None) -> LabelSelector:
        """From a `metav1.LabelSelector`; None or `{}` selects everything, as in Kubernetes."""
        if not selector:
            return cls()
        reqs: list[Requirement] = []
        match_labels = selector.get("matchLabels") or {}
        if not isinstance(match_labels, Mapping):
            raise BadRequest("matchLabels must be an object of label keys to values")
        for key, value in sorted(match_labels.items()):
            reqs.append(_checked(str(key), "=", (str(value),)))
        for expr in selector.get("matchExpressions") or []:
            if not isinstance(expr, Mapping):
                raise BadRequest("each matchExpressions entry must be an object")
            key = str(expr.get("key", ""))
            operator = expr.get("operator")
            values = tuple(str(v) for v in expr.get("values") or [])
            if operator in ("In", "NotIn"):
                if not values:
                    raise BadRequest(
                        f"{key}: values: Required value: must be specified when `operator` "
                        "is 'In' or 'NotIn'"
                    )
                reqs.append(_checked(key, "in" if operator == "In" else "notin", values))
            elif operator in ("Exists", "DoesNotExist"):
                if values:
                    raise BadRequest(
                        f"{key}: values: Forbidden: may not be specified when `operator` is "
                        "'Exists' or 'DoesNotExist'"
                    )
                reqs.append(_checked(key, "exists" if operator == "Exists" else "!", ()))
            else:
                raise BadRequest(f'{key}: operator: Unsupported value: "{operator}"')
        return cls(tuple(reqs))

    @property
    def empty(self) -> bool:
        return not self.requirements

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        labels = labels or {}
        return all(r.matches(labels) for r in self.requirements)

    def matches_object(self, obj: Mapping[str, Any]) -> bool:
        if not self.requirements:
            return True
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return self.matches(labels)

    def __str__(self) -> str:
        return ",".join(str(r) for r in self.requirements)


def _checked(key: str, op: LabelOp, values: tuple[str, ...]) -> Requirement:
    problem = _key_problem(key)
    if problem:
        raise BadRequest(f'invalid label key "{key}": {problem}')
    if op in ("gt", "lt"):
        if len(values) != 1 or not _INTEGER.match(values[0]):
            raise BadRequest("for 'gt', 'lt' operators, exactly one integer value is required")
    else:
        for value in values:
            problem = _value_problem(value)
            if problem:
                raise BadRequest(f'invalid label value: "{value}": {problem}')
    return Requirement(key, op, values)


_Token = tuple[str, str]  # (kind, text); kind is "id", "op" or "end"


def _lex(text: str) -> Iterator[_Token]:
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
        elif text.startswith(("==", "!="), i):
            yield ("op", text[i : i + 2])
            i += 2
        elif ch in _SPECIAL:
            yield ("op", ch)
            i += 1
        else:
            start = i
            while i < n and not text[i].isspace() and text[i] not in _SPECIAL:
                i += 1
            yield ("id", text[start:i])
    yield ("end", "")


class _LabelParser:
    """A small recursive-descent parser over `_lex` tokens, one requirement at a time."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = list(_lex(text))
        self.pos = 0

    def _peek(self) -> _Token:
        return self.tokens[self.pos]

    def _next(self) -> _Token:
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def _fail(self, found: _Token, expected: str) -> BadRequest:
        shown = found[1] if found[0] != "end" else ""
        return BadRequest(
            f'unable to parse requirement: found "{shown}", expected: {expected} '
            f'(in label selector "{self.text}")'
        )

    def parse(self) -> list[Requirement]:
        reqs = [self._requirement()]
        while True:
            token = self._next()
            if token[0] == "end":
                return reqs
            if token != ("op", ","):
                raise self._fail(token, "','")
            reqs.append(self._requirement())

    def _requirement(self) -> Requirement:
        token = self._next()
        if token == ("op", "!"):
            negated = self._next()
            if negated[0] != "id":
                raise self._fail(negated, "identifier")
            return _checked(negated[1], "!", ())
        if token[0] != "id":
            raise self._fail(token, "identifier")
        key = token[1]
        op = self._peek()
        if op[0] == "end" or op == ("op", ","):
            return _checked(key, "exists", ())
        self._next()
        if op[0] == "op" and op[1] in ("=", "==", "!="):
            return _checked(key, "!=" if op[1] == "!=" else "=", (self._value(),))
        if op[0] == "op" and op[1] in (">", "<"):
            return _checked(key, "gt" if op[1] == ">" else "lt", (self._value(),))
        if op[0] == "id" and op[1] in ("in", "notin"):
            values = self._value_set()
            if not values:
                raise BadRequest(
                    f"for 'in', 'notin' operators, values set can't be empty "
                    f'(in label selector "{self.text}")'
                )
            return _checked(key, "in" if op[1] == "in" else "notin", values)
        raise self._fail(op, "one of ['!=' '=' '==' 'in' 'notin' '<' '>']")

    def _value(self) -> str:
        # An empty value (`key=`) is allowed: it selects objects whose label is "".
        token = self._peek()
        if token[0] == "id":
            self._next()
            return token[1]
        if token[0] == "end" or token == ("op", ","):
            return ""
        raise self._fail(token, "identifier")

    def _value_set(self) -> tuple[str, ...]:
        token = self._next()
        if token != ("op", "("):
            raise self._fail(token, "'('")
        values: list[str] = []
        if self._peek() == ("op", ")"):
            self._next()
            return ()
        while True:
            token = self._peek()
            if token[0] == "id":
                self._next()
                values.append(token[1])
            else:
                values.append("")  # `in (a,)` carries an empty value, as Kubernetes reads it
            token = self._next()
            if token == ("op", ")"):
                return tuple(dict.fromkeys(values))
            if token != ("op", ","):
                raise self._fail(token, "',' or ')'")


@dataclass(frozen=True, slots=True)
class FieldTerm:
    path: str
    op: FieldOp
    value: str

    def matches(self, obj: Mapping[str, Any]) -> bool:
        equal = field_value(obj, self.path) == self.value
        return equal if self.op == "=" else not equal

    def __str__(self) -> str:
        escaped = self.value.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=")
        return f"{self.path}{self.op}{escaped}"


@dataclass(frozen=True, slots=True)
class FieldSelector:
    """A parsed field selector; the empty selector matches everything."""

    terms: tuple[FieldTerm, ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> FieldSelector:
        if text is None or not text.strip():
            return cls()
        return cls(tuple(_field_term(part, text) for part in _split_unescaped(text, ",")))

    @property
    def empty(self) -> bool:
        return not self.terms

    @property
    def fields(self) -> frozenset[str]:
        """The paths the selector looks at, for the caller's per-resource allow-list."""
        return frozenset(t.path for t in self.terms)

    def exact(self, path: str) -> str | None:
        """The value `path` must equal, when a `path=value` term requires one (for pushdown)."""
        for term in self.terms:
            if term.path == path and term.op == "=":
                return term.value
        return None

    def matches(self, obj: Mapping[str, Any]) -> bool:
        return all(t.matches(obj) for t in self.terms)

    def __str__(self) -> str:
        return ",".join(str(t) for t in self.terms)


def field_value(obj: Mapping[str, Any], path: str) -> str:
    """The value at a dotted path rendered as a field selector compares it ("" when missing)."""
    node: Any = obj
    for part in path.split("."):
        if not isinstance(node, Mapping):
            return ""
        node = node.get(part)
    if node is None or isinstance(node, Mapping | list):
        return ""
    if isinstance(node, bool):
        return "true" if node else "false"
    return str(node)


def _split_unescaped(text: str, sep: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    escaped = False
    for ch in text:
        if escaped:
            current.append("\\" + ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == sep:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if escaped:
        current.append("\\")
    parts.append("".join(current))
    return parts


def _field_term(term: str, whole: str) -> FieldTerm:
    # The first operator in the term wins, trying the two-character ones first at each position,
    # so that `a!=b` is "!=" and not a key "a!" with "=".
    i = 0
    while i < len(term):
        if term[i] == "\\":
            i += 2  # an escaped character is never an operator
            continue
        for op in ("!=", "==", "="):
            if term.startswith(op, i):
                path = term[:i].strip()
                if not path:
                    raise BadRequest(f'invalid field selector "{whole}": empty field in "{term}"')
                value = _unescape(term[i + len(op) :], whole)
                return FieldTerm(path, "!=" if op == "!=" else "=", value)
        i += 1
    raise BadRequest(
        f"invalid selector: '{whole}'; can't understand '{term}' "
        "(expected field=value, field==value or field!=value)"
    )


def _unescape(value: str, whole: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "\\":
            if i + 1 >= len(value) or value[i + 1] not in "\\,=":
                raise BadRequest(
                    f'invalid field selector "{whole}": invalid escape sequence in "{value}"'
                )
            out.append(value[i + 1])
            i += 2
            continue
        if ch in ",=":
            raise BadRequest(
                f'invalid field selector "{whole}": unescaped "{ch}" in value "{value}"'
            )
        out.append(ch)
        i += 1
    return "".join(out)


def parse_label_selector(text: str | None) -> LabelSelector:
    return LabelSelector.parse(text)


def parse_field_selector(text: str | None) -> FieldSelector:
    return FieldSelector.parse(text)
