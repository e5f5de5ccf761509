"""The import target: how much space it has, and a sparse streaming writer into it.

Filesystem volumes get `/data/disk.img` (a raw file, sparse unless preallocation is asked);
Block volumes get the device itself, never resized, zeros written where the image has zeros
because a reused device may hold old data. Space follows CDI's formula (reference §5.5, §5.7).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

from cdi.api import usable_size
from cdi.image.errors import ImageTooLargeError
from importer.settings import ImporterSettings

log = logging.getLogger(__name__)

ZERO_CHUNK = bytes(1 << 20)


@dataclass(frozen=True, slots=True)
class TargetSpace:
    path: Path
    is_block: bool
    usable: int  # the largest virtual size that fits
    resize_to: int | None  # Filesystem: grow the raw image to this; None: leave it as it is


def device_size(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def measure_target(settings: ImporterSettings, *, path: Path | None = None) -> TargetSpace:
    paths = settings.paths
    if paths.is_block:
        size = device_size(paths.block_device)
        return TargetSpace(paths.block_device, True, size, None)
    target = path or paths.disk_image
    stat = os.statvfs(target.parent)
    free = stat.f_bavail * stat.f_frsize
    if target.exists():  # it is replaced, so its blocks count as free
        free += target.stat().st_blocks * 512
    available = min(free, settings.image_size) if settings.image_size else free
    usable = usable_size(available, settings.filesystem_overhead)
    # Without IMPORTER_IMAGE_SIZE (a run by hand) the image keeps its own size.
    resize_to = usable if settings.image_size else None
    return TargetSpace(target, False, usable, resize_to)


class StreamWriter:
    """Writes a stream at increasing offsets, never past `limit`; zero chunks become holes.

    Writing happens in a thread of its own behind a small bounded queue, so that decompressing
    (in the caller's thread) and writing overlap on two cores; both release the GIL. Every
    WRITEBACK_WINDOW bytes the previous window is handed to the kernel's writeback
    (fadvise DONTNEED), so the final fsync has little left to do and the page cache is not
    filled with a whole disk.
    """

    QUEUE_DEPTH = 4  # chunks in flight: bounded memory, enough to smooth out write stalls
    WRITEBACK_WINDOW = 64 << 20

    def __init__(
        self, path: Path, *, limit: int, is_block: bool, sparse: bool, durable: bool = True
    ) -> None:
        self.path = path
        self.limit = limit
        self.is_block = is_block
        self.sparse = sparse and not is_block
        # A scratch copy is read back at once by qemu-img and then deleted: neither pushed out
        # of the page cache as it is written nor fsync'd (measured: a 1 GiB qcow2 upload spent
        # ~0.5 s flushing a file it then read from disk).
        self.durable = durable
        self.offset = 0
        flags = os.O_WRONLY | (0 if is_block else os.O_CREAT | os.O_TRUNC)
        self._fd = os.open(path, flags, 0o660)
        self._queue: queue.Queue[tuple[int, bytes] | None] = queue.Queue(self.QUEUE_DEPTH)
        self._error: BaseException | None = None
        self._abort = False
        self._thread = threading.Thread(target=self._run, name="stream-writer", daemon=True)
        self._thread.start()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            raise self._error
        # The writer thread needs bytes it owns; and bytes == bytes is a memcmp, while a
        # memoryview compared with bytes goes item by item (80x slower, measured).
        chunk = data if isinstance(data, bytes) else bytes(data)
        end = self.offset + len(chunk)
        if end > self.limit:
            raise ImageTooLargeError(end, self.limit)
        step = len(ZERO_CHUNK)
        for start in range(0, len(chunk), step):
            piece = chunk if len(chunk) <= step else chunk[start : start + step]
            if not (self.sparse and piece == ZERO_CHUNK[: len(piece)]):
                self._put((self.offset + start, piece))
        self.offset = end

    def _put(self, item: tuple[int, bytes] | None) -> None:
        while True:
            if self._error is not None:
                raise self._error
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        flushed = 0
        try:
            while (item := self._queue.get()) is not None:
                if self._abort:
                    continue
                offset, data = item
                written = 0
                while written < len(data):
                    written += os.pwrite(self._fd, data[written:], offset + written)
                window_end = (offset + len(data)) // self.WRITEBACK_WINDOW * self.WRITEBACK_WINDOW
                if self.durable and window_end - self.WRITEBACK_WINDOW > flushed:
                    os.posix_fadvise(
                        self._fd,
                        flushed,
                        window_end - self.WRITEBACK_WINDOW - flushed,
                        os.POSIX_FADV_DONTNEED,
                    )
                    flushed = window_end - self.WRITEBACK_WINDOW
        except BaseException as err:  # reported to the caller's thread at its next call
            self._error = err

    def _stop_thread(self) -> None:
        while self._thread.is_alive():
            try:
                self._queue.put(None, timeout=0.5)
                break
            except queue.Full:
                continue
        self._thread.join()

    def finish(self, *, preallocate: bool = False) -> int:
        self._stop_thread()
        if self._error is not None:
            raise self._error
        if not self.is_block:
            os.ftruncate(self._fd, self.offset)  # trailing holes count too
            if preallocate and self.offset:
                os.posix_fallocate(self._fd, 0, self.offset)
        if self.durable:
            os.fsync(self._fd)
        self.close()
        return self.offset

    def close(self) -> None:
        self._abort = True
        self._stop_thread()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def supports_direct_io(path: Path) -> bool:
    """Can `path` (a device, or files in a directory) be opened with O_DIRECT? tmpfs says no."""
    if not path.is_dir():
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        except OSError:
            return False
        return True
    probe = path / f".cdi-direct-io-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    probe.unlink(missing_ok=True)
    return True


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
