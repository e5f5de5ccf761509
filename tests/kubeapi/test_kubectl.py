"""The embedded API server through the real `kubectl` (/usr/bin/kubectl), as a user would drive it.

One `cdi server` subprocess per module (`cdi_server`); each test works in its own namespace.
Tests that stop or restart the server get their own (`fresh_cdi_server`). Every wait is bounded.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kubeapi.conftest import KUBECTL, CdiServer, poll

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
DV_RESOURCE = "datavolume.cdi.kubevirt.io"
STRATEGIC_415 = (
    "application/strategic-merge-patch+json is not supported by "
    "cdi.kubevirt.io/v1beta1, Kind=DataVolume"
)


def dv_manifests(namespace: str) -> str:
    """The four DataVolume shapes users write most: http+checksum, blank (storage API), PVC
    clone, registry."""
    docs = [
        {
            "apiVersion": "cdi.kubevirt.io/v1beta1",
            "kind": "DataVolume",
            "metadata": {"name": "dv-http", "namespace": namespace},
            "spec": {
                "source": {
                    "http": {
                        "url": "https://images.example.com/fedora.qcow2",
                        "checksum": "sha256:" + "0123456789abcdef" * 4,
                    }
                },
                "storage": {"resources": {"requests": {"storage": "1Gi"}}},
            },
        },
        {
            "apiVersion": "cdi.kubevirt.io/v1beta1",
            "kind": "DataVolume",
            "metadata": {"name": "dv-blank", "namespace": namespace},
            "spec": {
                "source": {"blank": {}},
                "storage": {
                    "accessModes": ["ReadWriteOnce"],
                    "volumeMode": "Block",
                    "storageClassName": "local",
                    "resources": {"requests": {"storage": "500Mi"}},
                },
            },
        },
        {
            "apiVersion": "cdi.kubevirt.io/v1beta1",
            "kind": "DataVolume",
            "metadata": {"name": "dv-clone", "namespace": namespace},
            "spec": {
                "source": {"pvc": {"namespace": namespace, "name": "golden"}},
                "storage": {},
            },
        },
        {
            "apiVersion": "cdi.kubevirt.io/v1beta1",
            "kind": "DataVolume",
            "metadata": {"name": "dv-registry", "namespace": namespace},
            "spec": {
                "source": {"registry": {"url": "docker://quay.io/containerdisks/fedora:40"}},
                "storage": {"resources": {"requests": {"storage": "5Gi"}}},
            },
        },
    ]
    return yaml.safe_dump_all(docs, sort_keys=False)


def blank_dv(name: str, namespace: str, **metadata: object) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "cdi.kubevirt.io/v1beta1",
            "kind": "DataVolume",
            "metadata": {"name": name, "namespace": namespace, **metadata},
            "spec": {
                "source": {"blank": {}},
                "storage": {"resources": {"requests": {"storage": "1Gi"}}},
            },
        }
    )


def get_json(server: CdiServer, *args: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(server.kubectl("get", *args, "-o", "json").stdout)
    return doc


def names(server: CdiServer, *args: str) -> list[str]:
    out = server.kubectl("get", *args, "-o", "name").stdout
    return sorted(line.rsplit("/", 1)[1] for line in out.split())


def gone(server: CdiServer, *args: str) -> bool:
    proc = server.kubectl("get", *args, "-o", "name", check=False)
    if proc.returncode == 0:
        return False
    assert "NotFound" in proc.stderr, proc.stderr
    return True


def columns(stdout: str) -> list[dict[str, str]]:
    """Fixed-width `kubectl` output (cells may be empty) as one dict per row, by header."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    header = lines[0]
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    keys = header.split()
    bounds = list(zip(starts, [*starts[1:], None], strict=True))
    return [
        {key: line[a:b].strip() for key, (a, b) in zip(keys, bounds, strict=True)}
        for line in lines[1:]
    ]


def table(stdout: str) -> list[list[str]]:
    """`kubectl get` default output as rows of cells (cells separated by 2+ spaces)."""
    return [re.split(r"\s{2,}", line.strip()) for line in stdout.splitlines() if line.strip()]


# --- discovery ------------------------------------------------------------------------------


def test_get_ns_lists_the_default_namespaces(cdi_server: CdiServer) -> None:
    rows = table(cdi_server.kubectl("get", "ns").stdout)
    assert rows[0] == ["NAME", "STATUS", "AGE"]
    by_name = {row[0]: row for row in rows[1:]}
    for ns in ("default", "kube-system", "kube-public", "cdi"):
        assert by_name[ns][1] == "Active"


def test_version_reports_the_server(cdi_server: CdiServer) -> None:
    doc = json.loads(cdi_server.kubectl("version", "-o", "json").stdout)
    assert doc["serverVersion"]["major"] == "1"
    assert doc["serverVersion"]["minor"] == "30"


def test_api_resources_lists_cdi_kinds_with_short_names_and_scope(cdi_server: CdiServer) -> None:
    out = cdi_server.kubectl("api-resources", "--api-group=cdi.kubevirt.io", "-o", "wide").stdout
    rows = columns(out)
    assert list(rows[0])[:5] == ["NAME", "SHORTNAMES", "APIVERSION", "NAMESPACED", "KIND"]
    by_name = {row["NAME"]: row for row in rows}
    expected = {
        "datavolumes": ("dv", "true", "DataVolume"),
        "datasources": ("das", "true", "DataSource"),
        "dataimportcrons": ("dic", "true", "DataImportCron"),
    }
    for plural, (short, namespaced, kind) in expected.items():
        row = by_name[plural]
        assert short in row["SHORTNAMES"].split(","), row
        assert row["APIVERSION"] == "cdi.kubevirt.io/v1beta1"
        assert row["NAMESPACED"] == namespaced
        assert row["KIND"] == kind
        assert {"create", "delete", "get", "list", "patch", "update", "watch"} <= set(
            re.split(r"[,\s]+", row["VERBS"].strip("[]"))
        ), row
    for cluster_scoped in ("cdis", "cdiconfigs", "storageprofiles"):
        assert by_name[cluster_scoped]["NAMESPACED"] == "false"

    namespaced = cdi_server.kubectl("api-resources", "--namespaced=true", "-o", "name").stdout
    cluster = cdi_server.kubectl("api-resources", "--namespaced=false", "-o", "name").stdout
    assert "datavolumes.cdi.kubevirt.io" in namespaced.split()
    assert "configmaps" in namespaced.split()
    assert "datavolumes.cdi.kubevirt.io" not in cluster.split()
    assert {"namespaces", "cdis.cdi.kubevirt.io", "storageclasses.storage.k8s.io"} <= set(
        cluster.split()
    )


def test_short_names_resolve(cdi_server: CdiServer, namespace: str) -> None:
    cdi_server.kubectl("apply", "-f", "-", input=blank_dv("short", namespace))
    for alias in ("dv", "dvs", "datavolume", "datavolumes", "datavolumes.cdi.kubevirt.io"):
        assert names(cdi_server, alias, "-n", namespace) == ["short"], alias
    for alias in ("das", "dic"):
        proc = cdi_server.kubectl("get", alias, "-n", namespace)
        assert "No resources found" in proc.stderr


# --- apply, get, describe -------------------------------------------------------------------


def test_apply_datavolumes_and_get_dv_columns(cdi_server: CdiServer, namespace: str) -> None:
    proc = cdi_server.kubectl("apply", "-f", "-", input=dv_manifests(namespace))
    assert proc.stdout.split("\n")[:4] == [
        f"{DV_RESOURCE}/{n} created" for n in ("dv-http", "dv-blank", "dv-clone", "dv-registry")
    ]
    cdi_server.kubectl(
        "patch", "dv", "dv-http", "-n", namespace, "--subresource=status", "--type=merge",
        "-p", '{"status":{"phase":"ImportInProgress","progress":"45.50%","restartCount":2}}',
    )  # fmt: skip
    rows = table(cdi_server.kubectl("get", "dv", "-n", namespace).stdout)
    assert rows[0] == ["NAME", "PHASE", "PROGRESS", "RESTARTS", "AGE"]
    assert sorted(row[0] for row in rows[1:]) == ["dv-blank", "dv-clone", "dv-http", "dv-registry"]
    http = next(row for row in rows if row[0] == "dv-http")
    assert http[1:4] == ["ImportInProgress", "45.50%", "2"]
    assert re.fullmatch(r"\d+s", http[4]), http
    blank = next(row for row in rows if row[0] == "dv-blank")
    assert len(blank) == 2 and re.fullmatch(r"\d+s", blank[1]), blank  # empty cells

    # -A adds the NAMESPACE column; -o wide keeps the printer columns.
    rows = table(cdi_server.kubectl("get", "dv", "-A").stdout)
    assert rows[0] == ["NAMESPACE", "NAME", "PHASE", "PROGRESS", "RESTARTS", "AGE"]
    assert sum(1 for row in rows[1:] if row[0] == namespace) == 4


def test_get_dv_yaml_and_json_carry_server_metadata(cdi_server: CdiServer, namespace: str) -> None:
    cdi_server.kubectl("apply", "-f", "-", input=dv_manifests(namespace))
    as_yaml = yaml.safe_load(
        cdi_server.kubectl("get", "dv", "dv-http", "-n", namespace, "-o", "yaml").stdout
    )
    as_json = get_json(cdi_server, "dv", "dv-http", "-n", namespace)
    assert as_yaml == as_json
    assert as_json["apiVersion"] == "cdi.kubevirt.io/v1beta1"
    assert as_json["kind"] == "DataVolume"
    md = as_json["metadata"]
    assert UUID.match(md["uid"]), md
    assert md["resourceVersion"].isdigit(), md
    assert md["generation"] == 1
    assert TIMESTAMP.match(md["creationTimestamp"]), md
    assert md["namespace"] == namespace
    assert "kubectl.kubernetes.io/last-applied-configuration" in md["annotations"]
    assert as_json["spec"]["source"]["http"] == {
        "url": "https://images.example.com/fedora.qcow2",
        "checksum": "sha256:" + "0123456789abcdef" * 4,
    }
    blank = get_json(cdi_server, "dv", "dv-blank", "-n", namespace)
    assert blank["spec"]["storage"]["volumeMode"] == "Block"
    clone = get_json(cdi_server, "dv", "dv-clone", "-n", namespace)
    assert clone["spec"]["source"]["pvc"] == {"namespace": namespace, "name": "golden"}
    # distinct objects, distinct identities
    uids = {get_json(cdi_server, "dv", n, "-n", namespace)["metadata"]["uid"] for n in
            ("dv-http", "dv-blank", "dv-clone", "dv-registry")}  # fmt: skip
    assert len(uids) == 4
    # a list of them, as JSON
    listed = get_json(cdi_server, "dv", "-n", namespace)
    assert listed["kind"] == "List" and len(listed["items"]) == 4


def test_reapply_with_a_change_bumps_generation(cdi_server: CdiServer, namespace: str) -> None:
    manifests = dv_manifests(namespace)
    cdi_server.kubectl("apply", "-f", "-", input=manifests)
    before = get_json(cdi_server, "dv", "dv-http", "-n", namespace)["metadata"]

    again = cdi_server.kubectl("apply", "-f", "-", input=manifests)
    assert f"{DV_RESOURCE}/dv-http unchanged" in again.stdout.splitlines()
    same = get_json(cdi_server, "dv", "dv-http", "-n", namespace)["metadata"]
    assert same["generation"] == 1
    assert same["resourceVersion"] == before["resourceVersion"]

    changed = manifests.replace("fedora.qcow2", "fedora-41.qcow2")
    proc = cdi_server.kubectl("apply", "-f", "-", input=changed)
    lines = proc.stdout.splitlines()
    assert f"{DV_RESOURCE}/dv-http configured" in lines
    assert f"{DV_RESOURCE}/dv-blank unchanged" in lines
    after = get_json(cdi_server, "dv", "dv-http", "-n", namespace)
    assert after["metadata"]["generation"] == 2
    assert after["metadata"]["uid"] == before["uid"]
    assert after["metadata"]["creationTimestamp"] == before["creationTimestamp"]
    assert int(after["metadata"]["resourceVersion"]) > int(before["resourceVersion"])
    assert after["spec"]["source"]["http"]["url"].endswith("fedora-41.qcow2")

    # metadata-only changes do not bump generation
    cdi_server.kubectl("label", "dv", "dv-http", "-n", namespace, "touched=yes")
    labelled = get_json(cdi_server, "dv", "dv-http", "-n", namespace)["metadata"]
    assert labelled["generation"] == 2
    assert labelled["labels"] == {"touched": "yes"}


def test_describe_dv(cdi_server: CdiServer, namespace: str) -> None:
    cdi_server.kubectl("apply", "-f", "-", input=dv_manifests(namespace))
    out = cdi_server.kubectl("describe", "dv", "dv-http", "-n", namespace).stdout
    fields = {
        m.group(1): m.group(2)
        for line in out.splitlines()
        if (m := re.match(r"^(\S[^:]*):\s*(.*)$", line)) is not None
    }
    assert fields["Name"] == "dv-http"
    assert fields["Namespace"] == namespace
    assert fields["API Version"] == "cdi.kubevirt.io/v1beta1"
    assert fields["Kind"] == "DataVolume"
    assert "https://images.example.com/fedora.qcow2" in out
    assert re.search(r"Checksum:\s+sha256:0123", out), out
    assert re.search(r"UID:\s+[0-9a-f-]{36}", out), out
    # `describe dv` without a name describes each one
    everything = cdi_server.kubectl("describe", "dv", "-n", namespace).stdout
    assert len(re.findall(r"^Name:\s", everything, re.M)) == 4


# --- patch ----------------------------------------------------------------------------------


def test_patch_merge_configmap_and_dv(cdi_server: CdiServer, namespace: str) -> None:
    cdi_server.kubectl("create", "configmap", "cfg", "-n", namespace, "--from-literal=a=1")
    proc = cdi_server.kubectl(
        "patch", "cm", "cfg", "-n", namespace, "--type=merge",
        "-p", '{"data":{"b":"2","a":null}}',
    )  # fmt: skip
    assert proc.stdout.strip() == "configmap/cfg patched"
    assert get_json(cdi_server, "cm", "cfg", "-n", namespace)["data"] == {"b": "2"}

    cdi_server.kubectl("apply", "-f", "-", input=blank_dv("merge", namespace))
    cdi_server.kubectl(
        "patch", "dv", "merge", "-n", namespace, "--type=merge",
        "-p", '{"spec":{"storage":{"resources":{"requests":{"storage":"2Gi"}}}}}',
    )  # fmt: skip
    dv = get_json(cdi_server, "dv", "merge", "-n", namespace)
    assert dv["spec"]["storage"]["resources"]["requests"]["storage"] == "2Gi"
    assert dv["spec"]["source"] == {"blank": {}}
    assert dv["metadata"]["generation"] == 2
    # the same patch again changes nothing
    proc = cdi_server.kubectl(
        "patch", "dv", "merge", "-n", namespace, "--type=merge",
        "-p", '{"spec":{"storage":{"resources":{"requests":{"storage":"2Gi"}}}}}',
    )  # fmt: skip
    assert proc.stdout.strip() == f"{DV_RESOURCE}/merge patched (no change)"
    again = get_json(cdi_server, "dv", "merge", "-n", namespace)
    assert again["metadata"]["resourceVersion"] == dv["metadata"]["resourceVersion"]


def test_patch_json_configmap_and_dv(cdi_server: CdiServer, namespace: str) -> None:
    cdi_server.kubectl("create", "configmap", "cfg", "-n", namespace, "--from-literal=a=1")
    cdi_server.kubectl(
        "patch", "cm", "cfg", "-n", namespace, "--type=json",
        "-p", '[{"op":"add","path":"/data/b","value":"2"},{"op":"remove","path":"/data/a"}]',
    )  # fmt: skip
    assert get_json(cdi_server, "cm", "cfg", "-n", namespace)["data"] == {"b": "2"}

    cdi_server.kubectl("apply", "-f", "-", input=dv_manifests(namespace))
    cdi_server.kubectl(
        "patch", "dv", "dv-http", "-n", namespace, "--type=json",
        "-p", '[{"op":"replace","path":"/spec/source/http/url","value":"https://x.example/b.img"},'
        '{"op":"remove","path":"/spec/source/http/checksum"}]',
    )  # fmt: skip
    http = get_json(cdi_server, "dv", "dv-http", "-n", namespace)["spec"]["source"]["http"]
    assert http == {"url": "https://x.example/b.img"}

    # a failing `test` op rejects the whole patch
    before = get_json(cdi_server, "cm", "cfg", "-n", namespace)
    proc = cdi_server.kubectl(
        "patch", "cm", "cfg", "-n", namespace, "--type=json",
        "-p", '[{"op":"add","path":"/data/c","value":"3"},'
        '{"op":"test","path":"/data/b","value":"not-2"}]',
        check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    # a 422 without details, as kube-apiserver answers a failed JSON-patch test
    assert proc.stderr.startswith("The request is invalid: "), proc.stderr
    assert "test failed" in proc.stderr, proc.stderr
    assert get_json(cdi_server, "cm", "cfg", "-n", namespace) == before


def test_patch_strategic_configmap_and_service_but_not_dv(
    cdi_server: CdiServer, namespace: str
) -> None:
    cdi_server.kubectl("create", "configmap", "cfg", "-n", namespace, "--from-literal=a=1")
    cdi_server.kubectl(
        "patch", "cm", "cfg", "-n", namespace, "--type=strategic",
        "-p", '{"metadata":{"labels":{"x":"y"}},"data":{"b":"2"}}',
    )  # fmt: skip
    cm = get_json(cdi_server, "cm", "cfg", "-n", namespace)
    assert cm["data"] == {"a": "1", "b": "2"}
    assert cm["metadata"]["labels"] == {"x": "y"}

    # strategic merge merges lists by their merge key (ports by port), unlike a merge patch
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80}]},
    }
    cdi_server.kubectl("apply", "-f", "-", input=json.dumps(service))
    cdi_server.kubectl(
        "patch", "svc", "web", "-n", namespace,
        "-p", '{"spec":{"ports":[{"name":"https","port":443}]}}',
    )  # fmt: skip  # kubectl's default patch type is strategic
    ports = get_json(cdi_server, "svc", "web", "-n", namespace)["spec"]["ports"]
    assert sorted(p["port"] for p in ports) == [80, 443]

    cdi_server.kubectl("apply", "-f", "-", input=blank_dv("smp", namespace))
    before = get_json(cdi_server, "dv", "smp", "-n", namespace)
    proc = cdi_server.kubectl(
        "patch", "dv", "smp", "-n", namespace, "--type=strategic",
        "-p", '{"metadata":{"labels":{"x":"y"}}}', check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    # kubectl words it so only for a 415 Unsupported Media Type from the server
    assert STRATEGIC_415 in proc.stderr, proc.stderr
    assert "application/merge-patch+json" in proc.stderr
    assert get_json(cdi_server, "dv", "smp", "-n", namespace) == before


# --- labels, annotations, selectors ----------------------------------------------------------


def test_label_and_annotate(cdi_server: CdiServer, namespace: str) -> None:
    cdi_server.kubectl("apply", "-f", "-", input=blank_dv("lab", namespace))
    proc = cdi_server.kubectl("label", "dv", "lab", "-n", namespace, "env=prod", "tier=gold")
    assert proc.stdout.strip() == f"{DV_RESOURCE}/lab labeled"
    refused = cdi_server.kubectl("label", "dv", "lab", "-n", namespace, "env=dev", check=False)
    assert refused.returncode != 0
    assert "already has a value (prod)" in refused.stderr
    cdi_server.kubectl("label", "dv", "lab", "-n", namespace, "env=dev", "--overwrite")
    cdi_server.kubectl("label", "dv", "lab", "-n", namespace, "tier-")
    proc = cdi_server.kubectl("annotate", "dv", "lab", "-n", namespace, "note=hello world")
    assert proc.stdout.strip() == f"{DV_RESOURCE}/lab annotated"
    md = get_json(cdi_server, "dv", "lab", "-n", namespace)["metadata"]
    assert md["labels"] == {"env": "dev"}
    assert md["annotations"]["note"] == "hello world"
    cdi_server.kubectl("annotate", "dv", "lab", "-n", namespace, "note-")
    md = get_json(cdi_server, "dv", "lab", "-n", namespace)["metadata"]
    assert "note" not in md.get("annotations", {})
    assert md["generation"] == 1

    # labels on a ConfigMap too, and --all
    for name in ("c1", "c2"):
        cdi_server.kubectl("create", "configmap", name, "-n", namespace)
    cdi_server.kubectl("label", "cm", "--all", "-n", namespace, "batch=one")
    assert names(cdi_server, "cm", "-n", namespace, "-l", "batch=one") == ["c1", "c2"]


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("env=prod", ["a"]),
        ("env==prod", ["a"]),
        ("env!=prod", ["b", "c", "d"]),
        ("env in (prod,dev)", ["a", "b"]),
        ("env notin (prod)", ["b", "c", "d"]),
        ("env", ["a", "b"]),
        ("!env", ["c", "d"]),
        ("tier=gold,env", ["a"]),
        ("tier in (gold),env notin (dev)", ["a", "c"]),
    ],
)
def test_get_with_label_selector(
    cdi_server: CdiServer, namespace: str, selector: str, expected: list[str]
) -> None:
    labels = {"a": "env=prod,tier=gold", "b": "env=dev,tier=silver", "c": "tier=gold", "d": ""}
    docs = [
        blank_dv(
            name,
            namespace,
            labels=dict(kv.split("=") for kv in spec.split(",")) if spec else {},
        )
        for name, spec in labels.items()
    ]
    cdi_server.kubectl("apply", "-f", "-", input="---\n".join(docs))
    assert names(cdi_server, "dv", "-n", namespace, "-l", selector) == expected


def test_get_with_field_selector(cdi_server: CdiServer, namespace: str) -> None:
    for name in ("one", "two", "three"):
        cdi_server.kubectl("apply", "-f", "-", input=blank_dv(name, namespace))
    assert names(cdi_server, "dv", "-n", namespace, "--field-selector", "metadata.name=two") == [
        "two"
    ]
    assert names(cdi_server, "dv", "-n", namespace, "--field-selector", "metadata.name!=two") == [
        "one",
        "three",
    ]
    assert names(cdi_server, "dv", "-A", "--field-selector", f"metadata.namespace={namespace}") == [
        "one",
        "three",
        "two",
    ]
    proc = cdi_server.kubectl(
        "get", "dv", "-n", namespace, "--field-selector", "metadata.name=nope"
    )
    assert proc.stdout == ""
    assert "No resources found" in proc.stderr


def test_get_in_chunks(cdi_server: CdiServer, namespace: str) -> None:
    for i in range(5):
        cdi_server.kubectl("create", "configmap", f"chunk-{i}", "-n", namespace)
    listed = names(cdi_server, "cm", "-n", namespace, "--chunk-size=2")
    assert [n for n in listed if n.startswith("chunk-")] == [f"chunk-{i}" for i in range(5)]
    rows = table(cdi_server.kubectl("get", "cm", "-n", namespace, "--chunk-size=2").stdout)
    assert rows[0] == ["NAME", "DATA", "AGE"]  # one header, not one per chunk
    assert sum(1 for row in rows[1:] if row[0].startswith("chunk-")) == 5

    # the pages kubectl walks: 2 + 2 + 1, each with a continue token but the last
    path = f"/api/v1/namespaces/{namespace}/configmaps?limit=2"
    seen: list[str] = []
    pages = 0
    rvs = set()
    while True:
        page = json.loads(cdi_server.kubectl("get", "--raw", path).stdout)
        pages += 1
        seen += [item["metadata"]["name"] for item in page["items"]]
        rvs.add(page["metadata"]["resourceVersion"])
        token = page["metadata"].get("continue")
        if not token:
            break
        assert len(page["items"]) == 2
        path = f"/api/v1/namespaces/{namespace}/configmaps?limit=2&continue={token}"
        assert pages < 10
    chunked = [n for n in seen if n.startswith("chunk-")]
    assert chunked == [f"chunk-{i}" for i in range(5)]
    assert len(seen) == len(set(seen))
    assert len(rvs) == 1  # every page at the first page's resourceVersion


# --- delete ---------------------------------------------------------------------------------


def test_delete(cdi_server: CdiServer, namespace: str) -> None:
    cdi_server.kubectl("apply", "-f", "-", input=blank_dv("bye", namespace))
    proc = cdi_server.kubectl("delete", "dv", "bye", "-n", namespace)
    assert proc.stdout.strip() == f'{DV_RESOURCE} "bye" deleted'
    proc = cdi_server.kubectl("get", "dv", "bye", "-n", namespace, check=False)
    assert proc.returncode == 1
    assert (
        proc.stderr.strip()
        == 'Error from server (NotFound): datavolumes.cdi.kubevirt.io "bye" not found'
    )
    proc = cdi_server.kubectl("delete", "dv", "bye", "-n", namespace, check=False)
    assert proc.returncode == 1
    assert 'datavolumes.cdi.kubevirt.io "bye" not found' in proc.stderr


def test_delete_waits_for_finalizers(cdi_server: CdiServer, namespace: str) -> None:
    held = json.dumps(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "held", "namespace": namespace,
                         "finalizers": ["example.com/hold"]},
        }
    )  # fmt: skip
    cdi_server.kubectl("apply", "-f", "-", input=held)
    proc = cdi_server.kubectl("delete", "cm", "held", "-n", namespace, "--wait=false")
    assert proc.stdout.strip() == 'configmap "held" deleted'
    md = get_json(cdi_server, "cm", "held", "-n", namespace)["metadata"]
    assert TIMESTAMP.match(md["deletionTimestamp"]), md
    assert md["finalizers"] == ["example.com/hold"]
    # no new finalizers while terminating
    proc = cdi_server.kubectl(
        "patch", "cm", "held", "-n", namespace, "--type=merge",
        "-p", '{"metadata":{"finalizers":["example.com/hold","example.com/more"]}}', check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "no new finalizers can be added if the object is being deleted" in proc.stderr
    cdi_server.kubectl(
        "patch", "cm", "held", "-n", namespace, "--type=json",
        "-p", '[{"op":"remove","path":"/metadata/finalizers"}]',
    )  # fmt: skip
    assert gone(cdi_server, "cm", "held", "-n", namespace)


def _owned_configmap(
    name: str, namespace: str, owner: dict[str, Any], *, block: bool = True
) -> str:
    md = owner["metadata"]
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "ownerReferences": [
                    {
                        "apiVersion": owner["apiVersion"],
                        "kind": owner["kind"],
                        "name": md["name"],
                        "uid": md["uid"],
                        "blockOwnerDeletion": block,
                    }
                ],
            },
            "data": {"owned": "yes"},
        }
    )


def test_delete_cascade_foreground_removes_dependents_first(
    cdi_server: CdiServer, namespace: str
) -> None:
    cdi_server.kubectl("apply", "-f", "-", input=blank_dv("owner", namespace))
    owner = get_json(cdi_server, "dv", "owner", "-n", namespace)
    cdi_server.kubectl("apply", "-f", "-", input=_owned_configmap("dep", namespace, owner))
    cdi_server.kubectl("create", "configmap", "bystander", "-n", namespace)

    proc = cdi_server.kubectl(
        "delete", "dv", "owner", "-n", namespace, "--cascade=foreground", "--wait=false"
    )
    assert proc.stdout.strip() == f'{DV_RESOURCE} "owner" deleted'
    poll(lambda: gone(cdi_server, "dv", "owner", "-n", namespace), what="owner DV to go")
    # foreground: the owner only goes once its (blocking) dependents are gone
    assert gone(cdi_server, "cm", "dep", "-n", namespace)
    assert names(cdi_server, "cm", "bystander", "-n", namespace) == ["bystander"]


def test_delete_cascade_background_and_orphan(cdi_server: CdiServer, namespace: str) -> None:
    cdi_server.kubectl("create", "configmap", "owner-bg", "-n", namespace)
    cdi_server.kubectl("create", "configmap", "owner-or", "-n", namespace)
    bg = get_json(cdi_server, "cm", "owner-bg", "-n", namespace)
    orphaning = get_json(cdi_server, "cm", "owner-or", "-n", namespace)
    cdi_server.kubectl("apply", "-f", "-", input=_owned_configmap("dep-bg", namespace, bg))
    cdi_server.kubectl(
        "apply", "-f", "-", input=_owned_configmap("dep-or", namespace, orphaning, block=False)
    )

    cdi_server.kubectl("delete", "cm", "owner-bg", "-n", namespace)  # background by default
    poll(lambda: gone(cdi_server, "cm", "dep-bg", "-n", namespace), what="background GC")

    cdi_server.kubectl("delete", "cm", "owner-or", "-n", namespace, "--cascade=orphan")
    poll(lambda: gone(cdi_server, "cm", "owner-or", "-n", namespace), what="orphaning owner")
    dep = get_json(cdi_server, "cm", "dep-or", "-n", namespace)
    assert not dep["metadata"].get("ownerReferences"), dep["metadata"]


def test_delete_namespace_removes_what_it_holds(cdi_server: CdiServer) -> None:
    ns = "doomed-ns"
    cdi_server.kubectl("create", "ns", ns)
    cdi_server.kubectl("create", "configmap", "inside", "-n", ns)
    cdi_server.kubectl("apply", "-f", "-", input=blank_dv("inside-dv", ns))
    cdi_server.kubectl("create", "configmap", "outside", "-n", "default")
    try:
        proc = cdi_server.kubectl("delete", "ns", ns, "--wait=false")
        assert proc.stdout.strip() == f'namespace "{ns}" deleted'
        poll(lambda: gone(cdi_server, "ns", ns), what="namespace to go")
        for kind in ("cm", "dv"):
            proc = cdi_server.kubectl("get", kind, "-n", ns, "-o", "name")
            assert proc.stdout == "", proc.stdout
        # same name again: a new, empty namespace
        cdi_server.kubectl("create", "ns", ns)
        assert cdi_server.kubectl("get", "cm,dv", "-n", ns, "-o", "name").stdout == ""
        assert names(cdi_server, "cm", "outside", "-n", "default") == ["outside"]
    finally:
        cdi_server.kubectl("delete", "cm", "outside", "-n", "default", check=False)


# --- watch ----------------------------------------------------------------------------------


class Background:
    """A kubectl process whose output lines are collected by a thread."""

    def __init__(self, server: CdiServer, *args: str) -> None:
        self.proc = subprocess.Popen(
            [KUBECTL, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env=server.kubectl_env(),
        )
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 10.0) -> str:
        regex = re.compile(pattern)
        line: str = poll(
            lambda: next((line for line in self.lines if regex.search(line)), None),
            timeout=timeout,
            interval=0.05,
            what=f"{pattern!r} in {self.lines!r}",
        )
        return line

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._thread.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def background() -> Iterator[list[Background]]:
    started: list[Background] = []
    yield started
    for proc in started:
        proc.stop()


def test_get_watch_sees_added_then_modified(
    cdi_server: CdiServer, namespace: str, background: list[Background]
) -> None:
    cdi_server.kubectl("create", "configmap", "watched", "-n", namespace)
    watcher = Background(
        cdi_server, "get", "cm", "watched", "-n", namespace, "-w", "--output-watch-events"
    )
    background.append(watcher)
    watcher.wait_for(r"^ADDED\s+watched\s+0\s")
    cdi_server.kubectl(
        "patch", "cm", "watched", "-n", namespace, "--type=merge", "-p", '{"data":{"k":"v"}}'
    )
    watcher.wait_for(r"^MODIFIED\s+watched\s+1\s")
    cdi_server.kubectl("delete", "cm", "watched", "-n", namespace)
    watcher.wait_for(r"^DELETED\s+watched\s")
    events = [line.split()[0] for line in watcher.lines if not line.startswith("EVENT")]
    assert events == ["ADDED", "MODIFIED", "DELETED"], watcher.lines


def test_get_watch_on_dvs_shows_printer_columns(
    cdi_server: CdiServer, namespace: str, background: list[Background]
) -> None:
    watcher = Background(cdi_server, "get", "dv", "-n", namespace, "-w", "--output-watch-events")
    background.append(watcher)
    time.sleep(0.5)  # the watch is open (no objects yet, so nothing to wait for)
    cdi_server.kubectl("apply", "-f", "-", input=blank_dv("live", namespace))
    watcher.wait_for(r"^ADDED\s+live\s")
    cdi_server.kubectl(
        "patch", "dv", "live", "-n", namespace, "--subresource=status", "--type=merge",
        "-p", '{"status":{"phase":"Succeeded","progress":"100.0%"}}',
    )  # fmt: skip
    line = watcher.wait_for(r"^MODIFIED\s+live\s")
    assert re.search(r"Succeeded\s+100\.0%", line), line


# --- status subresource ---------------------------------------------------------------------


def test_status_subresource_keeps_spec_and_status_apart(
    cdi_server: CdiServer, namespace: str
) -> None:
    cdi_server.kubectl("apply", "-f", "-", input=blank_dv("st", namespace))
    proc = cdi_server.kubectl(
        "patch", "dv", "st", "-n", namespace, "--subresource=status", "--type=merge",
        "-p", '{"status":{"phase":"ImportInProgress","progress":"12.00%"}}',
    )  # fmt: skip
    assert proc.stdout.strip() == f"{DV_RESOURCE}/st patched"
    dv = get_json(cdi_server, "dv", "st", "-n", namespace)
    assert dv["status"] == {"phase": "ImportInProgress", "progress": "12.00%"}
    assert dv["metadata"]["generation"] == 1  # status writes do not bump generation

    # a plain patch of status is ignored
    proc = cdi_server.kubectl(
        "patch", "dv", "st", "-n", namespace, "--type=merge",
        "-p", '{"status":{"phase":"Failed"}}',
    )  # fmt: skip
    assert proc.stdout.strip() == f"{DV_RESOURCE}/st patched (no change)"
    after = get_json(cdi_server, "dv", "st", "-n", namespace)
    assert after["status"]["phase"] == "ImportInProgress"
    assert after["metadata"]["resourceVersion"] == dv["metadata"]["resourceVersion"]

    # and spec sent to the status subresource is ignored
    cdi_server.kubectl(
        "patch", "dv", "st", "-n", namespace, "--subresource=status", "--type=merge",
        "-p", '{"spec":{"source":{"http":{"url":"https://x.example/a"}}},'
        '"status":{"phase":"Succeeded"}}',
    )  # fmt: skip
    final = get_json(cdi_server, "dv", "st", "-n", namespace)
    assert final["spec"]["source"] == {"blank": {}}
    assert final["status"]["phase"] == "Succeeded"
    assert final["metadata"]["generation"] == 1

    # kubectl get --subresource=status reads it back
    status = get_json(cdi_server, "dv", "st", "-n", namespace, "--subresource=status")
    assert status["status"]["phase"] == "Succeeded"


# --- RBAC -----------------------------------------------------------------------------------


def _grant_alice_configmap_reading(server: CdiServer, namespace: str) -> None:
    docs = [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "cm-reader", "namespace": namespace},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "alice-cm-reader", "namespace": namespace},
            "subjects": [
                {"kind": "User", "name": "alice", "apiGroup": "rbac.authorization.k8s.io"}
            ],
            "roleRef": {
                "kind": "Role",
                "name": "cm-reader",
                "apiGroup": "rbac.authorization.k8s.io",
            },
        },
    ]
    server.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))


def test_auth_can_i_for_a_limited_user(cdi_server: CdiServer, namespace: str) -> None:
    _grant_alice_configmap_reading(cdi_server, namespace)
    alice = cdi_server.user_kubeconfig("alice")
    bob = cdi_server.user_kubeconfig("bob")

    def can_i(kubeconfig: Path, *args: str) -> tuple[str, int]:
        proc = cdi_server.kubectl("auth", "can-i", *args, user_kubeconfig=kubeconfig, check=False)
        return proc.stdout.strip().split(" ")[0], proc.returncode

    assert can_i(alice, "get", "configmaps", "-n", namespace) == ("yes", 0)
    assert can_i(alice, "list", "configmaps", "-n", namespace) == ("yes", 0)
    assert can_i(alice, "get", "configmaps/some-name", "-n", namespace) == ("yes", 0)
    assert can_i(alice, "get", "configmaps", "-n", "default") == ("no", 1)
    assert can_i(alice, "delete", "configmaps", "-n", namespace) == ("no", 1)
    assert can_i(alice, "create", "configmaps", "-n", namespace) == ("no", 1)
    assert can_i(alice, "get", "secrets", "-n", namespace) == ("no", 1)
    assert can_i(alice, "get", "datavolumes", "-n", namespace) == ("no", 1)
    assert can_i(bob, "get", "configmaps", "-n", namespace) == ("no", 1)
    # the admin can do anything
    assert can_i(cdi_server.kubeconfig, "delete", "configmaps", "-n", namespace) == ("yes", 0)


def test_forbidden_error_text_for_a_limited_user(cdi_server: CdiServer, namespace: str) -> None:
    _grant_alice_configmap_reading(cdi_server, namespace)
    cdi_server.kubectl("create", "configmap", "readable", "-n", namespace, "--from-literal=k=v")
    cdi_server.kubectl("apply", "-f", "-", input=blank_dv("hidden", namespace))
    alice = cdi_server.user_kubeconfig("alice")

    ok = cdi_server.kubectl("get", "cm", "readable", "-n", namespace, "-o", "json",
                            user_kubeconfig=alice)  # fmt: skip
    assert json.loads(ok.stdout)["data"] == {"k": "v"}
    assert (
        "readable" in cdi_server.kubectl("get", "cm", "-n", namespace, user_kubeconfig=alice).stdout
    )

    def denied(*args: str) -> str:
        proc = cdi_server.kubectl(*args, user_kubeconfig=alice, check=False)
        assert proc.returncode == 1, proc
        return proc.stderr.strip()

    assert denied("get", "cm", "-n", "default") == (
        'Error from server (Forbidden): configmaps is forbidden: User "alice" cannot list '
        'resource "configmaps" in API group "" in the namespace "default"'
    )
    assert denied("delete", "cm", "readable", "-n", namespace) == (
        'Error from server (Forbidden): configmaps "readable" is forbidden: User "alice" cannot '
        f'delete resource "configmaps" in API group "" in the namespace "{namespace}"'
    )
    assert denied("get", "dv", "hidden", "-n", namespace) == (
        'Error from server (Forbidden): datavolumes.cdi.kubevirt.io "hidden" is forbidden: '
        'User "alice" cannot get resource "datavolumes" in API group "cdi.kubevirt.io" in the '
        f'namespace "{namespace}"'
    )
    assert denied("get", "ns") == (
        'Error from server (Forbidden): namespaces is forbidden: User "alice" cannot list '
        'resource "namespaces" in API group "" at the cluster scope'
    )
    message = denied("create", "configmap", "sneaky", "-n", namespace)
    assert 'User "alice" cannot create resource "configmaps"' in message
    assert gone(cdi_server, "cm", "sneaky", "-n", namespace)
    assert names(cdi_server, "cm", "readable", "-n", namespace) == ["readable"]


# --- errors ---------------------------------------------------------------------------------


def test_create_twice_is_already_exists(cdi_server: CdiServer, namespace: str) -> None:
    manifest = blank_dv("twice", namespace)
    cdi_server.kubectl("create", "-f", "-", input=manifest)
    before = get_json(cdi_server, "dv", "twice", "-n", namespace)
    proc = cdi_server.kubectl("create", "-f", "-", input=manifest, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        'Error from server (AlreadyExists): error when creating "STDIN": '
        'datavolumes.cdi.kubevirt.io "twice" already exists'
    )
    assert get_json(cdi_server, "dv", "twice", "-n", namespace) == before


def test_replace_with_a_stale_resource_version_is_a_conflict(
    cdi_server: CdiServer, namespace: str
) -> None:
    cdi_server.kubectl("apply", "-f", "-", input=blank_dv("stale", namespace))
    old = cdi_server.kubectl("get", "dv", "stale", "-n", namespace, "-o", "yaml").stdout
    cdi_server.kubectl("annotate", "dv", "stale", "-n", namespace, "first=wins")
    current = get_json(cdi_server, "dv", "stale", "-n", namespace)

    proc = cdi_server.kubectl("replace", "-f", "-", input=old, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        'Error from server (Conflict): error when replacing "STDIN": Operation cannot be '
        'fulfilled on datavolumes.cdi.kubevirt.io "stale": the object has been modified; '
        "please apply your changes to the latest version and try again"
    )
    assert get_json(cdi_server, "dv", "stale", "-n", namespace) == current

    # with the current resourceVersion it goes through
    fresh = yaml.safe_load(old)
    fresh["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
    fresh["spec"]["storage"]["resources"]["requests"]["storage"] = "3Gi"
    proc = cdi_server.kubectl("replace", "-f", "-", input=yaml.safe_dump(fresh))
    assert proc.stdout.strip() == f"{DV_RESOURCE}/stale replaced"
    assert get_json(cdi_server, "dv", "stale", "-n", namespace)["metadata"]["generation"] == 2


def test_bad_input_through_kubectl(cdi_server: CdiServer, namespace: str) -> None:
    proc = cdi_server.kubectl("create", "configmap", "Bad_Name", "-n", namespace, check=False)
    assert proc.returncode == 1
    assert (
        'ConfigMap "Bad_Name" is invalid: metadata.name: Invalid value: "Bad_Name": a lowercase '
        "RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and "
        "must start and end with an alphanumeric character" in proc.stderr
    )
    unknown = blank_dv("strict", namespace).replace("spec:\n", "spec:\n  bogus: 1\n")
    proc = cdi_server.kubectl("apply", "-f", "-", input=unknown, check=False)
    assert proc.returncode == 1
    assert 'strict decoding error: unknown field "spec.bogus"' in proc.stderr, proc.stderr
    lenient = cdi_server.kubectl(
        "apply", "--validate=warn", "-f", "-",
        input=unknown.replace("name: strict", "name: lenient"),
    )  # fmt: skip
    assert lenient.stdout.strip() == f"{DV_RESOURCE}/lenient created"
    # the server's Warning header, as kubectl shows it
    assert 'Warning: unknown field "spec.bogus"' in lenient.stderr, lenient.stderr
    assert "bogus" not in get_json(cdi_server, "dv", "lenient", "-n", namespace)["spec"]
    bad_type = blank_dv("typed", namespace).replace("blank: {}", "http: {url: 5}")
    proc = cdi_server.kubectl("apply", "-f", "-", input=bad_type, check=False)
    assert proc.returncode == 1
    assert (
        # kubectl's wording of a 422 whose details name the kind
        'The DataVolume "typed" is invalid: spec.source.http.url: Invalid value: '
        '"integer": spec.source.http.url in body must be of type string: "integer"' in proc.stderr
    ), proc.stderr
    raw = cdi_server.kubectl(
        "create", "--raw", f"/api/v1/namespaces/{namespace}/configmaps", "-f", "-",
        input='{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "half"',
        check=False,
    )  # fmt: skip
    assert raw.returncode == 1
    assert "BadRequest" in raw.stderr or "Bad Request" in raw.stderr, raw.stderr
    for kind, name in (("cm", "Bad_Name"), ("dv", "strict"), ("dv", "typed"), ("cm", "half")):
        assert gone(cdi_server, kind, name, "-n", namespace)


# --- the server process ---------------------------------------------------------------------


def test_restart_keeps_what_kubectl_sees(fresh_cdi_server: CdiServer) -> None:
    server = fresh_cdi_server
    server.kubectl("apply", "-f", "-", input=dv_manifests("default"))
    server.kubectl("label", "dv", "dv-blank", "keep=me")
    before = get_json(server, "dv")
    server.restart()
    after = get_json(server, "dv")
    assert after["items"] == before["items"]
    assert names(server, "dv", "-l", "keep=me") == ["dv-blank"]


def test_sigterm_stops_the_server_promptly_with_a_watch_open(
    fresh_cdi_server: CdiServer, background: list[Background]
) -> None:
    server = fresh_cdi_server
    server.kubectl("create", "configmap", "w")
    watcher = Background(server, "get", "cm", "w", "-w", "--output-watch-events")
    background.append(watcher)
    watcher.wait_for(r"^ADDED\s+w\s")
    took = server.stop(timeout=8)  # raises (and kills) when SIGTERM is not enough in time
    assert took < 5, f"cdi server took {took:.1f}s to stop with a watch open"
    assert "cdi server: stopping\n" in server.output


def test_insecure_http_kubeconfig_works_with_kubectl(tmp_path: Path) -> None:
    """`--insecure-http` is the plain-HTTP option for tests; the kubeconfig it writes must work
    with kubectl. kubectl (client-go) does not send bearer tokens over plain HTTP."""
    server = CdiServer(tmp_path / "plain", extra_args=("--insecure-http",))
    server.start()
    try:
        assert server.url.startswith("http://127.0.0.1:")
        proc = server.kubectl("get", "ns", "-o", "name", check=False)
        assert proc.returncode == 0, proc.stderr
        assert "namespace/default" in proc.stdout.split()
    finally:
        server.stop()
