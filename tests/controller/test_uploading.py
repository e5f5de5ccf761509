"""The upload server's Pod, Service and Secret as CDI builds them (§6.1, §6.2), the upload PKI
(`cdi.controller.certs`), and the DataVolume phase of an upload (§3.1). Pure: no API.

Every object is checked against the Kubernetes schema; certificates are checked by a real TLS
handshake (in memory) in both directions, as the proxy and an upload server would do it.
"""

from __future__ import annotations

import base64
import datetime
import ssl
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
from cryptography import x509
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID

from cdi.api import annotations as ann
from cdi.api import env
from cdi.api.groups import LOCAL_PROVISIONER
from cdi.api.phases import DataVolumePhase
from cdi.api.tokens import UPLOAD_CLIENT_NAME
from cdi.controller import certs, naming
from cdi.controller.config import cdiconfig_status
from cdi.controller.datavolume import upload_phase
from cdi.controller.rendering import RenderError
from cdi.controller.uploading import UploadSettings, pod_ready
from cdi.controller.uploadpod import (
    format_deadline,
    service_dns_names,
    upload_pod,
    upload_secret,
    upload_service,
)

Obj = dict[str, Any]
K8S_VERSION = "1.32"
CLASSES = [{"metadata": {"name": "local"}, "provisioner": LOCAL_PROVISIONER}]
CONFIG = cdiconfig_status({}, CLASSES)
DEADLINE = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)


def claim(
    *,
    name: str = "disk1",
    volume_mode: str | None = None,
    request: str | None = "1Gi",
    annotations: dict[str, str] | None = None,
) -> Obj:
    spec: Obj = {"accessModes": ["ReadWriteOnce"], "storageClassName": "local"}
    if request is not None:
        spec["resources"] = {"requests": {"storage": request}}
    if volume_mode:
        spec["volumeMode"] = volume_mode
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": name,
            "namespace": "vms",
            "uid": "pvc-uid",
            "annotations": {
                ann.UPLOAD_TARGET: "",
                ann.CONTENT_TYPE: "kubevirt",
                ann.PREALLOCATION_REQUESTED: "false",
                **(annotations or {}),
            },
        },
        "spec": spec,
    }


def pod_for(pvc: Obj, *, scratch: str | None = "disk1-scratch", **kwargs: Any) -> Obj:
    name = naming.upload_pod_name(pvc["metadata"]["name"])
    pod = upload_pod(
        pvc,
        name=name,
        image="quay.io/kubevirt/cdi-uploadserver:latest",
        cdi_config_status=CONFIG,
        deadline=DEADLINE,
        scratch_pvc=scratch,
        **kwargs,
    )
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    return pod


def env_of(pod: Obj) -> dict[str, str]:
    (container,) = pod["spec"]["containers"]
    return {e["name"]: e.get("value", "") for e in container["env"]}


# --- the pod -------------------------------------------------------------------------------------


def test_filesystem_pod_is_cdis() -> None:
    pod = pod_for(claim())
    assert pod["metadata"]["name"] == "cdi-upload-disk1"
    assert pod["metadata"]["labels"] == {
        "app": "containerized-data-importer",
        "cdi.kubevirt.io": "cdi-upload-server",
        "service": "cdi-upload-disk1",
        "cdi.kubevirt.io/uploadTarget": "pvc-uid",
    }
    assert pod["metadata"]["annotations"] == {
        ann.CREATED_BY_UPLOAD_CONTROLLER: "yes",
        "k8s.ovn.org/open-default-ports": '[{"protocol":"tcp","port":8443}]',
        "sidecar.istio.io/inject": "false",
        "linkerd.io/inject": "disabled",
    }
    assert pod["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "name": "disk1",
            "uid": "pvc-uid",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    (container,) = pod["spec"]["containers"]
    assert container["command"] == ["cdi-uploadserver"]
    assert container["image"] == "quay.io/kubevirt/cdi-uploadserver:latest"
    assert [e["name"] for e in container["env"]] == [
        "TLS_KEY_FILE",
        "TLS_CERT_FILE",
        "CLIENT_CERT_FILE",
        "FILESYSTEM_OVERHEAD",
        "UPLOAD_IMAGE_SIZE",
        "CLIENT_NAME",
        "PREALLOCATION",
        "DEADLINE",
    ]
    assert env_of(pod) == {
        "TLS_KEY_FILE": "/etc/tls/tls.key",
        "TLS_CERT_FILE": "/etc/tls/tls.crt",
        "CLIENT_CERT_FILE": "/etc/tls/ca.crt",
        "FILESYSTEM_OVERHEAD": "0.06",
        "UPLOAD_IMAGE_SIZE": "1Gi",
        "CLIENT_NAME": "client.upload-server.cdi.kubevirt.io",
        "PREALLOCATION": "false",
        "DEADLINE": "2026-01-02T03:04:05Z",
    }
    assert container["volumeMounts"] == [
        {"name": "cdi-data-vol", "mountPath": "/data"},
        {"name": "tls-secret", "mountPath": "/etc/tls", "readOnly": True},
        {"name": "cdi-scratch-vol", "mountPath": "/scratch"},
    ]
    assert "volumeDevices" not in container
    assert pod["spec"]["volumes"] == [
        {"name": "cdi-data-vol", "persistentVolumeClaim": {"claimName": "disk1"}},
        {"name": "tls-secret", "secret": {"secretName": "cdi-upload-disk1"}},
        {"name": "cdi-scratch-vol", "persistentVolumeClaim": {"claimName": "disk1-scratch"}},
    ]
    assert container["readinessProbe"] == {
        "httpGet": {"path": "/healthz", "port": 8443, "scheme": "HTTPS"},
        "initialDelaySeconds": 2,
        "periodSeconds": 5,
    }
    assert container["ports"] == [
        {"name": "uploadserver", "containerPort": 8443, "protocol": "TCP"}
    ]
    assert container["resources"] == {
        "limits": {"cpu": "750m", "memory": "600M"},
        "requests": {"cpu": "100m", "memory": "60M"},
    }
    assert container["securityContext"] == {
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
        "allowPrivilegeEscalation": False,
        "runAsNonRoot": True,
        "runAsUser": 107,
    }
    assert pod["spec"]["restartPolicy"] == "OnFailure"
    assert pod["spec"]["securityContext"] == {"fsGroup": 107}


def test_block_pod_writes_the_device() -> None:
    pod = pod_for(claim(volume_mode="Block", request="64Mi"))
    (container,) = pod["spec"]["containers"]
    assert container["volumeDevices"] == [
        {"name": "cdi-data-vol", "devicePath": "/dev/cdi-block-volume"}
    ]
    assert all(m["mountPath"] != "/data" for m in container["volumeMounts"])
    values = env_of(pod)
    assert values["DESTINATION"] == "/dev/cdi-block-volume"
    assert values["FILESYSTEM_OVERHEAD"] == "0"
    assert values["UPLOAD_IMAGE_SIZE"] == "64Mi"


def test_archive_has_no_scratch_and_local_runs_as_the_agent() -> None:
    pod = pod_for(claim(annotations={ann.CONTENT_TYPE: "archive"}), scratch=None, local=True)
    (container,) = pod["spec"]["containers"]
    assert [m["mountPath"] for m in container["volumeMounts"]] == ["/data", "/etc/tls"]
    assert [v["name"] for v in pod["spec"]["volumes"]] == ["cdi-data-vol", "tls-secret"]
    assert "runAsUser" not in container["securityContext"]
    assert "runAsNonRoot" not in container["securityContext"]
    # Local pods share the machine's network: listen on the pod's own address only.
    assert container["env"][-1] == {
        "name": "LISTEN_ADDRESS",
        "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}},
    }


def test_pod_follows_pvc_annotations_and_config() -> None:
    pvc = claim(
        annotations={
            ann.PREALLOCATION_REQUESTED: "true",
            ann.POD_PRIORITY_CLASS_NAME: "high",
            ann.POD_SERVICE_ACCOUNT_NAME: "uploader",
            ann.POD_SIDECAR_INJECTION: "true",
        }
    )
    config = cdiconfig_status(
        {
            "podResourceRequirements": {"limits": {"cpu": "0", "memory": "1G"}},
            "imagePullSecrets": [{"name": "pull"}],
        },
        CLASSES,
    )
    pod = upload_pod(
        pvc,
        name="cdi-upload-disk1",
        image="img",
        cdi_config_status=config,
        deadline=DEADLINE,
        scratch_pvc=None,
        command="/opt/bin/cdi-uploadserver",
        client_name="src/ns-tgt/ns",
        image_pull_policy="IfNotPresent",
    )
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    (container,) = pod["spec"]["containers"]
    assert env_of(pod)["PREALLOCATION"] == "true"
    assert env_of(pod)["CLIENT_NAME"] == "src/ns-tgt/ns"
    assert container["command"] == ["/opt/bin/cdi-uploadserver"]
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert container["resources"]["limits"] == {"memory": "1G"}
    assert pod["spec"]["priorityClassName"] == "high"
    assert pod["spec"]["serviceAccountName"] == "uploader"
    assert pod["spec"]["imagePullSecrets"] == [{"name": "pull"}]
    assert pod["metadata"]["annotations"]["sidecar.istio.io/inject"] == "true"


def test_pod_without_size_is_refused() -> None:
    with pytest.raises(RenderError, match="storage request is missing"):
        pod_for(claim(request=None))


def test_long_names_are_shortened_as_cdi() -> None:
    pvc_name = "a" * 70 + ".b"
    pod = pod_for(claim(name=pvc_name))
    service = upload_service(claim(name=pvc_name), pod_name=pod["metadata"]["name"])
    kubernetes_validate.validate(service, K8S_VERSION, strict=True)
    assert pod["metadata"]["name"] == f"cdi-upload-{pvc_name}"
    assert len(service["metadata"]["name"]) <= naming.LABEL_NAME_MAX
    assert "." not in service["metadata"]["name"]
    assert pod["metadata"]["labels"]["service"] == service["metadata"]["name"]
    assert service["spec"]["selector"] == {"service": service["metadata"]["name"]}


def test_format_deadline_is_rfc3339_utc() -> None:
    east = datetime.timezone(datetime.timedelta(hours=2))
    assert format_deadline(datetime.datetime(2026, 5, 1, 14, 0, 0, tzinfo=east)) == (
        "2026-05-01T12:00:00Z"
    )


# --- service and secret --------------------------------------------------------------------------


def test_service_is_headless_on_8443() -> None:
    service = upload_service(claim(), pod_name="cdi-upload-disk1")
    kubernetes_validate.validate(service, K8S_VERSION, strict=True)
    assert service["metadata"]["name"] == "cdi-upload-disk1"
    assert service["metadata"]["labels"] == {
        "app": "containerized-data-importer",
        "cdi.kubevirt.io": "cdi-upload-server",
    }
    assert service["metadata"]["annotations"] == {ann.CREATED_BY_UPLOAD_CONTROLLER: "yes"}
    assert service["metadata"]["ownerReferences"][0]["uid"] == "pvc-uid"
    assert service["spec"] == {
        "clusterIP": "None",
        "ports": [{"name": "uploadserver", "protocol": "TCP", "port": 8443, "targetPort": 8443}],
        "selector": {"service": "cdi-upload-disk1"},
    }
    assert service_dns_names("cdi-upload-disk1", "vms") == [
        "cdi-upload-disk1",
        "cdi-upload-disk1.vms",
        "cdi-upload-disk1.vms.svc",
        "cdi-upload-disk1.vms.svc.cluster.local",
    ]


def test_secret_holds_the_three_files() -> None:
    secret = upload_secret(
        claim(), name="cdi-upload-disk1", tls_key=b"KEY", tls_cert=b"CERT", client_ca=b"CA"
    )
    kubernetes_validate.validate(secret, K8S_VERSION, strict=True)
    assert secret["metadata"]["name"] == "cdi-upload-disk1"
    assert secret["metadata"]["namespace"] == "vms"
    assert secret["metadata"]["ownerReferences"][0]["kind"] == "PersistentVolumeClaim"
    decoded = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    assert decoded == {"tls.key": b"KEY", "tls.crt": b"CERT", "ca.crt": b"CA"}


# --- certificates --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server_ca() -> certs.KeyPair:
    return certs.create_ca(certs.SERVER_SIGNER_CN)


@pytest.fixture(scope="module")
def client_ca() -> certs.KeyPair:
    return certs.create_ca(certs.CLIENT_SIGNER_CN)


def test_ca_is_a_ca(server_ca: certs.KeyPair) -> None:
    cert = x509.load_pem_x509_certificate(server_ca.cert)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca
    assert cert.subject == cert.issuer
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime >= datetime.timedelta(days=3650)
    assert certs.key_matches(server_ca)


def test_server_cert_verifies_for_the_service_names(server_ca: certs.KeyPair) -> None:
    names = service_dns_names("cdi-upload-disk1", "vms")
    server = certs.issue_server_cert(server_ca, names)
    cert = x509.load_pem_x509_certificate(server.cert)
    store = verification.Store([x509.load_pem_x509_certificate(server_ca.cert)])
    for name in names:
        verifier = (
            verification.PolicyBuilder()
            .store(store)
            .build_server_verifier(verification.DNSName(name))
        )
        verifier.verify(cert, [])
    wrong = (
        verification.PolicyBuilder()
        .store(store)
        .build_server_verifier(verification.DNSName("cdi-upload-other.vms.svc"))
    )
    with pytest.raises(verification.VerificationError):
        wrong.verify(cert, [])
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert certs.SERVER_CERT_LIFETIME <= lifetime <= certs.SERVER_CERT_LIFETIME + certs.CLOCK_SKEW
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_client_cert_has_the_client_name(client_ca: certs.KeyPair) -> None:
    client = certs.issue_client_cert(client_ca, UPLOAD_CLIENT_NAME)
    assert certs.common_name(client.cert) == "client.upload-server.cdi.kubevirt.io"
    assert certs.signed_by(client.cert, client_ca.cert)
    assert not certs.signed_by(client.cert, certs.create_ca("someone else").cert)
    cert = x509.load_pem_x509_certificate(client.cert)
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def _handshake(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, hostname: str) -> Obj:
    """A TLS handshake between two in-memory endpoints; the server's view of the client cert."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, end in (("client", client), ("server", server)):
            if done[name]:
                continue
            try:
                end.do_handshake()
                done[name] = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            peer = server.getpeercert()
            return dict(peer) if peer else {}
    raise AssertionError("handshake did not finish")


def _files(tmp_path: Path, name: str, pair: certs.KeyPair) -> tuple[str, str]:
    cert, key = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert.write_bytes(pair.cert)
    key.write_bytes(pair.key)
    return str(cert), str(key)


def test_mutual_tls_as_proxy_and_upload_server(
    tmp_path: Path, server_ca: certs.KeyPair, client_ca: certs.KeyPair
) -> None:
    """The proxy (client cert, trusts the server signer bundle) talks to an upload server
    (server cert for its Service, trusts `ca.crt` = the client signer)."""
    names = service_dns_names("cdi-upload-disk1", "vms")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(
        *_files(tmp_path, "server", certs.issue_server_cert(server_ca, names))
    )
    server_ctx.load_verify_locations(cadata=client_ca.cert.decode())
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    proxy_ctx = ssl.create_default_context(cadata=server_ca.cert.decode())
    proxy_ctx.load_cert_chain(
        *_files(tmp_path, "client", certs.issue_client_cert(client_ca, UPLOAD_CLIENT_NAME))
    )
    peer = _handshake(proxy_ctx, server_ctx, "cdi-upload-disk1.vms.svc")
    assert (("commonName", UPLOAD_CLIENT_NAME),) in peer["subject"]
    # A client certificate from another CA is refused by the upload server.
    stranger = ssl.create_default_context(cadata=server_ca.cert.decode())
    stranger.load_cert_chain(
        *_files(tmp_path, "other", certs.issue_client_cert(certs.create_ca("x"), "x"))
    )
    with pytest.raises(ssl.SSLError):
        _handshake(stranger, server_ctx, "cdi-upload-disk1.vms.svc")
    # And the proxy refuses a server certificate made for another Service.
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(proxy_ctx, server_ctx, "cdi-upload-other.vms.svc")


def test_bundle_keeps_unexpired_cas(server_ca: certs.KeyPair) -> None:
    now = datetime.datetime.now(datetime.UTC)
    old = certs.create_ca("old")
    expired = certs.create_ca("expired", lifetime=datetime.timedelta(seconds=1), now=now)
    bundle = certs.merge_bundle(old.cert + expired.cert, server_ca.cert, now=now)
    subjects = [c.subject.rfc4514_string() for c in certs.load_certificates(bundle)]
    assert subjects == [f"CN={certs.SERVER_SIGNER_CN}", "CN=old", "CN=expired"]
    later = now + datetime.timedelta(minutes=1)
    again = certs.merge_bundle(bundle, server_ca.cert, now=later)
    assert [c.subject.rfc4514_string() for c in certs.load_certificates(again)] == [
        f"CN={certs.SERVER_SIGNER_CN}",
        "CN=old",
    ]
    assert certs.merge_bundle(b"not pem", old.cert, now=now) == old.cert


def test_issued_certs_never_outlive_their_ca() -> None:
    short = certs.create_ca("short", lifetime=datetime.timedelta(hours=1))
    cert = x509.load_pem_x509_certificate(certs.issue_server_cert(short, ["a"]).cert)
    ca = x509.load_pem_x509_certificate(short.cert)
    assert cert.not_valid_after_utc == ca.not_valid_after_utc


def test_bad_pem_is_a_cert_error() -> None:
    with pytest.raises(certs.CertError):
        certs.load_certificate(b"nope")
    with pytest.raises(certs.CertError):
        certs.key_matches(certs.KeyPair(certs.create_ca("a").cert, b"nope"))
    with pytest.raises(ValueError, match="DNS name"):
        certs.issue_server_cert(certs.create_ca("a"), [])


# --- settings, readiness and the DataVolume phase ------------------------------------------------


def test_deadline_must_fit_the_certificate() -> None:
    assert UploadSettings().deadline == datetime.timedelta(hours=12)
    with pytest.raises(ValueError, match="deadline"):
        UploadSettings(deadline=certs.SERVER_CERT_LIFETIME)
    with pytest.raises(ValueError, match="deadline"):
        UploadSettings(deadline=datetime.timedelta(0))


@pytest.mark.parametrize(
    ("phase", "ready", "expected"),
    [
        ("Running", "True", True),
        ("Running", "False", False),
        ("Pending", "True", False),
        ("Succeeded", "True", False),
        ("Running", None, False),
    ],
)
def test_pod_ready(phase: str, ready: str | None, expected: bool) -> None:
    conditions = [{"type": "Ready", "status": ready}] if ready else []
    assert pod_ready({"status": {"phase": phase, "conditions": conditions}}) is expected


@pytest.mark.parametrize(
    ("annotations", "expected"),
    [
        ({}, DataVolumePhase.UPLOAD_SCHEDULED),
        ({ann.POD_PHASE: ""}, DataVolumePhase.UPLOAD_SCHEDULED),
        ({ann.POD_PHASE: "Pending"}, DataVolumePhase.UPLOAD_SCHEDULED),
        ({ann.POD_PHASE: "Running", ann.POD_READY: "false"}, DataVolumePhase.UPLOAD_SCHEDULED),
        ({ann.POD_PHASE: "Running", ann.POD_READY: "true"}, DataVolumePhase.UPLOAD_READY),
        ({ann.POD_PHASE: "Failed"}, DataVolumePhase.UPLOAD_SCHEDULED),
        ({ann.POD_PHASE: "Succeeded"}, DataVolumePhase.SUCCEEDED),
        ({ann.POD_PHASE: "Failed", ann.FATAL_ERROR: "true"}, DataVolumePhase.FAILED),
    ],
    ids=["none", "reset", "pending", "not-ready", "ready", "failed", "succeeded", "fatal"],
)
def test_upload_phase(annotations: dict[str, str], expected: DataVolumePhase) -> None:
    assert upload_phase(annotations) is expected


def test_contract_names() -> None:
    assert env.UPLOAD_SERVER_PORT == 8443
    assert certs.SERVER_SIGNER_BUNDLE == "cdi-uploadserver-signer-bundle"
    assert certs.CLIENT_CERT_SECRET == "cdi-uploadserver-client-cert"
    assert naming.upload_service_name("disk1") == "cdi-upload-disk1"
