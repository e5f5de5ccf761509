"""The importer end to end over HTTP(S): every route of the data path, real servers and tools."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.support.httpserver import BadServer
from tests.support.images import MIB, compress, convert, patterned_raw, same_image, to_raw
from tests.support.importer_run import Sandbox


@pytest.fixture
def box(tmp_path: Path) -> Sandbox:
    return Sandbox(tmp_path / "box")


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return patterned_raw(tmp_path / "base.raw", 16 * MIB + 64 * 1024)


def serve(server: BadServer, image: Path) -> str:
    target = server.root / image.name
    if not target.exists():
        os.link(image, target)  # the server refuses symlinks that leave its root
    return server.url("/" + image.name)


def http_env(url: str, **extra: str) -> dict[str, str]:
    return {"IMPORTER_SOURCE": "http", "IMPORTER_ENDPOINT": url, **extra}


FORMATS = [
    ("raw", ()),
    ("qcow2", ()),
    ("qcow2", ("-o", "compat=0.10")),
    ("vmdk", ()),
    ("vmdk", ("-o", "subformat=streamOptimized")),
    ("vdi", ()),
    ("vpc", ("-o", "force_size=on")),
    ("vhdx", ()),
]


@pytest.mark.parametrize(("fmt", "options"), FORMATS, ids=[f + "".join(o[1:]) for f, o in FORMATS])
def test_ranged_source_converts_through_nbd(
    bad_server: BadServer,
    box: Sandbox,
    base: Path,
    tmp_path: Path,
    fmt: str,
    options: tuple[str, ...],
) -> None:
    image = convert(base, tmp_path / f"img.{fmt}", fmt, *options)
    expected = to_raw(image, fmt, tmp_path / "expected.raw")
    result = box.run(**http_env(serve(bad_server, image)))
    assert result.returncode == 0, result.stderr
    assert result.message["message"] == "Import Complete"
    assert same_image(expected, box.disk)
    assert box.entries() == {"vol", "vol/disk.img", "scratch"}
    # The NBD route reads by range; nothing went to scratch.
    assert any(r.range and r.range != "bytes=0-0" for r in bad_server.requests)
    assert oct(box.disk.stat().st_mode & 0o777) == oct(0o660)


@pytest.mark.parametrize("tool", ["gzip", "xz", "zstd", "bzip2"])
def test_compressed_raw_streams_into_the_target(
    bad_server: BadServer, box: Sandbox, base: Path, tool: str
) -> None:
    packed = compress(base, tool)
    result = box.run(**http_env(serve(bad_server, packed)))
    assert result.returncode == 0, result.stderr
    assert same_image(base, box.disk)
    assert box.entries() == {"vol", "vol/disk.img", "scratch"}
    # Sparse: the holes of the image stay holes.
    assert box.disk.stat().st_blocks * 512 < base.stat().st_size // 2


@pytest.mark.parametrize("tool", ["gzip", "xz"])
def test_compressed_qcow2_goes_through_scratch(
    bad_server: BadServer, box: Sandbox, base: Path, tmp_path: Path, tool: str
) -> None:
    packed = compress(convert(base, tmp_path / "img.qcow2", "qcow2"), tool)
    result = box.run(**http_env(serve(bad_server, packed)))
    assert result.returncode == 0, result.stderr
    assert same_image(base, box.disk)
    assert box.entries() == {"vol", "vol/disk.img", "scratch"}, "scratch copy not removed"


def test_scratch_required_when_none_is_mounted(
    bad_server: BadServer, tmp_path: Path, base: Path
) -> None:
    box = Sandbox(tmp_path / "noscratch", scratch=False)
    packed = compress(convert(base, tmp_path / "img.qcow2", "qcow2"), "gzip")
    result = box.run(**http_env(serve(bad_server, packed)))
    assert result.returncode == 0, result.stderr
    assert result.message["scratchSpaceRequired"] is True
    assert box.entries() == {"vol"}


@pytest.mark.parametrize(
    "knob", [{"no_accept_ranges": True, "ignore_range": True}, {"no_head": 403}]
)
def test_servers_without_ranges_or_head(
    bad_server: BadServer, box: Sandbox, base: Path, tmp_path: Path, knob: dict[str, object]
) -> None:
    qcow2 = convert(base, tmp_path / "img.qcow2", "qcow2")
    url = serve(bad_server, qcow2)
    bad_server.behave("/img.qcow2", **knob)
    result = box.run(**http_env(url))
    assert result.returncode == 0, result.stderr
    assert same_image(base, box.disk)


def test_server_ignoring_range_raw_streams_straight(
    bad_server: BadServer, box: Sandbox, base: Path
) -> None:
    url = serve(bad_server, base)
    bad_server.behave("/base.raw", ignore_range=True)
    result = box.run(**http_env(url))
    assert result.returncode == 0, result.stderr
    assert same_image(base, box.disk)


def test_resized_to_the_usable_size(
    bad_server: BadServer, box: Sandbox, base: Path, tmp_path: Path
) -> None:
    qcow2 = convert(base, tmp_path / "img.qcow2", "qcow2")
    result = box.run(
        **http_env(serve(bad_server, qcow2), IMPORTER_IMAGE_SIZE="64Mi", FILESYSTEM_OVERHEAD="0.06")
    )
    assert result.returncode == 0, result.stderr
    # usable = roundDown(ceil(64 MiB / 1.06), 1 MiB) = 60 MiB
    assert box.disk.stat().st_size == 60 * MIB
    assert same_image(base, box.disk)


def test_checksum_verified_on_the_stream(
    bad_server: BadServer, box: Sandbox, base: Path, tmp_path: Path
) -> None:
    qcow2 = convert(base, tmp_path / "img.qcow2", "qcow2")
    digest = hashlib.sha256(qcow2.read_bytes()).hexdigest()
    result = box.run(**http_env(serve(bad_server, qcow2), IMPORTER_CHECKSUM=f"sha256:{digest}"))
    assert result.returncode == 0, result.stderr
    assert same_image(base, box.disk)


def test_checksum_mismatch_is_final_and_removes_the_data(
    bad_server: BadServer, box: Sandbox, base: Path
) -> None:
    wrong = "0" * 64
    result = box.run(**http_env(serve(bad_server, base), IMPORTER_CHECKSUM=f"sha256:{wrong}"))
    assert result.returncode == 1
    assert "checksum mismatch: expected sha256:" + wrong in result.termination
    assert result.termination.startswith("Unable to process data:")
    assert box.entries() == {"vol", "scratch"}


def test_preallocation(bad_server: BadServer, box: Sandbox, base: Path) -> None:
    result = box.run(
        **http_env(serve(bad_server, base), PREALLOCATION="true", IMPORTER_IMAGE_SIZE="32Mi")
    )
    assert result.returncode == 0, result.stderr
    assert result.message["preallocationApplied"] is True
    assert box.disk.stat().st_blocks * 512 >= box.disk.stat().st_size
    assert same_image(base, box.disk)


def test_https_with_custom_ca_basic_auth_and_extra_headers(
    bad_tls_server: BadServer, box: Sandbox, base: Path, tmp_path: Path
) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    assert bad_tls_server.ca_file
    (certs / "odd name.pem").write_bytes(Path(bad_tls_server.ca_file).read_bytes())
    qcow2 = convert(base, tmp_path / "img.qcow2", "qcow2")
    url = serve(bad_tls_server, qcow2)
    bad_tls_server.behave("/img.qcow2", basic_auth=("admin", "password"))
    result = box.run(
        **http_env(url),
        IMPORTER_CERT_DIR=str(certs),
        IMPORTER_ACCESS_KEY_ID="admin",
        IMPORTER_SECRET_KEY="password",
        IMPORTER_EXTRA_HEADER_0="X-First: one",
        IMPORTER_EXTRA_HEADER_1="X-Second: two words",
    )
    assert result.returncode == 0, result.stderr
    assert same_image(base, box.disk)
    reads = bad_tls_server.requests_for("/img.qcow2")
    assert reads and all(r.headers.get("X-First") == "one" for r in reads)
    assert all(r.headers.get("X-Second") == "two words" for r in reads)


def test_https_unknown_ca_fails_clearly(
    bad_tls_server: BadServer, box: Sandbox, base: Path
) -> None:
    result = box.run(**http_env(serve(bad_tls_server, base)))
    assert result.returncode == 1
    assert result.termination.startswith("Unable to connect to http data source:")
    assert "certificate" in result.termination.lower()
    assert box.entries() == {"vol", "scratch"}


def test_insecure_tls_skips_verification(
    bad_tls_server: BadServer, box: Sandbox, base: Path
) -> None:
    result = box.run(**http_env(serve(bad_tls_server, base)), INSECURE_TLS="true")
    assert result.returncode == 0, result.stderr
    assert same_image(base, box.disk)


def test_redirect_is_followed(bad_server: BadServer, box: Sandbox, base: Path) -> None:
    real = serve(bad_server, base)
    bad_server.behave("/moved.raw", redirect_to=real)
    result = box.run(**http_env(bad_server.url("/moved.raw")))
    assert result.returncode == 0, result.stderr
    assert same_image(base, box.disk)


def test_dropped_connection_resumes_with_the_right_bytes(
    bad_server: BadServer, box: Sandbox, base: Path
) -> None:
    packed = compress(base, "gzip")  # the streaming route (NBD route: next test)
    url = serve(bad_server, packed)
    bad_server.behave("/" + packed.name, drop_after=8192, drop_times=2)
    result = box.run(**http_env(url))
    assert result.returncode == 0, result.stderr
    assert same_image(base, box.disk)
    resumed = [r.range for r in bad_server.requests_for("/" + packed.name, "GET")]
    assert any(r and r != "bytes=0-0" and not r.startswith("bytes=0-") for r in resumed)


def test_lying_content_length_with_ranges_is_survived(
    bad_server: BadServer, box: Sandbox, base: Path
) -> None:
    # Content-Length claims more than is sent; Content-Range told the truth, so the bytes that
    # came are all there is, and the gzip stream proves them whole.
    packed = compress(base, "gzip")
    bad_server.behave("/" + packed.name, lie_content_length=4096)
    result = box.run(**http_env(serve(bad_server, packed)))
    assert result.returncode == 0, result.stderr
    assert same_image(base, box.disk)


def test_lying_content_length_without_ranges_fails_clearly(
    bad_server: BadServer, box: Sandbox, base: Path
) -> None:
    bad_server.behave(
        "/base.raw", lie_content_length=4096, ignore_range=True, no_accept_ranges=True
    )
    result = box.run(**http_env(serve(bad_server, base)))
    assert result.returncode == 1
    assert result.termination.startswith("Unable to connect to http data source: connection lost")
    assert f"of {base.stat().st_size + 4096} bytes" in result.termination
    assert box.entries() == {"vol", "scratch"}


def test_dropped_connection_on_the_nbd_route(
    bad_server: BadServer, box: Sandbox, base: Path, tmp_path: Path
) -> None:
    qcow2 = convert(base, tmp_path / "img.qcow2", "qcow2")
    url = serve(bad_server, qcow2)
    bad_server.behave("/img.qcow2", drop_after=256 * 1024, drop_times=3)
    result = box.run(**http_env(url))
    assert result.returncode == 0, result.stderr
    assert same_image(base, box.disk)


@pytest.mark.parametrize(
    ("status", "reason"), [(404, "Not Found"), (403, "Forbidden"), (401, "Unauthorized")]
)
def test_http_errors_use_cdi_wording(
    bad_server: BadServer, box: Sandbox, base: Path, status: int, reason: str
) -> None:
    url = serve(bad_server, base)
    bad_server.behave("/base.raw", status=status)
    result = box.run(**http_env(url))
    assert result.returncode == 1
    assert result.termination == (
        f"Unable to connect to http data source: expected status code 200, got {status}. "
        f"Status: {status} {reason}"
    )
    assert box.entries() == {"vol", "scratch"}


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://127.0.0.1/x"])
def test_redirect_to_another_scheme_is_refused(
    bad_server: BadServer, box: Sandbox, target: str
) -> None:
    bad_server.behave("/evil.raw", redirect_to=target)
    result = box.run(**http_env(bad_server.url("/evil.raw")))
    assert result.returncode == 1
    assert "only http and https" in result.termination
    assert box.entries() == {"vol", "scratch"}


def test_stalled_server_times_out(bad_server: BadServer, box: Sandbox, base: Path) -> None:
    packed = compress(base, "gzip")
    url = serve(bad_server, packed)
    bad_server.behave("/" + packed.name, stall_after=8192, no_accept_ranges=True, ignore_range=True)
    result = box.run(**http_env(url), CDI_STALL_TIMEOUT="1")
    assert result.returncode == 1
    assert "server stopped sending" in result.termination
    assert box.entries() == {"vol", "scratch"}


def test_image_larger_than_the_volume(bad_server: BadServer, box: Sandbox, tmp_path: Path) -> None:
    big = tmp_path / "big.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(big), "1G"], check=True)
    result = box.run(**http_env(serve(bad_server, big)), IMPORTER_IMAGE_SIZE="100Mi")
    assert result.returncode == 1
    assert "A larger PVC is required" in result.termination
    assert "virtual image size 1073741824" in result.termination
    assert box.entries() == {"vol", "scratch"}


@pytest.mark.parametrize("tool", ["gzip", "xz"])
def test_decompression_bomb_larger_than_the_volume(
    bad_server: BadServer, box: Sandbox, tmp_path: Path, tool: str
) -> None:
    zeros = tmp_path / "zeros.raw"
    with zeros.open("wb") as f:
        f.truncate(256 * MIB)
    packed = compress(zeros, tool)
    assert packed.stat().st_size < MIB
    result = box.run(**http_env(serve(bad_server, packed)), IMPORTER_IMAGE_SIZE="32Mi")
    assert result.returncode == 1
    assert "A larger PVC is required" in result.termination
    assert box.entries() == {"vol", "scratch"}


def test_empty_source(bad_server: BadServer, box: Sandbox) -> None:
    url = bad_server.url(bad_server.add_file("empty.img", b""))
    result = box.run(**http_env(url))
    assert result.returncode == 1
    assert "empty" in result.termination
    assert box.entries() == {"vol", "scratch"}


def test_metrics_port_logged(bad_server: BadServer, box: Sandbox, base: Path) -> None:
    result = box.run(**http_env(serve(bad_server, base)), CDI_METRICS_ADDR="127.0.0.1:0")
    assert result.returncode == 0, result.stderr
    assert "metrics serving addr=https://127.0.0.1:" in result.stderr


def test_success_message_is_cdi_json(bad_server: BadServer, box: Sandbox, base: Path) -> None:
    result = box.run(**http_env(serve(bad_server, base)))
    assert json.loads(result.termination) == {
        "message": "Import Complete",
        "preallocationApplied": False,
    }
    assert result.stdout.strip() == result.termination


@pytest.mark.parametrize("variable", ["http_proxy", "HTTP_PROXY"])
@pytest.mark.parametrize("wrapper", [None, "gzip"], ids=["nbd-route", "stream-route"])
def test_proxy_from_the_environment(
    bad_server: BadServer,
    box: Sandbox,
    base: Path,
    tmp_path: Path,
    variable: str,
    wrapper: str | None,
) -> None:
    image = convert(base, tmp_path / "img.qcow2", "qcow2")
    if wrapper:
        image = compress(image, wrapper)
    serve(bad_server, image)
    # The host does not exist: only a proxy can answer for it.
    url = f"http://images.example.invalid/{image.name}"
    result = box.run(**http_env(url), **{variable: bad_server.base_url})
    assert result.returncode == 0, result.stderr
    assert same_image(base, box.disk)
    targets = {r.target for r in bad_server.requests}
    assert targets == {url}


def test_no_proxy_is_honoured(bad_server: BadServer, box: Sandbox, base: Path) -> None:
    url = serve(bad_server, base)
    result = box.run(**http_env(url), http_proxy="http://127.0.0.1:9", no_proxy="127.0.0.1")
    assert result.returncode == 0, result.stderr
    assert same_image(base, box.disk)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_proxy_ca_dir_is_trusted_too(
    bad_tls_server: BadServer, box: Sandbox, base: Path, tmp_path: Path, fmt: str
) -> None:
    # CDIConfig importProxy.trustedCAProxy reaches the importer as IMPORTER_PROXY_CERT_DIR; a
    # TLS-intercepting proxy presents certificates of that CA, so it must verify the source.
    proxy_certs = tmp_path / "proxycerts"
    proxy_certs.mkdir()
    assert bad_tls_server.ca_file
    (proxy_certs / "ca.crt").write_bytes(Path(bad_tls_server.ca_file).read_bytes())
    image = base if fmt == "raw" else convert(base, tmp_path / "img.qcow2", "qcow2")
    result = box.run(
        **http_env(serve(bad_tls_server, image)), IMPORTER_PROXY_CERT_DIR=str(proxy_certs)
    )
    assert result.returncode == 0, result.stderr
    assert same_image(base, box.disk)


def test_proxy_ca_dir_missing_is_a_settings_error(box: Sandbox, tmp_path: Path) -> None:
    result = box.run(
        **http_env("https://127.0.0.1:9/img.raw"),
        IMPORTER_PROXY_CERT_DIR=str(tmp_path / "absent"),
    )
    assert result.returncode == 1
    assert "IMPORTER_PROXY_CERT_DIR" in result.termination
    assert "is not a directory" in result.termination
