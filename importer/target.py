"""The import target: how much space it has, and a sparse streaming writer into it.

Filesystem volumes get `/data/disk.img` (a raw file, sparse unless preallocation is asked);
Block volumes get the device itself, never resized, zeros written where the image has zeros
because a reused device may hold old data. Space follows CDI's formula (reference §5.5, §5.7).
"""

from __future__ import annotations

import logging
import os
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
    """Writes a stream at increasing offsets, never past `limit`; zero chunks become holes."""

    def __init__(self, path: Path, *, limit: int, is_block: bool, sparse: bool) -> None:
        self.path = path
        self.limit = limit
        self.is_block = is_block
        self.sparse = sparse and not is_block
        self.offset = 0
        flags = os.O_WRONLY | (0 if is_block else os.O_CREAT | os.O_TRUNC)
        self._fd = os.open(path, flags, 0o660)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        end = self.offset + len(view)
        if end > self.limit:
            raise ImageTooLargeError(end, self.limit)
        for start in range(0, len(view), len(ZERO_CHUNK)):
            piece = view[start : start + len(ZERO_CHUNK)]
            if not (self.sparse and piece == ZERO_CHUNK[: len(piece)]):
                written = 0
                while written < len(piece):
                    written += os.pwrite(self._fd, piece[written:], self.offset + start + written)
        self.offset = end

    def finish(self, *, preallocate: bool = False) -> int:
        if not self.is_block:
            os.ftruncate(self._fd, self.offset)  # trailing holes count too
            if preallocate and self.offset:
                os.posix_fallocate(self._fd, 0, self.offset)
        os.fsync(self._fd)
        self.close()
        return self.offset

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
