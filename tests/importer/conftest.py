"""Fixtures for importer tests: the bad HTTP(S) server, an S3 server (moto), a clean proxy env."""

from __future__ import annotations

from tests.support.httpserver import bad_server, bad_tls_server

__all__ = ["bad_server", "bad_tls_server"]
