"""The importer pod as CDI builds it (reference §5.1, §5.2), and CDI's object names (§4.6).

Every pod is also checked against the Kubernetes schema, and one is fed to the importer's own
settings loader, so the controller and the worker cannot drift apart on the env contract.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest

from cdi.api import annotations as ann
from cdi.api import env
from cdi.api.groups import LOCAL_PROVISIONER
from cdi.controller import naming
from cdi.controller.config import cdiconfig_status
from cdi.controller.podspecs import importer_pod, owner_uid_for
from cdi.controller.rendering import RenderError
from importer.settings import ImporterSettings

Obj = dict[str, Any]
K8S_VERSION = "1.32"
P = "cdi.kubevirt.io/storage.import."
CLASSES = [
    {"metadata": {"name": "local"}, "provisioner": LOCAL_PROVISIONER},
    {"metadata": {"name": "fast"}, "provisioner": LOCAL_PROVISIONER},
]
CONFIG = cdiconfig_status({"filesystemOverhead": {"storageClass": {"fast": "0.1"}}}, CLASSES)


def claim(
    annotations: dict[str, str] | None = None,
    *,
    volume_mode: str | None = None,
    storage_class: str | None = "local",
    request: str | None = "11422785362",
    labels: dict[str, str] | None = None,
) -> Obj:
    """A PVC as the DataVolume controller leaves it for the import controller."""
    spec: Obj = {"accessModes": ["ReadWriteOnce"]}
    if request is not None:
        spec["resources"] = {"requests": {"storage": request}}
    if volume_mode:
        spec["volumeMode"] = volume_mode
    if storage_class is not None:
        spec["storageClassName"] = storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": "disk1",
            "namespace": "vms",
            "uid": "pvc-uid",
            "labels": labels or {"app": "containerized-data-importer"},
            "annotations": {
                P + "source": "http",
                P + "endpoint": "https://example.org/disk.qcow2",
                ann.CONTENT_TYPE: "kubevirt",
                ann.PREALLOCATION_REQUESTED: "false",
                **(annotations or {}),
            },
            "ownerReferences": [
                {
                    "apiVersion": "cdi.kubevirt.io/v1beta1",
                    "kind": "DataVolume",
                    "name": "disk1",
                    "uid": "dv-uid",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": spec,
    }


def pod_for(pvc: Obj, **kwargs: Any) -> Obj:
    options: Obj = {
        "image": "quay.io/example/cdi-importer:v1",
        "cdi_config_status": CONFIG,
        "scratch_pvc": None,
        "owner_uid": owner_uid_for(pvc),
    }
    options.update(kwargs)
    pod = importer_pod(pvc, **options)
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    return pod


def container(pod: Obj) -> Obj:
    (only,) = pod["spec"]["containers"]
    return dict(only)


def env_of(pod: Obj) -> dict[str, Any]:
    """name -> value (or the valueFrom dict); an empty value reads as ""."""
    return {e["name"]: e.get("value", e.get("valueFrom", "")) for e in container(pod)["env"]}


# --- shape ---------------------------------------------------------------------------------------


def test_pod_shape() -> None:
    pod = pod_for(claim())
    metadata = pod["metadata"]
    assert metadata["name"] == "importer-disk1"
    assert metadata["namespace"] == "vms"
    assert metadata["labels"] == {
        "app": "containerized-data-importer",
        "cdi.kubevirt.io": "importer",
        "prometheus.cdi.kubevirt.io": "true",
    }
    assert metadata["annotations"] == {
        "cdi.kubevirt.io/storage.createdByController": "yes",
        "sidecar.istio.io/inject": "false",
        "linkerd.io/inject": "disabled",
    }
    assert metadata["ownerReferences"] == [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "name": "disk1",
            "uid": "pvc-uid",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    spec = pod["spec"]
    assert spec["restartPolicy"] == "OnFailure"
    assert spec["enableServiceLinks"] is False
    c = container(pod)
    assert c["name"] == "importer"
    assert c["image"] == "quay.io/example/cdi-importer:v1"
    assert c["command"] == ["cdi-importer"]
    assert "args" not in c  # our cdi-importer takes no -v flag
    assert c["ports"] == [{"name": "metrics", "containerPort": 8443, "protocol": "TCP"}]
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert c["resources"] == {
        "limits": {"cpu": "750m", "memory": "600M"},
        "requests": {"cpu": "100m", "memory": "60M"},
    }


@pytest.mark.parametrize(
    ("local", "expected"),
    [
        pytest.param(
            False,
            {
                "capabilities": {"drop": ["ALL"]},
                "seccompProfile": {"type": "RuntimeDefault"},
                "allowPrivilegeEscalation": False,
                "runAsNonRoot": True,
                "runAsUser": 107,
            },
            id="cluster",
        ),
        pytest.param(
            True,
            {
                "capabilities": {"drop": ["ALL"]},
                "seccompProfile": {"type": "RuntimeDefault"},
                "allowPrivilegeEscalation": False,
            },
            id="local-agent-runs-as-itself",
        ),
    ],
)
def test_security_context(local: bool, expected: Obj) -> None:
    pod = pod_for(claim(), local=local)
    assert container(pod)["securityContext"] == expected
    assert pod["spec"]["securityContext"] == {"fsGroup": 107}


@pytest.mark.parametrize(
    ("volume_mode", "scratch", "mounts", "devices", "fs_group"),
    [
        pytest.param(
            None,
            None,
            [{"name": "cdi-data-vol", "mountPath": "/data"}],
            None,
            True,
            id="filesystem",
        ),
        pytest.param(
            "Filesystem",
            "disk1-scratch",
            [
                {"name": "cdi-data-vol", "mountPath": "/data"},
                {"name": "cdi-scratch-vol", "mountPath": "/scratch"},
            ],
            None,
            True,
            id="filesystem-scratch",
        ),
        pytest.param(
            "Block",
            None,
            None,
            [{"name": "cdi-data-vol", "devicePath": "/dev/cdi-block-volume"}],
            False,
            id="block",
        ),
        pytest.param(
            "Block",
            "disk1-scratch",
            [{"name": "cdi-scratch-vol", "mountPath": "/scratch"}],
            [{"name": "cdi-data-vol", "devicePath": "/dev/cdi-block-volume"}],
            True,
            id="block-scratch",
        ),
    ],
)
def test_target_and_scratch_volumes(
    volume_mode: str | None,
    scratch: str | None,
    mounts: list[Obj] | None,
    devices: list[Obj] | None,
    fs_group: bool,
) -> None:
    pod = pod_for(claim(volume_mode=volume_mode), scratch_pvc=scratch)
    c = container(pod)
    assert c.get("volumeMounts") == mounts
    assert c.get("volumeDevices") == devices
    expected_volumes = [{"name": "cdi-data-vol", "persistentVolumeClaim": {"claimName": "disk1"}}]
    if scratch:
        expected_volumes.append(
            {"name": "cdi-scratch-vol", "persistentVolumeClaim": {"claimName": scratch}}
        )
    assert pod["spec"]["volumes"] == expected_volumes
    # fsGroup only matters (and CDI only sets it) when something is mounted as files
    assert ("securityContext" in pod["spec"]) is fs_group


# --- env -----------------------------------------------------------------------------------------

CDI_ORDER = [
    "IMPORTER_SOURCE",
    "IMPORTER_ENDPOINT",
    "IMPORTER_CONTENTTYPE",
    "IMPORTER_IMAGE_SIZE",
    "OWNER_UID",
    "FILESYSTEM_OVERHEAD",
    "INSECURE_TLS",
    "IMPORTER_DISK_ID",
    "IMPORTER_UUID",
    "IMPORTER_PULL_METHOD",
    "IMPORTER_READY_FILE",
    "IMPORTER_DONE_FILE",
    "IMPORTER_BACKING_FILE",
    "IMPORTER_THUMBPRINT",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "IMPORTER_CURRENT_CHECKPOINT",
    "IMPORTER_PREVIOUS_CHECKPOINT",
    "IMPORTER_FINAL_CHECKPOINT",
    "PREALLOCATION",
    "CACHE_MODE",
    "IMPORTER_CHECKSUM",
]


def test_env_of_a_plain_http_import() -> None:
    pod = pod_for(claim())
    names = [e["name"] for e in container(pod)["env"]]
    assert names == CDI_ORDER
    assert env_of(pod) == {
        "IMPORTER_SOURCE": "http",
        "IMPORTER_ENDPOINT": "https://example.org/disk.qcow2",
        "IMPORTER_CONTENTTYPE": "kubevirt",
        "IMPORTER_IMAGE_SIZE": "11422785362",  # the PVC request, as written
        "OWNER_UID": "dv-uid",  # the PVC's only owner: its DataVolume
        "FILESYSTEM_OVERHEAD": "0.06",
        "INSECURE_TLS": "false",
        "IMPORTER_DISK_ID": "",
        "IMPORTER_UUID": "",
        "IMPORTER_PULL_METHOD": "",
        "IMPORTER_READY_FILE": "",
        "IMPORTER_DONE_FILE": "",
        "IMPORTER_BACKING_FILE": "",
        "IMPORTER_THUMBPRINT": "",
        "http_proxy": "",
        "https_proxy": "",
        "no_proxy": "",
        "IMPORTER_CURRENT_CHECKPOINT": "",
        "IMPORTER_PREVIOUS_CHECKPOINT": "",
        "IMPORTER_FINAL_CHECKPOINT": "",
        "PREALLOCATION": "false",
        "CACHE_MODE": "",
        "IMPORTER_CHECKSUM": "",
    }
    # an empty value is written the way the API server returns it: a bare name
    assert {"name": "IMPORTER_DISK_ID"} in container(pod)["env"]


def test_env_and_volumes_of_an_http_import_with_everything() -> None:
    pvc = claim(
        {
            P + "secretName": "creds",
            P + "certConfigMap": "ca-bundle",
            P + "checksum": "sha256:" + "a" * 64,
            P + "insecureSkipVerify": "true",
            # out of order on purpose, and past 9 (string order would put 10 before 2)
            P + "extraHeaders.10": "X-Eleventh: k",
            P + "extraHeaders.0": "X-First: a",
            P + "extraHeaders.2": "X-Third: c",
            P + "extraHeaders.1": "X-Second: b",
            P + "secretExtraHeaders.1": "token-b",
            P + "secretExtraHeaders.0": "token-a",
            ann.PREALLOCATION_REQUESTED: "true",
            ann.REQUIRES_DIRECT_IO: "true",
        }
    )
    config = {
        **CONFIG,
        "importProxy": {
            "HTTPProxy": "http://proxy:3128",
            "HTTPSProxy": "http://proxy:3129",
            "noProxy": ".svc",
            "trustedCAProxy": "proxy-ca",
        },
    }
    pod = pod_for(pvc, cdi_config_status=config, scratch_pvc="disk1-scratch")
    values = env_of(pod)
    assert values["IMPORTER_ACCESS_KEY_ID"] == {
        "secretKeyRef": {"name": "creds", "key": "accessKeyId"}
    }
    assert values["IMPORTER_SECRET_KEY"] == {"secretKeyRef": {"name": "creds", "key": "secretKey"}}
    assert values["IMPORTER_CERT_DIR"] == "/certs"
    assert values["IMPORTER_PROXY_CERT_DIR"] == "/proxycerts/"
    assert values["IMPORTER_CHECKSUM"] == "sha256:" + "a" * 64
    assert values["INSECURE_TLS"] == "true"
    assert values["PREALLOCATION"] == "true"
    assert values["CACHE_MODE"] == "TRYNONE"
    assert (values["http_proxy"], values["https_proxy"], values["no_proxy"]) == (
        "http://proxy:3128",
        "http://proxy:3129",
        ".svc",
    )
    headers = [e for e in container(pod)["env"] if e["name"].startswith("IMPORTER_EXTRA_HEADER_")]
    assert headers == [
        {"name": "IMPORTER_EXTRA_HEADER_0", "value": "X-First: a"},
        {"name": "IMPORTER_EXTRA_HEADER_1", "value": "X-Second: b"},
        {"name": "IMPORTER_EXTRA_HEADER_2", "value": "X-Third: c"},
        {"name": "IMPORTER_EXTRA_HEADER_3", "value": "X-Eleventh: k"},
    ]
    assert container(pod)["volumeMounts"] == [
        {"name": "cdi-data-vol", "mountPath": "/data"},
        {"name": "cdi-scratch-vol", "mountPath": "/scratch"},
        {"name": "cdi-cert-vol", "mountPath": "/certs"},
        {"name": "cdi-proxy-cert-vol", "mountPath": "/proxycerts/"},
        {"name": "cdi-secret-extra-headers-vol-0", "mountPath": "/extraheaders/0"},
        {"name": "cdi-secret-extra-headers-vol-1", "mountPath": "/extraheaders/1"},
    ]
    assert pod["spec"]["volumes"][2:] == [
        {"name": "cdi-cert-vol", "configMap": {"name": "ca-bundle"}},
        # the per-import copy of the proxy CA, not the CDI-namespace original
        {"name": "cdi-proxy-cert-vol", "configMap": {"name": "import-proxy-cm-disk1"}},
        {"name": "cdi-secret-extra-headers-vol-0", "secret": {"secretName": "token-a"}},
        {"name": "cdi-secret-extra-headers-vol-1", "secret": {"secretName": "token-b"}},
    ]


def test_s3_with_keys() -> None:
    pvc = claim({P + "source": "s3", P + "secretName": "s3-keys", P + "insecureSkipVerify": "true"})
    values = env_of(pod_for(pvc))
    assert values["IMPORTER_SOURCE"] == "s3"
    assert values["IMPORTER_ACCESS_KEY_ID"]["secretKeyRef"] == {
        "name": "s3-keys",
        "key": "accessKeyId",
    }
    # insecureSkipVerify is an http-only field; CDI ignores it for s3
    assert values["INSECURE_TLS"] == "false"


def test_blank_ignores_import_inputs() -> None:
    pvc = claim({P + "source": "none", P + "secretName": "stale", P + "certConfigMap": "stale"})
    del pvc["metadata"]["annotations"][P + "endpoint"]
    config = {**CONFIG, "importProxy": {"HTTPProxy": "http://proxy:3128"}}
    pod = pod_for(pvc, cdi_config_status=config)
    values = env_of(pod)
    assert values["IMPORTER_SOURCE"] == "none"
    assert values["IMPORTER_ENDPOINT"] == ""
    assert values["http_proxy"] == ""
    assert "IMPORTER_ACCESS_KEY_ID" not in values
    assert "IMPORTER_CERT_DIR" not in values
    assert [v["name"] for v in pod["spec"]["volumes"]] == ["cdi-data-vol"]


@pytest.mark.parametrize(
    ("annotations", "volume_mode", "storage_class", "expected"),
    [
        pytest.param({}, None, "local", "0.06", id="class-global"),
        pytest.param({}, None, "fast", "0.1", id="class-own"),
        pytest.param({}, "Block", "fast", "0", id="block"),
        pytest.param({}, None, "", "0", id="explicit-no-class"),
        pytest.param({}, None, None, "0.06", id="no-class-global"),
    ],
)
def test_filesystem_overhead(
    annotations: dict[str, str], volume_mode: str | None, storage_class: str | None, expected: str
) -> None:
    pvc = claim(annotations, volume_mode=volume_mode, storage_class=storage_class)
    assert env_of(pod_for(pvc))["FILESYSTEM_OVERHEAD"] == expected


@pytest.mark.parametrize(
    ("source", "endpoint", "registries", "expected"),
    [
        pytest.param(
            "registry", "docker://registry.local:5000/img", ["registry.local:5000"], "true"
        ),
        pytest.param("registry", "docker://quay.io/img", ["registry.local:5000"], "false"),
        pytest.param("http", "http://registry.local:5000/img", ["registry.local:5000"], "false"),
    ],
)
def test_insecure_registries(
    source: str, endpoint: str, registries: list[str], expected: str
) -> None:
    pvc = claim({P + "source": source, P + "endpoint": endpoint})
    assert env_of(pod_for(pvc, insecure_registries=registries))["INSECURE_TLS"] == expected


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        pytest.param("http", "http", id="http"),
        pytest.param("glance", "glance", id="known-kept"),
        pytest.param("ftp", "http", id="unknown-is-http"),
    ],
)
def test_source_default(source: str, expected: str) -> None:
    assert env_of(pod_for(claim({P + "source": source})))["IMPORTER_SOURCE"] == expected


def test_resources_from_cdiconfig_and_zero_means_unlimited() -> None:
    config = cdiconfig_status({"podResourceRequirements": {"limits": {"cpu": "0"}}}, CLASSES)
    assert container(pod_for(claim(), cdi_config_status=config))["resources"] == {
        "limits": {"memory": "600M"},
        "requests": {"cpu": "100m", "memory": "60M"},
    }
    # before the config controller ran: CDI's defaults still apply
    assert container(pod_for(claim(), cdi_config_status={}))["resources"]["limits"] == {
        "cpu": "750m",
        "memory": "600M",
    }


def test_metadata_follows_the_pvc() -> None:
    pvc = claim(
        {
            ann.POD_NETWORKS: "storage-net",
            ann.POD_SIDECAR_INJECTION: "true",
            ann.POD_PRIORITY_CLASS_NAME: "high",
            ann.POD_SERVICE_ACCOUNT_NAME: "puller",
            "unrelated.example.org/x": "not copied",
        },
        labels={"app": "containerized-data-importer", "kubevirt.io/created-by": "vm1"},
    )
    config = {**CONFIG, "imagePullSecrets": [{"name": "pull"}]}
    pod = pod_for(pvc, cdi_config_status=config, image_pull_policy="IfNotPresent")
    assert pod["metadata"]["labels"]["kubevirt.io/created-by"] == "vm1"
    assert pod["metadata"]["annotations"] == {
        "cdi.kubevirt.io/storage.createdByController": "yes",
        "k8s.v1.cni.cncf.io/networks": "storage-net",
        "sidecar.istio.io/inject": "true",
        "linkerd.io/inject": "disabled",
        "cdi.kubevirt.io/storage.pod.priorityclassname": "high",
    }
    assert pod["spec"]["priorityClassName"] == "high"
    assert pod["spec"]["serviceAccountName"] == "puller"
    assert pod["spec"]["imagePullSecrets"] == [{"name": "pull"}]
    assert container(pod)["imagePullPolicy"] == "IfNotPresent"


def test_pod_name_recorded_on_the_pvc_wins() -> None:
    pvc = claim({ann.IMPORT_POD_NAME: "importer-disk1-legacy"})
    assert pod_for(pvc)["metadata"]["name"] == "importer-disk1-legacy"
    pvc = claim({ann.CHECKPOINT_CURRENT: "snap-2"})
    assert pod_for(pvc)["metadata"]["name"] == "importer-disk1-checkpoint-snap-2"


def test_owner_uid_for() -> None:
    pvc = claim()
    assert owner_uid_for(pvc) == "dv-uid"
    orphan = copy.deepcopy(pvc)
    del orphan["metadata"]["ownerReferences"]
    assert owner_uid_for(orphan) == "pvc-uid"
    two = copy.deepcopy(pvc)
    two["metadata"]["ownerReferences"].append({"uid": "other"})
    assert owner_uid_for(two) == "pvc-uid"


@pytest.mark.parametrize(
    ("pvc", "message"),
    [
        pytest.param(
            claim(request=None), 'storage request is missing in pvc "vms/disk1"', id="no-size"
        ),
        pytest.param(
            claim({P + "endpoint": ""}),
            'annotation "cdi.kubevirt.io/storage.import.endpoint" in pvc "vms/disk1" is empty',
            id="empty-endpoint",
        ),
    ],
)
def test_refuses_a_pvc_cdi_would_refuse(pvc: Obj, message: str) -> None:
    with pytest.raises(RenderError) as caught:
        importer_pod(pvc, image="x", cdi_config_status=CONFIG, scratch_pvc=None, owner_uid="u")
    assert str(caught.value) == message


def test_the_importer_accepts_the_env_it_is_given(tmp_path: Path) -> None:
    """The controller's half of the env contract, read by the worker's own loader."""
    pvc = claim(
        {
            P + "certConfigMap": "ca",
            P + "checksum": "sha256:" + "b" * 64,
            P + "extraHeaders.0": "X-Trace: on",
            ann.PREALLOCATION_REQUESTED: "true",
        }
    )
    pod = pod_for(pvc)
    certs = tmp_path / "certs"
    certs.mkdir()
    values = {e["name"]: e.get("value", "") for e in container(pod)["env"] if "valueFrom" not in e}
    # The node (kubelet or local agent) maps the mounts to paths; here by hand.
    values[env.IMPORTER_CERT_DIR] = str(certs)
    values[env.CDI_DATA_DIR] = str(tmp_path / "data")
    settings = ImporterSettings.from_env(values)
    assert settings.source == "http"
    assert settings.endpoint == "https://example.org/disk.qcow2"
    assert settings.image_size == 11422785362
    assert str(settings.filesystem_overhead) == "3/50"
    assert settings.preallocation is True
    assert str(settings.checksum) == "sha256:" + "b" * 64
    assert settings.extra_headers == (("X-Trace", "on"),)
    assert settings.owner_uid == "dv-uid"


# --- names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        # published FNV-1a 32-bit test vectors
        pytest.param(b"", 0x811C9DC5, id="empty"),
        pytest.param(b"a", 0xE40C292C, id="a"),
        pytest.param(b"foobar", 0xBF9CF968, id="foobar"),
    ],
)
def test_fnv1a(data: bytes, expected: int) -> None:
    assert naming.fnv1a_32(data) == expected


WORD_260 = "w" * 260
SUFFIX_250 = "s" * 250


@pytest.mark.parametrize(
    ("base", "suffix", "expected"),
    [
        # CDI's own namer test table, with the results spelled out
        pytest.param("abc", "suffix", "abc-suffix", id="fits"),
        # 260 + 7 > 253: the base is cut to 253 - 10 - 6 = 237, its hash goes before the suffix
        pytest.param(
            WORD_260,
            "suffix",
            WORD_260[:237] + "-" + naming.name_hash(WORD_260) + "-suffix",
            id="long-base-keeps-suffix",
        ),
        # the suffix alone is too long: base, then the hash of the whole "base-suffix"
        pytest.param(
            "abc123",
            SUFFIX_250,
            "abc123-" + naming.name_hash("abc123-" + SUFFIX_250),
            id="long-suffix-dropped",
        ),
    ],
)
def test_resource_name(base: str, suffix: str, expected: str) -> None:
    name = naming.resource_name(base, suffix)
    assert name == expected
    assert len(name) <= 253


def test_dropped_suffixes_still_give_different_names() -> None:
    assert naming.resource_name("base", "a" * 260) != naming.resource_name("base", "b" * 260)


@pytest.mark.parametrize(
    ("pvc_name", "expected"),
    [
        pytest.param("disk1", "importer-disk1", id="short"),
        pytest.param("x" * 244, "importer-" + "x" * 244, id="exactly-253"),
        # "importer-" + 250 chars is 259: no room for any of the PVC name, only its hash
        pytest.param("p" * 250, "importer-85d3067a", id="too-long"),
    ],
)
def test_importer_pod_name(pvc_name: str, expected: str) -> None:
    assert naming.importer_pod_name(pvc_name) == expected


@pytest.mark.parametrize(
    ("pvc_name", "expected"),
    [
        pytest.param("disk1", "disk1-scratch", id="short"),
        # 250 + "-scratch" is 258: cut to 236, then -<hash of the PVC name>-scratch = 253
        pytest.param("p" * 250, "p" * 236 + "-f633392d-scratch", id="too-long"),
    ],
)
def test_scratch_pvc_name(pvc_name: str, expected: str) -> None:
    name = naming.scratch_pvc_name(pvc_name)
    assert name == expected
    assert len(name) <= 253


@pytest.mark.parametrize(
    ("resource", "expected"),
    [
        pytest.param("name.subname", "name-subname", id="dots"),
        pytest.param("n" * 63, "n" * 63, id="fits"),
        pytest.param("a" * 64, "a" * 50 + "-d96f0f85-cdi", id="shortened"),
    ],
)
def test_label_name(resource: str, expected: str) -> None:
    assert naming.label_name(resource) == expected
    assert len(naming.label_name(resource)) <= 63


def test_other_names() -> None:
    assert naming.upload_pod_name("disk1") == "cdi-upload-disk1"
    assert naming.upload_service_name("vm.disk") == "cdi-upload-vm-disk"
    assert naming.import_proxy_config_map_name("disk1") == "import-proxy-cm-disk1"
    assert naming.clone_source_pod_name("uid-1") == "uid-1-source-pod"
    assert naming.prime_pvc_name("uid-1") == "prime-uid-1"
