"""`cdi-uploadproxy` as its own process (`python -m uploadproxy`): HTTPS from files, a real
kubeconfig, and a large upload streamed through with bounded memory and intact bytes."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

from tests.uploadproxy.conftest import ProxyEnv
from tests.uploadproxy.helpers import CA, HOST

MIB = 1 << 20
UPLOAD_MIB = 512
#: The proxy process's peak resident memory must stay under this, whatever the upload size.
PEAK_LIMIT_MIB = 150
#: ... and grow by less than this over its idle peak (after one small request).
GROWTH_LIMIT_MIB = 48
_LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")


def vm_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


class ProxyProcess:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self.port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            if not self.port.done() and (match := _LISTENING.search(line)):
                self.port.set_result(int(match.group(1)))
        if not self.port.done():
            self.port.set_exception(AssertionError("\n".join(self.lines[-20:])))

    async def stop(self) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.process.wait(), 10)
        except TimeoutError:
            self.process.kill()
            code = await self.process.wait()
        await self._reader
        return code


@contextlib.asynccontextmanager
async def proxy_process(env: ProxyEnv, *extra: str) -> AsyncIterator[tuple[ProxyProcess, str]]:
    ca = CA.create("uploadproxy test CA")
    cert, key = ca.issue("localhost", dns_names=["localhost"]).write(env.tmp, "proxy")
    (env.tmp / "proxy-ca.crt").write_bytes(ca.pem)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "uploadproxy",
        "--kubeconfig",
        str(env.cluster.data_dir / "kubeconfig"),
        "--listen",
        f"{HOST}:0",
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        "--resolve",
        "pod-ip",
        "--upstream-port",
        str(env.sink.port),
        "--ready-wait",
        "5",
        "--ready-poll",
        "0.1",
        *extra,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "CDI_LOG_LEVEL": "INFO"},
    )
    proxy = ProxyProcess(process)
    try:
        port = await asyncio.wait_for(proxy.port, 15)
        yield proxy, f"https://{HOST}:{port}"
    finally:
        await proxy.stop()


def client_ssl(env: ProxyEnv) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(env.tmp / "proxy-ca.crt"))


async def test_large_upload_streams_through_with_bounded_memory(proxy_env: ProxyEnv) -> None:
    env = proxy_env
    await env.pvc("big")
    token = env.token("big")
    async with proxy_process(env) as (proxy, base):
        pid = proxy.process.pid
        headers = {"Authorization": f"Bearer {token}"}
        context = client_ssl(env)
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{base}/v1beta1/upload-async",
                data=b"warm-up",
                headers=headers,
                ssl=context,
                server_hostname="localhost",
            ) as resp:
                assert resp.status == 200, await resp.text()
            idle_peak = vm_hwm_mib(pid)

            seeds = [os.urandom(MIB) for _ in range(8)]
            digest = hashlib.sha256()

            async def body() -> AsyncIterator[bytes]:
                for i in range(UPLOAD_MIB):
                    block = bytearray(seeds[i % len(seeds)])
                    block[:8] = i.to_bytes(8, "big")
                    digest.update(block)
                    yield bytes(block)

            async with http.post(
                f"{base}/v1beta1/upload",
                data=body(),
                headers={
                    **headers,
                    "Content-Length": str(UPLOAD_MIB * MIB),
                    "Content-Type": "application/octet-stream",
                },
                ssl=context,
                server_hostname="localhost",
            ) as resp:
                assert resp.status == 200, await resp.text()
            peak = vm_hwm_mib(pid)

        seen = env.sink.requests[-1]
        assert seen.headers["Content-Length"] == str(UPLOAD_MIB * MIB)
        assert (seen.size, seen.sha256) == (UPLOAD_MIB * MIB, digest.hexdigest())
        assert peak < PEAK_LIMIT_MIB, f"peak {peak:.0f} MiB (idle {idle_peak:.0f} MiB)"
        assert peak - idle_peak < GROWTH_LIMIT_MIB, f"peak {peak:.0f} MiB, idle {idle_peak:.0f}"
        print(f"proxy VmHWM idle {idle_peak:.1f} MiB, after {UPLOAD_MIB} MiB {peak:.1f} MiB")
    assert await proxy.stop() == 0
    log = "\n".join(proxy.lines)
    assert f"POST /v1beta1/upload pvc=default/big status=200 sent={UPLOAD_MIB * MIB}" in log
    assert token not in log
