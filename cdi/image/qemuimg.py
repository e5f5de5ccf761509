"""The qemu-img wrapper: `info`, `convert`, `resize`, `create`, `measure` and `cross_check`.

Owns every qemu-img command line the project runs and the child processes behind them. Callers are
the importer pipeline (info under limits, cross-check against the inspector, convert, resize), the
upload server (the same pipeline) and blank-image creation. This module must not decide policy (what
size to resize to, whether to preallocate): it runs what it is asked, safely, and says what failed.

Safety rules enforced here, because qemu-img trusts its inputs more than we can:

* The format is always forced (`-f`, or the `driver` of a `json:` spec); qemu-img never probes.
* A filename is a local path unless the caller explicitly allows URIs. qemu-img reads a leading
  `json:` or `protocol:` in a filename as options, so a local file named `json:{...}` or
  `nbd:host:1` would open something else. Local paths are made absolute: a name that starts with
  `/` never carries a protocol prefix.
* `convert` and `measure` open the source with `"backing": null`, so even an image that slipped past
  the checks cannot make qemu-img read a backing file (a local file leak or an SSRF through a
  `json:` backing name). `info` does not need it: qemu-img info never opens the backing file, and
  must still report its name so that `cross_check` can refuse it.
* `info` runs with RLIMIT_AS, RLIMIT_CPU and a wall-clock timeout, no core dumps, never with
  `--backing-chain` or `-U`.
* Every child is reaped in `finally`: killed and waited for on timeout or cancellation.

Errors (see `cdi.image.errors`): a non-zero exit is a `ToolError` whose message is qemu-img's last
meaningful stderr line; qemu-img exceeding its limits on `info`/`measure` is a `FormatError` (the
image made it misbehave); a `convert` that times out is a `RetryableError`; a missing binary is a
`PermanentError` with an install hint.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import resource
import signal
import stat
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from cdi.image.errors import (
    FormatError,
    PermanentError,
    Problem,
    RetryableError,
    ToolError,
)
from cdi.image.lifetime import die_with_parent

__all__ = [
    "QEMU_IMG",
    "ImageInfo",
    "Limits",
    "Measurement",
    "build_convert_argv",
    "convert",
    "create",
    "cross_check",
    "info",
    "measure",
    "resize",
    "source_spec",
]

log = logging.getLogger(__name__)

QEMU_IMG: Final = "qemu-img"
"""The binary run; a module attribute so that tests and odd installs can point elsewhere."""

INSTALL_HINT: Final = "install the qemu-utils package (Debian/Ubuntu) or qemu-img (Fedora)"

# Formats qemu-img may be asked to read; anything else is a caller bug, not a user error.
KNOWN_FORMATS: Final = frozenset({"raw", "qcow2", "vmdk", "vdi", "vpc", "vhdx"})
CACHE_MODES: Final = frozenset({"none", "writeback", "writethrough", "directsync", "unsafe"})
PREALLOCATION_MODES: Final = frozenset({"off", "metadata", "falloc", "full"})
# The URI schemes a caller may allow: the NBD exports we serve ourselves. qemu's curl/http driver
# is deliberately absent (it hangs forever on a stalled server); put nbdkit in front instead.
NBD_SCHEMES: Final = frozenset({"nbd", "nbd+tcp", "nbd+unix"})
# Inspector names that qemu-img calls something else.
FORMAT_ALIASES: Final[Mapping[str, str]] = {"iso": "raw", "gpt": "raw", "mbr": "raw", "vhd": "vpc"}
VMDK_SAFE_CREATE_TYPES: Final = frozenset({"monolithicSparse", "streamOptimized"})

# qemu-img limits (see its error messages): -m is 1..16, -S a multiple of 512 up to 16 MiB.
MAX_COROUTINES: Final = 16
MAX_SPARSE_SIZE: Final = 16 * 1024 * 1024
SECTOR: Final = 512

STDERR_TAIL_BYTES: Final = 16 * 1024
# `info --output=json` of a sane image is a few KiB; a huge answer means a hostile descriptor.
MAX_INFO_OUTPUT: Final = 4 * 1024 * 1024
READ_CHUNK: Final = 4096
TERM_GRACE: Final = 5.0

_PROGRESS_RE: Final = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")
_PROTOCOL_RE: Final = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_MIB: Final = 1024 * 1024


@dataclass(frozen=True)
class ImageInfo:
    """What `qemu-img info --output=json` said about an image, with the raw answer kept."""

    format: str
    virtual_size: int
    actual_size: int | None
    backing_filename: str | None
    data_file: str | None
    format_specific: Mapping[str, Any]
    raw: Mapping[str, Any]


@dataclass(frozen=True)
class Limits:
    """Resource limits for qemu-img on untrusted metadata (`info`, `measure`).

    The defaults are the ones OpenStack and CDI used: 1 GiB of address space and 30 s of CPU are
    far more than any honest image needs, and stop a crafted one from eating the node.
    """

    address_space: int = 1 << 30
    """RLIMIT_AS of the child, bytes."""
    cpu_seconds: int = 30
    """RLIMIT_CPU of the child, seconds of CPU time."""
    wall_seconds: float = 60.0
    """Wall-clock timeout, seconds; catches a child blocked on I/O, which uses no CPU."""


@dataclass(frozen=True)
class Measurement:
    """`qemu-img measure`: bytes needed for the converted image (now, and fully allocated)."""

    required: int
    fully_allocated: int


@dataclass
class _Result:
    returncode: int
    stdout: bytes
    stderr: str


@dataclass
class _StderrTail:
    """Keeps the last few KiB of a stream, so memory stays bounded whatever the tool prints."""

    limit: int = STDERR_TAIL_BYTES
    chunks: deque[bytes] = field(default_factory=deque)
    size: int = 0

    def add(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)
        while self.size - len(self.chunks[0]) >= self.limit:
            self.size -= len(self.chunks.popleft())

    def text(self) -> str:
        data = b"".join(self.chunks)[-self.limit :]
        return data.decode("utf-8", "replace")


class _TimedOut(Exception):
    """Internal: the wall-clock timeout expired; the child has been killed and reaped."""


# --- filenames --------------------------------------------------------------------------------


def _local_path(path: str) -> str:
    """An absolute path: qemu-img never reads `json:` or `proto:` options from it."""
    if not path:
        raise ValueError("empty image path")
    return os.path.abspath(path)


def _has_protocol(path: str) -> bool:
    # qemu's own rule (path_has_protocol): a colon before any slash.
    return _PROTOCOL_RE.match(path) is not None


def _scheme(path: str) -> str:
    return path.split(":", 1)[0].lower()


def _check_format(fmt: str) -> None:
    if fmt not in KNOWN_FORMATS:
        raise ValueError(
            f"unsupported image format {fmt!r}; expected one of {sorted(KNOWN_FORMATS)}"
        )


def _qemu_path(path: str, *, allow_uri: bool) -> str:
    """The filename to give qemu-img: an allowed URI verbatim, anything else as a local path."""
    if allow_uri and _has_protocol(path):
        scheme = _scheme(path)
        if scheme != "json" and scheme not in NBD_SCHEMES:
            raise ValueError(f"URI scheme {scheme!r} is not allowed for qemu-img: {path!r}")
        return path
    return _local_path(path)


def _nbd_node(uri: str) -> dict[str, Any]:
    """A qemu `nbd` block node for an `nbd[+tcp|+unix]://` URI (nested nodes ignore URIs)."""
    parts = urllib.parse.urlsplit(uri)
    export = urllib.parse.unquote(parts.path[1:]) if parts.path.startswith("/") else ""
    query = urllib.parse.parse_qs(parts.query)
    node: dict[str, Any] = {"driver": "nbd", "export": export}
    if parts.scheme == "nbd+unix":
        sockets = query.get("socket", [])
        if len(sockets) != 1 or parts.netloc:
            raise ValueError(f"nbd+unix URI needs exactly one socket= and no host: {uri!r}")
        node["server"] = {"type": "unix", "path": sockets[0]}
    else:
        if not parts.hostname:
            raise ValueError(f"nbd URI without a host: {uri!r}")
        node["server"] = {
            "type": "inet",
            "host": parts.hostname,
            "port": str(parts.port or 10809),
        }
    return node


def source_spec(path: str, fmt: str, *, allow_uri: bool = False, no_backing: bool = True) -> str:
    """The source filename for `convert`/`measure`.

    With `no_backing` (the default) this is a `json:` spec with the format as `driver` and
    `"backing": null`, which stops qemu-img from ever opening a backing file. Without it, the plain
    safe filename (and the caller passes `-f`).
    """
    _check_format(fmt)
    qpath = _qemu_path(path, allow_uri=allow_uri)
    if not no_backing:
        return qpath
    spec: dict[str, Any]
    if qpath.startswith("json:"):
        try:
            parsed = json.loads(qpath[5:])
        except ValueError as exc:
            raise ValueError(f"invalid json: filename: {exc}") from exc
        if not isinstance(parsed, dict):
            raise ValueError("a json: filename must hold an object")
        if parsed.setdefault("driver", fmt) != fmt:
            raise ValueError(f"json: filename names driver {parsed['driver']!r}, not {fmt!r}")
        spec = parsed
    elif _has_protocol(qpath):
        spec = {"driver": fmt, "file": _nbd_node(qpath)}
    else:
        # No "driver" for the file node: qemu picks `file` or `host_device` itself, and a nested
        # filename is never parsed for protocol prefixes.
        spec = {"driver": fmt, "file": {"filename": qpath}}
    spec["backing"] = None
    return "json:" + json.dumps(spec, separators=(",", ":"))


def _source_args(path: str, fmt: str, *, allow_uri: bool, no_backing: bool) -> list[str]:
    spec = source_spec(path, fmt, allow_uri=allow_uri, no_backing=no_backing)
    # -f together with a json: driver is redundant, and qemu-img lets -f win; pass one of them.
    return [spec] if no_backing else ["-f", fmt, spec]


# --- running qemu-img --------------------------------------------------------------------------


def _preexec(limits: Limits | None) -> Callable[[], None]:
    # qemu-img dies with us: a killed importer must not leave a convert writing the volume.
    arm = die_with_parent(os.getpid())

    def apply() -> None:
        # Runs in the child between fork and exec: only async-signal-safe-ish C calls here.
        arm()
        if limits is None:
            return
        resource.setrlimit(resource.RLIMIT_AS, (limits.address_space, limits.address_space))
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds))
        # A child killed by a limit would otherwise dump up to `address_space` bytes of core.
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


async def _pump_stdout(
    stream: asyncio.StreamReader,
    on_data: Callable[[bytes], None] | None,
    keep: bytearray | None,
    keep_limit: int,
) -> bool:
    """Read stdout to EOF; returns False if more than `keep_limit` bytes had to be dropped."""
    fits = True
    while data := await stream.read(READ_CHUNK):
        if on_data is not None:
            on_data(data)
        if keep is not None:
            if len(keep) + len(data) > keep_limit:
                fits = False
            else:
                keep += data
    return fits


async def _pump_stderr(stream: asyncio.StreamReader, tail: _StderrTail) -> None:
    while data := await stream.read(READ_CHUNK):
        tail.add(data)


async def _run(
    argv: Sequence[str],
    *,
    limits: Limits | None = None,
    wall_seconds: float | None = None,
    on_stdout: Callable[[bytes], None] | None = None,
    keep_stdout: bool = False,
) -> _Result:
    """Run qemu-img to completion; kill and reap it on timeout, cancellation or callback error."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=_preexec(limits),
        )
    except FileNotFoundError as exc:
        raise PermanentError(f"{argv[0]} not found: {INSTALL_HINT}") from exc
    except PermissionError as exc:
        raise PermanentError(f"cannot run {argv[0]}: {exc}") from exc
    assert proc.stdout is not None
    assert proc.stderr is not None
    kept = bytearray() if keep_stdout else None
    tail = _StderrTail()
    out_task = asyncio.create_task(_pump_stdout(proc.stdout, on_stdout, kept, MAX_INFO_OUTPUT))
    err_task = asyncio.create_task(_pump_stderr(proc.stderr, tail))
    try:
        try:
            async with asyncio.timeout(wall_seconds):
                # Pipes reach EOF when the child exits; then its status is ready.
                fits, _ = await asyncio.gather(out_task, err_task)
                returncode = await proc.wait()
        except TimeoutError:
            raise _TimedOut from None
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        for task in (out_task, err_task):
            if not task.done():
                task.cancel()
        # Let the readers finish (or cancel) so the pipe transports close; their errors are
        # either already raised above or irrelevant after a kill.
        await asyncio.gather(out_task, err_task, return_exceptions=True)
    if not fits:
        raise ToolError(
            f"{argv[0]} printed more than {MAX_INFO_OUTPUT} bytes on stdout",
            argv=argv,
            returncode=returncode,
            stderr=tail.text(),
        )
    return _Result(returncode, bytes(kept or b""), tail.text())


def _last_meaningful_line(stderr: str) -> str | None:
    lines = [line.strip() for line in re.split(r"[\r\n]+", stderr)]
    lines = [line for line in lines if line and not _PROGRESS_RE.search(line.encode())]
    if not lines:
        return None
    # Prefer qemu-img's own error lines over warnings and other chatter: `resize` prints its
    # error first and a warning after it.
    tagged = [line for line in lines if line.startswith("qemu-img:")]
    errors = [line for line in tagged if not line.startswith("qemu-img: warning:")]
    line = (errors or tagged or lines)[-1]
    return line[:1000]


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def _tool_error(argv: Sequence[str], result: _Result, what: str) -> ToolError:
    line = _last_meaningful_line(result.stderr)
    message = line or f"qemu-img {what} {_describe_exit(result.returncode)}"
    return ToolError(message, argv=argv, returncode=result.returncode, stderr=result.stderr)


def _hit_limits(result: _Result) -> bool:
    # Killed by a signal (SIGXCPU/SIGKILL from RLIMIT_CPU, SIGABRT from a failed allocation or
    # thread creation under RLIMIT_AS, SIGSEGV from a crash) or an explicit out-of-memory error.
    return result.returncode < 0 or "Cannot allocate memory" in result.stderr


def _limits_error(what: str, path: str, detail: str, stderr: str) -> FormatError:
    if stderr:
        log.warning("%s exceeded limits path=%s stderr=%r", what, path, stderr[-2000:])
    return FormatError(
        f"qemu-img {what} exceeded its limits on this image ({detail}); "
        f"the image is refused as malformed or hostile: {path}"
    )


async def _run_limited(argv: list[str], what: str, path: str, limits: Limits) -> _Result:
    try:
        result = await _run(argv, limits=limits, wall_seconds=limits.wall_seconds, keep_stdout=True)
    except _TimedOut:
        raise _limits_error(what, path, f"no answer within {limits.wall_seconds:g} s", "") from None
    if result.returncode != 0:
        if _hit_limits(result):
            detail = _describe_exit(result.returncode).replace("was killed", "killed")
            line = _last_meaningful_line(result.stderr)
            raise _limits_error(what, path, f"{detail}: {line}" if line else detail, result.stderr)
        raise _tool_error(argv, result, what)
    return result


def _parse_json(argv: Sequence[str], result: _Result, what: str) -> Mapping[str, Any]:
    try:
        parsed = json.loads(result.stdout)
    except ValueError as exc:
        raise ToolError(
            f"qemu-img {what} printed something that is not JSON: {exc}",
            argv=argv,
            returncode=result.returncode,
            stderr=result.stderr,
        ) from None
    if not isinstance(parsed, dict):
        raise ToolError(
            f"qemu-img {what} printed JSON that is not an object",
            argv=argv,
            returncode=result.returncode,
            stderr=result.stderr,
        )
    return parsed


def _int_field(raw: Mapping[str, Any], key: str, argv: Sequence[str], what: str) -> int:
    value = raw.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ToolError(f"qemu-img {what} JSON has no valid {key!r}: {value!r}", argv=argv)
    return value


# --- commands ----------------------------------------------------------------------------------


async def info(
    path: str, *, fmt: str, limits: Limits = Limits(), allow_uri: bool = False
) -> ImageInfo:
    """`qemu-img info -f <fmt> --output=json <path>` under `limits`.

    `path` is a local file unless `allow_uri` lets an `nbd[+unix|+tcp]://` URI or a `json:` spec
    through. Raises FormatError if qemu-img exceeds its limits, ToolError if it fails.
    """
    _check_format(fmt)
    argv = [QEMU_IMG, "info", "-f", fmt, "--output=json", _qemu_path(path, allow_uri=allow_uri)]
    result = await _run_limited(argv, "info", path, limits)
    raw = _parse_json(argv, result, "info")
    reported = raw.get("format")
    if not isinstance(reported, str):
        raise ToolError(f"qemu-img info JSON has no valid 'format': {reported!r}", argv=argv)
    specific = raw.get("format-specific")
    specific = specific if isinstance(specific, dict) else {}
    data = specific.get("data")
    data_file = data.get("data-file") if isinstance(data, dict) else None
    backing = raw.get("backing-filename") or raw.get("full-backing-filename")
    actual = raw.get("actual-size")
    return ImageInfo(
        format=reported,
        virtual_size=_int_field(raw, "virtual-size", argv, "info"),
        actual_size=actual if isinstance(actual, int) and not isinstance(actual, bool) else None,
        backing_filename=str(backing) if backing is not None else None,
        data_file=str(data_file) if data_file is not None else None,
        format_specific=specific,
        raw=raw,
    )


def build_convert_argv(
    src: str,
    dst: str,
    *,
    src_fmt: str,
    dst_fmt: str = "raw",
    cache: str | None = None,
    src_cache: str | None = None,
    out_of_order_writes: bool = False,
    coroutines: int | None = None,
    target_is_zero: bool = False,
    no_create: bool = False,
    preallocation: str | None = None,
    sparse_size: int | None = None,
    src_is_uri: bool = False,
    no_backing: bool = True,
    progress: bool = False,
) -> list[str]:
    """The argv of `convert`, validated: contradictory options raise ValueError, never run."""
    _check_format(dst_fmt)
    for name, value in (("cache", cache), ("src_cache", src_cache)):
        if value is not None and value not in CACHE_MODES:
            raise ValueError(f"invalid {name} {value!r}; expected one of {sorted(CACHE_MODES)}")
    if preallocation is not None and preallocation not in PREALLOCATION_MODES:
        modes = sorted(PREALLOCATION_MODES)
        raise ValueError(f"invalid preallocation {preallocation!r}; expected one of {modes}")
    if coroutines is not None and not 1 <= coroutines <= MAX_COROUTINES:
        raise ValueError(f"coroutines must be 1..{MAX_COROUTINES}, not {coroutines}")
    if sparse_size is not None and not (
        0 <= sparse_size <= MAX_SPARSE_SIZE and sparse_size % SECTOR == 0
    ):
        raise ValueError(
            f"sparse_size must be a multiple of {SECTOR} in 0..{MAX_SPARSE_SIZE}, not {sparse_size}"
        )
    if target_is_zero and not no_create:
        raise ValueError("target_is_zero needs no_create: qemu-img only trusts an existing target")
    if preallocation is not None and no_create:
        raise ValueError("preallocation is a creation option; it has no effect with no_create")

    argv = [QEMU_IMG, "convert"]
    if progress:
        argv.append("-p")
    if cache is not None:
        argv += ["-t", cache]
    if src_cache is not None:
        argv += ["-T", src_cache]
    if out_of_order_writes:
        argv.append("-W")
    if coroutines is not None:
        argv += ["-m", str(coroutines)]
    if no_create:
        argv.append("-n")
    if target_is_zero:
        argv.append("--target-is-zero")
    if sparse_size is not None:
        argv += ["-S", str(sparse_size)]
    argv += ["-O", dst_fmt]
    if preallocation is not None:
        argv += ["-o", f"preallocation={preallocation}"]
    argv += _source_args(src, src_fmt, allow_uri=src_is_uri, no_backing=no_backing)
    argv.append(_local_path(dst))
    return argv


class _ProgressParser:
    """Turns `-p` output (`    (12.34/100%)\\r`, no newlines) into increasing percentages."""

    def __init__(self, callback: Callable[[float], None]) -> None:
        self._callback = callback
        self._pending = b""
        self.last = -1.0

    def feed(self, data: bytes) -> None:
        buf = self._pending + data
        # Keep an unterminated tail for the next chunk: a report may be split across reads.
        cut = max(buf.rfind(b"\r"), buf.rfind(b"\n"))
        complete, self._pending = buf[: cut + 1], buf[cut + 1 :][-256:]
        for match in _PROGRESS_RE.finditer(complete):
            self.report(float(match.group(1)))

    def report(self, value: float) -> None:
        value = min(max(value, 0.0), 100.0)
        if value > self.last:
            self.last = value
            self._callback(value)


def _target_size(path: str) -> int | None:
    """Bytes of the converted target, for the log line: a file's size or a block device's."""
    try:
        st = os.stat(path)
        if stat.S_ISBLK(st.st_mode):
            fd = os.open(path, os.O_RDONLY)
            try:
                return os.lseek(fd, 0, os.SEEK_END)
            finally:
                os.close(fd)
        return st.st_size
    except OSError:
        return None


async def convert(
    src: str,
    dst: str,
    *,
    src_fmt: str,
    dst_fmt: str = "raw",
    cache: str | None = None,
    src_cache: str | None = None,
    out_of_order_writes: bool = False,
    coroutines: int | None = None,
    target_is_zero: bool = False,
    no_create: bool = False,
    preallocation: str | None = None,
    sparse_size: int | None = None,
    src_is_uri: bool = False,
    no_backing: bool = True,
    progress: Callable[[float], None] | None = None,
    # A parameter rather than the caller's asyncio.timeout(): expiry is reported as a
    # RetryableError naming qemu-img, the one thing a timeout here means.
    timeout: float | None = None,  # noqa: ASYNC109
) -> None:
    """Convert `src` (format forced to `src_fmt`) into `dst`. See `build_convert_argv` for options.

    `progress` is called with increasing percentages (0..100) as qemu-img reports them, and with
    100.0 on success. Raises ToolError on failure, RetryableError on timeout; the caller owns
    removing a partial `dst`.
    """
    argv = build_convert_argv(
        src,
        dst,
        src_fmt=src_fmt,
        dst_fmt=dst_fmt,
        cache=cache,
        src_cache=src_cache,
        out_of_order_writes=out_of_order_writes,
        coroutines=coroutines,
        target_is_zero=target_is_zero,
        no_create=no_create,
        preallocation=preallocation,
        sparse_size=sparse_size,
        src_is_uri=src_is_uri,
        no_backing=no_backing,
        progress=progress is not None,
    )
    parser = _ProgressParser(progress) if progress is not None else None
    log.info("convert start src=%s dst=%s src_fmt=%s dst_fmt=%s", src, dst, src_fmt, dst_fmt)
    log.debug("convert argv=%r", argv)
    started = time.monotonic()
    try:
        result = await _run(
            argv, wall_seconds=timeout, on_stdout=parser.feed if parser is not None else None
        )
    except _TimedOut:
        seconds = time.monotonic() - started
        log.warning("convert timeout src=%s dst=%s seconds=%.3f", src, dst, seconds)
        raise RetryableError(f"qemu-img convert did not finish within {timeout:g} s") from None
    seconds = time.monotonic() - started
    if result.returncode != 0:
        error = _tool_error(argv, result, "convert")
        log.warning(
            "convert failed src=%s dst=%s seconds=%.3f status=%d error=%r",
            src,
            dst,
            seconds,
            result.returncode,
            error.message,
        )
        raise error
    if parser is not None:
        parser.report(100.0)
    size = _target_size(dst)
    rate = (size / _MIB / seconds) if size is not None and seconds > 0 else math.nan
    log.info(
        "convert done src=%s dst=%s bytes=%s seconds=%.3f mib_per_s=%.1f",
        src,
        dst,
        size if size is not None else "unknown",
        seconds,
        rate,
    )


async def resize(
    path: str,
    size: int,
    *,
    fmt: str = "raw",
    preallocation: str | None = None,
    shrink: bool = False,
) -> None:
    """`qemu-img resize -f <fmt> [--preallocation=X] [--shrink] <path> <size>`."""
    _check_format(fmt)
    if size < 0:
        raise ValueError(f"negative size {size}")
    if preallocation is not None and preallocation not in PREALLOCATION_MODES:
        raise ValueError(f"invalid preallocation {preallocation!r}")
    argv = [QEMU_IMG, "resize", "-f", fmt]
    if preallocation is not None:
        argv.append(f"--preallocation={preallocation}")
    if shrink:
        argv.append("--shrink")
    # `--` so that qemu-img cannot read the size (or a path) as an option.
    argv += ["--", _local_path(path), str(size)]
    await _run_checked(argv, "resize")


async def create(
    path: str,
    size: int,
    *,
    fmt: str = "raw",
    preallocation: str | None = None,
) -> None:
    """`qemu-img create -f <fmt> [-o preallocation=X] <path> <size>`."""
    _check_format(fmt)
    if size < 0:
        raise ValueError(f"negative size {size}")
    if preallocation is not None and preallocation not in PREALLOCATION_MODES:
        raise ValueError(f"invalid preallocation {preallocation!r}")
    argv = [QEMU_IMG, "create", "-q", "-f", fmt]
    if preallocation is not None:
        argv += ["-o", f"preallocation={preallocation}"]
    argv += [_local_path(path), str(size)]
    await _run_checked(argv, "create")


async def _run_checked(argv: list[str], what: str) -> None:
    # No timeout of our own: a full preallocation may legitimately take minutes. A caller that
    # wants a bound wraps the call in asyncio.timeout(); cancellation kills and reaps the child.
    started = time.monotonic()
    result = await _run(argv)
    if result.returncode != 0:
        raise _tool_error(argv, result, what)
    log.debug("%s done argv=%r seconds=%.3f", what, argv, time.monotonic() - started)


async def measure(
    src: str,
    *,
    src_fmt: str,
    out_fmt: str = "raw",
    allow_uri: bool = False,
    limits: Limits = Limits(),
) -> Measurement:
    """`qemu-img measure --output=json -O <out_fmt> <src>`: the bytes a converted copy needs.

    Runs under `limits` like `info`, since it parses the same untrusted metadata.
    """
    _check_format(out_fmt)
    argv = [QEMU_IMG, "measure", "--output=json", "-O", out_fmt]
    argv += _source_args(src, src_fmt, allow_uri=allow_uri, no_backing=True)
    result = await _run_limited(argv, "measure", src, limits)
    raw = _parse_json(argv, result, "measure")
    return Measurement(
        required=_int_field(raw, "required", argv, "measure"),
        fully_allocated=_int_field(raw, "fully-allocated", argv, "measure"),
    )


# --- cross-check -------------------------------------------------------------------------------


def cross_check(
    inspected_format: str, inspected_virtual_size: int | None, info: ImageInfo
) -> list[Problem]:
    """Compare what our inspector found with what qemu-img says; every disagreement is a Problem.

    An empty list means the image may be converted. The caller raises UnsafeImageError otherwise.
    """
    problems: list[Problem] = []
    expected = FORMAT_ALIASES.get(inspected_format.lower(), inspected_format.lower())
    if info.format != expected:
        problems.append(
            Problem(
                "format_mismatch",
                f"the inspector found {inspected_format} but qemu-img reads {info.format}",
            )
        )
    if info.backing_filename is not None or "backing-filename-format" in info.raw:
        problems.append(
            Problem("backing_file", f"image has a backing file {info.backing_filename!r}")
        )
    data = info.format_specific.get("data")
    data = data if isinstance(data, dict) else {}
    if info.data_file is not None or "data-file" in data:
        problems.append(Problem("data_file", f"image has an external data file {info.data_file!r}"))
    if info.format == "vmdk" or info.format_specific.get("type") == "vmdk":
        problems.extend(_vmdk_problems(info, data))
    if inspected_virtual_size is not None and inspected_virtual_size != info.virtual_size:
        problems.append(
            Problem(
                "virtual_size_mismatch",
                f"the inspector found a virtual size of {inspected_virtual_size} bytes but "
                f"qemu-img reads {info.virtual_size}",
            )
        )
    return problems


def _vmdk_problems(info: ImageInfo, data: Mapping[str, Any]) -> list[Problem]:
    problems: list[Problem] = []
    create_type = data.get("create-type")
    if create_type not in VMDK_SAFE_CREATE_TYPES:
        problems.append(
            Problem(
                "vmdk_extent",
                f"vmdk create-type {create_type!r} is not one of "
                f"{', '.join(sorted(VMDK_SAFE_CREATE_TYPES))}",
            )
        )
    extents = data.get("extents")
    if not isinstance(extents, list) or not extents:
        problems.append(Problem("vmdk_extent", "vmdk lists no extents"))
        return problems
    itself = info.raw.get("filename")
    for extent in extents:
        name = extent.get("filename") if isinstance(extent, dict) else None
        if name != itself:
            problems.append(Problem("vmdk_extent", f"vmdk extent {name!r} is not the image itself"))
    return problems
