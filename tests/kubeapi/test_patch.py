"""Merge patch (RFC 7386), JSON patch (RFC 6902) and the strategic merge patch kubectl sends."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from cdi.kubeapi.errors import BadRequest, Invalid, RequestEntityTooLarge, UnsupportedMediaType
from cdi.kubeapi.patch import (
    JSON_PATCH,
    MERGE_PATCH,
    STRATEGIC_MERGE_PATCH,
    accepted_patch_types,
    allows_strategic_merge,
    apply_json_patch,
    apply_merge_patch,
    apply_patch,
    apply_strategic_merge_patch,
    json_equal,
    strategic_merge_schema,
)

# --- RFC 7386 ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "patch", "expected"),
    [
        ({"a": "b"}, {"a": "c"}, {"a": "c"}),
        ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
        ({"a": "b"}, {"a": None}, {}),
        ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
        ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
        ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
        ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
        ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
        (["a", "b"], ["c", "d"], ["c", "d"]),
        ({"a": "b"}, ["c"], ["c"]),
        ({"a": "foo"}, None, None),
        ({"a": "foo"}, "bar", "bar"),
        ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
        ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
        ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
    ],
    ids=lambda v: repr(v)[:40],
)
def test_merge_patch_rfc7386_cases(target: Any, patch: Any, expected: Any) -> None:
    before = copy.deepcopy(target)
    assert apply_merge_patch(target, patch) == expected
    assert target == before  # inputs are never changed


def test_merge_patch_result_shares_nothing_with_input() -> None:
    target = {"spec": {"list": [1, 2]}, "keep": {"x": 1}}
    patch = {"spec": {"other": {"deep": True}}}
    result = apply_merge_patch(target, patch)
    result["keep"]["x"] = 2
    result["spec"]["other"]["deep"] = False
    assert target == {"spec": {"list": [1, 2]}, "keep": {"x": 1}}
    assert patch == {"spec": {"other": {"deep": True}}}


# --- RFC 6902 ---------------------------------------------------------------------------------

DOC: dict[str, Any] = {
    "metadata": {"labels": {"a/b": "1", "m~n": "2"}},
    "spec": {"list": ["x", "y"], "n": 1},
}


@pytest.mark.parametrize(
    ("ops", "expected"),
    [
        (
            [{"op": "add", "path": "/spec/new", "value": {"k": [1]}}],
            {**DOC, "spec": {**DOC["spec"], "new": {"k": [1]}}},
        ),
        (
            [{"op": "add", "path": "/spec/list/1", "value": "mid"}],
            {**DOC, "spec": {**DOC["spec"], "list": ["x", "mid", "y"]}},
        ),
        (
            [{"op": "add", "path": "/spec/list/-", "value": "end"}],
            {**DOC, "spec": {**DOC["spec"], "list": ["x", "y", "end"]}},
        ),
        (
            [{"op": "add", "path": "/spec/list/2", "value": "end"}],
            {**DOC, "spec": {**DOC["spec"], "list": ["x", "y", "end"]}},
        ),
        (
            [{"op": "add", "path": "/spec/n", "value": None}],
            {**DOC, "spec": {**DOC["spec"], "n": None}},
        ),
        (
            [{"op": "remove", "path": "/metadata/labels/a~1b"}],
            {**DOC, "metadata": {"labels": {"m~n": "2"}}},
        ),
        (
            [{"op": "replace", "path": "/metadata/labels/m~0n", "value": "3"}],
            {**DOC, "metadata": {"labels": {"a/b": "1", "m~n": "3"}}},
        ),
        (
            [{"op": "remove", "path": "/spec/list/0"}],
            {**DOC, "spec": {**DOC["spec"], "list": ["y"]}},
        ),
        (
            [{"op": "move", "from": "/spec/n", "path": "/spec/m"}],
            {**DOC, "spec": {"list": ["x", "y"], "m": 1}},
        ),
        (
            [{"op": "move", "from": "/spec/list/0", "path": "/spec/list/-"}],
            {**DOC, "spec": {**DOC["spec"], "list": ["y", "x"]}},
        ),
        (
            [{"op": "move", "from": "/spec/n", "path": "/spec/n"}],
            DOC,
        ),
        (
            [{"op": "copy", "from": "/spec/list", "path": "/spec/copy"}],
            {**DOC, "spec": {**DOC["spec"], "copy": ["x", "y"]}},
        ),
        (
            [
                {"op": "test", "path": "/spec/n", "value": 1.0},
                {"op": "test", "path": "/metadata/labels/a~1b", "value": "1"},
                {"op": "test", "path": "/spec/list", "value": ["x", "y"]},
            ],
            DOC,
        ),
        ([{"op": "replace", "path": "", "value": {"whole": True}}], {"whole": True}),
        ([], DOC),
    ],
    ids=lambda v: repr(v)[:60],
)
def test_json_patch_operations(ops: list[dict[str, Any]], expected: Any) -> None:
    before = copy.deepcopy(DOC)
    assert apply_json_patch(DOC, ops) == expected
    assert before == DOC


def test_json_patch_copy_is_deep() -> None:
    result = apply_json_patch(
        {"a": {"b": [1]}},
        [
            {"op": "copy", "from": "/a", "path": "/c"},
            {"op": "add", "path": "/c/b/-", "value": 2},
        ],
    )
    assert result == {"a": {"b": [1]}, "c": {"b": [1, 2]}}


@pytest.mark.parametrize(
    ("ops", "fragment"),
    [
        ([{"op": "test", "path": "/spec/n", "value": 2}], "test failed"),
        ([{"op": "test", "path": "/spec/n", "value": True}], "test failed"),
        ([{"op": "test", "path": "/spec/list", "value": ["y", "x"]}], "test failed"),
        ([{"op": "remove", "path": "/spec/missing"}], "does not exist"),
        ([{"op": "replace", "path": "/spec/missing", "value": 1}], "does not exist"),
        ([{"op": "add", "path": "/nope/deeper", "value": 1}], "does not exist"),
        ([{"op": "add", "path": "/spec/list/3", "value": 1}], "out of range"),
        ([{"op": "add", "path": "/spec/list/01", "value": 1}], "not a valid array index"),
        ([{"op": "add", "path": "/spec/list/-1", "value": 1}], "not a valid array index"),
        ([{"op": "remove", "path": "/spec/list/-"}], "not a valid array index"),
        ([{"op": "add", "path": "/spec/n/x", "value": 1}], "not an object or array"),
        ([{"op": "add", "path": "spec", "value": 1}], 'must start with "/"'),
        ([{"op": "add", "path": "/a~2b", "value": 1}], "escape"),
        ([{"op": "add", "path": "/spec/x"}], 'missing "value"'),
        ([{"op": "move", "path": "/spec/x"}], 'missing "from"'),
        ([{"op": "move", "from": "/spec", "path": "/spec/inner"}], "own child"),
        ([{"op": "frobnicate", "path": "/spec"}], "unknown operation"),
        ([{"path": "/spec"}], "unknown operation"),
        ([{"op": "remove", "path": ""}], "whole document"),
    ],
    ids=lambda v: repr(v)[:60],
)
def test_json_patch_failures_are_422(ops: list[dict[str, Any]], fragment: str) -> None:
    with pytest.raises(Invalid) as info:
        apply_json_patch(DOC, ops)
    assert info.value.code == 422
    assert info.value.reason == "Invalid"
    assert fragment in info.value.message
    assert info.value.to_status()["details"]["causes"][0]["field"] == "patch"


def test_json_patch_is_atomic() -> None:
    doc = {"a": 1}
    with pytest.raises(Invalid):
        apply_json_patch(
            doc, [{"op": "add", "path": "/b", "value": 2}, {"op": "test", "path": "/a", "value": 9}]
        )
    assert doc == {"a": 1}


@pytest.mark.parametrize("ops", [{"op": "add"}, ["add"], "[]", None], ids=repr)
def test_json_patch_that_is_not_an_array_of_objects_is_400(ops: Any) -> None:
    with pytest.raises(BadRequest):
        apply_json_patch(DOC, ops)


def test_json_patch_operation_limit() -> None:
    ops = [{"op": "test", "path": "", "value": {}}] * 10001
    with pytest.raises(RequestEntityTooLarge) as info:
        apply_json_patch({}, ops)
    assert info.value.code == 413


def test_json_equal_follows_json_not_python() -> None:
    assert json_equal(1, 1.0)
    assert not json_equal(True, 1)
    assert not json_equal(0, False)
    assert json_equal({"a": [1, None]}, {"a": [1.0, None]})
    assert not json_equal({"a": 1}, {"a": 1, "b": 2})
    assert not json_equal("1", 1)


# --- strategic merge patch --------------------------------------------------------------------

POD_SCHEMA = strategic_merge_schema("pods")


def pod() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "p",
            "labels": {"app": "web"},
            "finalizers": ["a", "b", "c"],
            "ownerReferences": [{"uid": "u1", "name": "o1", "kind": "DataVolume"}],
        },
        "spec": {
            "containers": [
                {
                    "name": "main",
                    "image": "importer:1",
                    "args": ["-v=1"],
                    "env": [
                        {"name": "A", "value": "1"},
                        {"name": "B", "value": "2"},
                        {"name": "C", "value": "3"},
                    ],
                    "ports": [{"containerPort": 8443, "name": "metrics"}],
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                },
                {"name": "sidecar", "image": "proxy:1"},
            ],
            "volumes": [
                {"name": "data", "persistentVolumeClaim": {"claimName": "pvc"}},
                {"name": "scratch", "emptyDir": {}},
            ],
            "tolerations": [{"key": "x", "operator": "Exists"}],
        },
        "status": {
            "phase": "Running",
            "conditions": [
                {"type": "Ready", "status": "False"},
                {"type": "PodScheduled", "status": "True"},
            ],
        },
    }


def smp(patch: dict[str, Any]) -> dict[str, Any]:
    original = pod()
    result = apply_strategic_merge_patch(original, patch, POD_SCHEMA)
    assert original == pod()  # never changed in place
    return result


def test_smp_container_image_like_kubectl_set_image() -> None:
    result = smp({"spec": {"containers": [{"name": "main", "image": "importer:2"}]}})
    main, sidecar = result["spec"]["containers"]
    assert main["image"] == "importer:2"
    assert main["env"] == pod()["spec"]["containers"][0]["env"]  # the rest of it is kept
    assert sidecar == {"name": "sidecar", "image": "proxy:1"}


def test_smp_adds_a_container_by_name() -> None:
    result = smp({"spec": {"containers": [{"name": "logger", "image": "tail:1"}]}})
    assert [c["name"] for c in result["spec"]["containers"]] == ["main", "sidecar", "logger"]


def test_smp_env_add_change_and_delete() -> None:
    result = smp(
        {
            "spec": {
                "containers": [
                    {
                        "name": "main",
                        "env": [
                            {"name": "B", "$patch": "delete"},
                            {"name": "C", "value": "30"},
                            {"name": "D", "value": "4"},
                        ],
                    }
                ]
            }
        }
    )
    env = result["spec"]["containers"][0]["env"]
    assert env == [
        {"name": "A", "value": "1"},
        {"name": "C", "value": "30"},
        {"name": "D", "value": "4"},
    ]


def test_smp_ports_merge_by_container_port() -> None:
    result = smp(
        {
            "spec": {
                "containers": [
                    {
                        "name": "main",
                        "ports": [
                            {"containerPort": 8443, "protocol": "TCP"},
                            {"containerPort": 80},
                        ],
                    }
                ]
            }
        }
    )
    assert result["spec"]["containers"][0]["ports"] == [
        {"containerPort": 8443, "name": "metrics", "protocol": "TCP"},
        {"containerPort": 80},
    ]


def test_smp_conditions_merge_by_type() -> None:
    result = smp({"status": {"conditions": [{"type": "Ready", "status": "True"}]}})
    assert result["status"]["conditions"] == [
        {"type": "Ready", "status": "True"},
        {"type": "PodScheduled", "status": "True"},
    ]


def test_smp_lists_without_merge_key_replace() -> None:
    result = smp({"spec": {"containers": [{"name": "main", "args": ["-v=3"]}], "tolerations": []}})
    assert result["spec"]["containers"][0]["args"] == ["-v=3"]
    assert result["spec"]["tolerations"] == []


def test_smp_null_deletes_and_maps_merge() -> None:
    result = smp({"metadata": {"labels": {"app": None, "tier": "db"}}, "status": {"phase": None}})
    assert result["metadata"]["labels"] == {"tier": "db"}
    assert "phase" not in result["status"]


def test_smp_finalizers_are_a_set() -> None:
    result = smp(
        {"metadata": {"finalizers": ["b", "d"], "$deleteFromPrimitiveList/finalizers": ["a"]}}
    )
    assert result["metadata"]["finalizers"] == ["b", "c", "d"]


def test_smp_owner_references_merge_by_uid() -> None:
    result = smp({"metadata": {"ownerReferences": [{"uid": "u2", "name": "o2", "kind": "X"}]}})
    assert [o["uid"] for o in result["metadata"]["ownerReferences"]] == ["u1", "u2"]


def test_smp_patch_replace_on_a_list() -> None:
    result = smp({"spec": {"containers": [{"name": "only", "image": "x"}, {"$patch": "replace"}]}})
    assert result["spec"]["containers"] == [{"name": "only", "image": "x"}]


def test_smp_patch_replace_on_a_map() -> None:
    result = smp({"metadata": {"labels": {"$patch": "replace", "new": "1"}}})
    assert result["metadata"]["labels"] == {"new": "1"}


def test_smp_patch_delete_on_a_map() -> None:
    result = smp({"status": {"$patch": "delete"}})
    assert "status" not in result


def test_smp_delete_a_volume_and_a_container() -> None:
    result = smp(
        {
            "spec": {
                "volumes": [{"name": "scratch", "$patch": "delete"}],
                "containers": [{"name": "sidecar", "$patch": "delete"}],
            }
        }
    )
    assert [v["name"] for v in result["spec"]["volumes"]] == ["data"]
    assert [c["name"] for c in result["spec"]["containers"]] == ["main"]


def test_smp_set_element_order_is_honoured() -> None:
    result = smp(
        {
            "spec": {
                "containers": [
                    {
                        "name": "main",
                        "$setElementOrder/env": [{"name": "C"}, {"name": "A"}, {"name": "B"}],
                        "env": [{"name": "A", "value": "10"}],
                    }
                ]
            },
            "metadata": {"$setElementOrder/finalizers": ["c", "b", "a"]},
        }
    )
    env = result["spec"]["containers"][0]["env"]
    assert [e["name"] for e in env] == ["C", "A", "B"]
    assert env[1]["value"] == "10"
    assert result["metadata"]["finalizers"] == ["c", "b", "a"]


def test_smp_set_element_order_keeps_unlisted_items_in_their_slots() -> None:
    result = smp(
        {
            "spec": {
                "containers": [
                    {"name": "main", "$setElementOrder/env": [{"name": "C"}, {"name": "A"}]}
                ]
            }
        }
    )
    assert [e["name"] for e in result["spec"]["containers"][0]["env"]] == ["C", "B", "A"]


def test_smp_retain_keys_clears_the_other_union_members() -> None:
    result = smp(
        {
            "spec": {
                "volumes": [
                    {
                        "name": "data",
                        "$retainKeys": ["name", "hostPath"],
                        "hostPath": {"path": "/srv"},
                    }
                ]
            }
        }
    )
    assert result["spec"]["volumes"][0] == {"name": "data", "hostPath": {"path": "/srv"}}


def test_smp_retain_keys_must_cover_the_patch() -> None:
    with pytest.raises(Invalid) as info:
        smp({"spec": {"$retainKeys": ["containers"], "volumes": []}})
    assert info.value.code == 422


@pytest.mark.parametrize(
    ("patch", "fragment"),
    [
        ({"spec": {"containers": [{"image": "x"}]}}, "merge key: name"),
        ({"spec": {"containers": ["main"]}}, "not an object"),
        ({"metadata": {"$patch": "explode"}}, "unknown patch type"),
        ({"metadata": {"$foo": 1}}, "unknown strategic merge patch directive"),
        ({"metadata": {"$deleteFromPrimitiveList/finalizers": "a"}}, "primitive list"),
        ({"metadata": {"$setElementOrder/finalizers": "a"}}, "setElementOrder"),
        ({"metadata": {"$retainKeys": "labels"}}, "retainKeys"),
        ({"metadata": {"finalizers": [{"a": 1}]}}, "primitive list"),
    ],
    ids=repr,
)
def test_smp_bad_patches_are_400(patch: dict[str, Any], fragment: str) -> None:
    with pytest.raises(BadRequest) as info:
        smp(patch)
    assert fragment in info.value.message


def test_smp_directives_never_reach_the_object() -> None:
    result = apply_strategic_merge_patch(
        {"metadata": {}},
        {"spec": {"containers": [{"name": "a", "env": [{"name": "X", "$patch": "delete"}]}]}},
        POD_SCHEMA,
    )
    assert result == {"metadata": {}, "spec": {"containers": [{"name": "a", "env": []}]}}


def test_strategic_merge_is_for_built_in_kinds_only() -> None:
    assert allows_strategic_merge("pods")
    assert allows_strategic_merge("configmaps")
    assert not allows_strategic_merge("datavolumes.cdi.kubevirt.io")
    assert strategic_merge_schema("datavolumes.cdi.kubevirt.io") is None
    assert accepted_patch_types("datavolumes.cdi.kubevirt.io") == (JSON_PATCH, MERGE_PATCH)


def test_apply_patch_dispatches_by_content_type() -> None:
    cm = {"metadata": {"name": "c"}, "data": {"a": "1"}}
    assert apply_patch(cm, MERGE_PATCH, {"data": {"b": "2"}}, resource="configmaps")["data"] == {
        "a": "1",
        "b": "2",
    }
    assert (
        apply_patch(
            cm,
            JSON_PATCH + "; charset=utf-8",
            [{"op": "remove", "path": "/data/a"}],
            resource="configmaps",
        )["data"]
        == {}
    )
    assert (
        apply_patch(cm, STRATEGIC_MERGE_PATCH, {"data": {"a": None}}, resource="configmaps")["data"]
        == {}
    )


def test_apply_patch_refuses_strategic_merge_on_custom_resources() -> None:
    with pytest.raises(UnsupportedMediaType) as info:
        apply_patch({}, STRATEGIC_MERGE_PATCH, {}, resource="datavolumes.cdi.kubevirt.io")
    status = info.value.to_status()
    assert status["code"] == 415
    assert status["reason"] == "UnsupportedMediaType"
    assert "application/merge-patch+json" in status["message"]
    assert "strategic" not in status["message"]


def test_apply_patch_needs_an_object_result() -> None:
    with pytest.raises(BadRequest):
        apply_patch({}, MERGE_PATCH, [1], resource="configmaps")
    with pytest.raises(UnsupportedMediaType):
        apply_patch({}, "application/apply-patch+yaml", {}, resource="configmaps")
