"""`cdi controller`: the CDI controllers as a process of their own, against any API server.

Owns the command line and signal handling of the control plane when it does not run inside
`cdi server`: in a cluster (the chart's Deployment, in-cluster config) or beside an all-in-one
server started with `--no-controllers` (the controller benchmark measures it that way, so its
CPU and memory are its own). The controllers themselves are `cdi.controller.manager`'s.

Must not serve anything or touch local files: it only talks to the API.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from typing import Any

import aiohttp

from cdi.controller.manager import run_controllers
from cdi.kube.client import Client
from cdi.kube.config import ConfigError, load_config
from cdi.kube.errors import ApiError

log = logging.getLogger(__name__)


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "controller",
        help="run the CDI controllers against an API server",
        description=(
            "Run the DataVolume and import controllers until SIGINT/SIGTERM. The API comes "
            "from --kubeconfig, else $KUBECONFIG, else the in-cluster service account, else "
            "~/.kube/config. Example, beside an all-in-one server started with "
            "--no-controllers: cdi controller --kubeconfig .cdi/kubeconfig --local"
        ),
    )
    parser.add_argument("--kubeconfig", help="kubeconfig file [$KUBECONFIG]")
    parser.add_argument("--context", help="kubeconfig context [current]")
    parser.add_argument(
        "--local",
        action="store_true",
        help="pods run on the all-in-one server's node agent (as the invoking user, not uid 107)",
    )
    parser.set_defaults(handler=run)


async def _run(args: argparse.Namespace) -> None:
    client = Client(load_config(args.kubeconfig, context=args.context))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        # Fail fast on a wrong kubeconfig instead of retrying behind the controllers' back-off.
        await client.request("GET", "/version")
        print(f"cdi controller: watching {client.config.server}", flush=True)
        await run_controllers(client, stop=stop, local=args.local)
    finally:
        await client.close()


def run(args: argparse.Namespace) -> int:
    logging.getLogger().setLevel(logging.INFO)
    try:
        asyncio.run(_run(args))
    except ConfigError as err:
        print(f"cdi controller: {err}", file=sys.stderr)
        return 1
    except ApiError as err:
        print(f"cdi controller: the API server refused: {err}", file=sys.stderr)
        return 1
    except aiohttp.ClientConnectionError as err:
        print(f"cdi controller: cannot reach the API server: {err}", file=sys.stderr)
        return 1
    return 0
