"""Fixtures every test package shares: a clean proxy environment, the in-process server, the whole
local stack (`node`: server + provisioner + agent; `stack`: `node` plus the controllers) and an S3
server (`moto_endpoint`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support.cluster import Cluster, running_server
from tests.support.stack import moto_server, running_controllers, running_node

PROXY_VARIABLES = ("http_proxy", "https_proxy", "no_proxy", "all_proxy")


@pytest.fixture(autouse=True)
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy set on the machine would route our 127.0.0.1 requests away; tests set their own."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """The API server in-process (plain HTTP on 127.0.0.1), with no node and no controllers."""
    async with running_server(tmp_path / "cdi") as running:
        yield running


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Cluster]:
    """Server, local provisioner and node agent (short timings); no controllers."""
    async with running_node(tmp_path / "cdi") as running:
        yield running


@pytest.fixture
async def stack(node: Cluster) -> AsyncIterator[Cluster]:
    """`node` plus the controllers."""
    async with running_controllers(node.client):
        yield node


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    """An in-process S3 (moto) on 127.0.0.1; one per module, since starting it takes ~1 s."""
    with moto_server() as endpoint:
        yield endpoint
