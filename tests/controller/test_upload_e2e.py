"""Uploads end to end through the control plane: the in-process API server, the local provisioner
and node agent (which runs readiness probes), and the controllers (`run_controllers`).

The upload server worker itself is stood in for by `STAND_IN`, a small script that keeps the
worker contract the controller relies on: it reads the TLS files the pod mounts (TLS_CERT_FILE,
TLS_KEY_FILE, CLIENT_CERT_FILE), listens on the pod's IP, port 8443, answers `/healthz`, accepts a
POST to `/v1beta1/upload` only from a client certificate signed by CLIENT_CERT_FILE's CA with CN
CLIENT_NAME, writes the body to DESTINATION (Block) or `<data dir>/disk.img`, and ends with
CDI's termination messages: "Upload Complete", or "Deadline Passed" with `deadlinePassed` once
DEADLINE passes with no upload. It makes these tests about the controller: the certificates it
issues are checked by a real mutual-TLS connection made as the upload proxy makes it (the proxy's
client certificate from `cdi-uploadserver-client-cert`, the server verified against the
`cdi-uploadserver-signer-bundle` for the Service's DNS name).

The real `cdi-uploadserver` of this checkout (`importer.uploadserver`) runs too: a qcow2 upload
through it, and the deadline renewal, so the controller and the worker cannot drift apart on the
env, TLS and termination-message contract.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import io
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import aiohttp
import pytest

from cdi.api import annotations as ann
from cdi.api.groups import (
    CONFIG_MAP,
    DATA_VOLUME,
    EVENT,
    PERSISTENT_VOLUME_CLAIM,
    POD,
    SECRET,
    SERVICE,
)
from cdi.controller import certs, naming
from cdi.controller.manager import run_controllers
from cdi.controller.uploading import UploadSettings
from cdi.kube.client import Client
from cdi.kube.errors import NotFound
from tests.support.cluster import Cluster, eventually
from tests.support.dv import NS, conditions, disk_of, dv_in, dv_manifest, volume_of
from tests.support.images import MIB, convert, patterned_raw, same_image
from tests.support.stack import LOOP_STOP_TIMEOUT

READY_TIMEOUT: Final = 30.0

STAND_IN: Final = """
import datetime, json, os, ssl, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

env = os.environ
deadline = datetime.datetime.strptime(env["DEADLINE"], "%Y-%m-%dT%H:%M:%SZ").replace(
    tzinfo=datetime.timezone.utc)
started = threading.Event()


def finish(message):
    with open(env["CDI_TERMINATION_LOG"], "w") as f:
        f.write(json.dumps(message))


def watch_deadline():
    left = (deadline - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
    if not started.wait(max(0.0, left)):
        finish({"message": "Deadline Passed", "deadlinePassed": True})
        os._exit(0)


class Handler(BaseHTTPRequestHandler):
    def reply(self, code, body):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.reply(200 if self.path == "/healthz" else 404, b"OK")

    def do_POST(self):
        peer = self.connection.getpeercert() or {}
        names = [v for rdn in peer.get("subject", ()) for k, v in rdn if k == "commonName"]
        if env["CLIENT_NAME"] not in names:
            return self.reply(401, b"client certificate required")
        if self.path != "/v1beta1/upload":
            return self.reply(404, b"")
        started.set()
        left = int(self.headers["Content-Length"])
        target = env.get("DESTINATION") or os.path.join(env["CDI_DATA_DIR"], "disk.img")
        with open(target, "r+b" if env.get("DESTINATION") else "wb") as out:
            while left:
                chunk = self.rfile.read(min(left, 1 << 16))
                out.write(chunk)
                left -= len(chunk)
        finish({"message": "Upload Complete", "preallocationApplied": False})
        self.reply(200, b"")
        threading.Thread(target=self.server.shutdown).start()


ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(env["TLS_CERT_FILE"], env["TLS_KEY_FILE"])
ctx.load_verify_locations(env["CLIENT_CERT_FILE"])
ctx.verify_mode = ssl.CERT_OPTIONAL
server = ThreadingHTTPServer((env["POD_IP"], 8443), Handler)
server.socket = ctx.wrap_socket(server.socket, server_side=True)
threading.Thread(target=watch_deadline, daemon=True).start()
print("listening on", env["POD_IP"], flush=True)
server.serve_forever()
sys.exit(0)
"""


def stand_in(directory: Path) -> str:
    script = directory / "cdi-uploadserver"
    script.write_text(f"#!{sys.executable}\n{STAND_IN}")
    script.chmod(0o755)
    return str(script)


def real_upload_server(directory: Path) -> str:
    """`cdi-uploadserver` of this checkout, as a command the local agent can run."""
    script = directory / "cdi-uploadserver"
    script.write_text(
        f"#!{sys.executable}\nfrom importer.uploadserver import main\nraise SystemExit(main())\n"
    )
    script.chmod(0o755)
    return str(script)


@contextlib.asynccontextmanager
async def controllers(
    client: Client, command: str, *, deadline: datetime.timedelta = datetime.timedelta(hours=1)
) -> AsyncIterator[None]:
    """`run_controllers` as `cdi server` runs them, with the stand-in as the upload server."""
    stop = asyncio.Event()
    settings = UploadSettings(command=command, deadline=deadline)
    task = asyncio.create_task(run_controllers(client, stop=stop, local=True, upload=settings))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, LOOP_STOP_TIMEOUT)


@pytest.fixture
async def uploads(node: Cluster, tmp_path: Path) -> AsyncIterator[Cluster]:
    async with controllers(node.client, stand_in(tmp_path)):
        yield node


def upload_dv(name: str, *, size: str = "16Mi", **storage: Any) -> dict[str, Any]:
    return dv_manifest(name, {"upload": {}}, size=size, storage=storage)


async def get_or_none(client: Client, resource: Any, name: str, ns: str = NS) -> Any:
    try:
        return await client.get(resource, name, ns)
    except NotFound:
        return None


async def upload(client: Client, pvc: str, data: bytes, tmp_path: Path) -> tuple[int, str]:
    """POST `data` to the PVC's upload server as the upload proxy does: mutual TLS with the
    proxy's client certificate, the server checked against the signer bundle for the name of
    its Service."""
    secret = await client.get(SECRET, certs.CLIENT_CERT_SECRET, certs.CDI_NAMESPACE)
    bundle = await client.get(CONFIG_MAP, certs.SERVER_SIGNER_BUNDLE, certs.CDI_NAMESPACE)
    cert, key = tmp_path / "proxy.crt", tmp_path / "proxy.key"
    cert.write_bytes(base64.b64decode(secret["data"]["tls.crt"]))
    key.write_bytes(base64.b64decode(secret["data"]["tls.key"]))
    ctx = ssl.create_default_context(cadata=bundle["data"][certs.BUNDLE_KEY])
    ctx.load_cert_chain(cert, key)
    pod = await client.get(POD, naming.upload_pod_name(pvc), NS)
    url = f"https://{pod['status']['podIP']}:8443/v1beta1/upload"
    hostname = f"{naming.upload_service_name(pvc)}.{NS}.svc"
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=io.BytesIO(data), ssl=ctx, server_hostname=hostname) as resp,
    ):
        return resp.status, await resp.text()


async def events_of(client: Client, name: str, kind: str) -> list[tuple[str, str]]:
    items, _ = await client.list(EVENT, NS)
    return [
        (e["reason"], e["message"])
        for e in items
        if e["involvedObject"]["name"] == name and e["involvedObject"]["kind"] == kind
    ]


async def gone(client: Client, resource: Any, name: str) -> bool:
    return await get_or_none(client, resource, name) is None


# --- tests ---------------------------------------------------------------------------------------


async def test_upload_dv_scheduled_ready_then_succeeded(uploads: Cluster, tmp_path: Path) -> None:
    client = uploads.client
    await client.create(DATA_VOLUME, upload_dv("up"))
    scheduled = await dv_in(client, "up", "UploadScheduled", "UploadReady", within=READY_TIMEOUT)
    assert scheduled["status"]["phase"] == "UploadScheduled", scheduled["status"]
    dv = await dv_in(client, "up", "UploadReady", within=READY_TIMEOUT)
    assert dv["status"]["progress"] == "N/A"
    conds = conditions(dv)
    assert conds["Bound"]["status"] == "True"
    assert conds["Running"]["status"] == "True"
    assert conds["Ready"]["status"] == "False"
    assert conds["Ready"]["reason"] == "TransferRunning"

    pvc = await client.get(PERSISTENT_VOLUME_CLAIM, "up", NS)
    notes = pvc["metadata"]["annotations"]
    assert notes[ann.UPLOAD_TARGET] == ""
    assert notes[ann.CONTENT_TYPE] == "kubevirt"
    assert notes[ann.UPLOAD_POD_NAME] == "cdi-upload-up"
    assert notes[ann.POD_PHASE] == "Running"
    assert notes[ann.POD_READY] == "true"
    assert notes[ann.POD_RESTARTS] == "0"
    assert notes[ann.CONDITION_RUNNING] == "true"
    assert notes[ann.CONDITION_RUNNING_REASON] == "Pod is running"

    pod = await client.get(POD, "cdi-upload-up", NS)
    (container,) = pod["spec"]["containers"]
    values = {e["name"]: e.get("value", "") for e in container["env"]}
    assert values["TLS_KEY_FILE"] == "/etc/tls/tls.key"
    assert values["CLIENT_CERT_FILE"] == "/etc/tls/ca.crt"
    assert values["CLIENT_NAME"] == "client.upload-server.cdi.kubevirt.io"
    assert values["UPLOAD_IMAGE_SIZE"] == pvc["spec"]["resources"]["requests"]["storage"]
    assert values["FILESYSTEM_OVERHEAD"] == "0.06"
    assert "DESTINATION" not in values
    deadline = datetime.datetime.strptime(values["DEADLINE"], "%Y-%m-%dT%H:%M:%SZ")
    left = deadline.replace(tzinfo=datetime.UTC) - datetime.datetime.now(datetime.UTC)
    assert datetime.timedelta(minutes=50) < left <= datetime.timedelta(hours=1)
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/data", "/etc/tls", "/scratch"}
    assert pod["metadata"]["labels"]["service"] == "cdi-upload-up"
    assert pod["metadata"]["ownerReferences"][0]["uid"] == pvc["metadata"]["uid"]

    service = await client.get(SERVICE, "cdi-upload-up", NS)
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"service": "cdi-upload-up"}
    secret = await client.get(SECRET, "cdi-upload-up", NS)
    assert set(secret["data"]) == {"tls.key", "tls.crt", "ca.crt"}
    client_signer = await client.get(SECRET, certs.CLIENT_SIGNER_SECRET, certs.CDI_NAMESPACE)
    assert secret["data"]["ca.crt"] == client_signer["data"]["tls.crt"]
    scratch = await client.get(PERSISTENT_VOLUME_CLAIM, "up-scratch", NS)
    assert scratch["metadata"]["ownerReferences"][0]["uid"] == pod["metadata"]["uid"]

    data = bytes(range(256)) * 4096 + b"tail"
    status, body = await upload(client, "up", data, tmp_path)
    assert status == 200, body
    done = await dv_in(client, "up", "Succeeded", "Failed", within=READY_TIMEOUT)
    assert done["status"]["phase"] == "Succeeded"
    assert done["status"]["progress"] == "100.0%"
    assert conditions(done)["Ready"]["status"] == "True"
    assert (await disk_of(client, "up")).read_bytes() == data
    for resource, name in (
        (POD, "cdi-upload-up"),
        (SERVICE, "cdi-upload-up"),
        (SECRET, "cdi-upload-up"),
        (PERSISTENT_VOLUME_CLAIM, "up-scratch"),
    ):
        await eventually(
            lambda r=resource, n=name: gone(client, r, n),
            within=10.0,
            what=f"{resource.kind} {name} deleted after the upload",
        )
    pvc = await client.get(PERSISTENT_VOLUME_CLAIM, "up", NS)
    assert pvc["metadata"]["annotations"][ann.POD_PHASE] == "Succeeded"
    assert pvc["metadata"]["annotations"][ann.CONDITION_RUNNING_MESSAGE] == "Upload Complete"
    assert ("UploadSucceeded", "Upload Successful") in await events_of(
        client, "up", "PersistentVolumeClaim"
    )
    dv_events = await events_of(client, "up", "DataVolume")
    assert ("UploadScheduled", "Upload into up scheduled") in dv_events
    assert ("UploadReady", "Upload into up ready") in dv_events
    assert ("UploadSucceeded", "Successfully uploaded into up") in dv_events


async def test_block_upload_writes_the_device(uploads: Cluster, tmp_path: Path) -> None:
    client = uploads.client
    await client.create(DATA_VOLUME, upload_dv("blk", size="8Mi", volumeMode="Block"))
    await dv_in(client, "blk", "UploadReady", within=READY_TIMEOUT)
    pod = await client.get(POD, "cdi-upload-blk", NS)
    (container,) = pod["spec"]["containers"]
    assert container["volumeDevices"] == [
        {"name": "cdi-data-vol", "devicePath": "/dev/cdi-block-volume"}
    ]
    assert "/data" not in {m["mountPath"] for m in container["volumeMounts"]}
    values = {e["name"]: e.get("value", "") for e in container["env"]}
    assert values["DESTINATION"] == "/dev/cdi-block-volume"
    assert values["FILESYSTEM_OVERHEAD"] == "0"
    data = b"\x5a" * (1 << 20)
    status, body = await upload(client, "blk", data, tmp_path)
    assert status == 200, body
    await dv_in(client, "blk", "Succeeded", within=READY_TIMEOUT)
    device = await volume_of(client, "blk")
    assert device.read_bytes()[: len(data)] == data


@pytest.mark.parametrize("worker", [pytest.param("stand-in", marks=pytest.mark.slow), "real"])
async def test_deadline_replaces_pod_with_fresh_certificate(
    node: Cluster, tmp_path: Path, worker: str
) -> None:
    client = node.client
    command = stand_in(tmp_path) if worker == "stand-in" else real_upload_server(tmp_path)
    async with controllers(client, command, deadline=datetime.timedelta(seconds=6)):
        await client.create(DATA_VOLUME, upload_dv("late"))
        await dv_in(client, "late", "UploadReady", within=READY_TIMEOUT)
        first = await client.get(POD, "cdi-upload-late", NS)
        first_cert = (await client.get(SECRET, "cdi-upload-late", NS))["data"]["tls.crt"]

        async def replaced() -> dict[str, Any] | None:
            pod = await get_or_none(client, POD, "cdi-upload-late")
            if pod is None or pod["metadata"]["uid"] == first["metadata"]["uid"]:
                return None
            return dict(pod)

        second = await eventually(replaced, within=READY_TIMEOUT, what="a new upload pod")
        secret = await client.get(SECRET, "cdi-upload-late", NS)
        assert secret["data"]["tls.crt"] != first_cert
        deadline_of = {e["name"]: e.get("value") for e in second["spec"]["containers"][0]["env"]}
        assert (
            deadline_of["DEADLINE"]
            != (
                {e["name"]: e.get("value") for e in first["spec"]["containers"][0]["env"]}[
                    "DEADLINE"
                ]
            )
        )
        dv = await dv_in(client, "late", "UploadReady", within=READY_TIMEOUT)
        pvc = await client.get(PERSISTENT_VOLUME_CLAIM, "late", NS)
        notes = pvc["metadata"]["annotations"]
        # A deadline is no failure: no restart counted, same pod name.
        assert notes[ann.POD_RESTARTS] == "0"
        assert dv["status"]["restartCount"] == 0
        assert notes[ann.UPLOAD_POD_NAME] == "cdi-upload-late"
        scratch = await client.get(PERSISTENT_VOLUME_CLAIM, "late-scratch", NS)
        owner = scratch["metadata"]["ownerReferences"][0]["uid"]
        current = await client.get(POD, "cdi-upload-late", NS)
        assert owner == current["metadata"]["uid"]
        # storage.pod.phase went back to "": the DataVolume was scheduled again, then ready.
        reasons = [reason for reason, _ in await events_of(client, "late", "DataVolume")]
        assert reasons.count("UploadScheduled") >= 2, reasons
        assert reasons.count("UploadReady") >= 2, reasons


async def test_pvc_annotated_directly_is_served(uploads: Cluster, tmp_path: Path) -> None:
    """A PVC made by hand (virtctl's PVC mode) with the upload annotation; archive: no scratch."""
    client = uploads.client
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": "byhand",
            "namespace": NS,
            "annotations": {ann.UPLOAD_TARGET: "", ann.CONTENT_TYPE: "archive"},
        },
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "16Mi"}},
        },
    }
    await client.create(PERSISTENT_VOLUME_CLAIM, pvc, NS)

    async def ready() -> dict[str, Any] | None:
        got = await client.get(PERSISTENT_VOLUME_CLAIM, "byhand", NS)
        return dict(got) if got["metadata"]["annotations"].get(ann.POD_READY) == "true" else None

    got = await eventually(ready, within=READY_TIMEOUT, what="storage.pod.ready=true")
    assert got["metadata"]["annotations"][ann.UPLOAD_POD_NAME] == "cdi-upload-byhand"
    assert got["metadata"]["annotations"][ann.POD_PHASE] == "Running"
    pod = await client.get(POD, "cdi-upload-byhand", NS)
    (container,) = pod["spec"]["containers"]
    assert "/scratch" not in {m["mountPath"] for m in container["volumeMounts"]}
    assert await get_or_none(client, PERSISTENT_VOLUME_CLAIM, "byhand-scratch") is None
    # Deleting the claim takes its pod, Service and Secret with it.
    await client.delete(PERSISTENT_VOLUME_CLAIM, "byhand", NS)
    for resource in (POD, SERVICE, SECRET):
        await eventually(
            lambda r=resource: gone(client, r, "cdi-upload-byhand"),
            within=10.0,
            what=f"{resource.kind} deleted with its PVC",
        )


async def test_target_in_use_waits_for_the_other_pod(uploads: Cluster) -> None:
    client = uploads.client
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "busy", "namespace": NS},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "8Mi"}},
        },
    }
    await client.create(PERSISTENT_VOLUME_CLAIM, pvc, NS)
    consumer = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "consumer", "namespace": NS},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "sleep",
                    "image": "busybox",
                    "command": ["sleep", "60"],
                    "volumeMounts": [{"name": "v", "mountPath": "/data"}],
                }
            ],
            "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": "busy"}}],
        },
    }
    await client.create(POD, consumer, NS)

    async def running() -> bool:
        pod = await client.get(POD, "consumer", NS)
        return bool((pod.get("status") or {}).get("phase") == "Running")

    await eventually(running, within=READY_TIMEOUT, what="the consumer pod running")
    await client.patch(
        PERSISTENT_VOLUME_CLAIM, "busy", {"metadata": {"annotations": {ann.UPLOAD_TARGET: ""}}}, NS
    )

    async def in_use() -> bool:
        return ("UploadTargetInUse", "pod default/consumer using PersistentVolumeClaim busy") in (
            await events_of(client, "busy", "PersistentVolumeClaim")
        )

    await eventually(in_use, within=10.0, what="event UploadTargetInUse")
    assert await get_or_none(client, POD, "cdi-upload-busy") is None
    await client.delete(POD, "consumer", NS)
    await eventually(
        lambda: get_or_none(client, POD, "cdi-upload-busy"),
        within=READY_TIMEOUT,
        what="the upload pod once the target is free",
    )


async def test_clone_and_upload_is_an_error(uploads: Cluster) -> None:
    client = uploads.client
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": "both",
            "namespace": NS,
            "annotations": {ann.UPLOAD_TARGET: "", ann.CLONE_REQUEST: "default/source"},
        },
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "8Mi"}},
        },
    }
    await client.create(PERSISTENT_VOLUME_CLAIM, pvc, NS)

    async def refused() -> bool:
        got = await client.get(PERSISTENT_VOLUME_CLAIM, "both", NS)
        notes = got["metadata"].get("annotations") or {}
        return notes.get(ann.CONDITION_RUNNING_MESSAGE) == (
            "PVC has both clone and upload annotations"
        )

    await eventually(refused, within=10.0, what="the clone+upload error on the PVC")
    await asyncio.sleep(1.0)
    assert await get_or_none(client, POD, "cdi-upload-both") is None
    assert await get_or_none(client, SECRET, "cdi-upload-both") is None


async def test_upload_pki_is_made_once_and_repaired(cluster: Cluster) -> None:
    """The signers survive a restarted controller (a second call reads them back); a client
    certificate from another CA is re-issued by ours; the bundle holds the signer."""
    client = cluster.client
    first = await certs.ensure_upload_pki(client)
    again = await certs.ensure_upload_pki(client)
    assert again == first
    bundle = await client.get(CONFIG_MAP, certs.SERVER_SIGNER_BUNDLE, certs.CDI_NAMESPACE)
    assert bundle["data"][certs.BUNDLE_KEY].encode() == first.server_signer.cert
    client_bundle = await client.get(CONFIG_MAP, certs.CLIENT_SIGNER_BUNDLE, certs.CDI_NAMESPACE)
    assert client_bundle["data"][certs.BUNDLE_KEY].encode() == first.client_ca

    foreign = certs.issue_client_cert(certs.create_ca("foreign"), "client.upload-server.x")
    await client.replace(
        SECRET, certs.tls_secret(certs.CLIENT_CERT_SECRET, certs.CDI_NAMESPACE, foreign)
    )
    await certs.ensure_upload_pki(client)
    secret = await client.get(SECRET, certs.CLIENT_CERT_SECRET, certs.CDI_NAMESPACE)
    issued = base64.b64decode(secret["data"]["tls.crt"])
    assert certs.signed_by(issued, first.client_ca)
    assert certs.common_name(issued) == "client.upload-server.cdi.kubevirt.io"

    # Parallel reconciles agree on one CA.
    await client.delete(SECRET, certs.SERVER_SIGNER_SECRET, certs.CDI_NAMESPACE)
    results = await asyncio.gather(*(certs.ensure_upload_pki(client) for _ in range(4)))
    assert len({r.server_signer for r in results}) == 1
    bundle = await client.get(CONFIG_MAP, certs.SERVER_SIGNER_BUNDLE, certs.CDI_NAMESPACE)
    held = certs.load_certificates(bundle["data"][certs.BUNDLE_KEY].encode())
    assert len(held) == 2  # the new signer first, the old one kept until it expires
    assert held[0] == certs.load_certificate(results[0].server_signer.cert)


# --- with the real upload server ---------------------------------------------------------------


async def test_real_upload_server_receives_qcow2(node: Cluster, tmp_path: Path) -> None:
    client = node.client
    raw = patterned_raw(tmp_path / "disk.raw", 8 * MIB)
    image = convert(raw, tmp_path / "disk.qcow2", "qcow2")
    async with controllers(client, real_upload_server(tmp_path)):
        await client.create(DATA_VOLUME, upload_dv("real", size="16Mi"))
        await dv_in(client, "real", "UploadReady", within=READY_TIMEOUT)
        status, body = await upload(client, "real", image.read_bytes(), tmp_path)
        assert status == 200, body
        done = await dv_in(client, "real", "Succeeded", "Failed", within=READY_TIMEOUT)
        assert done["status"]["phase"] == "Succeeded", done["status"]
        assert same_image(raw, await disk_of(client, "real"))
        for resource, name in (
            (POD, "cdi-upload-real"),
            (SERVICE, "cdi-upload-real"),
            (SECRET, "cdi-upload-real"),
            (PERSISTENT_VOLUME_CLAIM, "real-scratch"),
        ):
            await eventually(
                lambda r=resource, n=name: gone(client, r, n),
                within=10.0,
                what=f"{resource.kind} {name} deleted after the upload",
            )
