"""The real embedded API server, in-process, for tests that need "a cluster": `running_server`.

Starts `cdi.cli.server.serve` on 127.0.0.1, port 0, plain HTTP, with a fresh data dir and
without its local node (agent and provisioner: the tests start their own), and yields a `Client`
built from the kubeconfig the server wrote, as any user of the server would.
Also `eventually`, the bounded poll every asynchronous assertion goes through.

Used by tests/agent (and anything else that wants objects served for real). Must not leave the
server running after its `async with`, whatever happened inside.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from cdi.cli.server import ServerSettings, serve
from cdi.kube.client import Client
from cdi.kube.config import load_kubeconfig

T = TypeVar("T")

START_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0


@dataclass(frozen=True)
class Cluster:
    client: Client
    data_dir: Path


@contextlib.asynccontextmanager
async def running_server(data_dir: Path) -> AsyncIterator[Cluster]:
    # Tests run the node agent, provisioner and controllers themselves, with short timings; a
    # second set started by serve() would run every pod twice and rewrite what tests watch.
    settings = ServerSettings(
        data_dir=data_dir,
        host="127.0.0.1",
        port=0,
        insecure_http=True,
        local_node=False,
        controllers=False,
    )
    ready, stop = asyncio.Event(), asyncio.Event()
    server = asyncio.create_task(serve(settings, ready=ready, stop=stop))
    started = asyncio.create_task(ready.wait())
    done, _ = await asyncio.wait(
        {server, started}, timeout=START_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
    )
    try:
        if server in done:
            server.result()
            raise RuntimeError("the API server stopped while starting")
        if started not in done:
            raise RuntimeError(f"the API server did not start in {START_TIMEOUT} s")
        client = Client(load_kubeconfig(settings.kubeconfig_path), backoff=(0.1, 0.2, 0.5))
        try:
            yield Cluster(client, data_dir)
        finally:
            await client.close()
    finally:
        started.cancel()
        stop.set()
        await asyncio.wait_for(server, STOP_TIMEOUT)


async def eventually(
    probe: Callable[[], Awaitable[T | None]],
    *,
    within: float = 10.0,
    interval: float = 0.05,
    what: str = "the condition",
) -> T:
    """Poll `probe` until it returns something truthy (returned), or fail after `within` s."""
    deadline = time.monotonic() + within
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:g} s waiting for {what}")
        await asyncio.sleep(interval)
