"""Cross-namespace clone authorization and the clone token at DataVolume admission (CDI §7.5, §6.3).

One `cdi server` subprocess for the module, with users from its static token file (alice and bob
from `USERS`, more added here, among them a service account), real RBAC objects applied with
the real `kubectl`, and DataVolumes created as those users by `kubectl` or by `cdi.kube` (which
shows the Status' code and causes). Every user may create DataVolumes anywhere; what differs is
what they may do in the clone source namespace `SRC`:

    alice  ClusterRole datavolume-cloner (create datavolumes/source) by RoleBinding: explicit
    bob    Role create pods: implicit, enough for a PVC, not for a snapshot
    erin   Role create pods and persistentvolumeclaims: enough for a snapshot
    frank  datavolumes/source for resourceNames [golden] only
    carol  nothing
    system:serviceaccount:clone-dst:builder   via its group system:serviceaccounts:clone-dst
    system:serviceaccount:clone-other:builder nothing
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest
import yaml

from cdi.api import jwt
from cdi.api.groups import DATA_VOLUME
from cdi.kube import errors as kube_errors
from cdi.kube.client import Client
from cdi.kube.config import load_kubeconfig
from tests.kubeapi.conftest import TEARDOWN_STOP_TIMEOUT, USERS, CdiServer

SRC: Final = "clone-src"
DST: Final = "clone-dst"
OTHER: Final = "clone-other"
SA_DST: Final = f"system:serviceaccount:{DST}:builder"
SA_OTHER: Final = f"system:serviceaccount:{OTHER}:builder"
# name -> (token, uid, groups), appended to the server's token file; with USERS' alice and bob.
MORE_USERS: Final[dict[str, tuple[str, str, tuple[str, ...]]]] = {
    "carol": ("carol-token-0c4f1a", "u-2001", ()),
    "erin": ("erin-token-9d2b7e", "u-2002", ()),
    "frank": ("frank-token-3e8a55", "u-2003", ()),
    SA_DST: (
        "sa-dst-token-71c0d9",
        "u-2004",
        ("system:serviceaccounts", f"system:serviceaccounts:{DST}"),
    ),
    SA_OTHER: (
        "sa-other-token-5a6e21",
        "u-2005",
        ("system:serviceaccounts", f"system:serviceaccounts:{OTHER}"),
    ),
}
MUTATE: Final = "datavolume-mutate.cdi.kubevirt.io"
VALIDATE: Final = "datavolume-validate.cdi.kubevirt.io"
TOKEN_ANNOTATION: Final = "cdi.kubevirt.io/storage.clone.token"
RBAC: Final = "rbac.authorization.k8s.io"


def denied_line(user: str, namespace: str = SRC) -> str:
    """What kubectl prints when the webhook refuses a clone."""
    return (
        'Error from server (Forbidden): error when creating "STDIN": admission webhook '
        f'"{MUTATE}" denied the request: User {user} has insufficient permissions in clone '
        f"source namespace {namespace}"
    )


# --- the server, its users and their RBAC ----------------------------------------------------


def _role(kind: str, name: str, rules: list[dict[str, Any]], namespace: str = "") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": f"{RBAC}/v1", "kind": kind, "metadata": meta, "rules": rules}


def _binding(
    kind: str,
    name: str,
    role_kind: str,
    role: str,
    subjects: list[dict[str, Any]],
    namespace: str = "",
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    return {
        "apiVersion": f"{RBAC}/v1",
        "kind": kind,
        "metadata": meta,
        "subjects": subjects,
        "roleRef": {"apiGroup": RBAC, "kind": role_kind, "name": role},
    }


def _user(name: str) -> dict[str, str]:
    return {"kind": "User", "name": name, "apiGroup": RBAC}


def rbac_objects() -> list[dict[str, Any]]:
    create = ["create"]
    return [
        *(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
            for ns in (SRC, DST, OTHER)
        ),
        # Every user may work with DataVolumes anywhere: RBAC never stops the create, only the
        # clone review does.
        _role(
            "ClusterRole",
            "datavolume-editor",
            [
                {
                    "apiGroups": ["cdi.kubevirt.io"],
                    "resources": ["datavolumes"],
                    "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"],
                }
            ],
        ),
        _binding(
            "ClusterRoleBinding",
            "everyone-edits-datavolumes",
            "ClusterRole",
            "datavolume-editor",
            [{"kind": "Group", "name": "system:authenticated", "apiGroup": RBAC}],
        ),
        # CDI's documented example role (§7.5), bound in the source namespace.
        _role(
            "ClusterRole",
            "datavolume-cloner",
            [
                {
                    "apiGroups": ["cdi.kubevirt.io"],
                    "resources": ["datavolumes/source"],
                    "verbs": create,
                }
            ],
        ),
        _binding(
            "RoleBinding", "alice-clones", "ClusterRole", "datavolume-cloner", [_user("alice")], SRC
        ),
        _binding(
            "RoleBinding",
            "dst-service-accounts-clone",
            "ClusterRole",
            "datavolume-cloner",
            [{"kind": "Group", "name": f"system:serviceaccounts:{DST}", "apiGroup": RBAC}],
            SRC,
        ),
        _role(
            "Role",
            "pod-creator",
            [{"apiGroups": [""], "resources": ["pods"], "verbs": create}],
            SRC,
        ),
        _binding("RoleBinding", "bob-pods", "Role", "pod-creator", [_user("bob")], SRC),
        _role(
            "Role",
            "pod-and-claim-creator",
            [{"apiGroups": [""], "resources": ["pods", "persistentvolumeclaims"], "verbs": create}],
            SRC,
        ),
        _binding(
            "RoleBinding", "erin-pods-claims", "Role", "pod-and-claim-creator", [_user("erin")], SRC
        ),
        _role(
            "Role",
            "golden-cloner",
            [
                {
                    "apiGroups": ["cdi.kubevirt.io"],
                    "resources": ["datavolumes/source"],
                    "resourceNames": ["golden"],
                    "verbs": create,
                }
            ],
            SRC,
        ),
        _binding("RoleBinding", "frank-golden", "Role", "golden-cloner", [_user("frank")], SRC),
    ]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CdiServer]:
    srv = CdiServer(tmp_path_factory.mktemp("clone-auth") / "data")
    with srv.token_file.open("a") as tokens:
        for name, (token, uid, groups) in MORE_USERS.items():
            tokens.write(f'{token},{name},{uid},"{",".join(groups)}"\n')
    srv.start()
    try:
        srv.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(rbac_objects()))
        yield srv
    finally:
        srv.stop(TEARDOWN_STOP_TIMEOUT, graceful=False)


def kubeconfig(server: CdiServer, user: str) -> Path:
    """The admin kubeconfig with `user`'s token."""
    token = (USERS.get(user) or MORE_USERS[user])[0]
    path = server.data_dir.parent / f"{token}.kubeconfig"
    if not path.exists():
        doc = yaml.safe_load(server.kubeconfig.read_text())
        doc["users"] = [{"name": "u", "user": {"token": token}}]
        doc["contexts"][0]["context"]["user"] = "u"
        path.write_text(yaml.safe_dump(doc))
        path.chmod(0o600)
    return path


def clone_dv(
    name: str,
    *,
    namespace: str = DST,
    source_namespace: str = SRC,
    source: str = "disk",
    kind: str = "pvc",
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if annotations:
        meta["annotations"] = annotations
    return {
        "apiVersion": "cdi.kubevirt.io/v1beta1",
        "kind": "DataVolume",
        "metadata": meta,
        "spec": {
            "source": {kind: {"namespace": source_namespace, "name": source}},
            "storage": {"resources": {"requests": {"storage": "1Gi"}}},
        },
    }


def kubectl_create(server: CdiServer, user: str, dv: dict[str, Any], *args: str) -> tuple[int, str]:
    """`kubectl create -f -` as `user`: (exit code, stdout or stderr)."""
    proc = server.kubectl(
        "create",
        "-f",
        "-",
        *args,
        input=yaml.safe_dump(dv),
        check=False,
        user_kubeconfig=kubeconfig(server, user),
    )
    return proc.returncode, (proc.stdout if proc.returncode == 0 else proc.stderr).strip()


def stored(server: CdiServer, name: str, namespace: str = DST) -> dict[str, Any] | None:
    proc = server.kubectl("get", "dv", name, "-n", namespace, "-o", "json", check=False)
    if proc.returncode != 0:
        assert "NotFound" in proc.stderr, proc.stderr
        return None
    return dict(json.loads(proc.stdout))


def public_key(server: CdiServer) -> bytes:
    proc = server.kubectl("get", "secret", "-n", "cdi", "cdi-api-signing-key", "-o", "json")
    return base64.b64decode(json.loads(proc.stdout)["data"]["id_rsa.pub"])


def token_claims(server: CdiServer, dv: dict[str, Any]) -> dict[str, Any]:
    token = dv["metadata"]["annotations"][TOKEN_ANNOTATION]
    return jwt.verify(public_key(server), token, issuer="cdi-apiserver")


# --- PVC sources ------------------------------------------------------------------------------


def test_explicit_role_allows_and_the_dv_gets_a_clone_token(server: CdiServer) -> None:
    before = time.time()
    code, out = kubectl_create(server, "alice", clone_dv("by-alice"))
    assert (code, out) == (0, "datavolume.cdi.kubevirt.io/by-alice created")
    dv = stored(server, "by-alice")
    assert dv is not None
    claims = token_claims(server, dv)
    assert claims["operation"] == "Clone"
    assert (claims["name"], claims["namespace"]) == ("disk", SRC)
    assert claims["resource"] == {
        "group": "",
        "version": "v1",
        "resource": "persistentvolumeclaims",
    }
    assert claims["params"] == {"targetNamespace": DST, "targetName": "by-alice"}
    assert int(before) - 1 <= claims["iat"] == claims["nbf"] <= time.time() + 1
    assert claims["exp"] - claims["iat"] == 300
    # The spec is stored as sent: the hook only adds the annotation.
    assert dv["spec"]["source"] == {"pvc": {"namespace": SRC, "name": "disk"}}


def test_implicit_pods_role_allows(server: CdiServer) -> None:
    code, out = kubectl_create(server, "bob", clone_dv("by-bob"))
    assert code == 0, out
    dv = stored(server, "by-bob")
    assert dv is not None
    assert token_claims(server, dv)["params"]["targetName"] == "by-bob"


def test_user_with_nothing_is_refused_with_cdis_message_and_nothing_stored(
    server: CdiServer,
) -> None:
    code, err = kubectl_create(server, "carol", clone_dv("by-carol"))
    assert code == 1
    assert err == denied_line("carol")
    assert stored(server, "by-carol") is None
    # kubectl's server-side dry run is refused the same way.
    code, err = kubectl_create(server, "carol", clone_dv("by-carol"), "--dry-run=server")
    assert (code, err) == (1, denied_line("carol"))


async def test_the_refusal_is_a_403_status_with_a_cause_on_the_source_namespace(
    server: CdiServer,
) -> None:
    async with Client(load_kubeconfig(kubeconfig(server, "carol")), backoff=()) as carol:
        with pytest.raises(kube_errors.Forbidden) as refused:
            await carol.create(DATA_VOLUME, clone_dv("by-carol-api"), DST)
    status = refused.value.status
    assert status["code"] == 403
    assert status["reason"] == "Forbidden"
    message = f"User carol has insufficient permissions in clone source namespace {SRC}"
    assert status["message"] == f'admission webhook "{MUTATE}" denied the request: {message}'
    assert status["details"]["causes"] == [
        {"reason": "FieldValueInvalid", "message": message, "field": "spec.source.PVC.namespace"}
    ]
    assert stored(server, "by-carol-api") is None


def test_same_namespace_is_always_allowed(server: CdiServer) -> None:
    code, out = kubectl_create(server, "carol", clone_dv("carol-local", source_namespace=DST))
    assert code == 0, out
    dv = stored(server, "carol-local")
    assert dv is not None
    claims = token_claims(server, dv)
    assert (claims["name"], claims["namespace"]) == ("disk", DST)
    assert claims["params"] == {"targetNamespace": DST, "targetName": "carol-local"}


def test_the_review_names_the_source_pvc(server: CdiServer) -> None:
    code, out = kubectl_create(server, "frank", clone_dv("frank-golden", source="golden"))
    assert code == 0, out
    code, err = kubectl_create(server, "frank", clone_dv("frank-other", source="other"))
    assert (code, err) == (1, denied_line("frank"))
    assert stored(server, "frank-other") is None


def test_service_accounts_are_reviewed_with_their_groups(server: CdiServer) -> None:
    code, out = kubectl_create(server, SA_DST, clone_dv("by-builder"))
    assert code == 0, out
    # The same service account name in another namespace is not in the bound group.
    code, err = kubectl_create(server, SA_OTHER, clone_dv("by-other", namespace=OTHER))
    assert (code, err) == (1, denied_line(SA_OTHER))
    assert stored(server, "by-other", OTHER) is None


def test_a_missing_source_namespace_is_refused_as_cdi_does(server: CdiServer) -> None:
    code, err = kubectl_create(
        server, "alice", clone_dv("from-nowhere", source_namespace="nowhere")
    )
    assert code == 1
    assert err == (
        'Error from server (BadRequest): error when creating "STDIN": admission webhook '
        f'"{MUTATE}" denied the request: namespaces "nowhere" not found'
    )
    assert stored(server, "from-nowhere") is None


def test_prepopulated_dv_passes_without_a_token_when_refused(server: CdiServer) -> None:
    dv = clone_dv(
        "carol-static", annotations={"cdi.kubevirt.io/storage.prePopulated": "carol-static"}
    )
    code, out = kubectl_create(server, "carol", dv)
    assert code == 0, out
    got = stored(server, "carol-static")
    assert got is not None
    assert TOKEN_ANNOTATION not in got["metadata"]["annotations"]


def test_a_token_sent_by_the_client_is_replaced(server: CdiServer) -> None:
    forged = jwt.sign(
        jwt.generate_signing_key(), {"iss": "cdi-apiserver", "exp": time.time() + 300}
    )
    code, out = kubectl_create(
        server, "alice", clone_dv("forged", annotations={TOKEN_ANNOTATION: forged})
    )
    assert code == 0, out
    dv = stored(server, "forged")
    assert dv is not None
    assert dv["metadata"]["annotations"][TOKEN_ANNOTATION] != forged
    assert token_claims(server, dv)["params"]["targetName"] == "forged"


def test_imports_get_no_token(server: CdiServer) -> None:
    dv = clone_dv("an-import")
    dv["spec"]["source"] = {"http": {"url": "https://example.com/disk.qcow2"}}
    code, out = kubectl_create(server, "carol", dv)
    assert code == 0, out
    got = stored(server, "an-import")
    assert got is not None
    assert TOKEN_ANNOTATION not in (got["metadata"].get("annotations") or {})


def test_generate_name_gets_a_token_without_a_target_name_as_in_cdi(server: CdiServer) -> None:
    dv = clone_dv("unused")
    del dv["metadata"]["name"]
    dv["metadata"]["generateName"] = "gen-"
    code, out = kubectl_create(server, "alice", dv, "-o", "json")
    assert code == 0, out
    created = json.loads(out)
    assert created["metadata"]["name"].startswith("gen-")
    # Webhooks see no name before the server generates one: CDI's token says "".
    assert token_claims(server, created)["params"] == {"targetNamespace": DST, "targetName": ""}


# --- snapshot sources ------------------------------------------------------------------------


def test_snapshot_source_needs_explicit_role_or_pods_and_claims(server: CdiServer) -> None:
    code, out = kubectl_create(server, "alice", clone_dv("snap-alice", kind="snapshot"))
    assert code == 0, out
    dv = stored(server, "snap-alice")
    assert dv is not None
    claims = token_claims(server, dv)
    assert claims["resource"] == {
        "group": "snapshot.storage.k8s.io",
        "version": "v1",
        "resource": "volumesnapshots",
    }
    assert (claims["name"], claims["namespace"]) == ("disk", SRC)

    code, out = kubectl_create(server, "erin", clone_dv("snap-erin", kind="snapshot"))
    assert code == 0, out
    # Pods alone are enough for a PVC, not for a snapshot; claims alone neither.
    code, err = kubectl_create(server, "bob", clone_dv("snap-bob", kind="snapshot"))
    assert (code, err) == (1, denied_line("bob"))
    code, out = kubectl_create(server, "erin", clone_dv("pvc-erin"))
    assert code == 0, out
    code, err = kubectl_create(server, "carol", clone_dv("snap-carol", kind="snapshot"))
    assert (code, err) == (1, denied_line("carol"))
    assert stored(server, "snap-bob") is None
    assert stored(server, "snap-carol") is None
    code, out = kubectl_create(
        server, "carol", clone_dv("snap-local", kind="snapshot", source_namespace=DST)
    )
    assert code == 0, out


async def test_snapshot_refusal_points_at_the_snapshot_namespace(server: CdiServer) -> None:
    async with Client(load_kubeconfig(kubeconfig(server, "bob")), backoff=()) as bob:
        with pytest.raises(kube_errors.Forbidden) as refused:
            await bob.create(DATA_VOLUME, clone_dv("snap-bob-api", kind="snapshot"), DST)
    [cause] = refused.value.status["details"]["causes"]
    assert cause["field"] == "spec.source.snapshot.namespace"


# --- DataSource sources ----------------------------------------------------------------------


def test_source_ref_is_reviewed_against_the_data_sources_source(server: CdiServer) -> None:
    data_source = {
        "apiVersion": "cdi.kubevirt.io/v1beta1",
        "kind": "DataSource",
        "metadata": {"name": "fedora", "namespace": SRC},
        "spec": {"source": {"pvc": {"namespace": SRC, "name": "fedora-golden"}}},
    }
    server.kubectl("apply", "-f", "-", input=yaml.safe_dump(data_source))
    dv = clone_dv("from-ref")
    dv["spec"] = {
        "sourceRef": {"kind": "DataSource", "namespace": SRC, "name": "fedora"},
        "storage": {},
    }
    code, err = kubectl_create(server, "carol", dv)
    assert (code, err) == (1, denied_line("carol"))
    code, out = kubectl_create(server, "bob", dv)
    assert code == 0, out
    got = stored(server, "from-ref")
    assert got is not None
    claims = token_claims(server, got)
    assert (claims["name"], claims["namespace"]) == ("fedora-golden", SRC)

    dv["metadata"]["name"] = "from-missing-ref"
    dv["spec"]["sourceRef"]["name"] = "missing"
    code, err = kubectl_create(server, "bob", dv)
    assert code == 1
    assert err.endswith('datasources.cdi.kubevirt.io "missing" not found'), err


# --- updates ---------------------------------------------------------------------------------


def test_the_source_cannot_be_changed_but_other_updates_pass(server: CdiServer) -> None:
    code, out = kubectl_create(server, "carol", clone_dv("carol-fixed", source_namespace=DST))
    assert code == 0, out
    carol = kubeconfig(server, "carol")
    # Re-pointing the clone at a namespace never reviewed is refused, as CDI refuses any change.
    patch = json.dumps({"spec": {"source": {"pvc": {"namespace": SRC, "name": "disk"}}}})
    proc = server.kubectl(
        "patch",
        "dv",
        "carol-fixed",
        "-n",
        DST,
        "--type=merge",
        "-p",
        patch,
        check=False,
        user_kubeconfig=carol,
    )
    assert proc.returncode == 1
    # kubectl shows a 422 by its causes, as it does for CDI's webhook on a real cluster.
    assert proc.stderr.strip() == (
        "The request is invalid: DataVolume.Spec: Cannot update DataVolume Spec"
    )
    dv = stored(server, "carol-fixed")
    assert dv is not None
    assert dv["spec"]["source"]["pvc"]["namespace"] == DST
    # Other changes are no new clone: no review (carol may not clone from SRC, and needs not).
    code, out = kubectl_create(server, "alice", clone_dv("alice-labelled"))
    assert code == 0, out
    server.kubectl("label", "dv", "alice-labelled", "-n", DST, "team=blue", user_kubeconfig=carol)
    dv = stored(server, "alice-labelled")
    assert dv is not None
    assert dv["metadata"]["labels"] == {"team": "blue"}
    assert TOKEN_ANNOTATION in dv["metadata"]["annotations"]
