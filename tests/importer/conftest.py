"""Fixtures for importer tests: the bad HTTP(S) server, an S3 server (moto), a clean proxy env."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.httpserver import bad_server, bad_tls_server

__all__ = ["bad_server", "bad_tls_server", "moto_endpoint"]


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    """An in-process S3 (moto) on 127.0.0.1; one per module, since starting it takes ~1 s."""
    # Imported here: moto takes about a second to import, and most importer tests never need it.
    from moto.server import ThreadedMotoServer  # noqa: PLC0415

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()
