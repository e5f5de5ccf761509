"""The whole local stack in-process for end-to-end tests: `running_node` (API server, local
provisioner and node agent with short timings) and `running_controllers` on top of it, plus the
moto S3 server. Every context manager stops what it started, whatever happened inside."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Final

from cdi.agent import AgentSettings, run_agent
from cdi.controller.manager import run_controllers
from cdi.kube.client import Client
from cdi.provisioner import ProvisionerSettings, run_provisioner
from tests.support.cluster import Cluster, running_server

LOOP_STOP_TIMEOUT: Final = 15.0
AGENT_SETTINGS: Final = AgentSettings(
    backoff_base=0.2,
    backoff_max=1.0,
    poll_interval=0.1,
    memory_poll=0.05,
    max_grace=3.0,
    shutdown_grace=3.0,
)
PROVISIONER_SETTINGS: Final = ProvisionerSettings(usage_interval=0.2, retry_delay=0.2)


@contextlib.asynccontextmanager
async def running_node(data_dir: Path) -> AsyncIterator[Cluster]:
    """Server, provisioner and agent; no controllers."""
    async with running_server(data_dir) as cluster:
        stop = asyncio.Event()
        client = cluster.client
        tasks = [
            asyncio.create_task(
                run_provisioner(
                    client, root=cluster.data_dir, stop=stop, settings=PROVISIONER_SETTINGS
                )
            ),
            asyncio.create_task(
                run_agent(client, root=cluster.data_dir, stop=stop, settings=AGENT_SETTINGS)
            ),
        ]
        try:
            yield cluster
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), LOOP_STOP_TIMEOUT)


@contextlib.asynccontextmanager
async def running_controllers(client: Client) -> AsyncIterator[None]:
    """The controllers of `cdi server` (local mode) until the block ends."""
    stop = asyncio.Event()
    task = asyncio.create_task(run_controllers(client, stop=stop, local=True))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, LOOP_STOP_TIMEOUT)


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """An in-process S3 (moto) on 127.0.0.1; yields its endpoint URL."""
    # Imported here: moto takes about a second to import, and most tests never need it.
    from moto.server import ThreadedMotoServer  # noqa: PLC0415

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()
