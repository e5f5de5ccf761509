"""The bad server's own knobs, checked with a plain HTTP client, so that tests relying on it
fail for their own reasons, not because the server misbehaves in a way nobody asked for."""

from __future__ import annotations

import os
import ssl
import time
import urllib.request

import pytest
import urllib3

from tests.support.httpserver import BadServer

SIZE = 100_000


@pytest.fixture
def data(bad_server: BadServer) -> bytes:
    payload = os.urandom(SIZE)
    bad_server.add_file("f.img", payload)
    return payload


@pytest.fixture
def http() -> urllib3.PoolManager:
    return urllib3.PoolManager(retries=False, timeout=5.0)


def test_correct_by_default(bad_server: BadServer, data: bytes, http: urllib3.PoolManager) -> None:
    head = http.request("HEAD", bad_server.url("/f.img"))
    assert head.status == 200
    assert head.headers["Content-Length"] == str(SIZE)
    assert head.headers["Accept-Ranges"] == "bytes"
    ranged = http.request("GET", bad_server.url("/f.img"), headers={"Range": "bytes=10-19"})
    assert (ranged.status, ranged.headers["Content-Range"]) == (206, f"bytes 10-19/{SIZE}")
    assert ranged.data == data[10:20]
    suffix = http.request("GET", bad_server.url("/f.img"), headers={"Range": "bytes=-7"})
    assert suffix.data == data[-7:]
    past = http.request("GET", bad_server.url("/f.img"), headers={"Range": f"bytes={SIZE}-"})
    assert (past.status, past.headers["Content-Range"]) == (416, f"bytes */{SIZE}")
    assert http.request("GET", bad_server.url("/missing")).status == 404
    assert http.request("GET", bad_server.url("/../../etc/passwd")).status == 404
    assert [(r.method, r.path) for r in bad_server.requests][:2] == [
        ("HEAD", "/f.img"),
        ("GET", "/f.img"),
    ]


def test_head_flaky_and_reset(
    bad_server: BadServer, data: bytes, http: urllib3.PoolManager
) -> None:
    bad_server.behave("/f.img", no_head=True, flaky=1)
    assert http.request("GET", bad_server.url("/f.img")).status == 503
    assert http.request("HEAD", bad_server.url("/f.img")).status == 405
    assert http.request("GET", bad_server.url("/f.img")).data == data
    bad_server.behave("/f.img", no_head=403)
    assert http.request("HEAD", bad_server.url("/f.img")).status == 403
    bad_server.reset()
    assert http.request("HEAD", bad_server.url("/f.img")).status == 200
    assert len(bad_server.requests) == 1


def test_redirects_are_sent_as_told(bad_server: BadServer, http: urllib3.PoolManager) -> None:
    bad_server.behave("/r", redirect_to="ftp://example.invalid/x", redirect_status=308)
    resp = http.request("GET", bad_server.url("/r"), redirect=False)
    assert (resp.status, resp.headers["Location"]) == (308, "ftp://example.invalid/x")


def test_throttle_slows_the_body(bad_server: BadServer, data: bytes) -> None:
    bad_server.behave("/f.img", throttle=1_000_000)
    started = time.monotonic()
    with urllib.request.urlopen(bad_server.url("/f.img"), timeout=5) as resp:
        assert resp.read() == data
    assert time.monotonic() - started >= 0.08


def test_tls_certificate_verifies_with_the_test_ca(bad_tls_server: BadServer) -> None:
    bad_tls_server.add_file("f.img", b"hello")
    assert bad_tls_server.ca_file is not None
    context = ssl.create_default_context(cafile=bad_tls_server.ca_file)
    with urllib.request.urlopen(bad_tls_server.url("/f.img"), context=context, timeout=5) as resp:
        assert resp.read() == b"hello"
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(bad_tls_server.url("/f.img"), timeout=5)
