"""Reading a volume as the sparse extent stream (`cdi.api.clonestream`): its data, not its holes.

Reading: on a regular file the data ranges come from SEEK_DATA/SEEK_HOLE, so holes cost nothing;
inside data (and on devices, where every byte is "data") all-zero blocks of ZERO_BLOCK bytes are
left out too. The source is read in pieces of at most READ_SIZE bytes, never as a whole.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from typing import Final

from cdi.api.clonestream import end_marker, record_header, stream_header
from cloner.errors import CloneError

READ_SIZE: Final = 4 << 20
ZERO_BLOCK: Final = 64 << 10

_ZERO_READ = bytes(READ_SIZE)
_ZERO_BLOCK = bytes(ZERO_BLOCK)

Progress = Callable[[int], None]


def source_size(fd: int) -> int:
    """Bytes in a regular file or a block device (lseek to the end works for both)."""
    return os.lseek(fd, 0, os.SEEK_END)


def has_holes_api(fd: int) -> bool:
    """SEEK_DATA tells data from holes only on regular files; a device says "all data"."""
    return stat.S_ISREG(os.fstat(fd).st_mode)


def data_ranges(fd: int, size: int, *, seek_data: bool) -> Iterator[tuple[int, int]]:
    """(start, end) of each range that may hold data, in order; the whole source without
    `seek_data` or where the filesystem does not support it."""
    if not seek_data:
        if size:
            yield 0, size
        return
    position = 0
    while position < size:
        try:
            start = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:  # no data after `position`
                return
            if err.errno == errno.EINVAL and position == 0:  # no SEEK_DATA on this filesystem
                yield 0, size
                return
            raise
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        position = end


def data_bytes(fd: int, size: int, *, seek_data: bool) -> int:
    """What `data_ranges` covers: the 100 % of the progress metric."""
    return sum(end - start for start, end in data_ranges(fd, size, seek_data=seek_data))


def data_runs(
    fd: int, size: int, *, seek_data: bool, on_scanned: Progress | None = None
) -> Iterator[tuple[int, bytes]]:
    """(offset, data) for each run of non-zero blocks, in order, each at most READ_SIZE bytes.

    `on_scanned(n)` is told of every n bytes of data ranges read, zero or not (progress).
    """
    for start, end in data_ranges(fd, size, seek_data=seek_data):
        position = start
        while position < end:
            # Pieces end on READ_SIZE boundaries, so blocks line up with the source's.
            length = min(READ_SIZE - position % READ_SIZE, end - position)
            piece = _pread(fd, length, position)
            # One memcmp skips a whole zero piece, the common case on a device.
            if piece != (_ZERO_READ if length == READ_SIZE else bytes(length)):
                yield from nonzero_runs(position, piece)
            position += length
            if on_scanned is not None:
                on_scanned(length)


def nonzero_runs(offset: int, data: bytes) -> Iterator[tuple[int, bytes]]:
    """The runs of `data` (found at `offset`) left after dropping all-zero ZERO_BLOCK blocks
    (aligned to the source's offsets, so the edges of a piece may be partial blocks)."""
    size = len(data)
    run_start = -1
    position = 0
    while position < size:
        block_end = min(size, (offset + position) // ZERO_BLOCK * ZERO_BLOCK + ZERO_BLOCK - offset)
        # startswith over a range is a memcmp in place: no slice is copied.
        length = block_end - position
        zeros = _ZERO_BLOCK if length == ZERO_BLOCK else bytes(length)
        is_zero = data.startswith(zeros, position, block_end)
        if is_zero:
            if run_start >= 0:
                yield offset + run_start, data[run_start:position]
                run_start = -1
        elif run_start < 0:
            run_start = position
        position = block_end
    if run_start >= 0:
        yield offset + run_start, data if run_start == 0 else data[run_start:]


def encode(
    fd: int,
    size: int,
    *,
    seek_data: bool,
    on_scanned: Progress | None = None,
    on_data: Progress | None = None,
) -> Iterator[bytes]:
    """The whole stream, as header, record headers and data pieces (never joined: no copy).
    `on_data(n)` is told of the n data bytes of each record."""
    yield stream_header(size)
    for offset, data in data_runs(fd, size, seek_data=seek_data, on_scanned=on_scanned):
        if on_data is not None:
            on_data(len(data))
        yield record_header(offset, len(data))
        yield data
    yield end_marker(size)


def _pread(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            raise CloneError(
                f"the clone source ended at byte {offset + got}, before its size "
                f"{offset + length}; was it changed during the clone?"
            )
        parts.append(more)
        got += len(more)
    return b"".join(parts)
