"""`cdi-uploadproxy`: the upload proxy as its own process (CDI's `cdi-uploadproxy` Deployment).

    cdi-uploadproxy --tls-cert F --tls-key F [--kubeconfig F] [--listen 0.0.0.0:8443]
                    [--namespace cdi] [--resolve service|pod-ip] ...

Serves `uploadproxy.app.make_app` over HTTPS with the certificate and key of the given files,
re-read when they change (a rotated Secret mounted as files), checked at most every 10 s at a
TLS handshake. The API is reached through `--kubeconfig`, else $KUBECONFIG, else the in-cluster
service account. The token verification key is $APISERVER_PUBLIC_KEY (PEM, CDI's variable) or
`--public-key-file`, else the API server's signing key Secret. Exits 0 on SIGTERM/SIGINT, 2 on
bad arguments or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import ssl
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from cdi.api import env
from cdi.kube.client import Client
from cdi.kube.config import ConfigError, load_config
from uploadproxy.listener import ProxyListener
from uploadproxy.settings import (
    DEFAULT_NAMESPACE,
    READY_POLL_SECONDS,
    READY_WAIT_SECONDS,
    ProxySettings,
    ResolveMode,
)

log = logging.getLogger("uploadproxy.main")

ALL_INTERFACES: Final = "0.0.0.0"  # noqa: S104 - a proxy in a pod serves its pod's network
DEFAULT_LISTEN: Final = f"{ALL_INTERFACES}:8443"
CERT_CHECK_INTERVAL: Final = 10.0


def parse_listen(value: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` → (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT")
    host = host.strip("[]") or ALL_INTERFACES
    return host, int(port)


class ServerTLS:
    """The server side TLS context, swapped for a new one when the files change (SNI hook)."""

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self.cert_file, self.key_file = cert_file, key_file
        self._stamp = self._mtimes()
        self._checked = time.monotonic()
        self.context = self._build()
        self._current = self.context

    def _mtimes(self) -> tuple[int, int]:
        return (self.cert_file.stat().st_mtime_ns, self.key_file.stat().st_mtime_ns)

    def _build(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
        context.sni_callback = self._sni
        return context

    def _sni(self, sock: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        now = time.monotonic()
        if now - self._checked >= CERT_CHECK_INTERVAL:
            self._checked = now
            try:
                stamp = self._mtimes()
                if stamp != self._stamp:
                    self._current = self._build()
                    self._stamp = stamp
                    log.info("server certificate reloaded from %s", self.cert_file)
            except (OSError, ssl.SSLError) as err:
                log.warning("cannot reload the server certificate, keeping the old: %s", err)
        if self._current is not self.context:
            sock.context = self._current


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cdi-uploadproxy",
        description="The authenticated, streaming front door for uploads (CDI's upload proxy).",
    )
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, in-cluster)")
    parser.add_argument(
        "--listen", type=parse_listen, default=DEFAULT_LISTEN, help=f"[{DEFAULT_LISTEN}]"
    )
    parser.add_argument("--tls-cert", type=Path, required=True, help="server certificate (PEM)")
    parser.add_argument("--tls-key", type=Path, required=True, help="server key (PEM)")
    parser.add_argument(
        "--namespace", default=DEFAULT_NAMESPACE, help=f"CDI's namespace [{DEFAULT_NAMESPACE}]"
    )
    parser.add_argument(
        "--resolve",
        type=ResolveMode,
        choices=list(ResolveMode),
        default=ResolveMode.SERVICE,
        help="reach upload servers by Service DNS name or by pod IP [service]",
    )
    parser.add_argument("--upstream-port", type=int, default=env.UPLOAD_SERVER_PORT, help="[8443]")
    parser.add_argument(
        "--ready-wait",
        type=float,
        default=READY_WAIT_SECONDS,
        help=f"seconds to wait for an upload server [{READY_WAIT_SECONDS:g}]",
    )
    parser.add_argument("--ready-poll", type=float, default=READY_POLL_SECONDS, help="[1]")
    parser.add_argument(
        "--public-key-file",
        type=Path,
        help=f"token verification key (PEM; default ${env.APISERVER_PUBLIC_KEY}, else the "
        "signing key Secret)",
    )
    parser.add_argument(
        "--log-level", default=os.environ.get("CDI_LOG_LEVEL", "INFO"), help="[INFO]"
    )
    return parser


def settings_from_args(args: argparse.Namespace) -> ProxySettings:
    public_key: bytes | None = None
    if args.public_key_file is not None:
        public_key = args.public_key_file.read_bytes()
    elif value := os.environ.get(env.APISERVER_PUBLIC_KEY):
        public_key = value.encode()
    return ProxySettings(
        namespace=args.namespace,
        resolve=args.resolve,
        upstream_port=args.upstream_port,
        ready_wait=args.ready_wait,
        ready_poll=args.ready_poll,
        public_key=public_key,
    )


async def serve(
    settings: ProxySettings,
    client: Client,
    *,
    host: str,
    port: int,
    tls: ssl.SSLContext | None,
    stop: asyncio.Event,
) -> None:
    listener = await ProxyListener.start(settings, client, host=host, port=port, tls=tls)
    try:
        log.info("listening on %s:%d (%s)", host, listener.port, "https" if tls else "http")
        await stop.wait()
    finally:
        await listener.close()


async def _run(args: argparse.Namespace, settings: ProxySettings, tls: ssl.SSLContext) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    host, port = args.listen
    async with Client(load_config(args.kubeconfig), user_agent="cdi-uploadproxy") as client:
        await serve(settings, client, host=host, port=port, tls=tls, stop=stop)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        settings = settings_from_args(args)
        tls = ServerTLS(args.tls_cert, args.tls_key).context
        load_config(args.kubeconfig)  # fail early and clearly
    except (OSError, ValueError, ssl.SSLError, ConfigError) as err:
        print(f"cdi-uploadproxy: {err}", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(_run(args, settings, tls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
