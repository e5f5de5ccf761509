"""Fixtures for the node agent and provisioner tests: the real API server in-process, and the
loops under test with short timings (back-off from 0.2 s, polls of 50-100 ms)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from cdi.agent import AgentSettings, run_agent
from cdi.provisioner import ProvisionerSettings, run_provisioner
from tests.support.cluster import Cluster

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
