"""Controller benchmark: the control plane's overhead per DataVolume, next to importers run by hand.

Ours: `cdi server --no-controllers` (API, local node agent and provisioner: importer pods run as
local processes) and, as a process of its own, `cdi controller --local`, so that the controller's
CPU time and memory are measured alone (sampled from /proc/<pid>/stat and /proc/<pid>/status every
0.1 s; the server's are reported for context, and the CPU of the importer processes it reaped).
Two scenarios run against that stack, through the async client:

- **blank**: N DataVolumes (`spec.source.blank`, 8Mi) created as fast as possible (32 in flight);
- **http**: M DataVolumes importing one qcow2 image (128Mi each) from a local aiohttp static server
  (byte ranges), all at once.

For each: wall time from the first create to the last DataVolume seen `Succeeded` (a DV watch sees
the phase change; a list every 0.5 s is the authoritative check, and any `Failed` DV or a time-out
fails the scenario), and per DV the latency create -> Succeeded (p50/p95/max). The benchmark also
watches the importer pods: with the pid in `containerID` (cdi-local://<pid>) it reads the
process's start time from /proc (10 ms) and its exit from a pidfd, so each DV's time splits into
create -> pod, pod -> process start, the importer's own run, and exit -> Succeeded (falling back
to the agent's log, 0.1 s, or the pod's startedAt/finishedAt, 1 s, when a process was too quick).

Baseline, measured in the same run: the same importer work with no control plane: N (resp. M)
`cdi-importer` processes started by hand, all at once (the agent has no concurrency limit either),
each with the environment of the importer pod the controller rendered in this run (captured from
the pod object) and its metrics endpoint on a loopback address of its own, as the agent gives each
pod. The same by hand with `CDI_METRICS_ADDR=off` is shown for context: the difference is the
importer's own metrics server, not the control plane.

Control-plane overhead per DV = (ours - by hand) / N. Targets: overhead per DV < 0.5 s and the
controller's peak RSS < 200 MiB, reported PASS/MISS; the exit status is 1 only when something
failed (a scenario, a baseline importer, wrong output, a process that would not stop).

Run alone: `.venv/bin/python bench/controller.py [--quick] [--keep] [--repeat N] [--blank N]
[--http N] [--profile]` (`--profile`: py-spy samples the controller during each scenario and the
hottest frames are printed). JSON goes to bench/out/controller.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import re
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchlib import MIB, fmt, sparse_diff, table, tool_version

from cdi.api.groups import (
    CDI_CONFIG,
    CDI_CONFIG_NAME,
    DATA_VOLUME,
    PERSISTENT_VOLUME_CLAIM,
    POD,
    STORAGE_PROFILE,
)
from cdi.kube.client import Client
from cdi.kube.config import load_kubeconfig
from cdi.kube.errors import NotFound
from cdi.kube.informer import Snapshot, list_then_watch

Obj = dict[str, Any]

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
OUT_DIR = BENCH_DIR / "out"
VENV_BIN = REPO / ".venv" / "bin"
CDI = VENV_BIN / "cdi"
IMPORTER = VENV_BIN / "cdi-importer"
PY_SPY = VENV_BIN / "py-spy"
NAMESPACE = "default"
SCENARIO_LABEL = "bench.cdi-py/scenario"
TARGET_OVERHEAD_S = 0.5
TARGET_RSS = 200 * MIB
POLL_S = 0.5
SAMPLE_S = 0.1
CREATE_IN_FLIGHT = 32
"""Creates in flight at once: the client's connection pool holds 32."""
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
LEAK_GRACE_S = 3.0
SERVER_STOP_TIMEOUT_S = 30.0
METRICS_PORT = 8443
CLK_TCK = os.sysconf("SC_CLK_TCK")
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
PASSTHROUGH = ("LANG", "LC_ALL", "TZ", "TMPDIR")
"""What the agent passes from its own environment to a container (cdi.agent.podspec)."""
AGENT_EXIT = re.compile(
    r"cdi\.agent\.runner (?P<ns>[^/\s]+)/(?P<pod>\S+): container=importer exited"
    r" code=(?P<code>-?\d+) reason=\S+ seconds=(?P<seconds>[0-9.]+)"
)
FILE_SERVER = r"""
import asyncio, sys
from aiohttp import web

async def main():
    app = web.Application()
    app.router.add_static("/", sys.argv[1], show_index=False)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(runner.addresses[0][1], flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""

CONTROLLER_TRACE = r"""
# `cdi controller` with timers around API calls, reconciles, queue waits and progress reads;
# writes a summary to argv[1] when the controller returns (SIGTERM). Run by --trace.
import json, os, sys, time
from collections import defaultdict

import cdi.controller.datavolume as datavolume
from cdi.cli.main import main
from cdi.controller.runtime import Controller
from cdi.kube.client import Client

series = defaultdict(list)
counts = defaultdict(int)
queued = {}
workers = int(os.environ.get("BENCH_CONTROLLER_WORKERS") or 0)
if workers:  # --workers: an experiment, every Controller gets that many workers
    init = Controller.__init__

    def more_workers(self, *args, **kwargs):
        kwargs["workers"] = workers
        init(self, *args, **kwargs)

    Controller.__init__ = more_workers


def label(method, path):
    parts = path.split("?")[0].strip("/").split("/")
    rest = parts[2:] if parts[:1] == ["api"] else parts[3:] if parts[:1] == ["apis"] else parts
    if len(rest) >= 3 and rest[0] == "namespaces":
        rest = rest[2:]
    if not rest:
        return f"{method} {'/'.join(parts)}"
    name = "/NAME" if len(rest) > 1 else ""
    sub = f"/{rest[2]}" if len(rest) > 2 else ""
    return f"{method} {rest[0]}{name}{sub}"


request = Client.request


async def timed_request(self, method, path, **kw):
    began = time.monotonic()
    try:
        return await request(self, method, path, **kw)
    finally:
        series["api " + label(method, path)].append(time.monotonic() - began)


Client.request = timed_request
add = Controller._add


def timed_add(self, key):
    fresh = key not in self._dirty
    add(self, key)
    if fresh and key in self._dirty:
        queued.setdefault((self.name, key), time.monotonic())


Controller._add = timed_add
process = Controller._process


async def timed_process(self, key):
    began = time.monotonic()
    since = queued.pop((self.name, key), None)
    if since is not None:
        series[f"queue wait {self.name}"].append(began - since)
    try:
        await process(self, key)
    finally:
        series[f"reconcile {self.name}"].append(time.monotonic() - began)


Controller._process = timed_process
succeeded = Controller._succeeded


def counted_succeeded(self, key, result, seconds):
    counts[f"{self.name} requeue_after={result.requeue_after}"] += 1
    succeeded(self, key, result, seconds)


Controller._succeeded = counted_succeeded
failed = Controller._failed


def counted_failed(self, key, err):
    counts[f"{self.name} failed {type(err).__name__}"] += 1
    failed(self, key, err)


Controller._failed = counted_failed
read_progress = datavolume.read_progress


async def timed_progress(ip, owner_uid):
    began = time.monotonic()
    value = await read_progress(ip, owner_uid)
    series["progress read " + ("ok" if value is not None else "none")].append(
        time.monotonic() - began
    )
    return value


datavolume.read_progress = timed_progress
code = main(sys.argv[2:])


def stats(values):
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]
    return {"n": len(ordered), "total": sum(ordered), "p50": pick(0.5), "p95": pick(0.95),
            "max": ordered[-1]}


with open(sys.argv[1], "w") as out:
    json.dump({"series": {k: stats(v) for k, v in series.items() if v}, "counts": counts}, out)
sys.exit(code)
"""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class BenchError(Exception):
    """A measurement that failed: reported as an error, never as a number."""


# --------------------------------------------------------------------------------------------------
# plan


@dataclass(frozen=True)
class Plan:
    blank: int
    http: int
    image_virtual: int
    image_data: int
    blank_storage: str = "8Mi"
    http_storage: str = "128Mi"

    @staticmethod
    def make(args: argparse.Namespace) -> Plan:
        if args.quick:
            plan = Plan(blank=40, http=5, image_virtual=16 * MIB, image_data=8 * MIB)
        else:
            plan = Plan(blank=200, http=20, image_virtual=64 * MIB, image_data=32 * MIB)
        return Plan(
            blank=plan.blank if args.blank is None else args.blank,
            http=plan.http if args.http is None else args.http,
            image_virtual=plan.image_virtual,
            image_data=plan.image_data,
        )


def dv_manifest(name: str, scenario: str, source: Obj, storage: str) -> Obj:
    return {
        "apiVersion": "cdi.kubevirt.io/v1beta1",
        "kind": "DataVolume",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {SCENARIO_LABEL: scenario}},
        "spec": {"source": source, "storage": {"resources": {"requests": {"storage": storage}}}},
    }


# --------------------------------------------------------------------------------------------------
# small helpers


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def dist(values: Sequence[float]) -> dict[str, float | None]:
    return {
        "n": len(values),
        "p50": percentile(values, 0.5),
        "p95": percentile(values, 0.95),
        "max": max(values) if values else None,
        "mean": statistics.fmean(values) if values else None,
    }


def k8s_time(value: object) -> float | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
    env["no_proxy"] = env["NO_PROXY"] = "127.0.0.1,localhost"
    env.update(extra)
    return env


def mib(value: float | None) -> str:
    return fmt(None if value is None else value / MIB, ".1f")


def union_seconds(intervals: Sequence[tuple[float, float]], lo: float, hi: float) -> float:
    """Seconds of [lo, hi] covered by at least one interval."""
    covered = 0.0
    end = lo
    for first, last in sorted(intervals):
        start, stop = max(first, end), min(last, hi)
        if stop > start:
            covered += stop - start
            end = stop
    return covered


def max_overlap(intervals: Sequence[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


# --------------------------------------------------------------------------------------------------
# /proc sampling of the controller and the server; the host's load


@dataclass(frozen=True)
class HostCpu:
    """CPU seconds the whole host was busy, and what this process and its reaped children used:
    the difference, minus what a phase accounts for, is load from processes that are not ours."""

    busy_s: float
    self_s: float
    children_s: float

    @staticmethod
    def now() -> HostCpu:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:9]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields)
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return HostCpu(
            (user + nice + system + irq + softirq + steal) / CLK_TCK,
            me.ru_utime + me.ru_stime,
            kids.ru_utime + kids.ru_stime,
        )

    def foreign_since(self, before: HostCpu, accounted: float) -> tuple[float, float]:
        """(host busy seconds, seconds of it used by processes not ours) since `before`;
        `accounted`: CPU of ours that is neither this process nor its reaped children."""
        busy = self.busy_s - before.busy_s
        mine = (self.self_s - before.self_s) + (self.children_s - before.children_s)
        return busy, max(0.0, busy - mine - accounted)


ProcTable = dict[int, tuple[str, int, int]]
"""pid -> (comm, ppid, utime + stime in ticks), for every process."""


def process_table() -> ProcTable:
    table_: ProcTable = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            data = Path(f"/proc/{name}/stat").read_bytes()
            comm = data[data.find(b"(") + 1 : data.rfind(b")")].decode(errors="replace")
            fields = data[data.rfind(b")") + 2 :].split()
            table_[int(name)] = (comm, int(fields[1]), int(fields[11]) + int(fields[12]))
    return table_


def others_top(before: ProcTable, after: ProcTable, top: int = 4) -> list[tuple[str, float]]:
    """The processes outside this benchmark's tree that used the most CPU of their own between
    two tables: who else loaded the host (what ended meanwhile is not seen)."""
    me = os.getpid()

    def ours(pid: int) -> bool:
        seen = set()
        while pid > 1 and pid not in seen:
            if pid == me:
                return True
            seen.add(pid)
            pid = after[pid][1] if pid in after else 0
        return False

    used = []
    for pid, (comm, _, ticks) in after.items():
        if ours(pid):
            continue
        delta = ticks - before[pid][2] if pid in before and before[pid][0] == comm else ticks
        if delta > 0:
            used.append((f"{comm}[{pid}]", delta / CLK_TCK))
    return sorted(used, key=lambda x: -x[1])[:top]


@dataclass(frozen=True)
class ProcStat:
    cpu_s: float
    """utime + stime of the process itself."""
    children_cpu_s: float
    """cutime + cstime: the processes it reaped (for the server: the importer pods)."""
    rss: int
    hwm: int


def read_proc(pid: int) -> ProcStat | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
        status = Path(f"/proc/{pid}/status").read_text(errors="replace")
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    vm: dict[str, int] = {}
    for line in status.splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            vm[name] = int(value.split()[0]) * 1024
    return ProcStat(
        (utime + stime) / CLK_TCK,
        (cutime + cstime) / CLK_TCK,
        vm.get("VmRSS", 0),
        vm.get("VmHWM", 0),
    )


class ProcSampler:
    """Samples a few named processes every SAMPLE_S from a thread: RSS over time, last stat."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self.pids = dict(pids)
        self.rss: dict[str, list[tuple[float, int]]] = {name: [] for name in pids}
        self.last: dict[str, ProcStat] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="proc-sampler", daemon=True)

    def start(self) -> None:
        self.sample()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self.sample()

    def sample(self) -> dict[str, ProcStat]:
        now = time.time()
        with self._lock:
            for name, pid in self.pids.items():
                stat = read_proc(pid)
                if stat is None:
                    continue
                self.last[name] = stat
                self.rss[name].append((now, stat.rss))
            return dict(self.last)

    def peak_rss(self, name: str, lo: float, hi: float) -> int:
        with self._lock:
            return max((rss for t, rss in self.rss[name] if lo <= t <= hi), default=0)


# --------------------------------------------------------------------------------------------------
# processes: the stack, the file server


def _wait_for_line(
    path: Path, needle: str, proc: subprocess.Popen[bytes], name: str, timeout: float
) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            for line in path.read_text(errors="replace").splitlines():
                if needle in line:
                    return line
        if proc.poll() is not None:
            raise BenchError(f"{name} exited with {proc.returncode}: see {path}")
        time.sleep(0.05)
    raise BenchError(f"{needle!r} not printed after {timeout:.0f} s: see {path}")


def stop_process(proc: subprocess.Popen[bytes], name: str, timeout: float) -> str | None:
    """SIGTERM, bounded wait, SIGKILL of the group. A note when it did not stop cleanly."""
    note = None
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            note = f"{name} (pid {proc.pid}) did not stop within {timeout:g} s of SIGTERM"
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of its session
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
    if note is None and proc.returncode not in (0, -signal.SIGTERM):
        note = f"{name} (pid {proc.pid}) exited with {proc.returncode} after SIGTERM"
    return note


class Stack:
    """`cdi server --no-controllers` and `cdi controller --local` on a fresh data dir."""

    def __init__(self, root: Path, *, trace: bool = False, workers: int = 0) -> None:
        self.root = root
        self.trace = root / "controller-trace.json" if trace or workers else None
        self.workers = workers
        self.data = root / "data"
        self.kubeconfig = self.data / "kubeconfig"
        self.server: subprocess.Popen[bytes] | None = None
        self.controller: subprocess.Popen[bytes] | None = None
        self.notes: list[str] = []

    def _spawn(
        self, argv: list[str], name: str, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with (
            open(self.root / f"{name}.out", "wb") as out,
            open(self.root / f"{name}.err", "wb") as err,
        ):
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=clean_env(**(env or {})),
                cwd=self.root,
                start_new_session=True,
            )

    def __enter__(self) -> Stack:
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self.server = self._spawn(
                [
                    str(CDI),
                    "server",
                    "--data-dir",
                    str(self.data),
                    "--port",
                    "0",
                    "--no-controllers",
                ],
                "server",
            )
            _wait_for_line(
                self.root / "server.out", "API at", self.server, "cdi server", START_TIMEOUT_S
            )
            argv = ["controller", "--kubeconfig", str(self.kubeconfig), "--local"]
            if self.trace is not None:
                shim = self.root / "controller_trace.py"
                shim.write_text(CONTROLLER_TRACE)
                command = [sys.executable, str(shim), str(self.trace), *argv]
            else:
                command = [str(CDI), *argv]
            extra = {"BENCH_CONTROLLER_WORKERS": str(self.workers)} if self.workers else None
            self.controller = self._spawn(command, "controller", extra)
            _wait_for_line(
                self.root / "controller.out",
                "cdi controller: watching",
                self.controller,
                "cdi controller",
                30,
            )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        # The controller first: it must not see the API go away under it.
        for proc, name, timeout in (
            (self.controller, "cdi controller", STOP_TIMEOUT_S),
            (self.server, "cdi server", SERVER_STOP_TIMEOUT_S),
        ):
            if proc is not None:
                note = stop_process(proc, name, timeout)
                if note:
                    self.notes.append(note)
        self.controller = self.server = None

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def agent_exits(self) -> dict[str, list[float]]:
        """Per importer pod, the run times (0.1 s) the agent logged, in order."""
        found: dict[str, list[float]] = {}
        with contextlib.suppress(OSError):
            for line in (self.root / "server.err").read_text(errors="replace").splitlines():
                m = AGENT_EXIT.search(line)
                if m:
                    found.setdefault(m["pod"], []).append(float(m["seconds"]))
        return found


class FileServer:
    """aiohttp's static handler (byte ranges, sendfile) on 127.0.0.1, in its own process."""

    def __init__(self, root: Path, logdir: Path, probe: str) -> None:
        self.root = root
        self.logdir = logdir
        self.probe = probe
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def __enter__(self) -> FileServer:
        script = self.logdir / "fileserver.py"
        script.write_text(FILE_SERVER)
        with open(self.logdir / "fileserver.err", "wb") as err:
            self._proc = subprocess.Popen(
                [sys.executable, str(script), str(self.root)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                env=clean_env(),
                start_new_session=True,
            )
        assert self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], 20)
        line = self._proc.stdout.readline().decode().strip() if ready else ""
        if not line.isdigit():
            self.stop()
            raise BenchError(f"file server did not start: see {self.logdir / 'fileserver.err'}")
        self.port = int(line)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", f"/{self.probe}", headers={"Range": "bytes=0-0"})
            response = conn.getresponse()
            response.read()
            status = response.status
        except OSError as err:
            status = 0
            log(f"file server probe: {err}")
        finally:
            conn.close()
        if status != 206:
            self.stop()
            raise BenchError(f"file server answered {status} to a range request, want 206")
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc, "file server", 5)

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------------
# the image


def build_image(images: Path, plan: Plan) -> Path:
    images.mkdir(parents=True, exist_ok=True)
    image = images / "disk.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(plan.image_virtual)],
        check=True,
        timeout=60,
    )
    subprocess.run(
        [
            "qemu-io",
            "-f",
            "qcow2",
            "-c",
            f"write -q -P 0x5a 0 {plan.image_data}",
            str(image),
        ],
        check=True,
        timeout=120,
        stdout=subprocess.DEVNULL,
    )
    return image


class Reference:
    """Raw references of the image, one per output size (the importer grows the raw image to the
    volume's usable size), for `sparse_diff`."""

    def __init__(self, directory: Path, data: int) -> None:
        self.directory = directory
        self.data = data
        self._made: dict[int, Path] = {}
        self._lock = threading.Lock()

    def check(self, output: Path) -> str | None:
        if not output.exists():
            return f"{output} does not exist"
        size = output.stat().st_size
        with self._lock:
            ref = self._made.get(size)
            if ref is None:
                ref = self.directory / f"reference-{size}.raw"
                with open(ref, "wb") as fh:
                    fh.truncate(size)
                    chunk = b"\x5a" * MIB
                    for offset in range(0, min(self.data, size), MIB):
                        fh.seek(offset)
                        fh.write(chunk[: min(MIB, self.data - offset)])
                self._made[size] = ref
        diff = sparse_diff(ref, output)
        return None if diff is None else f"{output}: {diff}"


# --------------------------------------------------------------------------------------------------
# what the benchmark sees of ours


@dataclass
class PodTrace:
    name: str
    dv: str
    added: float | None = None
    pid: int | None = None
    start: float | None = None
    """Process start, from /proc/<pid>/stat (10 ms)."""
    exit: float | None = None
    """Process exit, from a pidfd."""
    running_seen: float | None = None
    terminated_seen: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    restarts: int = 0
    deleted: float | None = None
    agent_seconds: list[float] = field(default_factory=list)
    env: list[Obj] = field(default_factory=list)

    def run(self) -> tuple[float, float, str] | None:
        """(start, end, precision) of the importer process: pidfd, else agent log, else k8s."""
        if self.start is not None and self.exit is not None and self.restarts == 0:
            return self.start, self.exit, "pidfd"
        if self.agent_seconds and self.restarts == 0:
            seconds = self.agent_seconds[-1]
            if self.start is not None:
                return self.start, self.start + seconds, "agent log"
            if self.exit is not None:
                return self.exit - seconds, self.exit, "agent log"
            if self.finished_at is not None:
                return self.finished_at - seconds, self.finished_at, "agent log"
        if self.started_at is not None and self.finished_at is not None:
            return self.started_at, self.finished_at, "k8s (1 s)"
        return None


@dataclass
class DvTrace:
    name: str
    sent: float
    answered: float | None = None
    succeeded: float | None = None
    phase: str = ""
    message: str = ""


class Observer:
    """Watches DataVolumes and importer pods of the namespace while the scenarios run."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.dvs: dict[str, DvTrace] = {}
        self.pods: dict[str, PodTrace] = {}
        self._fds: dict[int, PodTrace] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.pidfd_misses = 0

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._watch_pods(), name="bench:pods"),
            asyncio.create_task(self._watch_dvs(), name="bench:dvs"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        loop = asyncio.get_running_loop()
        for fd in list(self._fds):
            loop.remove_reader(fd)
            os.close(fd)
        self._fds.clear()

    async def _watch_dvs(self) -> None:
        async for change in list_then_watch(self.client, DATA_VOLUME, NAMESPACE):
            objs = change.items if isinstance(change, Snapshot) else [change.object]
            for obj in objs:
                self.dv_seen(obj, time.time())

    def dv_seen(self, obj: Obj, now: float) -> None:
        trace = self.dvs.get(str(obj["metadata"]["name"]))
        if trace is None:
            return
        status = obj.get("status") or {}
        trace.phase = str(status.get("phase") or "")
        if trace.phase == "Succeeded" and trace.succeeded is None:
            trace.succeeded = now
        if trace.phase == "Failed":
            conditions = {c.get("type"): c for c in status.get("conditions") or []}
            trace.message = str((conditions.get("Running") or {}).get("message") or "")

    async def _watch_pods(self) -> None:
        async for change in list_then_watch(self.client, POD, NAMESPACE):
            now = time.time()
            if isinstance(change, Snapshot):
                for obj in change.items:
                    self._pod_seen("ADDED", obj, now)
            else:
                self._pod_seen(change.type, change.object, now)

    def _pod_seen(self, kind: str, obj: Obj, now: float) -> None:
        meta = obj.get("metadata") or {}
        owner = next(
            (
                str(ref.get("name"))
                for ref in meta.get("ownerReferences") or []
                if ref.get("kind") == "PersistentVolumeClaim"
            ),
            None,
        )
        if owner is None or (meta.get("labels") or {}).get("cdi.kubevirt.io") != "importer":
            return
        name = str(meta["name"])
        trace = self.pods.get(name)
        if trace is None:
            trace = self.pods[name] = PodTrace(name, owner)
            containers = (obj.get("spec") or {}).get("containers") or [{}]
            trace.env = list(containers[0].get("env") or [])
        if trace.added is None:
            trace.added = now
        if kind == "DELETED":
            trace.deleted = trace.deleted or now
        statuses = (obj.get("status") or {}).get("containerStatuses") or []
        if not statuses:
            return
        status = statuses[0]
        trace.restarts = int(status.get("restartCount") or 0)
        state = status.get("state") or {}
        container_id = str(status.get("containerID") or "")
        if "running" in state and trace.running_seen is None:
            trace.running_seen = now
        if "terminated" in state:
            if trace.terminated_seen is None:
                trace.terminated_seen = now
            terminated = state["terminated"]
            trace.started_at = k8s_time(terminated.get("startedAt"))
            trace.finished_at = k8s_time(terminated.get("finishedAt"))
        if container_id.startswith("cdi-local://") and trace.pid is None:
            with contextlib.suppress(ValueError):
                trace.pid = int(container_id.removeprefix("cdi-local://"))
                if "running" in state:
                    self._track(trace)
                else:
                    self.pidfd_misses += 1

    def _track(self, trace: PodTrace) -> None:
        """Start from /proc (10 ms), exit from a pidfd: the importer process's own times."""
        assert trace.pid is not None
        try:
            fd = os.pidfd_open(trace.pid)
        except OSError:
            self.pidfd_misses += 1
            return
        try:
            stat = Path(f"/proc/{trace.pid}/stat").read_bytes()
            cmdline = Path(f"/proc/{trace.pid}/cmdline").read_bytes()
        except OSError:
            os.close(fd)
            self.pidfd_misses += 1
            return
        if b"cdi-importer" not in cmdline:  # the pid is gone and reused already
            os.close(fd)
            self.pidfd_misses += 1
            return
        started_ticks = int(stat[stat.rfind(b")") + 2 :].split()[19])
        boot = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
        trace.start = boot + started_ticks / CLK_TCK
        self._fds[fd] = trace
        loop = asyncio.get_running_loop()
        loop.add_reader(fd, self._exited, fd)

    def _exited(self, fd: int) -> None:
        now = time.time()
        trace = self._fds.pop(fd, None)
        asyncio.get_running_loop().remove_reader(fd)
        os.close(fd)
        if trace is not None:
            trace.exit = now


# --------------------------------------------------------------------------------------------------
# scenarios (ours)


@dataclass
class Ours:
    scenario: str
    count: int
    t0: float = 0.0
    create_s: float | None = None
    wall_s: float | None = None
    error: str | None = None
    controller_cpu_s: float | None = None
    server_cpu_s: float | None = None
    importers_cpu_s: float | None = None
    controller_peak_rss: int = 0
    server_peak_rss: int = 0
    host_busy_s: float | None = None
    foreign_cpu_s: float | None = None
    """CPU used meanwhile by processes on the host that are not this benchmark's."""
    others: list[tuple[str, float]] = field(default_factory=list)
    profile: list[tuple[str, float]] = field(default_factory=list)
    dvs: list[DvTrace] = field(default_factory=list)

    def latencies(self) -> list[float]:
        return [d.succeeded - d.sent for d in self.dvs if d.succeeded is not None]


async def wait_ready(client: Client, limit_s: float) -> None:
    """Until the controller's config loop wrote the CDIConfig status and the StorageProfiles:
    a DV created before would only wait for it, which is start-up, not per-DV overhead."""
    deadline = time.monotonic() + limit_s
    last = ""
    while time.monotonic() < deadline:
        try:
            config = await client.get(CDI_CONFIG, CDI_CONFIG_NAME)
            profiles, _ = await client.list(STORAGE_PROFILE)
            if config.get("status") and profiles and all(p.get("status") for p in profiles):
                return
            last = "CDIConfig or StorageProfile status missing"
        except NotFound as err:
            last = str(err)
        await asyncio.sleep(0.2)
    raise BenchError(f"the controller did not get ready in {limit_s:.0f} s: {last}")


async def start_profile(pid: int, out: Path) -> asyncio.subprocess.Process | None:
    if not os.access(PY_SPY, os.X_OK):
        log(f"no {PY_SPY}: not profiling")
        return None
    return await asyncio.create_subprocess_exec(
        str(PY_SPY),
        "record",
        "--pid",
        str(pid),
        "--rate",
        "200",
        "--format",
        "raw",
        "--nonblocking",
        "--output",
        str(out),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


async def stop_profile(proc: asyncio.subprocess.Process | None) -> None:
    if proc is None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGINT)
    try:
        await asyncio.wait_for(proc.wait(), timeout=30)
    except TimeoutError:
        proc.kill()
        await proc.wait()


def summarize_profile(path: Path, top: int = 14) -> list[tuple[str, float]]:
    """The hottest functions of the controller: share of py-spy's samples that have the function
    on the stack (inclusive), leaving out the event loop's and the tracing shim's own frames."""
    inclusive: Counter[str] = Counter()
    total = 0
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not count_text.isdigit():
                continue
            count = int(count_text)
            total += count
            for frame in {re.sub(r":\d+\)$", ")", f) for f in stack.split(";") if f}:
                inclusive[frame] += count
    if not total:
        return []
    generic = (
        *("(asyncio/", "(selectors.py", "(controller_trace.py", "(runpy.py"),
        *("<module>", "(cdi/cli/", "(threading.py"),
    )
    rows = [
        (frame, count / total)
        for frame, count in inclusive.most_common()
        if not any(g in frame for g in generic)
    ]
    return rows[:top]


async def run_scenario(
    client: Client,
    observer: Observer,
    sampler: ProcSampler,
    result: Ours,
    manifests: Sequence[Obj],
    *,
    limit_s: float,
    profile_to: Path | None,
    controller_pid: int,
) -> None:
    profiler = await start_profile(controller_pid, profile_to) if profile_to else None
    before = sampler.sample()
    host_before = HostCpu.now()
    procs_before = process_table()
    sem = asyncio.Semaphore(CREATE_IN_FLIGHT)

    async def create(manifest: Obj) -> None:
        async with sem:
            name = str(manifest["metadata"]["name"])
            trace = observer.dvs[name] = DvTrace(name, time.time())
            await client.create(DATA_VOLUME, manifest)
            trace.answered = time.time()

    result.t0 = time.time()
    try:
        await asyncio.gather(*(create(m) for m in manifests))
        result.create_s = time.time() - result.t0
        traces = [observer.dvs[str(m["metadata"]["name"])] for m in manifests]
        result.dvs = traces
        deadline = result.t0 + limit_s
        while True:
            items, _ = await client.list(
                DATA_VOLUME, NAMESPACE, label_selector=f"{SCENARIO_LABEL}={result.scenario}"
            )
            now = time.time()
            for obj in items:
                observer.dv_seen(obj, now)
            failed = [t for t in traces if t.phase == "Failed"]
            if failed:
                raise BenchError(
                    f"{len(failed)} DataVolume(s) Failed, e.g. {failed[0].name}: "
                    f"{failed[0].message or 'no message'}"
                )
            if all(t.succeeded is not None for t in traces):
                break
            if now > deadline:
                phases = Counter(t.phase or "(none)" for t in traces if t.succeeded is None)
                raise BenchError(
                    f"not all Succeeded after {limit_s:g} s: "
                    + ", ".join(f"{n} {p}" for p, n in sorted(phases.items()))
                )
            await asyncio.sleep(POLL_S)
        result.wall_s = max(t.succeeded for t in traces if t.succeeded is not None) - result.t0
    finally:
        end = time.time()
        after = sampler.sample()
        await stop_profile(profiler)  # reaped before the host is read: py-spy's CPU is ours
        host_after = HostCpu.now()
        result.others = others_top(procs_before, process_table())
        if profile_to is not None:
            result.profile = summarize_profile(profile_to)
        if "controller" in before and "controller" in after:
            result.controller_cpu_s = after["controller"].cpu_s - before["controller"].cpu_s
        if "server" in before and "server" in after:
            result.server_cpu_s = after["server"].cpu_s - before["server"].cpu_s
            result.importers_cpu_s = (
                after["server"].children_cpu_s - before["server"].children_cpu_s
            )
        accounted = sum(
            x
            for x in (result.controller_cpu_s, result.server_cpu_s, result.importers_cpu_s)
            if x is not None
        )
        result.host_busy_s, result.foreign_cpu_s = host_after.foreign_since(host_before, accounted)
        result.controller_peak_rss = sampler.peak_rss("controller", result.t0, end)
        result.server_peak_rss = sampler.peak_rss("server", result.t0, end)


async def wait_pods_gone(client: Client, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        pods, _ = await client.list(POD, NAMESPACE, label_selector="cdi.kubevirt.io=importer")
        if not pods:
            return
        await asyncio.sleep(0.2)


async def check_volumes(
    client: Client, stack: Stack, names: Sequence[str], ref: Reference
) -> list[str]:
    errors = []
    for name in names:
        pvc = await client.get(PERSISTENT_VOLUME_CLAIM, name, NAMESPACE)
        volume = str((pvc.get("spec") or {}).get("volumeName") or "")
        output = stack.data / "volumes" / volume / "disk.img"
        diff = await asyncio.to_thread(ref.check, output)
        if diff:
            errors.append(f"http DV {name}: wrong output: {diff}")
    return errors


@dataclass
class OursRun:
    scenarios: dict[str, Ours]
    pods: dict[str, PodTrace]
    controller_hwm: int = 0
    controller_cpu_total_s: float | None = None
    server_hwm: int = 0
    server_cpu_total_s: float | None = None
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    pidfd_misses: int = 0
    trace: dict[str, Any] = field(default_factory=dict)
    """--trace: the instrumented controller's timers, over its whole life (both scenarios)."""


async def drive(
    stack: Stack,
    sampler: ProcSampler,
    plan: Plan,
    url: str,
    ref: Reference,
    *,
    limit_s: float,
    profile_dir: Path | None,
) -> OursRun:
    assert stack.controller is not None
    client = Client(load_kubeconfig(stack.kubeconfig))
    observer = Observer(client)
    run = OursRun({}, observer.pods)
    try:
        await wait_ready(client, START_TIMEOUT_S)
        observer.start()
        scenarios: list[tuple[str, list[Obj]]] = [
            (
                "blank",
                [
                    dv_manifest(f"blank-{i:04d}", "blank", {"blank": {}}, plan.blank_storage)
                    for i in range(plan.blank)
                ],
            ),
            (
                "http",
                [
                    dv_manifest(f"http-{i:03d}", "http", {"http": {"url": url}}, plan.http_storage)
                    for i in range(plan.http)
                ],
            ),
        ]
        for name, manifests in scenarios:
            if not manifests:
                continue
            result = run.scenarios[name] = Ours(name, len(manifests))
            log(f"  ours {name}: {len(manifests)} DataVolumes")
            try:
                await run_scenario(
                    client,
                    observer,
                    sampler,
                    result,
                    manifests,
                    limit_s=limit_s,
                    profile_to=profile_dir / f"controller-{name}.txt" if profile_dir else None,
                    controller_pid=stack.controller.pid,
                )
                log(
                    f"  ours {name}: all Succeeded after {result.wall_s:.2f} s"
                    f" (created in {result.create_s:.2f} s)"
                )
            except BenchError as err:
                result.error = str(err)
                run.errors.append(f"ours {name}: {err}")
                log(f"  ours {name}: ERROR {err}")
                continue
            if name == "http":
                run.errors.extend(
                    await check_volumes(
                        client, stack, [str(m["metadata"]["name"]) for m in manifests], ref
                    )
                )
            await wait_pods_gone(client, 30)
    finally:
        run.pidfd_misses = observer.pidfd_misses
        await observer.close()
        await client.close()
    return run


def run_ours(
    work: Path,
    plan: Plan,
    url: str,
    ref: Reference,
    *,
    timeout: float,
    profile: bool,
    trace: bool,
    workers: int,
) -> OursRun:
    root = work / "stack"
    with Stack(root, trace=trace, workers=workers) as stack:
        assert stack.server is not None and stack.controller is not None
        sampler = ProcSampler({"controller": stack.controller.pid, "server": stack.server.pid})
        sampler.start()
        try:
            os.sync()
            run = asyncio.run(
                drive(
                    stack,
                    sampler,
                    plan,
                    url,
                    ref,
                    limit_s=timeout,
                    profile_dir=root if profile else None,
                )
            )
        finally:
            last = sampler.sample()
            sampler.stop()
    run.notes.extend(stack.notes)
    run.errors.extend(f"stack: {n}" for n in stack.notes)
    if "controller" in last:
        run.controller_hwm = last["controller"].hwm
        run.controller_cpu_total_s = last["controller"].cpu_s
    if "server" in last:
        run.server_hwm = last["server"].hwm
        run.server_cpu_total_s = last["server"].cpu_s
    for pod, seconds in stack.agent_exits().items():
        if pod in run.pods:
            run.pods[pod].agent_seconds = seconds
    if stack.trace is not None:
        try:
            run.trace = json.loads(stack.trace.read_text())
        except (OSError, ValueError) as err:
            run.errors.append(f"controller trace: {err}")
    return run


# --------------------------------------------------------------------------------------------------
# baseline: the same importers, by hand


@dataclass
class ByHand:
    label: str
    count: int
    jobs: int
    wall_s: float | None = None
    runs: list[float] = field(default_factory=list)
    cpu_s: float = 0.0
    host_busy_s: float | None = None
    foreign_cpu_s: float | None = None
    others: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None


def pod_env(pod: PodTrace | None) -> dict[str, str] | None:
    if pod is None or not pod.env:
        return None
    return {str(e["name"]): str(e.get("value") or "") for e in pod.env if "valueFrom" not in e}


def loopback(index: int) -> str:
    """127.1.x.y: outside the agent's pool (127.0.x.y), one per importer."""
    return f"127.1.{index // 254}.{1 + index % 254}"


@dataclass(frozen=True)
class Outcome:
    wall_s: float
    cpu_s: float
    """CPU of the importer and everything it waited for (nbdkit, qemu-img), from wait4."""
    code: int
    pid: int
    timed_out: bool


def _run_one(argv: list[str], env: dict[str, str], cwd: Path, timeout: float) -> Outcome:
    with open(cwd / "importer.log", "wb") as out:
        start = time.time()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    pidfd = os.pidfd_open(proc.pid)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        timed_out = not poller.poll(int(timeout * 1000))
        if timed_out:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        _, status, usage = os.wait4(proc.pid, 0)
        end = time.time()
    finally:
        os.close(pidfd)
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    return Outcome(end - start, usage.ru_utime + usage.ru_stime, code, proc.pid, timed_out)


def _leftovers(sids: set[int]) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            data = Path(f"/proc/{name}/stat").read_bytes()
            fields = data[data.rfind(b")") + 2 :].split()
            if int(fields[3]) in sids and fields[0] != b"Z":
                found.append(int(name))
    return found


def run_by_hand(
    label: str,
    template: Mapping[str, str],
    count: int,
    *,
    work: Path,
    metrics: bool,
    jobs: int,
    timeout: float,
    check: Callable[[Path], str | None] | None,
) -> ByHand:
    result = ByHand(label, count, jobs or count)
    root = work / "byhand" / label
    shutil.rmtree(root, ignore_errors=True)
    prepared: list[tuple[dict[str, str], Path]] = []
    for i in range(count):
        rundir = root / f"{i:04d}"
        data = rundir / "data"
        data.mkdir(parents=True)
        absent = rundir / "not-mounted"
        env = {k: os.environ[k] for k in PASSTHROUGH if k in os.environ}
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"
        env.update(template)
        ip = loopback(i)
        env.update(
            {
                "HOME": str(rundir),
                "HOSTNAME": f"byhand-{i}",
                "POD_IP": ip,
                "OWNER_UID": str(uuid.uuid4()),
                "CDI_DATA_DIR": str(data),
                "CDI_SCRATCH_DIR": str(absent / "scratch"),
                "CDI_BLOCK_DEVICE": str(absent / "dev" / "cdi-block-volume"),
                "CDI_TERMINATION_LOG": str(rundir / "termination-log"),
                "CDI_METRICS_ADDR": f"{ip}:{METRICS_PORT}" if metrics else "off",
            }
        )
        prepared.append((env, rundir))
    os.sync()
    host_before = HostCpu.now()
    procs_before = process_table()
    start = time.time()
    with ThreadPoolExecutor(max_workers=result.jobs) as pool:
        futures = [
            pool.submit(_run_one, [str(IMPORTER)], env, rundir, timeout) for env, rundir in prepared
        ]
        outcomes = [f.result() for f in futures]
    result.wall_s = time.time() - start
    result.host_busy_s, result.foreign_cpu_s = HostCpu.now().foreign_since(host_before, 0.0)
    result.others = others_top(procs_before, process_table())
    result.runs = [o.wall_s for o in outcomes]
    result.cpu_s = sum(o.cpu_s for o in outcomes)
    failures = [(i, o.code) for i, o in enumerate(outcomes) if o.code != 0]
    errors = []
    timed_out = sum(o.timed_out for o in outcomes)
    if timed_out:
        errors.append(f"{timed_out} importer(s) killed after {timeout:g} s")
    elif failures:
        i, code = failures[0]
        tail = (prepared[i][1] / "importer.log").read_text(errors="replace").strip().splitlines()
        errors.append(
            f"{len(failures)} importer(s) failed, e.g. #{i} exit {code}: {tail[-1] if tail else ''}"
        )
    # Every importer ran in a session of its own: anything still in one of them leaked.
    sids = {o.pid for o in outcomes}
    deadline = time.monotonic() + LEAK_GRACE_S
    while (leaked := _leftovers(sids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if leaked:
        for pid in leaked:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        errors.append(f"{len(leaked)} process(es) left running by the importers: {leaked[:5]}")
    if check is not None and not failures:
        with ThreadPoolExecutor(max_workers=4) as pool:
            diffs = [
                d for d in pool.map(check, [r / "data" / "disk.img" for _, r in prepared]) if d
            ]
        if diffs:
            errors.append(f"{len(diffs)} wrong output(s), e.g. {diffs[0]}")
    if errors:
        result.error = "; ".join(errors)
        result.wall_s = None
    shutil.rmtree(root, ignore_errors=True)
    return result


# --------------------------------------------------------------------------------------------------
# analysis and report

STAGES = ("create -> pod", "pod -> start", "importer run", "exit -> Succeeded")


@dataclass
class Analysis:
    """One scenario of one repeat: ours, the baselines, and where ours spent its time."""

    scenario: str
    count: int
    ours_wall_s: float | None
    create_s: float | None
    latency: dict[str, float | None]
    stages: dict[str, dict[str, float | None]]
    importer_sum_s: float | None
    importer_busy_s: float | None
    importer_idle_s: float | None
    max_concurrent: int
    precision: dict[str, int]
    controller_cpu_s: float | None
    controller_peak_rss: int
    server_cpu_s: float | None
    server_peak_rss: int
    importers_cpu_s: float | None
    by_hand_wall_s: float | None
    by_hand_sum_s: float | None
    by_hand_cpu_s: float | None
    metrics_off_wall_s: float | None
    metrics_off_sum_s: float | None
    ours_host_busy_s: float | None
    ours_foreign_cpu_s: float | None
    by_hand_host_busy_s: float | None
    by_hand_foreign_cpu_s: float | None
    ours_others: list[tuple[str, float]]
    by_hand_others: list[tuple[str, float]]
    profile: list[tuple[str, float]]
    errors: list[str]


def analyse(
    ours: Ours | None, pods: Mapping[str, PodTrace], hand: ByHand | None, off: ByHand | None
) -> Analysis:
    scenario = ours.scenario if ours else hand.label if hand else "?"
    errors = [
        e for e in (ours.error if ours else None, hand and hand.error, off and off.error) if e
    ]
    by_dv: dict[str, PodTrace] = {}
    for pod in pods.values():
        by_dv.setdefault(pod.dv, pod)
    stages: dict[str, list[float]] = {s: [] for s in STAGES}
    intervals: list[tuple[float, float]] = []
    precision: Counter[str] = Counter()
    for dv in ours.dvs if ours else []:
        trace = by_dv.get(dv.name)
        if trace is None:
            precision["no pod seen"] += 1
            continue
        run = trace.run()
        if trace.added is not None:
            stages["create -> pod"].append(trace.added - dv.sent)
        if run is None:
            precision["no run time"] += 1
            continue
        start, end, how = run
        precision[how] += 1
        intervals.append((start, end))
        stages["importer run"].append(end - start)
        if trace.added is not None:
            stages["pod -> start"].append(start - trace.added)
        if dv.succeeded is not None:
            stages["exit -> Succeeded"].append(dv.succeeded - end)
    wall = ours.wall_s if ours and ours.error is None else None
    busy = idle = None
    if wall is not None and ours is not None and intervals:
        busy = union_seconds(intervals, ours.t0, ours.t0 + wall)
        idle = wall - busy
    ok_hand = hand if hand and hand.error is None else None
    ok_off = off if off and off.error is None else None
    return Analysis(
        scenario=scenario,
        count=ours.count if ours else hand.count if hand else 0,
        ours_wall_s=wall,
        create_s=ours.create_s if ours else None,
        latency=dist(ours.latencies()) if ours and wall is not None else dist([]),
        stages={s: dist(v) for s, v in stages.items()},
        importer_sum_s=sum(e - s for s, e in intervals) if intervals else None,
        importer_busy_s=busy,
        importer_idle_s=idle,
        max_concurrent=max_overlap(intervals),
        precision=dict(precision),
        controller_cpu_s=ours.controller_cpu_s if ours else None,
        controller_peak_rss=ours.controller_peak_rss if ours else 0,
        server_cpu_s=ours.server_cpu_s if ours else None,
        server_peak_rss=ours.server_peak_rss if ours else 0,
        importers_cpu_s=ours.importers_cpu_s if ours else None,
        by_hand_wall_s=ok_hand.wall_s if ok_hand else None,
        by_hand_sum_s=sum(ok_hand.runs) if ok_hand else None,
        by_hand_cpu_s=ok_hand.cpu_s if ok_hand else None,
        metrics_off_wall_s=ok_off.wall_s if ok_off else None,
        metrics_off_sum_s=sum(ok_off.runs) if ok_off else None,
        ours_host_busy_s=ours.host_busy_s if ours else None,
        ours_foreign_cpu_s=ours.foreign_cpu_s if ours else None,
        by_hand_host_busy_s=ok_hand.host_busy_s if ok_hand else None,
        by_hand_foreign_cpu_s=ok_hand.foreign_cpu_s if ok_hand else None,
        ours_others=ours.others if ours else [],
        by_hand_others=ok_hand.others if ok_hand else [],
        profile=ours.profile if ours else [],
        errors=errors,
    )


def overhead(ours: float | None, base: float | None, count: int) -> float | None:
    if ours is None or base is None or not count:
        return None
    return (ours - base) / count


@dataclass
class Best:
    """Per scenario, over the repeats: best walls, and the details of ours' best repeat."""

    scenario: str
    count: int
    ours: Analysis | None
    by_hand_wall_s: float | None
    metrics_off_wall_s: float | None
    repeats_ok: int
    repeats: int

    @property
    def ours_wall_s(self) -> float | None:
        return self.ours.ours_wall_s if self.ours else None

    @property
    def overhead_s(self) -> float | None:
        return overhead(self.ours_wall_s, self.by_hand_wall_s, self.count)

    @property
    def overhead_off_s(self) -> float | None:
        return overhead(self.ours_wall_s, self.metrics_off_wall_s, self.count)


def pick_best(scenario: str, analyses: Sequence[Analysis]) -> Best:
    ok = [a for a in analyses if a.ours_wall_s is not None]
    best = min(ok, key=lambda a: a.ours_wall_s or 0.0) if ok else None
    hands = [a.by_hand_wall_s for a in analyses if a.by_hand_wall_s is not None]
    offs = [a.metrics_off_wall_s for a in analyses if a.metrics_off_wall_s is not None]
    return Best(
        scenario=scenario,
        count=analyses[0].count if analyses else 0,
        ours=best,
        by_hand_wall_s=min(hands) if hands else None,
        metrics_off_wall_s=min(offs) if offs else None,
        repeats_ok=len(ok),
        repeats=len(analyses),
    )


def _ratio(a: float | None, b: float | None) -> str:
    return fmt(a / b if a is not None and b else None, ".2f") + ("x" if a is not None and b else "")


def wall_table(bests: Sequence[Best]) -> str:
    headers = [
        "scenario",
        "DVs",
        "ours s",
        "by hand s",
        "ours/hand",
        "overhead/DV s",
        "metrics off s",
        "overhead/DV vs off",
        "latency p50",
        "p95",
        "max",
    ]
    rows = []
    for b in bests:
        a = b.ours
        rows.append(
            [
                b.scenario,
                str(b.count),
                fmt(a.ours_wall_s if a else None),
                fmt(b.by_hand_wall_s),
                _ratio(a.ours_wall_s if a else None, b.by_hand_wall_s),
                fmt(b.overhead_s, ".3f"),
                fmt(b.metrics_off_wall_s),
                fmt(b.overhead_off_s, ".3f"),
                fmt(a.latency["p50"] if a else None),
                fmt(a.latency["p95"] if a else None),
                fmt(a.latency["max"] if a else None),
            ]
        )
    return table(headers, rows)


def cost_table(bests: Sequence[Best]) -> str:
    headers = [
        "scenario",
        "ctl cpu s",
        "ctl cpu ms/DV",
        "ctl peak MiB",
        "server cpu s",
        "server peak MiB",
        "importers cpu s",
        "by hand cpu s",
    ]
    rows = []
    for b in bests:
        a = b.ours
        if a is None:
            rows.append([b.scenario, *(["-"] * (len(headers) - 1))])
            continue
        per_dv = a.controller_cpu_s * 1000 / a.count if a.controller_cpu_s is not None else None
        rows.append(
            [
                b.scenario,
                fmt(a.controller_cpu_s),
                fmt(per_dv, ".1f"),
                mib(a.controller_peak_rss),
                fmt(a.server_cpu_s),
                mib(a.server_peak_rss),
                fmt(a.importers_cpu_s),
                fmt(a.by_hand_cpu_s),
            ]
        )
    return table(headers, rows)


def stage_table(bests: Sequence[Best]) -> str:
    headers = ["scenario / stage", "n", "p50 s", "p95 s", "max s", "mean s"]
    rows = []
    for b in bests:
        if b.ours is None:
            continue
        for stage in STAGES:
            d = b.ours.stages[stage]
            rows.append(
                [
                    f"{b.scenario}: {stage}",
                    str(d["n"]),
                    fmt(d["p50"]),
                    fmt(d["p95"]),
                    fmt(d["max"]),
                    fmt(d["mean"]),
                ]
            )
    return table(headers, rows)


def floor_lines(bests: Sequence[Best]) -> list[str]:
    lines = []
    for b in bests:
        a = b.ours
        if a is None:
            continue
        how = ", ".join(f"{n} {p}" for p, n in sorted(a.precision.items()))
        lines.append(
            f"  {b.scenario}: importers ran {fmt(a.importer_sum_s, '.1f')} s in total under the"
            f" control plane vs {fmt(a.by_hand_sum_s, '.1f')} s by hand"
            f" ({fmt(a.metrics_off_sum_s, '.1f')} s metrics off); at most {a.max_concurrent} at"
            f" once; no importer running for {fmt(a.importer_idle_s)} s of {fmt(a.ours_wall_s)} s;"
            f" creates took {fmt(a.create_s)} s (run times: {how or 'none'})"
        )
        cores = os.cpu_count() or 1
        for who, busy, foreign, wall, others in (
            ("ours", a.ours_host_busy_s, a.ours_foreign_cpu_s, a.ours_wall_s, a.ours_others),
            (
                "by hand",
                a.by_hand_host_busy_s,
                a.by_hand_foreign_cpu_s,
                a.by_hand_wall_s,
                a.by_hand_others,
            ),
        ):
            if busy is None or foreign is None or not wall:
                continue
            top = ", ".join(f"{name} {secs:.1f} s" for name, secs in others)
            lines.append(
                f"    host during {who}: {busy / (wall * cores) * 100:.0f}% of {cores} cores busy,"
                f" {foreign:.1f} cpu-s of it by processes not this benchmark's"
                + (" (NOISY: other load on the host)" if foreign > 0.1 * wall * cores else "")
                + (f"; largest: {top}" if top else "")
            )
    return lines


def check_targets(bests: Sequence[Best], controller_hwm: int) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []
    for b in bests:
        value = b.overhead_s
        checks.append(
            {
                "target": f"{b.scenario}: control-plane overhead per DV < {TARGET_OVERHEAD_S} s",
                "value": value,
                "limit": TARGET_OVERHEAD_S,
                "pass": value is not None and value < TARGET_OVERHEAD_S,
            }
        )
    checks.append(
        {
            "target": f"controller peak RSS < {TARGET_RSS // MIB} MiB",
            "value": controller_hwm / MIB if controller_hwm else None,
            "limit": TARGET_RSS // MIB,
            "pass": 0 < controller_hwm < TARGET_RSS,
        }
    )
    return checks


def targets_text(checks: Sequence[Mapping[str, Any]]) -> str:
    lines = []
    for c in checks:
        value = c["value"]
        unit = " MiB" if "RSS" in c["target"] else " s"
        shown = "n/a" if value is None else f"{value:.3f}{unit}"
        lines.append(f"  {'PASS' if c['pass'] else 'MISS'}  {c['target']}: {shown}")
    return "\n".join(lines)


def profile_text(bests: Sequence[Best]) -> str:
    lines = []
    for b in bests:
        if b.ours is None or not b.ours.profile:
            continue
        lines.append(f"  {b.scenario} (share of the controller's samples, inclusive):")
        lines.extend(f"    {share * 100:5.1f}%  {frame}" for frame, share in b.ours.profile)
    return "\n".join(lines)


def trace_text(trace: Mapping[str, Any]) -> str:
    series: Mapping[str, Mapping[str, float]] = trace.get("series") or {}
    rows = [
        [
            name,
            str(int(v["n"])),
            fmt(v["total"]),
            fmt(v["p50"] * 1000, ".1f"),
            fmt(v["p95"] * 1000, ".1f"),
            fmt(v["max"] * 1000, ".1f"),
        ]
        for name, v in sorted(series.items(), key=lambda kv: -kv[1]["total"])
    ]
    text = table(["series", "n", "total s", "p50 ms", "p95 ms", "max ms"], rows)
    counts: Mapping[str, int] = trace.get("counts") or {}
    return text + "\n" + "\n".join(f"  {n:6d}  {k}" for k, n in sorted(counts.items()))


# --------------------------------------------------------------------------------------------------
# main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="controller.py", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="40 blank + 5 http DVs, 16 MiB image")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--repeat", type=int, default=1, help="runs of everything; best is shown")
    parser.add_argument("--blank", type=int, help="blank DataVolumes [200; quick 40]")
    parser.add_argument("--http", type=int, help="http DataVolumes [20; quick 5]")
    parser.add_argument(
        "--jobs", type=int, default=0, help="by-hand importers at once [0: all, as the agent]"
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds per scenario [600]")
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the controller during each scenario"
    )
    parser.add_argument(
        "--trace",
        action="store_true",
        help="run the controller with timers on API calls, reconciles and queue waits",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="experiment: every controller gets N workers instead of its own (implies --trace)",
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def run_repeat(
    index: int,
    work: Path,
    plan: Plan,
    url: str,
    ref: Reference,
    templates: dict[str, dict[str, str]],
    args: argparse.Namespace,
) -> tuple[OursRun | None, dict[str, tuple[ByHand | None, ByHand | None]]]:
    counts = {"blank": plan.blank, "http": plan.http}
    checks: dict[str, Callable[[Path], str | None] | None] = {"blank": None, "http": ref.check}
    hands: dict[str, tuple[ByHand | None, ByHand | None]] = {}

    def by_hand() -> None:
        for scenario, count in counts.items():
            if not count:
                continue
            template = templates.get(scenario)
            if template is None:
                hands[scenario] = (None, None)
                log(f"  by hand {scenario}: skipped (no importer pod env captured)")
                continue
            pair = []
            for metrics in (True, False):
                label = scenario if metrics else f"{scenario}-metrics-off"
                result = run_by_hand(
                    label,
                    template,
                    count,
                    work=work,
                    metrics=metrics,
                    jobs=args.jobs,
                    timeout=args.timeout,
                    check=checks[scenario],
                )
                status = "ok" if result.error is None else f"ERROR {result.error}"
                log(f"  by hand {label}: {count} importers in {fmt(result.wall_s)} s  {status}")
                pair.append(result)
            hands[scenario] = (pair[0], pair[1])

    ours: OursRun | None = None
    hand_first = index % 2 == 1 and all(templates.get(s) for s, n in counts.items() if n)
    if hand_first:
        by_hand()
    try:
        ours = run_ours(
            work,
            plan,
            url,
            ref,
            timeout=args.timeout,
            profile=args.profile,
            trace=args.trace,
            workers=args.workers,
        )
    except BenchError as err:
        log(f"  ours: ERROR {err}")
        ours = OursRun({}, {}, errors=[f"ours: {err}"])
    for scenario in counts:
        if scenario not in templates:
            first = next(
                (p for p in ours.pods.values() if p.dv.startswith(f"{scenario}-") and p.env), None
            )
            env = pod_env(first)
            if env is not None:
                templates[scenario] = env
    if not args.keep:
        shutil.rmtree(work / "stack", ignore_errors=True)
    if not hand_first:
        by_hand()
    return ours, hands


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = Plan.make(args)
    for tool in (CDI, IMPORTER):
        if not os.access(tool, os.X_OK):
            log(f"not found: {tool}")
            return 2
    work = Path(tempfile.mkdtemp(prefix="cdi-controller-bench-", dir="/var/tmp"))
    started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    began = time.perf_counter()
    analyses: dict[str, list[Analysis]] = {"blank": [], "http": []}
    repeats_json: list[dict[str, Any]] = []
    errors: list[str] = []
    notes: list[str] = []
    controller_hwm = 0
    traces: list[dict[str, Any]] = []
    failed = False
    try:
        log(f"work dir {work}")
        images = work / "images"
        build_image(images, plan)
        ref = Reference(images, plan.image_data)
        templates: dict[str, dict[str, str]] = {}
        with FileServer(images, work, "disk.qcow2") as files:
            url = files.url("disk.qcow2")
            log(f"file server on 127.0.0.1:{files.port}")
            for i in range(args.repeat):
                log(f"repeat {i + 1}/{args.repeat}:")
                ours, hands = run_repeat(i, work / f"run{i + 1}", plan, url, ref, templates, args)
                assert ours is not None
                errors.extend(f"#{i + 1} {e}" for e in ours.errors)
                notes.extend(f"#{i + 1} {n}" for n in ours.notes)
                controller_hwm = max(controller_hwm, ours.controller_hwm)
                record: dict[str, Any] = {
                    "controller_hwm_mib": ours.controller_hwm / MIB,
                    "controller_cpu_total_s": ours.controller_cpu_total_s,
                    "server_hwm_mib": ours.server_hwm / MIB,
                    "server_cpu_total_s": ours.server_cpu_total_s,
                    "pidfd_misses": ours.pidfd_misses,
                    "controller_trace": ours.trace,
                    "scenarios": {},
                }
                if ours.trace:
                    traces.append(ours.trace)
                for scenario in ("blank", "http"):
                    count = plan.blank if scenario == "blank" else plan.http
                    if not count:
                        continue
                    hand, off = hands.get(scenario, (None, None))
                    for extra in (hand, off):
                        if extra is not None and extra.error:
                            errors.append(f"#{i + 1} by hand {extra.label}: {extra.error}")
                    result = ours.scenarios.get(scenario)
                    a = analyse(result, ours.pods, hand, off)
                    if result is None and not any(e.startswith("ours:") for e in ours.errors):
                        a.errors.append("ours did not run")
                    analyses[scenario].append(a)
                    names = {d.name for d in result.dvs} if result else set()
                    record["scenarios"][scenario] = {
                        "analysis": asdict(a),
                        "dvs": [asdict(d) for d in result.dvs] if result else [],
                        "pods": [
                            {k: v for k, v in asdict(p).items() if k != "env"}
                            for p in ours.pods.values()
                            if p.dv in names
                        ],
                        "by_hand_runs_s": hand.runs if hand else [],
                        "metrics_off_runs_s": off.runs if off else [],
                    }
                repeats_json.append(record)
    except (BenchError, OSError, subprocess.SubprocessError) as err:
        log(f"benchmark error: {type(err).__name__}: {err}")
        errors.append(f"{type(err).__name__}: {err}")
        failed = True
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    bests = [pick_best(s, a) for s, a in analyses.items() if a]
    if not bests:
        return 1
    checks = check_targets(bests, controller_hwm)
    mode = "quick" if args.quick else "full"
    print(
        f"\ncontroller benchmark ({mode}: {plan.blank} blank DVs of {plan.blank_storage},"
        f" {plan.http} http DVs of a {plan.image_virtual // MIB} MiB qcow2 with"
        f" {plan.image_data // MIB} MiB data into {plan.http_storage}; cdi controller --local"
        f" beside cdi server --no-controllers; best of {args.repeat};"
        f" by hand: the same cdi-importer env, {args.jobs or 'all'} at once)"
    )
    if args.workers:
        print(f"EXPERIMENT: every controller ran with {args.workers} workers (--workers)")
    print(wall_table(bests))
    print("\ncost (controller = `cdi controller` alone; importers cpu = the server's reaped pods):")
    print(cost_table(bests))
    print("\nwhere a DV's time goes (ours, best repeat; from the pod watch and the importer pids):")
    print(stage_table(bests))
    print("\n".join(floor_lines(bests)))
    if args.profile:
        print("\ncontroller profile (py-spy):")
        print(profile_text(bests) or "  (no samples)")
    if traces:
        print("\ncontroller trace (instrumented controller, whole run, last repeat):")
        print(trace_text(traces[-1]))
    print("\ntargets:")
    print(targets_text(checks))
    if notes:
        print("\nnotes:")
        print("\n".join(f"  {n}" for n in notes))
    if errors:
        print("\nerrors:")
        print("\n".join(f"  {e}" for e in errors))
    meta = {
        "benchmark": "controller",
        "timestamp": started,
        "seconds": round(time.perf_counter() - began, 1),
        "mode": mode,
        "repeat": args.repeat,
        "jobs": args.jobs,
        "controller_workers": args.workers or "default",
        "trace": bool(args.trace or args.workers),
        "profile": args.profile,
        "plan": asdict(plan),
        "host": {
            "cpus": os.cpu_count(),
            "kernel": os.uname().release,
            "python": sys.version.split()[0],
            "qemu-img": tool_version(["qemu-img", "--version"]),
        },
    }
    summary = {
        b.scenario: {
            "count": b.count,
            "ours_wall_s": b.ours.ours_wall_s if b.ours else None,
            "by_hand_wall_s": b.by_hand_wall_s,
            "metrics_off_wall_s": b.metrics_off_wall_s,
            "overhead_per_dv_s": b.overhead_s,
            "overhead_per_dv_vs_metrics_off_s": b.overhead_off_s,
            "repeats_ok": b.repeats_ok,
            "best": asdict(b.ours) if b.ours else None,
        }
        for b in bests
    }
    OUT_DIR.mkdir(exist_ok=True)
    out = OUT_DIR / "controller.json"
    out.write_text(
        json.dumps(
            {
                **meta,
                "summary": summary,
                "checks": checks,
                "controller_hwm_mib": controller_hwm / MIB,
                "repeats": repeats_json,
                "errors": errors,
                "notes": notes,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {out.relative_to(REPO)}")
    scenario_errors = any(a.errors for runs in analyses.values() for a in runs)
    return 1 if failed or errors or scenario_errors else 0


if __name__ == "__main__":
    sys.exit(main())
