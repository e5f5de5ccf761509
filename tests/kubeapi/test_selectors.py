"""Label and field selectors: Kubernetes' grammar, its matching rules, and clear 400s."""

from __future__ import annotations

from typing import Any

import pytest

from cdi.kubeapi.errors import BadRequest
from cdi.kubeapi.selectors import FieldSelector, LabelSelector, field_value

LABELS = {"app": "web", "tier": "front", "version": "3", "example.com/owner": "team-a"}


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("", True),
        ("   ", True),
        ("app=web", True),
        ("app==web", True),
        ("app = web", True),
        ("app=db", False),
        ("app!=db", True),
        ("app!=web", False),
        ("missing!=x", True),  # != matches objects without the key, as in Kubernetes
        ("app", True),
        ("missing", False),
        ("!missing", True),
        ("!app", False),
        ("app in (web,db)", True),
        ("app in (db, cache)", False),
        ("missing in (x)", False),
        ("app notin (db,cache)", True),
        ("app notin (web)", False),
        ("missing notin (x)", True),
        ("app=web,tier=front", True),
        ("app=web,tier=back", False),
        ("app=web, tier in (front,back), !canary", True),
        ("example.com/owner=team-a", True),
        ("version>2", True),
        ("version<3", False),
        ("app>2", False),  # not an integer label: never matches gt/lt
        ("tier=", False),  # an empty value selects the label with value ""
    ],
    ids=repr,
)
def test_label_selector_matching(selector: str, expected: bool) -> None:
    assert LabelSelector.parse(selector).matches(LABELS) is expected


def test_empty_value_matches_empty_label() -> None:
    assert LabelSelector.parse("tier=").matches({"tier": ""})
    assert LabelSelector.parse("tier in (a,)").matches({"tier": ""})


@pytest.mark.parametrize(
    ("selector", "fragment"),
    [
        ("app in", "expected: '('"),
        ("app in (a", "',' or ')'"),
        ("app in ()", "can't be empty"),
        ("=web", "identifier"),
        ("app=web,", "identifier"),
        ("app web", "expected: one of"),
        ("app=web)", "expected: ','"),
        ("-bad=x", "invalid label key"),
        ("a/b/c=x", "invalid label key"),
        ("/name=x", "prefix part must be non-empty"),
        ("Example.COM/x=y", "prefix part"),
        ("app=" + "v" * 64, "no more than 63 characters"),
        ("app=bad value", "expected: ','"),
        ("app=-x", "invalid label value"),
        ("version>x", "integer"),
        ("!", "identifier"),
    ],
    ids=repr,
)
def test_label_selector_errors_are_bad_requests(selector: str, fragment: str) -> None:
    with pytest.raises(BadRequest) as info:
        LabelSelector.parse(selector)
    assert info.value.code == 400
    assert fragment in info.value.message


def test_label_selector_round_trips_to_text() -> None:
    text = "app=web,tier!=back,env in (a,b),!canary,version>2,owner"
    parsed = LabelSelector.parse(text)
    assert LabelSelector.parse(str(parsed)) == parsed


def test_label_selector_on_objects_without_labels() -> None:
    obj: dict[str, Any] = {"metadata": {"name": "x"}}
    assert LabelSelector.parse("!app").matches_object(obj)
    assert not LabelSelector.parse("app").matches_object(obj)
    assert LabelSelector.parse("").matches_object({})


def test_label_selector_from_struct() -> None:
    selector = LabelSelector.from_struct(
        {
            "matchLabels": {"app": "web"},
            "matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["front", "back"]},
                {"key": "canary", "operator": "DoesNotExist"},
                {"key": "version", "operator": "Exists"},
                {"key": "zone", "operator": "NotIn", "values": ["b"]},
            ],
        }
    )
    assert selector.matches(LABELS)
    assert not selector.matches({**LABELS, "canary": "yes"})
    assert LabelSelector.from_struct(None).empty
    assert LabelSelector.from_struct({}).matches({})


@pytest.mark.parametrize(
    "struct",
    [
        {"matchExpressions": [{"key": "a", "operator": "In", "values": []}]},
        {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]},
        {"matchExpressions": [{"key": "a", "operator": "Maybe"}]},
        {"matchLabels": {"bad key": "x"}},
    ],
    ids=["in-without-values", "exists-with-values", "unknown-operator", "bad-key"],
)
def test_label_selector_struct_errors(struct: dict[str, Any]) -> None:
    with pytest.raises(BadRequest):
        LabelSelector.from_struct(struct)


POD: dict[str, Any] = {
    "metadata": {"name": "p1", "namespace": "default"},
    "spec": {"nodeName": "node-1", "hostNetwork": False, "priority": 5},
    "status": {"phase": "Running"},
}


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("", True),
        ("metadata.name=p1", True),
        ("metadata.name==p1", True),
        ("metadata.name!=p1", False),
        ("metadata.namespace=default,status.phase=Running", True),
        ("metadata.namespace=default,status.phase!=Running", False),
        ("spec.nodeName=node-1", True),
        ("spec.hostNetwork=false", True),
        ("spec.priority=5", True),
        ("status.reason=", True),  # a missing field compares as ""
        ("status.reason!=", False),
        ("spec=x", False),  # an object is not a comparable value
    ],
    ids=repr,
)
def test_field_selector_matching(selector: str, expected: bool) -> None:
    assert FieldSelector.parse(selector).matches(POD) is expected


def test_field_selector_escapes() -> None:
    obj = {"metadata": {"name": "a,b=c\\d"}}
    selector = FieldSelector.parse(r"metadata.name=a\,b\=c\\d")
    assert selector.terms[0].value == "a,b=c\\d"
    assert selector.matches(obj)
    assert FieldSelector.parse(str(selector)) == selector


@pytest.mark.parametrize(
    ("selector", "fragment"),
    [
        ("metadata.name", "can't understand"),
        ("=x", "empty field"),
        (r"metadata.name=a\qb", "invalid escape"),
        ("metadata.name=a=b", 'unescaped "="'),
    ],
    ids=repr,
)
def test_field_selector_errors(selector: str, fragment: str) -> None:
    with pytest.raises(BadRequest) as info:
        FieldSelector.parse(selector)
    assert fragment in info.value.message


def test_field_selector_reports_fields_and_exact_values() -> None:
    selector = FieldSelector.parse("metadata.name=x,status.phase!=Failed")
    assert selector.fields == {"metadata.name", "status.phase"}
    assert selector.exact("metadata.name") == "x"
    assert selector.exact("status.phase") is None
    assert selector.exact("metadata.namespace") is None


def test_field_value_renders_like_the_api_server() -> None:
    assert field_value(POD, "spec.hostNetwork") == "false"
    assert field_value(POD, "spec.priority") == "5"
    assert field_value(POD, "spec.nodeName.deeper") == ""
    assert field_value(POD, "nothing.here") == ""
