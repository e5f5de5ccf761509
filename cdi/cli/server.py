"""`cdi server`: the all-in-one control plane on one machine (embedded API over SQLite).

Owns start-up: data dir, certificates, the admin token and kubeconfig, installing CDI's CRDs and
the default namespaces, then serving until Ctrl-C. Settings are a typed dataclass printed by
`--show-config`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import ipaddress
import json
import logging
import secrets
import signal
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from cdi.agent import ContainerRequired, LogNotFound, read_log, run_agent
from cdi.api.tokens import UPLOAD_TOKEN_LIFETIME_SECONDS
from cdi.apiserver.cloneauth import CloneAdmission
from cdi.apiserver.signing import SigningKeyError, ensure_signing_key
from cdi.controller.importing import CDI_NAMESPACE
from cdi.controller.manager import run_controllers
from cdi.kube.client import Client
from cdi.kube.config import load_kubeconfig
from cdi.kubeapi.app import ApiServer
from cdi.kubeapi.auth import Authenticator
from cdi.kubeapi.crds import load_crds
from cdi.kubeapi.errors import AlreadyExists, BadRequest, NotFound
from cdi.kubeapi.gc import GarbageCollector
from cdi.kubeapi.pki import ensure_pki
from cdi.kubeapi.registry import CRD_KEY
from cdi.kubeapi.store import Store
from cdi.provisioner import run_provisioner
from uploadproxy.listener import ProxyListener
from uploadproxy.settings import READY_WAIT_SECONDS, ProxySettings, ResolveMode

log = logging.getLogger(__name__)

DEFAULT_NAMESPACES = ("default", "kube-system", "kube-public", "cdi")


@dataclass(frozen=True)
class ServerSettings:
    data_dir: Path = Path(".cdi")
    """Where objects (api.db), certificates (pki/), the admin token and kubeconfig live."""
    host: str = "127.0.0.1"
    """Listen address; loopback by default: the all-in-one server is for this machine."""
    port: int = 6443
    """API port (kube-apiserver's usual one); 0 picks a free port."""
    insecure_http: bool = False
    """Serve plain HTTP instead of HTTPS (tests on loopback only). kubectl sends no token over
    http, so, as kube-apiserver's old insecure port, a request without a token acts as admin."""
    token_file: Path | None = None
    """Extra users: kube-apiserver's static token CSV (token,user,uid,"groups")."""
    controllers: bool = True
    """Run the CDI controllers (DataVolume, import, CDIConfig/StorageProfile) in this process,
    talking to this API as any client would. Off: objects stay as clients write them."""
    local_node: bool = True
    """Run the local node: the agent (Pod objects as processes, files under <data_dir>/pods) and
    the provisioner (volumes under <data_dir>/volumes). Off: an API with nothing to run pods."""
    upload_token_lifetime: int = UPLOAD_TOKEN_LIFETIME_SECONDS
    """Seconds an upload token (UploadTokenRequest) is valid: CDI's 5 minutes by default."""
    upload_proxy: bool = True
    """Serve the upload proxy (what `cdi image-upload` and virtctl send images to)."""
    upload_proxy_ready_wait: float = READY_WAIT_SECONDS
    """Seconds the upload proxy waits for a PVC's upload server to be ready before its 503
    (CDI's 10)."""
    upload_proxy_port: int | None = None
    """Its port: 8443 by default, a free one when the API's `port` is 0 (tests run several
    servers side by side)."""

    @property
    def proxy_port(self) -> int:
        if self.upload_proxy_port is not None:
            return self.upload_proxy_port
        return 0 if self.port == 0 else 8443

    @property
    def db_path(self) -> Path:
        return self.data_dir / "api.db"

    @property
    def kubeconfig_path(self) -> Path:
        return self.data_dir / "kubeconfig"


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "server",
        help="run the all-in-one server (embedded Kubernetes-compatible API)",
        description=(
            "Run the all-in-one server on this machine: a Kubernetes-compatible API with objects "
            "in SQLite under --data-dir. Writes <data-dir>/kubeconfig for kubectl. Ctrl-C "
            "stops it; a restart finds every object as it was."
        ),
    )
    parser.add_argument("--data-dir", type=Path, default=ServerSettings.data_dir, help="[.cdi]")
    parser.add_argument("--host", default=ServerSettings.host, help="listen address [127.0.0.1]")
    parser.add_argument("--port", type=int, default=ServerSettings.port, help="API port [6443]")
    parser.add_argument("--insecure-http", action="store_true", help="plain HTTP (tests only)")
    parser.add_argument("--token-file", type=Path, help="static token CSV for more users")
    parser.add_argument(
        "--no-local-node", action="store_true", help="no agent and no provisioner in this process"
    )
    parser.add_argument(
        "--no-controllers", action="store_true", help="no CDI controllers in this process"
    )
    parser.add_argument(
        "--upload-proxy-port",
        type=int,
        help="upload proxy port [8443; a free one with --port 0]",
    )
    parser.add_argument("--no-upload-proxy", action="store_true", help="no upload proxy")
    parser.add_argument(
        "--upload-proxy-ready-wait",
        type=float,
        default=READY_WAIT_SECONDS,
        metavar="SECONDS",
        help="how long the upload proxy waits for an upload server to be ready [10, as CDI]",
    )
    parser.add_argument(
        "--upload-token-lifetime",
        type=int,
        default=UPLOAD_TOKEN_LIFETIME_SECONDS,
        metavar="SECONDS",
        help="validity of upload tokens [300, as CDI]",
    )
    parser.add_argument("--show-config", action="store_true", help="print the settings and exit")
    parser.set_defaults(handler=run)


def _settings(args: argparse.Namespace) -> ServerSettings:
    return ServerSettings(
        data_dir=args.data_dir,
        host=args.host,
        port=args.port,
        insecure_http=args.insecure_http,
        token_file=args.token_file,
        local_node=not args.no_local_node,
        controllers=not args.no_controllers,
        upload_proxy=not args.no_upload_proxy,
        upload_token_lifetime=args.upload_token_lifetime,
        upload_proxy_port=args.upload_proxy_port,
        upload_proxy_ready_wait=args.upload_proxy_ready_wait,
    )


def run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.show_config:
        print(
            json.dumps(
                {
                    k: str(v) if isinstance(v, Path) else v
                    for k, v in dataclasses.asdict(settings).items()
                },
                indent=2,
            )
        )
        return 0
    if settings.insecure_http and not _is_loopback(settings.host):
        print(
            "cdi server: --insecure-http serves without authentication, so it only listens on "
            "a loopback address (127.0.0.1, ::1); drop --insecure-http or use --host 127.0.0.1",
            file=sys.stderr,
        )
        return 1
    if settings.token_file is not None and not settings.token_file.exists():
        print(f"cdi server: --token-file {settings.token_file}: no such file", file=sys.stderr)
        return 1
    logging.getLogger().setLevel(logging.INFO)
    try:
        asyncio.run(serve(settings))
    except OSError as err:
        print(
            f"cdi server: cannot listen on {settings.host}:{settings.port}: {err.strerror}",
            file=sys.stderr,
        )
        return 1
    except SigningKeyError as err:  # the token signing key Secret is there but unusable
        print(f"cdi server: {err}", file=sys.stderr)
        return 1
    return 0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def admin_token(data_dir: Path) -> str:
    path = data_dir / "admin-token"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(32))
        path.chmod(0o600)
    return path.read_text().strip()


def write_kubeconfig(
    settings: ServerSettings, server_url: str, token: str, ca: Path | None
) -> None:
    cluster: dict[str, Any] = {"server": server_url}
    if ca is not None:
        cluster["certificate-authority-data"] = base64.b64encode(ca.read_bytes()).decode()
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "cdi", "cluster": cluster}],
        "users": [{"name": "admin", "user": {"token": token}}],
        "contexts": [
            {"name": "cdi", "context": {"cluster": "cdi", "user": "admin", "namespace": "default"}}
        ],
        "current-context": "cdi",
    }
    path = settings.kubeconfig_path
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    path.chmod(0o600)


def install_defaults(store: Store) -> None:
    for crd in load_crds():
        name = crd["metadata"]["name"]
        try:
            current = store.get(CRD_KEY, "", name)
        except Exception:
            current = None
        from cdi.kubeapi.crds import default_crd, established_status  # noqa: PLC0415

        default_crd(crd)
        crd["status"] = established_status(crd)
        if current is None:
            with contextlib.suppress(AlreadyExists):
                store.create(CRD_KEY, crd, status_subresource=False)
        elif current.get("spec") != crd.get("spec"):
            crd["metadata"] = current["metadata"]
            store.update(CRD_KEY, crd, status_subresource=False)
    for ns in DEFAULT_NAMESPACES:
        with contextlib.suppress(AlreadyExists):
            store.create(
                "namespaces",
                {
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {"name": ns},
                    "spec": {"finalizers": ["kubernetes"]},
                    "status": {"phase": "Active"},
                },
                status_subresource=False,
            )


async def _start_upload_proxy(
    settings: ServerSettings, client: Client, ssl_ctx: ssl.SSLContext | None
) -> tuple[ProxyListener, str]:
    """The upload proxy on its own listener (its paths live at the root, as CDI's), with the API
    server's certificate, reaching upload pods by their IP (local Services do not resolve)."""
    proxy_settings = ProxySettings(
        namespace=CDI_NAMESPACE,
        resolve=ResolveMode.POD_IP if settings.local_node else ResolveMode.SERVICE,
        ready_wait=settings.upload_proxy_ready_wait,
    )
    listener = await ProxyListener.start(
        proxy_settings, client, host=settings.host, port=settings.proxy_port, tls=ssl_ctx
    )
    scheme = "http" if ssl_ctx is None else "https"
    return listener, f"{scheme}://{settings.host}:{listener.port}"


async def serve(
    settings: ServerSettings,
    *,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = Store(settings.db_path)
    try:
        install_defaults(store)
        signing_key = ensure_signing_key(store)  # UploadTokenRequest's key, made once
        token = admin_token(settings.data_dir)

        async def pod_logs(namespace: str, name: str, container: str | None) -> str:
            try:
                return await read_log(settings.data_dir, namespace, name, container)
            except ContainerRequired as err:
                raise BadRequest(str(err)) from None
            except LogNotFound as err:
                raise NotFound(str(err)) from None

        api = ApiServer(
            store,
            authenticator=Authenticator.from_files(token, settings.token_file),
            anonymous_admin=settings.insecure_http,
            log_reader=pod_logs,
            # CDI's datavolume webhooks: cross-namespace clone authorization, clone tokens.
            admission_hooks=[CloneAdmission(signing_key)],
            signing_key=signing_key,
            upload_token_lifetime=settings.upload_token_lifetime,
        )
        runner = web.AppRunner(api.app(), access_log=None, shutdown_timeout=5.0)
        await runner.setup()
        ssl_ctx = None
        ca = None
        if not settings.insecure_http:
            ca, crt, key = ensure_pki(
                settings.data_dir / "pki", [settings.host, "localhost", "127.0.0.1"]
            )
            ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_ctx.load_cert_chain(crt, key)
        site = web.TCPSite(runner, settings.host, settings.port, ssl_context=ssl_ctx)
        await site.start()
        stop = stop or asyncio.Event()
        gc = GarbageCollector(store, api.registry)
        gc_task = asyncio.create_task(gc.run(stop), name="gc")
        port = runner.addresses[0][1]
        scheme = "http" if settings.insecure_http else "https"
        url = f"{scheme}://{settings.host}:{port}"
        write_kubeconfig(settings, url, token, ca)
        node_stop = asyncio.Event()
        node_client = Client(load_kubeconfig(settings.kubeconfig_path))
        node: list[asyncio.Task[None]] = []
        if settings.local_node:
            node = [
                asyncio.create_task(
                    run_provisioner(node_client, root=settings.data_dir, stop=node_stop),
                    name="provisioner",
                ),
                asyncio.create_task(
                    run_agent(node_client, root=settings.data_dir, stop=node_stop), name="agent"
                ),
            ]
        proxy_runner: ProxyListener | None = None
        proxy_url: str | None = None
        if settings.upload_proxy:
            proxy_runner, proxy_url = await _start_upload_proxy(settings, node_client, ssl_ctx)
        if settings.controllers:
            node.append(
                asyncio.create_task(
                    run_controllers(
                        node_client,
                        stop=node_stop,
                        local=settings.local_node,
                        upload_proxy_url=proxy_url,
                    ),
                    name="controllers",
                )
            )
        print(f"cdi server: API at {url}", flush=True)
        if proxy_url:
            print(f"cdi server: upload proxy at {proxy_url}", flush=True)
        print(
            f"cdi server: kubeconfig {settings.kubeconfig_path.resolve()} "
            f"(KUBECONFIG={settings.kubeconfig_path} kubectl get dv -A)",
            flush=True,
        )
        print("cdi server: Ctrl-C stops it", flush=True)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        if ready is not None:
            ready.set()
        try:
            await stop.wait()
            print("cdi server: stopping", flush=True)
        finally:
            # The agent kills and reaps every pod process here: nothing outlives `cdi server`.
            node_stop.set()
            if proxy_runner is not None:
                await proxy_runner.close()
            for result in await asyncio.gather(*node, return_exceptions=True):
                if isinstance(result, Exception):
                    log.error("local node loop failed", exc_info=result)
            await node_client.close()
            stop.set()
            gc.wake()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(gc_task, timeout=30)
        api.shutdown()
        await runner.cleanup()
    finally:
        store.close()
