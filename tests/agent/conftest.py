"""Fixtures for the node agent and provisioner tests: the real API server in-process, and the
loops under test with short timings (back-off from 0.2 s, polls of 50-100 ms)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cdi.agent import AgentSettings, run_agent
from cdi.provisioner import ProvisionerSettings, run_provisioner
from tests.support.cluster import Cluster, running_server

LOOP_STOP_TIMEOUT = 15.0
AGENT_SETTINGS = AgentSettings(
    backoff_base=0.2,
    backoff_max=1.0,
    poll_interval=0.1,
    memory_poll=0.05,
    max_grace=3.0,
    shutdown_grace=3.0,
)
PROVISIONER_SETTINGS = ProvisionerSettings(usage_interval=0.2, retry_delay=0.2)
PROXY_VARIABLES = ("http_proxy", "https_proxy", "no_proxy", "all_proxy")


@pytest.fixture(autouse=True)
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy set on the machine would route our 127.0.0.1 requests away."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with running_server(tmp_path / "cdi") as running:
        yield running


@pytest.fixture
async def provisioner(cluster: Cluster) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_provisioner(
            cluster.client, root=cluster.data_dir, stop=stop, settings=PROVISIONER_SETTINGS
        )
    )
    yield
    stop.set()
    await asyncio.wait_for(task, LOOP_STOP_TIMEOUT)


@pytest.fixture
async def agent(cluster: Cluster) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_agent(cluster.client, root=cluster.data_dir, stop=stop, settings=AGENT_SETTINGS)
    )
    yield
    stop.set()
    await asyncio.wait_for(task, LOOP_STOP_TIMEOUT)
