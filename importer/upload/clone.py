"""Clone streams into the upload server's volume: the target side of a host-assisted clone.

A POST to /v1beta1/upload or /v1alpha1/upload that carries `x-cdi-content-type` is a clone
stream, as CDI's upload server decides (reference §7.3):

    blockdevice-clone + x-cdi-clone-encoding: extents-v1
        our sparse extent stream (cdi-cloner): only data moves, holes stay holes
    blockdevice-clone without an encoding
        raw volume bytes, zero blocks skipped on the target (CDI's stream minus its snappy
        framing, which we do not speak and refuse by its stream identifier)
    filesystem-clone
        a tar of the source volume's files: extracted (holes kept) into a Filesystem volume;
        for a Block volume, the member named like disk.img is written to the device
    x-cdi-clone-compression: zstd
        any of the above as one zstd stream

The extent stream and the headers are defined once, in `cdi.api.clonestream`.

Everything no record covers reads as zeros on the target: a fresh disk.img is sparse; on a
device (or the file standing in for one) the gaps are zeroed with fallocate (punch hole, or
zero range when preallocation is asked), zero writes where that is not supported.

The target's room is checked from the stream's header (or Content-Length) before anything is
written: a source larger than the target is a 400 naming both sizes. A stream that is malformed
or cut is a 400 and what it wrote to disk.img is removed, so the server takes the next attempt
cleanly. The body is read by a worker thread: straight from the socket when the upload
server's blocking front received it (the usual case), else through a blocking bridge to the
event loop (a request aiohttp served). So the parsing, zstd and tar code is plain synchronous
code, and memory stays at a few READ_SIZE buffers whatever the volume size.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import errno
import io
import logging
import os
import tarfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final, Protocol, cast

import aiohttp
import zstandard
from aiohttp import StreamReader, web
from aiohttp.http_exceptions import HttpProcessingError

from cdi.api import MESSAGE_CLONE_COMPLETE, CloneContentType, ContentType, TerminationMessage, env
from cdi.api.clonestream import (
    COMPRESSION_HEADER,
    CONTENT_TYPE_HEADER,
    ENCODING_HEADER,
    EXTENTS_V1,
    HEADER,
    MAGIC,
    RECORD,
    ZSTD,
)
from importer.archive import extract_tar, remove_created
from importer.metrics import ImportProgress
from importer.target import TargetSpace, device_size, measure_target
from importer.upload.settings import UploadSettings

log = logging.getLogger(__name__)

CLONE_PATHS: Final = frozenset({"/v1beta1/upload", "/v1alpha1/upload"})

#: The stream identifier chunk that starts every snappy framed stream (CDI's cloner sends one).
SNAPPY_STREAM: Final = b"\xff\x06\x00\x00sNaPpY"

READ_SIZE: Final = 1 << 20
DIRECT_BUFFER: Final = 64 << 10
WRITEBACK_WINDOW: Final = 64 << 20
ZERO_BLOCK: Final = 64 << 10
STALL_TIMEOUT: Final = 600.0  # seconds without a byte before a clone is given up, as CDI's
GIB: Final = 1 << 30

_ZERO_BLOCK = bytes(ZERO_BLOCK)
_ZERO_WRITE = bytes(READ_SIZE)
_BODY_ERRORS = (
    OSError,
    asyncio.IncompleteReadError,
    HttpProcessingError,
    aiohttp.ClientPayloadError,
    ValueError,
)

FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02
FALLOC_FL_ZERO_RANGE: Final = 0x10


class CloneRefused(Exception):
    """A clone stream the target does not take: HTTP 400 with this text."""

    status = 400


class _Cut(Exception):
    """The request body broke off (connection lost, bad framing, stalled)."""


@dataclass(frozen=True, slots=True)
class ClonePlan:
    content_type: CloneContentType
    extents: bool  # our extent stream, else raw bytes (blockdevice-clone only)
    zstd: bool
    length: int | None  # of the decoded stream, when the request says (raw, uncompressed)


def is_clone(path: str, headers: Mapping[str, str]) -> bool:
    """CDI's rule: the header `x-cdi-content-type` on the sync upload path makes a clone."""
    return path in CLONE_PATHS and CONTENT_TYPE_HEADER in headers


def plan(headers: Mapping[str, str], content_length: int | None) -> ClonePlan:
    raw_type = headers.get(CONTENT_TYPE_HEADER, "").strip()
    try:
        content_type = CloneContentType(raw_type)
    except ValueError:
        allowed = ", ".join(t.value for t in CloneContentType)
        raise CloneRefused(
            f"unknown clone content type {CONTENT_TYPE_HEADER}: {raw_type!r} (one of {allowed})"
        ) from None
    encoding = headers.get(ENCODING_HEADER)
    if encoding is not None and encoding.strip() != EXTENTS_V1:
        raise CloneRefused(f"unknown clone encoding {ENCODING_HEADER}: {encoding!r}")
    if encoding is not None and content_type is CloneContentType.FILESYSTEM:
        raise CloneRefused(f"{ENCODING_HEADER} applies to blockdevice-clone streams only")
    compression = headers.get(COMPRESSION_HEADER)
    if compression is not None and compression.strip().lower() not in (ZSTD, "none", ""):
        raise CloneRefused(
            f"unknown clone compression {COMPRESSION_HEADER}: {compression!r} (zstd or none)"
        )
    zstd = compression is not None and compression.strip().lower() == ZSTD
    return ClonePlan(
        content_type=content_type,
        extents=encoding is not None,
        zstd=zstd,
        length=None if zstd else content_length,
    )


class CloneRequest(Protocol):
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def content_length(self) -> int | None: ...
    @property
    def content(self) -> Any: ...


async def receive_clone(
    request: web.Request | CloneRequest, settings: UploadSettings, progress: ImportProgress
) -> TerminationMessage:
    """Write the clone stream of `request` into the volume; CloneRefused (400) when the
    stream is refused, malformed or cut; other errors are the upload server's to classify."""
    clone = plan(request.headers, request.content_length)
    blocking = getattr(request.content, "blocking", None)  # a body the thread reads itself
    body: _Counted = (
        _DirectBody(blocking, progress)
        if blocking is not None
        else _Body(request.content, asyncio.get_running_loop(), progress)
    )
    log.info(
        "clone start content_type=%s extents=%s zstd=%s length=%s block=%s",
        clone.content_type,
        clone.extents,
        clone.zstd,
        clone.length,
        settings.is_block,
    )
    started = time.monotonic()
    written = await asyncio.to_thread(_receive, clone, body, settings, progress)
    seconds = time.monotonic() - started
    log.info(
        "clone received wire_bytes=%d stream_bytes=%d seconds=%.3f mib_per_s=%.1f",
        body.received,
        written,
        seconds,
        body.received / (1 << 20) / max(seconds, 1e-6),
    )
    progress.set_percent(100.0)
    return TerminationMessage(
        message=MESSAGE_CLONE_COMPLETE, preallocation_applied=settings.preallocation
    )


# --- the body, as a blocking reader for the receiving thread --------------------------------------


class _Reader(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class _Counted(_Reader, Protocol):
    received: int


class _BlockingBody(Protocol):
    def readinto(self, view: memoryview) -> int: ...


class _RawBody(io.RawIOBase):
    def __init__(self, body: _BlockingBody) -> None:
        super().__init__()
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        with memoryview(buffer) as view:
            return self._body.readinto(view.cast("B"))


class _DirectBody:
    """A body the receiving thread reads from the socket itself (the upload server's front).
    Reads of READ_SIZE are decrypted straight into the bytes they return (a BufferedReader
    smaller than them passes them through), with no copy in between."""

    def __init__(self, body: _BlockingBody, progress: ImportProgress) -> None:
        self._file = io.BufferedReader(_RawBody(body), DIRECT_BUFFER)
        self._progress = progress
        self.received = 0

    def read(self, size: int = -1, /) -> bytes:
        size = READ_SIZE if size < 0 else min(size, READ_SIZE)
        try:
            data = self._file.read(size)
        except _BODY_ERRORS as err:
            raise _Cut(str(err) or type(err).__name__) from err
        self.received += len(data)
        self._progress.add_bytes(len(data))
        return data


class _Body:
    """The request body for the receiving thread. aiohttp's reader belongs to the event loop,
    so each read is one hop to it; a read returns whatever arrived, up to `size`."""

    def __init__(
        self, content: StreamReader, loop: asyncio.AbstractEventLoop, progress: ImportProgress
    ):
        self._content = content
        self._loop = loop
        self._progress = progress
        self.received = 0

    def read(self, size: int = -1, /) -> bytes:
        size = READ_SIZE if size < 0 else min(size, READ_SIZE)
        future = asyncio.run_coroutine_threadsafe(self._content.read(size), self._loop)
        try:
            data = future.result(STALL_TIMEOUT)
        except TimeoutError:  # before OSError: it is one
            future.cancel()
            raise _Cut(f"no data for {STALL_TIMEOUT:.0f} s") from None
        except concurrent.futures.CancelledError:
            raise _Cut("the server is stopping") from None
        except _BODY_ERRORS as err:
            raise _Cut(str(err) or type(err).__name__) from err
        self.received += len(data)
        self._progress.add_bytes(len(data))
        return data


class _Zstd:
    """The body's zstd stream, decompressed as it is read; one frame, as the cloner sends."""

    def __init__(self, body: _Reader) -> None:
        # zstandard needs only read(); its annotation asks for a whole IO.
        source = cast(BinaryIO, body)
        self._reader = zstandard.ZstdDecompressor().stream_reader(source, read_size=READ_SIZE)

    def read(self, size: int = -1, /) -> bytes:
        try:
            data: bytes = self._reader.read(READ_SIZE if size < 0 else size)
        except zstandard.ZstdError as err:
            raise CloneRefused(f"the zstd clone stream is corrupt: {err}") from None
        return data


class _Stream:
    """The decoded clone stream, counting what it hands out (for "ended early after N")."""

    def __init__(self, reader: _Reader) -> None:
        self._reader = reader
        self.position = 0

    def read(self, size: int = -1, /) -> bytes:
        try:
            data = self._reader.read(size)
        except _Cut as err:
            raise self.early(str(err)) from None
        self.position += len(data)
        return data

    def read_exact(self, size: int) -> bytes:
        data = self.read(size)
        if len(data) == size:
            return data
        parts = [data]
        got = len(data)
        while got < size:
            more = self.read(size - got)
            if not more:
                raise self.early()
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def read_upto(self, size: int) -> bytes:
        """`size` bytes, or fewer when the stream ends first."""
        parts: list[bytes] = []
        got = 0
        while got < size and (more := self.read(size - got)):
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def drain(self) -> None:
        while self.read(READ_SIZE):
            pass

    def early(self, why: str | None = None) -> CloneRefused:
        detail = f" ({why})" if why else ""
        return CloneRefused(f"the clone stream ended early after {self.position} bytes{detail}")


# --- the receiving thread ------------------------------------------------------------------------


def _receive(
    clone: ClonePlan, body: _Reader, settings: UploadSettings, progress: ImportProgress
) -> int:
    wire = _Stream(body)
    stream = _Stream(_Zstd(body)) if clone.zstd else wire
    if clone.content_type is CloneContentType.FILESYSTEM:
        if settings.is_block:
            _tar_to_device(stream, wire, settings)
        else:
            _extract(stream, wire, settings)
    elif clone.extents:
        _extents(stream, wire, settings, progress)
    else:
        _raw(stream, wire, settings, clone.length, progress)
    return stream.position


def _space(settings: UploadSettings) -> TargetSpace:
    return measure_target(settings.importer_settings(ContentType.KUBEVIRT))


def _too_large(source: int, room: int, *, at_least: bool = False) -> CloneRefused:
    more = "more than " if at_least else ""
    return CloneRefused(
        f"the clone source is {more}{source} bytes ({source / GIB:.2f} GiB) but the target "
        f"holds only {room} bytes ({room / GIB:.2f} GiB); request a larger target"
    )


def _finish_stream(stream: _Stream, wire: _Stream) -> None:
    """Read the body to its end: a cut after the last byte we needed is still a cut."""
    stream.drain()
    if wire is not stream:
        wire.drain()  # after the zstd frame: nothing, or whatever the client added


def _extents(
    stream: _Stream, wire: _Stream, settings: UploadSettings, progress: ImportProgress
) -> None:
    magic, total = HEADER.unpack(stream.read_exact(HEADER.size))
    if magic != MAGIC:
        raise CloneRefused(
            f"malformed clone stream: it starts with {magic!r}, not {MAGIC!r} ({EXTENTS_V1})"
        )
    space = _space(settings)
    if total > space.usable:
        raise _too_large(total, space.usable)
    disk = _Disk(space.path, is_block=space.is_block, preallocate=settings.preallocation)
    try:
        end = 0  # where the previous record ended
        while True:
            offset, length = RECORD.unpack(stream.read_exact(RECORD.size))
            if offset == total and length == 0:
                break
            _check_record(offset, length, end, total)
            disk.zero(end, offset - end)
            position = offset
            while position < offset + length:
                chunk = stream.read(min(READ_SIZE, offset + length - position))
                if not chunk:
                    raise stream.early()
                disk.put(position, chunk)
                position += len(chunk)
            end = offset + length
            progress.set_percent(100.0 * end / total)
        disk.zero(end, total - end)
        if stream.read(1):
            raise CloneRefused("malformed clone stream: data after the end marker")
        _finish_stream(stream, wire)
        disk.finish(total, grow_to=space.resize_to)
    except BaseException:
        disk.abandon()
        raise
    log.info("clone extents written total=%d path=%s", total, space.path)


def _check_record(offset: int, length: int, end: int, total: int) -> None:
    if offset < end:
        raise CloneRefused(
            f"malformed clone stream: the record at offset {offset} starts before the previous "
            f"one ended ({end}); records must not overlap or go back"
        )
    if length == 0:
        raise CloneRefused(
            f"malformed clone stream: empty record at offset {offset} (only the end marker, "
            f"at the total size {total}, is empty)"
        )
    if offset + length > total:
        raise CloneRefused(
            f"malformed clone stream: the record [{offset}, {offset + length}) goes past the "
            f"source's size {total}"
        )


def _raw(
    stream: _Stream,
    wire: _Stream,
    settings: UploadSettings,
    length: int | None,
    progress: ImportProgress,
) -> None:
    space = _space(settings)
    if length is not None and length > space.usable:
        raise _too_large(length, space.usable)
    data = stream.read_upto(len(SNAPPY_STREAM))
    if data.startswith(SNAPPY_STREAM):
        raise CloneRefused(
            "snappy-framed clone streams (CDI's cloner) are not supported; use cdi-cloner"
        )
    disk = _Disk(space.path, is_block=space.is_block, preallocate=settings.preallocation)
    try:
        position = 0
        while data:
            if position + len(data) > space.usable:
                raise _too_large(position + len(data), space.usable, at_least=True)
            disk.put(position, data)
            position += len(data)
            if length:
                progress.set_percent(100.0 * position / length)
            data = stream.read(READ_SIZE)
        if length is not None and position != length:
            raise stream.early(f"Content-Length is {length}")
        _finish_stream(stream, wire)
        disk.finish(position, grow_to=space.resize_to)
    except BaseException:
        disk.abandon()
        raise
    log.info("clone raw written size=%d path=%s", position, space.path)


def _extract(stream: _Stream, wire: _Stream, settings: UploadSettings) -> None:
    data_dir = settings.paths.data_dir
    vfs = os.statvfs(data_dir)
    limit = vfs.f_bavail * vfs.f_frsize
    if settings.image_size:
        limit = min(limit, settings.image_size)
    created: list[Path] = []
    try:
        # Python's tarfile reads GNU sparse members and extract_tar writes them with their
        # holes (it seeks over them), so a sparse file stays sparse; extract_tar refuses names
        # and links that leave the volume, as for archive imports.
        extract_tar(cast(BinaryIO, stream), data_dir, limit=limit, created=created)
        _finish_stream(stream, wire)
        _syncfs(data_dir)
    except BaseException:
        remove_created(created)
        raise
    log.info("clone archive extracted entries=%d dir=%s", len(created), data_dir)


def _tar_to_device(stream: _Stream, wire: _Stream, settings: UploadSettings) -> None:
    device = settings.paths.block_device
    room = device_size(device)
    disk: _Disk | None = None
    position = 0
    try:
        with tarfile.open(fileobj=cast(BinaryIO, stream), mode="r|") as tar:
            for member in tar:
                if not (member.isfile() and env.DISK_IMAGE_NAME in member.name):
                    continue
                if member.size > room:
                    raise _too_large(member.size, room)
                disk = _Disk(device, is_block=True, preallocate=settings.preallocation)
                data = tar.extractfile(member)
                assert data is not None  # a regular file
                position = 0
                while chunk := data.read(READ_SIZE):
                    disk.put(position, chunk)
                    position += len(chunk)
                break
    except tarfile.TarError as err:
        if disk is not None:
            disk.abandon()
        raise CloneRefused(
            f"the filesystem clone stream is not a valid tar archive: {err}"
        ) from None
    except BaseException:
        if disk is not None:
            disk.abandon()
        raise
    if disk is None:
        raise CloneRefused(
            f"the filesystem clone stream holds no {env.DISK_IMAGE_NAME} for the Block target"
        )
    try:
        _finish_stream(stream, wire)
        disk.finish(position, grow_to=None)
    except BaseException:
        disk.abandon()
        raise


# --- the target --------------------------------------------------------------------------------


class _Disk:
    """disk.img (created fresh, so sparse) or the device, written at given offsets.

    `put` leaves all-zero blocks out; on a Filesystem target they stay holes of the fresh file,
    on a Block target `zero` makes them read as zeros (a reused device holds old data).
    Writeback of what is written starts every WRITEBACK_WINDOW (fadvise DONTNEED, as the
    importer's StreamWriter does), so the final fsync has little left: measured, it took 0.47 s
    of a 1 GiB clone when all of it was left to the end.
    """

    def __init__(self, path: Path, *, is_block: bool, preallocate: bool) -> None:
        self.path = path
        self.is_block = is_block
        self.preallocate = preallocate
        flags = os.O_WRONLY | os.O_CLOEXEC | (0 if is_block else os.O_CREAT | os.O_TRUNC)
        self._fd = os.open(path, flags, env.DISK_IMAGE_MODE)
        self._zero_start = self._zero_end = 0  # a pending zero range, joined with the next
        self._flushed = 0  # writeback was started for everything before this offset

    def put(self, offset: int, data: bytes) -> None:
        for start, end, is_zero in _runs(offset, data):
            if is_zero:
                self.zero(offset + start, end - start)
            else:
                piece = data if start == 0 and end == len(data) else data[start:end]
                self._pwrite(offset + start, piece)

    def zero(self, offset: int, length: int) -> None:
        if length <= 0 or not self.is_block:
            return  # a fresh file reads zeros wherever nothing was written
        if offset == self._zero_end and self._zero_end > self._zero_start:
            self._zero_end += length
            return
        self._flush_zero()
        self._zero_start, self._zero_end = offset, offset + length

    def finish(self, size: int, *, grow_to: int | None) -> None:
        self._flush_zero()
        if not self.is_block:
            final = max(size, grow_to or 0)  # raw: growing is a truncate up, as resize does
            os.ftruncate(self._fd, final)
            if self.preallocate and final:
                os.posix_fallocate(self._fd, 0, final)
        os.fsync(self._fd)
        self._close()
        if not self.is_block:
            _fsync_dir(self.path.parent)

    def abandon(self) -> None:
        """After a failure: close, and remove disk.img (a device stays as it is)."""
        self._close()
        if not self.is_block:
            self.path.unlink(missing_ok=True)

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _pwrite(self, offset: int, data: bytes | memoryview) -> None:
        self._flush_zero()
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, offset)
            view = view[written:]
            offset += written
        self._start_writeback(offset)

    def _start_writeback(self, end: int) -> None:
        """Hand what lies a window behind `end` to the kernel's writeback (it is not waited
        for; the last window stays cached for the writes still coming near it)."""
        upto = (end // WRITEBACK_WINDOW - 1) * WRITEBACK_WINDOW
        if upto > self._flushed:
            os.posix_fadvise(self._fd, self._flushed, upto - self._flushed, os.POSIX_FADV_DONTNEED)
            self._flushed = upto

    def _flush_zero(self) -> None:
        start, end = self._zero_start, self._zero_end
        self._zero_start = self._zero_end = 0
        if end <= start:
            return
        # Punching keeps a thin device (or the file standing in for one) thin; with
        # preallocation the blocks stay allocated (zero range). Either reads back as zeros; on a
        # real block device the kernel turns both into a zero-out (BLKZEROOUT's work) and
        # answers EOPNOTSUPP where it cannot guarantee zeros, and then we write them.
        mode = FALLOC_FL_KEEP_SIZE | (
            FALLOC_FL_ZERO_RANGE if self.preallocate else FALLOC_FL_PUNCH_HOLE
        )
        if _fallocate(self._fd, mode, start, end - start):
            return
        position = start
        while position < end:
            length = min(READ_SIZE, end - position)
            self._pwrite_zero(position, length)
            position += length

    def _pwrite_zero(self, offset: int, length: int) -> None:
        view = memoryview(_ZERO_WRITE)[:length]
        while view:
            written = os.pwrite(self._fd, view, offset)
            view = view[written:]
            offset += written


def _runs(offset: int, data: bytes) -> Iterator[tuple[int, int, bool]]:
    """(start, end, all zero) runs of `data` in blocks of ZERO_BLOCK aligned to the target's
    offsets. `startswith` over a range is a memcmp in place (a memoryview would compare item
    by item, a slice would be a copy)."""
    size = len(data)
    run_start, run_zero = 0, False
    position = 0
    while position < size:
        block_end = min(size, (offset + position) // ZERO_BLOCK * ZERO_BLOCK + ZERO_BLOCK - offset)
        length = block_end - position
        zeros = _ZERO_BLOCK if length == ZERO_BLOCK else bytes(length)
        is_zero = data.startswith(zeros, position, block_end)
        if position == 0:
            run_zero = is_zero
        elif is_zero != run_zero:
            yield run_start, position, run_zero
            run_start, run_zero = position, is_zero
        position = block_end
    if size:
        yield run_start, size, run_zero


# --- system calls the os module lacks ------------------------------------------------------------


def _libc_function(name: str) -> Any:
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None


_FALLOCATE = _libc_function("fallocate64") or _libc_function("fallocate")
if _FALLOCATE is not None:
    _FALLOCATE.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    _FALLOCATE.restype = ctypes.c_int
_SYNCFS = _libc_function("syncfs")
if _SYNCFS is not None:
    _SYNCFS.argtypes = [ctypes.c_int]
    _SYNCFS.restype = ctypes.c_int


def _fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """fallocate(2) with `mode`; False where the file or device does not support it (the caller
    then writes zeros), an OSError for real failures."""
    if _FALLOCATE is None:
        return False
    if _FALLOCATE(fd, mode, offset, length) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS, errno.ENODEV):
        return False
    raise OSError(code, os.strerror(code))


def _syncfs(directory: Path) -> None:
    """Flush the volume's filesystem once, instead of an fsync per extracted file."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _SYNCFS is None or _SYNCFS(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
