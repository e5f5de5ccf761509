"""The upload server (`python -m importer.uploadserver`) end to end: real server process, real
images made by qemu-img, real TLS certificates, plain sockets where a client must misbehave."""

from __future__ import annotations

import datetime
import http.client
import io
import ipaddress
import json
import os
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cdi.api import ContentType
from cdi.api.tokens import UPLOAD_CLIENT_NAME
from importer.errors import SettingsError
from importer.upload.server import UploadServer
from importer.upload.settings import UploadSettings
from tests.support.images import MIB, compress, convert, patterned_raw, same_image

START_TIMEOUT = 15.0
EXIT_TIMEOUT = 60.0
VOLUME = "32Mi"


# --- the server process --------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    text: str


class Server:
    """One upload server process in a sandbox: vol/ (data dir), scratch/, term, log."""

    def __init__(self, root: Path, *, scratch: bool = True) -> None:
        self.root = root
        self.vol = root / "vol"
        self.scratch = root / "scratch"
        self.term = root / "term"
        self.log = root / "server.log"
        self.vol.mkdir(parents=True)
        if scratch:
            self.scratch.mkdir()
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.pid = 0  # the server's own, which differs from proc.pid under strace
        self.tls: ssl.SSLContext | None = None

    @property
    def disk(self) -> Path:
        return self.vol / "disk.img"

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/root"),
            "CDI_DATA_DIR": str(self.vol),
            "CDI_SCRATCH_DIR": str(self.scratch),
            "CDI_TERMINATION_LOG": str(self.term),
            "CDI_BLOCK_DEVICE": str(self.root / "no-block-device"),
            "CDI_LOG_LEVEL": "DEBUG",
            "LISTEN_ADDRESS": "127.0.0.1",
            "LISTEN_PORT": "0",
            "UPLOAD_INSECURE": "true",
            "UPLOAD_IMAGE_SIZE": VOLUME,
            **extra,
        }

    def start(self, *, wrap: tuple[str, ...] = (), tls: ssl.SSLContext | None = None, **env: str):
        self.tls = tls
        with self.log.open("wb") as log, open(os.devnull, "wb") as out:
            self.proc = subprocess.Popen(
                [*wrap, sys.executable, "-m", "importer.uploadserver"],
                env=self.env(**env),
                stdout=out,
                stderr=log,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            m = re.search(
                rb"serving addr=\w+://127\.0\.0\.1:(\d+) pid=(\d+)", self.log.read_bytes()
            )
            if m:
                self.port, self.pid = int(m[1]), int(m[2])
                break
            assert self.proc.poll() is None, self.log.read_text()
            time.sleep(0.02)
        else:
            raise AssertionError(f"the server did not start:\n{self.log.read_text()}")
        while time.monotonic() < deadline:
            try:
                if self.request("GET", "/healthz").status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.02)
        raise AssertionError(f"/healthz never answered:\n{self.log.read_text()}")

    def connection(self, context: ssl.SSLContext | None = None) -> http.client.HTTPConnection:
        ctx = context or self.tls
        if ctx is not None:
            return http.client.HTTPSConnection("127.0.0.1", self.port, timeout=60, context=ctx)
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=60, blocksize=MIB)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | io.BufferedReader | None = None,
        headers: dict[str, str] | None = None,
        *,
        context: ssl.SSLContext | None = None,
    ) -> Reply:
        conn = self.connection(context)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            text = resp.read().decode(errors="replace")
            return Reply(resp.status, dict(resp.getheaders()), text)
        finally:
            conn.close()

    def upload(self, path: str, image: Path, method: str = "POST", **headers: str) -> Reply:
        with image.open("rb") as f:
            return self.request(
                method,
                path,
                body=f,
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Length": str(image.stat().st_size),
                    **headers,
                },
            )

    def raw_socket(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=30)

    def wait_exit(self, timeout: float = EXIT_TIMEOUT) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the server did not exit:\n{self.log.read_text()}") from None

    @property
    def message(self) -> dict[str, object]:
        doc: dict[str, object] = json.loads(self.term.read_text())
        return doc

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if self.pid and self.pid != self.proc.pid:
                os.kill(self.pid, signal.SIGTERM)  # strace follows its tracee out
            else:
                self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def entries(self) -> set[str]:
        skip = {"term", "server.log"}
        return {str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.name not in skip}


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        server.stop()


@pytest.fixture
def box(tmp_path: Path, servers: list[Server]) -> Server:
    server = Server(tmp_path / "box")
    servers.append(server)
    return server


def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# --- images --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("images")
    base = patterned_raw(d / "base.raw", 8 * MIB)
    return {
        "base": base,
        "raw": base,
        "raw.gz": compress(base, "gzip"),
        "raw.xz": compress(base, "xz"),
        "raw.zst": compress(base, "zstd"),
        "qcow2": convert(base, d / "img.qcow2", "qcow2"),
        "vmdk": convert(base, d / "img.vmdk", "vmdk"),
    }


FORMATS = ["raw", "raw.gz", "raw.xz", "raw.zst", "qcow2", "vmdk"]
COMPLETE = {"message": "Upload Complete", "preallocationApplied": False}


def multipart(data: bytes, field: str = "file", extra: bytes = b"") -> tuple[bytes, str]:
    boundary = "cdi-upload-test-boundary"
    body = (
        (
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="note"\r\n\r\n'
            "an extra field first\r\n"
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="{field}"; filename="disk"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + extra
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def assert_uploaded(box: Server, base: Path) -> None:
    assert box.wait_exit() == 0, box.log.read_text()
    assert box.message == COMPLETE
    assert same_image(base, box.disk)
    assert box.disk.stat().st_size == 32 * MIB  # grown to the volume
    assert box.entries() == {"vol", "vol/disk.img", "scratch"}  # scratch and staging cleaned


# --- every format, every mode --------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_sync_upload(box: Server, images: dict[str, Path], fmt: str) -> None:
    box.start()
    reply = box.upload("/v1beta1/upload", images[fmt])
    assert (reply.status, reply.text) == (200, "Upload Complete")
    assert box.message == COMPLETE  # written before the answer
    assert_uploaded(box, images["base"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_async_upload(box: Server, images: dict[str, Path], fmt: str) -> None:
    box.start()
    assert box.request("HEAD", "/v1beta1/upload-async").status == 200
    reply = box.upload("/v1beta1/upload-async", images[fmt])
    assert reply.status == 200, reply.text
    assert_uploaded(box, images["base"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_form_upload(box: Server, images: dict[str, Path], fmt: str) -> None:
    box.start()
    # The field may come after others; the sync and async form paths, beta and alpha.
    path = "/v1beta1/upload-form" if fmt.startswith("raw") else "/v1alpha1/upload-form-async"
    body, ctype = multipart(images[fmt].read_bytes())
    reply = box.request("POST", path, body=body, headers={"Content-Type": ctype})
    assert reply.status == 200, reply.text
    assert_uploaded(box, images["base"])


def test_alpha_sync_path_and_preallocation(box: Server, images: dict[str, Path]) -> None:
    box.start(PREALLOCATION="true")
    reply = box.upload("/v1alpha1/upload", images["raw.gz"])
    assert reply.status == 200, reply.text
    assert box.wait_exit() == 0
    assert box.message == {"message": "Upload Complete", "preallocationApplied": True}
    assert box.disk.stat().st_blocks * 512 >= 32 * MIB


def test_methods_and_paths(box: Server) -> None:
    box.start()
    for method, path in [
        ("GET", "/v1beta1/upload"),
        ("GET", "/v1beta1/upload-async"),
        ("HEAD", "/v1beta1/upload-form"),
        ("PUT", "/v1beta1/upload-form"),
        ("DELETE", "/v1alpha1/upload-archive"),
        ("GET", "/v1beta2/upload"),
    ]:
        assert box.request(method, path).status == 404, (method, path)
    for path in ("/v1beta1/upload-async", "/v1alpha1/upload-form-async", "/v1beta1/upload"):
        reply = box.request("HEAD", path)
        assert reply.status == 200
        assert reply.headers["Upload-Offset"] == "0"
    assert "kubevirt_cdi_import_progress_total" in box.request("GET", "/metrics").text
    assert box.running()


# --- targets -------------------------------------------------------------------------------------


def make_tar(path: Path, members: dict[str, bytes | None]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.mode = 0o644
            if data is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("wrapper", [None, "gzip"])
def test_archive_upload(box: Server, tmp_path: Path, wrapper: str | None) -> None:
    blob = os.urandom(300_000)
    tar = make_tar(
        tmp_path / "content.tar",
        {"a": None, "a/b": None, "a/b/deep.bin": blob, "a/note.txt": b"hi\n", "top.txt": b"x"},
    )
    if wrapper:
        tar = compress(tar, wrapper)
    box.start()
    reply = box.upload("/v1beta1/upload-archive", tar)
    assert reply.status == 200, reply.text
    assert box.wait_exit() == 0
    assert box.message == COMPLETE
    assert (box.vol / "a/b/deep.bin").read_bytes() == blob
    assert (box.vol / "a/note.txt").read_text() == "hi\n"
    assert not box.disk.exists()


def test_archive_path_traversal_is_refused(box: Server, tmp_path: Path) -> None:
    tar = make_tar(tmp_path / "evil.tar", {"fine.txt": b"ok", "../evil": b"gotcha"})
    box.start()
    reply = box.upload("/v1alpha1/upload-archive", tar)
    assert reply.status == 400
    assert "'../evil'" in reply.text and "refusing" in reply.text
    assert not (box.root / "evil").exists()
    assert not (tmp_path / "evil").exists()
    assert box.entries() == {"vol", "scratch"}  # what came before the bad member is gone too
    assert box.running()


@pytest.fixture
def device(tmp_path: Path) -> Path:
    """A file standing in for the Block volume, full of old data (0xff)."""
    path = tmp_path / "block-device"
    path.write_bytes(b"\xff" * (24 * MIB))
    return path


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_block_destination(box: Server, images: dict[str, Path], device: Path, fmt: str) -> None:
    box.start(DESTINATION=str(device))
    reply = box.upload("/v1beta1/upload", images[fmt])
    assert reply.status == 200, reply.text
    assert box.wait_exit() == 0
    assert box.message == COMPLETE
    data = device.read_bytes()
    assert data[: 8 * MIB] == images["base"].read_bytes()  # holes of the image zeroed too
    assert len(data) == 24 * MIB
    assert box.entries() == {"vol", "scratch"}


# --- TLS -----------------------------------------------------------------------------------------


@dataclass
class Pki:
    server_ca: Path
    server_cert: Path
    server_key: Path
    client_ca: Path
    client: tuple[Path, Path]
    wrong_cn: tuple[Path, Path]
    other_ca_client: tuple[Path, Path]


def _write(directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey):
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _cert(
    cn: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    *,
    ca: bool = False,
    ip: str | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ip:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False
        )
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")

    def ca(name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(name, key, ca=True)
        return cert, key, _write(d, name, cert, key)[0]

    server_ca, server_ca_key, server_ca_path = ca("server-ca")
    client_ca, client_ca_key, client_ca_path = ca("client-ca")
    other_ca, other_ca_key, _ = ca("other-ca")

    def leaf(name: str, cn: str, issuer, **kw):  # type: ignore[no-untyped-def]
        key = ec.generate_private_key(ec.SECP256R1())
        return _write(d, name, _cert(cn, key, issuer, **kw), key)

    server_cert, server_key = leaf(
        "server", "cdi-upload-test", (server_ca, server_ca_key), ip="127.0.0.1"
    )
    return Pki(
        server_ca=server_ca_path,
        server_cert=server_cert,
        server_key=server_key,
        client_ca=client_ca_path,
        client=leaf("client", UPLOAD_CLIENT_NAME, (client_ca, client_ca_key)),
        wrong_cn=leaf("wrong", "someone.else", (client_ca, client_ca_key)),
        other_ca_client=leaf("stranger", UPLOAD_CLIENT_NAME, (other_ca, other_ca_key)),
    )


def client_context(pki: Pki, cert: tuple[Path, Path] | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.server_ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    return ctx


def test_tls_client_certificate(box: Server, pki: Pki, images: dict[str, Path]) -> None:
    box.start(
        tls=client_context(pki, pki.client),
        UPLOAD_INSECURE="false",
        TLS_KEY_FILE=str(pki.server_key),
        TLS_CERT_FILE=str(pki.server_cert),
        CLIENT_CERT_FILE=str(pki.client_ca),
    )
    data = images["qcow2"].read_bytes()
    # No client certificate: the handshake works (the probe needs it), the upload does not.
    anonymous = client_context(pki, None)
    assert box.request("GET", "/healthz", context=anonymous).status == 200
    assert box.request("POST", "/v1beta1/upload", data, context=anonymous).status == 401
    assert box.request("HEAD", "/v1beta1/upload-async", context=anonymous).status == 401
    wrong = client_context(pki, pki.wrong_cn)
    assert box.request("POST", "/v1beta1/upload", data, context=wrong).status == 401
    # A certificate from a CA the server does not trust ends at the handshake.
    with pytest.raises((ssl.SSLError, ConnectionError)):
        box.request(
            "POST", "/v1beta1/upload", data, context=client_context(pki, pki.other_ca_client)
        )
    assert box.request("HEAD", "/v1beta1/upload-async").status == 200
    assert not box.disk.exists()
    reply = box.request("POST", "/v1beta1/upload-async", data)
    assert reply.status == 200, reply.text
    assert_uploaded(box, images["base"])


def test_insecure_mode_only_on_loopback(box: Server) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "importer.uploadserver"],
        env=box.env(LISTEN_ADDRESS="0.0.0.0"),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 1
    assert box.term.read_text().startswith("UPLOAD_INSECURE: ")
    assert "loopback" in box.term.read_text()


def test_help_documents_every_variable() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "importer.uploadserver", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    for name in [
        "TLS_KEY_FILE", "TLS_CERT_FILE", "CLIENT_CERT_FILE", "CLIENT_NAME", "UPLOAD_IMAGE_SIZE",
        "FILESYSTEM_OVERHEAD", "PREALLOCATION", "DESTINATION", "DEADLINE", "LISTEN_ADDRESS",
        "LISTEN_PORT", "UPLOAD_INSECURE", "CDI_DATA_DIR", "CDI_BLOCK_DEVICE", "CDI_SCRATCH_DIR",
        "CDI_TERMINATION_LOG",
    ]:  # fmt: skip
        assert name in out, name


# --- one upload at a time ------------------------------------------------------------------------


def test_concurrent_upload_is_refused_with_503(box: Server, images: dict[str, Path]) -> None:
    box.start()
    data = images["raw.xz"].read_bytes()
    half = len(data) // 2
    with box.raw_socket() as sock:
        sock.sendall(
            b"POST /v1beta1/upload HTTP/1.1\r\nHost: x\r\n"
            + f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data[:half]
        )
        wait_until(lambda: "upload start" in box.log.read_text())
        second = box.upload("/v1beta1/upload-async", images["raw"])
        assert (second.status, second.text) == (503, "upload already in progress")
        sock.sendall(data[half:])
        answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200"), answer
    assert_uploaded(box, images["base"])
    with pytest.raises(ConnectionError):  # CDI's server stops after success
        box.request("GET", "/healthz")


def test_sigterm_during_an_upload_exits_at_once(box: Server, images: dict[str, Path]) -> None:
    box.start()
    data = images["raw"].read_bytes()
    with box.raw_socket() as sock:
        sock.sendall(
            b"POST /v1beta1/upload HTTP/1.1\r\nHost: x\r\n"
            + f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data[: len(data) // 2]
        )
        wait_until(lambda: "upload start" in box.log.read_text())
        assert box.proc is not None
        box.proc.terminate()
        assert box.wait_exit(5) == 143
    assert not box.term.exists()  # nothing claimed


async def test_after_success_409(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process, so that the moment between success and exit can be held open."""
    vol = tmp_path / "vol"
    vol.mkdir()
    (tmp_path / "scratch").mkdir()
    term = tmp_path / "term"
    monkeypatch.setenv("CDI_TERMINATION_LOG", str(term))
    settings = UploadSettings.from_env(
        {
            "UPLOAD_INSECURE": "true",
            "LISTEN_ADDRESS": "127.0.0.1",
            "CDI_DATA_DIR": str(vol),
            "CDI_SCRATCH_DIR": str(tmp_path / "scratch"),
            "UPLOAD_IMAGE_SIZE": "8Mi",
        }
    )
    upload = UploadServer(settings)
    async with (
        TestServer(upload.app(), host="127.0.0.1") as server,
        aiohttp.ClientSession() as session,
    ):
        async with session.post(server.make_url("/v1beta1/upload"), data=b"\x01" * MIB) as r:
            assert r.status == 200, await r.text()
        assert upload.finished.done() and upload.finished.result() == 0
        for path in ("/v1beta1/upload", "/v1beta1/upload-async"):
            async with session.post(server.make_url(path), data=b"x") as r:
                assert (r.status, await r.text()) == (409, "upload already completed")
    assert json.loads(term.read_text()) == COMPLETE
    assert (vol / "disk.img").read_bytes()[:MIB] == b"\x01" * MIB


# --- refusals and failures -----------------------------------------------------------------------


def test_unsafe_image_is_refused_and_its_target_never_opened(box: Server, tmp_path: Path) -> None:
    secret = tmp_path / "secret.raw"
    secret.write_bytes(b"TOP-SECRET" * 100_000)
    image = tmp_path / "backed.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(secret), "-F", "raw", str(image)],
        check=True,
    )
    trace = tmp_path / "strace.log"
    box.start(
        wrap=("strace", "-f", "-qq", "-e", "trace=open,openat,openat2,execve", "-o", str(trace))
    )
    reply = box.upload("/v1beta1/upload", image)
    assert reply.status == 400
    assert reply.text.startswith("Saving stream failed: Unable to process data: refusing unsafe")
    assert "backing file" in reply.text
    assert not box.disk.exists()
    assert box.entries() == {"vol", "scratch"}
    assert not box.term.exists()
    assert box.running()
    box.stop()
    assert "execve(" in trace.read_text()  # the trace is real
    assert str(secret) not in trace.read_text(), "something opened the file the image points at"
    assert "qemu-img" not in trace.read_text(), "qemu-img ran on an image the inspector refused"


def test_image_larger_than_the_volume(box: Server, tmp_path: Path) -> None:
    big = patterned_raw(tmp_path / "big.raw", 64 * MIB)
    qcow2 = convert(big, tmp_path / "big.qcow2", "qcow2")
    packed = compress(big, "xz")  # the size shows only while writing
    box.start(UPLOAD_IMAGE_SIZE="16Mi", FILESYSTEM_OVERHEAD="0.06")
    for path, image in [
        ("/v1beta1/upload", qcow2),
        ("/v1beta1/upload-async", packed),
        ("/v1beta1/upload", big),
    ]:
        reply = box.upload(path, image)
        assert reply.status == 400, reply.text
        assert reply.text.startswith(
            "Saving stream failed: effective image size is larger than the reported available "
            "storage: "
        ), reply.text
        assert box.entries() == {"vol", "scratch"}
    assert box.running()
    assert not box.term.exists()


def test_truncated_body_fails_cleanly_and_a_retry_works(
    box: Server, images: dict[str, Path]
) -> None:
    box.start()
    for attempt, fmt in enumerate(("raw", "qcow2"), 1):
        data = images[fmt].read_bytes()
        with box.raw_socket() as sock:
            sock.sendall(
                b"POST /v1beta1/upload HTTP/1.1\r\nHost: x\r\n"
                + f"Content-Length: {len(data)}\r\n\r\n".encode()
                + data[: len(data) // 2]
            )
        # The failure is noticed, what was written removed, and the server takes uploads again.
        failures = attempt
        wait_until(lambda: box.log.read_text().count("upload failed") == failures)  # noqa: B023
        wait_until(lambda: box.entries() == {"vol", "scratch"})
        assert not box.term.exists()
        assert box.running()
    reply = box.upload("/v1beta1/upload", images["raw.zst"])
    assert reply.status == 200, reply.text
    assert_uploaded(box, images["base"])


def test_form_without_file_field(box: Server, images: dict[str, Path]) -> None:
    box.start()
    body, ctype = multipart(b"not an image", field="image")
    reply = box.request("POST", "/v1beta1/upload-form", body=body, headers={"Content-Type": ctype})
    assert reply.status == 400
    assert "no 'file' field" in reply.text
    reply = box.request("POST", "/v1beta1/upload-form", body=b"x", headers={"Content-Type": "x/y"})
    assert reply.status == 400
    body, ctype = multipart(images["qcow2"].read_bytes())
    reply = box.request("POST", "/v1beta1/upload-form", body=body, headers={"Content-Type": ctype})
    assert reply.status == 200, reply.text
    assert_uploaded(box, images["base"])


# --- resumable (ours) ----------------------------------------------------------------------------


def put(box: Server, path: str, data: bytes, start: int, total: int) -> Reply:
    end = start + len(data) - 1
    return box.request(
        "PUT", path, body=data, headers={"Content-Range": f"bytes {start}-{end}/{total}"}
    )


@pytest.mark.parametrize(
    ("fmt", "path"), [("qcow2", "/v1beta1/upload"), ("raw.gz", "/v1beta1/upload-async")]
)
def test_resumable_upload(box: Server, images: dict[str, Path], fmt: str, path: str) -> None:
    data = images[fmt].read_bytes()
    total = len(data)
    half = total // 2
    box.start()
    reply = put(box, path, data[:half], 0, total)
    assert reply.status == 200, reply.text
    assert reply.headers["Upload-Offset"] == str(half)
    # The second chunk is cut off after a quarter: what arrived is kept.
    quarter = total // 4
    with box.raw_socket() as sock:
        sock.sendall(
            f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {total - half}\r\n"
            f"Content-Range: bytes {half}-{total - 1}/{total}\r\n\r\n".encode()
            + data[half : half + quarter]
        )
    wait_until(lambda: "chunk cut" in box.log.read_text())
    head = box.request("HEAD", path)
    assert head.status == 200
    offset = int(head.headers["Upload-Offset"])
    assert offset == half + quarter  # everything that arrived, even what aiohttp had buffered
    assert head.headers["Upload-Length"] == str(total)
    # A chunk that does not start at the offset is refused, and says where to go on.
    wrong = put(box, path, data[:100], 0, total)
    assert wrong.status == 416
    assert wrong.headers["Upload-Offset"] == str(offset)
    assert not box.disk.exists()
    reply = put(box, path, data[offset:], offset, total)
    assert reply.status == 200, reply.text
    assert_uploaded(box, images["base"])


def test_resumable_refusals(box: Server) -> None:
    box.start()
    assert box.request("PUT", "/v1beta1/upload", body=b"abc").status == 400  # no Content-Range
    bad = box.request(
        "PUT", "/v1beta1/upload", body=b"abc", headers={"Content-Range": "bytes 0-9/5"}
    )
    assert bad.status == 400
    assert put(box, "/v1beta1/upload", b"abc", 3, 10).status == 416
    assert put(box, "/v1beta1/upload", b"abc", 0, 10).headers["Upload-Offset"] == "3"
    # A POST replaces a resumable upload that is under way.
    assert box.request("HEAD", "/v1beta1/upload").headers["Upload-Offset"] == "3"
    assert box.request("POST", "/v1beta1/upload", body=b"").status == 400  # empty: refused
    assert box.request("HEAD", "/v1beta1/upload").headers["Upload-Offset"] == "0"
    assert box.entries() == {"vol", "scratch"}


# --- deadline, memory ----------------------------------------------------------------------------


def test_deadline_passed_without_upload(box: Server) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "importer.uploadserver"],
        env=box.env(DEADLINE="2001-02-03T04:05:06Z"),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert box.message == {"message": "Deadline Passed", "deadlinePassed": True}


def test_deadline_during_serving(box: Server) -> None:
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=1.5)
    box.start(DEADLINE=soon.isoformat().replace("+00:00", "Z"))
    assert box.running()
    assert box.wait_exit(20) == 0
    assert box.message == {"message": "Deadline Passed", "deadlinePassed": True}


def test_memory_stays_bounded(box: Server, tmp_path: Path) -> None:
    size = 256 * MIB
    image = tmp_path / "big.raw"
    with image.open("wb") as f:
        block = bytes(range(256)) * 4096  # 1 MiB of data every 4 MiB, holes between
        for offset in range(0, size, 4 * MIB):
            f.seek(offset)
            f.write(block)
        f.truncate(size)
    box.start(UPLOAD_IMAGE_SIZE="300Mi")
    assert box.proc is not None
    status = Path(f"/proc/{box.proc.pid}/status")
    peaks: list[int] = []

    # VmHWM is the server's own peak since it started (after exec); wait4's ru_maxrss would
    # count the forked copy of this test process. Sampled until the server is gone.
    def sample() -> None:
        assert box.proc is not None
        while box.proc.poll() is None:
            try:
                m = re.search(r"VmHWM:\s+(\d+) kB", status.read_text())
            except OSError:
                break
            if m:
                peaks.append(int(m[1]) * 1024)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        reply = box.upload("/v1beta1/upload", image)
        assert reply.status == 200, reply.text
        assert box.wait_exit() == 0
    finally:
        sampler.join()
    assert len(peaks) > 10
    assert max(peaks) < 150 * MIB, f"VmHWM {max(peaks) / MIB:.0f} MiB"
    assert same_image(image, box.disk)


def corrupt_qcow2(path: Path) -> Path:
    """A qcow2 whose header and tables pass every check, with a data cluster pointer that is
    unaligned: qemu-img info is happy, the conversion fails reading it."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "8M"], check=True)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 64k", str(path)],
        check=True,
        capture_output=True,
    )
    data = bytearray(path.read_bytes())
    mask = 0x00FFFFFFFFFFFE00
    (l1_offset,) = struct.unpack(">Q", data[40:48])
    (l1_entry,) = struct.unpack(">Q", data[l1_offset : l1_offset + 8])
    l2_offset = l1_entry & mask
    (l2_entry,) = struct.unpack(">Q", data[l2_offset : l2_offset + 8])
    data[l2_offset : l2_offset + 8] = struct.pack(
        ">Q", (l2_entry & ~mask) | ((l2_entry & mask) + 512)
    )
    path.write_bytes(data)
    return path


def test_conversion_failure_after_async_answer(box: Server, tmp_path: Path) -> None:
    image = corrupt_qcow2(tmp_path / "corrupt.qcow2")
    box.start()
    reply = box.upload("/v1beta1/upload", image)  # sync: the server says so and stays
    assert reply.status == 500
    assert reply.text.startswith("Saving stream failed: Unable to process data: ")
    assert box.entries() == {"vol", "scratch"}
    reply = box.upload("/v1beta1/upload-async", image)  # async: answered, then exit 1
    assert reply.status == 200, reply.text
    assert box.wait_exit() == 1
    assert box.term.read_text().startswith("Unable to process data: ")
    assert "\n" not in box.term.read_text()
    assert box.entries() == {"vol", "scratch"}


# --- settings ------------------------------------------------------------------------------------


def settings_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "CDI_DATA_DIR": str(tmp_path),
        "CDI_SCRATCH_DIR": str(tmp_path / "scratch"),
        "CDI_BLOCK_DEVICE": str(tmp_path / "no-device"),
        "UPLOAD_INSECURE": "true",
        "LISTEN_ADDRESS": "127.0.0.1",
        **extra,
    }


def test_destination_decides_the_volume_mode(tmp_path: Path) -> None:
    device = tmp_path / "dev"
    device.write_bytes(bytes(MIB))
    other = tmp_path / "other"
    other.mkdir()
    for destination, block, path in [
        ("", False, tmp_path / "disk.img"),
        ("/data/disk.img", False, tmp_path / "disk.img"),
        (str(other / "disk.img"), False, other / "disk.img"),
        (str(device), True, device),
    ]:
        s = UploadSettings.from_env(settings_env(tmp_path, DESTINATION=destination))
        assert (s.is_block, s.destination) == (block, path), destination
        assert s.importer_settings(ContentType.KUBEVIRT).paths.disk_image == (
            path if not block else s.paths.disk_image
        )
    s = UploadSettings.from_env(
        settings_env(tmp_path, DESTINATION="/dev/cdi-block-volume", CDI_BLOCK_DEVICE=str(device))
    )
    assert (s.is_block, s.destination) == (True, device)


@pytest.mark.parametrize(
    ("variable", "value", "extra"),
    [
        ("DESTINATION", "/nowhere/device", {}),
        ("DESTINATION", "/nowhere/disk.img", {}),
        ("LISTEN_PORT", "70000", {}),
        ("DEADLINE", "tomorrow", {}),
        ("DEADLINE", "2030-01-01T00:00:00", {}),
        ("UPLOAD_IMAGE_SIZE", "ten gigs", {}),
        ("FILESYSTEM_OVERHEAD", "2", {}),
        ("PREALLOCATION", "maybe", {}),
        ("TLS_MIN_VERSION", "VersionSSL3", {}),
        ("TLS_KEY_FILE", "", {"UPLOAD_INSECURE": "false"}),
        ("UPLOAD_INSECURE", "true", {"LISTEN_ADDRESS": "10.0.0.1"}),
    ],
)
def test_bad_settings_name_the_variable(
    tmp_path: Path, variable: str, value: str, extra: dict[str, str]
) -> None:
    with pytest.raises(SettingsError) as raised:
        UploadSettings.from_env(settings_env(tmp_path, **{variable: value, **extra}))
    assert raised.value.variable == variable
