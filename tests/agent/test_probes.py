"""Readiness probes on the local node: a container is Ready only once its probe passes (httpGet
over HTTP and HTTPS without verification, tcpSocket, exec), and loses readiness when the probe
keeps failing; without a probe it is ready while it runs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from cdi.api.groups import POD
from cdi.kube.client import Client
from tests.agent.test_agent import phase_is, pod_manifest
from tests.support.cluster import Cluster, eventually

# Listens after a delay; 200 on /healthz until a file `unhealthy` appears in its directory.
SERVER = """
import http.server, os, sys, time
time.sleep(float(sys.argv[1]))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.path == "/healthz" and not os.path.exists("unhealthy")
        self.send_response(200 if ok else 503)
        self.end_headers()
    def log_message(self, *a):
        pass
http.server.HTTPServer((os.environ["POD_IP"], 8080), H).serve_forever()
"""


def _probed(name: str, probe: dict[str, Any], delay: float = 1.0) -> dict[str, Any]:
    manifest = pod_manifest(name, [sys.executable, "-c", SERVER, str(delay)], restart="Always")
    container = manifest["spec"]["containers"][0]
    container["ports"] = [{"name": "http", "containerPort": 8080}]
    container["readinessProbe"] = {"periodSeconds": 1, "failureThreshold": 2, **probe}
    return manifest


def _ready(pod: dict[str, Any]) -> str:
    conditions = {c["type"]: c for c in (pod.get("status") or {}).get("conditions") or []}
    return str((conditions.get("Ready") or {}).get("status"))


async def _ready_is(client: Client, name: str, value: str, within: float = 20.0) -> Any:
    async def probe() -> Any:
        pod = await client.get(POD, name, "default")
        return pod if _ready(pod) == value else None

    return await eventually(probe, within=within, interval=0.1, what=f"pod {name} Ready={value}")


async def test_http_probe_gates_readiness(cluster: Cluster, agent: None) -> None:
    client = cluster.client
    await client.create(
        POD, _probed("web", {"httpGet": {"path": "/healthz", "port": "http"}}, delay=2.0)
    )
    running = await phase_is(client, "web", "Running")
    # Running, but the server sleeps before listening: not ready yet.
    assert _ready(running) == "False"
    pod = await _ready_is(client, "web", "True")
    assert pod["status"]["containerStatuses"][0]["ready"] is True
    # The probe starts failing: after failureThreshold misses the pod is not ready again.
    _mark_unhealthy(await _container_pid(client, "web"))
    await _ready_is(client, "web", "False")
    await client.delete(POD, "web", "default")


async def _container_pid(client: Client, name: str) -> int:
    pod = await client.get(POD, name, "default")
    return int(pod["status"]["containerStatuses"][0]["containerID"].rsplit("/", 1)[1])


def _mark_unhealthy(pid: int) -> None:
    # The server checks its working directory (the container's) for this file.
    (Path(f"/proc/{pid}/cwd").resolve() / "unhealthy").write_text("")


async def test_tcp_and_exec_probes(cluster: Cluster, agent: None) -> None:
    client = cluster.client
    await client.create(POD, _probed("tcp", {"tcpSocket": {"port": 8080}}, delay=0.5))
    await client.create(
        POD, _probed("exec", {"exec": {"command": ["sh", "-c", 'test -n "$POD_IP"']}})
    )
    await client.create(
        POD, _probed("never", {"httpGet": {"path": "/missing", "port": 8080}}, delay=0.0)
    )
    await _ready_is(client, "tcp", "True")
    await _ready_is(client, "exec", "True")
    never = await phase_is(client, "never", "Running")
    assert _ready(never) == "False"
    for name in ("tcp", "exec", "never"):
        await client.delete(POD, name, "default")


async def test_no_probe_means_ready_while_running(cluster: Cluster, agent: None) -> None:
    client = cluster.client
    await client.create(POD, pod_manifest("plain", ["sleep", "30"]))
    await _ready_is(client, "plain", "True")
    await client.delete(POD, "plain", "default")
