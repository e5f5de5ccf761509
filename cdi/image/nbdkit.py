"""nbdkit lifecycle: start an NBD server on a Unix socket, know when it is ready, stop and reap it.

Owns the nbdkit command line and process. The importer starts one server per import (its Python
plugin or the curl plugin, with filters) and points `qemu-img convert` at `NbdkitServer.uri`; tests
start the `memory` and `pattern` plugins. `python_plugin_env` builds the environment that lets
nbdkit's embedded interpreter (Debian's libpython3.11, not the venv's python) import our packages.

This module must not know what a plugin serves or how: plugin arguments are passed through as
given, and any secret among them is the caller's to keep out of logs (we log the plugin name and
the socket, never the arguments).

The server runs with `--foreground` and dies with us even if we are killed: SIGKILL by the
kernel (`cdi.image.lifetime`), not nbdkit's `--exit-with-parent`, whose SIGTERM lets it wait for
a plugin call in flight (a stalled HTTP read) for as long as that takes. It is still stopped and
reaped explicitly: on a failed start, on `stop()` and when the `async with` block exits,
whatever the block raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import site
import sysconfig
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from cdi.image.errors import PermanentError, ToolError
from cdi.image.lifetime import die_with_parent

__all__ = ["NBDKIT", "NbdkitServer", "python_plugin_env"]

log = logging.getLogger(__name__)

NBDKIT: Final = "nbdkit"
"""The binary run; a module attribute so that tests and odd installs can point elsewhere."""

INSTALL_HINT: Final = (
    "install the nbdkit package (and nbdkit-plugin-python for Python plugins, "
    "libnbd-bin for nbdinfo/nbdcopy)"
)
STOP_GRACE: Final = 5.0
"""Seconds between SIGTERM and SIGKILL. nbdkit finishes in-flight requests first; a plugin stuck
on a dead network source would otherwise hold the import hostage."""
PROBE_TIMEOUT: Final = 1.0
# sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH: Final = 107
_NBD_MAGIC: Final = b"NBDMAGIC"
# The project root: the directory that holds the `cdi` package (cdi/image/nbdkit.py → ../../..).
_PROJECT_ROOT: Final = str(Path(__file__).resolve().parents[2])


def python_plugin_env(extra_paths: Sequence[str] = ()) -> dict[str, str]:
    """`os.environ` plus a PYTHONPATH for nbdkit's Python plugin.

    The plugin embeds Debian's CPython 3.11, whose `sys.path` knows neither our project nor the
    venv. PYTHONPATH puts, in order, the project root (so `import cdi` works for an editable install
    too, whose `.pth` files PYTHONPATH would not read), `extra_paths`, and the running venv's
    site-packages (ahead of Debian's older dist-packages). Any PYTHONPATH or PYTHONHOME already set
    is replaced, and stdlib directories are never included: mixing this interpreter's stdlib into
    Debian's would break it in subtle ways.
    """
    stdlib = {
        os.path.realpath(p)
        for key in ("stdlib", "platstdlib")
        if (p := sysconfig.get_paths().get(key)) is not None
    }
    paths: list[str] = []
    for candidate in (_PROJECT_ROOT, *extra_paths, *site.getsitepackages()):
        real = os.path.realpath(candidate)
        if real in stdlib or candidate in paths or not os.path.isdir(candidate):
            continue
        paths.append(candidate)
    env = dict(os.environ)
    env.pop("PYTHONHOME", None)
    env["PYTHONPATH"] = os.pathsep.join(paths)
    # The embedded interpreter finds its home by looking for `python3` on PATH; a venv's bin/ there
    # (pyvenv.cfg beside it) makes it take the venv's base Python's stdlib instead of Debian's, and
    # then `import ssl` fails. Measured: HTTPS and S3 broke with .venv/bin first on PATH.
    env["PATH"] = os.pathsep.join(
        d
        for d in env.get("PATH", "").split(os.pathsep)
        if d and not os.path.exists(os.path.join(os.path.dirname(d.rstrip("/")), "pyvenv.cfg"))
    )
    return env


def _last_line(text: str) -> str:
    for line in reversed(text.splitlines()):
        if line.strip():
            return line.strip()[:1000]
    return ""


def _describe_exit(returncode: int) -> str:
    if returncode >= 0:
        return f"exited with status {returncode}"
    try:
        return f"was killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"was killed by signal {-returncode}"


class NbdkitServer:
    """One nbdkit process serving one export on `<workdir>/nbdkit.sock`.

    Use as `async with NbdkitServer(...) as server:` and read from `server.uri`. The log (nbdkit's
    stdout and stderr) stays in `<workdir>/nbdkit.log` after the server stops, for error reports.
    One server per workdir. When `env` is None, the `python` plugin gets `python_plugin_env()` and
    every other plugin the current environment.
    """

    def __init__(
        self,
        plugin: str,
        plugin_args: Sequence[str] = (),
        *,
        filters: Sequence[str] = (),
        readonly: bool = True,
        workdir: str,
        env: Mapping[str, str] | None = None,
        start_timeout: float = 15.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        self._plugin = plugin
        self._plugin_args = tuple(plugin_args)
        self._filters = tuple(filters)
        self._readonly = readonly
        self._workdir = os.path.abspath(workdir)
        self._env = dict(env) if env is not None else None
        self._start_timeout = start_timeout
        self._extra_args = tuple(extra_args)
        self._socket = os.path.join(self._workdir, "nbdkit.sock")
        self._pidfile = os.path.join(self._workdir, "nbdkit.pid")
        self._logfile = os.path.join(self._workdir, "nbdkit.log")
        if len(os.fsencode(self._socket)) > MAX_SOCKET_PATH:
            raise ValueError(
                f"socket path {self._socket!r} is longer than {MAX_SOCKET_PATH} bytes; "
                "use a shorter workdir"
            )
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def argv(self) -> list[str]:
        """The command line; options before the plugin name, as nbdkit requires."""
        argv = [
            NBDKIT,
            "--foreground",
            "-U",
            self._socket,
            "--pidfile",
            self._pidfile,
        ]
        if self._readonly:
            argv.append("-r")
        argv += [f"--filter={name}" for name in self._filters]
        argv += self._extra_args
        argv.append(self._plugin)
        argv += self._plugin_args
        return argv

    @property
    def uri(self) -> str:
        """The NBD URI of the export, for qemu-img and libnbd: `nbd+unix:///?socket=<path>`."""
        return "nbd+unix:///?socket=" + urllib.parse.quote(self._socket, safe="/")

    @property
    def socket_path(self) -> str:
        return self._socket

    @property
    def log_path(self) -> str:
        return self._logfile

    @property
    def pid(self) -> int | None:
        """The server's pid while it runs (or until it is reaped), else None."""
        return self._proc.pid if self._proc is not None else None

    def log_tail(self, max_bytes: int = 4096) -> str:
        """The last `max_bytes` of the log, decoded leniently; "" if there is no log yet."""
        try:
            with open(self._logfile, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(0, size - max_bytes))
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    async def start(self) -> None:
        """Start nbdkit and wait (at most `start_timeout`) until it answers on the socket.

        Raises ToolError with the log tail if nbdkit exits or does not become ready in time,
        PermanentError if nbdkit is not installed. The process is stopped before raising.
        """
        if self._proc is not None and self._proc.returncode is None:
            raise RuntimeError("nbdkit server already running")
        os.makedirs(self._workdir, exist_ok=True)
        # Stale files from an earlier run would make us think a dead server is ready.
        for path in (self._socket, self._pidfile):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        env = self._env
        if env is None and self._plugin == "python":
            env = python_plugin_env()
        argv = self.argv
        started = time.monotonic()
        # A plain fd: the child gets its own copy, ours is closed right after the spawn.
        logfd = os.open(self._logfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=logfd,
                stderr=logfd,
                env=env,
                preexec_fn=die_with_parent(os.getpid()),
            )
        except FileNotFoundError as exc:
            raise PermanentError(f"{NBDKIT} not found: {INSTALL_HINT}") from exc
        finally:
            os.close(logfd)
        try:
            await self._wait_ready(argv)
        except BaseException:
            await self.stop()
            raise
        log.info(
            "nbdkit started plugin=%s filters=%s socket=%s pid=%d seconds=%.3f",
            self._plugin,
            ",".join(self._filters) or "-",
            self._socket,
            self._proc.pid,
            time.monotonic() - started,
        )

    async def _wait_ready(self, argv: Sequence[str]) -> None:
        proc = self._proc
        assert proc is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._start_timeout
        delay = 0.005
        while True:
            # The child watcher sets returncode as soon as nbdkit exits, without a wait().
            if proc.returncode is not None:
                tail = self.log_tail()
                what = _describe_exit(proc.returncode)
                raise ToolError(
                    f"nbdkit {what} during start: {_last_line(tail) or 'no output'}",
                    argv=argv,
                    returncode=proc.returncode,
                    stderr=tail,
                )
            # nbdkit writes the pidfile only once it listens; the probe proves it answers.
            if self._pidfile_matches(proc.pid) and await self._probe():
                return
            if loop.time() >= deadline:
                tail = self.log_tail()
                raise ToolError(
                    f"nbdkit did not become ready within {self._start_timeout:g} s"
                    + (f": {_last_line(tail)}" if tail.strip() else ""),
                    argv=argv,
                    stderr=tail,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _pidfile_matches(self, pid: int) -> bool:
        try:
            with open(self._pidfile, encoding="ascii") as f:
                return f.read().strip() == str(pid)
        except (FileNotFoundError, UnicodeDecodeError):
            return False

    async def _probe(self) -> bool:
        """Connect and read the NBD greeting; a server that sends it is ready for clients."""
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                reader, writer = await asyncio.open_unix_connection(self._socket)
                try:
                    magic = await reader.readexactly(len(_NBD_MAGIC))
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            return False
        return magic == _NBD_MAGIC

    async def stop(self) -> None:
        """SIGTERM, wait up to STOP_GRACE, SIGKILL, reap, remove the socket. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), STOP_GRACE)
                except TimeoutError:
                    log.warning("nbdkit did not exit on SIGTERM pid=%d; killing it", proc.pid)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()
                except asyncio.CancelledError:
                    # No time left to be polite; the child watcher still reaps it.
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    raise
                log.info("nbdkit stopped pid=%d status=%s", proc.pid, proc.returncode)
            else:
                await proc.wait()
        finally:
            for path in (self._socket, self._pidfile):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.stop()
        except Exception:
            if exc is None:
                raise
            # The body's exception is the one the caller needs; ours goes to the log.
            log.exception(
                "nbdkit stop failed while handling %s", exc_type.__name__ if exc_type else ""
            )
