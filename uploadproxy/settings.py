"""The upload proxy's settings: one typed dataclass, documented field by field.

The defaults are CDI's (`pkg/uploadproxy`): wait 10 s for the upload server, polling every
second; 24 h for one proxied request; 10 s of clock leeway on tokens. `cdi-uploadproxy`
(`uploadproxy.main`) builds them from its command line; `cdi server` builds them itself and
hosts `uploadproxy.app.make_app` in its process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

from cdi.api.env import UPLOAD_SERVER_PORT
from cdi.api.tokens import TOKEN_LEEWAY_SECONDS

DEFAULT_NAMESPACE: Final = "cdi"
READY_WAIT_SECONDS: Final = 10.0
READY_POLL_SECONDS: Final = 1.0
UPSTREAM_TIMEOUT_SECONDS: Final = 24 * 60 * 60.0
UPSTREAM_CONNECT_TIMEOUT_SECONDS: Final = 30.0
CHUNK_SIZE: Final = 256 * 1024


class ResolveMode(StrEnum):
    """How the proxy finds an upload server."""

    #: `https://<svc>.<ns>.svc:<port>`, as CDI does: for clusters, where Services resolve.
    SERVICE = "service"
    #: The upload pod's `status.podIP`, with TLS still checking the name `<svc>.<ns>.svc`: for
    #: the all-in-one server, which has no cluster DNS.
    POD_IP = "pod-ip"


@dataclass(frozen=True)
class ProxySettings:
    namespace: str = DEFAULT_NAMESPACE
    """CDI's namespace: where the client certificate Secret, the upload servers' CA bundle
    ConfigMap and (unless `public_key` is given) the token signing key Secret are read."""
    resolve: ResolveMode = ResolveMode.SERVICE
    """How an upload server is reached (see `ResolveMode`)."""
    upstream_port: int = UPLOAD_SERVER_PORT
    """The upload servers' port (8443; tests point it elsewhere)."""
    ready_wait: float = READY_WAIT_SECONDS
    """Seconds to wait for the PVC and its upload server to be ready before answering 503."""
    ready_poll: float = READY_POLL_SECONDS
    """Seconds between two looks at the PVC while waiting."""
    upstream_timeout: float = UPSTREAM_TIMEOUT_SECONDS
    """Seconds one proxied request may take in all (a sync upload includes the conversion)."""
    upstream_connect_timeout: float = UPSTREAM_CONNECT_TIMEOUT_SECONDS
    """Seconds to connect to an upload server (TCP and TLS)."""
    token_leeway: float = TOKEN_LEEWAY_SECONDS
    """Clock skew tolerated on a token's `exp`, `nbf` and `iat`, in seconds."""
    public_key: bytes | None = field(default=None, repr=False)
    """The token verification key (PEM, CDI's `APISERVER_PUBLIC_KEY`); None: read `id_rsa.pub`
    of the Secret `cdi-api-signing-key` in `namespace` (re-read when the key changes)."""
    chunk_size: int = CHUNK_SIZE
    """Bytes read from the client per chunk: with the socket buffers, what one upload holds."""
    reload_interval: float = 2.0
    """Seconds at least between two re-reads of the TLS material or the signing key after a
    failure, so that a burst of failing requests does not hammer the API."""

    def __post_init__(self) -> None:
        if not self.namespace:
            raise ValueError("namespace must not be empty")
        if not 0 < self.upstream_port < 65536:
            raise ValueError(f"upstream_port {self.upstream_port} is not a TCP port")
        if self.ready_wait < 0 or self.ready_poll <= 0:
            raise ValueError("ready_wait must be >= 0 and ready_poll > 0")
        if self.upstream_timeout <= 0 or self.upstream_connect_timeout <= 0:
            raise ValueError("upstream timeouts must be > 0")
        if self.token_leeway < 0:
            raise ValueError("token_leeway must be >= 0")
        if self.chunk_size < 1024:
            raise ValueError("chunk_size must be at least 1024 bytes")
