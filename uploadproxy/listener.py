"""The upload proxy on a port: uploads relayed by blocking threads, the rest by the aiohttp app.

Used by `cdi-uploadproxy` and by `cdi server`, so both serve the same way (see
`uploadproxy.relay` for why the data path is not asyncio).
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from typing import Final

from aiohttp import web

from cdi.image.httpfront import HttpFront
from cdi.kube.client import Client
from uploadproxy.app import FORWARDER_KEY, locate, make_app
from uploadproxy.relay import Relay
from uploadproxy.settings import ProxySettings

SHUTDOWN_TIMEOUT: Final = 5.0  # seconds answers in flight get once the proxy stops


class ProxyListener:
    def __init__(self, runner: web.AppRunner, front: HttpFront) -> None:
        self._runner = runner
        self._front = front
        self.port = front.port

    @classmethod
    async def start(
        cls,
        settings: ProxySettings,
        client: Client,
        *,
        host: str,
        port: int,
        tls: ssl.SSLContext | None,
    ) -> ProxyListener:
        """Listening when it returns; OSError when the address cannot be bound."""
        app = make_app(settings, client)
        runner = web.AppRunner(
            app, handle_signals=False, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT
        )
        await runner.setup()
        assert runner.server is not None
        loop = asyncio.get_running_loop()
        relay = Relay(settings, app[FORWARDER_KEY], functools.partial(locate, app), loop)
        try:
            front = HttpFront(
                host,
                port,
                tls,
                relay.route,
                loop=loop,
                protocol_factory=runner.server,
                name="uploadproxy",
            )
        except BaseException:
            await runner.cleanup()
            raise
        return cls(runner, front)

    async def close(self) -> None:
        self._front.close()
        await self._runner.cleanup()
