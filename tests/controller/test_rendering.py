"""The claim a DataVolume gets, and the DataVolumes CDI admits (reference §1.3, §1.4, §1.12, §2).

Sizes are checked against §5.7 with the numbers worked out in the comments:
required(size) = ceil(roundUp(size, 1 MiB) / (1 - overhead)), as CDI's GetRequiredSpace.
"""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest

from cdi.api import annotations as ann
from cdi.api.groups import LOCAL_PROVISIONER
from cdi.controller.config import cdiconfig_status, storage_profile_status
from cdi.controller.rendering import (
    REASON_CLAIM_NOT_VALID,
    REASON_UNSUPPORTED_SOURCE,
    RenderError,
    decimal_si,
    import_annotations,
    render_pvc,
    render_scratch_pvc,
    validate_datavolume,
)

Obj = dict[str, Any]
GI = 2**30
K8S_VERSION = "1.32"
DEFAULT = ann.DEFAULT_STORAGE_CLASS
VIRT_DEFAULT = ann.DEFAULT_VIRT_STORAGE_CLASS


def storage_class(name: str, provisioner: str = LOCAL_PROVISIONER, **annotations: str) -> Obj:
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": name, "annotations": annotations},
        "provisioner": provisioner,
    }


CLASSES = [
    storage_class("local", **{DEFAULT: "true"}),
    storage_class("local-wffc"),
    storage_class("fast"),  # overhead 0.1 below
    storage_class("nas", "example.com/nas"),  # unknown provisioner: an empty profile
]
CONFIG = cdiconfig_status({"filesystemOverhead": {"storageClass": {"fast": "0.1"}}}, CLASSES)


def profiles_for(classes: list[Obj]) -> list[Obj]:
    return [
        {"metadata": {"name": c["metadata"]["name"]}, "status": storage_profile_status(c, None)}
        for c in classes
    ]


PROFILES = profiles_for(CLASSES)


BLANK: Obj = {"blank": {}}


def datavolume(
    *,
    source: Obj | None = BLANK,
    storage: Obj | None = None,
    pvc: Obj | None = None,
    **spec: Any,
) -> Obj:
    """A DataVolume `disk1` in `vms`; `source=None` leaves the source out."""
    dv_spec: Obj = {**spec}
    if source is not None:
        dv_spec["source"] = copy.deepcopy(source)
    if pvc is not None:
        dv_spec["pvc"] = pvc
    else:
        dv_spec["storage"] = storage if storage is not None else {"resources": size("10Gi")}
    return {
        "apiVersion": "cdi.kubevirt.io/v1beta1",
        "kind": "DataVolume",
        "metadata": {"name": "disk1", "namespace": "vms", "uid": "dv-uid-1"},
        "spec": dv_spec,
    }


def size(quantity: str) -> Obj:
    return {"requests": {"storage": quantity}}


def render(
    dv: Obj,
    classes: list[Obj] = CLASSES,
    profiles: list[Obj] | None = None,
    config: Obj = CONFIG,
) -> Obj:
    pvc = render_pvc(
        dv,
        storage_classes=classes,
        storage_profiles=profiles if profiles is not None else PROFILES,
        cdi_config_status=config,
    )
    # Whatever we render must be a claim a Kubernetes API server accepts, field for field.
    kubernetes_validate.validate(pvc, K8S_VERSION, strict=True)
    return pvc


# --- storage: class, modes, size -----------------------------------------------------------------

HTTP = {"http": {"url": "https://example.org/disk.qcow2"}}


@pytest.mark.parametrize(
    ("storage", "expected"),
    [
        pytest.param(
            {"resources": size("10Gi")},
            # default class, the profile's first set; 10 GiB * 1.06 = 11381663334.4 -> up
            {
                "storageClassName": "local",
                "accessModes": ["ReadWriteOnce"],
                "volumeMode": "Filesystem",
                "resources": size("11422785362"),
            },
            id="defaults-10Gi-0.06",
        ),
        pytest.param(
            {"resources": size("10Gi"), "volumeMode": "Block"},
            # Block is never inflated; CDI writes the byte count, not "10Gi"
            {
                "storageClassName": "local",
                "accessModes": ["ReadWriteOnce"],
                "volumeMode": "Block",
                "resources": size("10737418240"),
            },
            id="block-not-inflated",
        ),
        pytest.param(
            {"resources": size("10Gi"), "storageClassName": "fast"},
            # 10737418240 / 0.9 = 11930464711.1 -> 11930464712
            {
                "storageClassName": "fast",
                "accessModes": ["ReadWriteOnce"],
                "volumeMode": "Filesystem",
                "resources": size("11930464712"),
            },
            id="per-class-overhead-0.1",
        ),
        pytest.param(
            {"resources": size("1000M")},
            # 1e9 B -> 954 MiB = 1000341504 B; / 0.94 = 1064193089.4 -> 1064193090
            {
                "storageClassName": "local",
                "accessModes": ["ReadWriteOnce"],
                "volumeMode": "Filesystem",
                "resources": size("1064193090"),
            },
            id="rounded-up-to-MiB-first",
        ),
        pytest.param(
            {"resources": size("2G"), "volumeMode": "Block"},
            {
                "storageClassName": "local",
                "accessModes": ["ReadWriteOnce"],
                "volumeMode": "Block",
                "resources": size("2G"),
            },
            id="decimal-si-form",
        ),
        pytest.param(
            {"resources": size("10Gi"), "volumeMode": "FromStorageProfile"},
            {
                "storageClassName": "local",
                "accessModes": ["ReadWriteOnce"],
                "volumeMode": "Filesystem",
                "resources": size("11422785362"),
            },
            id="from-storage-profile",
        ),
        pytest.param(
            {"resources": size("10Gi"), "accessModes": ["ReadWriteMany"]},
            # no set has RWX: the volume mode is left to Kubernetes (Filesystem)
            {
                "storageClassName": "local",
                "accessModes": ["ReadWriteMany"],
                "resources": size("11422785362"),
            },
            id="access-modes-no-matching-set",
        ),
        pytest.param(
            {
                "resources": size("10Gi"),
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "nas",
            },
            {
                "storageClassName": "nas",
                "accessModes": ["ReadWriteMany"],
                "resources": size("11422785362"),
            },
            id="complete-spec-needs-no-profile-sets",
        ),
        pytest.param(
            {"resources": size("10Gi"), "storageClassName": "", "accessModes": ["ReadWriteOnce"]},
            # explicit "" is "no class" (a static PV): nothing to inflate for
            {
                "storageClassName": "",
                "accessModes": ["ReadWriteOnce"],
                "resources": size("10737418240"),
            },
            id="explicit-no-class",
        ),
    ],
)
def test_storage_rendering(storage: Obj, expected: Obj) -> None:
    assert render(datavolume(source=HTTP, storage=storage))["spec"] == expected


def test_volume_mode_from_the_set_sharing_an_access_mode() -> None:
    profiles = copy.deepcopy(PROFILES)
    profiles[0]["status"]["claimPropertySets"] = [
        {"accessModes": ["ReadWriteMany"], "volumeMode": "Block"},
        {"accessModes": ["ReadWriteOnce"], "volumeMode": "Filesystem"},
    ]
    storage = {"resources": size("10Gi"), "accessModes": ["ReadWriteMany"]}
    spec = render(datavolume(storage=storage), profiles=profiles)["spec"]
    assert spec["volumeMode"] == "Block"
    storage = {"resources": size("10Gi"), "volumeMode": "Filesystem"}
    spec = render(datavolume(storage=storage), profiles=profiles)["spec"]
    assert spec["accessModes"] == ["ReadWriteOnce"]


def test_archive_forces_filesystem_even_when_the_profile_prefers_block() -> None:
    profiles = copy.deepcopy(PROFILES)
    profiles[0]["status"]["claimPropertySets"].reverse()  # Block first
    spec = render(datavolume(source=HTTP, contentType="archive"), profiles=profiles)["spec"]
    assert spec["volumeMode"] == "Filesystem"
    assert spec["accessModes"] == ["ReadWriteOnce"]
    assert render(datavolume(source=HTTP), profiles=profiles)["spec"]["volumeMode"] == "Block"


@pytest.mark.parametrize(
    ("classes", "content", "expected"),
    [
        pytest.param(
            [storage_class("a", **{DEFAULT: "true"}), storage_class("v", **{VIRT_DEFAULT: "true"})],
            "kubevirt",
            "v",
            id="virt-default-for-disks",
        ),
        pytest.param(
            [storage_class("a", **{DEFAULT: "true"}), storage_class("v", **{VIRT_DEFAULT: "true"})],
            "archive",
            "a",
            id="k8s-default-for-archives",
        ),
        pytest.param(
            [storage_class("b", **{DEFAULT: "true"}), storage_class("a", **{DEFAULT: "true"})],
            "kubevirt",
            "a",
            id="two-defaults-same-age-first-by-name",
        ),
        pytest.param(
            [
                {
                    **storage_class("old", **{DEFAULT: "true"}),
                    "metadata": {
                        "name": "old",
                        "annotations": {DEFAULT: "true"},
                        "creationTimestamp": "2024-01-01T00:00:00Z",
                    },
                },
                {
                    **storage_class("new", **{DEFAULT: "true"}),
                    "metadata": {
                        "name": "new",
                        "annotations": {DEFAULT: "true"},
                        "creationTimestamp": "2025-01-01T00:00:00Z",
                    },
                },
            ],
            "kubevirt",
            "new",
            id="newest-default-wins",
        ),
    ],
)
def test_default_class(classes: list[Obj], content: str, expected: str) -> None:
    dv = datavolume(source=HTTP, contentType=content)
    pvc = render(dv, classes=classes, profiles=profiles_for(classes))
    assert pvc["spec"]["storageClassName"] == expected


def test_no_class_but_access_modes_uses_the_global_overhead() -> None:
    storage = {"resources": size("10Gi"), "accessModes": ["ReadWriteOnce"]}
    pvc = render(datavolume(storage=storage), classes=[], profiles=[])
    assert "storageClassName" not in pvc["spec"]
    assert pvc["spec"]["resources"] == size("11422785362")


def test_minimum_supported_pvc_size_of_the_profile() -> None:
    profiles = copy.deepcopy(PROFILES)
    profiles[0]["metadata"]["annotations"] = {ann.MINIMUM_SUPPORTED_PVC_SIZE: "20Gi"}
    assert render(datavolume(), profiles=profiles)["spec"]["resources"] == size("20Gi")
    profiles[0]["metadata"]["annotations"] = {ann.MINIMUM_SUPPORTED_PVC_SIZE: "1Gi"}
    assert render(datavolume(), profiles=profiles)["spec"]["resources"] == size("11422785362")


def test_clone_without_size_gets_zero_for_the_clone_controller() -> None:
    dv = datavolume(
        source={"pvc": {"namespace": "golden", "name": "fedora"}},
        storage={"storageClassName": "local"},
    )
    assert render(dv)["spec"]["resources"] == size("0")


def test_pvc_spec_is_used_verbatim() -> None:
    pvc_spec = {"accessModes": ["ReadWriteOnce"], "resources": size("10Gi")}
    pvc = render(datavolume(pvc=pvc_spec))
    assert pvc["spec"] == pvc_spec  # no class, no inflation
    assert pvc["spec"] is not pvc_spec
    # no volumeMode means Filesystem
    assert pvc["metadata"]["labels"][ann.LABEL_FILLING_UP_ALERT] == "disabled"


NO_SETS = [{"metadata": {"name": "local"}, "status": {"claimPropertySets": []}}]


@pytest.mark.parametrize(
    ("dv", "classes", "profiles", "message"),
    [
        pytest.param(
            datavolume(
                storage={"resources": size("1Gi"), "volumeMode": "Block"}, contentType="archive"
            ),
            CLASSES,
            PROFILES,
            "ContentType Archive cannot have block volumeMode",
            id="archive-block",
        ),
        pytest.param(
            datavolume(),
            [],
            [],
            "PVC spec is missing accessMode and no storageClass to choose profile",
            id="no-class-no-modes",
        ),
        pytest.param(
            datavolume(storage={"resources": size("1Gi"), "storageClassName": "gone"}),
            CLASSES,
            PROFILES,
            "PVC spec is missing accessMode and no storageClass to choose profile",
            id="named-class-missing",
        ),
        pytest.param(
            datavolume(),
            CLASSES,
            [],
            'cannot get StorageProfile: storageprofiles.cdi.kubevirt.io "local" not found',
            id="profile-not-yet-made",
        ),
        pytest.param(
            datavolume(),
            CLASSES,
            NO_SETS,
            "no accessMode specified in StorageProfile local",
            id="incomplete-profile",
        ),
        pytest.param(
            datavolume(storage={"resources": size("1Gi"), "volumeMode": "Block"}),
            CLASSES,
            NO_SETS,
            "no matching accessMode specified in StorageProfile local",
            id="no-set-for-the-volume-mode",
        ),
        pytest.param(
            datavolume(storage={"accessModes": ["ReadWriteOnce"]}),
            CLASSES,
            PROFILES,
            "PVC size is missing",
            id="size-missing",
        ),
        pytest.param(
            datavolume(pvc={"accessModes": ["ReadWriteOnce"]}),
            CLASSES,
            PROFILES,
            "PVC size is missing",
            id="pvc-size-missing",
        ),
        pytest.param(
            datavolume(storage={"resources": size("1048575")}),
            CLASSES,
            PROFILES,
            "PVC Spec is not valid - storage size should be at least 1MiB",
            id="below-1MiB",
        ),
        pytest.param(
            datavolume(storage={"resources": size("0")}),
            CLASSES,
            PROFILES,
            "PVC size can't be equal or less than zero",
            id="zero",
        ),
        pytest.param(
            {**datavolume(), "spec": {"source": {"blank": {}}}},
            CLASSES,
            PROFILES,
            "datavolume one of {pvc, storage} field is required",
            id="neither-pvc-nor-storage",
        ),
    ],
)
def test_render_errors(dv: Obj, classes: list[Obj], profiles: list[Obj], message: str) -> None:
    with pytest.raises(RenderError) as caught:
        render_pvc(dv, storage_classes=classes, storage_profiles=profiles, cdi_config_status=CONFIG)
    assert str(caught.value) == message
    assert caught.value.reason == REASON_CLAIM_NOT_VALID


def test_unsupported_source_is_refused_with_its_own_reason() -> None:
    dv = datavolume(source={"registry": {"url": "docker://quay.io/x/y"}})
    with pytest.raises(RenderError, match="DataVolume source registry is not supported") as caught:
        render(dv)
    assert caught.value.reason == REASON_UNSUPPORTED_SOURCE


@pytest.mark.parametrize(
    ("size_bytes", "text"),
    [
        pytest.param(0, "0", id="zero"),
        pytest.param(11422785362, "11422785362", id="plain"),
        pytest.param(1_500_000_000, "1500M", id="M"),
        pytest.param(2 * 10**9, "2G", id="G"),
        pytest.param(10 * GI, "10737418240", id="binary-is-not-shortened"),
        pytest.param(1000, "1k", id="k"),
    ],
)
def test_decimal_si(size_bytes: int, text: str) -> None:
    assert decimal_si(size_bytes) == text


# --- metadata ------------------------------------------------------------------------------------


def test_claim_metadata() -> None:
    dv = datavolume(source=HTTP)
    dv["metadata"]["labels"] = {"kubevirt.io/created-by": "vm1"}
    dv["metadata"]["annotations"] = {"user.example.org/note": "keep me"}
    metadata = render(dv)["metadata"]
    assert metadata["name"] == "disk1"
    assert metadata["namespace"] == "vms"
    assert metadata["labels"] == {
        "app": "containerized-data-importer",
        "alerts.k8s.io/KubePersistentVolumeFillingUp": "disabled",
        "kubevirt.io/created-by": "vm1",
    }
    assert metadata["annotations"] == {
        "user.example.org/note": "keep me",
        "cdi.kubevirt.io/storage.pod.restarts": "0",
        "cdi.kubevirt.io/storage.contentType": "kubevirt",
        "cdi.kubevirt.io/storage.preallocation.requested": "false",
        "cdi.kubevirt.io/createdForDataVolume": "dv-uid-1",
        "cdi.kubevirt.io/storage.import.endpoint": "https://example.org/disk.qcow2",
        "cdi.kubevirt.io/storage.import.source": "http",
    }
    assert metadata["ownerReferences"] == [
        {
            "apiVersion": "cdi.kubevirt.io/v1beta1",
            "kind": "DataVolume",
            "name": "disk1",
            "uid": "dv-uid-1",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def test_block_claim_has_no_filling_up_label_and_dv_labels_win() -> None:
    dv = datavolume(storage={"resources": size("1Gi"), "volumeMode": "Block"})
    dv["metadata"]["labels"] = {"app": "mine"}
    labels = render(dv)["metadata"]["labels"]
    assert labels == {"app": "mine"}


@pytest.mark.parametrize(
    ("dv_preallocation", "config_preallocation", "expected"),
    [
        pytest.param(None, False, "false", id="default"),
        pytest.param(None, True, "true", id="from-cdiconfig"),
        pytest.param(False, True, "false", id="dv-wins-off"),
        pytest.param(True, False, "true", id="dv-wins-on"),
    ],
)
def test_preallocation_requested(
    dv_preallocation: bool | None, config_preallocation: bool, expected: str
) -> None:
    dv = datavolume()
    if dv_preallocation is not None:
        dv["spec"]["preallocation"] = dv_preallocation
    config = {**CONFIG, "preallocation": config_preallocation}
    annotations = render(dv, config=config)["metadata"]["annotations"]
    assert annotations[ann.PREALLOCATION_REQUESTED] == expected


def test_priority_class_service_account_and_archive_content() -> None:
    dv = datavolume(
        source=HTTP, priorityClassName="high", serviceAccountName="puller", contentType="archive"
    )
    annotations = render(dv)["metadata"]["annotations"]
    assert annotations["cdi.kubevirt.io/storage.pod.priorityclassname"] == "high"
    assert annotations["cdi.kubevirt.io/storage.pod.serviceAccountName"] == "puller"
    assert annotations["cdi.kubevirt.io/storage.contentType"] == "archive"


P = "cdi.kubevirt.io/storage.import."


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        pytest.param(
            {
                "http": {
                    "url": "https://example.org/disk.img.xz",
                    "secretRef": "creds",
                    "certConfigMap": "ca",
                    "checksum": "sha256:" + "0" * 64,
                    "insecureSkipVerify": True,
                    "extraHeaders": ["X-First: 1", "X-Second: 2"],
                    "secretExtraHeaders": ["token-a", "token-b"],
                }
            },
            {
                P + "endpoint": "https://example.org/disk.img.xz",
                P + "source": "http",
                P + "secretName": "creds",
                P + "certConfigMap": "ca",
                P + "checksum": "sha256:" + "0" * 64,
                P + "insecureSkipVerify": "true",
                P + "extraHeaders.0": "X-First: 1",
                P + "extraHeaders.1": "X-Second: 2",
                P + "secretExtraHeaders.0": "token-a",
                P + "secretExtraHeaders.1": "token-b",
            },
            id="http-everything",
        ),
        pytest.param(
            {"http": {"url": "http://h/d", "insecureSkipVerify": False}},
            {P + "endpoint": "http://h/d", P + "source": "http"},
            id="http-minimal",
        ),
        pytest.param(
            {"s3": {"url": "https://s3.us-east-1.amazonaws.com/b/k", "secretRef": "keys"}},
            {
                P + "endpoint": "https://s3.us-east-1.amazonaws.com/b/k",
                P + "source": "s3",
                P + "secretName": "keys",
            },
            id="s3",
        ),
        pytest.param({"blank": {}}, {P + "source": "none"}, id="blank"),
        pytest.param({"upload": {}}, {"cdi.kubevirt.io/storage.upload.target": ""}, id="upload"),
        pytest.param({"pvc": {"namespace": "a", "name": "b"}}, {}, id="clone-none"),
    ],
)
def test_import_annotations(source: Obj, expected: dict[str, str]) -> None:
    assert import_annotations(source) == expected


def test_import_annotations_override_a_dvs_own() -> None:
    dv = datavolume(source={"blank": {}})
    dv["metadata"]["annotations"] = {P + "source": "http", ann.POD_RESTARTS: "7"}
    annotations = render(dv)["metadata"]["annotations"]
    assert annotations[P + "source"] == "none"
    assert annotations[ann.POD_RESTARTS] == "0"


# --- scratch -------------------------------------------------------------------------------------


def test_scratch_claim() -> None:
    target = render(datavolume(source=HTTP))
    target["metadata"]["uid"] = "pvc-uid"
    target["metadata"]["annotations"]["kubevirt.io/provisionOnNode"] = "n1"
    pod = {"metadata": {"name": "importer-disk1", "uid": "pod-uid"}}
    scratch = render_scratch_pvc(target, pod=pod, cdi_config_status=CONFIG)
    kubernetes_validate.validate(scratch, K8S_VERSION, strict=True)
    assert scratch["metadata"]["name"] == "disk1-scratch"
    assert scratch["metadata"]["labels"] == {
        "app": "containerized-data-importer",
        "velero.io/exclude-from-backup": "true",
    }
    # other kubevirt.io annotations follow; CDI's own never do (they would start an import)
    assert scratch["metadata"]["annotations"] == {"kubevirt.io/provisionOnNode": "n1"}
    assert scratch["metadata"]["ownerReferences"][0]["kind"] == "Pod"
    assert scratch["metadata"]["ownerReferences"][0]["uid"] == "pod-uid"
    assert scratch["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert scratch["spec"]["storageClassName"] == "local"
    # target 11422785362 B: usable = roundDown(ceil(11422785362 * 0.94), 1 MiB) = 10240 MiB;
    # / 0.94 = 11422785361.7 -> 11422785362 -> roundUp 1 MiB = 10894 MiB = 11423186944
    assert scratch["spec"]["resources"] == size("11423186944")


def test_scratch_claim_uses_the_configured_class() -> None:
    target = render(datavolume(storage={"resources": size("10Gi"), "volumeMode": "Block"}))
    config = {**CONFIG, "scratchSpaceStorageClass": "fast"}
    scratch = render_scratch_pvc(target, pod={"metadata": {}}, cdi_config_status=config)
    assert scratch["spec"]["storageClassName"] == "fast"
    # Block target: usable = 10 GiB; scratch on "fast" (0.1): 10 GiB / 0.9 = 11930464711.1,
    # rounded up to 11378 MiB = 11930697728
    assert scratch["spec"]["resources"] == size("11930697728")


# --- admission -----------------------------------------------------------------------------------


def with_spec(dv: Obj, **changes: Any) -> Obj:
    dv = copy.deepcopy(dv)
    dv["spec"].update(changes)
    return dv


BASE = datavolume(source=HTTP)
PVC_SPEC = {"accessModes": ["ReadWriteOnce"], "resources": size("1Gi")}


@pytest.mark.parametrize(
    ("dv", "messages"),
    [
        pytest.param(BASE, [], id="http-ok"),
        pytest.param(datavolume(source={"blank": {}}), [], id="blank-ok"),
        pytest.param(datavolume(source={"upload": {}}, pvc=PVC_SPEC), [], id="upload-ok"),
        pytest.param(
            datavolume(source={"s3": {"url": "https://s3.example.org/bucket/key"}}), [], id="s3"
        ),
        pytest.param(
            datavolume(
                source={"pvc": {"namespace": "golden", "name": "f"}},
                storage={"storageClassName": "local"},
            ),
            [],
            id="clone-without-size-ok",
        ),
        pytest.param(
            {**BASE, "metadata": {"name": "d" * 254}},
            ["Name cannot be longer than 253 characters"],
            id="name-too-long",
        ),
        pytest.param(
            {**BASE, "spec": {"source": HTTP}}, ["Missing Data volume PVC"], id="no-pvc-or-storage"
        ),
        pytest.param(
            with_spec(BASE, pvc=PVC_SPEC),
            ["Duplicate storage definition, both target storage and target pvc defined"],
            id="both-pvc-and-storage",
        ),
        pytest.param(
            datavolume(source=HTTP, storage={}), ["Storage size is missing"], id="storage-no-size"
        ),
        pytest.param(
            datavolume(source=HTTP, pvc={"accessModes": ["ReadWriteOnce"]}),
            ["PVC size is missing"],
            id="pvc-no-size",
        ),
        pytest.param(
            datavolume(
                source={"pvc": {"namespace": "a", "name": "b"}},
                pvc={"accessModes": ["ReadWriteOnce"]},
            ),
            ["PVC size is missing"],
            id="pvc-api-clone-still-needs-size",
        ),
        pytest.param(
            datavolume(source=HTTP, storage={"resources": size("0")}),
            ["Storage size can't be equal or less than zero"],
            id="zero-size",
        ),
        pytest.param(
            datavolume(source=HTTP, storage={"resources": size("512Ki")}),
            ["PVC Spec is not valid - storage size should be at least 1MiB"],
            id="below-1MiB",
        ),
        pytest.param(
            datavolume(source=HTTP, storage={"resources": size("ten")}),
            [
                "quantities must match the regular expression "
                "'^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"
            ],
            id="not-a-quantity",
        ),
        pytest.param(
            datavolume(
                source=HTTP, storage={"resources": size("1Gi"), "storageClassName": "c" * 254}
            ),
            ["Name cannot be longer than 253 characters"],
            id="class-name-too-long",
        ),
        pytest.param(
            datavolume(source=HTTP, pvc={"resources": size("1Gi")}),
            ["Required value: at least 1 access mode is required"],
            id="pvc-no-access-mode",
        ),
        pytest.param(
            datavolume(
                source=HTTP,
                pvc={"accessModes": ["ReadWriteOnce", "ReadOnlyMany"], "resources": size("1Gi")},
            ),
            ["PVC multiple accessModes"],
            id="pvc-two-access-modes",
        ),
        pytest.param(
            datavolume(
                source=HTTP, storage={"accessModes": ["ReadWriteSome"], "resources": size("1Gi")}
            ),
            [
                'Unsupported value: "ReadWriteSome": supported values: "ReadOnlyMany", '
                '"ReadWriteMany", "ReadWriteOnce", "ReadWriteOncePod"'
            ],
            id="bad-access-mode",
        ),
        pytest.param(
            with_spec(BASE, source=None),
            ["Data volume should have either Source or SourceRef, or be externally populated"],
            id="no-source",
        ),
        pytest.param(
            with_spec(BASE, sourceRef={"kind": "DataSource", "name": "fedora"}),
            ["Data volume should have either Source or SourceRef, or be externally populated"],
            id="source-and-sourceRef",
        ),
        pytest.param(
            with_spec(BASE, source=None, sourceRef={"kind": "PVC", "name": "x"}),
            ["Unsupported sourceRef kind PVC, currently only DataSource is supported"],
            id="sourceRef-kind",
        ),
        pytest.param(
            with_spec(BASE, source=None, sourceRef={"name": "x"}),
            ["Missing sourceRef kind"],
            id="sourceRef-no-kind",
        ),
        pytest.param(
            with_spec(BASE, source=None, sourceRef={"kind": "DataSource"}),
            ["Missing sourceRef name"],
            id="sourceRef-no-name",
        ),
        pytest.param(datavolume(source={}), ["Missing Data volume source"], id="empty-source"),
        pytest.param(
            datavolume(source={**HTTP, "blank": {}}),
            ["Multiple Data volume sources"],
            id="two-sources",
        ),
        pytest.param(
            with_spec(BASE, contentType="iso"),
            ["ContentType not one of: kubevirt, archive"],
            id="content-type",
        ),
        pytest.param(
            datavolume(source={"http": {"url": ""}}),
            ["spec.source source URL is empty"],
            id="url-empty",
        ),
        pytest.param(
            datavolume(source={"http": {"url": "example.org/disk.img"}}),
            ["spec.source Invalid source URL: example.org/disk.img"],
            id="url-not-absolute",
        ),
        pytest.param(
            datavolume(source={"http": {"url": "https://example.org:port/x"}}),
            ["spec.source Invalid source URL: https://example.org:port/x"],
            id="url-bad-port",
        ),
        pytest.param(
            datavolume(source={"http": {"url": "ftp://example.org/disk.img"}}),
            ["spec.source Invalid source URL scheme: ftp://example.org/disk.img"],
            id="url-scheme",
        ),
        pytest.param(
            datavolume(source={"s3": {"url": "/bucket/key"}}),
            ["spec.source Invalid source URL scheme: /bucket/key"],
            id="s3-path-only",
        ),
        pytest.param(
            datavolume(source={"http": {"url": "https://h/d", "checksum": "sha256:abc"}}),
            [
                "Invalid checksum format: sha256:abc (want md5, sha1, sha256 or sha512, a colon, "
                "and the hex digest)"
            ],
            id="checksum-short",
        ),
        pytest.param(
            datavolume(source={"http": {"url": "https://h/d", "checksum": "crc32:" + "0" * 8}}),
            [
                "Invalid checksum format: crc32:00000000 (want md5, sha1, sha256 or sha512, a "
                "colon, and the hex digest)"
            ],
            id="checksum-algorithm",
        ),
        pytest.param(
            datavolume(source={"http": {"url": "https://h/d", "checksum": "md5:" + "a" * 32}}),
            [],
            id="checksum-md5-ok",
        ),
        pytest.param(
            datavolume(source={"http": {"url": "https://h/d", "extraHeaders": ["NoColon"]}}),
            ["Invalid extra header: 'NoColon' is not 'Name: value'"],
            id="extra-header",
        ),
        pytest.param(
            datavolume(source={"blank": {}}, contentType="archive"),
            ["SourceType cannot be blank and the contentType be archive"],
            id="blank-archive",
        ),
        pytest.param(
            datavolume(source={"pvc": {"name": "b"}}),
            ["spec.source.PVC source PVC is not valid"],
            id="clone-source-no-namespace",
        ),
        pytest.param(
            datavolume(
                source=None,
                storage={
                    "resources": size("1Gi"),
                    "dataSourceRef": {"apiGroup": "example.org", "kind": "Pop", "name": "p"},
                },
            ),
            [],
            id="externally-populated-ok",
        ),
        pytest.param(
            datavolume(
                source=HTTP,
                storage={"resources": size("1Gi"), "dataSourceRef": {"kind": "Pop"}},
            ),
            [
                "External population is incompatible with Source and SourceRef",
                "Required value: DataSourceRef name",
                "Required value: DataSourceRef apiGroup when kind is not 'PersistentVolumeClaim'",
            ],
            id="externally-populated-bad",
        ),
    ],
)
def test_validate_datavolume(dv: Obj, messages: list[str]) -> None:
    assert validate_datavolume(dv) == messages
