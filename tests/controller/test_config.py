"""CDIConfig and StorageProfile status as CDI computes them (reference §8.1, §8.2)."""

from __future__ import annotations

from typing import Any

import pytest

from cdi.api import annotations as ann
from cdi.api.groups import LOCAL_PROVISIONER
from cdi.controller.config import (
    DEFAULT_POD_RESOURCE_REQUIREMENTS,
    ConfigError,
    cdiconfig_status,
    class_overhead,
    pvc_overhead,
    storage_profile_status,
)
from cdi.provisioner.local import PROVISIONER

Obj = dict[str, Any]


def sc(name: str, provisioner: str = LOCAL_PROVISIONER, **annotations: str) -> Obj:
    return {"metadata": {"name": name, "annotations": annotations}, "provisioner": provisioner}


CLASSES = [sc("local"), sc("local-wffc"), sc("fast", "ebs.csi.aws.com")]
RWO_FS = {"accessModes": ["ReadWriteOnce"], "volumeMode": "Filesystem"}
RWO_BLOCK = {"accessModes": ["ReadWriteOnce"], "volumeMode": "Block"}


def test_local_provisioner_name_is_the_provisioners_own() -> None:
    # The built-in StorageProfile defaults key on this string; the provisioner sets it.
    assert LOCAL_PROVISIONER == PROVISIONER == "cdi.kubevirt.io/local"


# --- CDIConfig -----------------------------------------------------------------------------------


def test_empty_spec_gives_cdis_defaults() -> None:
    status = cdiconfig_status({}, CLASSES)
    assert status == {
        "preallocation": False,
        "scratchSpaceStorageClass": "",
        "defaultPodResourceRequirements": {
            "limits": {"cpu": "750m", "memory": "600M"},
            "requests": {"cpu": "100m", "memory": "60M"},
        },
        "filesystemOverhead": {
            "global": "0.06",
            "storageClass": {"local": "0.06", "local-wffc": "0.06", "fast": "0.06"},
        },
        "importProxy": {"HTTPProxy": "", "HTTPSProxy": "", "noProxy": "", "trustedCAProxy": ""},
    }


@pytest.mark.parametrize(
    ("spec_overhead", "expected"),
    [
        pytest.param(
            {"global": "0.1"},
            {"global": "0.1", "storageClass": {"local": "0.1", "local-wffc": "0.1", "fast": "0.1"}},
            id="global-for-every-class",
        ),
        pytest.param(
            {"global": "0.1", "storageClass": {"fast": "0", "gone": "0.5"}},
            {"global": "0.1", "storageClass": {"local": "0.1", "local-wffc": "0.1", "fast": "0"}},
            id="per-class-wins-unknown-class-dropped",
        ),
        pytest.param(
            {"global": "1.5"},
            {
                "global": "0.06",
                "storageClass": {"local": "0.06", "local-wffc": "0.06", "fast": "0.06"},
            },
            id="invalid-global-ignored",
        ),
        pytest.param(
            {"global": "1", "storageClass": {"local": "0.055"}},
            {"global": "1", "storageClass": {"local": "0.055", "local-wffc": "1", "fast": "1"}},
            id="bounds-and-three-decimals",
        ),
    ],
)
def test_filesystem_overhead(spec_overhead: Obj, expected: Obj) -> None:
    status = cdiconfig_status({"filesystemOverhead": spec_overhead}, CLASSES)
    assert status["filesystemOverhead"] == expected


def test_invalid_per_class_overhead_is_refused_as_cdi_does() -> None:
    spec = {"filesystemOverhead": {"storageClass": {"local": "0.0555"}}}
    with pytest.raises(ConfigError, match=r"storageClass\[local\] '0.0555' is not valid"):
        cdiconfig_status(spec, CLASSES)


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        pytest.param("local-wffc", "local-wffc", id="existing-class"),
        pytest.param("missing", "", id="missing-class-means-the-targets"),
        pytest.param(None, "", id="unset"),
    ],
)
def test_scratch_space_class_only_when_it_exists(requested: str | None, expected: str) -> None:
    spec = {} if requested is None else {"scratchSpaceStorageClass": requested}
    assert cdiconfig_status(spec, CLASSES)["scratchSpaceStorageClass"] == expected


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        pytest.param(
            {"limits": {"memory": "2Gi"}},
            {
                "limits": {"cpu": "750m", "memory": "2Gi"},
                "requests": {"cpu": "100m", "memory": "60M"},
            },
            id="one-limit",
        ),
        pytest.param(
            {"limits": {"cpu": "0"}, "requests": {"cpu": "1", "memory": "1Gi"}},
            {"limits": {"cpu": "0", "memory": "600M"}, "requests": {"cpu": "1", "memory": "1Gi"}},
            id="zero-cpu-limit-and-requests",
        ),
        pytest.param(
            {"limits": {"nvidia.com/gpu": "1"}},
            {k: dict(v) for k, v in DEFAULT_POD_RESOURCE_REQUIREMENTS.items()},
            id="only-cpu-and-memory-are-overridable",
        ),
    ],
)
def test_pod_resource_requirements_merge_per_field(override: Obj, expected: Obj) -> None:
    status = cdiconfig_status({"podResourceRequirements": override}, CLASSES)
    assert status["defaultPodResourceRequirements"] == expected


def test_other_fields_copied() -> None:
    proxy = {
        "HTTPProxy": "http://proxy:3128",
        "HTTPSProxy": "http://proxy:3128",
        "noProxy": ".cluster.local",
        "trustedCAProxy": "proxy-ca",
    }
    spec = {
        "preallocation": True,
        "importProxy": proxy,
        "uploadProxyURLOverride": "https://upload.example.org",
        "imagePullSecrets": [{"name": "pull"}],
        "insecureRegistries": ["registry.local:5000"],
    }
    status = cdiconfig_status(spec, CLASSES)
    assert status["preallocation"] is True
    assert status["importProxy"] == proxy
    assert status["importProxy"] is not proxy  # a copy, not the caller's object
    assert status["uploadProxyURL"] == "https://upload.example.org"
    assert status["imagePullSecrets"] == [{"name": "pull"}]
    # CDI's status has no such field (and our CRD would prune it); callers read the spec.
    assert "insecureRegistries" not in status


@pytest.mark.parametrize(
    ("status", "class_name", "expected"),
    [
        pytest.param(
            {"filesystemOverhead": {"global": "0.1", "storageClass": {"fast": "0.2"}}},
            "fast",
            "0.2",
            id="class-value",
        ),
        pytest.param(
            {"filesystemOverhead": {"global": "0.1", "storageClass": {"fast": "0.2"}}},
            "other",
            "0.1",
            id="unknown-class-global",
        ),
        pytest.param(
            {"filesystemOverhead": {"global": "0.1", "storageClass": {}}}, None, "0.1", id="none"
        ),
        pytest.param({"filesystemOverhead": {"global": "0.1"}}, "", "0", id="explicit-no-class"),
        pytest.param({}, "fast", "0.06", id="status-not-written-yet"),
    ],
)
def test_class_overhead(status: Obj, class_name: str | None, expected: str) -> None:
    assert class_overhead(status, class_name) == expected


def test_pvc_overhead_is_zero_for_block() -> None:
    status = {"filesystemOverhead": {"global": "0.1", "storageClass": {"local": "0.2"}}}
    block = {"spec": {"volumeMode": "Block", "storageClassName": "local"}}
    filesystem = {"spec": {"storageClassName": "local"}}
    assert pvc_overhead(block, status) == "0"
    assert pvc_overhead(filesystem, status) == "0.2"


# --- StorageProfile ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("storage_class", "spec", "expected_sets"),
    [
        pytest.param(sc("local"), None, [RWO_FS, RWO_BLOCK], id="ours-both-modes"),
        pytest.param(sc("unknown", "example.com/nas"), None, [], id="unknown-provisioner-empty"),
        pytest.param(sc("ebs", "ebs.csi.aws.com"), None, [RWO_BLOCK], id="known-provisioner"),
        pytest.param(
            sc("local"),
            {"claimPropertySets": [{"accessModes": ["ReadWriteMany"], "volumeMode": "Block"}]},
            [{"accessModes": ["ReadWriteMany"], "volumeMode": "Block"}],
            id="spec-wins",
        ),
        pytest.param(
            sc("local"), {"claimPropertySets": []}, [RWO_FS, RWO_BLOCK], id="empty-spec-defaults"
        ),
    ],
)
def test_claim_property_sets(
    storage_class: Obj, spec: Obj | None, expected_sets: list[Obj]
) -> None:
    assert storage_profile_status(storage_class, spec)["claimPropertySets"] == expected_sets


def test_claim_property_set_without_access_modes_is_refused() -> None:
    spec = {"claimPropertySets": [{"volumeMode": "Block"}]}
    with pytest.raises(ConfigError, match="must provide access mode for volume mode: Block"):
        storage_profile_status(sc("local"), spec)


CLONE_ANN = ann.STORAGE_CLASS_CLONE_STRATEGY


@pytest.mark.parametrize(
    ("storage_class", "spec", "snapshot_class", "expected"),
    [
        pytest.param(sc("local"), None, None, "copy", id="ours-copy"),
        pytest.param(sc("local"), {"cloneStrategy": "csi-clone"}, None, "csi-clone", id="spec"),
        pytest.param(
            sc("local", **{CLONE_ANN: "snapshot"}), None, None, "snapshot", id="class-annotation"
        ),
        pytest.param(
            sc("local", **{CLONE_ANN: "bogus"}), None, None, "copy", id="bad-annotation-ignored"
        ),
        pytest.param(sc("x", "example.com/nas"), None, None, "copy", id="unknown-copy"),
        pytest.param(sc("x", "example.com/nas"), None, "vsc", "snapshot", id="snapshot-class"),
        pytest.param(sc("x", "rbd.csi.ceph.com"), None, None, "csi-clone", id="advised"),
        pytest.param(
            sc("x", "pd.csi.storage.gke.io"), None, None, "copy", id="advised-snapshot-no-class"
        ),
    ],
)
def test_clone_strategy(
    storage_class: Obj, spec: Obj | None, snapshot_class: str | None, expected: str
) -> None:
    status = storage_profile_status(storage_class, spec, snapshot_class=snapshot_class)
    assert status["cloneStrategy"] == expected


def test_profile_names_its_class_and_provisioner() -> None:
    status = storage_profile_status(
        sc("local"), {"snapshotClass": "snap", "dataImportCronSourceFormat": "snapshot"}
    )
    assert status["storageClass"] == "local"
    assert status["provisioner"] == LOCAL_PROVISIONER
    assert status["snapshotClass"] == "snap"
    assert status["dataImportCronSourceFormat"] == "snapshot"
    assert storage_profile_status(sc("local"), None)["dataImportCronSourceFormat"] == "pvc"
