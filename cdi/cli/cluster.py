"""How a `cdi` subcommand talks to a cluster: the shared options, the client, errors as one line.

Owns the `--kubeconfig`/`--context`/`-n` options, loading the configuration the way every
command does (`cdi.kube.config.load_config`: the flag, else $KUBECONFIG, else in-cluster, else
~/.kube/config), running a command's coroutine with a client that is always closed, and the
translation of configuration, API and connection errors into one `cdi: ...` line and exit 1.
Also `informer`, the list-then-watch stream a waiting or watching command follows, and
durations (`90s`, `10m`, `1h30m`, plain seconds) for `--timeout` options.

Called by the cluster commands (`cdi.cli.datavolumes`, later upload and clone). Must not know
any resource kind, and must never let a traceback reach the user for an expected failure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import ssl
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from decimal import Decimal, InvalidOperation
from typing import Final

import aiohttp

from cdi.api.groups import Resource
from cdi.kube.client import Client, WatchEvent
from cdi.kube.config import ConfigError, load_config
from cdi.kube.errors import ApiError, ServerError, Unauthorized
from cdi.kube.informer import Snapshot, list_then_watch

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1

CLI_BACKOFF: Final = (0.1, 0.3, 1.0)
"""Retries of one request (refused connections, 5xx, 429): a person waits for the answer, so
fewer than a controller's; waits and watches go on through the informer's own retries."""

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": Decimal("0.001"), "s": Decimal(1), "m": Decimal(60), "h": Decimal(3600)}

#: What a command does once connected: given the client and the namespace, an exit code.
Command = Callable[[Client, str | None], Awaitable[int]]


def add_api_options(parser: argparse.ArgumentParser, *, all_namespaces: bool = False) -> None:
    """The options every cluster command takes."""
    group = parser.add_argument_group("cluster")
    group.add_argument(
        "--kubeconfig",
        metavar="PATH",
        help="kubeconfig file [$KUBECONFIG, else in-cluster, else ~/.kube/config]",
    )
    group.add_argument("--context", help="kubeconfig context [its current-context]")
    group.add_argument(
        "-n",
        "--namespace",
        help="namespace [the context's namespace, else default]",
    )
    if all_namespaces:
        group.add_argument(
            "-A",
            "--all-namespaces",
            action="store_true",
            help="every namespace (adds a NAMESPACE column)",
        )


def run_command(
    args: argparse.Namespace,
    command: Command,
    *,
    on_interrupt: Callable[[], int] | None = None,
) -> int:
    """Load the configuration, run `command` on a fresh event loop, turn failures into a line.

    The namespace passed is None for `--all-namespaces`. Ctrl-C ends the command (its client is
    closed on the way out); `on_interrupt` decides what that means, else it is an error.
    """
    try:
        config = load_config(args.kubeconfig, context=args.context)
    except ConfigError as err:
        return fail(str(err))
    namespace: str | None = args.namespace or config.namespace
    if getattr(args, "all_namespaces", False):
        namespace = None

    async def main() -> int:
        client = Client(config, backoff=CLI_BACKOFF)
        try:
            return await command(client, namespace)
        finally:
            await client.close()

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        if on_interrupt is not None:
            return on_interrupt()
        return fail("interrupted")
    except (ApiError, aiohttp.ClientError, ssl.SSLError, OSError) as err:
        return fail(describe_error(err, config.server))


def describe_error(err: BaseException, server: str) -> str:
    """One line saying what went wrong talking to the API, in the user's terms."""
    # The client retries refused connections, then raises a 503 with the aiohttp error as cause.
    cause = err.__cause__ if isinstance(err, ServerError) and err.__cause__ else err
    if isinstance(cause, aiohttp.ClientConnectorCertificateError):
        return (
            f"the API server at {server} presented a certificate the kubeconfig does not "
            f"trust: {cause.certificate_error}"
        )
    if isinstance(cause, aiohttp.ClientSSLError | ssl.SSLError):
        return f"TLS with the API server at {server} failed: {cause}"
    if isinstance(cause, aiohttp.ClientConnectorError):
        return f"cannot reach the API server at {server}: is `cdi server` running?"
    if isinstance(cause, aiohttp.ClientError | TimeoutError):
        return f"lost the connection to the API server at {server}: {cause or type(cause).__name__}"
    if isinstance(err, Unauthorized):
        return f"the API server at {server} refused our credentials: {err.message}"
    if isinstance(err, ApiError):
        return err.message
    if isinstance(err, OSError) and err.filename:
        # Files the kubeconfig names (CA, client certificate, token file) that cannot be read.
        return f"{err.filename}: {err.strerror}"
    return str(err)


@contextlib.asynccontextmanager
async def informer(
    client: Client, resource: Resource, namespace: str | None
) -> AsyncIterator[AsyncIterator[Snapshot | WatchEvent]]:
    """`list_then_watch`, closed (with its watch response) however the caller leaves it: a
    wait that ends returns from inside the loop, where cancellation would not reach it."""
    stream = list_then_watch(client, resource, namespace)
    try:
        yield stream
    finally:
        if isinstance(stream, AsyncGenerator):
            await stream.aclose()


def fail(message: str, *, code: int = EXIT_ERROR) -> int:
    print(f"cdi: {message}", file=sys.stderr, flush=True)
    return code


def parse_duration(text: str) -> float:
    """Seconds in a duration: "90s", "10m", "1h30m", "500ms" (Go's spelling) or "30" (seconds)."""
    spelled = text.strip()
    try:
        seconds = Decimal(spelled)
    except InvalidOperation:
        parts = _DURATION_PART.findall(spelled)
        if not parts or "".join(n + u for n, u in parts) != spelled:
            raise ValueError(
                f"{text!r} is not a duration; use e.g. 90s, 10m, 1h30m or a number of seconds"
            ) from None
        seconds = sum((Decimal(n) * _UNIT_SECONDS[u] for n, u in parts), Decimal(0))
    if not seconds.is_finite() or seconds <= 0:
        raise ValueError(f"{text!r}: a duration must be more than zero")
    return float(seconds)


def duration_arg(text: str) -> float:
    """`parse_duration` as an argparse type, so a bad value is a usage error."""
    try:
        return parse_duration(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def format_duration(seconds: float) -> str:
    """The short spelling of a duration: 600 -> "10m", 90 -> "1m30s", 0.5 -> "0.5s"."""
    if seconds < 60 or seconds != int(seconds):
        return f"{seconds:g}s"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    parts: list[str] = []
    if hours:
        parts.append(f"{hours}h")
    if minutes:
        parts.append(f"{minutes}m")
    if secs:
        parts.append(f"{secs}s")
    return "".join(parts)
