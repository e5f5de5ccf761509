"""Authentication (bearer tokens) and authorization (RBAC) for the embedded API server.

Tokens map to a user and groups: one admin token (group `system:masters`, allowed everything) and
any number from a token file in kube-apiserver's static token CSV format
(`token,user,uid,"group1,group2"`). Authorization evaluates the stored Roles, ClusterRoles,
RoleBindings and ClusterRoleBindings the way Kubernetes' RBAC authorizer does; the same code
answers SubjectAccessReviews, which the clone flow relies on.
"""

from __future__ import annotations

import csv
import hmac
import io
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ADMIN_GROUP = "system:masters"
AUTHENTICATED = "system:authenticated"

Obj = dict[str, Any]


@dataclass(frozen=True, slots=True)
class UserInfo:
    name: str
    groups: tuple[str, ...] = ()
    uid: str = ""
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def is_admin(self) -> bool:
        return ADMIN_GROUP in self.groups


@dataclass(frozen=True, slots=True)
class Attributes:
    """One request as RBAC sees it."""

    verb: str
    group: str = ""
    resource: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""
    path: str = ""  # non-resource requests (/version, /healthz)

    @property
    def is_resource(self) -> bool:
        return bool(self.resource)


class Authenticator:
    def __init__(self, tokens: Mapping[str, UserInfo]) -> None:
        self._tokens = dict(tokens)

    @classmethod
    def from_files(cls, admin_token: str, token_file: Path | None = None) -> Authenticator:
        tokens = {admin_token: UserInfo("admin", (ADMIN_GROUP, AUTHENTICATED))}
        if token_file is not None and token_file.exists():
            tokens.update(parse_token_file(token_file.read_text()))
        return cls(tokens)

    def authenticate(self, header: str | None) -> UserInfo | None:
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        token = token.strip()
        for known, user in self._tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                return user
        return None


def parse_token_file(text: str) -> dict[str, UserInfo]:
    """kube-apiserver's --token-auth-file format: token,user,uid[,"group1,group2"]."""
    tokens: dict[str, UserInfo] = {}
    for row in csv.reader(io.StringIO(text)):
        if not row or row[0].startswith("#"):
            continue
        if len(row) < 3:
            raise ValueError(f"token file line needs token,user,uid: {','.join(row)!r}")
        groups = tuple(g.strip() for g in row[3].split(",") if g.strip()) if len(row) > 3 else ()
        tokens[row[0].strip()] = UserInfo(row[1].strip(), (*groups, AUTHENTICATED), row[2].strip())
    return tokens


def _matches(values: Iterable[str], wanted: str) -> bool:
    values = list(values)
    return "*" in values or wanted in values


def rule_allows(rule: Mapping[str, Any], attrs: Attributes) -> bool:
    if not _matches(rule.get("verbs") or [], attrs.verb):
        return False
    if not attrs.is_resource:
        urls = rule.get("nonResourceURLs") or []
        return any(
            u == attrs.path or (u.endswith("*") and attrs.path.startswith(u[:-1])) for u in urls
        )
    if not _matches(rule.get("apiGroups") or [], attrs.group):
        return False
    resource = attrs.resource + (f"/{attrs.subresource}" if attrs.subresource else "")
    resources = rule.get("resources") or []
    if not (
        "*" in resources
        or resource in resources
        or (attrs.subresource and f"*/{attrs.subresource}" in resources)
        or (attrs.subresource and f"{attrs.resource}/*" in resources)
    ):
        return False
    names = rule.get("resourceNames") or []
    return not names or attrs.name in names


def _subject_matches(subject: Mapping[str, Any], user: UserInfo, binding_namespace: str) -> bool:
    kind = subject.get("kind")
    name = subject.get("name")
    if kind == "User":
        return name == user.name
    if kind == "Group":
        return name in user.groups
    if kind == "ServiceAccount":
        ns = subject.get("namespace") or binding_namespace
        return user.name == f"system:serviceaccount:{ns}:{name}"
    return False


# Roles every authenticated user has in Kubernetes: discovery and their own access reviews.
_DEFAULT_RULES: tuple[Obj, ...] = (
    {
        "verbs": ["get"],
        "nonResourceURLs": [
            "/api",
            "/api/*",
            "/apis",
            "/apis/*",
            "/version",
            "/healthz",
            "/livez",
            "/readyz",
            "/openapi",
            "/openapi/*",
        ],
    },
    {
        "verbs": ["create"],
        "apiGroups": ["authorization.k8s.io"],
        "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"],
    },
)


class Authorizer:
    """RBAC over the objects a `lister(resource_key, namespace)` returns (the store)."""

    def __init__(self, lister: Callable[[str, str | None], list[Obj]]) -> None:
        self._list = lister

    def allowed(self, user: UserInfo, attrs: Attributes) -> tuple[bool, str]:
        if user.is_admin:
            return True, "admin"
        if any(rule_allows(rule, attrs) for rule in _DEFAULT_RULES):
            return True, "default rule"
        roles = {
            r["metadata"]["name"]: r
            for r in self._list("clusterroles.rbac.authorization.k8s.io", None)
        }
        for binding in self._list("clusterrolebindings.rbac.authorization.k8s.io", None):
            if self._binding_allows(
                binding, user, attrs, cluster_roles=roles, local_roles=None, namespace=""
            ):
                return True, f"ClusterRoleBinding {binding['metadata']['name']}"
        if attrs.namespace:
            local_roles = {
                r["metadata"]["name"]: r
                for r in self._list("roles.rbac.authorization.k8s.io", attrs.namespace)
            }
            for binding in self._list("rolebindings.rbac.authorization.k8s.io", attrs.namespace):
                if self._binding_allows(
                    binding,
                    user,
                    attrs,
                    cluster_roles=roles,
                    local_roles=local_roles,
                    namespace=attrs.namespace,
                ):
                    return True, f"RoleBinding {attrs.namespace}/{binding['metadata']['name']}"
        return False, "no RBAC rule allows it"

    @staticmethod
    def _binding_allows(
        binding: Obj,
        user: UserInfo,
        attrs: Attributes,
        *,
        cluster_roles: Mapping[str, Obj],
        local_roles: Mapping[str, Obj] | None,
        namespace: str,
    ) -> bool:
        if not any(_subject_matches(s, user, namespace) for s in binding.get("subjects") or []):
            return False
        ref = binding.get("roleRef") or {}
        if ref.get("kind") == "Role":
            role = (local_roles or {}).get(ref.get("name", ""))
        else:
            role = cluster_roles.get(ref.get("name", ""))
        if role is None:
            return False
        return any(rule_allows(rule, attrs) for rule in role.get("rules") or [])


def review(authorizer: Authorizer, spec: Mapping[str, Any]) -> Obj:
    """Answer a SubjectAccessReview spec with its status."""
    user = UserInfo(
        str(spec.get("user") or ""),
        tuple(spec.get("groups") or ()),
        str(spec.get("uid") or ""),
    )
    ra = spec.get("resourceAttributes")
    nra = spec.get("nonResourceAttributes")
    if isinstance(ra, Mapping):
        attrs = Attributes(
            verb=str(ra.get("verb") or ""),
            group=str(ra.get("group") or ""),
            resource=str(ra.get("resource") or ""),
            subresource=str(ra.get("subresource") or ""),
            namespace=str(ra.get("namespace") or ""),
            name=str(ra.get("name") or ""),
        )
    elif isinstance(nra, Mapping):
        attrs = Attributes(verb=str(nra.get("verb") or ""), path=str(nra.get("path") or ""))
    else:
        return {
            "allowed": False,
            "evaluationError": "spec has neither resourceAttributes nor nonResourceAttributes",
        }
    ok, reason = authorizer.allowed(user, attrs)
    # Kubernetes leaves the reason empty on a plain "no rule allows it"; kubectl prints just "no".
    return {"allowed": True, "reason": reason} if ok else {"allowed": False}
