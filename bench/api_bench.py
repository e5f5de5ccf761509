"""API server benchmark: writes, latency and watch delivery of `cdi server`, next to a floor.

Ours: `cdi server --insecure-http` (the embedded Kubernetes-compatible API over SQLite). 20
concurrent clients create N ConfigMaps and N DataVolumes, then merge-patch each once, while 10
watchers follow both kinds. Reported: requests/s, p50/p99 write latency, watch delivery lag
(create answered -> event seen), and events lost or out of order per object.
Floor: a trivial aiohttp handler that inserts the same JSON into SQLite (WAL), in its own process
like ours, driven by the same clients: the cost of our stack with nothing of Kubernetes in it.
Targets (issue 4): p99 write latency < 50 ms; no event lost or reordered.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
CLIENTS = 20
WATCHERS = 10

FLOOR_SERVER = r"""
import json, sqlite3, sys
from aiohttp import web
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute("CREATE TABLE IF NOT EXISTS o (k TEXT PRIMARY KEY, v TEXT)")
async def put(request):
    body = await request.read()
    obj = json.loads(body)
    key = obj.get("metadata", {}).get("name") or request.match_info["tail"]
    db.execute("INSERT OR REPLACE INTO o VALUES (?, ?)", (key, body.decode()))
    return web.json_response(obj, status=201)
app = web.Application()
app.router.add_post("/{tail:.*}", put)
app.router.add_patch("/{tail:.*}", put)
port = int(sys.argv[2])
web.run_app(app, host="127.0.0.1", port=port, print=lambda *a: print("READY", flush=True))
"""


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dv(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "cdi.kubevirt.io/v1beta1",
        "kind": "DataVolume",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "source": {"http": {"url": f"http://example.org/{name}.qcow2"}},
            "storage": {"resources": {"requests": {"storage": "1Gi"}}},
        },
    }


def cm(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": "default"},
        "data": {"key": name * 4},
    }


async def drive(base: str, headers: dict[str, str], count: int, *, watch: bool) -> dict[str, Any]:
    paths = {
        "configmaps": "/api/v1/namespaces/default/configmaps",
        "datavolumes": "/apis/cdi.kubevirt.io/v1beta1/namespaces/default/datavolumes",
    }
    jobs: list[tuple[str, dict[str, Any]]] = []
    for i in range(count):
        jobs.append(("configmaps", cm(f"cm-{i:05d}")))
        jobs.append(("datavolumes", dv(f"dv-{i:05d}")))
    latencies: list[float] = []
    answered: dict[tuple[str, str], float] = {}
    seen: list[dict[tuple[str, str], list[tuple[str, float]]]] = [
        dict() for _ in range(WATCHERS if watch else 0)
    ]
    stop = asyncio.Event()
    async with aiohttp.ClientSession(
        headers=headers, timeout=aiohttp.ClientTimeout(total=None)
    ) as session:

        async def watcher(index: int, kind: str) -> None:
            params = {"watch": "true", "resourceVersion": rv[kind], "timeoutSeconds": "600"}
            async with session.get(base + paths[kind], params=params) as resp:
                ready.release()
                async for line in resp.content:
                    event = json.loads(line)
                    name = event["object"]["metadata"]["name"]
                    seen[index].setdefault((kind, name), []).append(
                        (event["type"], time.perf_counter())
                    )
                    if stop.is_set() and all(
                        len(seen[index].get(k, ())) >= 2 for k in answered if k[0] == kind
                    ):
                        return

        rv: dict[str, str] = {}
        tasks = []
        ready = asyncio.Semaphore(0)
        if watch:
            for kind, path in paths.items():
                async with session.get(base + path) as resp:
                    rv[kind] = (await resp.json())["metadata"]["resourceVersion"]
            for i in range(WATCHERS):
                for kind in paths:
                    tasks.append(asyncio.create_task(watcher(i, kind)))
            for _ in tasks:
                await ready.acquire()
        queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        for job in jobs:
            queue.put_nowait(job)

        async def client() -> None:
            while not queue.empty():
                kind, obj = queue.get_nowait()
                name = obj["metadata"]["name"]
                start = time.perf_counter()
                async with session.post(base + paths[kind], json=obj) as resp:
                    await resp.read()
                    assert resp.status == 201, (resp.status, await resp.text())
                done = time.perf_counter()
                latencies.append(done - start)
                answered[(kind, name)] = done
                start = time.perf_counter()
                async with session.patch(
                    f"{base}{paths[kind]}/{name}",
                    data=json.dumps({"metadata": {"labels": {"patched": "yes"}}}),
                    headers={"Content-Type": "application/merge-patch+json"},
                ) as resp:
                    await resp.read()
                    assert resp.status in (200, 201), resp.status
                latencies.append(time.perf_counter() - start)

        began = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(CLIENTS)))
        elapsed = time.perf_counter() - began
        stop.set()
        lost = reordered = 0
        lags: list[float] = []
        if watch:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
            for t in tasks:
                t.cancel()
            for index in range(WATCHERS):
                for key, when in answered.items():
                    events = seen[index].get(key, [])
                    types = [t for t, _ in events]
                    if types[:2] != ["ADDED", "MODIFIED"]:
                        if len(types) < 2:
                            lost += 2 - len(types)
                        else:
                            reordered += 1
                    if events:
                        lags.append(max(0.0, events[0][1] - when))
    requests = 2 * len(jobs)
    return {
        "requests": requests,
        "seconds": elapsed,
        "requests_per_s": requests / elapsed,
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "watch_lag_p50_ms": percentile(lags, 0.5) * 1000 if lags else None,
        "watch_lag_p99_ms": percentile(lags, 0.99) * 1000 if lags else None,
        "events_lost": lost,
        "events_reordered": reordered,
    }


async def run_ours(count: int, workdir: Path) -> dict[str, Any]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cdi.cli.main",
            "server",
            "--data-dir",
            str(workdir / "ours"),
            "--port",
            str(port),
            "--insecure-http",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if "API at" in line:
                break
        else:
            raise RuntimeError("cdi server did not start")
        token = yaml.safe_load((workdir / "ours" / "kubeconfig").read_text())["users"][0]["user"][
            "token"
        ]
        return await drive(
            f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}, count, watch=True
        )
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def run_floor(count: int, workdir: Path) -> dict[str, Any]:
    port = free_port()
    script = workdir / "floor.py"
    script.write_text(FLOOR_SERVER)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(workdir / "floor.db"), str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        if "READY" not in proc.stdout.readline():
            raise RuntimeError("floor server did not start")
        return await drive(f"http://127.0.0.1:{port}", {}, count, watch=False)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="api_bench.py", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="200 objects of each kind instead of 1000"
    )
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--repeat", type=int, default=1, help="ignored: one run each (long enough)")
    args = parser.parse_args(argv)
    count = 200 if args.quick else 1000
    workdir = Path(tempfile.mkdtemp(prefix="cdi-api-bench-", dir="/var/tmp"))
    try:
        ours = asyncio.run(run_ours(count, workdir))
        floor = asyncio.run(run_floor(count, workdir))
    finally:
        if not args.keep:
            subprocess.run(["rm", "-rf", str(workdir)], check=False)
    print(
        f"\napi benchmark: {count} ConfigMaps + {count} DataVolumes, each created then patched, "
        f"{CLIENTS} clients, {WATCHERS} watchers (ours)"
    )
    header = ("", "req/s", "p50 ms", "p99 ms", "lag p50", "lag p99", "lost", "reord")
    print(f"{header[0]:8} " + " ".join(f"{h:>8}" for h in header[1:]))
    for label, r in (("ours", ours), ("floor", floor)):
        lag50 = f"{r['watch_lag_p50_ms']:.1f}" if r["watch_lag_p50_ms"] is not None else "-"
        lag99 = f"{r['watch_lag_p99_ms']:.1f}" if r["watch_lag_p99_ms"] is not None else "-"
        cells = (
            f"{r['requests_per_s']:.0f}",
            f"{r['p50_ms']:.1f}",
            f"{r['p99_ms']:.1f}",
            lag50,
            lag99,
            str(r["events_lost"]),
            str(r["events_reordered"]),
        )
        print(f"{label:8} " + " ".join(f"{c:>8}" for c in cells))
    print(
        f"ours/floor: throughput {ours['requests_per_s'] / floor['requests_per_s']:.2f}x, "
        f"p99 {ours['p99_ms'] / floor['p99_ms']:.2f}x"
    )
    ok_p99 = ours["p99_ms"] < 50
    ok_events = ours["events_lost"] == 0 and ours["events_reordered"] == 0
    print(f"  {'PASS' if ok_p99 else 'MISS'}  p99 write latency < 50 ms: {ours['p99_ms']:.1f} ms")
    print(
        f"  {'PASS' if ok_events else 'MISS'}  no event lost or reordered: "
        f"lost {ours['events_lost']}, reordered {ours['events_reordered']}"
    )
    OUT.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    (OUT / f"api-{stamp}.json").write_text(
        json.dumps({"ours": ours, "floor": floor, "count": count}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
