"""An upload end to end through the proxy: the embedded API server, the local provisioner and node
agent, the controllers (which make the upload PKI, the upload pod, its Service and Secret), the
real `cdi-uploadserver` of this checkout run by the agent, and the proxy app in pod-ip mode
with CDI's port 8443, reading everything it needs (signing key, client certificate, CA bundle,
PVC annotations, pod IP) through the API as it does in `cdi server`."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

from cdi.api import jwt
from cdi.api.groups import DATA_VOLUME, SECRET
from cdi.api.tokens import SIGNING_KEY_SECRET
from cdi.controller.manager import run_controllers
from cdi.controller.uploading import UploadSettings
from cdi.kube.client import Client
from tests.support.cluster import Cluster, eventually
from tests.support.dv import NS, disk_of, dv_in, dv_manifest
from tests.support.images import MIB, convert, patterned_raw, same_image
from tests.support.stack import LOOP_STOP_TIMEOUT
from tests.uploadproxy.helpers import HOST
from uploadproxy.listener import ProxyListener
from uploadproxy.settings import ProxySettings, ResolveMode

READY_TIMEOUT = 30.0


def real_upload_server(directory: Path) -> str:
    """`cdi-uploadserver` of this checkout, as a command the local agent can run."""
    script = directory / "cdi-uploadserver"
    script.write_text(
        f"#!{sys.executable}\nfrom importer.uploadserver import main\nraise SystemExit(main())\n"
    )
    script.chmod(0o755)
    return str(script)


@contextlib.asynccontextmanager
async def controllers(client: Client, command: str) -> AsyncIterator[None]:
    stop = asyncio.Event()
    settings = UploadSettings(command=command)
    task = asyncio.create_task(run_controllers(client, stop=stop, local=True, upload=settings))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, LOOP_STOP_TIMEOUT)


@contextlib.asynccontextmanager
async def proxy(client: Client) -> AsyncIterator[str]:
    settings = ProxySettings(resolve=ResolveMode.POD_IP, ready_wait=5, ready_poll=0.2)
    listener = await ProxyListener.start(settings, client, host=HOST, port=0, tls=None)
    try:
        yield f"http://{HOST}:{listener.port}"
    finally:
        await listener.close()


async def test_upload_through_the_proxy_into_a_data_volume(node: Cluster, tmp_path: Path) -> None:
    client = node.client
    raw = patterned_raw(tmp_path / "disk.raw", 8 * MIB)
    image = convert(raw, tmp_path / "disk.qcow2", "qcow2")
    secret = await client.get(SECRET, SIGNING_KEY_SECRET, "cdi")
    key = base64.b64decode(secret["data"]["id_rsa"])
    token = jwt.sign(key, jwt.upload_token_claims("up", NS, now=time.time()))
    auth = {"Authorization": f"Bearer {token}"}
    async with (
        controllers(client, real_upload_server(tmp_path)),
        proxy(client) as base,
        aiohttp.ClientSession() as http,
    ):
        await client.create(DATA_VOLUME, dv_manifest("up", {"upload": {}}, size="16Mi"))
        await dv_in(client, "up", "UploadReady", within=READY_TIMEOUT)
        # virtctl's probe for async support, then the upload, both through the proxy.
        async with http.head(f"{base}/v1beta1/upload-async", headers=auth) as resp:
            assert resp.status == 200
        async with http.post(
            f"{base}/v1beta1/upload-async",
            data=io.BytesIO(image.read_bytes()),
            headers={**auth, "Content-Type": "application/octet-stream"},
        ) as resp:
            assert resp.status == 200, await resp.text()
        done = await dv_in(client, "up", "Succeeded", "Failed", within=READY_TIMEOUT)
        assert done["status"]["phase"] == "Succeeded", done["status"]
        assert same_image(raw, await disk_of(client, "up"))

        # Once done, the proxy refuses further uploads into it.
        async def refused() -> str | None:
            async with http.post(f"{base}/v1beta1/upload", data=b"x", headers=auth) as resp:
                text = await resp.text()
                return text if resp.status == 503 else None

        text = await eventually(refused, within=20, interval=0.2, what="a 503 after success")
        assert "already finished uploading" in text
