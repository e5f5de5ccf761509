"""Upload benchmark: curl through our upload proxy, straight to our upload server, and to a file.

One image (2 GiB virtual with 1 GiB of random data in 64 MiB extents spread over it, the rest
sparse; `--quick`: 256 MiB / 128 MiB in 8 MiB extents), as raw and as qcow2 (`qemu-img convert
-O qcow2` of the raw), uploaded with `curl -T FILE -X POST` to the sync path `/v1beta1/upload`
(answered after the image is processed), all in the same run, on 127.0.0.1, on the same disk:

- **(a) proxy**: `cdi server --no-upload-proxy` (API, controllers, local node agent: the upload
  server pod runs as a local process) and `cdi-uploadproxy --resolve pod-ip` as a process of its
  own, so that its CPU and RSS are its own. Per run: a DataVolume (`source.upload`, 3Gi), wait
  for `UploadReady`, a token from an UploadTokenRequest, then the timed curl (TLS to the proxy,
  mutual TLS from the proxy to the upload server pod).
- **(b) direct**: `cdi-uploadserver` started by hand with the upload pod's contract (mutual TLS
  with a server certificate and a client certificate made here, UPLOAD_IMAGE_SIZE=3Gi,
  FILESYSTEM_OVERHEAD=0, fresh data and scratch dirs), the same curl with the client
  certificate. TLS once, where (a) has it twice.
- **(c) floor**: `curl -T FILE file:///.../out.raw`: curl reading the image and writing a file,
  no network, no fsync. The fsync of that file is timed right after it and shown as `c+fsync`
  (the upload server fsyncs the volume before it answers, so that is the durable floor).
- **(d) sink**: (b)'s curl command line (same flags, client certificate, file, `-T -X POST` to
  `/v1beta1/upload`) into a receiver that does nothing with the bytes: a Python process
  (`python -c`, a blocking `ssl` socket on 127.0.0.1, Python's default server context: TLS
  1.3/1.2) with (b)'s server certificate, requiring a client certificate and verifying it
  against (b)'s client CA, so the handshake costs the same. It parses the request head, answers
  `Expect: 100-continue`, reads exactly Content-Length bytes with `recv_into` a 1 MiB buffer
  (a chunked body would be decoded; curl sends none for a regular file), discards them,
  answers 200 and exits. It is the network floor: TLS, loopback TCP and curl's reading of the
  file. (c) has no network, and curl's TLS upload costs far more than its file copy (the 2 GiB
  raw image on a 2-CPU VM: ~1.7 s into this sink, ~0.9 s for (c), curl busy all along in
  both), so (c) alone cannot tell how far the upload server is from what curl itself allows;
  b/d and a/d can. Its CPU is what it reports itself, from accept() to its exit.
- **convert** (qcow2 only): `qemu-img convert -t none -W -f qcow2 -O raw` of a local copy, what
  the upload server runs after it wrote the body to scratch; `c + convert` is the qcow2 floor.

Wall time is curl's (for (a), (b) and (d): request sent -> answer received). While curl runs, the
proxy, the upload server process (found in /proc by its command line and its environment, which
names our data dir) and `cdi server` are sampled every 20 ms: CPU time (utime+stime, and the
children it reaped: qemu-img), VmRSS and VmHWM. The host's busy CPU and what other processes
used meanwhile are recorded too (the machine may be shared). Each uploaded volume is compared
with the raw image (`qemu-img compare`) once per format and method; a wrong image is an error
(the sink must have received as many bytes as the file holds).
`--repeat N` runs each measurement N times in alternating order; tables show best/median,
ratios of best times.

Targets (from the issue): the proxy adds <= 15% over direct (a/b <= 1.15, both formats); a raw
upload <= 1.3x the floor (a/c, through the proxy; b/c is shown too); proxy RSS <= 80 MiB (its
VmHWM over the whole run, whatever the size). Not targets, shown for information: the raw
upload direct and through the proxy over the TLS network floor (b/d, a/d). For scale: CDI's
upload server took 2.05 s (raw) and 2.17 s (qcow2) for this size on this kind of machine,
without its proxy. Missed targets are reported as MISS; the exit status is 1 only when a
measurement failed.

Run alone: `.venv/bin/python bench/upload.py [--quick] [--keep] [--repeat N] [--profile]`
(`--profile`: after the measurements, one extra upload per format through the proxy, not
counted, with py-spy and perf (if installed) sampling the proxy and the upload server: their
hottest Python functions, native libraries and symbols are printed). JSON goes to
bench/out/upload.json. Everything runs from this Python's bin directory (`cdi`,
`cdi-uploadproxy`, `cdi-uploadserver`; the local agent runs pods from there too), so running
this file with another environment's Python measures that environment's code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchlib import (
    MIB,
    fmt,
    free_port,
    memory_state,
    pid_stat,
    read_bytes,
    stat_fields,
    table,
    tool_version,
    vm_bytes,
)

from cdi.controller.certs import KeyPair, create_ca, issue_client_cert, issue_server_cert
from cdi.provisioner import volume_path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
OUT_DIR = BENCH_DIR / "out"
VENV_BIN = Path(sys.executable).parent
CDI = VENV_BIN / "cdi"
UPLOAD_PROXY = VENV_BIN / "cdi-uploadproxy"
UPLOAD_SERVER = VENV_BIN / "cdi-uploadserver"
PY_SPY = VENV_BIN / "py-spy"
PY_SPY_ARGS = ("--rate", "200", "--format", "raw", "--nonblocking", "--output")
PERF_ARGS = ("-F", "499", "-g")
NO_PROXY = ("--no-upload-proxy",)
"""`cdi server` without its in-process proxy: ours runs as a process of its own."""
KUBECTL = "/usr/bin/kubectl" if os.access("/usr/bin/kubectl", os.X_OK) else "kubectl"
GIB = 1024 * MIB
NAMESPACE = "default"
VOLUME_SIZE = "3Gi"
CLIENT_NAME = "client.upload-server.cdi.kubevirt.io"
DIRECT_HOST = "cdi-upload-bench.default.svc"
"""The name in the direct upload server's certificate; curl --resolve maps it to 127.0.0.1."""
FORMATS = ("raw", "qcow2")
METHODS = ("proxy", "direct", "sink", "floor", "convert")
UNVERIFIED = ("sink", "floor")
"""Methods that leave no volume to compare with the image."""
PROXY_OVER_DIRECT = 1.15
RAW_OVER_FLOOR = 1.3
PROXY_RSS_TARGET = 80 * MIB
CDI_SECONDS = {"raw": 2.05, "qcow2": 2.17}
"""CDI's upload server, this size, this kind of machine, without its proxy (from the issue)."""
SAMPLE_S = 0.02
START_TIMEOUT_S = 60.0
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0
LEAK_GRACE_S = 5.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
SERVER_MARKERS = (b"cdi-uploadserver", b"importer.uploadserver")
SERVING = re.compile(r"serving addr=https?://[^\s:]+:(\d+)")
SINK_LISTENING = re.compile(r"sink listening on 127\.0\.0\.1:(\d+)")
SINK_SCRIPT = r"""
# The (d) sink of bench/upload.py: one HTTPS request, the body read and thrown away.
import json, socket, ssl, sys, time

cert, key, client_ca, client_name = sys.argv[1:5]
ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ctx.load_cert_chain(cert, key)
ctx.load_verify_locations(cafile=client_ca)
ctx.verify_mode = ssl.CERT_REQUIRED
listener = socket.create_server(("127.0.0.1", 0))
print(f"sink listening on 127.0.0.1:{listener.getsockname()[1]}", flush=True)
raw, _ = listener.accept()
cpu0 = time.process_time()
conn = ctx.wrap_socket(raw, server_side=True)
listener.close()
subject = dict(x[0] for x in conn.getpeercert()["subject"])
if subject.get("commonName") != client_name:
    sys.exit(f"client certificate for {subject}, not {client_name}")


def line():
    found = bytearray()
    while not found.endswith(b"\r\n"):
        byte = conn.recv(1)
        if not byte or len(found) > 65536:
            sys.exit("connection closed or line too long in the request head")
        found += byte
    return bytes(found[:-2])


buf = bytearray(1 << 20)
view = memoryview(buf)


def drain(n):
    while n:
        got = conn.recv_into(view, min(n, len(buf)))
        if not got:
            sys.exit(f"connection closed with {n} body bytes still to come")
        n -= got


request = line().decode("latin-1")
headers = {}
while head := line():
    name, _, value = head.decode("latin-1").partition(":")
    headers[name.strip().lower()] = value.strip()
if headers.get("expect", "").lower() == "100-continue":
    conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
chunked = "chunked" in headers.get("transfer-encoding", "").lower()
received = 0
if chunked:
    while size := int(line().split(b";")[0], 16):
        drain(size)
        received += size
        line()
    while line():  # trailers
        pass
else:
    received = int(headers.get("content-length", "0"))
    drain(received)
body = b"Upload Complete"
conn.sendall(
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
    + f"Content-Length: {len(body)}\r\n\r\n".encode()
    + body
)
tls = f"{conn.version()} {conn.cipher()[0]}"
conn.close()
report = {
    "request": request,
    "received": received,
    "chunked": chunked,
    "expect_100": "expect" in headers,
    "tls": tls,
    "cpu_s": time.process_time() - cpu0,
}
with open("/proc/self/status") as status:
    for text in status:
        if text.startswith("VmHWM:"):
            report["hwm"] = int(text.split()[1]) * 1024
print(json.dumps(report), flush=True)
"""
"""The (d) sink, run as `python -c`: see the docstring. It reports, on its last stdout line,
what it received and its CPU seconds from accept() to the end (exact, where /proc sampling
misses the last few ms of a process that exits as soon as it answered)."""

Obj = dict[str, Any]


class BenchError(Exception):
    """Something the benchmark cannot go on without (a process that did not start, ...)."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
    env["no_proxy"] = env["NO_PROXY"] = "127.0.0.1,localhost"
    env.update(extra)
    return env


# --------------------------------------------------------------------------------------------------
# images


@dataclass(frozen=True)
class Sizes:
    virtual: int
    data: int
    extent: int
    """Random data is written in extents of this size, one every virtual / (data / extent)."""

    @staticmethod
    def for_mode(quick: bool) -> Sizes:
        if quick:
            return Sizes(256 * MIB, 128 * MIB, 8 * MIB)
        return Sizes(2 * GIB, 1 * GIB, 64 * MIB)

    def extents(self) -> list[tuple[int, int]]:
        count = self.data // self.extent
        stride = self.virtual // count
        return [(i * stride, self.extent) for i in range(count)]


def _write_random(path: Path, size: int, extents: Sequence[tuple[int, int]]) -> None:
    chunk = 8 * MIB
    with open(path, "wb") as fh:
        fh.truncate(size)
        for offset, length in extents:
            for pos in range(offset, offset + length, chunk):
                os.pwrite(fh.fileno(), os.urandom(min(chunk, offset + length - pos)), pos)


def build_images(images: Path, sizes: Sizes) -> dict[str, float]:
    """disk.raw and disk.qcow2 in `images` (reused when built for the same sizes)."""
    stamp = images / "stamp.json"
    wanted = json.dumps(asdict(sizes), sort_keys=True)
    if stamp.exists() and stamp.read_text() == wanted:
        log(f"reusing images in {images}")
        return {}
    images.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    raw, qcow2 = images / "disk.raw", images / "disk.qcow2"
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    _write_random(raw, sizes.virtual, sizes.extents())
    seconds["disk.raw"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)],
        check=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    seconds["disk.qcow2"] = round(time.perf_counter() - start, 2)
    for name in ("disk.raw", "disk.qcow2"):
        log(f"built {name} in {seconds[name]:.1f} s ({(images / name).stat().st_size} bytes)")
    stamp.write_text(wanted)
    return seconds


def warm_cache(paths: Sequence[Path]) -> float:
    """Read the images once, holes included, so that every measured run reads them from the
    page cache: otherwise the first run alone pays for filling it (a sparse file's holes too,
    measured +2 s of curl CPU for the 2 GiB raw image). Returns the seconds it took."""
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as fh:
            buf = bytearray(8 * MIB)
            while fh.readinto(buf):
                pass
    return time.perf_counter() - start


def same_image(reference: Path, actual: Path) -> str | None:
    """None if `actual` holds the raw image `reference` (a larger `actual` must be zeros past
    its end: the volume is grown to the requested size), else qemu-img compare's answer."""
    if not actual.exists():
        return f"{actual} does not exist"
    done = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(reference), str(actual)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode == 0:
        return None
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[-1] if lines else f"qemu-img compare exited {done.returncode}"


# --------------------------------------------------------------------------------------------------
# TLS for the direct upload server


@dataclass(frozen=True)
class DirectPki:
    server_ca: Path
    server_cert: Path
    server_key: Path
    client_ca: Path
    client_cert: Path
    client_key: Path


def make_pki(directory: Path) -> DirectPki:
    """A server CA and certificate for DIRECT_HOST, a client CA and a client certificate with
    the CN the upload server requires: the material the controller gives an upload pod."""
    directory.mkdir(parents=True, exist_ok=True)
    server_ca = create_ca("cdi-uploadserver-signer")
    client_ca = create_ca("cdi-uploadserver-client-signer")
    server = issue_server_cert(server_ca, [DIRECT_HOST])
    client = issue_client_cert(client_ca, CLIENT_NAME)
    pki = DirectPki(
        server_ca=directory / "server-ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_ca=directory / "client-ca.crt",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
    )
    files: list[tuple[Path, bytes]] = [
        (pki.server_ca, server_ca.cert),
        (pki.client_ca, client_ca.cert),
        *_pair(pki.server_cert, pki.server_key, server),
        *_pair(pki.client_cert, pki.client_key, client),
    ]
    for path, data in files:
        path.write_bytes(data)
        path.chmod(0o600)
    return pki


def _pair(cert: Path, key: Path, pair: KeyPair) -> list[tuple[Path, bytes]]:
    return [(cert, pair.cert), (key, pair.key)]


# --------------------------------------------------------------------------------------------------
# /proc


def _children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            found += [int(x) for x in read_bytes(f"/proc/{pid}/task/{tid}/children").split()]
    return found


def _tree_rss(pid: int) -> int:
    """Summed RSS of the descendants of `pid` (not `pid` itself)."""
    total = 0
    todo = _children(pid)
    seen: set[int] = set()
    while todo:
        child = todo.pop()
        if child in seen:
            continue
        seen.add(child)
        statm = read_bytes(f"/proc/{child}/statm").split()
        if len(statm) > 1:
            total += int(statm[1]) * PAGE_SIZE
        todo += _children(child)
    return total


@dataclass
class ProcUsage:
    """One process during one measured run."""

    pid: int
    cpu_s: float = 0.0
    """utime + stime while sampled."""
    children_cpu_s: float = 0.0
    """cutime + cstime while sampled: children it reaped (the server: qemu-img)."""
    peak_rss: int = 0
    """Largest sampled VmRSS."""
    hwm: int = 0
    """VmHWM at the last sample: the process's peak RSS since it started."""
    children_peak_rss: int = 0
    """Largest sampled summed RSS of its descendants."""
    main_thread_cpu_s: float = 0.0
    """CPU of the main thread alone: for our servers, the event loop (control, not bodies)."""
    busiest_other_thread_cpu_s: float = 0.0
    """CPU of the busiest other thread (the server's pipeline and writer threads)."""
    minor_faults: int = 0
    """Page faults while sampled (fresh memory touched: allocations, on a VM the dearest)."""
    samples: int = 0

    @property
    def peak(self) -> int:
        return max(self.peak_rss, self.hwm)


class ProcWatch:
    """Samples a few named processes every SAMPLE_S from a thread (cheap: two small /proc reads
    per process, and the children lists)."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self.usage = {name: ProcUsage(pid) for name, pid in pids.items()}
        self._first: dict[str, tuple[int, int, int]] = {}
        self._threads: dict[str, dict[int, tuple[int, int]]] = {name: {} for name in pids}
        """Per process, per thread: (ticks when first seen, ticks at the last sample)."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="proc-watch", daemon=True)

    def __enter__(self) -> ProcWatch:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self.sample()

    def sample(self) -> None:
        for name, usage in self.usage.items():
            fields = pid_stat(usage.pid)
            if fields is None or fields[0] == b"Z":
                continue
            now = (
                int(fields[11]) + int(fields[12]),
                int(fields[13]) + int(fields[14]),
                int(fields[7]),
            )
            first = self._first.setdefault(name, now)
            usage.cpu_s = (now[0] - first[0]) / CLK_TCK
            usage.children_cpu_s = (now[1] - first[1]) / CLK_TCK
            usage.minor_faults = now[2] - first[2]
            self._sample_threads(name, usage)
            status = vm_bytes(usage.pid)
            if "VmRSS" in status:
                usage.peak_rss = max(usage.peak_rss, status["VmRSS"])
            if "VmHWM" in status:
                usage.hwm = status["VmHWM"]
            usage.children_peak_rss = max(usage.children_peak_rss, _tree_rss(usage.pid))
            usage.samples += 1

    def _sample_threads(self, name: str, usage: ProcUsage) -> None:
        threads = self._threads[name]
        with contextlib.suppress(OSError):
            for entry in os.listdir(f"/proc/{usage.pid}/task"):
                fields = stat_fields(f"/proc/{usage.pid}/task/{entry}/stat")
                if fields is None:
                    continue
                ticks = int(fields[11]) + int(fields[12])
                # A thread first seen after the first sample started during the run: all of
                # its CPU counts.
                start = ticks if not usage.samples else 0
                threads[int(entry)] = (threads.get(int(entry), (start, 0))[0], ticks)
        spent = {tid: (last - first) / CLK_TCK for tid, (first, last) in threads.items()}
        usage.main_thread_cpu_s = spent.get(usage.pid, 0.0)
        usage.busiest_other_thread_cpu_s = max(
            (v for tid, v in spent.items() if tid != usage.pid), default=0.0
        )


def host_busy_ticks() -> int:
    """Busy jiffies of all CPUs (user, nice, system, irq, softirq, steal) from /proc/stat."""
    fields = read_bytes("/proc/stat").splitlines()[0].split()[1:]
    values = [int(x) for x in fields]
    return sum(values[i] for i in (0, 1, 2, 5, 6, 7) if i < len(values))


def process_cpu() -> dict[int, tuple[str, int, int, int]]:
    """pid -> (comm, ppid, utime + stime ticks, start time) for every process."""
    found: dict[int, tuple[str, int, int, int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        data = read_bytes(f"/proc/{name}/stat")
        if not data:
            continue
        with contextlib.suppress(IndexError, ValueError):
            comm = data[data.find(b"(") + 1 : data.rfind(b")")].decode(errors="replace")
            fields = data[data.rfind(b")") + 2 :].split()
            ticks = int(fields[11]) + int(fields[12])
            found[int(name)] = (comm, int(fields[1]), ticks, int(fields[19]))
    return found


def foreign_cpu(
    before: Mapping[int, tuple[str, int, int, int]],
    after: Mapping[int, tuple[str, int, int, int]],
) -> tuple[float, list[tuple[str, float]]]:
    """CPU seconds used between two tables by processes that do not descend from this one
    (other work on the machine), and the top three of them. A process is the same in both
    tables when its pid and start time are (kernel workers rename themselves); what ended in
    between is not seen."""
    me = os.getpid()

    def ours(pid: int) -> bool:
        seen: set[int] = set()
        while pid > 1 and pid not in seen:
            if pid == me:
                return True
            seen.add(pid)
            pid = after[pid][1] if pid in after else 0
        return False

    used: list[tuple[str, float]] = []
    for pid, (comm, _, ticks, start) in after.items():
        if ours(pid):
            continue
        delta = ticks - before[pid][2] if pid in before and before[pid][3] == start else ticks
        if delta > 0:
            used.append((f"{comm}[{pid}]", delta / CLK_TCK))
    used.sort(key=lambda x: -x[1])
    return sum(s for _, s in used), used[:3]


def find_upload_server(data_dir: Path, exclude: set[int]) -> int | None:
    """The upload server process of our `cdi server`: its command line names cdi-uploadserver
    and its environment our data dir (other servers may run on this machine)."""
    needle = os.fsencode(str(data_dir))
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in exclude:
            continue
        cmdline = read_bytes(f"/proc/{name}/cmdline")
        if not any(m in cmdline for m in SERVER_MARKERS):
            continue
        if needle in read_bytes(f"/proc/{name}/environ"):
            fields = pid_stat(int(name))
            if fields is not None and fields[0] != b"Z":
                return int(name)
    return None


def processes_mentioning(path: Path) -> list[int]:
    """Live processes (not this one) whose command line or environment mention `path`."""
    needle = os.fsencode(str(path))
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        if needle in read_bytes(f"/proc/{name}/cmdline") or needle in read_bytes(
            f"/proc/{name}/environ"
        ):
            fields = pid_stat(int(name))
            if fields is not None and fields[0] != b"Z":
                found.append(int(name))
    return found


# --------------------------------------------------------------------------------------------------
# processes


def _killpg(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def spawn(
    argv: Sequence[str], out: Path, err: Path, env: Mapping[str, str], cwd: Path
) -> subprocess.Popen[bytes]:
    with open(out, "wb") as fo, open(err, "wb") as fe:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=fo,
            stderr=fe,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
        )


def stop_process(proc: subprocess.Popen[bytes], name: str, timeout: float) -> str | None:
    """SIGTERM, bounded wait, SIGKILL of its session. A note when it did not stop cleanly."""
    note = None
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            note = f"{name} (pid {proc.pid}) did not stop within {timeout:g} s of SIGTERM"
    _killpg(proc.pid)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
    return note


def wait_for_line(
    path: Path, pattern: re.Pattern[str], proc: subprocess.Popen[bytes], name: str, timeout: float
) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            for line in path.read_text(errors="replace").splitlines():
                if m := pattern.search(line):
                    return m
        if proc.poll() is not None:
            raise BenchError(f"{name} exited with {proc.returncode}: see {path}")
        time.sleep(0.05)
    raise BenchError(f"{name}: {pattern.pattern!r} not logged after {timeout:g} s: see {path}")


@dataclass
class Timed:
    wall_s: float = 0.0
    cpu_s: float = 0.0
    returncode: int | None = None
    error: str | None = None


def run_timed(
    argv: Sequence[str], *, label: str, logdir: Path, timeout: float, env: Mapping[str, str]
) -> Timed:
    """Run `argv` in its own session, wall time and CPU (wait4 rusage); killed on time-out."""
    result = Timed()
    proc = spawn(argv, logdir / f"{label}.out", logdir / f"{label}.err", env, logdir)
    start = time.perf_counter()
    pidfd = os.pidfd_open(proc.pid)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        if not poller.poll(int(timeout * 1000)):
            result.error = f"timed out after {timeout:g} s"
            _killpg(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)
        result.wall_s = time.perf_counter() - start
        proc.returncode = result.returncode = os.waitstatus_to_exitcode(status)
        result.cpu_s = usage.ru_utime + usage.ru_stime
    finally:
        os.close(pidfd)
        if proc.returncode is None:
            _killpg(proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
    if result.error is None and result.returncode != 0:
        tail = (logdir / f"{label}.err").read_text(errors="replace").strip()
        result.error = f"exit status {result.returncode}: {tail[-300:]}"
    return result


def curl_answer(logdir: Path, label: str) -> str:
    """What the upload server answered (curl's -o file)."""
    return read_bytes(str(logdir / f"{label}.body")).decode(errors="replace").strip()


class Stack:
    """`cdi server --no-upload-proxy` and `cdi-uploadproxy` as processes of their own."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.kubeconfig = self.data / "kubeconfig"
        self.ca = self.data / "pki" / "ca.crt"
        self.kube_cache = root / "kubecache"
        self.server: subprocess.Popen[bytes] | None = None
        self.proxy: subprocess.Popen[bytes] | None = None
        self.proxy_port = 0
        self.notes: list[str] = []

    def __enter__(self) -> Stack:
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self.server = spawn(
                [str(CDI), "server", "--data-dir", str(self.data), "--port", "0", *NO_PROXY],
                self.root / "server.out",
                self.root / "server.err",
                clean_env(),
                self.root,
            )
            wait_for_line(
                self.root / "server.out",
                re.compile(r"API at (\S+)"),
                self.server,
                "cdi server",
                START_TIMEOUT_S,
            )
            self._start_proxy()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_proxy(self) -> None:
        pki = self.data / "pki"
        last = ""
        for attempt in range(3):  # the free port may be taken before the proxy binds it
            self.proxy_port = free_port()
            err = self.root / f"proxy-{attempt}.err"
            self.proxy = spawn(
                [
                    str(UPLOAD_PROXY),
                    "--kubeconfig",
                    str(self.kubeconfig),
                    "--listen",
                    f"127.0.0.1:{self.proxy_port}",
                    "--tls-cert",
                    str(pki / "server.crt"),
                    "--tls-key",
                    str(pki / "server.key"),
                    "--resolve",
                    "pod-ip",
                ],
                self.root / f"proxy-{attempt}.out",
                err,
                clean_env(),
                self.root,
            )
            try:
                wait_for_line(err, re.compile("listening on"), self.proxy, "cdi-uploadproxy", 30)
                return
            except BenchError as e:
                last = str(e)
                stop_process(self.proxy, "cdi-uploadproxy", 5)
                self.proxy = None
        raise BenchError(f"cdi-uploadproxy did not start: {last}")

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.proxy_port}/v1beta1/upload"

    def kubectl(
        self, *args: str, stdin: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [KUBECTL, "--cache-dir", str(self.kube_cache), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=clean_env(KUBECONFIG=str(self.kubeconfig)),
            check=False,
        )
        if done.returncode != 0:
            raise BenchError(f"kubectl {' '.join(args)}: {done.stderr.strip() or done.stdout}")
        return done

    def stop(self) -> None:
        for proc, name in ((self.proxy, "cdi-uploadproxy"), (self.server, "cdi server")):
            if proc is not None:
                note = stop_process(proc, name, STOP_TIMEOUT_S)
                if note:
                    self.notes.append(note)
        self.proxy = self.server = None
        deadline = time.monotonic() + LEAK_GRACE_S
        while (left := processes_mentioning(self.data)) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in left:
            comm = read_bytes(f"/proc/{pid}/comm").decode(errors="replace").strip()
            self.notes.append(f"left running after the server stopped: {pid}:{comm} (killed)")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------------
# measurements


@dataclass
class Run:
    method: str
    fmt: str
    index: int
    wall_s: float | None = None
    curl_cpu_s: float | None = None
    error: str | None = None
    procs: dict[str, ProcUsage] = field(default_factory=dict)
    host_busy_s: float | None = None
    foreign_cpu_s: float | None = None
    foreign_top: list[tuple[str, float]] = field(default_factory=list)
    fsync_s: float | None = None
    """floor only: the fsync of the written file, right after curl."""
    verified: bool = False
    setup_s: float | None = None
    """proxy: DataVolume created -> UploadReady."""
    sink: Obj | None = None
    """sink only: its report (request line, bytes received, chunked or not, whether curl sent
    `Expect: 100-continue`, TLS version and cipher, CPU seconds, VmHWM at the end)."""

    @property
    def ok(self) -> bool:
        return self.error is None and self.wall_s is not None


class Measured:
    """Host-wide CPU accounting around one timed command."""

    def __enter__(self) -> Measured:
        self.busy0 = host_busy_ticks()
        self.table0 = process_cpu()
        return self

    def finish(self, run: Run) -> None:
        run.host_busy_s = (host_busy_ticks() - self.busy0) / CLK_TCK
        run.foreign_cpu_s, run.foreign_top = foreign_cpu(self.table0, process_cpu())

    def __exit__(self, *exc: object) -> None:
        return None


@dataclass
class Context:
    images: Path
    work: Path
    logdir: Path
    stack: Stack
    pki: DirectPki
    timeout: float
    verify: set[tuple[str, str]]
    """(method, format) pairs whose output still has to be compared with the image."""


def curl_base() -> list[str]:
    return ["curl", "-sS", "--noproxy", "*", "--fail-with-body"]


def run_proxy(ctx: Context, fmt_: str, index: int, *, profile: Path | None = None) -> Run:
    run = Run("proxy", fmt_, index)
    stack = ctx.stack
    name = f"up-{fmt_}-{index}"
    label = f"proxy-{fmt_}-{index}"
    manifest = {
        "apiVersion": "cdi.kubevirt.io/v1beta1",
        "kind": "DataVolume",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "contentType": "kubevirt",
            "source": {"upload": {}},
            "storage": {"resources": {"requests": {"storage": VOLUME_SIZE}}},
        },
    }
    started = time.perf_counter()
    try:
        stack.kubectl("create", "-f", "-", stdin=json.dumps(manifest))
        stack.kubectl(
            "wait",
            f"dv/{name}",
            "-n",
            NAMESPACE,
            "--for=jsonpath={.status.phase}=UploadReady",
            f"--timeout={READY_TIMEOUT_S:.0f}s",
            timeout=READY_TIMEOUT_S + 10,
        )
        run.setup_s = time.perf_counter() - started
        token_request = {
            "apiVersion": "upload.cdi.kubevirt.io/v1beta1",
            "kind": "UploadTokenRequest",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"pvcName": name},
        }
        token = stack.kubectl(
            "create", "-o", "jsonpath={.status.token}", "-f", "-", stdin=json.dumps(token_request)
        ).stdout.strip()
        if not token:
            raise BenchError("the UploadTokenRequest has no status.token")
        header = ctx.work / "runs" / f"{label}.header"
        header.parent.mkdir(parents=True, exist_ok=True)
        header.write_text(f"Authorization: Bearer {token}\n")  # off the command line
        assert stack.proxy is not None and stack.server is not None
        server_pid = find_upload_server(stack.data, {os.getpid()})
        if server_pid is None:
            raise BenchError("no upload server process of our cdi server found in /proc")
        argv = [
            *curl_base(),
            "--cacert",
            str(stack.ca),
            "-H",
            f"@{header}",
            "-T",
            str(ctx.images / f"disk.{fmt_}"),
            "-X",
            "POST",
            "-o",
            str(ctx.logdir / f"{label}.body"),
            stack.url,
        ]
        pids = {"proxy": stack.proxy.pid, "server": server_pid, "cdi server": stack.server.pid}
        profilers = start_profilers(profile, pids) if profile is not None else []
        os.sync()  # earlier runs' dirty pages are not written back during this one
        try:
            with Measured() as host, ProcWatch(pids) as watch:
                timed = run_timed(
                    argv, label=label, logdir=ctx.logdir, timeout=ctx.timeout, env=clean_env()
                )
            host.finish(run)
        finally:
            stop_profilers(profilers)
        run.procs = watch.usage
        run.curl_cpu_s = timed.cpu_s
        run.error = timed.error
        if run.error is None:
            run.wall_s = timed.wall_s
            answer = curl_answer(ctx.logdir, label)
            if answer != "Upload Complete":
                run.error = f"unexpected answer {answer!r}"
        stack.kubectl(
            "wait",
            f"dv/{name}",
            "-n",
            NAMESPACE,
            "--for=jsonpath={.status.phase}=Succeeded",
            "--timeout=120s",
            timeout=130,
        )
        if run.ok and ("proxy", fmt_) in ctx.verify:
            pv = stack.kubectl(
                "get", "pvc", name, "-n", NAMESPACE, "-o", "jsonpath={.spec.volumeName}"
            ).stdout.strip()
            pv_obj = json.loads(stack.kubectl("get", "pv", pv, "-o", "json").stdout)
            directory = volume_path(pv_obj)
            if directory is None:
                run.error = f"PV {pv} has no local path"
            elif diff := same_image(ctx.images / "disk.raw", directory / "disk.img"):
                run.error = f"wrong volume content: {diff}"
            else:
                run.verified = True
                ctx.verify.discard(("proxy", fmt_))
    except (BenchError, subprocess.TimeoutExpired) as err:
        run.error = run.error or str(err)
    finally:
        with contextlib.suppress(BenchError, subprocess.TimeoutExpired):
            stack.kubectl(
                "delete", "dv", name, "-n", NAMESPACE, "--wait=true", "--timeout=60s", timeout=70
            )
    return run


def run_direct(ctx: Context, fmt_: str, index: int) -> Run:
    run = Run("direct", fmt_, index)
    label = f"direct-{fmt_}-{index}"
    rundir = ctx.work / "runs" / label
    shutil.rmtree(rundir, ignore_errors=True)
    data, scratch, tmp = rundir / "data", rundir / "scratch", rundir / "tmp"
    for d in (data, scratch, tmp):
        d.mkdir(parents=True)
    termination = rundir / "termination-log"
    termination.touch()
    pki = ctx.pki
    env = clean_env(
        TLS_KEY_FILE=str(pki.server_key),
        TLS_CERT_FILE=str(pki.server_cert),
        CLIENT_CERT_FILE=str(pki.client_ca),
        CLIENT_NAME=CLIENT_NAME,
        UPLOAD_IMAGE_SIZE=VOLUME_SIZE,
        FILESYSTEM_OVERHEAD="0",
        PREALLOCATION="false",
        LISTEN_ADDRESS="127.0.0.1",
        LISTEN_PORT="0",
        CDI_DATA_DIR=str(data),
        CDI_SCRATCH_DIR=str(scratch),
        CDI_TERMINATION_LOG=str(termination),
        TMPDIR=str(tmp),
    )
    server = spawn(
        [str(UPLOAD_SERVER)],
        ctx.logdir / f"{label}.server.out",
        ctx.logdir / f"{label}.server.err",
        env,
        rundir,
    )
    try:
        port = int(
            wait_for_line(
                ctx.logdir / f"{label}.server.err", SERVING, server, "cdi-uploadserver", 30
            )[1]
        )
        argv = [
            *curl_base(),
            "--cacert",
            str(pki.server_ca),
            "--cert",
            str(pki.client_cert),
            "--key",
            str(pki.client_key),
            "--resolve",
            f"{DIRECT_HOST}:{port}:127.0.0.1",
            "-T",
            str(ctx.images / f"disk.{fmt_}"),
            "-X",
            "POST",
            "-o",
            str(ctx.logdir / f"{label}.body"),
            f"https://{DIRECT_HOST}:{port}/v1beta1/upload",
        ]
        os.sync()
        with Measured() as host, ProcWatch({"server": server.pid}) as watch:
            timed = run_timed(
                argv, label=label, logdir=ctx.logdir, timeout=ctx.timeout, env=clean_env()
            )
        host.finish(run)
        run.procs = watch.usage
        run.curl_cpu_s = timed.cpu_s
        run.error = timed.error
        if run.error is None:
            run.wall_s = timed.wall_s
            answer = curl_answer(ctx.logdir, label)
            if answer != "Upload Complete":
                run.error = f"unexpected answer {answer!r}"
        try:
            code = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            code = None
        if run.error is None and code != 0:
            run.error = f"cdi-uploadserver exited with {code} after the upload"
        if run.ok and ("direct", fmt_) in ctx.verify:
            if diff := same_image(ctx.images / "disk.raw", data / "disk.img"):
                run.error = f"wrong volume content: {diff}"
            else:
                run.verified = True
                ctx.verify.discard(("direct", fmt_))
    except BenchError as err:
        run.error = run.error or str(err)
    finally:
        stop_process(server, "cdi-uploadserver", 5)
        shutil.rmtree(rundir, ignore_errors=True)
    return run


def run_sink(ctx: Context, fmt_: str, index: int) -> Run:
    """(b)'s curl command line into a receiver that throws the body away (SINK_SCRIPT)."""
    run = Run("sink", fmt_, index)
    label = f"sink-{fmt_}-{index}"
    pki = ctx.pki
    source = ctx.images / f"disk.{fmt_}"
    out = ctx.logdir / f"{label}.server.out"
    args = [str(pki.server_cert), str(pki.server_key), str(pki.client_ca), CLIENT_NAME]
    sink = spawn(
        [sys.executable, "-c", SINK_SCRIPT, *args],
        out,
        ctx.logdir / f"{label}.server.err",
        clean_env(),
        ctx.logdir,
    )
    try:
        port = int(wait_for_line(out, SINK_LISTENING, sink, "sink", 30)[1])
        argv = [
            *curl_base(),
            "--cacert",
            str(pki.server_ca),
            "--cert",
            str(pki.client_cert),
            "--key",
            str(pki.client_key),
            "--resolve",
            f"{DIRECT_HOST}:{port}:127.0.0.1",
            "-T",
            str(source),
            "-X",
            "POST",
            "-o",
            str(ctx.logdir / f"{label}.body"),
            f"https://{DIRECT_HOST}:{port}/v1beta1/upload",
        ]
        os.sync()
        with Measured() as host, ProcWatch({"server": sink.pid}) as watch:
            timed = run_timed(
                argv, label=label, logdir=ctx.logdir, timeout=ctx.timeout, env=clean_env()
            )
        host.finish(run)
        run.procs = watch.usage
        run.curl_cpu_s = timed.cpu_s
        run.error = timed.error
        if run.error is None:
            run.wall_s = timed.wall_s
            answer = curl_answer(ctx.logdir, label)
            if answer != "Upload Complete":
                run.error = f"unexpected answer {answer!r}"
        try:
            code = sink.wait(timeout=30)
        except subprocess.TimeoutExpired:
            code = None
        lines = read_bytes(str(out)).decode(errors="replace").strip().splitlines()
        with contextlib.suppress(IndexError, ValueError):
            run.sink = json.loads(lines[-1])
        if run.sink is not None:
            usage = run.procs["server"]
            usage.cpu_s = usage.main_thread_cpu_s = float(run.sink["cpu_s"])
            usage.hwm = max(usage.hwm, int(run.sink.get("hwm", 0)))
        if run.error is None:
            if code != 0 or run.sink is None:
                err = read_bytes(str(ctx.logdir / f"{label}.server.err")).decode(errors="replace")
                run.error = f"sink exited with {code}: {err.strip()[-300:]}"
            elif run.sink["received"] != source.stat().st_size:
                run.error = f"sink received {run.sink['received']} bytes"
    except BenchError as err:
        run.error = run.error or str(err)
    finally:
        stop_process(sink, "sink", 5)
    return run


def run_floor(ctx: Context, fmt_: str, index: int) -> Run:
    run = Run("floor", fmt_, index)
    label = f"floor-{fmt_}-{index}"
    rundir = ctx.work / "runs" / label
    shutil.rmtree(rundir, ignore_errors=True)
    rundir.mkdir(parents=True)
    out = rundir / "out.raw"
    source = ctx.images / f"disk.{fmt_}"
    argv = ["curl", "-sS", "-T", str(source), f"file://{out}"]
    try:
        os.sync()
        with Measured() as host:
            timed = run_timed(
                argv, label=label, logdir=ctx.logdir, timeout=ctx.timeout, env=clean_env()
            )
        host.finish(run)
        run.curl_cpu_s = timed.cpu_s
        run.error = timed.error
        if run.error is None:
            run.wall_s = timed.wall_s
            start = time.perf_counter()
            fd = os.open(out, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            run.fsync_s = time.perf_counter() - start
            if out.stat().st_size != source.stat().st_size:
                run.error = f"wrote {out.stat().st_size} bytes, not {source.stat().st_size}"
    finally:
        shutil.rmtree(rundir, ignore_errors=True)
    return run


def run_convert(ctx: Context, fmt_: str, index: int) -> Run:
    """What the upload server does with a qcow2 once the body is in scratch."""
    run = Run("convert", fmt_, index)
    label = f"convert-{fmt_}-{index}"
    rundir = ctx.work / "runs" / label
    shutil.rmtree(rundir, ignore_errors=True)
    rundir.mkdir(parents=True)
    out = rundir / "disk.img"
    argv = ["qemu-img", "convert", "-t", "none", "-W", "-f", fmt_, "-O", "raw"]
    argv += [str(ctx.images / f"disk.{fmt_}"), str(out)]
    try:
        os.sync()
        with Measured() as host:
            timed = run_timed(
                argv, label=label, logdir=ctx.logdir, timeout=ctx.timeout, env=clean_env()
            )
        host.finish(run)
        run.curl_cpu_s = timed.cpu_s
        run.error = timed.error
        if run.error is None:
            run.wall_s = timed.wall_s
            if ("convert", fmt_) in ctx.verify:
                if diff := same_image(ctx.images / "disk.raw", out):
                    run.error = f"wrong output: {diff}"
                else:
                    run.verified = True
                    ctx.verify.discard(("convert", fmt_))
    finally:
        shutil.rmtree(rundir, ignore_errors=True)
    return run


RUNNERS: dict[str, Callable[[Context, str, int], Run]] = {
    "proxy": run_proxy,
    "direct": run_direct,
    "sink": run_sink,
    "floor": run_floor,
    "convert": run_convert,
}


def methods_for(fmt_: str) -> list[str]:
    return [m for m in METHODS if m != "convert" or fmt_ != "raw"]


# --------------------------------------------------------------------------------------------------
# profiling (--profile)


@dataclass
class Profiler:
    name: str
    """Which process: proxy or server."""
    tool: str
    """py-spy (Python frames) or perf (native: kernel, libcrypto, libc, the interpreter)."""
    output: Path
    proc: subprocess.Popen[bytes]


def start_profilers(out: Path, pids: Mapping[str, int]) -> list[Profiler]:
    """py-spy (non-blocking) and perf (if installed) on the proxy and the upload server."""
    started = []
    perf = shutil.which("perf")
    for name in ("proxy", "server"):
        commands: list[tuple[str, Path, list[str]]] = []
        if os.access(PY_SPY, os.X_OK):
            path = out / f"{name}.py-spy.txt"
            argv = [str(PY_SPY), "record", "--pid", str(pids[name]), *PY_SPY_ARGS, str(path)]
            commands.append(("py-spy", path, argv))
        if perf is not None:
            path = out / f"{name}.perf.data"
            argv = [perf, "record", *PERF_ARGS, "-o", str(path), "-p", str(pids[name])]
            commands.append(("perf", path, argv))
        for tool, path, argv in commands:
            with open(out / f"{name}.{tool}.log", "wb") as err:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=err,
                    stderr=err,
                    start_new_session=True,
                )
            started.append(Profiler(name, tool, path, proc))
    time.sleep(0.5)  # they attach
    return started


def stop_profilers(profilers: Sequence[Profiler]) -> None:
    for p in profilers:
        with contextlib.suppress(ProcessLookupError):
            p.proc.send_signal(signal.SIGINT)  # both write their output on SIGINT
    for p in profilers:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.proc.wait(timeout=60)
        note = stop_process(p.proc, f"{p.tool} {p.name}", 5)
        if note:
            log(note)


def summarize_py_spy(path: Path, top: int = 10) -> list[tuple[str, float]]:
    """Python functions by self time (the innermost frame of each busy sample)."""
    leaf: Counter[str] = Counter()
    total = 0
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count_text = line.rpartition(" ")
            frames = [f for f in stack.split(";") if f]
            if not count_text.isdigit() or not frames:
                continue
            count = int(count_text)
            total += count
            leaf[re.sub(r":\d+\)$", ")", frames[-1])] += count
    return [(f, c / total) for f, c in leaf.most_common(top)] if total else []


_PERF_ROW = re.compile(r"^\s*([0-9.]+)%\s+(.*\S)\s*$")


def summarize_perf(path: Path, sort: str, top: int) -> list[tuple[str, float]]:
    """`perf report --no-children --sort <sort>`: rows (what, share of the samples)."""
    perf = shutil.which("perf")
    if perf is None or not path.exists():
        return []
    argv = [perf, "report", "-i", str(path), "--no-children", "--sort", sort, "-g", "none"]
    done = subprocess.run(
        [*argv, "--stdio", "--percent-limit", "0.5"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    rows = []
    for line in done.stdout.splitlines():
        if m := _PERF_ROW.match(line):
            rows.append((" ".join(m[2].split()), float(m[1]) / 100))
    return rows[:top]


def summarize_profiles(out: Path) -> dict[str, dict[str, list[tuple[str, float]]]]:
    found: dict[str, dict[str, list[tuple[str, float]]]] = {}
    for name in ("proxy", "server"):
        found[name] = {
            "python self (py-spy)": summarize_py_spy(out / f"{name}.py-spy.txt"),
            "native by library (perf)": summarize_perf(out / f"{name}.perf.data", "dso", 6),
            "native by symbol (perf)": summarize_perf(out / f"{name}.perf.data", "dso,sym", 12),
        }
    return found


# --------------------------------------------------------------------------------------------------
# report


@dataclass
class FormatResult:
    fmt: str
    size: int
    runs: dict[str, list[Run]] = field(default_factory=dict)

    def ok(self, method: str) -> list[Run]:
        return [r for r in self.runs.get(method, []) if r.ok]

    def times(self, method: str) -> list[float]:
        return [r.wall_s for r in self.ok(method) if r.wall_s is not None]

    def best(self, method: str) -> float | None:
        t = self.times(method)
        return min(t) if t else None

    def median(self, method: str) -> float | None:
        t = self.times(method)
        return statistics.median(t) if t else None

    def floor_synced(self) -> float | None:
        t = [r.wall_s + (r.fsync_s or 0.0) for r in self.ok("floor") if r.wall_s is not None]
        return min(t) if t else None

    def ratio(self, num: str, den: str) -> float | None:
        a, b = self.best(num), self.best(den)
        return a / b if a is not None and b else None

    def peak(self, method: str, proc: str) -> int | None:
        values = [r.procs[proc].peak for r in self.ok(method) if proc in r.procs]
        return max(values) if values else None

    def fastest(self, method: str) -> Run | None:
        runs = self.ok(method)
        return min(runs, key=lambda r: r.wall_s or 0.0) if runs else None

    def errors(self) -> list[str]:
        return [
            f"{self.fmt} {r.method} #{r.index}: {r.error}"
            for runs in self.runs.values()
            for r in runs
            if r.error
        ]


def _mib(value: float | None) -> str:
    return fmt(None if value is None else value / MIB, ".1f")


def _x(value: float | None) -> str:
    return fmt(value) + ("x" if value is not None else "")


def _bm(result: FormatResult, method: str) -> str:
    b, m = result.best(method), result.median(method)
    if b is None or m is None:
        return "ERR" if result.runs.get(method) else "-"
    return f"{b:.2f}/{m:.2f}"


def main_table(results: Sequence[FormatResult]) -> str:
    headers = ["format", "(a) proxy s", "(b) direct s", "(c) floor s", "c+fsync s", "(d) sink s"]
    headers += ["a/b", "b/c", "a/c", "b/d", "a/d", "proxy RSS", "server RSS", "CDI s"]
    rows = []
    for r in results:
        rows.append(
            [
                r.fmt,
                _bm(r, "proxy"),
                _bm(r, "direct"),
                _bm(r, "floor"),
                fmt(r.floor_synced()),
                _bm(r, "sink"),
                _x(r.ratio("proxy", "direct")),
                _x(r.ratio("direct", "floor")),
                _x(r.ratio("proxy", "floor")),
                _x(r.ratio("direct", "sink")),
                _x(r.ratio("proxy", "sink")),
                _mib(r.peak("proxy", "proxy")),
                _mib(
                    max(
                        (v for v in (r.peak("proxy", "server"), r.peak("direct", "server")) if v),
                        default=None,
                    )
                ),
                fmt(CDI_SECONDS.get(r.fmt)),
            ]
        )
    return table(headers, rows)


def cpu_table(results: Sequence[FormatResult]) -> str:
    """Per method, the fastest run: where the CPU went while curl ran."""
    headers = ["format", "method", "wall s", "MB/s", "curl", "proxy", "server", "loop/thread"]
    headers += ["qemu-img", "cdi srv", "host busy", "foreign", "srv RSS"]
    rows = []
    for r in results:
        for method in METHODS:
            run = r.fastest(method)
            if run is None or run.wall_s is None:
                continue
            procs = run.procs
            server = procs.get("server")
            split = (
                f"{server.main_thread_cpu_s:.2f}/{server.busiest_other_thread_cpu_s:.2f}"
                if server
                else "-"
            )
            rows.append(
                [
                    r.fmt,
                    method,
                    fmt(run.wall_s),
                    fmt(r.size / run.wall_s / 1e6, ".0f"),
                    fmt(run.curl_cpu_s),
                    fmt(procs["proxy"].cpu_s) if "proxy" in procs else "-",
                    fmt(server.cpu_s) if server else "-",
                    split,
                    fmt(server.children_cpu_s) if server else "-",
                    fmt(procs["cdi server"].cpu_s) if "cdi server" in procs else "-",
                    fmt(run.host_busy_s),
                    fmt(run.foreign_cpu_s),
                    _mib(server.peak) if server else "-",
                ]
            )
    return table(headers, rows)


def check_targets(results: Sequence[FormatResult], proxy_hwm: int | None) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []
    for r in results:
        value = r.ratio("proxy", "direct")
        checks.append(
            {
                "target": f"{r.fmt}: proxy adds <= 15% over direct (a/b)",
                "value": value,
                "limit": PROXY_OVER_DIRECT,
                "pass": value is not None and value <= PROXY_OVER_DIRECT,
            }
        )
    for r in results:
        if r.fmt != "raw":
            continue
        for num, what in (("proxy", "through the proxy (a/c)"), ("direct", "direct (b/c)")):
            value = r.ratio(num, "floor")
            checks.append(
                {
                    "target": f"raw upload {what} <= 1.3x the floor",
                    "value": value,
                    "limit": RAW_OVER_FLOOR,
                    "pass": value is not None and value <= RAW_OVER_FLOOR,
                    "primary": num == "proxy",
                }
            )
    checks.append(
        {
            "target": "proxy RSS <= 80 MiB (VmHWM over the whole run)",
            "value": None if proxy_hwm is None else proxy_hwm / MIB,
            "limit": PROXY_RSS_TARGET / MIB,
            "pass": proxy_hwm is not None and proxy_hwm <= PROXY_RSS_TARGET,
        }
    )
    return checks


def info_ratios(results: Sequence[FormatResult]) -> list[dict[str, Any]]:
    """Not targets: raw uploads over the TLS network floor (d), what curl itself allows."""
    found: list[dict[str, Any]] = []
    for r in results:
        if r.fmt != "raw":
            continue
        for num, what in (("direct", "direct"), ("proxy", "via the proxy")):
            ratio = f"{'b' if num == 'direct' else 'a'}/d"
            found.append(
                {
                    "info": f"raw: {what} over the TLS network floor ({ratio})",
                    "value": r.ratio(num, "sink"),
                }
            )
    return found


def info_text(infos: Sequence[dict[str, Any]]) -> str:
    lines = []
    for i in infos:
        shown = "not measured" if i["value"] is None else f"{i['value']:.2f}x"
        lines.append(f"  info  {i['info']:52} {shown}   (not a target)")
    return "\n".join(lines)


def targets_text(checks: Sequence[dict[str, Any]]) -> str:
    lines = []
    for c in checks:
        verdict = "PASS" if c["pass"] else "MISS"
        if c["value"] is None:
            shown = "not measured"
        elif "RSS" in c["target"]:
            shown = f"{c['value']:.1f} MiB"
        else:
            shown = f"{c['value']:.2f}x"
        note = "" if c.get("primary", True) else "   (for information)"
        lines.append(f"  {verdict}  {c['target']:52} {shown}{note}")
    return "\n".join(lines)


def to_json(
    results: Sequence[FormatResult],
    checks: Sequence[dict[str, Any]],
    infos: Sequence[dict[str, Any]],
    meta: dict[str, Any],
) -> dict[str, Any]:
    formats = []
    for r in results:
        methods: dict[str, Any] = {}
        for method, runs in r.runs.items():
            methods[method] = {
                "best_s": r.best(method),
                "median_s": r.median(method),
                "runs": [asdict(x) for x in runs],
            }
        formats.append(
            {
                "format": r.fmt,
                "file_size": r.size,
                "proxy_over_direct": r.ratio("proxy", "direct"),
                "direct_over_floor": r.ratio("direct", "floor"),
                "proxy_over_floor": r.ratio("proxy", "floor"),
                "direct_over_sink": r.ratio("direct", "sink"),
                "proxy_over_sink": r.ratio("proxy", "sink"),
                "floor_with_fsync_s": r.floor_synced(),
                "proxy_peak_rss_mib": _div(r.peak("proxy", "proxy")),
                "server_peak_rss_mib": {
                    m: _div(r.peak(m, "server")) for m in ("proxy", "direct") if r.runs.get(m)
                },
                "cdi_seconds": CDI_SECONDS.get(r.fmt),
                "methods": methods,
            }
        )
    return {**meta, "formats": formats, "targets": list(checks), "info": list(infos)}


def _div(value: int | None) -> float | None:
    return None if value is None else value / MIB


# --------------------------------------------------------------------------------------------------
# entry point


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="upload.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="256 MiB virtual / 128 MiB data")
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    parser.add_argument("--repeat", type=int, default=2, help="runs per measurement [2]")
    parser.add_argument("--only", default="", help="comma-separated formats (raw,qcow2)")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}"
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds per upload [900]")
    parser.add_argument("--workdir", type=Path, help="use (and keep) this dir; images are reused")
    parser.add_argument(
        "--profile", action="store_true", help="one extra profiled upload per format (py-spy)"
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    args.formats = [f for f in (args.only.split(",") if args.only else FORMATS) if f]
    if set(args.formats) - set(FORMATS):
        parser.error(f"unknown formats in --only {args.only}")
    args.methods = [m for m in args.methods.split(",") if m]
    if set(args.methods) - set(METHODS):
        parser.error(f"unknown methods in --methods {args.methods}")
    return args


@contextlib.contextmanager
def work_dir(args: argparse.Namespace) -> Iterator[Path]:
    keep = args.keep or args.workdir is not None
    if args.workdir is not None:
        work = args.workdir.resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="cdi-upload-bench-", dir="/var/tmp"))
    try:
        yield work
    finally:
        if keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = Sizes.for_mode(args.quick)
    for tool in (CDI, UPLOAD_PROXY, UPLOAD_SERVER):
        if not os.access(tool, os.X_OK):
            log(f"not found: {tool} (run .venv/bin/pip install -e .)")
            return 2
    started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    results: list[FormatResult] = []
    notes: list[str] = []
    profiles: dict[str, dict[str, dict[str, list[tuple[str, float]]]]] = {}
    build_s: dict[str, float] = {}
    proxy_idle: int | None = None
    proxy_hwm: int | None = None
    failed = False
    memory = memory_state()
    wall0 = time.perf_counter()
    with work_dir(args) as work:
        log(f"work dir {work}")
        try:
            images = work / "images"
            build_s = build_images(images, sizes)
            build_s["page cache warm-up"] = round(
                warm_cache([images / f"disk.{f}" for f in FORMATS]), 2
            )
            shutil.rmtree(work / "runs", ignore_errors=True)
            shutil.rmtree(work / "stack", ignore_errors=True)
            logdir = work / "logs"
            logdir.mkdir(parents=True, exist_ok=True)
            pki = make_pki(work / "pki")
            with Stack(work / "stack") as stack:
                assert stack.proxy is not None
                log(
                    f"cdi server pid {stack.server.pid if stack.server else '?'}, proxy pid "
                    f"{stack.proxy.pid} on 127.0.0.1:{stack.proxy_port}"
                )
                proxy_idle = vm_bytes(stack.proxy.pid).get("VmRSS")
                ctx = Context(
                    images=images,
                    work=work,
                    logdir=logdir,
                    stack=stack,
                    pki=pki,
                    timeout=args.timeout,
                    verify={(m, f) for m in METHODS if m not in UNVERIFIED for f in FORMATS},
                )
                for fmt_ in args.formats:
                    result = FormatResult(fmt_, (images / f"disk.{fmt_}").stat().st_size)
                    results.append(result)
                    methods = [m for m in methods_for(fmt_) if m in args.methods]
                    log(f"{fmt_} ({result.size} bytes):")
                    for i in range(args.repeat):
                        order = methods if i % 2 == 0 else list(reversed(methods))
                        for method in order:
                            run = RUNNERS[method](ctx, fmt_, i + 1)
                            result.runs.setdefault(method, []).append(run)
                            log(_run_line(run))
                    if args.profile and "proxy" in args.methods:
                        out = work / "profile" / fmt_
                        out.mkdir(parents=True, exist_ok=True)
                        run = run_proxy(ctx, fmt_, 99, profile=out)
                        log(f"  profiled: {_run_line(run)}")
                        profiles[fmt_] = summarize_profiles(out)
                proxy_hwm = vm_bytes(stack.proxy.pid).get("VmHWM")
            notes += stack.notes
        except Exception as err:
            log(f"benchmark error: {type(err).__name__}: {err}")
            failed = True
    total_s = time.perf_counter() - wall0
    if not results:
        return 1
    checks = check_targets(results, proxy_hwm)
    infos = info_ratios(results)
    errors = [e for r in results for e in r.errors()] + notes
    mode = "quick" if args.quick else "full"
    print(
        f"\nupload benchmark ({mode}: {sizes.virtual // MIB} MiB virtual, {sizes.data // MIB} MiB"
        f" random data; curl -T -X POST /v1beta1/upload; best/median of {args.repeat} runs;"
        " ratios of best times; RSS in MiB)"
    )
    print(memory)
    print(main_table(results))
    print(
        "\n(a) curl -> cdi-uploadproxy (TLS) -> upload server pod (mutual TLS); (b) curl -> "
        "cdi-uploadserver (mutual TLS);\n(c) curl -T FILE file://...; c+fsync: plus fsync of "
        "that file; (d) (b)'s curl into a Python receiver that discards\nthe body (mutual TLS, "
        "same certificates): the TLS network floor. proxy RSS: the proxy's peak while uploading;"
        "\nserver RSS: the upload server process's own peak (VmHWM), max of (a) and (b). CDI s: "
        "CDI's upload server, from the issue."
    )
    for r in results:
        conv, floor, direct = r.best("convert"), r.best("floor"), r.best("direct")
        if conv is not None and floor is not None:
            ratio = _x(direct / (floor + conv) if direct is not None else None)
            print(
                f"{r.fmt}: qemu-img convert -t none -W of a local copy {conv:.2f} s; the upload "
                f"server's floor for {r.fmt} (body to scratch, then convert) = c + convert = "
                f"{floor + conv:.2f} s; (b) is {ratio} of it"
            )
    print(
        "\nCPU seconds while curl ran (fastest run of each; loop/thread: the server's event-loop"
        " thread\n(control only: bodies are read by the connection's thread) / its busiest other"
        " thread (receiving, TLS, pipeline);"
        f" qemu-img: children it reaped;\nhost busy: all CPUs (at most {os.cpu_count()} x"
        " wall); foreign: other processes on the machine meanwhile;\nsink: server is the sink"
        " process, from accept() to its exit):"
    )
    print(cpu_table(results))
    idle = _mib(proxy_idle)
    print(
        f"\nproxy RSS: {idle} MiB idle before the first upload, VmHWM {_mib(proxy_hwm)} MiB "
        "at the end of the run"
    )
    print("\ntargets:")
    print(targets_text(checks))
    if infos:
        print(info_text(infos))
    for fmt_, procs in profiles.items():
        for name, views in procs.items():
            for view, rows in views.items():
                if rows:
                    print(f"\nprofile {fmt_} {name}, {view}, share of samples:")
                    print("\n".join(f"  {share * 100:5.1f}%  {what}" for what, share in rows))
    if errors:
        print("\nerrors:")
        print("\n".join(f"  {e}" for e in errors))
    meta = {
        "benchmark": "upload",
        "timestamp": started,
        "mode": mode,
        "repeat": args.repeat,
        "sizes": asdict(sizes),
        "build_seconds": build_s,
        "total_seconds": round(total_s, 1),
        "proxy_idle_rss_mib": _div(proxy_idle),
        "proxy_hwm_mib": _div(proxy_hwm),
        "profiles": profiles,
        "host": {
            "cpus": os.cpu_count(),
            "kernel": os.uname().release,
            "python": sys.version.split()[0],
            "curl": tool_version(["curl", "--version"]),
            "qemu-img": tool_version(["qemu-img", "--version"]),
        },
        "errors": errors,
    }
    OUT_DIR.mkdir(exist_ok=True)
    out = OUT_DIR / "upload.json"
    out.write_text(json.dumps(to_json(results, checks, infos, meta), indent=2) + "\n")
    print(f"\nwrote {out.relative_to(REPO)} ({total_s:.0f} s)")
    return 1 if failed or errors else 0


def _run_line(run: Run) -> str:
    procs = " ".join(
        f"{name} cpu {u.cpu_s:.2f} (loop {u.main_thread_cpu_s:.2f}) rss {u.peak / MIB:.0f}"
        for name, u in run.procs.items()
        if name != "cdi server"
    )
    status = "ok" if run.error is None else f"ERROR {run.error}"
    wall = f"{run.wall_s:7.2f} s" if run.wall_s is not None else "      - s"
    extra = f" fsync {run.fsync_s:.2f}" if run.fsync_s is not None else ""
    return (
        f"  {run.method:7} {run.fmt:5} #{run.index} {wall}{extra}  curl cpu "
        f"{fmt(run.curl_cpu_s)}  {procs}  foreign {fmt(run.foreign_cpu_s)}  {status}"
    )


if __name__ == "__main__":
    sys.exit(main())
