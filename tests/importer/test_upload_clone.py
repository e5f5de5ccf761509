"""Host-assisted clone end to end: the real `cdi-cloner` process streaming to the real
`cdi-uploadserver` process, with real certificates (cdi.controller.certs), sources made with
truncate/os.pwrite in tmp dirs, targets checked with cmp-like reads and `qemu-img compare`, and
hand-made streams over plain sockets where a client must misbehave."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from cdi.api.tokens import UPLOAD_CLIENT_NAME
from cdi.controller.certs import KeyPair, create_ca, issue_client_cert, issue_server_cert

MIB = 1 << 20
GIB = 1 << 30
BIN = Path(sys.executable).parent
UPLOADSERVER = str(BIN / "cdi-uploadserver")
CLONER = str(BIN / "cdi-cloner")
SERVICE = "cdi-upload-tgt.ns.svc"  # what UPLOAD_URL names; resolvable by no one here
START_TIMEOUT = 15.0
RUN_TIMEOUT = 60.0
WIRE_OVERHEAD = 64 << 10  # stream header, record headers, end marker, with room to spare

EXTENT_HEADERS = {"x-cdi-content-type": "blockdevice-clone", "x-cdi-clone-encoding": "extents-v1"}


# --- sources --------------------------------------------------------------------------------------


def sparse_file(path: Path, size: int, writes: list[tuple[int, bytes]]) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for offset, data in writes:
            os.pwrite(fd, data, offset)
    finally:
        os.close(fd)
    return path


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def fingerprint(path: Path) -> str:
    """sha256 of a file's data ranges with their offsets, size and mtime (holes read as zeros,
    so this is the content's digest without reading gigabytes of zeros); of a tree, of every
    entry's name, link target and file fingerprint."""
    h = hashlib.sha256()
    if path.is_dir():
        for entry in sorted(path.rglob("*")):
            h.update(str(entry.relative_to(path)).encode())
            if entry.is_symlink():
                h.update(os.readlink(entry).encode())
            elif entry.is_file():
                h.update(fingerprint(entry).encode())
        return h.hexdigest()
    st = path.stat()
    h.update(f"{st.st_size}:{st.st_mtime_ns}:{st.st_mode}".encode())
    fd = os.open(path, os.O_RDONLY)
    try:
        position = 0
        while position < st.st_size:
            try:
                start = os.lseek(fd, position, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            h.update(struct.pack(">Q", start))
            while start < end:
                data = os.pread(fd, min(MIB, end - start), start)
                h.update(data)
                start += len(data)
            position = end
    finally:
        os.close(fd)
    return h.hexdigest()


class Untouched:
    """Sources registered with `append` must be exactly as they were when the test ends."""

    def __init__(self) -> None:
        self.before: dict[Path, str] = {}

    def append(self, path: Path) -> None:
        self.before[path] = fingerprint(path)

    def check(self) -> None:
        for path, digest in self.before.items():
            assert fingerprint(path) == digest, f"the clone source {path} changed"


@pytest.fixture
def untouched() -> Iterator[Untouched]:
    watch = Untouched()
    yield watch
    watch.check()


def same_image(source: Path, target: Path) -> None:
    """`qemu-img compare`: identical, the target's extra tail (if any) all zeros."""
    result = subprocess.run(
        ["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(source), str(target)],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- certificates ---------------------------------------------------------------------------------


@dataclass
class Pki:
    dir: Path
    server_ca: KeyPair
    client_ca: KeyPair
    server: KeyPair
    client: KeyPair
    wrong_cn: KeyPair

    def file(self, name: str, data: bytes) -> str:
        path = self.dir / name
        path.write_bytes(data)
        return str(path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    server_ca = create_ca("cdi-uploadserver-signer")
    client_ca = create_ca("cdi-uploadserver-client-signer")
    return Pki(
        dir=tmp_path_factory.mktemp("pki"),
        server_ca=server_ca,
        client_ca=client_ca,
        server=issue_server_cert(server_ca, [SERVICE]),
        client=issue_client_cert(client_ca, UPLOAD_CLIENT_NAME),
        wrong_cn=issue_client_cert(client_ca, "someone.else"),
    )


# --- the upload server ----------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    text: str


class Target:
    """One cdi-uploadserver process on 127.0.0.1: vol/ (the data dir), term, server.log."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.vol = root / "vol"
        self.vol.mkdir(parents=True)
        self.term = root / "term"
        self.log = root / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.pki: Pki | None = None

    @property
    def disk(self) -> Path:
        return self.vol / "disk.img"

    def start(self, *, pki: Pki | None = None, **env: str) -> Target:
        self.pki = pki
        environ = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "CDI_DATA_DIR": str(self.vol),
            "CDI_SCRATCH_DIR": str(self.root / "no-scratch"),
            "CDI_BLOCK_DEVICE": str(self.root / "no-block-device"),
            "CDI_TERMINATION_LOG": str(self.term),
            "LISTEN_ADDRESS": "127.0.0.1",
            "LISTEN_PORT": "0",
            "FILESYSTEM_OVERHEAD": "0",
            **env,
        }
        if pki is None:
            environ["UPLOAD_INSECURE"] = "true"
        else:
            environ |= {
                "TLS_CERT_FILE": pki.file("server.crt", pki.server.cert),
                "TLS_KEY_FILE": pki.file("server.key", pki.server.key),
                "CLIENT_CERT_FILE": pki.file("client-ca.crt", pki.client_ca.cert),
            }
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [UPLOADSERVER], env=environ, stdout=subprocess.DEVNULL, stderr=log
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if m := re.search(rb"serving addr=\w+://127\.0\.0\.1:(\d+)", self.log.read_bytes()):
                self.port = int(m[1])
                return self
            assert self.proc.poll() is None, self.log.read_text()
            time.sleep(0.02)
        raise AssertionError(f"the upload server did not start:\n{self.log.read_text()}")

    def url(self) -> str:
        if self.pki is None:
            return f"http://127.0.0.1:{self.port}/v1beta1/upload"
        return f"https://{SERVICE}:8443/v1beta1/upload"  # reached via UPLOAD_SERVER_ADDRESS

    def post(self, body: bytes, headers: dict[str, str], path: str = "/v1beta1/upload") -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=RUN_TIMEOUT)
        try:
            conn.request("POST", path, body=body, headers=headers)
            resp = conn.getresponse()
            return Reply(resp.status, resp.read().decode(errors="replace"))
        finally:
            conn.close()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_exit(self) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the server did not exit:\n{self.log.read_text()}") from None

    @property
    def message(self) -> dict[str, object]:
        doc: dict[str, object] = json.loads(self.term.read_text())
        return doc

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Target]:
    server = Target(tmp_path / "target")
    yield server
    server.stop()


# --- the cloner -----------------------------------------------------------------------------------


@dataclass
class Cloned:
    code: int
    stdout: str
    stderr: str
    termination: str

    @property
    def error(self) -> str:
        """What the cloner said on failure: its one `cdi-cloner:` line."""
        lines = [line for line in self.stderr.splitlines() if line.startswith("cdi-cloner: ")]
        assert len(lines) == 1, self.stderr
        return lines[0]

    def counted(self, name: str) -> int:
        m = re.search(rf"clone complete .*\b{name}=(\d+)", self.stderr)
        assert m, self.stderr
        return int(m[1])


def clone(
    tmp_path: Path,
    target: Target | None,
    *,
    client: KeyPair | None = None,
    more: dict[str, str] | None = None,
    **env: str,
) -> Cloned:
    term = tmp_path / "cloner-term"
    term.unlink(missing_ok=True)
    (tmp_path / "tmp").mkdir(exist_ok=True)
    environ = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "TMPDIR": str(tmp_path / "tmp"),  # where the PEM files go, checked empty afterwards
        "CDI_TERMINATION_LOG": str(term),
        "CDI_METRICS_ADDR": "127.0.0.1:0",
        "OWNER_UID": "target-uid",
    }
    if target is not None:
        environ["UPLOAD_URL"] = target.url()
        environ["UPLOAD_SERVER_ADDRESS"] = f"127.0.0.1:{target.port}"
        if target.pki is not None:
            pair = client or target.pki.client
            environ |= {
                "CLIENT_CERT": pair.cert.decode(),
                "CLIENT_KEY": pair.key.decode(),
                "SERVER_CA_CERT": target.pki.server_ca.cert.decode(),
            }
    environ |= (more or {}) | env
    proc = subprocess.run(
        [CLONER], env=environ, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False
    )
    termination = term.read_text() if term.exists() else ""
    return Cloned(proc.returncode, proc.stdout, proc.stderr, termination)


def assert_cloned(result: Cloned, target: Target) -> None:
    assert result.code == 0, result.stderr + target.log.read_text()
    assert result.termination == "Clone Complete"
    assert target.wait_exit() == 0
    assert target.message["message"] == "Upload Complete"


def mount(tmp_path: Path) -> Path:
    src = tmp_path / "source"
    src.mkdir()
    return src


# --- kubevirt content -----------------------------------------------------------------------------


def test_filesystem_to_filesystem_moves_only_data(
    tmp_path: Path, target: Target, pki: Pki, untouched: Untouched
) -> None:
    src = mount(tmp_path)
    size = 10 * GIB
    writes = [(0, os.urandom(5 * MIB)), (GIB + 12345, os.urandom(5 * MIB))]
    writes += [(7 * GIB, os.urandom(5 * MIB)), (size - 5 * MIB, os.urandom(5 * MIB))]
    disk = sparse_file(src / "disk.img", size, writes)
    data = sum(len(d) for _, d in writes)
    untouched.append(disk)
    target.start(pki=pki, UPLOAD_IMAGE_SIZE="10Gi")
    result = clone(tmp_path, target, MOUNT_POINT=str(src))
    assert_cloned(result, target)
    assert target.disk.stat().st_size == size
    same_image(disk, target.disk)
    assert allocated(target.disk) <= data + 4 * MIB  # holes stayed holes
    assert data <= result.counted("data_bytes") <= result.counted("wire_bytes")
    assert result.counted("wire_bytes") <= data + WIRE_OVERHEAD
    assert result.counted("source_bytes") == size


def test_filesystem_to_block_zeroes_the_gaps(
    tmp_path: Path, target: Target, untouched: Untouched
) -> None:
    src = mount(tmp_path)
    writes = [(MIB, os.urandom(MIB)), (10 * MIB + 7, os.urandom(300_000))]
    disk = sparse_file(src / "disk.img", 24 * MIB, writes)
    untouched.append(disk)
    device = tmp_path / "device"
    device.write_bytes(b"\xff" * (32 * MIB))  # a reused device: old data everywhere
    target.start(DESTINATION=str(device))
    assert_cloned(clone(tmp_path, target, MOUNT_POINT=str(src)), target)
    written = device.read_bytes()
    assert written[: 24 * MIB] == disk.read_bytes()  # holes of the source read as zeros
    assert written[24 * MIB :] == b"\xff" * (8 * MIB)  # past the source: not ours to touch
    assert not target.disk.exists()


def test_block_to_filesystem_skips_zero_blocks(
    tmp_path: Path, target: Target, untouched: Untouched
) -> None:
    device = tmp_path / "source-device"
    size = 32 * MIB
    writes = [(0, bytes(size)), (3 * MIB, os.urandom(2 * MIB)), (size - 4096, os.urandom(4096))]
    sparse_file(device, size, writes)  # fully allocated, as a device is
    untouched.append(device)
    target.start(UPLOAD_IMAGE_SIZE="32Mi")
    result = clone(tmp_path, target, VOLUME_MODE="Block", CDI_BLOCK_DEVICE=str(device))
    assert_cloned(result, target)
    assert target.disk.read_bytes() == device.read_bytes()
    assert result.counted("wire_bytes") <= 2 * MIB + 64 * 1024 + WIRE_OVERHEAD
    assert allocated(target.disk) <= 3 * MIB


def test_zstd_compression(tmp_path: Path, target: Target, untouched: Untouched) -> None:
    src = mount(tmp_path)
    text = b"".join(b"line %08d of a compressible disk\n" % i for i in range(300_000))
    writes = [(MIB, text[: 8 * MIB])]
    disk = sparse_file(src / "disk.img", 64 * MIB, writes)
    untouched.append(disk)
    target.start(UPLOAD_IMAGE_SIZE="64Mi")
    result = clone(tmp_path, target, MOUNT_POINT=str(src), CLONE_COMPRESSION="zstd")
    assert_cloned(result, target)
    same_image(disk, target.disk)
    assert result.counted("data_bytes") == 8 * MIB
    assert result.counted("wire_bytes") < MIB  # ~10x smaller than the data
    assert "zstd=True" in target.log.read_text()


def test_target_larger_grows_to_the_usable_size_preallocated(
    tmp_path: Path, target: Target, untouched: Untouched
) -> None:
    src = mount(tmp_path)
    disk = sparse_file(src / "disk.img", 16 * MIB, [(5 * MIB, os.urandom(MIB))])
    untouched.append(disk)
    # 64Mi with half kept free: 32 MiB usable, as the import path computes it.
    target.start(UPLOAD_IMAGE_SIZE="64Mi", FILESYSTEM_OVERHEAD="0.5", PREALLOCATION="true")
    assert_cloned(clone(tmp_path, target, MOUNT_POINT=str(src), PREALLOCATION="true"), target)
    assert target.disk.stat().st_size == 32 * MIB
    assert target.disk.read_bytes() == disk.read_bytes() + bytes(16 * MIB)
    assert allocated(target.disk) >= 32 * MIB
    assert target.message["preallocationApplied"] is True


def test_target_smaller_is_refused_before_anything_is_written(
    tmp_path: Path, target: Target, untouched: Untouched
) -> None:
    src = mount(tmp_path)
    disk = sparse_file(src / "disk.img", 64 * MIB, [(60 * MIB, os.urandom(MIB))])
    untouched.append(disk)
    target.start(UPLOAD_IMAGE_SIZE="32Mi")
    result = clone(tmp_path, target, MOUNT_POINT=str(src))
    assert result.code == 1
    assert "HTTP 400" in result.error
    assert (
        "the clone source is 67108864 bytes (0.06 GiB) but the target holds only 33554432 bytes"
        in result.error
    )
    assert "request a larger target" in result.error
    assert result.termination == result.error.removeprefix("cdi-cloner: ")
    assert not target.disk.exists()
    assert target.running()  # and ready for another attempt


# --- archive content ------------------------------------------------------------------------------


def tree_entries(root: Path) -> dict[str, tuple[str, str]]:
    found: dict[str, tuple[str, str]] = {}
    for entry in sorted(root.rglob("*")):
        name = str(entry.relative_to(root))
        if entry.is_symlink():
            found[name] = ("link", os.readlink(entry))
        elif entry.is_dir():
            found[name] = ("dir", oct(entry.stat().st_mode & 0o777))
        else:
            digest = hashlib.sha256(entry.read_bytes()).hexdigest()
            found[name] = ("file", f"{entry.stat().st_size}:{digest}")
    return found


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_archive_content_clones_the_tree_with_holes(
    tmp_path: Path, target: Target, untouched: Untouched, compression: str
) -> None:
    src = mount(tmp_path)
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "empty").mkdir()
    (src / "sub" / "deeper" / "notes.txt").write_text("hello from the source volume\n")
    (src / "-starts-with-dash").write_bytes(b"not an option")
    (src / "link").symlink_to("sub/deeper/notes.txt")
    sparse_file(
        src / "sub" / "sparse.bin", 64 * MIB, [(0, b"a" * 4096), (40 * MIB, os.urandom(MIB))]
    )
    (src / "lost+found").mkdir()
    (src / "lost+found" / "#1234").write_bytes(b"fsck leftovers")
    untouched.append(src)
    target.start(UPLOAD_IMAGE_SIZE="128Mi")
    result = clone(
        tmp_path,
        target,
        MOUNT_POINT=str(src),
        CLONE_CONTENT_TYPE="archive",
        CLONE_COMPRESSION=compression,
    )
    assert_cloned(result, target)
    expected = {k: v for k, v in tree_entries(src).items() if not k.startswith("lost+found")}
    assert tree_entries(target.vol) == expected
    assert allocated(target.vol / "sub" / "sparse.bin") <= 2 * MIB  # the holes came through
    assert result.counted("wire_bytes") <= MIB + 4096 + WIRE_OVERHEAD


def test_archive_content_into_a_block_target_writes_disk_img(
    tmp_path: Path, target: Target, untouched: Untouched
) -> None:
    # CDI's rule for filesystem-clone into Block: the member named like disk.img is the disk.
    src = mount(tmp_path)
    (src / "README").write_text("not the disk\n")
    writes = [(MIB, os.urandom(MIB)), (6 * MIB + 3, b"tail")]
    disk = sparse_file(src / "disk.img", 8 * MIB, writes)
    untouched.append(src)
    device = tmp_path / "device"
    device.write_bytes(b"\xff" * (12 * MIB))
    target.start(DESTINATION=str(device))
    result = clone(tmp_path, target, MOUNT_POINT=str(src), CLONE_CONTENT_TYPE="archive")
    assert_cloned(result, target)
    written = device.read_bytes()
    assert written[: 8 * MIB] == disk.read_bytes()
    assert written[8 * MIB :] == b"\xff" * (4 * MIB)


# --- refusals and broken streams ------------------------------------------------------------------


def test_wrong_client_certificate_name(
    tmp_path: Path, target: Target, pki: Pki, untouched: Untouched
) -> None:
    src = mount(tmp_path)
    disk = sparse_file(src / "disk.img", 8 * MIB, [(0, os.urandom(MIB))])
    untouched.append(disk)
    target.start(pki=pki, UPLOAD_IMAGE_SIZE="8Mi")
    result = clone(tmp_path, target, client=pki.wrong_cn, MOUNT_POINT=str(src))
    assert result.code == 1
    assert "HTTP 401: client certificate required" in result.error
    assert not target.disk.exists()
    # The server's name is checked against UPLOAD_URL's host, whatever address we dial.
    result = clone(
        tmp_path,
        target,
        MOUNT_POINT=str(src),
        UPLOAD_URL="https://cdi-upload-other.ns.svc:8443/v1beta1/upload",
    )
    assert result.code == 1
    assert "TLS with the upload server" in result.error
    assert "cdi-upload-other.ns.svc" in result.error
    assert_cloned(clone(tmp_path, target, MOUNT_POINT=str(src)), target)
    same_image(disk, target.disk)
    assert not list((tmp_path / "tmp").iterdir())  # the PEM files did not stay behind


def test_unreachable_server(tmp_path: Path) -> None:
    src = mount(tmp_path)
    sparse_file(src / "disk.img", MIB, [])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens there once closed
    result = clone(
        tmp_path,
        None,
        MOUNT_POINT=str(src),
        UPLOAD_URL=f"http://127.0.0.1:{port}/v1beta1/upload",
        CLONE_CONNECT_WAIT="0.5",
    )
    assert result.code == 1
    assert f"cannot connect to the upload server at 127.0.0.1:{port}" in result.error


def extent_stream(total: int, records: list[tuple[int, bytes]], *, end: bool = True) -> bytes:
    out = [b"CDIEXT01", struct.pack(">Q", total)]
    for offset, data in records:
        out += [struct.pack(">QQ", offset, len(data)), data]
    if end:
        out.append(struct.pack(">QQ", total, 0))
    return b"".join(out)


def wait_for(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_cut_streams_leave_the_server_ready_for_the_next_attempt(
    tmp_path: Path, target: Target, untouched: Untouched
) -> None:
    src = mount(tmp_path)
    data = os.urandom(MIB)
    disk = sparse_file(src / "disk.img", 16 * MIB, [(2 * MIB, data)])
    untouched.append(disk)
    target.start(UPLOAD_IMAGE_SIZE="16Mi")

    # A body that ends in the middle of an extent (Content-Length honoured, stream short).
    cut = extent_stream(16 * MIB, [(2 * MIB, data)], end=False)[: 32 + 300_000]
    reply = target.post(cut, EXTENT_HEADERS)
    assert reply.status == 400
    assert reply.text == "the clone stream ended early after 300032 bytes"
    assert not target.disk.exists()

    # One that ends cleanly after a whole record but without the end marker.
    reply = target.post(extent_stream(16 * MIB, [(2 * MIB, data)], end=False), EXTENT_HEADERS)
    assert reply.status == 400
    assert reply.text.startswith("the clone stream ended early after 1048608 bytes")
    assert not target.disk.exists()

    # A connection that drops in the middle of a chunked body.
    with socket.create_connection(("127.0.0.1", target.port), timeout=30) as s:
        head = "".join(f"{k}: {v}\r\n" for k, v in EXTENT_HEADERS.items())
        s.sendall(
            f"POST /v1beta1/upload HTTP/1.1\r\nHost: x\r\n{head}"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        chunk = extent_stream(16 * MIB, [(2 * MIB, data)], end=False)[: 32 + 500_000]
        s.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
    wait_for(lambda: target.log.read_text().count("clone refused") >= 3)
    assert not target.disk.exists()

    result = clone(tmp_path, target, MOUNT_POINT=str(src))
    assert_cloned(result, target)
    same_image(disk, target.disk)


def test_malformed_streams_are_refused(tmp_path: Path, target: Target) -> None:
    target.start(UPLOAD_IMAGE_SIZE="16Mi")
    total = 4 * MIB
    a, b = b"A" * 1000, b"B" * 1000
    cases = {
        "it starts with b'NOTMAGIC'": b"NOTMAGIC" + extent_stream(total, [])[8:],
        "starts before the previous one ended": extent_stream(total, [(5000, a), (5500, b)]),
        "records must not overlap or go back": extent_stream(total, [(9000, a), (100, b)]),
        "goes past the source's size": extent_stream(total, [(total - 10, a)]),
        "empty record at offset 7": extent_stream(total, [(7, b"")]),
        "data after the end marker": extent_stream(total, [(0, a)]) + b"junk",
    }
    for expected, body in cases.items():
        reply = target.post(body, EXTENT_HEADERS)
        assert reply.status == 400, (expected, reply.text)
        assert reply.text.startswith("malformed clone stream: "), reply.text
        assert expected in reply.text
        assert not target.disk.exists()

    # CDI's own cloner: a raw blockdevice-clone stream in snappy framing.
    snappy = b"\xff\x06\x00\x00sNaPpY" + os.urandom(100)
    reply = target.post(snappy, {"x-cdi-content-type": "blockdevice-clone"})
    assert reply == Reply(
        400, "snappy-framed clone streams (CDI's cloner) are not supported; use cdi-cloner"
    )
    for headers, expected in [
        ({**EXTENT_HEADERS, "x-cdi-clone-compression": "snappy"}, "unknown clone compression"),
        ({**EXTENT_HEADERS, "x-cdi-clone-encoding": "extents-v9"}, "unknown clone encoding"),
        ({"x-cdi-content-type": "floppy-clone"}, "unknown clone content type"),
        ({**EXTENT_HEADERS, "x-cdi-clone-compression": "zstd"}, "the zstd clone stream is corrupt"),
    ]:
        reply = target.post(extent_stream(total, [(0, a)]), headers)
        assert reply.status == 400
        assert expected in reply.text, reply.text
    assert not target.disk.exists()

    # After all that, a well-formed hand-made stream goes in.
    good = extent_stream(total, [(0, a), (MIB, b)])
    assert target.post(good, EXTENT_HEADERS) == Reply(200, "Upload Complete")
    assert target.wait_exit() == 0
    expected_disk = bytearray(16 * MIB)  # grown to the usable size
    expected_disk[0:1000], expected_disk[MIB : MIB + 1000] = a, b
    assert target.disk.read_bytes() == expected_disk


def test_raw_blockdevice_clone_stream(tmp_path: Path, target: Target) -> None:
    target.start(UPLOAD_IMAGE_SIZE="8Mi")
    raw = bytes(MIB) + os.urandom(MIB) + bytes(2 * MIB)
    reply = target.post(raw * 3, {"x-cdi-content-type": "blockdevice-clone"})
    assert reply.status == 400
    assert "the clone source is 12582912 bytes" in reply.text
    assert not target.disk.exists()
    assert target.post(raw, {"x-cdi-content-type": "blockdevice-clone"}).status == 200
    assert target.wait_exit() == 0
    assert target.disk.read_bytes() == raw + bytes(4 * MIB)
    assert allocated(target.disk) <= MIB + 64 * 1024  # zero chunks skipped


# --- the cloner's own contract --------------------------------------------------------------------


async def test_progress_metric_and_headers(tmp_path: Path, untouched: Untouched) -> None:
    """A receiver of our own that, before answering, scrapes the cloner's metrics endpoint."""
    src = mount(tmp_path)
    disk = sparse_file(src / "disk.img", 32 * MIB, [(MIB, os.urandom(3 * MIB))])
    untouched.append(disk)
    log = tmp_path / "cloner.log"
    seen: dict[str, object] = {}

    async def receive(request: web.Request) -> web.Response:
        seen["headers"] = dict(request.headers)
        length = 0
        while chunk := await request.content.readany():
            length += len(chunk)
        seen["length"] = length
        port = re.search(r"metrics serving addr=https://127\.0\.0\.1:(\d+)", log.read_text())
        assert port, log.read_text()
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"https://127.0.0.1:{port[1]}/metrics", ssl=False) as resp,
        ):
            seen["metrics"] = await resp.text()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/v1beta1/upload", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        with log.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                CLONER,
                env={
                    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                    "UPLOAD_URL": f"http://{SERVICE}:8443/v1beta1/upload",
                    "UPLOAD_SERVER_ADDRESS": f"127.0.0.1:{port}",
                    "MOUNT_POINT": str(src),
                    "OWNER_UID": "uid-1",
                    "PREALLOCATION": "true",
                    "CDI_METRICS_ADDR": "127.0.0.1:0",
                    "CDI_TERMINATION_LOG": str(tmp_path / "term"),
                },
                stdout=asyncio.subprocess.DEVNULL,
                stderr=err,
            )
            assert await asyncio.wait_for(proc.wait(), RUN_TIMEOUT) == 0, log.read_text()
    finally:
        await runner.cleanup()
    headers = seen["headers"]
    assert isinstance(headers, dict)
    assert headers["Host"] == f"{SERVICE}:8443"
    assert headers["x-cdi-content-type"] == "blockdevice-clone"
    assert headers["x-cdi-clone-encoding"] == "extents-v1"
    assert headers["x-cdi-preallocation"] == "true"
    assert "x-cdi-clone-compression" not in headers
    assert 'kubevirt_cdi_clone_progress_total{ownerUID="uid-1"} 100.0' in str(seen["metrics"])
    assert seen["length"] == 16 + 16 + 3 * MIB + 16  # header, one record, end marker


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({}, "UPLOAD_URL"),
        ({"UPLOAD_URL": "https://h:8443/v1beta1/upload"}, "CLIENT_CERT"),
        ({"VOLUME_MODE": "tape"}, "VOLUME_MODE"),
        ({"CLONE_COMPRESSION": "lz4"}, "CLONE_COMPRESSION"),
        ({"CDI_METRICS_ADDR": "everywhere"}, "CDI_METRICS_ADDR"),
        (
            {
                "UPLOAD_URL": "https://h:8443/v1beta1/upload",
                "CLIENT_CERT": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                "CLIENT_KEY": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
                "SERVER_CA_CERT": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            },
            "SERVER_CA_CERT",
        ),
    ],
)
def test_bad_settings_exit_2_with_one_line(
    tmp_path: Path, env: dict[str, str], variable: str
) -> None:
    src = mount(tmp_path)
    base = {"UPLOAD_URL": "http://127.0.0.1:1/v1beta1/upload", "MOUNT_POINT": str(src)}
    if not env:
        base.pop("UPLOAD_URL")
    result = clone(tmp_path, None, more=base | env)
    assert result.code == 2
    assert result.stderr.count("\n") == 1, result.stderr  # one line, no traceback
    assert result.stderr.startswith(f"cdi-cloner: {variable}: ")
    assert result.termination.startswith(f"{variable}: ")
    assert not list((tmp_path / "tmp").iterdir())  # the PEM files did not stay behind


def test_help_documents_every_variable() -> None:
    out = subprocess.run(
        [CLONER, "--help"], capture_output=True, text=True, timeout=RUN_TIMEOUT, check=True
    ).stdout
    for name in [
        "UPLOAD_URL", "UPLOAD_SERVER_ADDRESS", "CLIENT_CERT", "CLIENT_KEY", "SERVER_CA_CERT",
        "OWNER_UID", "VOLUME_MODE", "MOUNT_POINT", "CDI_BLOCK_DEVICE", "PREALLOCATION",
        "CLONE_CONTENT_TYPE", "CLONE_COMPRESSION", "CDI_METRICS_ADDR", "CDI_TERMINATION_LOG",
    ]:  # fmt: skip
        assert name in out, name
