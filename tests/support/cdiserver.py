"""`cdi server` as a real subprocess, for tests that talk to it through `kubectl` or `cdi.kube`.

`CdiServer` starts `python -m cdi.cli.main server --data-dir <dir> --port <port>` (HTTPS, the
default), waits (bounded) for its "API at <url>" line and the kubeconfig it writes, and stops it
with SIGTERM (bounded wait, then SIGKILL; `stop()`/`restart()` fail when it needed SIGKILL or
exited non-zero, unless `graceful=False`). `kill()` is the crash: SIGKILL of the server process
alone, nothing else, after which `start(port=server.port)` brings it back on the same port and
data dir. It always runs with a `--token-file` holding non-admin users (`USERS`), whose
kubeconfigs `user_kubeconfig(name)` writes. `kubectl(...)` runs the real kubectl (`KUBECTL`)
against it with KUBECONFIG set, a private discovery cache and a 30 s timeout.

By default the server runs with `--no-controllers` (API, local node agent and provisioner: the
objects tests create stay as they wrote them); `controllers=True` runs the whole server as
`make run` does: controllers, node agent and provisioner.

Also `worker_processes(data_dir)`, the processes of this machine whose environment, working
directory or command line mention a data dir (what pods of that server left running), found
by a /proc scan.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

from cdi.kube.config import ClientConfig, load_kubeconfig

REPO: Final = Path(__file__).resolve().parents[2]


def _find_kubectl() -> str:
    """/usr/bin/kubectl when there is one, else the kubectl on PATH, else `make`'s own."""
    if os.access("/usr/bin/kubectl", os.X_OK):
        return "/usr/bin/kubectl"
    return shutil.which("kubectl") or str(REPO / ".venv" / "bin" / "kubectl")


KUBECTL: Final = _find_kubectl()
START_TIMEOUT: Final = 20.0
STOP_TIMEOUT: Final = 10.0
TEARDOWN_STOP_TIMEOUT: Final = 5.0
KUBECTL_TIMEOUT: Final = 30.0
KILL_TIMEOUT: Final = 10.0

# name -> (token, uid, groups): the server's --token-file.
USERS: Final[dict[str, tuple[str, str, tuple[str, ...]]]] = {
    "alice": ("alice-token-5b0d3c1e9f", "u-1001", ("dev", "qa")),
    "bob": ("bob-token-77aa01c2d3", "u-1002", ()),
}

_API_AT = re.compile(r"API at (\S+)")


class ServerError(AssertionError):
    pass


class CdiServer:
    """One `cdi server` process over one data dir; restartable on the same port.

    `controllers`: run the CDI controllers too (the whole server, as `make run`); without, the
    server runs with `--no-controllers`. `extra_args` are appended to the command line.
    `start_timeout`: seconds `start` waits for the server to report its API."""

    def __init__(
        self,
        data_dir: Path,
        *,
        extra_args: Sequence[str] = (),
        controllers: bool = False,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        self.data_dir = data_dir
        self.start_timeout = start_timeout
        self.kubeconfig = data_dir / "kubeconfig"
        self.token_file = data_dir.parent / f"{data_dir.name}-tokens.csv"
        self.cache_dir = data_dir.parent / f"{data_dir.name}-kubecache"
        self.extra_args = tuple(extra_args)
        self.controllers = controllers
        self.url = ""
        self.port = 0
        self.proc: subprocess.Popen[str] | None = None
        self.output: list[str] = []  # every line the server printed, all runs
        self._reader: threading.Thread | None = None
        self._ready = threading.Event()
        self._kubeconfigs: dict[str, Path] = {}
        self.token_file.write_text(
            "".join(
                f'{token},{name},{uid},"{",".join(groups)}"\n'
                for name, (token, uid, groups) in USERS.items()
            )
        )

    # --- lifecycle --------------------------------------------------------------------------
    def argv(self, port: int) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "cdi.cli.main",
            "server",
            "--data-dir",
            str(self.data_dir),
            "--port",
            str(port),
            "--token-file",
            str(self.token_file),
            # A free port for the proxy too, also on a restart with a fixed API port (which
            # means 8443 by default): test workers run servers side by side.
            "--upload-proxy-port",
            "0",
        ]
        if not self.controllers:
            # Tests of the API hold it to Kubernetes' semantics: no controller may rewrite the
            # DataVolumes they create (the controllers have tests of their own).
            argv.append("--no-controllers")
        return [*argv, *self.extra_args]

    def start(self, port: int = 0) -> None:
        assert self.proc is None, "already running"
        self._ready.clear()
        start_from = len(self.output)
        self.proc = subprocess.Popen(
            self.argv(port),
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._reader = threading.Thread(target=self._drain, args=(self.proc,), daemon=True)
        self._reader.start()
        deadline = time.monotonic() + self.start_timeout
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self._abandon()
                raise ServerError(
                    f"cdi server did not report its API within {self.start_timeout:.0f}s:\n"
                    + "".join(self.output[start_from:])
                )
        match = next(
            m for line in self.output[start_from:] if (m := _API_AT.search(line)) is not None
        )
        self.url = match.group(1)
        self.port = int(self.url.rsplit(":", 1)[1])
        # The kubeconfig is written before the line is printed; it must name this URL.
        while True:
            with contextlib.suppress(OSError, yaml.YAMLError, KeyError, TypeError, IndexError):
                doc = yaml.safe_load(self.kubeconfig.read_text())
                if doc["clusters"][0]["cluster"]["server"] == self.url:
                    break
            if time.monotonic() > deadline:
                self._abandon()
                raise ServerError(f"{self.kubeconfig} does not name {self.url}")
            time.sleep(0.05)
        self._kubeconfigs.clear()

    def _drain(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.output.append(line)
            if "API at" in line:
                self._ready.set()

    def stop(self, timeout: float = STOP_TIMEOUT, *, graceful: bool = True) -> float:
        """SIGTERM, wait up to `timeout`, else SIGKILL. Returns the seconds SIGTERM took.

        With `graceful` (the default) a server that needed SIGKILL, or exited non-zero, is a
        `ServerError`; without, the process only has to be gone (fixture teardown: the tests
        `test_sigterm_*` are the ones that hold the server to a clean stop)."""
        proc = self.proc
        if proc is None:
            return 0.0
        began = time.monotonic()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._abandon()
            assert proc.poll() is not None, "cdi server survived SIGKILL"
            if graceful:
                raise ServerError(
                    f"cdi server did not exit within {timeout:.0f}s of SIGTERM (killed):\n"
                    + "".join(self.output[-20:])
                ) from None
            return time.monotonic() - began
        took = time.monotonic() - began
        self._finish()
        if graceful and code != 0:
            raise ServerError(f"cdi server exited with {code}:\n" + "".join(self.output[-20:]))
        return took

    def kill(self) -> None:
        """The crash: SIGKILL the server process (only it: what it started must die on its own)
        and wait until it is gone. `start(port=self.port)` brings it back."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(KILL_TIMEOUT)
        self._finish()

    def _abandon(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        self._finish()

    def _finish(self) -> None:
        if self._reader is not None:
            self._reader.join(5)
            self._reader = None
        if self.proc is not None:
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.proc = None

    def restart(self, between: Callable[[], Any] | None = None, *, crash: bool = False) -> None:
        """Stop (SIGTERM, or SIGKILL with `crash`), run `between` with the server down, start
        again on the same port and data dir."""
        port = self.port
        if crash:
            self.kill()
        else:
            self.stop()
        if between is not None:
            between()
        self.start(port=port)

    # --- clients ----------------------------------------------------------------------------
    def user_kubeconfig(self, user: str) -> Path:
        """A kubeconfig like the admin one, but with `user`'s token from the token file."""
        if user not in self._kubeconfigs:
            doc = yaml.safe_load(self.kubeconfig.read_text())
            doc["users"] = [{"name": user, "user": {"token": USERS[user][0]}}]
            doc["contexts"][0]["context"]["user"] = user
            path = self.data_dir.parent / f"{self.data_dir.name}-{user}.kubeconfig"
            path.write_text(yaml.safe_dump(doc))
            path.chmod(0o600)
            self._kubeconfigs[user] = path
        return self._kubeconfigs[user]

    def client_config(self, user: str | None = None) -> ClientConfig:
        return load_kubeconfig(self.user_kubeconfig(user) if user else self.kubeconfig)

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        user_kubeconfig: Path | None = None,
        timeout: float = KUBECTL_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        argv = [KUBECTL, *args]
        proc = subprocess.run(
            argv,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=self.kubectl_env(user_kubeconfig),
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    def kubectl_env(self, user_kubeconfig: Path | None = None) -> dict[str, str]:
        return {
            **os.environ,
            "KUBECONFIG": str(user_kubeconfig or self.kubeconfig),
            "KUBECACHEDIR": str(self.cache_dir),
        }


def running_server(
    data_dir: Path,
    *,
    controllers: bool = False,
    start_timeout: float = START_TIMEOUT,
    extra_args: Sequence[str] = (),
) -> Iterator[CdiServer]:
    """A started `CdiServer` over `data_dir` for a fixture to yield; stopped (however it is) at
    the end, and then it must be gone."""
    server = CdiServer(
        data_dir, controllers=controllers, start_timeout=start_timeout, extra_args=extra_args
    )
    server.start()
    try:
        yield server
    finally:
        proc = server.proc
        server.stop(TEARDOWN_STOP_TIMEOUT, graceful=False)
        assert server.proc is None
        if proc is not None:
            assert proc.returncode is not None, "cdi server still running after teardown"


def dns_label(text: str, limit: int = 50) -> str:
    label = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return label[:limit].strip("-") or "t"


def poll(
    condition: Callable[[], Any], *, timeout: float = 10.0, interval: float = 0.1, what: str = ""
) -> Any:
    """Call `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what or condition}")
        time.sleep(interval)


# --- processes ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    pid: int
    cmdline: str
    state: str


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def process_state(pid: int) -> str | None:
    """The state letter of /proc/<pid>/stat (R, S, D, Z, ...), None when there is no such pid."""
    raw = _read(f"/proc/{pid}/stat")
    if not raw:
        return None
    return raw[raw.rfind(b")") + 2 :].decode(errors="replace")[:1]


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (a zombie waits only for its reaper)."""
    return process_state(pid) not in (None, "Z")


def worker_processes(data_dir: Path, *, exclude: Collection[int] = ()) -> list[ProcessInfo]:
    """Live processes (not zombies, not this one, none of `exclude`) whose environment, working
    directory or command line mention `data_dir`: the pods of a server over that dir and their
    children, but also the server itself and any kubectl pointed at its kubeconfig, so call it
    with the server stopped (or its pid in `exclude`) and no kubectl running."""
    needle = os.fsencode(str(data_dir.resolve()))
    skip = {os.getpid(), *exclude}
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in skip:
            continue
        cmdline = _read(f"/proc/{entry}/cmdline")
        try:
            cwd = os.fsencode(os.readlink(f"/proc/{entry}/cwd"))
        except OSError:
            cwd = b""
        if needle in cmdline or needle in cwd or needle in _read(f"/proc/{entry}/environ"):
            state = process_state(int(entry))
            if state not in (None, "Z"):
                text = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
                found.append(ProcessInfo(int(entry), text, state or "?"))
    return found
