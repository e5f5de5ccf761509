"""Bad uploads through the real proxy and upload server of a whole `cdi server`: each gets its
clear error and leaves the target as it was (nothing wrong written, still ready for a good
upload). Tokens are minted with the server's own signing key where a test needs a token the
API would not issue (expired)."""

from __future__ import annotations

import base64
import http.client
import io
import os
import socket
import ssl
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Final

import pytest

from cdi.api import jwt
from tests.e2e.conftest import annotations_of, disk_path, get_json, volume_dir
from tests.support.cdiserver import CdiServer, poll
from tests.support.images import MIB, same_image

READY_TIMEOUT: Final = 60.0


@pytest.fixture(scope="module")
def full_server(quick_refusing_server: CdiServer) -> CdiServer:
    return quick_refusing_server


def _proxy(server: CdiServer) -> tuple[str, int]:
    for line in server.output:
        if "upload proxy at " in line:
            host, port = line.rsplit("://", 1)[1].strip().rsplit(":", 1)
            return host, int(port)
    raise AssertionError("no upload proxy URL in the server's output")


def _ctx(server: CdiServer) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(server.data_dir / "pki" / "ca.crt"))


def _ready_dv(
    server: CdiServer, ns: str, name: str, size: str = "16Mi", archive: bool = False
) -> None:
    content = ", contentType: archive" if archive else ""
    server.kubectl(
        "apply", "-n", ns, "-f", "-",
        input=(
            f"apiVersion: cdi.kubevirt.io/v1beta1\nkind: DataVolume\nmetadata: {{name: {name}}}\n"
            f"spec: {{source: {{upload: {{}}}}, storage: {{resources: {{requests: "
            f"{{storage: {size}}}}}}}{content}}}\n"
        ),
    )  # fmt: skip
    server.kubectl(
        "wait", f"dv/{name}", "-n", ns, "--for=jsonpath={.status.phase}=UploadReady",
        f"--timeout={int(READY_TIMEOUT)}s",
    )  # fmt: skip


def _token(server: CdiServer, ns: str, pvc: str) -> str:
    return server.kubectl(
        "create", "-n", ns, "-o", "jsonpath={.status.token}", "-f", "-",
        input=(
            "apiVersion: upload.cdi.kubevirt.io/v1beta1\nkind: UploadTokenRequest\n"
            f"metadata: {{name: t}}\nspec: {{pvcName: {pvc}}}\n"
        ),
    ).stdout  # fmt: skip


def _post(
    server: CdiServer,
    token: str | None,
    body: bytes,
    path: str = "/v1beta1/upload",
    content_type: str = "application/octet-stream",
) -> tuple[int, str]:
    host, port = _proxy(server)
    conn = http.client.HTTPSConnection(host, port, context=_ctx(server), timeout=120)
    headers = {"Content-Type": content_type}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


def _still_ready(server: CdiServer, ns: str, name: str) -> None:
    """The target took nothing: not Succeeded, and it accepts a good upload afterwards."""
    poll(
        lambda: (
            annotations_of(server, "pvc", name, ns).get("cdi.kubevirt.io/storage.pod.ready")
            == "true"
        ),
        timeout=READY_TIMEOUT,
        what=f"{name}'s upload server ready again",
    )
    phase = annotations_of(server, "pvc", name, ns).get("cdi.kubevirt.io/storage.pod.phase")
    assert phase != "Succeeded"


def _good_upload(server: CdiServer, ns: str, name: str, tmp_path: Path) -> None:
    raw = tmp_path / "good.raw"
    raw.write_bytes(os.urandom(MIB))
    status, text = _post(server, _token(server, ns, name), raw.read_bytes())
    assert status == 200, text
    poll(
        lambda: (
            annotations_of(server, "pvc", name, ns).get("cdi.kubevirt.io/storage.pod.phase")
            == "Succeeded"
        ),
        timeout=READY_TIMEOUT,
        what=f"{name} succeeded",
    )
    assert same_image(raw, disk_path(server, ns, name))


def test_expired_and_foreign_tokens(full_server: CdiServer, ns: str, tmp_path: Path) -> None:
    _ready_dv(full_server, ns, "target")
    secret = get_json(full_server, "secret", "cdi-api-signing-key", "-n", "cdi")
    key = base64.b64decode(secret["data"]["id_rsa"])
    expired = jwt.sign(key, jwt.upload_token_claims("target", ns, now=time.time() - 3600))
    status, text = _post(full_server, expired, b"x" * 1024)
    assert status == 401 and "expired" in text, (status, text)
    # A token for a PVC of the same name in another namespace reaches only that namespace.
    other = jwt.sign(key, jwt.upload_token_claims("target", "default", now=time.time()))
    status, text = _post(full_server, other, b"x" * 1024)
    assert status == 503 and "target" in text, (status, text)
    status, _ = _post(full_server, "not.a.jwt", b"x")
    assert status == 401
    _still_ready(full_server, ns, "target")
    _good_upload(full_server, ns, "target", tmp_path)


def test_not_an_upload_target(full_server: CdiServer, ns: str) -> None:
    full_server.kubectl(
        "apply", "-n", ns, "-f", "-",
        input=(
            "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: plain}\n"
            "spec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 8Mi}}}\n"
        ),
    )  # fmt: skip
    status, text = _post(full_server, _token(full_server, ns, "plain"), b"x" * 1024)
    assert status == 503 and "not an upload target" in text, (status, text)


def test_unsafe_and_too_large_images(full_server: CdiServer, ns: str, tmp_path: Path) -> None:
    _ready_dv(full_server, ns, "careful")
    secret_file = tmp_path / "host-secret"
    secret_file.write_bytes(b"TOP-SECRET" * 1000)
    unsafe = tmp_path / "unsafe.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(secret_file), "-F", "raw",
         str(unsafe), "1M"],
        check=True,
    )  # fmt: skip
    status, text = _post(full_server, _token(full_server, ns, "careful"), unsafe.read_bytes())
    assert status == 400 and "backing" in text.lower(), (status, text)
    _still_ready(full_server, ns, "careful")
    assert b"TOP-SECRET" not in _volume_bytes(full_server, ns, "careful")
    huge = tmp_path / "huge.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(huge), "1G"], check=True)
    status, text = _post(full_server, _token(full_server, ns, "careful"), huge.read_bytes())
    assert status == 400 and "larger than the reported available storage" in text, text
    _still_ready(full_server, ns, "careful")


def _volume_bytes(server: CdiServer, ns: str, name: str) -> bytes:
    volume = volume_dir(server, ns, name)
    files = [volume] if volume.is_file() else [p for p in volume.rglob("*") if p.is_file()]
    return b"".join(p.read_bytes() for p in files)


def test_truncated_body_and_concurrent_uploads(
    full_server: CdiServer, ns: str, tmp_path: Path
) -> None:
    _ready_dv(full_server, ns, "cut")
    token = _token(full_server, ns, "cut")
    host, port = _proxy(full_server)
    # Content-Length says 4 MiB; 1 MiB arrives, then the client goes away.
    raw = socket.create_connection((host, port))
    tls = _ctx(full_server).wrap_socket(raw, server_hostname=host)
    tls.sendall(
        (
            f"POST /v1beta1/upload HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {token}\r\nContent-Length: {4 * MIB}\r\n\r\n"
        ).encode()
    )
    tls.sendall(os.urandom(MIB))
    # While that upload is open, a second one is refused.
    time.sleep(1.0)
    status, text = _post(full_server, _token(full_server, ns, "cut"), b"y" * 1024)
    assert status == 503 and "in progress" in text, (status, text)
    tls.close()
    _still_ready(full_server, ns, "cut")
    _good_upload(full_server, ns, "cut", tmp_path)
    # Finished: a further upload is refused and the data stays.
    status, text = _post(full_server, _token(full_server, ns, "cut"), b"z" * 1024)
    assert status == 503 and "already finished" in text, (status, text)


def test_form_without_file_and_archive_traversal(
    full_server: CdiServer, ns: str, tmp_path: Path
) -> None:
    _ready_dv(full_server, ns, "formed")
    boundary = "xyzzy"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="other"\r\n\r\nhello\r\n'
        f"--{boundary}--\r\n"
    ).encode()
    status, text = _post(
        full_server,
        _token(full_server, ns, "formed"),
        body,
        path="/v1beta1/upload-form",
        content_type=f"multipart/form-data; boundary={boundary}",
    )
    assert status == 400 and "file" in text, (status, text)
    _still_ready(full_server, ns, "formed")

    _ready_dv(full_server, ns, "tarred", archive=True)
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w") as tar:
        info = tarfile.TarInfo("../evil.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    status, text = _post(full_server, _token(full_server, ns, "tarred"), evil.getvalue())
    assert status == 400, (status, text)
    volume = volume_dir(full_server, ns, "tarred")
    assert not (volume.parent / "evil.txt").exists()
    assert not list(volume.iterdir())
    _still_ready(full_server, ns, "tarred")
