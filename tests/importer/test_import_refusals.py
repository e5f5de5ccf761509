"""Bad input to the importer: each gets a clear one-line error, and nothing is left behind.

"Nothing left behind" is checked on the whole sandbox (volume, scratch and the dir around them),
and for unsafe images under strace: the file an image points at is never opened by any process.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.support.httpserver import BadServer
from tests.support.images import MIB, compress, patterned_raw
from tests.support.importer_run import Sandbox


@pytest.fixture
def box(tmp_path: Path) -> Sandbox:
    return Sandbox(tmp_path / "box")


def serve(server: BadServer, image: Path) -> str:
    target = server.root / image.name
    if not target.exists():
        os.link(image, target)
    return server.url("/" + image.name)


def http_env(url: str, **extra: str) -> dict[str, str]:
    return {"IMPORTER_SOURCE": "http", "IMPORTER_ENDPOINT": url, **extra}


# --- unsafe images -------------------------------------------------------------------------------


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "secret.raw"
    path.write_bytes(b"TOP-SECRET" * 100_000)
    return path


def backing_file_qcow2(tmp_path: Path, secret: Path) -> Path:
    image = tmp_path / "backed.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(secret), "-F", "raw", str(image)],
        check=True,
    )
    return image


def data_file_qcow2(tmp_path: Path, secret: Path) -> Path:
    # qemu-img create -o data_file=X truncates X, so point it at a copy, then at the secret.
    decoy = tmp_path / "decoy.raw"
    image = tmp_path / "datafile.qcow2"
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            f"data_file={decoy},data_file_raw=on",
            str(image),
            "1M",
        ],
        check=True,
    )
    subprocess.run(
        ["qemu-img", "amend", "-q", "-f", "qcow2", "-o", f"data_file={secret}", str(image)],
        check=True,
    )
    return image


def flat_vmdk(tmp_path: Path, secret: Path) -> Path:
    image = tmp_path / "flat.vmdk"
    image.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        'createType="monolithicFlat"\n\n# Extent description\n'
        f'RW 2048 FLAT "{secret}" 0\n\n# The Disk Data Base\n#DDB\n\n'
        'ddb.virtualHWVersion = "4"\nddb.geometry.cylinders = "2"\n'
        'ddb.geometry.heads = "16"\nddb.geometry.sectors = "63"\nddb.adapterType = "ide"\n'
    )
    return image


UNSAFE = {
    "backing_file": backing_file_qcow2,
    "data_file": data_file_qcow2,
    "vmdk_extent": flat_vmdk,
}


@pytest.mark.parametrize("wrapper", [None, "gzip", "xz"])
@pytest.mark.parametrize("kind", sorted(UNSAFE))
def test_unsafe_image_is_refused_and_its_target_never_opened(
    bad_server: BadServer,
    box: Sandbox,
    tmp_path: Path,
    secret: Path,
    kind: str,
    wrapper: str | None,
) -> None:
    image = UNSAFE[kind](tmp_path, secret)
    if wrapper:
        image = compress(image, wrapper)
    env = {
        **os.environ,
        "IMPORTER_SOURCE": "http",
        "IMPORTER_ENDPOINT": serve(bad_server, image),
        "CDI_DATA_DIR": str(box.vol),
        "CDI_SCRATCH_DIR": str(box.scratch),
        "CDI_TERMINATION_LOG": str(box.term),
        "CDI_BLOCK_DEVICE": str(box.root / "none"),
        "CDI_METRICS_ADDR": "off",
    }
    trace = tmp_path / "strace.log"
    proc = subprocess.run(
        [
            "strace",
            "-f",
            "-qq",
            "-e",
            "trace=open,openat,openat2,execve",
            "-o",
            str(trace),
            sys.executable,
            "-m",
            "importer",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    message = box.term.read_text()
    assert message.startswith("Unable to process data: refusing unsafe")
    assert "\n" not in message
    assert str(secret) not in trace.read_text(), "something opened the file the image points at"
    assert "qemu-img" not in trace.read_text(), "qemu-img ran on an image the inspector refused"
    assert box.entries() == {"vol", "scratch"}


# --- archives ------------------------------------------------------------------------------------


def make_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o644
    return info


@pytest.mark.parametrize("wrapper", [None, "gzip", "xz", "zstd"])
def test_archive_is_extracted(
    bad_server: BadServer, box: Sandbox, tmp_path: Path, wrapper: str | None
) -> None:
    tar = make_tar(
        tmp_path / "content.tar",
        [
            (member("dir", tarfile.DIRTYPE), None),
            (member("dir/file.txt"), b"hello\n"),
            (member("top.bin"), os.urandom(200_000)),
            (member("dir/link", tarfile.SYMTYPE, "file.txt"), None),
        ],
    )
    if wrapper:
        tar = compress(tar, wrapper)
    result = box.run(**http_env(serve(bad_server, tar)), IMPORTER_CONTENTTYPE="archive")
    assert result.returncode == 0, result.stderr
    assert (box.vol / "dir/file.txt").read_text() == "hello\n"
    assert (box.vol / "dir/link").resolve() == (box.vol / "dir/file.txt").resolve()
    assert (box.vol / "top.bin").stat().st_size == 200_000


TRAVERSALS = {
    "dotdot": [(member("../evil.txt"), b"x")],
    "absolute": [(member("/tmp/evil-absolute.txt"), b"x")],
    "symlink-out": [(member("link", tarfile.SYMTYPE, "/etc"), None)],
    "symlink-dotdot": [(member("link", tarfile.SYMTYPE, "../../.."), None)],
    "through-symlink": [
        (member("ok", tarfile.SYMTYPE, "."), None),
        (member("sub", tarfile.DIRTYPE), None),
        (member("sub/ln", tarfile.SYMTYPE, ".."), None),
        (member("sub/ln/evil.txt"), b"x"),
    ],
    "hardlink-out": [(member("hard", tarfile.LNKTYPE, "/etc/passwd"), None)],
    "device": [(member("dev", tarfile.CHRTYPE), None)],
    "fifo": [(member("fifo", tarfile.FIFOTYPE), None)],
}


@pytest.mark.parametrize("case", sorted(TRAVERSALS))
def test_archive_escapes_are_refused(
    bad_server: BadServer, box: Sandbox, tmp_path: Path, case: str
) -> None:
    good = [(member("first.txt"), b"written before the bad member")]
    tar = make_tar(tmp_path / f"{case}.tar", good + TRAVERSALS[case])
    before = set(os.listdir(tmp_path))
    result = box.run(**http_env(serve(bad_server, tar)), IMPORTER_CONTENTTYPE="archive")
    assert result.returncode == 1, result.stderr
    assert result.termination.startswith("Unable to process data: archive member")
    assert box.entries() == {"vol", "scratch"}, "a half-extracted archive was left behind"
    assert set(os.listdir(tmp_path)) == before
    assert not Path("/tmp/evil-absolute.txt").exists()


def test_archive_content_needs_a_tar(bad_server: BadServer, box: Sandbox, tmp_path: Path) -> None:
    raw = patterned_raw(tmp_path / "disk.raw", 2 * MIB)
    result = box.run(**http_env(serve(bad_server, raw)), IMPORTER_CONTENTTYPE="archive")
    assert result.returncode == 1
    assert "content type archive needs a tar archive" in result.termination
    assert box.entries() == {"vol", "scratch"}


def test_tar_as_disk_image_is_refused(bad_server: BadServer, box: Sandbox, tmp_path: Path) -> None:
    tar = make_tar(tmp_path / "c.tar", [(member("a"), b"a")])
    result = box.run(**http_env(serve(bad_server, tar)))
    assert result.returncode == 1
    assert "contentType archive" in result.termination


# --- bad settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("IMPORTER_SOURCE", "ftp", "Unknown data source: ftp"),
        ("IMPORTER_CONTENTTYPE", "disk", "not one of: kubevirt, archive"),
        ("IMPORTER_IMAGE_SIZE", "ten gigs", "is not a quantity"),
        ("FILESYSTEM_OVERHEAD", "1.5", "between 0 and 1"),
        ("PREALLOCATION", "maybe", "not a boolean"),
        ("INSECURE_TLS", "yes please", "not a boolean"),
        ("IMPORTER_CHECKSUM", "sha256:zz", "64 hex digits"),
        ("IMPORTER_CHECKSUM", "crc32:abcd", "not a checksum"),
        ("IMPORTER_EXTRA_HEADER_0", "no colon here", "Name: value"),
        ("IMPORTER_CERT_DIR", "/nonexistent/certs", "not a directory"),
        ("CDI_METRICS_ADDR", "everywhere", "host:port"),
        ("CDI_STALL_TIMEOUT", "-3", "positive number"),
        ("IMPORTER_ENDPOINT", "", "is empty"),
    ],
)
def test_bad_settings_name_the_variable(
    box: Sandbox, variable: str, value: str, expected: str
) -> None:
    env = {
        "IMPORTER_SOURCE": "http",
        "IMPORTER_ENDPOINT": "http://127.0.0.1:9/x.img",
        variable: value,
    }
    result = box.run(**env)
    assert result.returncode == 1
    assert result.termination.startswith(f"{variable}: ")
    assert expected in result.termination
    assert "Traceback" not in result.stderr
    assert box.entries() == {"vol", "scratch"}


def test_blank_with_archive_is_refused(box: Sandbox) -> None:
    result = box.run(
        IMPORTER_SOURCE="none", IMPORTER_CONTENTTYPE="archive", IMPORTER_IMAGE_SIZE="1Mi"
    )
    assert result.returncode == 1
    assert "Cannot create empty disk with content type archive" in result.termination


def test_unreachable_server(box: Sandbox) -> None:
    result = box.run(IMPORTER_SOURCE="http", IMPORTER_ENDPOINT="http://127.0.0.1:9/x.img")
    assert result.returncode == 1
    assert result.termination.startswith("Unable to connect to http data source:")
    assert box.entries() == {"vol", "scratch"}
