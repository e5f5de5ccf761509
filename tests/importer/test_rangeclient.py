"""The sync range client against the misbehaving server: each misbehaviour gives the documented
error, or a correct result after resuming. No nbdkit here; see test_nbdkit_plugin.py for that."""

from __future__ import annotations

import base64
import json
import os
import threading
import tracemalloc
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from importer.rangeclient import (
    READ_STEP,
    HttpTransport,
    RangeCheckError,
    RangeProtocolError,
    RangeReader,
    RedirectError,
    S3Location,
    SourceConfig,
    SourceError,
    SourceRefusedError,
    SourceSizeError,
    SourceUnavailableError,
    TLSVerifyError,
    open_reader,
    redact_url,
)
from tests.support.httpserver import BadServer, TestCA

MiB = 1024 * 1024
# Odd on purpose: not a multiple of any block or request size used below.
SIZE = 3 * MiB + 12345
PATH = "/disk.img"


@pytest.fixture
def data(bad_server: BadServer) -> bytes:
    payload = os.urandom(SIZE)
    bad_server.add_file(PATH.lstrip("/"), payload)
    return payload


def make_config(server: BadServer, path: str = PATH, **overrides: Any) -> SourceConfig:
    """Fast retries and short timeouts: every failure case here must finish in well under 1 s."""
    fields: dict[str, Any] = {
        "kind": "http",
        "url": server.url(path),
        "size": SIZE,
        "retries": 3,
        "backoff": 0.001,
        "timeout": 2.0,
        "ca_file": server.ca_file,
    }
    fields.update(overrides)
    return SourceConfig(**fields)


@pytest.fixture
def reader(bad_server: BadServer, data: bytes) -> Iterator[RangeReader]:
    reader, _ = open_reader(make_config(bad_server))
    with reader:
        bad_server.clear_requests()
        yield reader


def gets(server: BadServer, path: str = PATH) -> list[str | None]:
    """Range headers of the GETs the server saw for `path`, in order."""
    return [r.range for r in server.requests_for(path, "GET")]


# ---- correct servers ------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [17, 512, 65536, MiB], ids=["17B", "512B", "64KiB", "1MiB"])
def test_reads_every_byte_at_odd_chunk_sizes(reader: RangeReader, data: bytes, chunk: int) -> None:
    # 300 requests at most (one request per read): small chunks cover a window, large ones all.
    start = 1000
    end = min(SIZE, start + 300 * chunk)
    out = bytearray(end)
    # From an odd offset to the end of the window (ragged last chunk), then the bytes before it.
    for offset in [*range(start, end, chunk), *range(0, start, chunk)]:
        stop = min(offset + chunk, end if offset >= start else start)
        with memoryview(out)[offset:stop] as view:
            assert reader.readinto(view, offset) == stop - offset
    assert out == data[:end]


def test_probe_reports_size_and_headers(bad_server: BadServer, data: bytes) -> None:
    bad_server.behave(PATH, content_type="application/x-qemu-disk")
    reader, info = open_reader(make_config(bad_server, size=None))
    with reader:
        assert (info.size, reader.size) == (SIZE, SIZE)
        assert info.content_type == "application/x-qemu-disk"
        assert info.accept_ranges == "bytes"
    # The probe is one ranged GET of the first byte, never a full download.
    assert gets(bad_server) == ["bytes=0-0"]


def test_large_reads_are_split_into_max_request_ranges(bad_server: BadServer, data: bytes) -> None:
    reader, _ = open_reader(make_config(bad_server, max_request=MiB))
    bad_server.clear_requests()
    with reader:
        assert reader.read(10, SIZE - 10) == data[10:]
    assert gets(bad_server) == [
        f"bytes={10 + i * MiB}-{min(10 + (i + 1) * MiB, SIZE) - 1}" for i in range(4)
    ]


def test_reads_land_in_the_callers_buffer_without_a_copy(bad_server: BadServer) -> None:
    size = 16 * MiB
    bad_server.add_file("big.img", os.urandom(size))
    reader, _ = open_reader(make_config(bad_server, "/big.img", size=size, max_request=size))
    out = bytearray(size)
    with reader:
        tracemalloc.start()
        try:
            reader.readinto(out, 0)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert out == (Path(bad_server.root) / "big.img").read_bytes()
    # A copying read holds each READ_STEP (1 MiB) once more as bytes (measured: 1.2 MB peak);
    # reading in place leaves only the server thread's 64 KiB chunks (measured: 0.3 MB).
    assert peak < READ_STEP // 2, f"peak {peak} bytes held while reading {size}"


def test_threads_share_one_reader(reader: RangeReader, data: bytes) -> None:
    pieces = [(offset, min(offset + 200_000, SIZE)) for offset in range(0, SIZE, 200_000)]

    def read(piece: tuple[int, int]) -> bool:
        start, end = piece
        return reader.read(start, end - start) == data[start:end]

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert all(pool.map(read, pieces))


@pytest.mark.parametrize(
    "offset,length",
    [(-1, 10), (SIZE, 1), (SIZE - 5, 6), (0, SIZE + 1)],
    ids=["negative", "at-end", "straddles-end", "too-long"],
)
def test_reads_outside_the_source_are_refused_before_any_request(
    bad_server: BadServer, reader: RangeReader, offset: int, length: int
) -> None:
    with pytest.raises(RangeCheckError, match="outside the source"):
        reader.readinto(bytearray(length), offset)
    assert bad_server.requests == []


# ---- transient failures: retried, resumed from the offset reached ----------------------------


def test_dropped_connections_resume_from_the_offset_reached(
    bad_server: BadServer, reader: RangeReader, data: bytes
) -> None:
    bad_server.behave(PATH, drop_after=400_000, drop_times=2)
    assert reader.read(100, 2 * MiB) == data[100 : 100 + 2 * MiB]
    last = 100 + 2 * MiB - 1
    # Each retry asks only for what is still missing; nothing is read twice.
    assert gets(bad_server) == [
        f"bytes=100-{last}",
        f"bytes=400100-{last}",
        f"bytes=800100-{last}",
    ]


def test_flaky_server_succeeds_after_503s(
    bad_server: BadServer, reader: RangeReader, data: bytes
) -> None:
    bad_server.behave(PATH, flaky=2)
    assert reader.read(5, 1000) == data[5:1005]
    assert len(gets(bad_server)) == 3


def test_retries_back_off_exponentially_and_honour_retry_after(
    bad_server: BadServer, data: bytes
) -> None:
    sleeps: list[float] = []
    transport = HttpTransport(bad_server.url(PATH), timeout=2.0)
    reader = RangeReader(transport, size=SIZE, retries=4, backoff=0.25, sleep=sleeps.append)
    with reader:
        bad_server.behave(PATH, flaky=3)
        assert reader.read(0, 10) == data[:10]
        assert sleeps == [0.25, 0.5, 1.0]
        sleeps.clear()
        bad_server.behave(PATH, flaky=1, flaky_status=429, retry_after="7")
        assert reader.read(0, 10) == data[:10]
        assert sleeps == [7.0]


@pytest.mark.parametrize("status", [500, 503, 429])
def test_persistent_transient_failures_give_up_after_the_retries(
    bad_server: BadServer, reader: RangeReader, status: int
) -> None:
    bad_server.behave(PATH, status=status)
    with pytest.raises(SourceUnavailableError, match=f"giving up after 4 attempts.*HTTP {status}"):
        reader.read(0, 10)
    assert len(gets(bad_server)) == 4


def test_short_body_forever_gives_up(bad_server: BadServer, reader: RangeReader) -> None:
    bad_server.behave(PATH, short_body=100)
    with pytest.raises(SourceUnavailableError, match="short body"):
        reader.read(0, 5000)
    # The first request got all but 100 bytes; every retry asked only for those.
    assert gets(bad_server)[1:] == ["bytes=4900-4999"] * 3


def test_a_stall_times_out_and_resumes(bad_server: BadServer, data: bytes) -> None:
    reader, _ = open_reader(make_config(bad_server, timeout=0.3, retries=1))
    with reader:
        bad_server.behave(PATH, stall_after=1000, stall_times=1)
        assert reader.read(0, 100_000) == data[:100_000]
        bad_server.behave(PATH, stall_after=1000)
        with pytest.raises(SourceUnavailableError, match="timed out"):
            reader.read(0, 100_000)


def test_connection_refused_is_transient(tmp_path: Path) -> None:
    with BadServer(tmp_path) as server:
        url = server.url(PATH)
    transport = HttpTransport(url, timeout=1.0)
    with (
        RangeReader(transport, size=SIZE, retries=2, sleep=lambda _: None) as reader,
        pytest.raises(SourceUnavailableError, match=r"giving up after 3 attempts.*request failed"),
    ):
        reader.read(0, 10)


# ---- permanent failures: one request, a clear error --------------------------------------------

PERMANENT: list[tuple[dict[str, Any], type[SourceError], str]] = [
    ({"ignore_range": True}, RangeProtocolError, "ignored the Range header .200 instead of 206"),
    ({"wrong_content_range": "shift"}, RangeProtocolError, "does not match the requested bytes"),
    ({"wrong_content_range": "unknown-total"}, RangeProtocolError, "malformed Content-Range"),
    ({"wrong_content_range": "garbage"}, RangeProtocolError, "malformed Content-Range"),
    ({"wrong_content_range": "missing"}, RangeProtocolError, "without Content-Range"),
    ({"wrong_content_range": "total"}, SourceSizeError, f"reports size {SIZE + 4096}"),
    ({"lie_content_length": 10}, RangeProtocolError, "Content-Length 1010 does not match"),
    ({"content_encoding": "gzip"}, RangeProtocolError, "gzip-encoded"),
    ({"chunked": True, "extra_bytes": 5}, RangeProtocolError, "longer than the range"),
    ({"status": 404}, SourceRefusedError, "HTTP 404 Not Found"),
    ({"status": 403}, SourceRefusedError, "HTTP 403 Forbidden"),
    ({"status": 401}, SourceRefusedError, "HTTP 401 Unauthorized"),
    ({"basic_auth": ("admin", "password")}, SourceRefusedError, "HTTP 401"),
    ({"redirect_to": "file:///etc/passwd"}, RedirectError, "refusing redirect to scheme 'file'"),
    ({"redirect_to": "ftp://127.0.0.1/disk.img"}, RedirectError, "scheme 'ftp'"),
    ({"redirect_to": PATH}, RedirectError, "more than 5 redirects"),
]


@pytest.mark.parametrize(
    "knobs,error,message", PERMANENT, ids=[next(iter(k)) + "-" + m[:12] for k, _, m in PERMANENT]
)
def test_misbehaviour_is_refused_without_retrying(
    bad_server: BadServer,
    reader: RangeReader,
    knobs: dict[str, Any],
    error: type[SourceError],
    message: str,
) -> None:
    bad_server.behave(PATH, **knobs)
    with pytest.raises(error, match=message):
        reader.read(0, 1000)
    expected = 6 if "redirect_to" in knobs and knobs["redirect_to"] == PATH else 1
    assert len(gets(bad_server)) == expected


def test_a_correct_chunked_body_is_accepted(
    bad_server: BadServer, reader: RangeReader, data: bytes
) -> None:
    bad_server.behave(PATH, chunked=True)
    assert reader.read(77, 300_000) == data[77:300_077]


def test_refused_status_is_kept_on_the_error(bad_server: BadServer, reader: RangeReader) -> None:
    bad_server.behave(PATH, status=403)
    with pytest.raises(SourceRefusedError) as caught:
        reader.read(0, 1)
    assert caught.value.status == 403


def test_size_mismatch_is_found_by_the_probe(bad_server: BadServer, data: bytes) -> None:
    with pytest.raises(SourceSizeError, match=f"reports size {SIZE}, expected {SIZE + 1}"):
        open_reader(make_config(bad_server, size=SIZE + 1))


def test_the_probe_refuses_a_server_without_ranges(bad_server: BadServer, data: bytes) -> None:
    bad_server.behave(PATH, ignore_range=True, no_accept_ranges=True)
    with pytest.raises(RangeProtocolError, match="does not support byte ranges"):
        open_reader(make_config(bad_server))


def test_missing_accept_ranges_alone_is_fine_when_ranges_work(
    bad_server: BadServer, data: bytes
) -> None:
    bad_server.behave(PATH, no_accept_ranges=True, no_head=403)
    reader, info = open_reader(make_config(bad_server))
    with reader:
        assert info.accept_ranges is None
        assert reader.read(SIZE - 10, 10) == data[-10:]


# ---- redirects, credentials, headers ---------------------------------------------------------


def test_redirects_are_followed_and_checked_each_time(bad_server: BadServer, data: bytes) -> None:
    bad_server.behave("/old.img", redirect_to="/moved.img", redirect_status=301)
    bad_server.behave("/moved.img", redirect_to=bad_server.url(PATH), redirect_status=307)
    reader, info = open_reader(make_config(bad_server, "/old.img"))
    with reader:
        assert reader.read(1, 100) == data[1:101]
    assert info.url == bad_server.url(PATH)


def test_https_to_http_downgrade_is_refused(
    bad_server: BadServer, bad_tls_server: BadServer, data: bytes
) -> None:
    bad_tls_server.behave(PATH, redirect_to=bad_server.url(PATH))
    with pytest.raises(RedirectError, match="from https down to http"):
        open_reader(make_config(bad_tls_server))
    assert bad_server.requests == []


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_basic_auth_and_extra_headers_reach_the_server(bad_server: BadServer, data: bytes) -> None:
    bad_server.behave(PATH, basic_auth=("admin", "s3cret"))
    headers = {"Authorization": basic("admin", "s3cret"), "X-Cdi-Test": "extra"}
    reader, _ = open_reader(make_config(bad_server, headers=headers))
    with reader:
        assert reader.read(0, 64) == data[:64]
    for request in bad_server.requests:
        assert request.headers["X-Cdi-Test"] == "extra"
        assert request.headers["Accept-Encoding"] == "identity"
        assert request.headers["User-Agent"] == "cdi-py-importer"


def test_userinfo_in_the_url_becomes_basic_auth_and_leaves_messages(
    bad_server: BadServer, data: bytes
) -> None:
    bad_server.behave(PATH, basic_auth=("admin", "p@ss word"))
    url = bad_server.url(PATH).replace("://", "://admin:p%40ss%20word@")
    reader, _ = open_reader(make_config(bad_server, url=url))
    with reader:
        assert "p%40ss" not in reader.name
        assert reader.read(0, 8) == data[:8]
        bad_server.behave(PATH, status=404)
        with pytest.raises(SourceRefusedError) as caught:
            reader.read(0, 8)
    assert "admin" not in str(caught.value)
    assert "word" not in str(caught.value)


def test_authorization_is_not_sent_to_another_origin(
    bad_server: BadServer, tmp_path: Path, data: bytes
) -> None:
    other_root = tmp_path / "other"
    other_root.mkdir()
    with BadServer(other_root) as other:
        other.add_file("disk.img", data)
        bad_server.behave(PATH, redirect_to=other.url(PATH))
        headers = {"Authorization": basic("u", "p"), "X-Cdi-Test": "extra"}
        reader, _ = open_reader(make_config(bad_server, headers=headers))
        with reader:
            assert reader.read(0, 8) == data[:8]
        assert all("Authorization" in r.headers for r in bad_server.requests)
        assert other.requests
        for request in other.requests:
            assert "Authorization" not in request.headers
            assert request.headers["X-Cdi-Test"] == "extra"


def test_redact_url_drops_userinfo_and_query() -> None:
    assert (
        redact_url("https://u:p@example.com:8443/a/b.img?X-Amz-Signature=abc#frag")
        == "https://example.com:8443/a/b.img?…"
    )
    assert redact_url("http://[::1]/x") == "http://[::1]/x"


# ---- TLS -------------------------------------------------------------------------------------


def test_https_with_the_right_ca(bad_tls_server: BadServer) -> None:
    payload = os.urandom(SIZE)
    bad_tls_server.add_file("disk.img", payload)
    reader, _ = open_reader(make_config(bad_tls_server))
    with reader:
        assert reader.read(SIZE - 1000, 1000) == payload[-1000:]


@pytest.mark.parametrize("ca", ["system", "other-ca"])
def test_https_with_an_unknown_ca_fails(bad_tls_server: BadServer, tmp_path: Path, ca: str) -> None:
    bad_tls_server.add_file("disk.img", os.urandom(SIZE))
    ca_file = None if ca == "system" else str(TestCA.create("other").write_cert(tmp_path / "o.pem"))
    with pytest.raises(TLSVerifyError, match="certificate verification failed"):
        open_reader(make_config(bad_tls_server, ca_file=ca_file))
    # Verification failures are permanent: no retries.
    assert bad_tls_server.requests == []


def test_insecure_skips_verification(bad_tls_server: BadServer) -> None:
    payload = os.urandom(SIZE)
    bad_tls_server.add_file("disk.img", payload)
    reader, _ = open_reader(make_config(bad_tls_server, ca_file=None, insecure=True))
    with reader:
        assert reader.read(0, 100) == payload[:100]


# ---- proxies ---------------------------------------------------------------------------------


@pytest.mark.parametrize("variable", ["http_proxy", "HTTP_PROXY"])
def test_http_proxy_from_the_environment(
    bad_server: BadServer, data: bytes, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    # The bad server doubles as a forward proxy: it serves absolute-form targets by their path.
    monkeypatch.setenv(variable, bad_server.base_url)
    config = make_config(bad_server, url="http://images.example.invalid/disk.img")
    reader, _ = open_reader(config)
    with reader:
        assert reader.read(3, 30) == data[3:33]
    assert {r.target for r in bad_server.requests} == {"http://images.example.invalid/disk.img"}


def test_no_proxy_bypasses_the_proxy(
    bad_server: BadServer, data: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    reader, _ = open_reader(make_config(bad_server))
    with reader:
        assert reader.read(0, 10) == data[:10]
    assert {r.target for r in bad_server.requests} == {PATH}


# ---- configuration file ----------------------------------------------------------------------


def test_config_round_trips_through_a_0600_file(tmp_path: Path) -> None:
    config = SourceConfig(
        kind="s3",
        url="s3://bucket/key",
        size=123,
        headers={"X-A": "b"},
        s3=S3Location(bucket="bkt", key="k", access_key="AK", secret_key="SK", endpoint_url="x"),
        retries=2,
    )
    path = tmp_path / "source.json"
    path.write_text("{}")
    path.chmod(0o644)
    config.save(str(path))
    assert path.stat().st_mode & 0o777 == 0o600
    assert SourceConfig.load(str(path)) == config
    assert "SK" not in repr(config)
    assert "X-A" not in repr(config)


def test_config_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "source.json"
    path.write_text(json.dumps({"kind": "http", "url": "http://x/y", "size": 1}))
    path.chmod(0o640)
    with pytest.raises(ValueError, match="must be 0600"):
        SourceConfig.load(str(path))


@pytest.mark.parametrize(
    "raw,message",
    [
        ({"kind": "http", "url": "http://x/", "colour": "red"}, "unknown key.*colour"),
        ({"kind": "ftp", "url": "ftp://x/"}, "kind must be"),
        ({"kind": "http"}, "needs a 'url'"),
        ({"kind": "s3"}, "needs an 's3' section"),
        ({"kind": "s3", "s3": {"bucket": "b"}}, "needs both"),
        ({"kind": "s3", "s3": {"bucket": "b", "key": "k", "acl": 1}}, "unknown key.*acl"),
        ({"kind": "http", "url": "http://x/", "size": True}, "'size' has the wrong type"),
        ({"kind": "http", "url": "http://x/", "size": -1}, "must not be negative"),
        ({"kind": "http", "url": "http://x/", "retries": 1000}, "retries"),
        ({"kind": "http", "url": "http://x/", "max_request": 0}, "max_request"),
        ({"kind": "http", "url": "http://x/", "headers": {"a": 1}}, "strings to strings"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_configs_are_rejected(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SourceConfig.from_dict(raw)


# ---- S3 --------------------------------------------------------------------------------------


@pytest.fixture
def s3_object(moto_endpoint: str) -> tuple[S3Location, bytes]:
    payload = os.urandom(2 * MiB + 333)
    client = boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}),
    )
    bucket = f"bkt-{threading.get_ident() % 100000}"
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key="images/disk.img", Body=payload)
    location = S3Location(
        bucket=bucket,
        key="images/disk.img",
        endpoint_url=moto_endpoint,
        access_key="test",
        secret_key="test",
    )
    return location, payload


def test_s3_ranged_reads(s3_object: tuple[S3Location, bytes]) -> None:
    location, payload = s3_object
    config = SourceConfig(kind="s3", s3=location, size=len(payload), max_request=MiB, backoff=0.001)
    reader, info = open_reader(config)
    with reader:
        assert info.size == len(payload)
        assert reader.read(0, len(payload)) == payload
        assert reader.read(12345, 17) == payload[12345:12362]


def test_s3_missing_key_is_refused(s3_object: tuple[S3Location, bytes]) -> None:
    location, _ = s3_object
    missing = S3Location(
        bucket=location.bucket,
        key="nope",
        endpoint_url=location.endpoint_url,
        access_key="test",
        secret_key="test",
    )
    with pytest.raises(SourceRefusedError, match="404 NoSuchKey"):
        open_reader(SourceConfig(kind="s3", s3=missing, retries=0))


def test_s3_size_mismatch(s3_object: tuple[S3Location, bytes]) -> None:
    location, _ = s3_object
    with pytest.raises(SourceSizeError, match="expected 5"):
        open_reader(SourceConfig(kind="s3", s3=location, size=5))
