"""The CRDs we ship (cdi/api/crds/*.yaml) and what the API server derives from a CRD.

Every CRD must load, be accepted by Kubernetes' own CRD schema (kubernetes-validate, strict: a
misspelt keyword such as `x-preserve-unknown-fields` fails), be structural (checked here by an
independent walk, not only by `structural_errors`), and match the wire contract in
`cdi.api.groups` and reference/cdi.md §1.2.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest

from cdi.api import groups
from cdi.kubeapi.crds import (
    AGE_COLUMN,
    CRD_VERBS,
    CRDError,
    PrinterColumn,
    column_cell,
    crd_resource_info,
    default_crd,
    established_status,
    human_duration,
    json_path_values,
    load_crds,
    sort_versions,
    table_column_definitions,
    table_row_cells,
    validate_crd,
)
from cdi.kubeapi.schema import structural_errors

CRDS = load_crds()
BY_NAME = {crd["metadata"]["name"]: crd for crd in CRDS}
INFO = {name: crd_resource_info(crd) for name, crd in BY_NAME.items()}

EXPECTED_NAMES = {
    "datavolumes.cdi.kubevirt.io",
    "cdis.cdi.kubevirt.io",
    "cdiconfigs.cdi.kubevirt.io",
    "storageprofiles.cdi.kubevirt.io",
    "datasources.cdi.kubevirt.io",
    "dataimportcrons.cdi.kubevirt.io",
    "objecttransfers.cdi.kubevirt.io",
    "volumeimportsources.cdi.kubevirt.io",
    "volumeuploadsources.cdi.kubevirt.io",
    "volumeclonesources.cdi.kubevirt.io",
    "virtualmachines.kubevirt.io",
    "virtualmachineinstances.kubevirt.io",
    "volumesnapshots.snapshot.storage.k8s.io",
    "volumesnapshotclasses.snapshot.storage.k8s.io",
    "volumesnapshotcontents.snapshot.storage.k8s.io",
}

each_crd = pytest.mark.parametrize("crd", CRDS, ids=[c["metadata"]["name"] for c in CRDS])


def schema_of(name: str, version: str | None = None) -> Mapping[str, Any]:
    info = INFO[name]
    ver = info.version(version) if version else info.storage_version
    assert ver is not None and ver.schema is not None
    return ver.schema


def test_every_kind_ships_exactly_once() -> None:
    assert [c["metadata"]["name"] for c in CRDS].count("datavolumes.cdi.kubevirt.io") == 1
    assert set(BY_NAME) == EXPECTED_NAMES
    assert len(CRDS) == len(EXPECTED_NAMES)


def test_load_returns_fresh_objects() -> None:
    first = load_crds()
    first[0]["spec"]["group"] = "changed.example.com"
    assert load_crds()[0]["spec"]["group"] != "changed.example.com"


@each_crd
def test_kubernetes_accepts_the_crd(crd: dict[str, Any]) -> None:
    # Kubernetes' own CustomResourceDefinition schema, strict: unknown keys are errors.
    kubernetes_validate.validate(crd, "1.32", strict=True)
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["kind"] == "CustomResourceDefinition"
    assert validate_crd(crd) == []


def _untyped_nodes(node: Mapping[str, Any], path: str) -> Iterator[str]:
    """Independent check of the structural rule: every specified field and item has a type,
    unless it is int-or-string or keeps unknown fields."""
    exempt = node.get("x-kubernetes-int-or-string") or node.get(
        "x-kubernetes-preserve-unknown-fields"
    )
    if "type" not in node and not exempt:
        yield path
    assert "additionalProperties" not in node or "properties" not in node, path
    for key, sub in (node.get("properties") or {}).items():
        yield from _untyped_nodes(sub, f"{path}.{key}")
    if isinstance(node.get("additionalProperties"), Mapping):
        yield from _untyped_nodes(node["additionalProperties"], f"{path}.*")
    if "items" in node:
        yield from _untyped_nodes(node["items"], f"{path}[]")
    if node.get("type") == "array":
        assert "items" in node, path
    for junctor in ("anyOf", "allOf", "oneOf"):
        for branch in node.get(junctor) or []:
            # Only the int-or-string type pair may name types inside a junctor.
            if "type" in branch:
                assert node.get("x-kubernetes-int-or-string"), path
                assert set(branch) == {"type"}, path


@each_crd
def test_schemas_are_structural(crd: dict[str, Any]) -> None:
    for version in crd["spec"]["versions"]:
        schema = version["schema"]["openAPIV3Schema"]
        assert schema["type"] == "object"
        assert list(_untyped_nodes(schema, version["name"])) == []
        assert structural_errors(schema) == []
        assert schema["properties"]["metadata"] == {"type": "object"}


@pytest.mark.parametrize(
    "resource",
    [
        *groups.CDI_RESOURCES,
        groups.VIRTUAL_MACHINE,
        groups.VIRTUAL_MACHINE_INSTANCE,
        groups.VOLUME_SNAPSHOT,
        groups.VOLUME_SNAPSHOT_CLASS,
    ],
    ids=lambda r: r.kind,
)
def test_names_match_the_wire_contract(resource: groups.Resource) -> None:
    info = INFO[f"{resource.plural}.{resource.group}"]
    assert info.group == resource.group
    assert info.kind == resource.kind
    assert info.list_kind == resource.kind + "List"
    assert info.singular == resource.singular
    assert info.namespaced is resource.namespaced
    assert info.short_names == resource.short_names
    assert info.categories == resource.categories
    assert info.storage_version.name == resource.version
    assert info.storage_version.served


# reference/cdi.md §1.2: which kinds have a status subresource.
STATUS_SUBRESOURCE = {
    "datavolumes.cdi.kubevirt.io": True,
    "cdis.cdi.kubevirt.io": True,
    "cdiconfigs.cdi.kubevirt.io": False,
    "storageprofiles.cdi.kubevirt.io": True,
    "datasources.cdi.kubevirt.io": False,
    "dataimportcrons.cdi.kubevirt.io": False,
    "objecttransfers.cdi.kubevirt.io": True,
    "volumeimportsources.cdi.kubevirt.io": False,
    "volumeuploadsources.cdi.kubevirt.io": False,
    "volumeclonesources.cdi.kubevirt.io": False,
    "virtualmachines.kubevirt.io": True,
    "virtualmachineinstances.kubevirt.io": True,
    "volumesnapshots.snapshot.storage.k8s.io": True,
    "volumesnapshotclasses.snapshot.storage.k8s.io": False,
    "volumesnapshotcontents.snapshot.storage.k8s.io": True,
}


@pytest.mark.parametrize("name", sorted(STATUS_SUBRESOURCE))
def test_status_subresources(name: str) -> None:
    for version in INFO[name].versions:
        assert version.status_subresource is STATUS_SUBRESOURCE[name]


def columns_of(name: str, version: str | None = None) -> list[tuple[str, str, str]]:
    info = INFO[name]
    ver = info.version(version) if version else info.storage_version
    assert ver is not None
    return [(c.name, c.type, c.json_path) for c in ver.columns]


def test_datavolume_as_cdi_shows_it() -> None:
    info = INFO["datavolumes.cdi.kubevirt.io"]
    assert [v.name for v in info.versions] == ["v1beta1"]
    assert columns_of("datavolumes.cdi.kubevirt.io") == [
        ("Phase", "string", ".status.phase"),
        ("Progress", "string", ".status.progress"),
        ("Restarts", "integer", ".status.restartCount"),
        ("Age", "date", ".metadata.creationTimestamp"),
    ]
    schema = schema_of("datavolumes.cdi.kubevirt.io")
    assert schema["required"] == ["spec"]
    spec = schema["properties"]["spec"]["properties"]
    assert set(spec) == {
        "source",
        "sourceRef",
        "pvc",
        "storage",
        "priorityClassName",
        "serviceAccountName",
        "contentType",
        "checkpoints",
        "finalCheckpoint",
        "preallocation",
    }
    assert set(spec["source"]["properties"]) == {
        "http",
        "s3",
        "gcs",
        "registry",
        "pvc",
        "upload",
        "blank",
        "imageio",
        "vddk",
        "snapshot",
    }
    assert spec["contentType"]["enum"] == ["kubevirt", "archive"]
    status = schema["properties"]["status"]["properties"]
    assert set(status) == {"claimName", "phase", "progress", "restartCount", "conditions"}
    condition = status["conditions"]["items"]["properties"]
    assert set(condition) == {
        "type",
        "status",
        "lastTransitionTime",
        "lastHeartbeatTime",
        "reason",
        "message",
    }


def test_cdi_serves_v1alpha1_but_stores_v1beta1() -> None:
    info = INFO["cdis.cdi.kubevirt.io"]
    alpha, beta = info.version("v1alpha1"), info.version("v1beta1")
    assert alpha is not None and beta is not None
    assert alpha.served and not alpha.storage
    assert beta.served and beta.storage
    assert info.preferred_version == beta
    assert [v.name for v in info.served_versions] == ["v1beta1", "v1alpha1"]
    assert alpha.warning(info.group, info.kind) is not None
    assert beta.warning(info.group, info.kind) is None
    assert alpha.schema == beta.schema
    assert columns_of("cdis.cdi.kubevirt.io") == [
        ("Age", "date", ".metadata.creationTimestamp"),
        ("Phase", "string", ".status.phase"),
    ]


def test_other_printer_columns() -> None:
    assert columns_of("dataimportcrons.cdi.kubevirt.io") == [
        ("Format", "string", ".status.sourceFormat")
    ]
    assert columns_of("objecttransfers.cdi.kubevirt.io") == [
        ("Age", "date", ".metadata.creationTimestamp"),
        ("Phase", "string", ".status.phase"),
    ]
    # No declared columns: Kubernetes shows Age.
    assert columns_of("datasources.cdi.kubevirt.io") == [
        ("Age", "date", ".metadata.creationTimestamp")
    ]
    assert INFO["datasources.cdi.kubevirt.io"].storage_version.printer_columns == ()


def _without_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_without_descriptions(v) for v in node]
    return node


def test_shared_types_have_one_shape() -> None:
    """The YAML repeats shared types (CDI's generator does too); they must not drift apart."""
    dv = schema_of("datavolumes.cdi.kubevirt.io")["properties"]
    template = schema_of("dataimportcrons.cdi.kubevirt.io")["properties"]["spec"]["properties"][
        "template"
    ]["properties"]
    assert _without_descriptions(template["spec"]) == _without_descriptions(dv["spec"])
    assert _without_descriptions(template["status"]) == _without_descriptions(dv["status"])
    assert template["metadata"]["x-kubernetes-preserve-unknown-fields"] is True

    dv_sources = dv["spec"]["properties"]["source"]["properties"]
    vis = schema_of("volumeimportsources.cdi.kubevirt.io")["properties"]["spec"]["properties"]
    for kind, source in vis["source"]["properties"].items():
        assert source == dv_sources[kind], kind
    assert vis["contentType"] == dv["spec"]["properties"]["contentType"]
    assert vis["checkpoints"] == dv["spec"]["properties"]["checkpoints"]

    pvc = _without_descriptions(dv["spec"]["properties"]["pvc"]["properties"])
    storage = _without_descriptions(dv["spec"]["properties"]["storage"]["properties"])
    assert set(pvc) - set(storage) == {"volumeAttributesClassName"}
    for key, value in storage.items():
        assert value == pvc[key], key

    cdi_config = schema_of("cdis.cdi.kubevirt.io")["properties"]["spec"]["properties"]["config"]
    config_spec = schema_of("cdiconfigs.cdi.kubevirt.io")["properties"]["spec"]
    assert _without_descriptions(cdi_config) == _without_descriptions(config_spec)


def test_quantities_are_int_or_string() -> None:
    pvc = schema_of("datavolumes.cdi.kubevirt.io")["properties"]["spec"]["properties"]["pvc"]
    quantity = pvc["properties"]["resources"]["properties"]["requests"]["additionalProperties"]
    assert quantity["x-kubernetes-int-or-string"] is True
    assert quantity["anyOf"] == [{"type": "integer"}, {"type": "string"}]
    assert "type" not in quantity


def test_discovery_entries() -> None:
    info = INFO["datavolumes.cdi.kubevirt.io"]
    main, status = info.api_resources("v1beta1")
    assert main == {
        "name": "datavolumes",
        "singularName": "datavolume",
        "namespaced": True,
        "kind": "DataVolume",
        "verbs": list(CRD_VERBS),
        "shortNames": ["dv", "dvs"],
        "categories": ["all"],
        "storageVersionHash": info.storage_version_hash,
    }
    assert len(info.storage_version_hash) == 12
    assert status == {
        "name": "datavolumes/status",
        "singularName": "",
        "namespaced": True,
        "kind": "DataVolume",
        "verbs": ["get", "patch", "update"],
    }
    assert info.api_resources("v1") == []
    config = INFO["cdiconfigs.cdi.kubevirt.io"].api_resources("v1beta1")
    assert [r["name"] for r in config] == ["cdiconfigs"]
    assert "shortNames" not in config[0]
    assert info.matches("dv") and info.matches("DataVolume") and info.matches("datavolumes")
    assert not info.matches("pvc")


def test_version_priority_is_kubernetes_order() -> None:
    # The example from the Kubernetes CRD versioning documentation.
    shuffled = ["foo10", "v11alpha2", "v1", "v10beta3", "v3beta1", "v12alpha1", "v10", "foo1"]
    shuffled += ["v2", "v11beta2"]
    assert sort_versions(shuffled) == [
        "v10",
        "v2",
        "v1",
        "v11beta2",
        "v10beta3",
        "v3beta1",
        "v12alpha1",
        "v11alpha2",
        "foo1",
        "foo10",
    ]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (-5, "<invalid>"),
        (-1, "0s"),
        (0, "0s"),
        (119, "119s"),
        (120, "2m"),
        (5 * 60 + 3, "5m3s"),
        (45 * 60, "45m"),
        (3 * 3600, "3h"),
        (3 * 3600 + 25 * 60, "3h25m"),
        (30 * 3600, "30h"),
        (2 * 86400 + 4 * 3600, "2d4h"),
        (6 * 86400, "6d"),
        (100 * 86400, "100d"),
        (3 * 365 * 86400 + 45 * 86400, "3y45d"),
        (10 * 365 * 86400, "10y"),
    ],
)
def test_human_duration(seconds: int, text: str) -> None:
    assert human_duration(seconds) == text


NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def test_table_cells_for_a_datavolume() -> None:
    dv = {
        "metadata": {
            "name": "fedora",
            "creationTimestamp": (NOW - timedelta(minutes=5, seconds=3)).strftime(
                "%Y-%m-%dT%H:%M:%SZ"
            ),
        },
        "status": {"phase": "ImportInProgress", "progress": "45.50%", "restartCount": 2},
    }
    columns = INFO["datavolumes.cdi.kubevirt.io"].storage_version.columns
    assert table_row_cells(columns, dv, now=NOW) == [
        "fedora",
        "ImportInProgress",
        "45.50%",
        2,
        "5m3s",
    ]
    definitions = table_column_definitions(columns)
    assert [d["name"] for d in definitions] == ["Name", "Phase", "Progress", "Restarts", "Age"]
    assert definitions[0]["format"] == "name"
    assert definitions[3]["type"] == "integer"
    fresh = {"metadata": {"name": "new"}}
    assert table_row_cells(columns, fresh, now=NOW) == ["new", None, None, None, None]


def test_column_cells_by_type() -> None:
    obj = {
        "spec": {"n": 3.0, "s": 7, "flag": True, "when": "not a time", "map": {"b": 1, "a": 2}},
    }
    assert column_cell(PrinterColumn("N", "integer", ".spec.n"), obj) == 3
    assert column_cell(PrinterColumn("N", "number", ".spec.s"), obj) == 7.0
    assert column_cell(PrinterColumn("S", "string", ".spec.s"), obj) == "7"
    assert column_cell(PrinterColumn("S", "string", ".spec.flag"), obj) == "true"
    assert column_cell(PrinterColumn("S", "string", ".spec.map"), obj) == '{"a":2,"b":1}'
    assert column_cell(PrinterColumn("B", "boolean", ".spec.flag"), obj) is True
    assert column_cell(PrinterColumn("B", "boolean", ".spec.s"), obj) is None
    assert column_cell(PrinterColumn("I", "integer", ".spec.flag"), obj) is None
    assert column_cell(PrinterColumn("D", "date", ".spec.when"), obj) == "<invalid>"
    assert column_cell(PrinterColumn("D", "date", ".spec.missing"), obj) is None
    assert column_cell(PrinterColumn("X", "string", ".spec[?(@"), obj) is None
    assert column_cell(AGE_COLUMN, {"metadata": {}}) is None


def test_kubevirt_ready_column_uses_a_filter() -> None:
    vm = {
        "metadata": {"name": "vm1"},
        "status": {
            "printableStatus": "Running",
            "conditions": [
                {"type": "Paused", "status": "False"},
                {"type": "Ready", "status": "True"},
            ],
        },
    }
    columns = INFO["virtualmachines.kubevirt.io"].storage_version.columns
    assert table_row_cells(columns[1:], vm, now=NOW) == ["vm1", "Running", "True"]


def test_json_path_values() -> None:
    obj = {
        "a": {"b": [{"c": 1, "t": "x"}, {"c": 2, "t": "y"}], "d.e": "dotted", "f": False},
    }
    assert json_path_values(obj, ".a.b[0].c") == [1]
    assert json_path_values(obj, ".a.b[-1].c") == [2]
    assert json_path_values(obj, ".a.b[*].c") == [1, 2]
    assert json_path_values(obj, "{.a.b[*].t}") == ["x", "y"]
    assert json_path_values(obj, "$.a['d.e']") == ["dotted"]
    assert json_path_values(obj, ".a.b[?(@.t=='y')].c") == [2]
    assert json_path_values(obj, '.a.b[?(@.t!="y")].c') == [1]
    assert json_path_values(obj, ".a.b[?(@.c==2)].t") == ["y"]
    assert json_path_values(obj, ".a.f") == [False]
    assert json_path_values(obj, ".a.missing.deeper") == []
    assert json_path_values(obj, ".a.b[5]") == []
    with pytest.raises(ValueError, match="unsupported JSONPath"):
        json_path_values(obj, ".a..b")


USER_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.example.com"},
    "spec": {
        "group": "example.com",
        "names": {"kind": "Widget", "plural": "widgets"},
        "scope": "Cluster",
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {"spec": {"type": "object", "properties": {}}},
                    }
                },
                "subresources": {"scale": {"specReplicasPath": ".spec.replicas"}},
            }
        ],
    },
}


def test_user_crd_gets_kubernetes_defaults() -> None:
    info = crd_resource_info(USER_CRD)
    assert info.singular == "widget"
    assert info.list_kind == "WidgetList"
    assert not info.namespaced
    assert info.storage_version.columns == (AGE_COLUMN,)
    assert [r["name"] for r in info.api_resources("v1")] == ["widgets", "widgets/scale"]
    assert validate_crd(USER_CRD) == []

    crd = copy.deepcopy(USER_CRD)
    default_crd(crd)
    assert crd["spec"]["names"]["singular"] == "widget"
    assert crd["spec"]["names"]["listKind"] == "WidgetList"
    assert crd["spec"]["conversion"] == {"strategy": "None"}

    status = established_status(crd, now=NOW)
    assert status["acceptedNames"]["plural"] == "widgets"
    assert [c["type"] for c in status["conditions"]] == ["NamesAccepted", "Established"]
    assert all(c["status"] == "True" for c in status["conditions"])
    assert status["storedVersions"] == ["v1"]


def test_malformed_crd_is_refused() -> None:
    with pytest.raises(CRDError):
        crd_resource_info({"spec": {"group": "example.com", "names": {"kind": "Widget"}}})
    with pytest.raises(CRDError):
        crd_resource_info({"metadata": {}})


def _broken(change: Any) -> list[str]:
    crd = copy.deepcopy(USER_CRD)
    change(crd)
    return [str(e) for e in validate_crd(crd)]


def test_validate_crd_reports_what_kubernetes_would() -> None:
    def rename(crd: dict[str, Any]) -> None:
        crd["metadata"]["name"] = "gadgets.example.com"

    assert _broken(rename) == [
        'metadata.name: Invalid value: "gadgets.example.com": must be '
        'spec.names.plural+"."+spec.group'
    ]

    def two_storage_versions(crd: dict[str, Any]) -> None:
        second = copy.deepcopy(crd["spec"]["versions"][0])
        second["name"] = "v2"
        crd["spec"]["versions"].append(second)

    assert _broken(two_storage_versions) == [
        'spec.versions: Invalid value: ["v1","v2"]: must have exactly one version marked as '
        "storage version"
    ]

    def untyped_field(crd: dict[str, Any]) -> None:
        spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        spec["properties"]["size"] = {"description": "no type"}

    assert _broken(untyped_field) == [
        "spec.versions[0].schema.openAPIV3Schema.properties[spec].properties[size].type: "
        "Required value: must not be empty for specified object fields"
    ]

    def bad_column(crd: dict[str, Any]) -> None:
        crd["spec"]["versions"][0]["additionalPrinterColumns"] = [
            {"name": "Size", "type": "quantity", "jsonPath": ".spec.size"}
        ]

    assert _broken(bad_column) == [
        'spec.versions[0].additionalPrinterColumns[0].type: Unsupported value: "quantity": '
        'supported values: "integer", "number", "string", "boolean", "date"'
    ]

    def bad_scope_and_group(crd: dict[str, Any]) -> None:
        crd["spec"]["scope"] = "Global"
        crd["spec"]["group"] = "example"
        crd["metadata"]["name"] = "widgets.example"

    assert _broken(bad_scope_and_group) == [
        'spec.group: Invalid value: "example": should be a domain with at least one dot',
        'spec.scope: Unsupported value: "Global": supported values: "Cluster", "Namespaced"',
    ]
