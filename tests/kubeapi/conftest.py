"""`cdi server` as a real subprocess, for tests that talk to it through `kubectl` or `cdi.kube`.

The server itself is `tests.support.cdiserver.CdiServer` (started with `--no-controllers` here:
these tests hold the API to Kubernetes' semantics, and no controller may rewrite the objects
they create); its names are re-exported for the tests of this package.

Fixtures:
    cdi_server        one server per test module (tests isolate themselves with `namespace`)
    fresh_cdi_server  one server per test (restart, stop and compaction tests)
    namespace         a new namespace named after the test, on `cdi_server`
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cdiserver import (
    KUBECTL,
    KUBECTL_TIMEOUT,
    REPO,
    START_TIMEOUT,
    STOP_TIMEOUT,
    TEARDOWN_STOP_TIMEOUT,
    USERS,
    CdiServer,
    ServerError,
    dns_label,
    poll,
    running_server,
)

__all__ = [
    "KUBECTL",
    "KUBECTL_TIMEOUT",
    "REPO",
    "START_TIMEOUT",
    "STOP_TIMEOUT",
    "TEARDOWN_STOP_TIMEOUT",
    "USERS",
    "CdiServer",
    "ServerError",
    "dns_label",
    "poll",
]


@pytest.fixture(scope="module")
def cdi_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CdiServer]:
    yield from running_server(tmp_path_factory.mktemp("cdi-server") / "data")


@pytest.fixture
def fresh_cdi_server(tmp_path: Path) -> Iterator[CdiServer]:
    yield from running_server(tmp_path / "data")


_NS_SEQ = iter(range(1, 1 << 30))


@pytest.fixture
def namespace(cdi_server: CdiServer, request: pytest.FixtureRequest) -> str:
    name = f"{dns_label(request.node.name, 52)}-{next(_NS_SEQ)}"
    cdi_server.kubectl("create", "namespace", name)
    return name
