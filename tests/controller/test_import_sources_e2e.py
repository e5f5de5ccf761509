"""DataVolume imports from every source we serve, end to end through the real stack: the
in-process API server, the local provisioner and node agent (worker pods as processes) and the
controllers (the `stack` fixture), against BadServer (http/https) and moto (s3).

Covers: http raw.xz; https with basic auth from a Secret and the CA from a ConfigMap; a correct
checksum; extraHeaders and secretExtraHeaders; s3 with a Secret; blank Filesystem and Block
volumes; archive content; the `spec.pvc` API next to the storage API's overhead inflation; qcow2
into a Block volume; an unsafe image and an image larger than its volume (Failed for good, nothing
left behind); a missing Secret (waits, then heals); twenty DataVolumes at once; and
WaitForFirstConsumer with a consumer pod or the bind-immediate annotation."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import shutil
import tarfile
from collections.abc import Awaitable, Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any, Final

import boto3
import botocore.config

from cdi.api import annotations as ann
from cdi.api import parse_size
from cdi.api.groups import (
    CDI_CONFIG,
    CDI_CONFIG_NAME,
    CONFIG_MAP,
    DATA_VOLUME,
    EVENT,
    PERSISTENT_VOLUME_CLAIM,
    POD,
    SECRET,
)
from cdi.api.space import parse_overhead, required_size
from cdi.controller.importing import MESSAGE_TOO_SMALL
from cdi.kube.client import Client
from cdi.kube.errors import NotFound
from tests.support.cluster import Cluster, eventually
from tests.support.dv import (
    IMPORT_TIMEOUT,
    NS,
    blank_dv,
    conditions,
    disk_of,
    dv_in,
    dv_manifest,
    http_dv,
    no_pods,
    pods,
    volume_of,
)
from tests.support.httpserver import BadServer, RecordedRequest
from tests.support.images import MIB, compress, convert, patterned_raw, run, same_image

Obj = dict[str, Any]

GONE_TIMEOUT: Final = 10.0
MANY_TIMEOUT: Final = 90.0


# --- helpers -------------------------------------------------------------------------------------


def _www(tmp_path: Path) -> Path:
    www = tmp_path / "www"
    www.mkdir()
    return www


def _qcow2_of(tmp_path: Path, www: Path, size: int = 4 * MIB, name: str = "disk") -> Path:
    """A patterned raw image (returned) and its qcow2 at `www/<name>.qcow2`."""
    raw = patterned_raw(tmp_path / f"{name}.raw", size)
    convert(raw, www / f"{name}.qcow2", "qcow2")
    return raw


async def _succeeded(client: Client, name: str, *, within: float = IMPORT_TIMEOUT) -> Obj:
    dv = await dv_in(client, name, "Succeeded", "Failed", within=within)
    assert dv["status"]["phase"] == "Succeeded", dv["status"]
    assert dv["status"]["progress"] == "100.0%", dv["status"]
    assert conditions(dv)["Ready"]["status"] == "True"
    return dv


async def _claims(client: Client) -> list[str]:
    items, _ = await client.list(PERSISTENT_VOLUME_CLAIM, NS)
    return sorted(str(c["metadata"]["name"]) for c in items)


def _volumes_on_disk(cluster: Cluster) -> set[str]:
    root = cluster.data_dir / "volumes"
    return {p.name for p in root.iterdir()} if root.is_dir() else set()


async def _create_secret(client: Client, name: str, data: Mapping[str, str]) -> None:
    await client.create(
        SECRET,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "namespace": NS},
            "type": "Opaque",
            "stringData": dict(data),
        },
        NS,
    )


async def _wait_gone(client: Client, what: str) -> None:
    await eventually(lambda: no_pods(client), within=GONE_TIMEOUT, what=what)


async def _only_target_left(cluster: Cluster, name: str) -> None:
    """After a failure: no pods, no scratch or other claims, one volume on disk, and it is empty
    (a Filesystem target holds no half-written disk.img)."""
    client = cluster.client
    await _wait_gone(client, f"importer pod of {name} deleted")

    async def claims_settled() -> bool:
        return await _claims(client) == [name]

    await eventually(claims_settled, within=GONE_TIMEOUT, what=f"only the PVC {name} left")
    volume = await volume_of(client, name)

    async def one_volume() -> bool:
        return _volumes_on_disk(cluster) == {volume.name}

    await eventually(one_volume, within=GONE_TIMEOUT, what="only the target volume on disk")
    assert volume.is_dir()
    assert sorted(p.name for p in volume.iterdir()) == []


async def _stays_failed(client: Client, name: str) -> None:
    await asyncio.sleep(1.5)
    assert await pods(client) == []
    again = await client.get(DATA_VOLUME, name, NS)
    assert again["status"]["phase"] == "Failed", again["status"]


async def _event_reasons(client: Client, name: str) -> set[str]:
    events, _ = await client.list(EVENT, NS)
    return {str(e["reason"]) for e in events if e["involvedObject"]["name"] == name}


def _ca_config_map(name: str, ca_file: Path) -> Obj:
    """A ConfigMap holding one CA certificate, as a DataVolume's certConfigMap names it."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": NS},
        "data": {"ca.pem": ca_file.read_text()},
    }


def _reads_zeros(path: Path) -> bool:
    with path.open("rb") as f:
        while chunk := f.read(MIB):
            if chunk.count(0) != len(chunk):
                return False
    return True


# --- sources that succeed ------------------------------------------------------------------------


async def test_http_raw_xz(stack: Cluster, tmp_path: Path) -> None:
    client = stack.client
    www = _www(tmp_path)
    raw = patterned_raw(tmp_path / "disk.raw", 4 * MIB)
    copy = shutil.copy(raw, www / "disk.raw")
    xz = compress(Path(copy), "xz")
    with BadServer(www) as server:
        await client.create(DATA_VOLUME, http_dv("xz", server.url("/" + xz.name)))
        await _succeeded(client, "xz")
    assert same_image(raw, await disk_of(client, "xz"))
    await _wait_gone(client, "importer pod deleted after success")
    assert await _claims(client) == ["xz"]


async def test_https_basic_auth_with_secret_and_ca_config_map(
    stack: Cluster, tmp_path: Path
) -> None:
    client = stack.client
    www = _www(tmp_path)
    raw = _qcow2_of(tmp_path, www)
    with BadServer(www, tls=True) as server:
        assert server.ca_file is not None
        server.behave("/disk.qcow2", basic_auth=("alice", "s3cret"))
        await _create_secret(client, "web-creds", {"accessKeyId": "alice", "secretKey": "s3cret"})
        await client.create(CONFIG_MAP, _ca_config_map("web-ca", Path(server.ca_file)), NS)
        await client.create(
            DATA_VOLUME,
            http_dv(
                "tls",
                server.url("/disk.qcow2"),
                secretRef="web-creds",
                certConfigMap="web-ca",
            ),
        )
        await _succeeded(client, "tls")
        seen = server.requests_for("/disk.qcow2")
    assert same_image(raw, await disk_of(client, "tls"))
    expected = "Basic " + base64.b64encode(b"alice:s3cret").decode()
    assert seen, "the server saw no request"
    authorized = [r for r in seen if r.headers.get("Authorization") == expected]
    assert authorized, [dict(r.headers) for r in seen]
    # Every data request carried the credentials (an unauthenticated one would have been a 401).
    assert all(r.headers.get("Authorization") == expected for r in seen if r.method == "GET")


async def test_http_correct_checksum(stack: Cluster, tmp_path: Path) -> None:
    client = stack.client
    www = _www(tmp_path)
    raw = _qcow2_of(tmp_path, www)
    # The checksum covers the bytes as served (here: gzip of the qcow2), not the guest content.
    served = compress(www / "disk.qcow2", "gzip")
    digest = "sha256:" + hashlib.sha256(served.read_bytes()).hexdigest()
    with BadServer(www) as server:
        await client.create(
            DATA_VOLUME, http_dv("summed", server.url("/" + served.name), checksum=digest)
        )
        await _succeeded(client, "summed")
    assert same_image(raw, await disk_of(client, "summed"))
    await _wait_gone(client, "importer pod deleted after success")

    async def scratch_gone() -> bool:
        return await _claims(client) == ["summed"]

    await eventually(scratch_gone, within=GONE_TIMEOUT, what="scratch PVC deleted")


async def _import_with_headers(
    cluster: Cluster, tmp_path: Path, name: str, **headers: Any
) -> list[RecordedRequest]:
    """Import through BadServer with these header settings; the requests it saw."""
    client = cluster.client
    www = _www(tmp_path)
    raw = _qcow2_of(tmp_path, www)
    with BadServer(www) as server:
        await client.create(DATA_VOLUME, http_dv(name, server.url("/disk.qcow2"), **headers))
        await _succeeded(client, name)
        seen = server.requests_for("/disk.qcow2")
    assert same_image(raw, await disk_of(client, name))
    assert seen, "the server saw no request"
    return seen


async def test_extra_headers(stack: Cluster, tmp_path: Path) -> None:
    seen = await _import_with_headers(
        stack, tmp_path, "headers", extraHeaders=["X-Custom: one", "X-Other: two"]
    )
    for request in seen:
        assert request.headers.get("X-Custom") == "one", dict(request.headers)
        assert request.headers.get("X-Other") == "two", dict(request.headers)


async def test_secret_extra_headers(stack: Cluster, tmp_path: Path) -> None:
    await _create_secret(stack.client, "header-secret", {"token": "X-Token: abc"})
    seen = await _import_with_headers(
        stack,
        tmp_path,
        "secret-headers",
        extraHeaders=["X-Custom: one"],
        secretExtraHeaders=["header-secret"],
    )
    for request in seen:
        assert request.headers.get("X-Custom") == "one", dict(request.headers)
        assert request.headers.get("X-Token") == "abc", dict(request.headers)


async def test_s3_with_secret(stack: Cluster, tmp_path: Path, moto_endpoint: str) -> None:
    client = stack.client
    raw = patterned_raw(tmp_path / "disk.raw", 4 * MIB)
    qcow2 = convert(raw, tmp_path / "disk.qcow2", "qcow2")
    s3 = boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=botocore.config.Config(s3={"addressing_style": "path"}),
    )
    try:
        s3.create_bucket(Bucket="e2e-bucket")
        s3.upload_file(str(qcow2), "e2e-bucket", "vm/disk.qcow2")
    finally:
        s3.close()
    await _create_secret(client, "s3-creds", {"accessKeyId": "testing", "secretKey": "testing"})
    await client.create(
        DATA_VOLUME,
        dv_manifest(
            "bucket",
            {"s3": {"url": f"{moto_endpoint}/e2e-bucket/vm/disk.qcow2", "secretRef": "s3-creds"}},
        ),
    )
    await _succeeded(client, "bucket")
    assert same_image(raw, await disk_of(client, "bucket"))
    pvc = await client.get(PERSISTENT_VOLUME_CLAIM, "bucket", NS)
    assert pvc["metadata"]["annotations"][ann.IMPORT_SOURCE] == "s3"


async def test_blank_filesystem_and_block(stack: Cluster) -> None:
    client = stack.client
    await client.create(DATA_VOLUME, blank_dv("blank-fs"))
    await client.create(DATA_VOLUME, blank_dv("blank-block", volumeMode="Block"))
    await _succeeded(client, "blank-fs")
    await _succeeded(client, "blank-block")

    fs_disk = await disk_of(client, "blank-fs")
    assert fs_disk.name == "disk.img"
    # The 8Mi request was inflated for the overhead; the image gets the usable part back.
    assert fs_disk.stat().st_size == 8 * MIB
    assert _reads_zeros(fs_disk)

    block = await volume_of(client, "blank-block")
    assert block.is_file()
    assert block.stat().st_size == 8 * MIB  # Block volumes are not inflated
    assert _reads_zeros(block)
    pvc = await client.get(PERSISTENT_VOLUME_CLAIM, "blank-block", NS)
    assert pvc["spec"]["volumeMode"] == "Block"
    assert parse_size(str(pvc["spec"]["resources"]["requests"]["storage"])) == 8 * MIB
    await _wait_gone(client, "importer pods deleted")


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes | None) -> None:
    info = tarfile.TarInfo(name)
    if data is None:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tar.addfile(info)
        return
    info.mode = 0o644
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


async def test_archive_content_is_extracted(stack: Cluster, tmp_path: Path) -> None:
    client = stack.client
    www = _www(tmp_path)
    files = {
        "readme.txt": b"hello from the archive\n",
        "sub/data.bin": bytes(range(256)) * 4096,
        "sub/deeper/note.txt": b"nested\n",
    }
    with tarfile.open(www / "content.tar", "w") as tar:
        _tar_member(tar, "sub", None)
        _tar_member(tar, "sub/deeper", None)
        for name, data in files.items():
            _tar_member(tar, name, data)
    with BadServer(www) as server:
        manifest = http_dv("files", server.url("/content.tar"))
        manifest["spec"]["contentType"] = "archive"
        await client.create(DATA_VOLUME, manifest)
        await _succeeded(client, "files")
    volume = await volume_of(client, "files")
    for name, data in files.items():
        assert (volume / name).read_bytes() == data, name
    assert (volume / "sub").is_dir()
    assert not (volume / "disk.img").exists()
    pvc = await client.get(PERSISTENT_VOLUME_CLAIM, "files", NS)
    assert pvc["metadata"]["annotations"][ann.CONTENT_TYPE] == "archive"
    assert pvc["spec"]["volumeMode"] == "Filesystem"


async def _filesystem_overhead(client: Client, class_name: str) -> Fraction:
    async def status() -> Obj | None:
        try:
            config = await client.get(CDI_CONFIG, CDI_CONFIG_NAME)
        except NotFound:
            return None
        return dict(config.get("status") or {}) or None

    overhead = (await eventually(status, what="CDIConfig status"))["filesystemOverhead"]
    per_class = overhead.get("storageClass") or {}
    return parse_overhead(str(per_class.get(class_name, overhead["global"])))


async def test_pvc_api_is_verbatim_and_storage_api_is_inflated(
    stack: Cluster, tmp_path: Path
) -> None:
    client = stack.client
    www = _www(tmp_path)
    raw = _qcow2_of(tmp_path, www)
    with BadServer(www) as server:
        verbatim = dv_manifest("exact", {"http": {"url": server.url("/disk.qcow2")}}, size=None)
        del verbatim["spec"]["storage"]
        verbatim["spec"]["pvc"] = {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "10Mi"}},
        }
        await client.create(DATA_VOLUME, verbatim)
        await client.create(DATA_VOLUME, blank_dv("inflated", size="10Mi"))
        await _succeeded(client, "exact")
        await _succeeded(client, "inflated")
    assert same_image(raw, await disk_of(client, "exact"))
    exact = await client.get(PERSISTENT_VOLUME_CLAIM, "exact", NS)
    assert exact["spec"]["resources"]["requests"]["storage"] == "10Mi"
    assert exact["spec"]["accessModes"] == ["ReadWriteOnce"]

    inflated = await client.get(PERSISTENT_VOLUME_CLAIM, "inflated", NS)
    class_name = str(inflated["spec"]["storageClassName"])
    overhead = await _filesystem_overhead(client, class_name)
    assert overhead > 0
    requested = parse_size(str(inflated["spec"]["resources"]["requests"]["storage"]))
    assert requested == required_size(10 * MIB, overhead)
    assert requested > 10 * MIB


async def test_http_qcow2_into_block(stack: Cluster, tmp_path: Path) -> None:
    client = stack.client
    www = _www(tmp_path)
    raw = _qcow2_of(tmp_path, www, 6 * MIB + 4096)
    with BadServer(www) as server:
        await client.create(
            DATA_VOLUME,
            dv_manifest(
                "blockdisk",
                {"http": {"url": server.url("/disk.qcow2")}},
                size="16Mi",
                storage={"volumeMode": "Block"},
            ),
        )
        await _succeeded(client, "blockdisk")
    device = await disk_of(client, "blockdisk")
    assert device.is_file()
    assert device.stat().st_size == 16 * MIB
    assert same_image(raw, device)


# --- failures ------------------------------------------------------------------------------------


async def test_unsafe_image_fails_for_good(stack: Cluster, tmp_path: Path) -> None:
    client = stack.client
    www = _www(tmp_path)
    secret = tmp_path / "secret.raw"
    secret.write_bytes(b"TOP-SECRET" * 100_000)
    # A qcow2 whose backing file is a file of this machine: reading it would leak that file.
    run(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        str(secret),
        "-F",
        "raw",
        str(www / "backed.qcow2"),
    )
    with BadServer(www) as server:
        await client.create(DATA_VOLUME, http_dv("unsafe", server.url("/backed.qcow2")))
        dv = await dv_in(client, "unsafe", "Failed", "Succeeded")
        assert dv["status"]["phase"] == "Failed", dv["status"]
        running = conditions(dv)["Running"]
        assert "refusing unsafe" in running["message"], running
        assert "backing file" in running["message"].lower(), running
        assert conditions(dv)["Ready"]["status"] == "False"
        await _only_target_left(stack, "unsafe")
        await _stays_failed(client, "unsafe")
    assert "ErrImportFailed" in await _event_reasons(client, "unsafe")
    pvc = await client.get(PERSISTENT_VOLUME_CLAIM, "unsafe", NS)
    assert pvc["metadata"]["annotations"][ann.FATAL_ERROR] == "true"


async def test_image_larger_than_volume_fails_for_good(stack: Cluster, tmp_path: Path) -> None:
    client = stack.client
    www = _www(tmp_path)
    run("qemu-img", "create", "-q", "-f", "qcow2", str(www / "huge.qcow2"), "256M")

    def says_too_large(message: str) -> bool:
        return (
            "A larger PVC is required" in message
            or str(256 * MIB) in message
            or message == MESSAGE_TOO_SMALL
        )

    with BadServer(www) as server:
        await client.create(DATA_VOLUME, http_dv("small", server.url("/huge.qcow2"), size="64Mi"))

        async def refused() -> Obj | None:
            dv = await client.get(DATA_VOLUME, "small", NS)
            if not (dv.get("status") or {}).get("conditions"):
                return None
            return dv if says_too_large(conditions(dv)["Running"]["message"]) else None

        # The importer's refusal reaches the DataVolume; the phase must follow at once.
        await eventually(refused, within=IMPORT_TIMEOUT, what="the size refusal reported")
        dv = await dv_in(client, "small", "Failed", "Succeeded", within=5.0)
        assert dv["status"]["phase"] == "Failed", dv["status"]
        assert says_too_large(conditions(dv)["Running"]["message"]), conditions(dv)
        await _only_target_left(stack, "small")
        await _stays_failed(client, "small")
    assert "ErrImportFailed" in await _event_reasons(client, "small")


async def test_missing_secret_waits_then_heals(stack: Cluster, tmp_path: Path) -> None:
    client = stack.client
    www = _www(tmp_path)
    raw = _qcow2_of(tmp_path, www)
    with BadServer(www) as server:
        await client.create(
            DATA_VOLUME, http_dv("needs-secret", server.url("/disk.qcow2"), secretRef="nope")
        )

        async def waiting() -> Obj | None:
            dv = await client.get(DATA_VOLUME, "needs-secret", NS)
            if not (dv.get("status") or {}).get("conditions"):
                return None
            message = conditions(dv)["Running"]["message"]
            return dv if 'secret "nope" not found' in message else None

        dv = await eventually(waiting, within=IMPORT_TIMEOUT, what="the missing secret reported")
        assert dv["status"]["phase"] == "ImportScheduled", dv["status"]
        assert conditions(dv)["Running"]["reason"] == "CreateContainerConfigError"
        await asyncio.sleep(1.0)
        still = await client.get(DATA_VOLUME, "needs-secret", NS)
        assert still["status"]["phase"] == "ImportScheduled", still["status"]
        assert server.requests_for("/disk.qcow2") == []
        await _create_secret(client, "nope", {"accessKeyId": "any", "secretKey": "thing"})
        await _succeeded(client, "needs-secret")
    assert same_image(raw, await disk_of(client, "needs-secret"))
    await _wait_gone(client, "importer pod deleted after success")


# --- many at once --------------------------------------------------------------------------------


async def _spy_pods(client: Client, seen: dict[str, set[tuple[str, str]]]) -> None:
    """Record (name, uid) of every pod seen, per owning claim, until cancelled."""
    while True:
        items, _ = await client.list(POD, NS)
        for pod in items:
            meta = pod["metadata"]
            claim = next(
                (
                    str(v["persistentVolumeClaim"]["claimName"])
                    for v in pod["spec"].get("volumes") or []
                    if "persistentVolumeClaim" in v
                ),
                "",
            )
            seen.setdefault(claim, set()).add((str(meta["name"]), str(meta["uid"])))
        await asyncio.sleep(0.05)


async def test_twenty_datavolumes_at_once(stack: Cluster, tmp_path: Path) -> None:
    client = stack.client
    www = _www(tmp_path)
    raws: dict[str, Path] = {}
    for i in range(15):
        raw = tmp_path / f"disk{i}.raw"
        # Distinct content per image, so that a mix-up between volumes shows.
        patterned_raw(raw, 2 * MIB + i * 4096)
        convert(raw, www / f"disk{i}.qcow2", "qcow2")
        raws[f"many-http-{i}"] = raw
    blanks = [f"many-blank-{i}" for i in range(5)]
    seen: dict[str, set[tuple[str, str]]] = {}
    with BadServer(www) as server:
        spy = asyncio.create_task(_spy_pods(client, seen))
        try:
            creates: list[Awaitable[Obj]] = [
                client.create(DATA_VOLUME, http_dv(name, server.url(f"/disk{i}.qcow2")))
                for i, name in enumerate(raws)
            ]
            creates += [client.create(DATA_VOLUME, blank_dv(name)) for name in blanks]
            await asyncio.gather(*creates)
            for name in [*raws, *blanks]:
                await _succeeded(client, name, within=MANY_TIMEOUT)
            await _wait_gone(client, "every importer pod deleted")
        finally:
            spy.cancel()
    for name, raw in raws.items():
        assert same_image(raw, await disk_of(client, name)), name
    for name in blanks:
        assert _reads_zeros(await disk_of(client, name)), name
    for name in [*raws, *blanks]:
        names = {pod_name for pod_name, _ in seen.get(name, set())}
        assert names == {f"importer-{name}"}, (name, seen.get(name))
        assert len(seen[name]) == 1, (name, seen[name])
    assert set(seen) == {*raws, *blanks}, sorted(seen)
    assert await _claims(client) == sorted([*raws, *blanks])


# --- WaitForFirstConsumer ------------------------------------------------------------------------


def _consumer_pod(name: str, claim: str) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "consumer",
                    "image": "busybox",
                    "command": ["sleep", "30"],
                    "volumeMounts": [{"name": "disk", "mountPath": "/disk"}],
                }
            ],
            "volumes": [{"name": "disk", "persistentVolumeClaim": {"claimName": claim}}],
        },
    }


async def test_wffc_binds_for_a_consumer_pod(stack: Cluster) -> None:
    client = stack.client
    manifest = blank_dv("later", storageClassName="local-wffc")
    await client.create(DATA_VOLUME, manifest)
    dv = await dv_in(client, "later", "WaitForFirstConsumer", within=10.0)
    assert conditions(dv)["Bound"]["status"] == "False"
    pvc = await client.get(PERSISTENT_VOLUME_CLAIM, "later", NS)
    assert (pvc.get("status") or {}).get("phase") == "Pending"
    assert await pods(client) == []
    await client.create(POD, _consumer_pod("consumer", "later"), NS)
    await _succeeded(client, "later")
    pvc = await client.get(PERSISTENT_VOLUME_CLAIM, "later", NS)
    assert pvc["status"]["phase"] == "Bound"
    assert _reads_zeros(await disk_of(client, "later"))
    await client.delete(POD, "consumer", NS)
    await _wait_gone(client, "consumer and importer pods gone")


async def test_wffc_with_bind_immediate_annotation(stack: Cluster) -> None:
    client = stack.client
    manifest = blank_dv("now", storageClassName="local-wffc")
    manifest["metadata"]["annotations"] = {ann.BIND_IMMEDIATE_REQUESTED: ""}
    await client.create(DATA_VOLUME, manifest)
    await _succeeded(client, "now")
    pvc = await client.get(PERSISTENT_VOLUME_CLAIM, "now", NS)
    assert pvc["spec"]["storageClassName"] == "local-wffc"
    assert pvc["status"]["phase"] == "Bound"
    await _wait_gone(client, "importer pod deleted")
