"""A worker's Prometheus /metrics over HTTPS, in a daemon thread, as CDI's workers serve it.

Shared by the importer (and upload server) and the cloner: a WSGI server for one registry, behind
a throw-away self-signed certificate (the controller's scraper does not verify it, as in CDI),
that stops within SHUTDOWN_POLL so a worker does not linger at exit.
"""

from __future__ import annotations

import datetime
import logging
import socket
import socketserver
import ssl
import tempfile
import threading
from pathlib import Path
from typing import Any, Final
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

log = logging.getLogger(__name__)


#: How often the serving thread looks for a shutdown request. prometheus_client's own server
#: uses socketserver's 0.5 s, which every worker then waited for at exit (measured: 0.6 s of a
#: 0.75 s blank import).
SHUTDOWN_POLL: Final = 0.02


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Ipv6ThreadingServer(_ThreadingServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per scrape on stderr would bury the worker's own log


class MetricsServer:
    """HTTPS /metrics in a daemon thread; `port` is the bound port (useful with ":0")."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        # The key is on disk only while the context loads it: a worker killed later (SIGKILL)
        # leaves nothing behind in /tmp.
        with tempfile.TemporaryDirectory(prefix="cdi-metrics-") as directory:
            cert, key = _self_signed(Path(directory))
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(cert), str(key))
        server_class = _Ipv6ThreadingServer if ":" in host else _ThreadingServer
        self._server = make_server(
            host,
            port,
            make_wsgi_app(registry),
            server_class=server_class,
            handler_class=_QuietHandler,
        )
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": SHUTDOWN_POLL},
            name="metrics",
            daemon=True,
        )
        self._thread.start()
        self.port: int = self._server.server_port
        log.info("metrics serving addr=https://%s:%d/metrics", host, self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _self_signed(directory: Path) -> tuple[Path, Path]:
    # Imported here: only a worker that serves metrics pays for loading cryptography.
    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cdi-worker-metrics")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path
