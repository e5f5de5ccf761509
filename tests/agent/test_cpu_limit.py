"""CPU limits (`resources.limits.cpu`) applied by duty cycling: a limited busy loop gets about its
share of a core, an unlimited one much more; a throttled (stopped) process is never left stopped,
whether its pod is deleted, its session ends mid-cycle or the throttle itself stops."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from cdi.agent.podspec import ConfigError, cpu_limit
from cdi.agent.processes import Limits, spawn
from cdi.agent.runner import CpuThrottle
from cdi.api.groups import POD
from tests.agent.test_agent import (
    NS,
    main_status,
    phase_is,
    pod_manifest,
    process_gone,
    running_pid,
)
from tests.support.cluster import Cluster, eventually

BUSY_SECONDS = 3
#: Busy for BUSY_SECONDS of wall time; writes "<cpu seconds> <wall seconds>" as its message.
BUSY = (
    "import os, time\n"
    "t = time.process_time(); s = time.time()\n"
    f"while time.time() - s < {BUSY_SECONDS}: pass\n"
    "with open(os.environ['CDI_TERMINATION_LOG'], 'w') as f:\n"
    "    f.write(f'{time.process_time() - t} {time.time() - s}')\n"
)
FOREVER = "while True: pass\n"


def state(pid: int) -> str:
    """The process's state letter ('T': stopped), '' once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return ""
    return raw[raw.rfind(b")") + 2 :].decode()[:1]


async def stopped(pid: int) -> None:
    async def probe() -> bool:
        return state(pid) == "T"

    await eventually(probe, within=5.0, interval=0.005, what=f"process {pid} stopped")


def test_cpu_limit_quantities() -> None:
    assert cpu_limit(None) is None
    assert cpu_limit("750m") == 0.75
    assert cpu_limit("0.5") == 0.5
    assert cpu_limit("1") == 1.0
    assert cpu_limit(2) == 2.0
    assert cpu_limit("0") is None  # no limit, as under a kubelet
    assert cpu_limit("1m") == 0.01  # the kubelet's smallest quota
    with pytest.raises(ConfigError, match="negative"):
        cpu_limit("-1")
    with pytest.raises(ConfigError, match="not a quantity"):
        cpu_limit("lots")


@pytest.mark.usefixtures("agent")
async def test_cpu_limit_holds_a_busy_loop_to_its_share(cluster: Cluster) -> None:
    client = cluster.client
    command = [sys.executable, "-c", BUSY]
    # Side by side: the unlimited loop takes one core of a two-core box, the other gets its share.
    await client.create(POD, pod_manifest("slow", command, limits={"cpu": "250m"}))
    await client.create(POD, pod_manifest("fast", command))
    rates = {}
    for name in ("slow", "fast"):
        pod = await phase_is(client, name, "Succeeded", "Failed", within=BUSY_SECONDS + 15)
        terminated = main_status(pod)["state"]["terminated"]
        assert terminated["exitCode"] == 0, terminated
        cpu, wall = map(float, terminated["message"].split())
        rates[name] = cpu / wall
        print(f"{name}: cpu={cpu:.3f}s wall={wall:.3f}s rate={cpu / wall:.3f}")
    assert 0.1 < rates["slow"] < 0.45, rates
    assert rates["fast"] > 0.6, rates


@pytest.mark.usefixtures("agent")
async def test_a_throttled_pod_deleted_dies_at_sigterm(cluster: Cluster) -> None:
    """Deleted while stopped by the throttle, the process acts on SIGTERM at once: it is not left
    stopped until the grace period ends in SIGKILL."""
    client = cluster.client
    # At 10m a stop lasts about 10 s (a period's run repaid at 1 % of a core): far past the grace.
    manifest = pod_manifest("spinner", [sys.executable, "-c", FOREVER], limits={"cpu": "10m"})
    manifest["spec"]["terminationGracePeriodSeconds"] = 30  # the test agent caps it at 3 s
    manifest["metadata"]["finalizers"] = ["example.com/hold"]  # to read how it ended
    await client.create(POD, manifest)
    pid = await running_pid(client, "spinner")
    await stopped(pid)
    began = time.monotonic()
    await client.delete(POD, "spinner", NS)
    await process_gone(pid)
    seconds = time.monotonic() - began
    print(f"deleted while stopped: gone after {seconds:.3f}s")
    assert seconds < 1.5
    pod = await phase_is(client, "spinner", "Failed")
    terminated = main_status(pod)["state"]["terminated"]
    assert (terminated["exitCode"], terminated.get("signal")) == (143, signal.SIGTERM)
    await client.patch(POD, "spinner", {"metadata": {"finalizers": None}}, NS)


async def test_the_throttle_leaves_nothing_stopped(tmp_path: Path) -> None:
    """Sessions that end while stopped do not disturb the throttle; when it stops (as it does
    with the agent) it continues what it stopped; a limit of every core is not throttled."""
    throttle = CpuThrottle(0.05)
    assert not throttle.track(1, float(throttle.cores))
    argv = [sys.executable, "-c", FOREVER]
    doomed = await spawn(argv, env=dict(os.environ), cwd=tmp_path, limits=Limits())
    survivor = await spawn(argv, env=dict(os.environ), cwd=tmp_path, limits=Limits())
    task = asyncio.create_task(throttle.run())
    try:
        assert throttle.track(doomed.pid, 0.1)
        assert throttle.track(survivor.pid, 0.1)
        await stopped(doomed.pid)
        doomed.kill()  # its session ends mid-cycle
        await doomed.wait()
        await asyncio.sleep(0.3)
        assert not task.done()
        throttle.untrack(doomed.pid)
        await stopped(survivor.pid)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert state(survivor.pid) in ("R", "S"), state(survivor.pid)
    finally:
        task.cancel()
        for proc in (doomed, survivor):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
