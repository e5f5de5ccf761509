"""The upload proxy against the real embedded API server and an upload server stand-in.

`proxy_env`: the `cluster` fixture's API server holding what the proxy reads (the client
certificate Secret and the CA bundle ConfigMap in `cdi`, made by `helpers.Pki`; the signing key
Secret the server made itself), a `Sink` upload server on 127.0.0.1, and the proxy app
(`ProxyListener`: uploads relayed by the blocking front, the rest by the aiohttp app; pod-ip
mode, the sink's port, short waits) served on 127.0.0.1 over plain HTTP.
`ProxyEnv` makes PVCs with their upload pods (status.podIP 127.0.0.1), mints tokens with the
server's signing key, and sends requests.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cdi.api import annotations as ann
from cdi.api import jwt
from cdi.api.groups import CONFIG_MAP, NAMESPACE, PERSISTENT_VOLUME_CLAIM, POD, SECRET
from cdi.api.tokens import SIGNING_KEY_SECRET
from cdi.kube.client import Client
from cdi.kube.errors import AlreadyExists
from tests.support.cluster import Cluster
from tests.uploadproxy.helpers import HOST, Pki, Sink
from uploadproxy import naming
from uploadproxy.listener import ProxyListener
from uploadproxy.settings import ProxySettings, ResolveMode

CDI_NAMESPACE = "cdi"
TEST_NAMESPACES = ("n1", "n2")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def put_tls_material(client: Client, pki: Pki) -> None:
    """The client certificate Secret and the upload servers' CA bundle, as the controller
    keeps them (created, or replaced when there)."""
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "cdi-uploadserver-client-cert", "namespace": CDI_NAMESPACE},
        "type": "kubernetes.io/tls",
        "data": {"tls.crt": b64(pki.client.cert), "tls.key": b64(pki.client.key)},
    }
    bundle = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "cdi-uploadserver-signer-bundle", "namespace": CDI_NAMESPACE},
        "data": {"ca-bundle.crt": pki.server_ca.pem.decode()},
    }
    for resource, obj in ((SECRET, secret), (CONFIG_MAP, bundle)):
        try:
            await client.create(resource, obj)
        except AlreadyExists:
            current = await client.get(resource, obj["metadata"]["name"], CDI_NAMESPACE)
            obj["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            await client.replace(resource, obj)


async def signing_key(client: Client) -> bytes:
    secret = await client.get(SECRET, SIGNING_KEY_SECRET, CDI_NAMESPACE)
    return base64.b64decode(secret["data"]["id_rsa"])


@dataclass
class Reply:
    status: int
    text: str
    headers: Mapping[str, str]


@dataclass
class ProxyEnv:
    cluster: Cluster
    pki: Pki
    sink: Sink
    key: bytes
    tmp: Path
    http: aiohttp.ClientSession
    settings: ProxySettings = field(default_factory=ProxySettings)
    url: str = ""
    _listeners: list[ProxyListener] = field(default_factory=list)

    @property
    def client(self) -> Client:
        return self.cluster.client

    async def start_proxy(self, **overrides: Any) -> str:
        """Serve a proxy with `self.settings` changed by `overrides`; its base URL."""
        settings = dataclasses.replace(self.settings, **overrides)
        listener = await ProxyListener.start(settings, self.client, host=HOST, port=0, tls=None)
        self._listeners.append(listener)
        return f"http://{HOST}:{listener.port}"

    async def close(self) -> None:
        for listener in self._listeners:
            await listener.close()

    def token(
        self,
        name: str,
        namespace: str = "default",
        /,
        *,
        now: float | None = None,
        key: bytes | None = None,
        **claims: Any,
    ) -> str:
        body = jwt.upload_token_claims(name, namespace, now=time.time() if now is None else now)
        body.update(claims)
        return jwt.sign(key or self.key, body)

    async def pvc(
        self,
        name: str,
        namespace: str = "default",
        *,
        annotations: Mapping[str, str] | None = None,
        target: bool = True,
        ready: bool = True,
        pod: bool = True,
        spec: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A PVC (an upload target unless `target=False`, ready unless `ready=False`) and,
        unless `pod=False`, its upload pod at 127.0.0.1."""
        wanted: dict[str, str] = {}
        if target:
            wanted[ann.UPLOAD_TARGET] = ""
        wanted[ann.POD_READY] = "true" if ready else "false"
        wanted.update(annotations or {})
        obj = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": namespace, "annotations": wanted},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "1Gi"}},
                **(spec or {}),
            },
        }
        created = await self.client.create(PERSISTENT_VOLUME_CLAIM, obj)
        if pod:
            await self.upload_pod(naming.upload_pod_name(name), namespace)
        return created

    async def upload_pod(self, name: str, namespace: str, ip: str | None = HOST) -> None:
        await self.client.create(
            POD,
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"containers": [{"name": "cdi-upload-server", "image": "uploadserver"}]},
            },
        )
        if ip:
            await self.client.patch(
                POD, name, {"status": {"podIP": ip}}, namespace, subresource="status"
            )

    async def annotate(self, name: str, namespace: str, annotations: Mapping[str, str]) -> None:
        await self.client.patch(
            PERSISTENT_VOLUME_CLAIM,
            name,
            {"metadata": {"annotations": dict(annotations)}},
            namespace,
        )

    async def send(
        self,
        path: str,
        *,
        token: str | None = None,
        method: str = "POST",
        data: Any = None,
        headers: Mapping[str, str] | None = None,
        base: str | None = None,
    ) -> Reply:
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        async with self.http.request(
            method, (base or self.url) + path, data=data, headers=sent
        ) as resp:
            return Reply(resp.status, await resp.text(), resp.headers)


@pytest.fixture
async def proxy_env(cluster: Cluster, tmp_path: Path) -> AsyncIterator[ProxyEnv]:
    pki = Pki.create()
    client = cluster.client
    for namespace in TEST_NAMESPACES:
        with contextlib.suppress(AlreadyExists):
            await client.create(
                NAMESPACE,
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
            )
    await put_tls_material(client, pki)
    sink = Sink(pki)
    await sink.start(tmp_path)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        env = ProxyEnv(
            cluster=cluster,
            pki=pki,
            sink=sink,
            key=await signing_key(client),
            tmp=tmp_path,
            http=http,
            settings=ProxySettings(
                resolve=ResolveMode.POD_IP,
                upstream_port=sink.port,
                ready_wait=1.0,
                ready_poll=0.1,
                reload_interval=0.0,
            ),
        )
        try:
            env.url = await env.start_proxy()
            yield env
        finally:
            await env.close()
            await env.sink.stop()
