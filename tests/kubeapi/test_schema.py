"""Pruning, defaulting and validation of custom resources against our CRD schemas, and the
object name rules, with the messages Kubernetes gives."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import yaml

from cdi.kubeapi.crds import crd_resource_info, load_crds
from cdi.kubeapi.schema import (
    FieldError,
    FieldErrorType,
    apply_defaults,
    check_custom_resource,
    format_value,
    is_dns1035_label,
    is_dns1123_label,
    is_dns1123_subdomain,
    prune,
    structural_errors,
    validate,
    validate_object_name,
)

SCHEMAS: dict[str, Mapping[str, Any]] = {}
for _crd in load_crds():
    _info = crd_resource_info(_crd)
    for _version in _info.versions:
        assert _version.schema is not None
        SCHEMAS[f"{_info.group}/{_version.name}/{_info.kind}"] = _version.schema


def schema_for(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return SCHEMAS[f"{obj['apiVersion']}/{obj['kind']}"]


def check(obj: dict[str, Any], mode: Any = "Strict") -> list[str]:
    result = check_custom_resource(obj, schema_for(obj), field_validation=mode)
    return [str(e) for e in result.errors]


# DataVolumes as CDI's documentation and examples write them (reference/cdi.md §1.3-1.4, §2).
GOOD_DATAVOLUMES = """
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: http-checksum
spec:
  source:
    http:
      url: "https://download.example.org/fedora-40.qcow2.xz"
      secretRef: endpoint-secret
      certConfigMap: tls-certs
      checksum: "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
      extraHeaders:
        - "X-Trace: 1"
      secretExtraHeaders:
        - auth-header-secret
  pvc:
    accessModes:
      - ReadWriteOnce
    resources:
      requests:
        storage: 500Mi
---
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: http-skip-tls
  annotations:
    cdi.kubevirt.io/storage.bind.immediate.requested: "true"
spec:
  contentType: archive
  source:
    http:
      url: "https://files.example.org/data.tar.gz"
      insecureSkipVerify: true
  storage:
    resources:
      requests:
        storage: 1Gi
---
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: registry-image
spec:
  source:
    registry:
      url: "docker://quay.io/containerdisks/fedora:40"
      pullMethod: node
      secretRef: registry-creds
      certConfigMap: registry-certs
      platform:
        architecture: arm64
  storage:
    resources:
      requests:
        storage: 5Gi
---
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: upload-target
spec:
  source:
    upload: {}
  pvc:
    accessModes:
      - ReadWriteOnce
    volumeMode: Block
    resources:
      requests:
        storage: 10Gi
---
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: blank-disk
spec:
  preallocation: true
  source:
    blank: {}
  storage:
    accessModes: [ReadWriteMany]
    resources:
      requests:
        storage: 2147483648
---
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: pvc-clone
  namespace: target-ns
spec:
  priorityClassName: low-priority
  source:
    pvc:
      namespace: golden-images
      name: fedora-40
  pvc:
    accessModes:
      - ReadWriteOnce
    storageClassName: local
    resources:
      requests:
        storage: 10Gi
---
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: storage-from-profile
spec:
  source:
    snapshot:
      namespace: golden-images
      name: fedora-40-snap
  storage:
    volumeMode: FromStorageProfile
    storageClassName: ceph-rbd
---
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: from-data-source
spec:
  sourceRef:
    kind: DataSource
    namespace: golden-images
    name: fedora
  storage:
    selector:
      matchLabels:
        tier: fast
      matchExpressions:
        - key: zone
          operator: In
          values: [a, b]
---
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: s3-and-service-account
spec:
  serviceAccountName: importer-sa
  source:
    s3:
      url: "https://s3.us-east-1.amazonaws.com/bucket/disk.img"
      secretRef: s3-creds
  storage:
    resources:
      requests:
        storage: 1Gi
      limits:
        storage: 2Gi
---
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: gcs
spec:
  source:
    gcs:
      url: "gs://bucket/disk.img"
  storage:
    resources:
      requests:
        storage: 1Gi
---
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: warm-imageio
spec:
  source:
    imageio:
      url: "https://engine.example.org/ovirt-engine/api"
      secretRef: engine-secret
      certConfigMap: engine-ca
      diskId: "d3a2b0f2-8a2d-4b6e-9c1e-5f4e2f1d0c3b"
  checkpoints:
    - previous: ""
      current: snapshot-1
    - previous: snapshot-1
      current: snapshot-2
  finalCheckpoint: true
  storage:
    resources:
      requests:
        storage: 20Gi
---
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: vddk
spec:
  source:
    vddk:
      url: "https://vcenter.example.org"
      uuid: "52260566-b032-36cb-55b1-79bf29e30490"
      backingFile: "[datastore1] vm/vm.vmdk"
      thumbprint: "20:6C:8A:5D:44:40:B3:79:4B:28:EA:76:13:60:90:6E:49:D9:D9:A3"
      secretRef: vddk-credentials
      initImageURL: "registry.example.org/vddk:8"
      extraArgs: vddk-args
  storage:
    resources:
      requests:
        storage: 20Gi
---
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: go-client-output
spec:
  source:
    http:
      url: "http://example.org/disk.img"
  pvc:
    accessModes: [ReadWriteOnce]
    dataSourceRef:
      apiGroup: cdi.kubevirt.io
      kind: VolumeImportSource
      name: volume-import-source-1234
    resources:
      requests:
        storage: 1Gi
status:
  claimName: go-client-output
  phase: Succeeded
  progress: 100.0%
  restartCount: 0
  conditions:
    - type: Ready
      status: "True"
      lastTransitionTime: "2024-05-01T12:00:00Z"
      lastHeartbeatTime: "2024-05-01T12:00:00.123456Z"
      reason: ""
      message: ""
    - type: Bound
      status: "True"
      lastTransitionTime: "2024-05-01T11:59:00+02:00"
      reason: Bound
      message: PVC go-client-output Bound
"""

OTHER_GOOD_OBJECTS = """
apiVersion: cdi.kubevirt.io/v1beta1
kind: CDIConfig
metadata:
  name: config
spec:
  uploadProxyURLOverride: "www.example.com"
  scratchSpaceStorageClass: local
  filesystemOverhead:
    global: "0.06"
    storageClass:
      local: "0"
      ceph: "1"
  podResourceRequirements:
    limits:
      cpu: 750m
      memory: 600M
  featureGates: [HonorWaitForFirstConsumer]
  tlsSecurityProfile:
    type: Intermediate
    intermediate: {}
---
apiVersion: cdi.kubevirt.io/v1beta1
kind: CDI
metadata:
  name: cdi
spec:
  imagePullPolicy: IfNotPresent
  uninstallStrategy: BlockUninstallIfWorkloadsExist
  cloneStrategyOverride: csi-clone
  infra:
    nodeSelector:
      kubernetes.io/os: linux
    tolerations:
      - key: CriticalAddonsOnly
        operator: Exists
    apiServerReplicas: 2
  workload:
    affinity:
      nodeAffinity:
        requiredDuringSchedulingIgnoredDuringExecution:
          nodeSelectorTerms:
            - matchExpressions:
                - {key: node-role, operator: In, values: [worker]}
  config:
    featureGates: [DataVolumeClaimAdoption]
  customizeComponents:
    flags:
      controller:
        v: "5"
    patches:
      - resourceName: cdi-deployment
        resourceType: Deployment
        patch: '{"spec":{"replicas":2}}'
        type: merge
---
apiVersion: cdi.kubevirt.io/v1beta1
kind: StorageProfile
metadata:
  name: local
spec:
  cloneStrategy: snapshot
  claimPropertySets:
    - accessModes: [ReadWriteOnce]
      volumeMode: Filesystem
    - accessModes: [ReadWriteMany, ReadOnlyMany]
      volumeMode: Block
---
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataImportCron
metadata:
  name: fedora-image-cron
  namespace: golden-images
spec:
  schedule: "30 1 * * 1"
  garbageCollect: Outdated
  importsToKeep: 2
  managedDataSource: fedora
  template:
    metadata:
      labels:
        instancetype.kubevirt.io/default-preference: fedora
    spec:
      source:
        registry:
          url: "docker://quay.io/containerdisks/fedora:latest"
      storage:
        resources:
          requests:
            storage: 5Gi
---
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataSource
metadata:
  name: fedora
  namespace: golden-images
spec:
  source:
    pvc:
      namespace: golden-images
      name: fedora-40
---
apiVersion: cdi.kubevirt.io/v1beta1
kind: VolumeCloneSource
metadata:
  name: clone-source
spec:
  source:
    kind: PersistentVolumeClaim
    name: source-pvc
---
apiVersion: kubevirt.io/v1alpha3
kind: VirtualMachine
metadata:
  name: vm-fedora-datavolume
spec:
  running: false
  dataVolumeTemplates:
    - metadata:
        name: fedora-dv
      spec:
        pvc:
          accessModes: [ReadWriteOnce]
          resources:
            requests:
              storage: 100M
        source:
          http:
            url: https://download.example.org/cirros.img
  template:
    spec:
      domain:
        devices:
          disks:
            - disk: {bus: virtio}
              name: datavolumevolume
      volumes:
        - dataVolume: {name: fedora-dv}
          name: datavolumevolume
---
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata:
  name: snap
spec:
  volumeSnapshotClassName: csi-snapclass
  source:
    persistentVolumeClaimName: fedora-40
status:
  readyToUse: true
  restoreSize: 10Gi
  creationTime: "2024-05-01T12:00:00Z"
---
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshotClass
metadata:
  name: csi-snapclass
driver: hostpath.csi.k8s.io
deletionPolicy: Delete
parameters:
  foo: bar
"""


def _docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


GOOD = _docs(GOOD_DATAVOLUMES) + _docs(OTHER_GOOD_OBJECTS)


@pytest.mark.parametrize("obj", GOOD, ids=[f"{d['kind']}-{d['metadata']['name']}" for d in GOOD])
def test_documented_objects_are_accepted_unchanged(obj: dict[str, Any]) -> None:
    given = copy.deepcopy(obj)
    result = check_custom_resource(obj, schema_for(obj), field_validation="Strict")
    assert [str(e) for e in result.errors] == []
    assert result.unknown_fields == ()
    assert result.ok and result.strict_error is None and result.warnings == ()
    assert obj == given


def dv(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "apiVersion": "cdi.kubevirt.io/v1beta1",
        "kind": "DataVolume",
        "metadata": {"name": "dv"},
        "spec": {
            "source": {"http": {"url": "http://example.org/disk.img"}},
            "storage": {"resources": {"requests": {"storage": "1Gi"}}},
        },
    }
    base["spec"].update(spec)
    return base


def with_change(obj: dict[str, Any], change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    changed = copy.deepcopy(obj)
    change(changed)
    return changed


QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
    r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)

BAD_DATAVOLUMES = [
    pytest.param(
        dv(contentType="disk"),
        ['spec.contentType: Unsupported value: "disk": supported values: "kubevirt", "archive"'],
        id="unknown-content-type",
    ),
    pytest.param(
        dv(source={"http": {"secretRef": "s"}}),
        ["spec.source.http.url: Required value"],
        id="http-without-url",
    ),
    pytest.param(
        dv(source={"pvc": {"name": "x"}}),
        ["spec.source.pvc.namespace: Required value"],
        id="pvc-source-without-namespace",
    ),
    pytest.param(
        dv(preallocation="yes"),
        [
            'spec.preallocation: Invalid value: "string": spec.preallocation in body must be '
            'of type boolean: "string"'
        ],
        id="string-for-bool",
    ),
    pytest.param(
        dv(pvc={"accessModes": "ReadWriteOnce"}),
        [
            'spec.pvc.accessModes: Invalid value: "string": spec.pvc.accessModes in body must '
            'be of type array: "string"'
        ],
        id="string-for-list",
    ),
    pytest.param(
        dv(storage={"resources": {"requests": {"storage": "ten gigs"}}}),
        [
            'spec.storage.resources.requests.storage: Invalid value: "ten gigs": '
            f"spec.storage.resources.requests.storage in body should match '{QUANTITY_PATTERN}'"
        ],
        id="bad-quantity",
    ),
    pytest.param(
        dv(storage={"resources": {"requests": {"storage": True}}}),
        [
            'spec.storage.resources.requests.storage: Invalid value: "boolean": '
            "spec.storage.resources.requests.storage in body must be of type integer,string: "
            '"boolean"'
        ],
        id="bool-quantity",
    ),
    pytest.param(
        dv(sourceRef={"name": "fedora"}),
        ["spec.sourceRef.kind: Required value"],
        id="source-ref-without-kind",
    ),
    pytest.param(
        dv(checkpoints=[{"previous": "", "current": "a"}, {"previous": "a"}]),
        ["spec.checkpoints[1].current: Required value"],
        id="checkpoint-without-current",
    ),
    pytest.param(
        dv(finalCheckpoint=1, priorityClassName=5),
        [
            'spec.finalCheckpoint: Invalid value: "integer": spec.finalCheckpoint in body must '
            'be of type boolean: "integer"',
            'spec.priorityClassName: Invalid value: "integer": spec.priorityClassName in body '
            'must be of type string: "integer"',
        ],
        id="two-errors-in-document-order",
    ),
    pytest.param(
        with_change(dv(), lambda o: o.pop("spec")),
        ["spec: Required value"],
        id="missing-spec",
    ),
    pytest.param(
        with_change(
            dv(),
            lambda o: o.update(
                status={"restartCount": 1.5, "conditions": [{"type": "Ready", "status": None}]}
            ),
        ),
        [
            'status.restartCount: Invalid value: "number": status.restartCount in body must be '
            'of type integer: "number"',
            "status.conditions[0].status: Required value",
        ],
        id="bad-status",
    ),
    pytest.param(
        with_change(
            dv(),
            lambda o: o.update(
                status={
                    "conditions": [
                        {"type": "Ready", "status": "True", "lastTransitionTime": "yesterday"}
                    ]
                }
            ),
        ),
        [
            'status.conditions[0].lastTransitionTime: Invalid value: "yesterday": '
            "status.conditions[0].lastTransitionTime in body must be of type date-time: "
            '"yesterday"'
        ],
        id="bad-timestamp",
    ),
]


@pytest.mark.parametrize(("obj", "expected"), BAD_DATAVOLUMES)
def test_bad_datavolumes_give_kubernetes_causes(obj: dict[str, Any], expected: list[str]) -> None:
    assert check(obj) == expected


def test_causes_are_status_causes() -> None:
    result = check_custom_resource(
        dv(contentType="disk", source={"http": {}}),
        schema_for(dv()),
    )
    causes = [e.to_cause() for e in result.errors]
    # Document order: spec.source comes before spec.contentType in the object.
    assert causes == [
        {
            "reason": "FieldValueRequired",
            "message": "Required value",
            "field": "spec.source.http.url",
        },
        {
            "reason": "FieldValueNotSupported",
            "message": 'Unsupported value: "disk": supported values: "kubevirt", "archive"',
            "field": "spec.contentType",
        },
    ]
    assert result.errors[1].type is FieldErrorType.NOT_SUPPORTED
    assert not result.ok


OTHER_BAD = [
    pytest.param(
        {
            "apiVersion": "cdi.kubevirt.io/v1beta1",
            "kind": "StorageProfile",
            "metadata": {"name": "local"},
            "spec": {
                "claimPropertySets": [
                    {"accessModes": ["ReadWriteOnce"], "volumeMode": "Filesystem"}
                ]
                * 9
            },
        },
        ["spec.claimPropertySets: Too many: 9: must have at most 8 items"],
        id="too-many-property-sets",
    ),
    pytest.param(
        {
            "apiVersion": "cdi.kubevirt.io/v1beta1",
            "kind": "StorageProfile",
            "metadata": {"name": "local"},
            "spec": {"claimPropertySets": [{"accessModes": ["RWO"], "volumeMode": "Disk"}]},
        },
        [
            'spec.claimPropertySets[0].accessModes[0]: Unsupported value: "RWO": supported '
            'values: "ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"',
            'spec.claimPropertySets[0].volumeMode: Unsupported value: "Disk": supported values: '
            '"Block", "Filesystem"',
        ],
        id="unknown-modes",
    ),
    pytest.param(
        {
            "apiVersion": "cdi.kubevirt.io/v1beta1",
            "kind": "CDI",
            "metadata": {"name": "cdi"},
            "spec": {"imagePullPolicy": "Sometimes", "infra": {"apiServerReplicas": "2"}},
        },
        [
            'spec.imagePullPolicy: Unsupported value: "Sometimes": supported values: "Always", '
            '"IfNotPresent", "Never"',
            'spec.infra.apiServerReplicas: Invalid value: "string": spec.infra.apiServerReplicas '
            'in body must be of type integer: "string"',
        ],
        id="cdi-spec",
    ),
    pytest.param(
        {
            "apiVersion": "cdi.kubevirt.io/v1beta1",
            "kind": "DataImportCron",
            "metadata": {"name": "cron"},
            "spec": {
                "schedule": "* * * * *",
                "template": {"spec": {"contentType": "iso"}},
            },
        },
        [
            "spec.managedDataSource: Required value",
            'spec.template.spec.contentType: Unsupported value: "iso": supported values: '
            '"kubevirt", "archive"',
        ],
        id="cron-template",
    ),
    pytest.param(
        {
            "apiVersion": "snapshot.storage.k8s.io/v1",
            "kind": "VolumeSnapshotClass",
            "metadata": {"name": "c"},
            "deletionPolicy": "Keep",
        },
        [
            "driver: Required value",
            'deletionPolicy: Unsupported value: "Keep": supported values: "Delete", "Retain"',
        ],
        id="snapshot-class-top-level-fields",
    ),
]


@pytest.mark.parametrize(("obj", "expected"), OTHER_BAD)
def test_other_bad_objects(obj: dict[str, Any], expected: list[str]) -> None:
    assert check(obj) == expected


def config(overhead: Any) -> dict[str, Any]:
    return {
        "apiVersion": "cdi.kubevirt.io/v1beta1",
        "kind": "CDIConfig",
        "metadata": {"name": "config"},
        "spec": {"filesystemOverhead": {"global": overhead, "storageClass": {"local": overhead}}},
    }


@pytest.mark.parametrize("overhead", ["0", "0.0", "0.055", "1"])
def test_filesystem_overhead_accepted(overhead: str) -> None:
    assert check(config(overhead)) == []


@pytest.mark.parametrize("overhead", ["abc", "1.abc", "1.0001", "inf", "-0.1"])
def test_filesystem_overhead_rejected(overhead: str) -> None:
    pattern = r"^(0(?:\.\d{1,3})?|1)$"
    assert check(config(overhead)) == [
        f'spec.filesystemOverhead.global: Invalid value: "{overhead}": '
        f"spec.filesystemOverhead.global in body should match '{pattern}'",
        f'spec.filesystemOverhead.storageClass.local: Invalid value: "{overhead}": '
        f"spec.filesystemOverhead.storageClass.local in body should match '{pattern}'",
    ]


# ---- pruning -----------------------------------------------------------------------------------


def with_unknown_fields() -> dict[str, Any]:
    obj = dv(foo=1, checkpoints=[{"previous": "", "current": "a", "extra": True}])
    obj["spec"]["source"]["http"]["bogus"] = "x"
    obj["spec"]["source"]["upload"] = {"anything": 1}
    obj["spec"]["storage"]["resources"]["requests"]["storage"] = "2Gi"
    obj["status"] = {"phase": "Pending", "unknownStatus": 1}
    obj["topLevel"] = "dropped"
    obj["metadata"]["labels"] = {"app": "x"}
    return obj


UNKNOWN = (
    "spec.source.http.bogus",
    "spec.source.upload.anything",
    "spec.foo",
    "spec.checkpoints[0].extra",
    "status.unknownStatus",
    "topLevel",
)


def test_unknown_fields_are_pruned_and_reported() -> None:
    obj = with_unknown_fields()
    result = check_custom_resource(obj, schema_for(obj), field_validation="Warn")
    assert result.unknown_fields == UNKNOWN
    assert result.errors == ()
    assert result.ok
    assert result.warnings == tuple(f'unknown field "{p}"' for p in UNKNOWN)
    assert result.strict_error is None
    assert obj == {
        "apiVersion": "cdi.kubevirt.io/v1beta1",
        "kind": "DataVolume",
        "metadata": {"name": "dv", "labels": {"app": "x"}},
        "spec": {
            "source": {"http": {"url": "http://example.org/disk.img"}, "upload": {}},
            "storage": {"resources": {"requests": {"storage": "2Gi"}}},
            "checkpoints": [{"previous": "", "current": "a"}],
        },
        "status": {"phase": "Pending"},
    }


def test_strict_rejects_unknown_fields() -> None:
    obj = with_unknown_fields()
    result = check_custom_resource(obj, schema_for(obj), field_validation="Strict")
    assert not result.ok
    assert result.warnings == ()
    assert result.strict_error == "strict decoding error: " + ", ".join(
        f'unknown field "{p}"' for p in UNKNOWN
    )


def test_ignore_drops_silently() -> None:
    obj = with_unknown_fields()
    result = check_custom_resource(obj, schema_for(obj), field_validation="Ignore")
    assert result.ok and result.warnings == () and result.strict_error is None
    assert "foo" not in obj["spec"]


def test_preserved_subtrees_are_kept() -> None:
    vm = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": "vm"},
        "spec": {"anything": {"deep": [1, {"x": None}]}},
        "status": {"printableStatus": "Stopped", "custom": True},
    }
    given = copy.deepcopy(vm)
    assert check(vm) == []
    assert vm == given
    cron: dict[str, Any] = {
        "apiVersion": "cdi.kubevirt.io/v1beta1",
        "kind": "DataImportCron",
        "metadata": {"name": "cron"},
        "spec": {
            "schedule": "",
            "managedDataSource": "fedora",
            "template": {
                "metadata": {"labels": {"a": "b"}, "annotations": {"c": "d"}},
                "spec": {"source": {"blank": {}}, "unknown": 1},
            },
        },
    }
    result = check_custom_resource(cron, schema_for(cron))
    assert result.unknown_fields == ("spec.template.spec.unknown",)
    assert cron["spec"]["template"]["metadata"] == {"labels": {"a": "b"}, "annotations": {"c": "d"}}


def test_nulls_are_dropped_unless_nullable() -> None:
    obj = dv(preallocation=None)
    obj["status"] = {
        "conditions": [
            {"type": "Ready", "status": "False", "lastTransitionTime": None, "reason": None}
        ]
    }
    assert check(obj) == []
    assert "preallocation" not in obj["spec"]
    assert obj["status"]["conditions"] == [{"type": "Ready", "status": "False"}]

    cdi_config: dict[str, Any] = {
        "apiVersion": "cdi.kubevirt.io/v1beta1",
        "kind": "CDIConfig",
        "metadata": {"name": "config"},
        "spec": {"tlsSecurityProfile": {"type": "Old", "old": None, "custom": None}},
    }
    assert check(cdi_config) == []
    assert cdi_config["spec"]["tlsSecurityProfile"] == {"type": "Old", "old": None, "custom": None}

    # Array items are not pruned: a null item is a type error.
    obj = dv(checkpoints=[None])
    assert check(obj) == [
        'spec.checkpoints[0]: Invalid value: "null": spec.checkpoints[0] in body must be of '
        'type object: "null"'
    ]


def test_resource_fields_are_the_callers() -> None:
    schema = {"type": "object", "properties": {"spec": {"type": "object"}}}
    obj = {"apiVersion": "x/v1", "kind": "X", "metadata": {"name": "a", "x": 1}, "spec": {"a": 1}}
    assert prune(obj, schema) == ["spec.a"]
    assert obj == {"apiVersion": "x/v1", "kind": "X", "metadata": {"name": "a", "x": 1}, "spec": {}}
    # Not at the root of a resource: they are ordinary fields.
    nested = {"apiVersion": "x/v1", "spec": {}}
    assert prune(nested, schema, is_resource_root=False) == ["apiVersion"]


def test_embedded_resource_minimal() -> None:
    schema = {
        "type": "object",
        "properties": {
            "spec": {
                "type": "object",
                "properties": {
                    "template": {
                        "type": "object",
                        "x-kubernetes-embedded-resource": True,
                        "properties": {"spec": {"type": "object", "properties": {}}},
                    }
                },
            }
        },
    }
    assert structural_errors(schema) == []
    obj = {
        "spec": {
            "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"x": 1}, "other": 2},
        }
    }
    result = check_custom_resource(obj, schema)
    assert result.unknown_fields == ("spec.template.spec.x", "spec.template.other")
    assert obj["spec"]["template"] == {"metadata": {"labels": {"a": "b"}}, "spec": {}}
    assert [str(e) for e in result.errors] == [
        "spec.template.apiVersion: Required value: must not be empty",
        "spec.template.kind: Required value: must not be empty",
    ]


def test_additional_properties_true_keeps_everything() -> None:
    schema = {
        "type": "object",
        "properties": {"m": {"type": "object", "additionalProperties": True}},
    }
    obj = {"m": {"a": {"b": 1}}}
    assert prune(obj, schema) == []
    assert obj == {"m": {"a": {"b": 1}}}


# ---- the schema engine on small schemas --------------------------------------------------------


def errors(value: Any, schema: Mapping[str, Any], path: str = "v") -> list[str]:
    return [str(e) for e in validate(value, schema, path)]


@pytest.mark.parametrize(
    ("value", "schema", "expected"),
    [
        (1.0, {"type": "integer"}, []),
        (5, {"type": "number"}, []),
        (
            1.5,
            {"type": "integer"},
            ['v: Invalid value: "number": v in body must be of type integer: "number"'],
        ),
        (
            True,
            {"type": "integer"},
            ['v: Invalid value: "boolean": v in body must be of type integer: "boolean"'],
        ),
        (
            {},
            {"type": "string"},
            ['v: Invalid value: "object": v in body must be of type string: "object"'],
        ),
        (None, {"type": "string", "nullable": True}, []),
        (
            None,
            {"type": "string"},
            ['v: Invalid value: "null": v in body must be of type string: "null"'],
        ),
        (
            3,
            {"type": "integer", "minimum": 5},
            ["v: Invalid value: 3: v in body should be greater than or equal to 5"],
        ),
        (
            5,
            {"type": "integer", "minimum": 5, "exclusiveMinimum": True},
            ["v: Invalid value: 5: v in body should be greater than 5"],
        ),
        (
            7.5,
            {"type": "number", "maximum": 7},
            ["v: Invalid value: 7.5: v in body should be less than or equal to 7"],
        ),
        (
            7,
            {"type": "integer", "maximum": 7, "exclusiveMaximum": True},
            ["v: Invalid value: 7: v in body should be less than 7"],
        ),
        (0.3, {"type": "number", "multipleOf": 0.1}, []),
        (
            10,
            {"type": "integer", "multipleOf": 4},
            ["v: Invalid value: 10: v in body should be a multiple of 4"],
        ),
        (
            "abcdef",
            {"type": "string", "maxLength": 5},
            ["v: Too long: may not be more than 5 bytes"],
        ),
        ("é" * 5, {"type": "string", "maxLength": 5}, []),
        (
            "",
            {"type": "string", "minLength": 1},
            ['v: Invalid value: "": v in body should be at least 1 chars long'],
        ),
        (
            "abc\n",
            {"type": "string", "pattern": "^[a-z]+$"},
            ["v: Invalid value: \"abc\\n\": v in body should match '^[a-z]+$'"],
        ),
        ("xabcx", {"type": "string", "pattern": "abc"}, []),
        (
            "\u0663",
            {"type": "string", "pattern": "^\\d$"},
            ["v: Invalid value: \"\u0663\": v in body should match '^\\d$'"],
        ),
        ("x", {"type": "string", "pattern": "(?<=unsupported"}, []),
        (
            [],
            {"type": "array", "items": {"type": "string"}, "minItems": 1},
            ["v: Invalid value: 0: v in body should have at least 1 items"],
        ),
        (
            [1, 2, 3],
            {"type": "array", "items": {"type": "integer"}, "maxItems": 2},
            ["v: Too many: 3: must have at most 2 items"],
        ),
        (
            {"a": "1", "b": "2"},
            {"type": "object", "additionalProperties": {"type": "string"}, "maxProperties": 1},
            ["v: Too many: 2: must have at most 1 items"],
        ),
        (
            {},
            {"type": "object", "minProperties": 1},
            ["v: Invalid value: 0: v in body should have at least 1 properties"],
        ),
        (
            {"a": 1},
            {"type": "object", "additionalProperties": {"type": "string"}},
            ['v.a: Invalid value: "integer": v.a in body must be of type string: "integer"'],
        ),
        (
            True,
            {"type": "boolean", "enum": [False]},
            ['v: Unsupported value: true: supported values: "false"'],
        ),
        (1, {"type": "integer", "enum": [1.0, 2]}, []),
        (
            1,
            {"type": "boolean", "enum": [True]},
            ['v: Invalid value: "integer": v in body must be of type boolean: "integer"'],
        ),
    ],
)
def test_keywords(value: Any, schema: Mapping[str, Any], expected: list[str]) -> None:
    assert errors(value, schema) == expected


@pytest.mark.parametrize(
    "stamp",
    [
        "2024-05-01T12:00:00Z",
        "2024-05-01T12:00:00.123456789Z",
        "2024-05-01t12:00:00z",
        "2024-05-01T12:00:00+02:00",
        "2024-05-01 12:00:00Z",
        "2024-05-01T12:00:00",
    ],
)
def test_date_time_is_lenient(stamp: str) -> None:
    assert errors(stamp, {"type": "string", "format": "date-time"}) == []


@pytest.mark.parametrize("stamp", ["2024-13-01T12:00:00Z", "2024-05-01", "now", ""])
def test_date_time_rejects_non_times(stamp: str) -> None:
    assert errors(stamp, {"type": "string", "format": "date-time"}) == [
        f'v: Invalid value: "{stamp}": v in body must be of type date-time: "{stamp}"'
    ]


def test_other_formats_are_not_enforced() -> None:
    assert errors(2**40, {"type": "integer", "format": "int32"}) == []
    assert errors("2024-05-01", {"type": "string", "format": "date"}) == []
    assert errors("2024-02-30", {"type": "string", "format": "date"}) == [
        'v: Invalid value: "2024-02-30": v in body must be of type date: "2024-02-30"'
    ]
    assert errors("not-a-uuid", {"type": "string", "format": "uuid"}) == []


def test_int_or_string() -> None:
    schema = {
        "x-kubernetes-int-or-string": True,
        "anyOf": [{"type": "integer"}, {"type": "string"}],
    }
    assert errors(5, schema) == []
    assert errors("5Gi", schema) == []
    assert errors(1.5, schema) == [
        'v: Invalid value: "number": v in body must be of type integer,string: "number"'
    ]
    assert errors([], schema) == [
        'v: Invalid value: "array": v in body must be of type integer,string: "array"'
    ]


def test_junctors() -> None:
    any_of = {"type": "string", "anyOf": [{"pattern": "^a"}, {"maxLength": 2}]}
    assert errors("abc", any_of) == []
    assert errors("xy", any_of) == []
    assert errors("xyz", any_of) == [
        'v: Invalid value: "xyz": v in body must validate at least one schema (anyOf)',
        "v: Invalid value: \"xyz\": v in body should match '^a'",
    ]
    one_of = {
        "type": "object",
        "properties": {"a": {"type": "string"}, "b": {"type": "string"}},
        "oneOf": [{"required": ["a"]}, {"required": ["b"]}],
    }
    assert errors({"a": "1"}, one_of) == []
    assert errors({"a": "1", "b": "2"}, one_of) == [
        'v: Invalid value: {"a":"1","b":"2"}: v in body must validate one and only one '
        "schema (oneOf). Found 2 valid alternatives"
    ]
    assert errors({}, one_of) == [
        "v: Invalid value: {}: v in body must validate one and only one schema (oneOf). "
        "Found none valid",
        "v.a: Required value",
    ]
    all_of = {"type": "integer", "allOf": [{"minimum": 1}, {"maximum": 3}]}
    assert errors(2, all_of) == []
    assert errors(4, all_of) == ["v: Invalid value: 4: v in body should be less than or equal to 3"]
    not_schema = {"type": "string", "not": {"enum": ["forbidden"]}}
    assert errors("fine", not_schema) == []
    assert errors("forbidden", not_schema) == [
        'v: Invalid value: "forbidden": v in body must not validate the schema (not)'
    ]


def test_list_types() -> None:
    set_schema = {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "set"}
    assert errors(["a", "b"], set_schema) == []
    assert errors(["a", "b", "a"], set_schema) == ['v[2]: Duplicate value: "a"']
    map_schema = {
        "type": "array",
        "items": {"type": "object", "properties": {"name": {"type": "string"}}},
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["name"],
    }
    assert errors([{"name": "a"}, {"name": "b"}], map_schema) == []
    assert errors([{"name": "a"}, {"name": "a"}], map_schema) == [
        'v[1]: Duplicate value: {"name":"a"}'
    ]


def test_defaults() -> None:
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {
            "spec": {
                "type": "object",
                "default": {},
                "properties": {
                    "replicas": {"type": "integer", "default": 1},
                    "mode": {"type": "string", "default": "fast"},
                    "items": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {"weight": {"type": "integer", "default": 10}},
                        },
                    },
                    "labels": {
                        "type": "object",
                        "additionalProperties": {
                            "type": "object",
                            "properties": {"on": {"type": "boolean", "default": True}},
                        },
                    },
                },
            }
        },
    }
    obj: dict[str, Any] = {}
    apply_defaults(obj, schema)
    assert obj == {"spec": {"replicas": 1, "mode": "fast"}}
    obj = {"spec": {"replicas": 3, "mode": None, "items": [{}, {"weight": 2}], "labels": {"x": {}}}}
    result = check_custom_resource(obj, schema)
    assert result.ok
    assert obj == {
        "spec": {
            "replicas": 3,
            "mode": "fast",
            "items": [{"weight": 10}, {"weight": 2}],
            "labels": {"x": {"on": True}},
        }
    }
    # Defaults are copies: changing one object never changes the schema.
    obj["spec"]["labels"]["x"]["on"] = False
    assert schema["properties"]["spec"]["default"] == {}


# ---- structural schemas ------------------------------------------------------------------------


def structural(schema: Any) -> list[str]:
    return [str(e) for e in structural_errors(schema, "s")]


def test_structural_accepts_good_schemas() -> None:
    assert structural_errors({"type": "object", "properties": {"spec": {"type": "object"}}}) == []
    assert (
        structural(
            {
                "type": "object",
                "properties": {
                    "metadata": {
                        "type": "object",
                        "properties": {"name": {"type": "string", "maxLength": 20}},
                    },
                    "q": {
                        "x-kubernetes-int-or-string": True,
                        "anyOf": [{"type": "integer"}, {"type": "string"}],
                    },
                    "free": {"x-kubernetes-preserve-unknown-fields": True},
                    "one": {
                        "type": "object",
                        "properties": {"a": {"type": "string"}, "b": {"type": "string"}},
                        "oneOf": [{"required": ["a"]}, {"properties": {"b": {"minLength": 1}}}],
                    },
                },
            }
        )
        == []
    )


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        ({"properties": {}}, ["s.type: Required value: must not be empty at the root"]),
        ({"type": "string"}, ['s.type: Invalid value: "string": must be object at the root']),
        (
            {"type": "object", "properties": {"a": {"description": "x"}}},
            ["s.properties[a].type: Required value: must not be empty for specified object fields"],
        ),
        (
            {"type": "object", "properties": {"a": {"type": "array"}}},
            ["s.properties[a].items: Required value: must be specified"],
        ),
        (
            {"type": "object", "properties": {"a": {"type": "array", "items": {}}}},
            [
                "s.properties[a].items.type: Required value: must not be empty for specified "
                "array items"
            ],
        ),
        (
            {
                "type": "object",
                "properties": {"a": {"type": "object", "additionalProperties": {}}},
            },
            [
                "s.properties[a].additionalProperties.type: Required value: must not be empty for "
                "specified object fields"
            ],
        ),
        (
            {
                "type": "object",
                "properties": {"a": {"type": "string", "anyOf": [{"type": "string"}]}},
            },
            ["s.properties[a].anyOf[0].type: Forbidden: must be empty to be structural"],
        ),
        (
            {
                "type": "object",
                "properties": {
                    "a": {"type": "object", "allOf": [{"properties": {"b": {"maxLength": 1}}}]}
                },
            },
            [
                "s.properties[a].allOf[0].properties[b]: Required value: must be specified also "
                "outside of the logical junctor"
            ],
        ),
        (
            {
                "type": "object",
                "properties": {
                    "metadata": {"type": "object", "properties": {"labels": {"type": "object"}}}
                },
            },
            [
                "s.properties[metadata]: Forbidden: must not specify anything other than name and "
                "generateName, but metadata is implicitly specified"
            ],
        ),
        (
            {
                "type": "object",
                "properties": {
                    "a": {
                        "type": "object",
                        "properties": {"b": {"type": "string"}},
                        "additionalProperties": {"type": "string"},
                    }
                },
            },
            [
                "s.properties[a].additionalProperties: Forbidden: additionalProperties and "
                "properties are mutual exclusive"
            ],
        ),
        (
            {"type": "object", "x-kubernetes-preserve-unknown-fields": False},
            [
                "s.x-kubernetes-preserve-unknown-fields: Invalid value: false: must be true or "
                "undefined"
            ],
        ),
        (
            {
                "type": "object",
                "properties": {"a": {"type": "string", "x-kubernetes-int-or-string": True}},
            },
            [
                's.properties[a].type: Invalid value: "string": must be empty if '
                "x-kubernetes-int-or-string is true"
            ],
        ),
        (
            {"type": "object", "properties": {"a": {"$ref": "#/definitions/x"}}},
            [
                "s.properties[a].$ref: Forbidden: $ref is not supported",
                "s.properties[a].type: Required value: must not be empty for specified object "
                "fields",
            ],
        ),
        (
            {"type": "object", "properties": {"a": {"type": "list", "items": {"type": "string"}}}},
            [
                's.properties[a].type: Unsupported value: "list": supported values: "array", '
                '"boolean", "integer", "number", "object", "string"'
            ],
        ),
    ],
)
def test_structural_errors(schema: Any, expected: list[str]) -> None:
    assert structural(schema) == expected


# ---- names -------------------------------------------------------------------------------------

SUBDOMAIN_MESSAGE = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or "
    "'.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used "
    "for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
LABEL_MESSAGE = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and "
    "must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex "
    "used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)


@pytest.mark.parametrize("name", ["a", "fedora-40", "my.data.volume", "0abc", "a" * 253])
def test_good_subdomains(name: str) -> None:
    assert is_dns1123_subdomain(name) == []
    assert validate_object_name(name) == []


@pytest.mark.parametrize("name", ["Fedora", "-a", "a-", "a..b", "a_b", "abc\n", ".a", "ü"])
def test_bad_subdomains(name: str) -> None:
    assert is_dns1123_subdomain(name) == [SUBDOMAIN_MESSAGE]


def test_subdomain_too_long() -> None:
    assert is_dns1123_subdomain("a" * 254) == ["must be no more than 253 characters"]


def test_labels() -> None:
    assert is_dns1123_label("my-ns") == []
    assert is_dns1123_label("a.b") == [LABEL_MESSAGE]
    assert is_dns1123_label("a" * 64) == ["must be no more than 63 characters"]
    assert is_dns1035_label("widgets") == []
    assert is_dns1035_label("1widgets") == [
        "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with "
        "an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or "
        "'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')"
    ]


def test_object_name_errors() -> None:
    assert [str(e) for e in validate_object_name("")] == [
        "metadata.name: Required value: name or generateName is required"
    ]
    assert [str(e) for e in validate_object_name(None)] == [
        "metadata.name: Required value: name or generateName is required"
    ]
    (bad,) = validate_object_name("My_DV")
    assert bad == FieldError(
        "metadata.name", FieldErrorType.INVALID, f'Invalid value: "My_DV": {SUBDOMAIN_MESSAGE}'
    )
    assert [
        e.message for e in validate_object_name("a.b", label=True, path="metadata.namespace")
    ] == [f'Invalid value: "a.b": {LABEL_MESSAGE}']
    long_name = "a" * 254
    assert [str(e) for e in validate_object_name(long_name)] == [
        f'metadata.name: Invalid value: "{long_name}": must be no more than 253 characters'
    ]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, '"null"'),
        (True, "true"),
        (3, "3"),
        (1.5, "1.5"),
        (100.0, "100"),
        (1e6, "1e+06"),
        (1.5e-5, "1.5e-05"),
        (-0.25, "-0.25"),
        ('say "hi"', '"say \\"hi\\""'),
        ([1, "a"], '[1,"a"]'),
    ],
)
def test_values_print_as_go_prints_them(value: Any, text: str) -> None:
    assert format_value(value) == text
