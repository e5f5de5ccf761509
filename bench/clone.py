"""Clone benchmark: host-assisted and snapshot clones by `cdi server`, next to `cp` and `qemu-img`.

One source volume: a blank DataVolume (10Gi, Filesystem; `--quick`: 1Gi) whose disk.img then gets
1 GiB of random data (`--quick`: 128 MiB) written straight into it, in 64 MiB extents (`--quick`:
16 MiB) spread evenly over it, the rest holes, and fsync'd. Its data extents are read once more
before the first measurement, so every method starts with the source in the page cache (nothing
is dropped: the source's resident bytes, from `fincore`, are recorded before every run, and `sync`
runs before every run so that no earlier run's dirty pages are written back during it). Measured
in one run, on one file system (the server's data dir and the floors' output under /var/tmp):

- **(a) copy**: a clone DataVolume (`spec.source.pvc`, no size: the source's) with the annotations
  `cdi.kubevirt.io/clone-strategy: copy` and `cdi.kubevirt.io/storage.pod.retainAfterCompletion:
  "true"`. A source pod runs `cdi-cloner`, which streams the source's data extents to a
  `cdi-uploadserver` pod on the target; the upload server fsyncs the volume before it answers.
  Bytes moved: the cloner's `wire_bytes` (its `clone complete ...` log line, read through the
  API from the retained pod named in the target PVC's `storage.sourceClonePodName`).
- **(b) snapshot**: the same with `clone-strategy: snapshot`. The local provisioner takes a
  VolumeSnapshot (`cp -a --reflink=auto --sparse=always`, then fsync) and restores the target PVC
  from it (a second such copy): on a file system without reflink (ext4) those are two sparse
  copies. Bytes moved: what the `cdi server` process and the children it reaped wrote
  (`write_bytes` of /proc/<pid>/io: page-cache bytes dirtied, none for shared extents).
- **floors**: `cp --sparse=always SRC DST` and `qemu-img convert -f raw -O raw -t none SRC DST`
  (qemu-img's default sparse detection), each run by benchlib.measure (wall, CPU of the tree,
  peak RSS), then an fsync of DST timed on its own. Bytes moved: DST's allocated bytes (what
  `du --block-size=1` shows).

fsync, decided: (a) and (b) make their target durable before Succeeded (the upload server fsyncs
the volume; the provisioner fsyncs each copy), so the floors' time used for the ratios and targets
is the command plus the fsync of DST ("durable"); the bare command's time and the ratios against
it are printed too, marked as such.

Wall time of (a) and (b): DataVolume create request sent -> the first status poll (every 50 ms
through the API client) that shows phase Succeeded: the control plane is included. While they
run, every process the server starts for them (a child of the server found in /proc whose command
line names cdi-cloner, cdi-uploadserver or cp and whose command line or environment names our
data dir) is sampled every 20 ms: CPU (utime+stime), VmRSS/VmHWM, time stopped (state T: the node
agent holds pods to CDI's CPU limit, 750m by default, with SIGSTOP duty cycles) and time with a
thread in fsync/fdatasync/sync (/proc/<pid>/task/*/syscall). Sampling misses at most the last 20
ms of a process; the exact CPU of all the children the server reaped (cutime+cstime) is shown
beside it, with the server's own CPU (API, controllers, agent, provisioner), the host's busy CPU
and what other processes used in the same window. From the processes' lifetimes each clone's
time is split into stages (control plane, pod start, copy, teardown).

Targets (from the issue): (a) <= 1.5x the durable `cp --sparse=always`; (b) <= 1 s on a
reflink-capable file system, shown as "n/a (no reflink)" where the data dir's file system has
none (probed with `cp --reflink=always` on two small files there). For scale: CDI's cloner +
upload server took 3.7 s for a 2 GiB volume with 1 GiB of data on this kind of machine.

`--xfs`: afterwards a sparse XFS image (`mkfs.xfs -m reflink=1`) under the work dir is
loop-mounted, a second server runs with its data dir there over its own source (same sizes), and
(b) is measured on it next to `cp --reflink=always SRC DST` + fsync (the reflink floor). Needs
root; the image is unmounted and removed whatever happens. The image's own I/O goes through the
loop device to the host's file system.

`--repeat N` (default 2) runs each method N times, in alternating order; tables show best/median,
ratios of best times. Every target is compared with the source (sparse-aware; bytes past the
source's size must be zeros) and removed before the next run. A clone whose pods restarted is
measured again (3 attempts in all; the last one counts whatever happened): the restart back-off
(10 s, 20 s, ...) is no clone speed. The usual cause is another `cdi server` on this machine: each
node agent hands out pod addresses from 127.0.1.1 on, so the upload server may find its address
and port taken; the disturbed runs are listed as warnings and kept in the JSON. The exit status
is 1 only when a measurement failed (a clone that failed or did not succeed within 300 s, wrong
bytes, a command that failed, processes left behind); a missed target is reported as MISS.

Run alone: `.venv/bin/python bench/clone.py [--quick] [--keep] [--repeat N] [--xfs] [--methods
copy,snapshot,cp,qemu-img] [--timeout S]`; `make bench` runs it through bench/run.py (`--only
clone`). JSON goes to bench/out/clone.json. Everything runs from this Python's bin directory
(`cdi`; the local agent runs pods from there too), so running this file with another
environment's Python measures that environment's code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from benchlib import (
    MIB,
    data_ranges,
    fmt,
    measure,
    memory_state,
    pid_stat,
    read_bytes,
    sparse_diff,
    table,
    tool_version,
    vm_bytes,
)
from upload import (
    BenchError,
    clean_env,
    foreign_cpu,
    host_busy_ticks,
    log,
    process_cpu,
    processes_mentioning,
    spawn,
    stop_process,
    wait_for_line,
)

from cdi.api import annotations as ann
from cdi.api.groups import (
    DATA_VOLUME,
    PERSISTENT_VOLUME,
    PERSISTENT_VOLUME_CLAIM,
    POD,
    Resource,
)
from cdi.controller.uploadpod import PROBE_INITIAL_DELAY, PROBE_PERIOD
from cdi.kube.client import Client, resource_path
from cdi.kube.config import load_kubeconfig
from cdi.kube.errors import ApiError, NotFound
from cdi.provisioner import volume_path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
OUT_DIR = BENCH_DIR / "out"
VENV_BIN = Path(sys.executable).parent
CDI = VENV_BIN / "cdi"
GIB = 1024 * MIB
NAMESPACE = "default"
SOURCE = "clone-source"
METHODS = ("copy", "snapshot", "cp", "qemu-img")
XFS_METHODS = ("snapshot", "reflink")
CLONES = ("copy", "snapshot")
FLOORS: dict[str, list[str]] = {
    "cp": ["cp", "--sparse=always"],
    "qemu-img": ["qemu-img", "convert", "-f", "raw", "-O", "raw", "-t", "none"],
    "reflink": ["cp", "--reflink=always"],
}
LABELS = {
    "copy": "(a) host-assisted",
    "snapshot": "(b) snapshot",
    "cp": "cp --sparse=always",
    "qemu-img": "qemu-img convert -t none",
    "reflink": "cp --reflink=always",
}
COPY_OVER_CP = 1.5
SNAPSHOT_TARGET_S = 1.0
CDI_SECONDS = 3.7
"""CDI's cloner + upload server, 2 GiB volume with 1 GiB of data, this kind of machine."""
POLL_S = 0.05
SAMPLE_S = 0.02
CLONE_TIMEOUT_S = 300.0
SOURCE_TIMEOUT_S = 120.0
DELETE_TIMEOUT_S = 120.0
API_TIMEOUT_S = 30.0
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
LEAK_GRACE_S = 5.0
SETTLE_S = 10.0
"""How long the processes of a clone may outlive its Succeeded before they are left unsampled."""
CLK_TCK = os.sysconf("SC_CLK_TCK")
SYNC_SYSCALLS: dict[str, frozenset[int]] = {
    "x86_64": frozenset({74, 75, 162, 277, 306}),
    "aarch64": frozenset({81, 82, 83, 84, 267}),
}
"""fsync, fdatasync, sync, sync_file_range, syncfs."""
CLONE_COMPLETE = re.compile(r"clone complete ((?:\w+=\S+ ?)+)")
COPIED = re.compile(
    r"cdi\.provisioner\.copying copied src=\S+ dst=(\S+) .*?allocated=(\d+) seconds=([0-9.]+)"
)
REFLINK_LOG = re.compile(r"provisioner started .*?reflink=(\S+(?: \([^)]*\))?)")
EXITED = re.compile(r"cdi\.agent\.runner \S+: container=(\S+) exited code=(-?\d+)")
STARTED = re.compile(r"cdi\.agent\.runner \S+: started container=(\S+) pid=\d+ ip=(\S+)")
CLONE_ATTEMPTS = 3
"""A clone whose pods restarted is measured again (at most this many times in all)."""

Obj = dict[str, Any]
T = TypeVar("T")


# --------------------------------------------------------------------------------------------------
# sizes and files


@dataclass(frozen=True)
class Sizes:
    volume: str
    """The source DataVolume's requested size."""
    data: int
    extent: int
    """Random data is written in extents of this size, evenly spread over the volume."""

    @staticmethod
    def for_mode(quick: bool) -> Sizes:
        if quick:
            return Sizes("1Gi", 128 * MIB, 16 * MIB)
        return Sizes("10Gi", 1 * GIB, 64 * MIB)

    def extents(self, size: int) -> list[tuple[int, int]]:
        count = self.data // self.extent
        stride = size // count // MIB * MIB
        return [(i * stride, self.extent) for i in range(count)]


def same_volume(source: Path, target: Path) -> str | None:
    """None if `target` holds `source`'s bytes; a target grown to its volume's size must read
    zeros past the source's end."""
    return sparse_diff(source, target, grown=True)


def write_extents(path: Path, extents: Sequence[tuple[int, int]]) -> None:
    """Random data over `extents` of an existing file (the rest stays as it is: holes), fsync'd."""
    chunk = 8 * MIB
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset, length in extents:
            for pos in range(offset, offset + length, chunk):
                os.pwrite(fd, os.urandom(min(chunk, offset + length - pos)), pos)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_data(path: Path) -> int:
    """Read the data extents of `path` once (into the page cache); the bytes read."""
    total = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        for start, end in data_ranges(fd, 0, os.fstat(fd).st_size):
            for offset in range(start, end, 8 * MIB):
                total += len(os.pread(fd, min(8 * MIB, end - offset), offset))
    finally:
        os.close(fd)
    return total


def allocated(path: Path) -> int:
    """Allocated bytes of a file (`du --block-size=1` of it)."""
    return path.stat().st_blocks * 512


def resident(path: Path) -> int | None:
    """Bytes of `path` in the page cache (`fincore`), or None if fincore is unavailable."""
    try:
        done = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = done.stdout.strip()
    return int(text) if text.isdigit() else None


def fs_type(path: Path) -> str:
    done = subprocess.run(
        ["stat", "-f", "-c", "%T", str(path)],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return done.stdout.strip() or "?"


def reflink_probe(directory: Path) -> bool:
    """Whether `cp --reflink=always` works between two small files in `directory`."""
    src, dst = directory / ".reflink-probe-a", directory / ".reflink-probe-b"
    try:
        src.write_bytes(b"x" * 4096)
        done = subprocess.run(
            ["cp", "--reflink=always", str(src), str(dst)],
            capture_output=True,
            timeout=30,
            check=False,
        )
        return done.returncode == 0
    finally:
        src.unlink(missing_ok=True)
        dst.unlink(missing_ok=True)


def fsync_path(path: Path) -> float:
    """fsync a file; the seconds it took."""
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------------
# /proc


def write_bytes(pid: int | str) -> int | None:
    """`write_bytes` of /proc/<pid>/io: bytes the process (and the children it reaped) dirtied."""
    for line in read_bytes(f"/proc/{pid}/io").splitlines():
        name, _, value = line.partition(b":")
        if name == b"write_bytes":
            return int(value)
    return None


def _tag(cmdline: bytes) -> str:
    """For the provisioner's cp: `snapshot` or `restore`, from its destination (the last
    argument); "" for other processes."""
    args = [a for a in cmdline.split(b"\0") if a]
    if not args or os.path.basename(args[0]) != b"cp":
        return ""
    return _copy_kind(args[-1].decode(errors="replace"))


def _copy_kind(destination: str) -> str:
    """A provisioner copy to <data>/snapshots/... takes a snapshot, to <data>/volumes/...
    restores one."""
    parent = os.path.basename(os.path.dirname(destination.rstrip("/")))
    return {"snapshots": "snapshot", "volumes": "restore"}.get(parent, parent)


def _role(cmdline: bytes) -> str:
    if b"cdi-cloner" in cmdline or b"cloner.main" in cmdline:
        return "cloner"
    if b"cdi-uploadserver" in cmdline or b"importer.uploadserver" in cmdline:
        return "uploadserver"
    argv0 = os.path.basename(cmdline.split(b"\0", 1)[0]).decode(errors="replace")
    return argv0 or "?"


@dataclass
class Child:
    """One process the server started during a clone."""

    pid: int
    role: str
    tag: str
    """cp: `snapshot` or `restore` (what its destination is)."""
    first: float
    """perf_counter() when first seen."""
    last: float
    """perf_counter() when last seen alive."""
    ticks: int = 0
    peak_rss: int = 0
    hwm: int = 0
    stopped_s: float = 0.0
    sync_s: float = 0.0
    gone: bool = False


@dataclass
class ProcUse:
    """A role's processes (cloner, uploadserver, cp, ...) during one run; times in seconds after
    the run's start."""

    count: int = 0
    cpu_s: float = 0.0
    peak_rss: int = 0
    stopped_s: float = 0.0
    """Sampled time in state T (the agent's CPU throttle)."""
    sync_s: float = 0.0
    """Sampled time with a thread in fsync / fdatasync / sync."""
    spans: list[tuple[float, float]] = field(default_factory=list)
    """(first seen, last seen alive) of each process."""
    tags: list[str] = field(default_factory=list)
    """Per process, as in `spans`: for cp, `snapshot` or `restore`."""


class ChildWatch:
    """Finds the processes `cdi server` starts for a clone and samples them every SAMPLE_S from a
    thread; the server's own CPU, its reaped children's CPU and write_bytes around the run."""

    def __init__(self, server_pid: int, data_dir: Path) -> None:
        self.server_pid = server_pid
        self.needle = os.fsencode(str(data_dir))
        self.server_cmdline = read_bytes(f"/proc/{server_pid}/cmdline")
        self.children: dict[int, Child] = {}
        self.server_peak_rss = 0
        self._ignored: set[int] = set()
        self._sync_calls = SYNC_SYSCALLS.get(platform.machine(), frozenset())
        self._server0 = self._server_ticks()
        self._io0 = write_bytes(server_pid)
        self._server1 = self._server0
        self._io1 = self._io0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="child-watch", daemon=True)

    def __enter__(self) -> ChildWatch:
        # What runs already was not started for this run.
        self._ignored = {int(n) for n in os.listdir("/proc") if n.isdigit()}
        self._server0 = self._server_ticks()
        self._io0 = write_bytes(self.server_pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sample()
        self._server1 = self._server_ticks()
        self._io1 = write_bytes(self.server_pid)

    def _server_ticks(self) -> tuple[int, int]:
        """(utime+stime, cutime+cstime) of the server."""
        fields = pid_stat(self.server_pid)
        if fields is None:
            return (0, 0)
        return (int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14]))

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self.sample()

    def sample(self) -> None:
        with self._lock:
            now = time.perf_counter()
            self._discover(now)
            for child in self.children.values():
                if not child.gone:
                    self._update(child, now)
            rss = vm_bytes(self.server_pid).get("VmRSS", 0)
            self.server_peak_rss = max(self.server_peak_rss, rss)

    def _discover(self, now: float) -> None:
        try:
            pids = {int(n) for n in os.listdir("/proc") if n.isdigit()}
        except OSError:
            return
        self._ignored &= pids  # a pid may be reused once its process is gone
        parents = {self.server_pid, *self.children}
        for pid in pids - self._ignored - self.children.keys():
            fields = pid_stat(pid)
            if fields is None:
                continue
            if int(fields[1]) not in parents:
                self._ignored.add(pid)
                continue
            cmdline = read_bytes(f"/proc/{pid}/cmdline")
            if not cmdline or cmdline == self.server_cmdline:
                continue  # forked, not exec'd yet: look again at the next sample
            if self.needle not in cmdline and self.needle not in read_bytes(f"/proc/{pid}/environ"):
                self._ignored.add(pid)
                continue
            self.children[pid] = Child(pid, _role(cmdline), _tag(cmdline), now, now)
            self._update(self.children[pid], now)

    def _update(self, child: Child, now: float) -> None:
        fields = pid_stat(child.pid)
        if fields is None or fields[0] == b"Z":
            if fields is not None:  # a zombie still shows its final CPU time
                child.ticks = int(fields[11]) + int(fields[12])
            child.gone = True
            return
        dt = now - child.last
        child.ticks = int(fields[11]) + int(fields[12])
        if fields[0] in (b"T", b"t"):
            child.stopped_s += dt
        status = vm_bytes(child.pid)
        child.peak_rss = max(child.peak_rss, status.get("VmRSS", 0))
        child.hwm = max(child.hwm, status.get("VmHWM", 0))
        if child.role in ("cloner", "uploadserver") and self._in_sync(child.pid):
            child.sync_s += dt
        child.last = now

    def _in_sync(self, pid: int) -> bool:
        if not self._sync_calls:
            return False
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                words = read_bytes(f"/proc/{pid}/task/{tid}/syscall").split(maxsplit=1)
                if words and words[0].isdigit() and int(words[0]) in self._sync_calls:
                    return True
        return False

    def settle(self, timeout: float) -> list[str]:
        """Wait (at most `timeout`) until every process seen is gone and reaped; the ones still
        there."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                left = [
                    f"{c.pid}:{c.role}"
                    for c in self.children.values()
                    if os.path.exists(f"/proc/{c.pid}")
                ]
            if not left or time.monotonic() >= deadline:
                return left
            time.sleep(0.05)

    def roles(self, t0: float) -> dict[str, ProcUse]:
        found: dict[str, ProcUse] = {}
        for child in sorted(self.children.values(), key=lambda c: c.first):
            use = found.setdefault(child.role, ProcUse())
            use.count += 1
            use.cpu_s += child.ticks / CLK_TCK
            use.peak_rss = max(use.peak_rss, child.peak_rss, child.hwm)
            use.stopped_s += child.stopped_s
            use.sync_s += child.sync_s
            use.spans.append((child.first - t0, child.last - t0))
            use.tags.append(child.tag)
        return found

    @property
    def server_cpu_s(self) -> float:
        return (self._server1[0] - self._server0[0]) / CLK_TCK

    @property
    def reaped_cpu_s(self) -> float:
        """CPU of the children the server reaped meanwhile (exact, from cutime + cstime)."""
        return (self._server1[1] - self._server0[1]) / CLK_TCK

    @property
    def written(self) -> int | None:
        if self._io0 is None or self._io1 is None:
            return None
        return self._io1 - self._io0


class HostWindow:
    """The host's busy CPU and other processes' CPU between creation and close()."""

    def __init__(self) -> None:
        self.busy0 = host_busy_ticks()
        self.table0 = process_cpu()

    def close(self) -> tuple[float, float, list[tuple[str, float]]]:
        busy = (host_busy_ticks() - self.busy0) / CLK_TCK
        foreign, top = foreign_cpu(self.table0, process_cpu())
        return busy, foreign, top


# --------------------------------------------------------------------------------------------------
# the server and its API


class Api:
    """Blocking calls through the async API client, each bounded by API_TIMEOUT_S."""

    def __init__(self, kubeconfig: Path) -> None:
        self._loop = asyncio.new_event_loop()
        self._client = Client(load_kubeconfig(kubeconfig), backoff=(0.1, 0.3, 1.0))

    def _run(self, coro: Coroutine[Any, Any, T], what: str) -> T:
        try:
            return self._loop.run_until_complete(asyncio.wait_for(coro, API_TIMEOUT_S))
        except TimeoutError as err:
            raise BenchError(f"{what}: no answer within {API_TIMEOUT_S:g} s") from err
        except NotFound:
            raise
        except ApiError as err:
            raise BenchError(f"{what}: {err}") from err

    def get(self, res: Resource, name: str, namespace: str = NAMESPACE) -> Obj | None:
        try:
            return self._run(self._client.get(res, name, namespace), f"get {res.kind} {name}")
        except NotFound:
            return None

    def create(self, res: Resource, obj: Obj) -> Obj:
        return self._run(self._client.create(res, obj), f"create {res.kind}")

    def delete(self, res: Resource, name: str, namespace: str = NAMESPACE) -> None:
        with contextlib.suppress(NotFound):
            self._run(self._client.delete(res, name, namespace), f"delete {res.kind} {name}")

    def pod_log(self, name: str, namespace: str = NAMESPACE) -> str:
        path = resource_path(POD, namespace, name, "log")
        return str(self._run(self._client.request("GET", path), f"log of pod {name}"))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._loop.run_until_complete(asyncio.wait_for(self._client.close(), 10))
        self._loop.close()


class Server:
    """`cdi server --data-dir <root>/data --port 0 --no-upload-proxy` as a subprocess."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.kubeconfig = self.data / "kubeconfig"
        self.out = root / "server.out"
        self.err = root / "server.err"
        self.proc: subprocess.Popen[bytes] | None = None
        self._api: Api | None = None
        self.errors: list[str] = []

    def __enter__(self) -> Server:
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            argv = [str(CDI), "server", "--data-dir", str(self.data), "--port", "0"]
            self.proc = spawn(
                [*argv, "--no-upload-proxy"], self.out, self.err, clean_env(), self.root
            )
            wait_for_line(
                self.out, re.compile(r"API at (\S+)"), self.proc, "cdi server", START_TIMEOUT_S
            )
            self._api = Api(self.kubeconfig)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def api(self) -> Api:
        assert self._api is not None
        return self._api

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_offset(self) -> int:
        try:
            return self.err.stat().st_size
        except OSError:
            return 0

    def log_since(self, offset: int) -> str:
        try:
            with open(self.err, "rb") as fh:
                fh.seek(offset)
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    def reflink_logged(self) -> str | None:
        m = REFLINK_LOG.search(self.log_since(0))
        return m[1] if m else None

    def stop(self) -> None:
        if self._api is not None:
            self._api.close()
            self._api = None
        if self.proc is not None:
            note = stop_process(self.proc, "cdi server", STOP_TIMEOUT_S)
            if note:
                self.errors.append(note)
            self.proc = None
        deadline = time.monotonic() + LEAK_GRACE_S
        while (left := processes_mentioning(self.data)) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in left:
            comm = read_bytes(f"/proc/{pid}/comm").decode(errors="replace").strip()
            self.errors.append(f"left running after the server stopped: {pid}:{comm} (killed)")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def phase_of(dv: Obj | None) -> tuple[str | None, int]:
    status = (dv or {}).get("status") or {}
    return status.get("phase"), int(status.get("restartCount") or 0)


def wait_succeeded(api: Api, name: str, timeout: float) -> float:
    """perf_counter() of the first status poll (every POLL_S) that showed phase Succeeded.
    BenchError when the DataVolume failed or did not succeed within `timeout`."""
    deadline = time.perf_counter() + timeout
    while True:
        sent = time.perf_counter()
        dv = api.get(DATA_VOLUME, name)
        now = time.perf_counter()
        phase, _ = phase_of(dv)
        if phase == "Succeeded":
            return now
        if phase == "Failed":
            conditions = ((dv or {}).get("status") or {}).get("conditions") or []
            why = "; ".join(f"{c.get('type')}: {c.get('message')}" for c in conditions)
            raise BenchError(f"dv {name} Failed: {why}")
        if now >= deadline:
            raise BenchError(f"dv {name} not Succeeded within {timeout:g} s (phase {phase})")
        time.sleep(max(0.0, POLL_S - (now - sent)))


def volume_dir(api: Api, claim: str) -> Path:
    pvc = api.get(PERSISTENT_VOLUME_CLAIM, claim)
    pv_name = ((pvc or {}).get("spec") or {}).get("volumeName")
    if not pv_name:
        raise BenchError(f"pvc {claim} is not bound")
    pv = api.get(PERSISTENT_VOLUME, str(pv_name), "")
    path = volume_path(pv) if pv is not None else None
    if path is None:
        raise BenchError(f"pv {pv_name} has no local path")
    return path


@dataclass
class SourceInfo:
    path: str
    size: int
    data: int
    allocated: int
    write_s: float
    warm_s: float
    resident_before_warm: int | None
    resident_after_warm: int | None


def make_source(server: Server, sizes: Sizes) -> tuple[Path, SourceInfo]:
    """A blank DataVolume whose disk.img then gets the random extents, fsync'd and read once."""
    manifest = {
        "apiVersion": "cdi.kubevirt.io/v1beta1",
        "kind": "DataVolume",
        "metadata": {"name": SOURCE, "namespace": NAMESPACE},
        "spec": {
            "source": {"blank": {}},
            "storage": {
                "volumeMode": "Filesystem",
                "resources": {"requests": {"storage": sizes.volume}},
            },
        },
    }
    server.api.create(DATA_VOLUME, manifest)
    wait_succeeded(server.api, SOURCE, SOURCE_TIMEOUT_S)
    disk = volume_dir(server.api, SOURCE) / "disk.img"
    size = disk.stat().st_size
    start = time.perf_counter()
    write_extents(disk, sizes.extents(size))
    write_s = time.perf_counter() - start
    before = resident(disk)
    start = time.perf_counter()
    data = read_data(disk)
    warm_s = time.perf_counter() - start
    if data != sizes.data:
        raise BenchError(f"the source holds {data} bytes of data, not {sizes.data}")
    info = SourceInfo(
        path=str(disk),
        size=size,
        data=data,
        allocated=allocated(disk),
        write_s=round(write_s, 2),
        warm_s=round(warm_s, 2),
        resident_before_warm=before,
        resident_after_warm=resident(disk),
    )
    return disk, info


# --------------------------------------------------------------------------------------------------
# measurements


@dataclass
class Run:
    method: str
    index: int
    wall_s: float | None = None
    """Clones: create -> Succeeded seen. Floors: the command alone."""
    fsync_s: float | None = None
    """Floors: the fsync of DST after the command."""
    error: str | None = None
    verified: bool = False
    moved: int | None = None
    written: int | None = None
    target_size: int | None = None
    target_alloc: int | None = None
    clone_type: str | None = None
    restarts: int | None = None
    disturbed: str | None = None
    """Why this run was measured again (its pods restarted); not counted then."""
    procs: dict[str, ProcUse] = field(default_factory=dict)
    reaped_cpu_s: float | None = None
    server_cpu_s: float | None = None
    server_peak_rss: int | None = None
    host_busy_s: float | None = None
    foreign_cpu_s: float | None = None
    foreign_top: list[tuple[str, float]] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)
    cloner: dict[str, float] = field(default_factory=dict)
    """(a): the numbers of the cloner's `clone complete` line."""
    copies: list[dict[str, Any]] = field(default_factory=list)
    """(b): the provisioner's copies (cp + fsync + rename): what (snapshot, restore), allocated
    bytes and seconds."""
    source_resident: int | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None and self.wall_s is not None

    @property
    def durable_s(self) -> float | None:
        if self.wall_s is None:
            return None
        return self.wall_s + (self.fsync_s or 0.0)

    @property
    def cpu_s(self) -> float | None:
        """Clones: the server's reaped children (exact); floors: the command's tree."""
        if self.method in CLONES:
            return self.reaped_cpu_s
        return sum(p.cpu_s for p in self.procs.values()) if self.procs else None


class Bench:
    """The runs on one server and one source."""

    def __init__(
        self, server: Server, source: Path, scratch: Path, logdir: Path, timeout: float
    ) -> None:
        self.server = server
        self.source = source
        self.scratch = scratch
        self.logdir = logdir
        self.timeout = timeout
        self.disturbed: list[Run] = []
        scratch.mkdir(parents=True, exist_ok=True)
        logdir.mkdir(parents=True, exist_ok=True)

    def run(self, method: str, index: int) -> Run:
        try:
            if method not in CLONES:
                return self.run_floor(method, index)
            for attempt in range(1, CLONE_ATTEMPTS + 1):
                run = self.run_clone(method, index)
                if not run.restarts or run.error is not None:
                    return run
                why = f"pods restarted {run.restarts}x: {run.disturbed or '?'}"
                if attempt == CLONE_ATTEMPTS:
                    run.warnings.append(f"{why}; counted, the last of {attempt} attempts")
                    run.disturbed = None
                    return run
                run.disturbed = why
                self.disturbed.append(run)
                log(f"  {method} #{index}: {why}; measuring again")
            raise AssertionError("unreachable")
        except Exception as err:  # one broken run must not lose the others
            return Run(method, index, error=f"{type(err).__name__}: {err}")

    def run_clone(self, strategy: str, index: int) -> Run:
        run = Run(strategy, index)
        api = self.server.api
        name = f"{strategy}-{index}"
        manifest = {
            "apiVersion": "cdi.kubevirt.io/v1beta1",
            "kind": "DataVolume",
            "metadata": {
                "name": name,
                "namespace": NAMESPACE,
                "annotations": {
                    ann.STORAGE_CLASS_CLONE_STRATEGY: strategy,
                    ann.POD_RETAIN_AFTER_COMPLETION: "true",
                },
            },
            "spec": {"source": {"pvc": {"namespace": NAMESPACE, "name": SOURCE}}, "storage": {}},
        }
        target_dir: Path | None = None
        pod: str | None = None
        interrupted = False
        try:
            os.sync()  # earlier runs' dirty pages are not written back during this one
            run.source_resident = resident(self.source)
            offset = self.server.log_offset()
            with ChildWatch(self.server.pid, self.server.data) as watch:
                host = HostWindow()
                t0 = time.perf_counter()
                try:
                    api.create(DATA_VOLUME, manifest)
                    t1 = wait_succeeded(api, name, self.timeout)
                finally:
                    run.host_busy_s, run.foreign_cpu_s, run.foreign_top = host.close()
                run.wall_s = t1 - t0
                left = watch.settle(SETTLE_S)
                if left:
                    run.warnings.append(f"still running {SETTLE_S:g} s after Succeeded: {left}")
            run.procs = watch.roles(t0)
            run.reaped_cpu_s = watch.reaped_cpu_s
            run.server_cpu_s = watch.server_cpu_s
            run.server_peak_rss = watch.server_peak_rss
            run.written = watch.written
            _, run.restarts = phase_of(api.get(DATA_VOLUME, name))
            if run.restarts:
                run.disturbed = restart_reason(self.server.log_since(offset))
            target_dir = volume_dir(api, name)
            target = target_dir / "disk.img"
            run.target_size = target.stat().st_size
            run.target_alloc = allocated(target)
            annotations = (
                (api.get(PERSISTENT_VOLUME_CLAIM, name) or {}).get("metadata") or {}
            ).get("annotations") or {}
            run.clone_type = annotations.get(ann.CLONE_TYPE)
            if run.clone_type != strategy:
                run.error = f"cloned by {run.clone_type!r}, not {strategy!r}"
            if strategy == "copy":
                pod = annotations.get(ann.SOURCE_CLONE_POD_NAME)
                if not pod:
                    raise BenchError(f"pvc {name} has no {ann.SOURCE_CLONE_POD_NAME} annotation")
                text = api.pod_log(pod)
                found = CLONE_COMPLETE.findall(text)
                if not found:
                    raise BenchError(f"no 'clone complete' line in the log of pod {pod}")
                words = (w.partition("=") for w in found[-1].split())
                run.cloner = {k: float(v) for k, _, v in words}
                run.moved = int(run.cloner.get("wire_bytes", 0))
            else:
                run.copies = [
                    {"what": _copy_kind(dst), "allocated": int(a), "seconds": float(s)}
                    for dst, a, s in COPIED.findall(self.server.log_since(offset))
                ]
                run.moved = run.written
            run.stages = stages(strategy, run)
            if diff := same_volume(self.source, target):
                run.error = run.error or f"wrong target content: {diff}"
            else:
                run.verified = True
        except BenchError as err:
            run.error = run.error or str(err)
        except BaseException:
            interrupted = True  # Ctrl-C: the server and its data go as a whole, now
            raise
        finally:
            if not interrupted:
                self.remove_clone(run, name, pod, target_dir)
        return run

    def remove_clone(self, run: Run, name: str, pod: str | None, target_dir: Path | None) -> None:
        """Delete the clone DataVolume (its PVC and volume go with it) and the retained source
        pod; wait until the volume is gone, so that the next run does not overlap with it."""
        api = self.server.api
        try:
            api.delete(DATA_VOLUME, name)
            if pod:
                api.delete(POD, pod)
            deadline = time.monotonic() + DELETE_TIMEOUT_S
            while api.get(PERSISTENT_VOLUME_CLAIM, name) is not None or (
                target_dir is not None and target_dir.exists()
            ):
                if time.monotonic() >= deadline:
                    run.warnings.append(f"{name}: volume not removed within {DELETE_TIMEOUT_S:g} s")
                    return
                time.sleep(0.1)
        except BenchError as err:
            run.warnings.append(f"{name}: cleanup: {err}")

    def run_floor(self, tool: str, index: int) -> Run:
        run = Run(tool, index)
        dst = self.scratch / f"{tool}-{index}.img"
        dst.unlink(missing_ok=True)
        argv = [*FLOORS[tool], str(self.source), str(dst)]
        try:
            os.sync()
            run.source_resident = resident(self.source)
            io0 = write_bytes("self")
            host = HostWindow()
            result = measure(
                f"{tool}-{index}", argv, logdir=self.logdir, timeout=self.timeout, env=clean_env()
            )
            run.host_busy_s, run.foreign_cpu_s, run.foreign_top = host.close()
            if result.error is not None:
                raise BenchError(f"{' '.join(argv)}: {result.error}")
            run.wall_s = result.wall_s
            run.fsync_s = fsync_path(dst)
            io1 = write_bytes("self")
            run.written = io1 - io0 if io0 is not None and io1 is not None else None
            run.target_size = dst.stat().st_size
            run.target_alloc = allocated(dst)
            # A reflink copy shares the source's extents: what it moved is what it wrote.
            run.moved = run.written if tool == "reflink" else run.target_alloc
            run.procs = {
                tool: ProcUse(
                    count=1,
                    cpu_s=result.cpu_s,
                    peak_rss=max(result.main_peak_rss, result.main_hwm, result.tree_peak_rss),
                    spans=[(0.0, result.wall_s)],
                )
            }
            if diff := sparse_diff(self.source, dst):
                run.error = f"wrong output: {diff}"
            else:
                run.verified = True
        except (BenchError, OSError) as err:
            run.error = run.error or str(err)
        finally:
            dst.unlink(missing_ok=True)
        return run


def restart_reason(text: str) -> str:
    """What the agent logged about containers that exited non-zero, and who else listens on
    their pod address (other `cdi server`s on this machine hand out the same 127.0.1.x)."""
    failed: dict[str, int] = {}
    for container, code in EXITED.findall(text):
        if code != "0":
            failed[container] = failed.get(container, 0) + 1
    addresses = dict(STARTED.findall(text))
    parts = []
    for container, count in failed.items():
        part = f"{container} exited non-zero {count}x"
        address = addresses.get(container)
        if address:
            part += f" (pod address {address}"
            holders = listeners(address)
            part += f"; now listening there: {holders})" if holders else ")"
        parts.append(part)
    return "; ".join(parts) or "no container exit logged"


def listeners(address: str) -> str:
    """Processes listening on TCP `address` (any port), as `ss` shows them."""
    try:
        done = subprocess.run(
            ["ss", "-Hltnp", "src", address],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    found = []
    for line in done.stdout.splitlines():
        words = line.split()
        local = words[3] if len(words) > 3 else "?"
        users = re.findall(r'\("([^"]+)",pid=(\d+)', line)
        found.append(f"{local} by " + ",".join(f"{n}[{p}]" for n, p in users))
    return ", ".join(found)


def stages(strategy: str, run: Run) -> dict[str, float]:
    """Where a clone's time went, from the lifetimes of its processes (20 ms) and their logs."""
    wall = run.wall_s or 0.0
    found: dict[str, float] = {}
    if strategy == "copy":
        up, cl = run.procs.get("uploadserver"), run.procs.get("cloner")
        if up:
            found["create -> upload server started"] = up.spans[0][0]
        if up and cl:
            found["upload server started -> cloner started"] = cl.spans[0][0] - up.spans[0][0]
        if cl:
            found["cloner ran"] = cl.spans[-1][1] - cl.spans[0][0]
            if "seconds" in run.cloner:
                found["  of which streaming (its log)"] = run.cloner["seconds"]
            found["cloner exited -> Succeeded seen"] = wall - cl.spans[-1][1]
        if up:
            found["upload server ran"] = up.spans[-1][1] - up.spans[0][0]
            found["  of which in fsync (sampled)"] = up.sync_s
            found["  stopped by the CPU limit (sampled)"] = up.stopped_s
        if cl:
            found["cloner stopped by the CPU limit (sampled)"] = cl.stopped_s
        return found
    # The provisioner's cp into snapshots/ takes the snapshot, into volumes/ restores it. A cp
    # shorter than a sample (a reflink) may be missed: the stages say which ones were seen.
    cps = run.procs.get("cp") or ProcUse()
    seen = list(zip(cps.tags, cps.spans, strict=True))
    previous, end = "create", 0.0
    for what, (first, last) in seen:
        found[f"{previous} -> {what} cp started"] = first - end
        found[f"{what} cp ran (sampled)"] = last - first
        previous, end = f"{what} cp exited", last
    if seen:
        found[f"{previous} -> Succeeded seen"] = wall - end
    for copy in run.copies:
        found[f"{copy['what']} copy + fsync (provisioner log)"] = copy["seconds"]
    if run.copies:
        found["outside the provisioner's copies"] = wall - sum(c["seconds"] for c in run.copies)
    return found


# --------------------------------------------------------------------------------------------------
# one file system


@dataclass
class Suite:
    name: str
    fs_type: str
    reflink: bool
    server_reflink: str | None
    root: str
    methods: list[str]
    source: SourceInfo | None = None
    runs: dict[str, list[Run]] = field(default_factory=dict)
    disturbed: list[Run] = field(default_factory=list)
    """Clone runs measured again because their pods restarted (not counted)."""
    errors: list[str] = field(default_factory=list)

    def ok(self, method: str) -> list[Run]:
        return [r for r in self.runs.get(method, []) if r.ok]

    def times(self, method: str, durable: bool) -> list[float]:
        values = [r.durable_s if durable else r.wall_s for r in self.ok(method)]
        return [v for v in values if v is not None]

    def best(self, method: str, durable: bool = False) -> float | None:
        t = self.times(method, durable)
        return min(t) if t else None

    def median(self, method: str, durable: bool = False) -> float | None:
        t = self.times(method, durable)
        return statistics.median(t) if t else None

    def fastest(self, method: str) -> Run | None:
        runs = self.ok(method)
        return min(runs, key=lambda r: r.durable_s or 0.0) if runs else None

    def ratio(self, num: str, den: str, durable: bool = True) -> float | None:
        a, b = self.best(num, durable), self.best(den, durable)
        return a / b if a is not None and b else None

    def all_errors(self) -> list[str]:
        found = [f"{self.name}: {e}" for e in self.errors]
        for runs in self.runs.values():
            found += [f"{self.name} {r.method} #{r.index}: {r.error}" for r in runs if r.error]
        return found

    def warnings(self) -> list[str]:
        found = [
            f"{self.name} {r.method} #{r.index}: {w}"
            for runs in self.runs.values()
            for r in runs
            for w in r.warnings
        ]
        for r in self.disturbed:
            wall = fmt(r.wall_s)
            found.append(
                f"{self.name} {r.method} #{r.index}: not counted ({wall} s): {r.disturbed}"
            )
        return found


def run_suite(
    name: str, root: Path, sizes: Sizes, methods: Sequence[str], repeat: int, timeout: float
) -> Suite:
    root.mkdir(parents=True, exist_ok=True)
    suite = Suite(
        name=name,
        fs_type=fs_type(root),
        reflink=reflink_probe(root),
        server_reflink=None,
        root=str(root),
        methods=list(methods),
    )
    log(f"[{name}] {root}: {suite.fs_type}, reflink {'yes' if suite.reflink else 'no'}")
    server = Server(root / "stack")
    try:
        with server:
            disk, suite.source = make_source(server, sizes)
            src = suite.source
            log(
                f"[{name}] source {disk}: {src.size // MIB} MiB, {src.data // MIB} MiB data"
                f" written in {src.write_s:.1f} s, read again in {src.warm_s:.1f} s; resident"
                f" {_mib(src.resident_after_warm)} MiB"
            )
            bench = Bench(server, disk, root / "floors", root / "logs", timeout)
            try:
                for i in range(repeat):
                    order = list(methods) if i % 2 == 0 else list(reversed(methods))
                    for method in order:
                        run = bench.run(method, i + 1)
                        suite.runs.setdefault(method, []).append(run)
                        log(f"[{name}] {_run_line(run)}")
            finally:
                suite.disturbed = bench.disturbed
                suite.server_reflink = server.reflink_logged()
    finally:
        suite.errors += server.errors
    return suite


@contextlib.contextmanager
def xfs_mount(work: Path, size: int) -> Iterator[Path]:
    """A sparse XFS image with reflink, loop-mounted under `work`; unmounted and removed on
    exit, whatever happened."""
    image, mnt = work / "xfs.img", work / "xfs"
    mnt.mkdir(parents=True, exist_ok=True)
    with open(image, "wb") as fh:
        fh.truncate(size)
    mounted = False
    try:
        for argv in (
            ["mkfs.xfs", "-q", "-m", "reflink=1", str(image)],
            ["mount", "-o", "loop", str(image), str(mnt)],
        ):
            done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
            if done.returncode != 0:
                raise BenchError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")
        mounted = True
        yield mnt
    finally:
        if mounted:
            unmount(mnt)
        image.unlink(missing_ok=True)


def unmount(mnt: Path) -> None:
    for _ in range(10):
        done = subprocess.run(
            ["umount", str(mnt)], capture_output=True, text=True, timeout=60, check=False
        )
        if done.returncode == 0:
            return
        time.sleep(0.5)
    log(f"umount {mnt}: {done.stderr.strip()}; detaching it lazily")
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=60, check=False)


# --------------------------------------------------------------------------------------------------
# report


def _mib(value: float | None) -> str:
    return fmt(None if value is None else value / MIB, ".1f")


def _rss_mib(value: int | None) -> str:
    """A peak RSS; 0 means the process was too short-lived to be sampled."""
    return _mib(value or None)


def _x(value: float | None) -> str:
    return fmt(value) + ("x" if value is not None else "")


def _bm(suite: Suite, method: str, durable: bool = False) -> str:
    b, m = suite.best(method, durable), suite.median(method, durable)
    if b is None or m is None:
        return "ERR" if suite.runs.get(method) else "-"
    return f"{b:.2f}/{m:.2f}"


def _rss(run: Run) -> str:
    if run.method == "copy":
        cl, up = run.procs.get("cloner"), run.procs.get("uploadserver")
        return f"{_rss_mib(cl.peak_rss if cl else None)} / {_rss_mib(up.peak_rss if up else None)}"
    if run.method == "snapshot":
        cp = run.procs.get("cp")
        return f"cp {_rss_mib(cp.peak_rss if cp else None)}"
    return _rss_mib(max((p.peak_rss for p in run.procs.values()), default=None))


def main_table(suite: Suite) -> str:
    headers = ["method", "best/median s", "+fsync s", "moved MiB", "written MiB"]
    headers += ["target alloc MiB", "peak RSS MiB", "CPU s"]
    rows = []
    for method in suite.methods:
        run = suite.fastest(method)
        floor = method not in CLONES
        rows.append(
            [
                LABELS[method],
                _bm(suite, method),
                _bm(suite, method, durable=True) if floor else "(included)",
                _mib(run.moved) if run else "-",
                _mib(run.written) if run else "-",
                _mib(run.target_alloc) if run else "-",
                _rss(run) if run else "-",
                fmt(run.cpu_s) if run else "-",
            ]
        )
    return table(headers, rows)


def ratio_lines(suite: Suite) -> list[str]:
    pairs = [("copy", "cp"), ("copy", "qemu-img"), ("snapshot", "cp"), ("snapshot", "reflink")]
    lines = []
    for num, den in pairs:
        if num not in suite.methods or den not in suite.methods:
            continue
        durable, bare = suite.ratio(num, den, True), suite.ratio(num, den, False)
        lines.append(
            f"  {LABELS[num]:18} / {LABELS[den]:26} {_x(durable):>7}   (bare command: {_x(bare)})"
        )
    return lines


def cpu_table(suite: Suite) -> str:
    """The fastest run of each clone method: which process used what."""
    headers = ["method", "wall s", "process", "n", "CPU s", "stopped s", "fsync s", "RSS MiB"]
    headers += ["reaped CPU", "server CPU", "server RSS", "host busy", "foreign"]
    rows = []
    for method in CLONES:
        run = suite.fastest(method) if method in suite.methods else None
        if run is None:
            continue
        procs = sorted(run.procs.items()) or [("(none lived 20 ms)", ProcUse())]
        for i, (role, use) in enumerate(procs):
            first = i == 0
            rows.append(
                [
                    LABELS[method] if first else "",
                    fmt(run.wall_s) if first else "",
                    role,
                    str(use.count),
                    fmt(use.cpu_s),
                    fmt(use.stopped_s),
                    fmt(use.sync_s) if role in ("cloner", "uploadserver") else "-",
                    _rss_mib(use.peak_rss),
                    fmt(run.reaped_cpu_s) if first else "",
                    fmt(run.server_cpu_s) if first else "",
                    _mib(run.server_peak_rss) if first else "",
                    fmt(run.host_busy_s) if first else "",
                    fmt(run.foreign_cpu_s) if first else "",
                ]
            )
    return table(headers, rows)


def stage_lines(suite: Suite) -> list[str]:
    lines = []
    for method in CLONES:
        run = suite.fastest(method) if method in suite.methods else None
        if run is None or not run.stages:
            continue
        lines.append(f"  {LABELS[method]} ({run.wall_s:.2f} s, run #{run.index}):")
        lines += [f"    {what:48} {seconds:6.2f} s" for what, seconds in run.stages.items()]
    return lines


def check_targets(suites: Sequence[Suite]) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []
    for suite in suites:
        if "copy" in suite.methods and "cp" in suite.methods:
            for durable in (True, False):
                value = suite.ratio("copy", "cp", durable)
                checks.append(
                    {
                        "target": f"[{suite.name}] (a) host-assisted <= 1.5x cp --sparse=always"
                        + (" (+fsync)" if durable else " (bare cp, no fsync)"),
                        "value": value,
                        "limit": COPY_OVER_CP,
                        "verdict": _verdict(value, COPY_OVER_CP),
                        "primary": durable,
                    }
                )
        if "snapshot" in suite.methods:
            value = suite.best("snapshot")
            checks.append(
                {
                    "target": f"[{suite.name}] (b) snapshot clone <= 1 s on reflink"
                    f" ({suite.fs_type})",
                    "value": value,
                    "limit": SNAPSHOT_TARGET_S,
                    "seconds": True,
                    "verdict": _verdict(value, SNAPSHOT_TARGET_S)
                    if suite.reflink
                    else "n/a (no reflink)",
                    "primary": True,
                }
            )
    return checks


def _verdict(value: float | None, limit: float) -> str:
    if value is None:
        return "not measured"
    return "PASS" if value <= limit else "MISS"


def targets_text(checks: Sequence[dict[str, Any]]) -> str:
    lines = []
    for c in checks:
        value = c["value"]
        if value is None:
            shown = "-"
        elif c.get("seconds"):
            shown = f"{value:.2f} s"
        else:
            shown = f"{value:.2f}x"
        note = "" if c["primary"] else "   (for information)"
        lines.append(f"  {c['verdict']:16}  {c['target']:66} {shown}{note}")
    return "\n".join(lines)


def suite_json(suite: Suite) -> dict[str, Any]:
    methods = {}
    for method, runs in suite.runs.items():
        methods[method] = {
            "best_s": suite.best(method),
            "median_s": suite.median(method),
            "best_durable_s": suite.best(method, durable=True),
            "median_durable_s": suite.median(method, durable=True),
            "runs": [asdict(r) for r in runs],
        }
    ratios = {
        f"{n}/{d}": {"durable": suite.ratio(n, d, True), "bare": suite.ratio(n, d, False)}
        for n, d in (("copy", "cp"), ("copy", "qemu-img"), ("snapshot", "cp"))
        if n in suite.methods and d in suite.methods
    }
    if "reflink" in suite.methods and "snapshot" in suite.methods:
        ratios["snapshot/reflink"] = {
            "durable": suite.ratio("snapshot", "reflink", True),
            "bare": suite.ratio("snapshot", "reflink", False),
        }
    return {
        "name": suite.name,
        "root": suite.root,
        "fs_type": suite.fs_type,
        "reflink": suite.reflink,
        "server_reflink": suite.server_reflink,
        "source": asdict(suite.source) if suite.source else None,
        "ratios": ratios,
        "methods": methods,
        "disturbed_runs": [asdict(r) for r in suite.disturbed],
        "errors": suite.all_errors(),
    }


def _run_line(run: Run) -> str:
    wall = f"{run.wall_s:7.2f} s" if run.wall_s is not None else "      - s"
    extra = f" +fsync {run.fsync_s:.2f}" if run.fsync_s is not None else ""
    procs = " ".join(
        f"{role} cpu {u.cpu_s:.2f} rss {u.peak_rss / MIB:.0f}" for role, u in run.procs.items()
    )
    status = "ok" if run.error is None else f"ERROR {run.error}"
    return (
        f"{run.method:8} #{run.index} {wall}{extra}  moved {_mib(run.moved)} MiB  written"
        f" {_mib(run.written)} MiB  {procs}  source cached {_mib(run.source_resident)} MiB"
        f"  {status}"
    )


# --------------------------------------------------------------------------------------------------
# entry point


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="clone.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1Gi volume / 128 MiB data")
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    parser.add_argument("--repeat", type=int, default=2, help="runs per method [2]")
    parser.add_argument("--xfs", action="store_true", help="(b) on a loop-mounted XFS too")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}"
    )
    parser.add_argument(
        "--timeout", type=float, default=CLONE_TIMEOUT_S, help="seconds per measurement [300]"
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    args.methods = [m for m in args.methods.split(",") if m]
    if not args.methods or set(args.methods) - set(METHODS):
        parser.error(f"--methods: a comma-separated subset of {METHODS}")
    return args


@contextlib.contextmanager
def work_dir(keep: bool) -> Iterator[Path]:
    work = Path(tempfile.mkdtemp(prefix="cdi-clone-bench-", dir="/var/tmp"))
    try:
        yield work
    finally:
        if keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, so that the same clean-up runs as on Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = Sizes.for_mode(args.quick)
    if not os.access(CDI, os.X_OK):
        log(f"not found: {CDI} (run .venv/bin/pip install -e .)")
        return 2
    for tool in ("cp", "qemu-img"):
        if shutil.which(tool) is None:
            log(f"not found: {tool}")
            return 2
    started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    suites: list[Suite] = []
    errors: list[str] = []
    warnings: list[str] = []
    memory = memory_state()
    wall0 = time.perf_counter()
    with sigterm_interrupts(), work_dir(args.keep) as work:
        log(f"work dir {work}")
        try:
            suites.append(
                run_suite("main", work / "main", sizes, args.methods, args.repeat, args.timeout)
            )
        except (BenchError, OSError, subprocess.SubprocessError) as err:
            errors.append(f"main: {type(err).__name__}: {err}")
        if args.xfs:
            if os.geteuid() != 0:
                warnings.append("--xfs: needs root (mount); skipped")
            else:
                image_size = 2 * _size_bytes(sizes.volume) + 4 * GIB
                try:
                    with xfs_mount(work, image_size) as mnt:
                        suites.append(
                            run_suite("xfs", mnt, sizes, XFS_METHODS, args.repeat, args.timeout)
                        )
                except (BenchError, OSError, subprocess.SubprocessError) as err:
                    errors.append(f"xfs: {type(err).__name__}: {err}")
    total_s = time.perf_counter() - wall0
    for suite in suites:
        errors += suite.all_errors()
        warnings += suite.warnings()
    checks = check_targets(suites)
    mode = "quick" if args.quick else "full"
    print(
        f"\nclone benchmark ({mode}: {sizes.volume} volume, {sizes.data // MIB} MiB of random"
        f" data in {sizes.extent // MIB} MiB extents; best/median of {args.repeat} runs; ratios"
        " of best times)"
    )
    print(memory)
    for suite in suites:
        src = suite.source
        print(
            f"\n[{suite.name}] {suite.root}: {suite.fs_type}, reflink"
            f" {'yes' if suite.reflink else 'no'} (cp --reflink=always; the provisioner says:"
            f" {suite.server_reflink or '?'})"
        )
        if src is not None:
            print(
                f"source: {src.size} bytes, {src.data // MIB} MiB data, allocated"
                f" {_mib(src.allocated)} MiB; in the page cache after warming:"
                f" {_mib(src.resident_after_warm)} MiB"
            )
        print(main_table(suite))
        print(
            "clones: create -> Succeeded seen (polled every 50 ms), target fsync'd; floors: the"
            " command, +fsync: and the fsync of DST.\nmoved: (a) the cloner's wire_bytes, (b)"
            " what the server and its children wrote, floors: DST allocated; written: write_bytes"
            " (/proc/<pid>/io) of\nthe server tree resp. the command; RSS: (a) cloner / upload"
            " server, (b) the provisioner's cp; CPU: (a), (b) the server's reaped children"
            " (exact), floors: the command."
        )
        lines = ratio_lines(suite)
        if lines:
            print("ratios of best times (durable: floors + fsync of DST):")
            print("\n".join(lines))
        if any(m in suite.methods for m in CLONES):
            print(
                "\nwhere the CPU went, fastest run of each clone (sampled every 20 ms; stopped:"
                " SIGSTOPped by the agent's CPU limit;\nfsync: a thread in fsync; reaped CPU:"
                " all children the server reaped, exact; server: API, controllers, agent,"
                f" provisioner;\nhost busy: all CPUs, at most {os.cpu_count()} x wall; foreign:"
                " other processes on the machine):"
            )
            print(cpu_table(suite))
            print("\nstages (fastest run; process lifetimes sampled every 20 ms):")
            print("\n".join(stage_lines(suite)))
            if "copy" in suite.methods:
                print(
                    "  (upload server started -> cloner started: the upload pod's readiness probe"
                    f" waits initialDelaySeconds={PROBE_INITIAL_DELAY}\n  before its first check,"
                    f" then every {PROBE_PERIOD} s (CDI's values); only a ready upload pod gets"
                    " its source pod)"
                )
    print(f"\nfor scale: CDI's cloner + upload server took {CDI_SECONDS} s for a 2 GiB volume with")
    print("1 GiB of data on this kind of machine (from the issue).")
    print("\ntargets:")
    print(targets_text(checks))
    if warnings:
        print("\nwarnings:")
        print("\n".join(f"  {w}" for w in warnings))
    if errors:
        print("\nerrors:")
        print("\n".join(f"  {e}" for e in errors))
    result = {
        "benchmark": "clone",
        "timestamp": started,
        "mode": mode,
        "repeat": args.repeat,
        "sizes": asdict(sizes),
        "total_seconds": round(total_s, 1),
        "cdi_seconds_2gib": CDI_SECONDS,
        "suites": [suite_json(s) for s in suites],
        "targets": checks,
        "host": {
            "cpus": os.cpu_count(),
            "kernel": os.uname().release,
            "python": sys.version.split()[0],
            "cp": tool_version(["cp", "--version"]),
            "qemu-img": tool_version(["qemu-img", "--version"]),
            "mkfs.xfs": tool_version(["mkfs.xfs", "-V"]) if args.xfs else None,
        },
        "errors": errors,
        "warnings": warnings,
    }
    OUT_DIR.mkdir(exist_ok=True)
    out = OUT_DIR / "clone.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(REPO)} ({total_s:.0f} s)")
    return 1 if errors or not suites else 0


def _size_bytes(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(quantity[: -len(suffix)]) * factor
    return int(quantity)


if __name__ == "__main__":
    sys.exit(main())
