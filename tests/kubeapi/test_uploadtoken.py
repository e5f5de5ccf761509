"""UploadTokenRequest on the embedded API server, through the real `kubectl` (reference §1.10).

What virtctl and users do: `kubectl create -f utr.yaml -o jsonpath='{.status.token}'`; the token
must verify with the public key of Secret `cdi/cdi-api-signing-key` and carry CDI's claims
(§6.3). RBAC is CDI's one rule: `create` on `uploadtokenrequests.upload.cdi.kubevirt.io` in the
namespace. The kind is create-only; the key is made once and survives restarts.
"""

from __future__ import annotations

import base64
import json
import re
import time
from typing import Any

import yaml

from cdi.api import jwt
from cdi.kubeapi.store import Store
from tests.kubeapi.conftest import CdiServer, ServerError

ISSUER = "cdi-apiserver"
GROUP = "upload.cdi.kubevirt.io"
NOT_ALLOWED = (
    "Error from server (MethodNotAllowed): the server does not allow this method on the "
    "requested resource"
)


def utr(name: str, namespace: str, pvc: Any = "disk", **spec: Any) -> str:
    doc: dict[str, Any] = {
        "apiVersion": f"{GROUP}/v1beta1",
        "kind": "UploadTokenRequest",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {**({"pvcName": pvc} if pvc is not None else {}), **spec},
    }
    return yaml.safe_dump(doc)


def secret_data(server: CdiServer) -> dict[str, bytes]:
    proc = server.kubectl("get", "secret", "-n", "cdi", "cdi-api-signing-key", "-o", "json")
    secret = json.loads(proc.stdout)
    return {k: base64.b64decode(v) for k, v in secret["data"].items()}


def public_key(server: CdiServer) -> bytes:
    return secret_data(server)["id_rsa.pub"]


def token_of(server: CdiServer, manifest: str, **kwargs: Any) -> str:
    proc = server.kubectl(
        "create", "-f", "-", "-o", "jsonpath={.status.token}", input=manifest, **kwargs
    )
    return proc.stdout.strip()


def failure(server: CdiServer, *args: str, **kwargs: Any) -> str:
    proc = server.kubectl(*args, check=False, **kwargs)
    assert proc.returncode == 1, proc
    return proc.stderr.strip()


def grant_bob_upload_tokens(server: CdiServer, namespace: str) -> None:
    docs = [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "uploader", "namespace": namespace},
            "rules": [
                {"apiGroups": [GROUP], "resources": ["uploadtokenrequests"], "verbs": ["create"]}
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "bob-uploads", "namespace": namespace},
            "subjects": [{"kind": "User", "name": "bob", "apiGroup": "rbac.authorization.k8s.io"}],
            "roleRef": {
                "kind": "Role",
                "name": "uploader",
                "apiGroup": "rbac.authorization.k8s.io",
            },
        },
    ]
    server.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))


# --- issuing --------------------------------------------------------------------------------


def test_kubectl_create_returns_a_token_that_verifies_with_the_secrets_key(
    cdi_server: CdiServer, namespace: str
) -> None:
    before = time.time()
    token = token_of(cdi_server, utr("t1", namespace, "disk-1"))
    claims = jwt.verify(public_key(cdi_server), token, issuer=ISSUER)
    assert claims["iss"] == ISSUER
    assert claims["operation"] == "Upload"
    assert claims["name"] == "disk-1"
    assert claims["namespace"] == namespace
    assert claims["resource"] == {
        "group": "",
        "version": "v1",
        "resource": "persistentvolumeclaims",
    }
    assert int(before) - 1 <= claims["iat"] == claims["nbf"] <= time.time() + 1
    assert claims["exp"] - claims["iat"] == 300
    assert jwt.is_upload_for(claims, "disk-1", namespace)
    assert json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "==")) == {
        "alg": "PS256",
        "typ": "JWT",
    }


def test_the_answer_is_the_request_with_its_token(cdi_server: CdiServer, namespace: str) -> None:
    proc = cdi_server.kubectl("create", "-f", "-", "-o", "json", input=utr("t2", namespace))
    answer = json.loads(proc.stdout)
    assert answer["apiVersion"] == f"{GROUP}/v1beta1"
    assert answer["kind"] == "UploadTokenRequest"
    assert answer["metadata"]["name"] == "t2"
    assert answer["metadata"]["namespace"] == namespace
    assert answer["spec"] == {"pvcName": "disk"}
    assert set(answer["status"]) == {"token"}
    plain = cdi_server.kubectl("create", "-f", "-", input=utr("t3", namespace)).stdout
    assert plain.strip() == f"uploadtokenrequest.{GROUP}/t3 created"


def test_the_signing_key_secret_is_cdis_keystore(cdi_server: CdiServer) -> None:
    proc = cdi_server.kubectl("get", "secret", "-n", "cdi", "cdi-api-signing-key", "-o", "json")
    secret = json.loads(proc.stdout)
    assert secret["type"] == "Opaque"
    assert secret["metadata"]["labels"] == {"cdi.kubevirt.io": "keystore"}
    data = secret_data(cdi_server)
    assert set(data) == {"id_rsa", "id_rsa.pub"}
    assert data["id_rsa"].startswith(b"-----BEGIN PRIVATE KEY-----")
    assert jwt.public_key_pem(data["id_rsa"]) == data["id_rsa.pub"]


# --- authorization --------------------------------------------------------------------------


def test_a_user_without_rbac_is_forbidden(cdi_server: CdiServer, namespace: str) -> None:
    bob = cdi_server.user_kubeconfig("bob")
    message = failure(
        cdi_server, "create", "-f", "-", input=utr("t", namespace), user_kubeconfig=bob
    )
    assert message == (
        f'Error from server (Forbidden): error when creating "STDIN": uploadtokenrequests.{GROUP}'
        f' is forbidden: User "bob" cannot create resource "uploadtokenrequests" in API group '
        f'"{GROUP}" in the namespace "{namespace}"'
    )
    can_i = cdi_server.kubectl(
        "auth", "can-i", "create", f"uploadtokenrequests.{GROUP}", "-n", namespace,
        user_kubeconfig=bob, check=False,
    )  # fmt: skip
    assert (can_i.stdout.strip(), can_i.returncode) == ("no", 1)


def test_a_role_granting_create_on_uploadtokenrequests_is_enough(
    cdi_server: CdiServer, namespace: str
) -> None:
    grant_bob_upload_tokens(cdi_server, namespace)
    bob = cdi_server.user_kubeconfig("bob")
    # CDI's one rule: no right on the PVC itself is needed, nor does the PVC have to exist.
    token = token_of(cdi_server, utr("bobs", namespace, "bobs-disk"), user_kubeconfig=bob)
    claims = jwt.verify(public_key(cdi_server), token, issuer=ISSUER)
    assert (claims["name"], claims["namespace"]) == ("bobs-disk", namespace)
    can_i = cdi_server.kubectl(
        "auth", "can-i", "create", f"uploadtokenrequests.{GROUP}", "-n", namespace,
        user_kubeconfig=bob,
    )  # fmt: skip
    assert can_i.stdout.strip() == "yes"

    elsewhere = f"{namespace}-b"
    cdi_server.kubectl("create", "namespace", elsewhere)
    message = failure(
        cdi_server, "create", "-f", "-", input=utr("t", elsewhere), user_kubeconfig=bob
    )
    assert f'cannot create resource "uploadtokenrequests" in API group "{GROUP}"' in message
    assert f'in the namespace "{elsewhere}"' in message
    # The role grants create only: reading is refused by RBAC before the verb is looked at.
    listing = failure(cdi_server, "get", "utr", "-n", namespace, user_kubeconfig=bob)
    assert 'User "bob" cannot list resource "uploadtokenrequests"' in listing


# --- validation -----------------------------------------------------------------------------


def test_a_request_without_pvc_name_is_invalid(cdi_server: CdiServer, namespace: str) -> None:
    for manifest in (utr("nopvc", namespace, None), utr("nopvc", namespace, "")):
        message = failure(cdi_server, "create", "-f", "-", input=manifest)
        # kubectl's wording of a 422 whose details name the kind
        assert message == (
            'The UploadTokenRequest "nopvc" is invalid: spec.pvcName: Required value: the name '
            "of the PersistentVolumeClaim to upload to"
        ), message
    no_spec = yaml.safe_load(utr("nospec", namespace))
    del no_spec["spec"]
    message = failure(cdi_server, "create", "-f", "-", input=yaml.safe_dump(no_spec))
    assert "spec.pvcName: Required value" in message, message
    typed = failure(cdi_server, "create", "-f", "-", input=utr("typed", namespace, pvc=5))
    assert "spec.pvcName: Invalid value: must be a string" in typed, typed


def test_a_namespace_that_does_not_exist(cdi_server: CdiServer) -> None:
    message = failure(cdi_server, "create", "-f", "-", input=utr("t", "no-such-namespace"))
    assert 'namespaces "no-such-namespace" not found' in message, message


# --- create-only ----------------------------------------------------------------------------


def test_get_list_watch_and_delete_are_not_allowed(cdi_server: CdiServer, namespace: str) -> None:
    token_of(cdi_server, utr("made", namespace))
    assert failure(cdi_server, "get", "utr", "-n", namespace) == NOT_ALLOWED
    assert failure(cdi_server, "get", "uploadtokenrequests", "made", "-n", namespace) == (
        NOT_ALLOWED
    )
    assert failure(cdi_server, "get", "utr", "-A") == NOT_ALLOWED
    assert failure(cdi_server, "delete", "utr", "made", "-n", namespace) == NOT_ALLOWED
    base = f"/apis/{GROUP}/v1beta1/namespaces/{namespace}/uploadtokenrequests"
    for path in (base, f"{base}?watch=true", f"{base}/made"):
        message = failure(cdi_server, "get", "--raw", path)
        assert "MethodNotAllowed" in message or "Method Not Allowed" in message, message
    # The same rule holds for the other create-only kinds, as on a real cluster.
    assert failure(cdi_server, "get", "subjectaccessreviews") == NOT_ALLOWED


def test_api_resources_lists_uploadtokenrequests(cdi_server: CdiServer) -> None:
    out = cdi_server.kubectl("api-resources", f"--api-group={GROUP}", "-o", "wide").stdout
    lines = [line.split() for line in out.splitlines() if line.strip()]
    assert lines[0][:5] == ["NAME", "SHORTNAMES", "APIVERSION", "NAMESPACED", "KIND"]
    assert lines[1][:5] == [
        "uploadtokenrequests",
        "utr,utrs",
        f"{GROUP}/v1beta1",
        "true",
        "UploadTokenRequest",
    ]
    assert re.sub(r"[\[\]]", "", lines[1][5]) == "create"
    everything = cdi_server.kubectl("api-resources", "-o", "name").stdout.split()
    assert f"uploadtokenrequests.{GROUP}" in everything


# --- the key --------------------------------------------------------------------------------


def test_the_key_survives_a_restart(fresh_cdi_server: CdiServer) -> None:
    server = fresh_cdi_server
    before = secret_data(server)
    old_token = token_of(server, utr("t", "default"))
    server.restart()
    assert secret_data(server) == before
    new_token = token_of(server, utr("t", "default"))
    jwt.verify(before["id_rsa.pub"], new_token, issuer=ISSUER)
    jwt.verify(public_key(server), old_token, issuer=ISSUER)


def test_a_broken_key_secret_stops_the_server_instead_of_being_replaced(
    fresh_cdi_server: CdiServer,
) -> None:
    server = fresh_cdi_server
    before = secret_data(server)
    other = jwt.public_key_pem(jwt.generate_signing_key())
    patch = {"data": {"id_rsa.pub": base64.b64encode(other).decode()}}
    server.kubectl(
        "patch", "secret", "-n", "cdi", "cdi-api-signing-key", "--type=merge",
        "-p", json.dumps(patch),
    )  # fmt: skip
    port = server.port
    server.stop()
    try:
        server.start(port=port)
    except ServerError as err:
        assert "Secret cdi/cdi-api-signing-key: data.id_rsa.pub is not the public key of " in str(
            err
        )
    else:
        raise AssertionError("cdi server started with a signing key Secret that disagrees")
    with Store(server.data_dir / "api.db") as store:  # the server is down: read its store
        stored = store.get("secrets", "cdi", "cdi-api-signing-key")
    # Nothing was replaced: the Secret is still the one we broke, for someone to look at.
    assert base64.b64decode(stored["data"]["id_rsa"]) == before["id_rsa"]
    assert base64.b64decode(stored["data"]["id_rsa.pub"]) == other


def test_deleting_the_secret_on_purpose_makes_a_new_key(fresh_cdi_server: CdiServer) -> None:
    server = fresh_cdi_server
    before = public_key(server)
    old_token = token_of(server, utr("t", "default"))
    server.kubectl("delete", "secret", "-n", "cdi", "cdi-api-signing-key")
    server.restart()
    after = public_key(server)
    assert after != before
    jwt.verify(after, token_of(server, utr("t", "default")), issuer=ISSUER)
    try:
        jwt.verify(after, old_token, issuer=ISSUER)
    except jwt.TokenError as err:
        assert str(err) == "token signature invalid"
    else:
        raise AssertionError("a token of the deleted key still verifies")
