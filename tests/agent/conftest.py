"""Fixtures for the node agent and provisioner tests: the real API server in-process, and the
loops under test with short timings (back-off from 0.2 s, polls of 50-100 ms)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from cdi.agent import run_agent
from cdi.provisioner import run_provisioner
from tests.support.cluster import Cluster
from tests.support.stack import AGENT_SETTINGS, LOOP_STOP_TIMEOUT, PROVISIONER_SETTINGS

__all__ = ["AGENT_SETTINGS", "LOOP_STOP_TIMEOUT", "PROVISIONER_SETTINGS"]


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
