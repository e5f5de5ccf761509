"""Where the API is and how to authenticate: kubeconfig files and in-cluster service accounts.

Supports what `cdi server` writes and what clusters commonly hand out: server URL, CA (file or
inline data), insecure-skip-tls-verify, bearer token (inline or file), client certificate and key
(file or inline data). Exec and auth-provider plugins are not supported and say so.
"""

from __future__ import annotations

import base64
import os
import ssl
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class ConfigError(Exception):
    """The kubeconfig (or in-cluster environment) cannot be used; the message says why."""


@dataclass(frozen=True)
class ClientConfig:
    server: str
    token: str | None = field(default=None, repr=False)
    token_file: str | None = None
    ca_file: str | None = None
    ca_data: bytes | None = field(default=None, repr=False)
    insecure: bool = False
    cert_file: str | None = None
    key_file: str | None = None
    namespace: str = "default"

    def bearer_token(self) -> str | None:
        if self.token:
            return self.token
        if self.token_file:
            return Path(self.token_file).read_text().strip()
        return None

    def ssl_context(self) -> ssl.SSLContext | bool:
        if not self.server.startswith("https://"):
            return False
        if self.insecure:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        elif self.ca_file or self.ca_data:
            ctx = ssl.create_default_context(
                cafile=self.ca_file, cadata=self.ca_data.decode() if self.ca_data else None
            )
        else:
            ctx = ssl.create_default_context()
        if self.cert_file and self.key_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


def _data_to_file(data: str, suffix: str) -> str:
    """Inline cert/key data from a kubeconfig, written to a private temp file for ssl."""
    fd, path = tempfile.mkstemp(prefix="cdi-kubeconfig-", suffix=suffix)
    with os.fdopen(fd, "wb") as f:
        f.write(base64.b64decode(data))
    return path


def _named(items: list[dict[str, Any]], name: str, what: str, source: str) -> dict[str, Any]:
    for item in items or []:
        if item.get("name") == name:
            value = item.get(what)
            return value if isinstance(value, dict) else {}
    raise ConfigError(f"{source}: no {what} named {name!r}")


def load_kubeconfig(path: str | os.PathLike[str], *, context: str | None = None) -> ClientConfig:
    source = str(path)
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise ConfigError(f"cannot read kubeconfig {source}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"kubeconfig {source} is not valid YAML: {err}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"kubeconfig {source} is not a kubeconfig")
    name = context or doc.get("current-context")
    if not name:
        raise ConfigError(f"{source}: no current-context; pass a context name")
    ctx = _named(doc.get("contexts", []), name, "context", source)
    cluster = _named(doc.get("clusters", []), ctx.get("cluster", ""), "cluster", source)
    user = _named(doc.get("users", []), ctx["user"], "user", source) if ctx.get("user") else {}
    if "exec" in user or "auth-provider" in user:
        raise ConfigError(f"{source}: exec and auth-provider credentials are not supported")
    server = cluster.get("server")
    if not server:
        raise ConfigError(f"{source}: cluster {ctx.get('cluster')!r} has no server")
    base = Path(source).parent

    def resolve(p: str | None) -> str | None:
        return str(base / p) if p and not os.path.isabs(p) else p

    cert_file = resolve(user.get("client-certificate"))
    key_file = resolve(user.get("client-key"))
    if user.get("client-certificate-data"):
        cert_file = _data_to_file(user["client-certificate-data"], ".crt")
    if user.get("client-key-data"):
        key_file = _data_to_file(user["client-key-data"], ".key")
    ca_data = (
        base64.b64decode(cluster["certificate-authority-data"])
        if cluster.get("certificate-authority-data")
        else None
    )
    return ClientConfig(
        server=server.rstrip("/"),
        token=user.get("token"),
        token_file=resolve(user.get("tokenFile")),
        ca_file=resolve(cluster.get("certificate-authority")),
        ca_data=ca_data,
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        cert_file=cert_file,
        key_file=key_file,
        namespace=ctx.get("namespace") or "default",
    )


def in_cluster_config() -> ClientConfig:
    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host or not (SERVICE_ACCOUNT_DIR / "token").exists():
        raise ConfigError("not running in a cluster: no KUBERNETES_SERVICE_HOST or token")
    ns_file = SERVICE_ACCOUNT_DIR / "namespace"
    return ClientConfig(
        server=f"https://{host}:{port}" if ":" not in host else f"https://[{host}]:{port}",
        token_file=str(SERVICE_ACCOUNT_DIR / "token"),
        ca_file=str(SERVICE_ACCOUNT_DIR / "ca.crt"),
        namespace=ns_file.read_text().strip() if ns_file.exists() else "default",
    )


def load_config(kubeconfig: str | None = None, *, context: str | None = None) -> ClientConfig:
    """An explicit kubeconfig, else $KUBECONFIG, else in-cluster, else ~/.kube/config."""
    path = kubeconfig or os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or None
    if path:
        return load_kubeconfig(path, context=context)
    try:
        return in_cluster_config()
    except ConfigError:
        default = Path.home() / ".kube" / "config"
        if default.exists():
            return load_kubeconfig(default, context=context)
        raise ConfigError(
            "no Kubernetes configuration: set KUBECONFIG (cdi server writes <data-dir>/kubeconfig)"
        ) from None
