"""What goes on the wire: the source as byte chunks, made in a reader thread ahead of the sender.

kubevirt content   the disk image or the device as an extent stream (`cloner.extents`)
archive content    a GNU tar of the volume's entries (all but lost+found), holes kept, made by
                   `tar -S --hole-detection=seek` (GNU tar knows every filesystem's holes)
zstd               either of them as one zstd stream

Reading, zero detection and compression run in a reader thread behind `Body`, up to READ_AHEAD
chunks ahead of the thread that sends them, so the source is read while earlier chunks are being
encrypted and sent; memory stays at a few chunks (READ_SIZE each at most) whatever the volume
size.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

import zstandard

from cdi.image.lifetime import die_with_parent
from cloner import extents
from cloner.errors import CloneError
from cloner.metrics import CloneProgress

log = logging.getLogger(__name__)

ZSTD_LEVEL: Final = 3  # zstd's default: far faster than the network, most of the gain
TAR_READ: Final = 1 << 20
LOST_AND_FOUND: Final = "lost+found"
# An empty tar (two zero blocks, padded to GNU tar's 10 KiB record): what tar would write if it
# did not refuse to create an empty archive.
EMPTY_TAR: Final = bytes(10240)
# Chunks made ahead of the sender (a record header and its data are two): about two data pieces.
READ_AHEAD: Final = 4


@dataclass(slots=True)
class Counts:
    wire: int = 0  # body bytes handed to the connection (after compression)
    data: int = 0  # source bytes carried: extent data, or the tar stream
    size: int = 0  # kubevirt: the source's size; archive: bytes its files occupy


class Source(Protocol):
    def chunks(self, counts: Counts, progress: CloneProgress) -> Iterator[bytes]: ...

    def abort(self) -> None:
        """Unblock a read in progress (called from another thread than the reader's)."""

    def close(self) -> None: ...


class DiskSource:
    """A disk image file or a block device, opened read-only: the source is never written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise CloneError(f"cannot open the clone source {path}: {err.strerror}") from None
        try:
            self.size = extents.source_size(self.fd)
            self.seek_data = extents.has_holes_api(self.fd)
            self.data = extents.data_bytes(self.fd, self.size, seek_data=self.seek_data)
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except OSError as err:
            self.close()
            raise CloneError(f"cannot read the clone source {path}: {err}") from None

    def chunks(self, counts: Counts, progress: CloneProgress) -> Iterator[bytes]:
        counts.size = self.size
        scanned = 0

        def on_scanned(length: int) -> None:
            nonlocal scanned
            scanned += length
            if self.data:
                progress.set_percent(100.0 * scanned / self.data)

        def on_data(length: int) -> None:
            counts.data += length

        try:
            yield from extents.encode(
                self.fd,
                self.size,
                seek_data=self.seek_data,
                on_scanned=on_scanned,
                on_data=on_data,
            )
        except OSError as err:
            raise CloneError(f"cannot read the clone source {self.path}: {err}") from None
        progress.set_percent(100.0)

    def abort(self) -> None:
        pass  # a read of a local file or device finishes by itself

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ArchiveSource:
    """`tar -c` of the mounted volume, running as a child that dies with us."""

    def __init__(self, mount_point: Path) -> None:
        self.mount_point = mount_point
        try:
            names = sorted(n for n in os.listdir(mount_point) if n != LOST_AND_FOUND)
        except OSError as err:
            raise CloneError(f"cannot list the clone source {mount_point}: {err}") from None
        self.allocated = _allocated(mount_point)
        self.proc: subprocess.Popen[bytes] | None = None
        if not names:
            return
        # "./name": a name starting with "-" stays a name. --format=gnu: the sparse members
        # Python's tarfile (the receiver) reads, holes included.
        argv = [
            "tar",
            "-C",
            str(mount_point),
            "--format=gnu",
            "-cS",
            "--hole-detection=seek",
            "-f",
            "-",
            *(f"./{name}" for name in names),
        ]
        log.info("archive start entries=%d allocated=%d", len(names), self.allocated)
        try:
            # Started from the event loop's thread, which outlives it (the death signal follows
            # the forking thread); die_with_parent's preexec step is async-signal-safe.
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                preexec_fn=die_with_parent(os.getpid()),  # noqa: PLW1509
            )
        except OSError as err:
            raise CloneError(f"cannot run tar: {err}") from None

    def chunks(self, counts: Counts, progress: CloneProgress) -> Iterator[bytes]:
        counts.size = self.allocated
        if self.proc is None:
            counts.data = len(EMPTY_TAR)
            progress.set_percent(100.0)
            yield EMPTY_TAR
            return
        assert self.proc.stdout is not None
        out = self.proc.stdout.fileno()
        # The last chunk is held back until tar's exit status is known: a failed tar must end
        # in a cut stream, never in a complete-looking archive the receiver would accept.
        held = b""
        while chunk := os.read(out, TAR_READ):
            counts.data += len(chunk)
            if self.allocated:
                progress.set_percent(100.0 * counts.data / self.allocated)
            if held:
                yield held
            held = chunk
        code = self.proc.wait()
        if code not in (0, 1):  # 1: "some files differ" (changed while read), still an archive
            raise CloneError(f"tar of {self.mount_point} failed with exit status {code}")
        if code == 1:
            log.warning("tar: some files changed while they were read")
        progress.set_percent(100.0)
        if held:
            yield held

    def abort(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            if self.proc.stdout is not None:
                self.proc.stdout.close()


def zstd_chunks(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """`chunks` as one zstd frame (a streaming compressor: nothing is held but its window)."""
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj()
    for chunk in chunks:
        if out := compressor.compress(chunk):
            yield out
    yield compressor.flush()


class BodyStopped(Exception):
    """The body was stopped before its end: the clone was cancelled."""


class Body:
    """The request body: `chunks()` for the sending thread, `close()` by the owner afterwards.

    A reader thread makes the chunks up to READ_AHEAD ahead of the connection, so the source is
    read (and compressed) while earlier chunks are encrypted and sent. A failure there is kept in
    `failure` and raised from `chunks()`: the sender must then cut the stream, never end it as a
    complete one. `finished` says the sender took the last chunk.
    """

    def __init__(self, chunks: Iterator[bytes], counts: Counts, abort: Callable[[], None]) -> None:
        self._chunks = chunks
        self._counts = counts
        self._abort = abort
        # bytes: a chunk; None: the end; an exception: the source failed.
        self._ready: deque[bytes | BaseException | None] = deque()
        self._changed = threading.Condition()
        self._stopped = False
        self._reader: threading.Thread | None = None
        self.failure: BaseException | None = None
        self.finished = False

    def chunks(self) -> Iterator[bytes]:
        """The non-empty chunks, in order; raises the source's failure, or BodyStopped."""
        if self._reader is None:
            self._reader = threading.Thread(target=self._read, name="clone-read", daemon=True)
            self._reader.start()
        while True:
            item = self._take()
            if item is None:
                self.finished = True
                return
            if isinstance(item, BaseException):
                self.failure = item
                raise item
            self._counts.wire += len(item)
            yield item

    def stop(self) -> None:
        """Wake both threads and end the body early; from any thread, any number of times."""
        with self._changed:
            self._stopped = True
            self._ready.clear()
            self._changed.notify_all()
        if self._reader is not None and self._reader.is_alive():
            self._abort()  # a reader blocked in tar's pipe would not see the flag

    def close(self) -> None:
        self.stop()
        if self._reader is not None:
            self._reader.join()  # the generator cannot be closed while the thread runs it
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()

    def _read(self) -> None:
        try:
            for chunk in self._chunks:
                # An empty chunk would end a chunked body early.
                if chunk and not self._offer(chunk):
                    return
        except BaseException as err:  # whatever it is, the sender must hear of it
            self._offer(err)
        else:
            self._offer(None)

    def _offer(self, item: bytes | BaseException | None) -> bool:
        with self._changed:
            while len(self._ready) >= READ_AHEAD and not self._stopped:
                self._changed.wait()
            if self._stopped:
                return False
            self._ready.append(item)
            self._changed.notify_all()
            return True

    def _take(self) -> bytes | BaseException | None:
        with self._changed:
            while not self._ready and not self._stopped:
                self._changed.wait()
            if self._stopped:
                raise BodyStopped("the clone stream was stopped")
            item = self._ready.popleft()
            self._changed.notify_all()
            return item


def _allocated(root: Path) -> int:
    """Bytes the volume's files occupy (`du -s --block-size=1`, CDI's measure): the 100 %."""
    total = 0
    for directory, dirs, files in os.walk(root):
        if directory == str(root) and LOST_AND_FOUND in dirs:
            dirs.remove(LOST_AND_FOUND)
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(directory, name)).st_blocks * 512
    return total
