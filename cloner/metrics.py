"""Clone progress as a Prometheus metric, served over HTTPS as CDI's cloner does (reference §7.3).

`kubevirt_cdi_clone_progress_total{ownerUID}` is a counter of percent (0-100) of the source's
data sent; it only grows. The server is the importer's design (importer/metrics.py), not its
import (workers are independent): a WSGI server in a daemon thread that stops within
SHUTDOWN_POLL, behind a throw-away self-signed certificate the scraper does not verify.
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

from prometheus_client import CollectorRegistry, Counter, make_wsgi_app

log = logging.getLogger(__name__)

METRIC: Final = "kubevirt_cdi_clone_progress"  # the client library adds "_total"
#: prometheus_client's own server polls every 0.5 s, which every clone would wait for at exit.
SHUTDOWN_POLL: Final = 0.02


class CloneProgress:
    """Percent for the controller; set from the reading thread, read by the metrics thread."""

    def __init__(self, owner_uid: str) -> None:
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        self._percent = 0.0
        self._counter = Counter(
            METRIC, "Clone progress in percent", ["ownerUID"], registry=self.registry
        ).labels(ownerUID=owner_uid)

    @property
    def percent(self) -> float:
        return self._percent

    def set_percent(self, percent: float) -> None:
        """Raise progress to `percent` (at most 100); lower values are ignored."""
        percent = min(100.0, percent)
        with self._lock:
            if percent > self._percent:
                self._counter.inc(percent - self._percent)
                self._percent = percent


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Ipv6ThreadingServer(_ThreadingServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # a line per scrape would bury the clone's own log


class MetricsServer:
    """HTTPS /metrics in a daemon thread; `port` is the bound port (useful with port 0)."""

    def __init__(self, progress: CloneProgress, host: str, port: int) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="cdi-cloner-metrics-")
        try:
            cert, key = _self_signed(Path(self._dir.name))
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(cert), str(key))
            server_class = _Ipv6ThreadingServer if ":" in host else _ThreadingServer
            self._server = make_server(
                host,
                port,
                make_wsgi_app(progress.registry),
                server_class=server_class,
                handler_class=_QuietHandler,
            )
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        except BaseException:
            self._dir.cleanup()
            raise
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
        self._dir.cleanup()


def _self_signed(directory: Path) -> tuple[Path, Path]:
    # Imported here: loading cryptography is paid only when metrics are served.
    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cdi-cloner-metrics")])
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
