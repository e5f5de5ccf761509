"""Uploads end to end through a whole `cdi server`: `cdi image-upload` (virtctl's flow) into
DataVolumes and PVCs, Filesystem and Block, images and archives; plain curl with a token from
`kubectl create -f uploadtokenrequest.yaml`; the proxy's refusals; and an upload whose connection
is cut half-way, resumed from the server's offset instead of starting over."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

from tests.e2e.conftest import annotations_of, disk_path, dv_status, volume_dir
from tests.support.cdiserver import CdiServer
from tests.support.images import MIB, compress, convert, same_image

CDI: Final = [sys.executable, "-m", "cdi.cli.main"]
UPLOAD_TIMEOUT: Final = 120.0


def _proxy_url(server: CdiServer) -> str:
    for line in server.output:
        if "upload proxy at " in line:
            return line.rsplit("upload proxy at ", 1)[1].strip()
    raise AssertionError("cdi server did not print its upload proxy URL")


def _cdi(server: CdiServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CDI, *args],
        env=server.kubectl_env(),
        capture_output=True,
        text=True,
        timeout=UPLOAD_TIMEOUT,
        check=False,
    )


def _raw(tmp_path: Path, size: int = 6 * MIB) -> Path:
    raw = tmp_path / "disk.raw"
    with raw.open("wb") as f:  # data and holes, so sparse handling is exercised too
        f.write(os.urandom(size // 2))
        f.truncate(size)
    return raw


@pytest.mark.parametrize(
    ("kind", "fmt", "mode"),
    [("dv", "qcow2", "filesystem"), ("pvc", "xz", "block"), ("dv", "vmdk", "block")],
)
def test_image_upload(
    full_server: CdiServer, ns: str, tmp_path: Path, kind: str, fmt: str, mode: str
) -> None:
    raw = _raw(tmp_path)
    image = compress(raw, "xz") if fmt == "xz" else convert(raw, tmp_path / f"d.{fmt}", fmt)
    name = f"up-{kind}-{fmt}"
    done = _cdi(
        full_server,
        "image-upload", kind, name, "-n", ns, "--size", "32Mi",
        "--volume-mode", mode, "--image-path", str(image),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Pod now ready" in done.stdout
    assert f"Uploading {image} completed successfully" in done.stdout
    assert "Traceback" not in done.stderr
    assert same_image(raw, disk_path(full_server, ns, name))
    notes = annotations_of(full_server, "pvc", name, ns)
    assert notes["cdi.kubevirt.io/storage.pod.phase"] == "Succeeded"
    assert "cdi.kubevirt.io/storage.upload.target" in notes
    if kind == "dv":
        status = dv_status(full_server, ns, name)
        assert (status["phase"], status["progress"]) == ("Succeeded", "100.0%")


def test_archive_upload(full_server: CdiServer, ns: str, tmp_path: Path) -> None:
    content = tmp_path / "content"
    (content / "sub").mkdir(parents=True)
    (content / "hello.txt").write_text("hello\n")
    (content / "sub" / "data.bin").write_bytes(bytes(range(256)) * 100)
    archive = tmp_path / "files.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(content, arcname=".")
    done = _cdi(
        full_server, "image-upload", "dv", "files", "-n", ns, "--size", "16Mi",
        "--archive-path", str(archive),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    volume = volume_dir(full_server, ns, "files")
    assert (volume / "hello.txt").read_text() == "hello\n"
    assert (volume / "sub" / "data.bin").read_bytes() == bytes(range(256)) * 100
    assert not (volume / "disk.img").exists()


def test_curl_with_a_token_from_kubectl(full_server: CdiServer, ns: str, tmp_path: Path) -> None:
    raw = _raw(tmp_path, 4 * MIB)
    full_server.kubectl(
        "apply", "-n", ns, "-f", "-",
        input=(
            "apiVersion: cdi.kubevirt.io/v1beta1\nkind: DataVolume\n"
            "metadata: {name: curled}\n"
            "spec: {source: {upload: {}}, storage: {resources: {requests: {storage: 16Mi}}}}\n"
        ),
    )  # fmt: skip
    full_server.kubectl(
        "wait", "dv/curled", "-n", ns, "--for=jsonpath={.status.phase}=UploadReady",
        "--timeout=60s",
    )  # fmt: skip
    token = full_server.kubectl(
        "create", "-n", ns, "-o", "jsonpath={.status.token}", "-f", "-",
        input=(
            "apiVersion: upload.cdi.kubevirt.io/v1beta1\nkind: UploadTokenRequest\n"
            "metadata: {name: t}\nspec: {pvcName: curled}\n"
        ),
    ).stdout  # fmt: skip
    url = _proxy_url(full_server) + "/v1beta1/upload"
    ca = str(full_server.data_dir / "pki" / "ca.crt")

    def curl(*args: str) -> str:
        return subprocess.run(
            ["curl", "-sS", "--cacert", ca, "-o", "/dev/null", "-w", "%{http_code}", *args],
            capture_output=True, text=True, timeout=60, check=False,
        ).stdout  # fmt: skip

    assert curl("-X", "POST", "--data-binary", f"@{raw}", url) == "400"  # no token
    bad = "Authorization: Bearer " + token[:-4] + "AAAA"
    assert curl("-X", "POST", "-H", bad, "--data-binary", f"@{raw}", url) == "401"
    good = f"Authorization: Bearer {token}"
    assert curl("-X", "POST", "-H", good, "--data-binary", f"@{raw}", url) == "200"
    full_server.kubectl(
        "wait", "dv/curled", "-n", ns, "--for=jsonpath={.status.phase}=Succeeded",
        "--timeout=60s",
    )  # fmt: skip
    assert same_image(raw, disk_path(full_server, ns, "curled"))
    # Done: a second upload is refused and the volume keeps what it holds.
    assert curl("-X", "POST", "-H", good, "--data-binary", f"@{raw}", url) == "503"
    assert same_image(raw, disk_path(full_server, ns, "curled"))


class CuttingRelay:
    """A TCP relay on 127.0.0.1 that cuts the first connection to carry `cut_after` bytes from
    the client (TLS passes through untouched); after that cut, everything is relayed whole."""

    def __init__(self, target: tuple[str, int], cut_after: int) -> None:
        self.target = target
        self.cut_after = cut_after
        self.cuts = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._stopping = False

    def __enter__(self) -> CuttingRelay:
        thread = threading.Thread(target=self._accept, daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._stopping:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(
                target=self._pump, args=(client, upstream, self.cut_after), daemon=True
            ).start()
            threading.Thread(target=self._pump, args=(upstream, client, None), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        moved = 0
        try:
            while data := src.recv(65536):
                if limit is not None and not self.cuts and moved + len(data) > limit:
                    self.cuts += 1
                    break
                dst.sendall(data)
                moved += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()


@pytest.fixture
def relay(full_server: CdiServer) -> Iterator[CuttingRelay]:
    host, port = _proxy_url(full_server).split("://", 1)[1].rsplit(":", 1)
    # HEADs and the token happen first; the cut lands in the body, about half-way.
    with CuttingRelay((host, int(port)), cut_after=5 * MIB) as running:
        yield running


def test_cut_connection_resumes_from_the_offset(
    full_server: CdiServer, ns: str, tmp_path: Path, relay: CuttingRelay
) -> None:
    raw = _raw(tmp_path, 10 * MIB)
    done = _cdi(
        full_server, "image-upload", "dv", "resumed", "-n", ns, "--size", "32Mi",
        "--image-path", str(raw), "--uploadproxy-url", f"https://127.0.0.1:{relay.port}",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert relay.cuts == 1, done.stdout + done.stderr
    # Resumed, not restarted: the progress after the cut starts past the half.
    lines = [ln for ln in done.stdout.splitlines() if ln.endswith("%)")]
    restarts = [ln for ln in lines[1:] if ln.startswith("0/")]
    assert not restarts, lines
    assert same_image(raw, disk_path(full_server, ns, "resumed"))


def test_bad_input_is_refused_before_anything_is_created(
    full_server: CdiServer, ns: str, tmp_path: Path
) -> None:
    raw = _raw(tmp_path, MIB)
    cases = [
        (["--size", "16Mi", "--image-path", str(tmp_path / "missing.img")], "no such file"),
        (["--size", "16Gx", "--image-path", str(raw)], "--size"),
        (["--size", "16Mi", "--image-path", str(raw), "--checksum", "sha256:00"], "sha256"),
        (["--size", "16Mi", "--image-path", str(raw), "--access-mode", "ReadOnlyMany"], "writable"),
    ]
    for args, expected in cases:
        done = _cdi(full_server, "image-upload", "dv", "nothing", "-n", ns, *args)
        assert done.returncode != 0, args
        assert expected in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr
    assert "nothing" not in full_server.kubectl("get", "dv,pvc", "-n", ns, "-o", "name").stdout
