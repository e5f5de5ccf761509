"""Readiness probes, as the kubelet runs them: `httpGet`, `tcpSocket` and `exec`.

Owns one check of one probe (`check`) and the loop that turns checks into a container's
readiness (`ReadinessProber`): after `initialDelaySeconds`, a check every `periodSeconds` with
`timeoutSeconds`, ready after `successThreshold` consecutive successes, not ready after
`failureThreshold` consecutive failures. httpGet succeeds on a status in [200, 400) and, as the
kubelet, does not verify an HTTPS server's certificate. The host is the pod's IP unless the probe
names one; a named port is looked up in the container's ports.

Used by `cdi.agent.runner` for containers that declare a `readinessProbe`; a container without
one is ready while it runs. Liveness and startup probes are not run (nothing here restarts a
container for them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import aiohttp

log = logging.getLogger(__name__)

Obj = dict[str, Any]

#: Kubernetes' defaults.
DEFAULT_PERIOD: Final = 10.0
DEFAULT_TIMEOUT: Final = 1.0
DEFAULT_FAILURE_THRESHOLD: Final = 3
DEFAULT_SUCCESS_THRESHOLD: Final = 1


class ProbeError(Exception):
    """The probe cannot be run as written (an unknown port name, no handler)."""


def _port(value: Any, container: Mapping[str, Any]) -> int:
    if isinstance(value, int):
        return value
    text = str(value)
    if text.isdigit():
        return int(text)
    for port in container.get("ports") or []:
        if port.get("name") == text:
            return int(port["containerPort"])
    raise ProbeError(f"port {text!r} is not a port of container {container.get('name')!r}")


async def check(
    probe: Mapping[str, Any],
    container: Mapping[str, Any],
    *,
    pod_ip: str,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> bool:
    """Run the probe once; True on success. Raises ProbeError for a probe that cannot run."""
    timeout = float(probe.get("timeoutSeconds") or DEFAULT_TIMEOUT)
    try:
        async with asyncio.timeout(timeout):
            if "httpGet" in probe:
                return await _http_get(probe["httpGet"], container, pod_ip)
            if "tcpSocket" in probe:
                spec = probe["tcpSocket"]
                host = str(spec.get("host") or pod_ip)
                _, writer = await asyncio.open_connection(host, _port(spec.get("port"), container))
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                return True
            if "exec" in probe:
                command = [str(word) for word in probe["exec"].get("command") or []]
                if not command:
                    raise ProbeError("exec probe without a command")
                proc = await asyncio.create_subprocess_exec(
                    *command,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                    env=dict(env) if env is not None else None,
                    cwd=cwd,
                )
                try:
                    return await proc.wait() == 0
                finally:
                    if proc.returncode is None:
                        proc.kill()
                        await proc.wait()
    except (TimeoutError, OSError, aiohttp.ClientError):
        return False
    raise ProbeError("probe has no httpGet, tcpSocket or exec handler")


async def _http_get(spec: Mapping[str, Any], container: Mapping[str, Any], pod_ip: str) -> bool:
    scheme = str(spec.get("scheme") or "HTTP").lower()
    host = str(spec.get("host") or pod_ip)
    path = str(spec.get("path") or "/")
    if not path.startswith("/"):
        path = "/" + path
    url = f"{scheme}://{host}:{_port(spec.get('port'), container)}{path}"
    headers = {str(h["name"]): str(h.get("value", "")) for h in spec.get("httpHeaders") or []}
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers=headers, ssl=False, allow_redirects=False) as resp,
    ):
        return 200 <= resp.status < 400


class ReadinessProber:
    """Runs one container's readiness probe until cancelled, calling `changed(ready)` when its
    readiness flips. Starts not ready."""

    def __init__(
        self,
        probe: Mapping[str, Any],
        container: Mapping[str, Any],
        *,
        pod_ip: str,
        changed: Callable[[bool], Awaitable[None]],
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        what: str = "",
    ) -> None:
        self.probe = probe
        self.container = container
        self.pod_ip = pod_ip
        self.changed = changed
        self.env = env
        self.cwd = cwd
        self.what = what
        self.ready = False

    async def run(self) -> None:
        probe = self.probe
        period = float(probe.get("periodSeconds") or DEFAULT_PERIOD)
        failures_needed = int(probe.get("failureThreshold") or DEFAULT_FAILURE_THRESHOLD)
        successes_needed = int(probe.get("successThreshold") or DEFAULT_SUCCESS_THRESHOLD)
        await asyncio.sleep(float(probe.get("initialDelaySeconds") or 0))
        successes = failures = 0
        while True:
            try:
                ok = await check(
                    probe, self.container, pod_ip=self.pod_ip, env=self.env, cwd=self.cwd
                )
            except ProbeError as err:
                log.warning("%s: readiness probe cannot run: %s", self.what, err)
                ok = False
            if ok:
                successes, failures = successes + 1, 0
                if not self.ready and successes >= successes_needed:
                    self.ready = True
                    log.info("%s: ready", self.what)
                    await self.changed(True)
            else:
                successes, failures = 0, failures + 1
                if self.ready and failures >= failures_needed:
                    self.ready = False
                    log.info("%s: not ready (readiness probe failed %d times)", self.what, failures)
                    await self.changed(False)
            await asyncio.sleep(period)
