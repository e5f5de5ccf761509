"""Streaming decompression of gzip, xz, zstd and bzip2 with bounded memory.

Owns: `detect_compression` (magic bytes), `open_decompressed` (a file-like reader over a
compressed file object) and `iter_decompressed` (the same over an iterable of chunks). Every
read returns at most what was asked for, so memory stays bounded whatever the ratio: gzip
(multi-member), xz and bzip2 (concatenated streams) use the stdlib, zstd the `zstandard`
package reading across concatenated frames. Trailing garbage after the last stream is corrupt
data, not something to skip. Corrupt or truncated data raises `FormatError` with a one-line
message; errors of the underlying source pass through unchanged. Used by the format inspector
and the importer; it never decides what the decompressed bytes are.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import IO, TYPE_CHECKING, BinaryIO, Final, Protocol, cast

import zstandard

from cdi.image.errors import FormatError

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

#: name -> magic at offset 0. gzip's third byte is the method, and deflate is the only one.
MAGIC: Final = {
    "gzip": b"\x1f\x8b\x08",
    "xz": b"\xfd7zXZ\x00",
    "zstd": b"\x28\xb5\x2f\xfd",
    "bzip2": b"BZh",
}
NAMES: Final = tuple(MAGIC)

#: The decompressed bytes buffered between the decompressor and the caller.
_BUFFER_SIZE: Final = 64 * 1024
#: How much compressed input the xz and bzip2 readers pull from their source at a time.
_READ_SIZE: Final = 64 * 1024
#: How much compressed input the zstd reader pulls from its source at a time.
_ZSTD_READ_SIZE: Final = 128 * 1024


def detect_compression(head: bytes) -> str | None:
    """The compression format `head` (the first bytes of a stream) starts with, if any."""
    for name, magic in MAGIC.items():
        if head.startswith(magic):
            if name == "bzip2" and not (head[3:4].isdigit() and head[3:4] != b"0"):
                continue
            return name
    return None


class _Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


class _Decompressing(Protocol):
    def readinto(self, buffer: memoryview, /) -> int: ...
    def close(self) -> None: ...


class _Source:
    """The compressed source as the decompressors see it; remembers the source's own failure,
    so that an I/O error is not mistaken for corrupt data."""

    def __init__(self, raw: _Readable) -> None:
        self._raw = raw
        self.error: BaseException | None = None
        self.observer: _ZstdFrames | None = None

    def read(self, size: int = -1) -> bytes:
        try:
            data = self._raw.read(size)
        except BaseException as exc:
            self.error = exc
            raise
        if self.observer is not None:
            self.observer.feed(data)
        return data

    def seekable(self) -> bool:
        return False

    def seek(self, offset: int, whence: int = 0) -> int:
        raise io.UnsupportedOperation("a compressed stream is read once, forwards")


class _ZstdFrames:
    """Follows zstd's frame structure over the compressed bytes, skipping block payloads.

    python-zstandard's stream reader ends quietly when its input stops in the middle of a
    frame; this scanner tells a truncated stream from a complete one. Layout (RFC 8878):
    frame = magic 28 b5 2f fd, header descriptor byte (bits 7-6 content size flag, 5 single
    segment, 2 checksum, 1-0 dictionary id flag), optional window byte, dictionary id and content
    size, then blocks of a 3-byte header (bit 0 last, bits 1-2 type, 3-23 size; an RLE block
    carries 1 byte) and an optional 4-byte checksum. Skippable frames: magic 5? 2a 4d 18, a u32
    size and that many bytes.
    """

    _ZSTD_MAGIC: Final = 0xFD2FB528
    _SKIPPABLE_MASK: Final = 0xFFFFFFF0
    _SKIPPABLE: Final = 0x184D2A50

    def __init__(self) -> None:
        self._buf = bytearray()  # a partial structure header, never more than 14 bytes
        self._skip = 0  # payload bytes to pass over
        self._state = "magic"
        self._checksum = False
        self._header_size = 0
        self.frames = 0

    @property
    def at_boundary(self) -> bool:
        return self._state == "magic" and not self._buf and not self._skip and self.frames > 0

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._skip:
                step = min(self._skip, len(view))
                self._skip -= step
                view = view[step:]
                continue
            need = self._need()
            take = min(need - len(self._buf), len(view))
            self._buf += view[:take]
            view = view[take:]
            if len(self._buf) == need:
                self._advance()

    def _need(self) -> int:
        if self._state == "magic":
            return 4
        if self._state == "descriptor":
            return 1
        if self._state == "frame header":
            return self._header_size
        if self._state == "skippable size":
            return 4
        return 3  # block header

    def _advance(self) -> None:
        data = bytes(self._buf)
        self._buf.clear()
        if self._state == "magic":
            (magic,) = struct.unpack("<I", data)
            if magic == self._ZSTD_MAGIC:
                self._state = "descriptor"
            elif magic & self._SKIPPABLE_MASK == self._SKIPPABLE:
                self._state = "skippable size"
            else:
                raise FormatError("corrupt zstd data: unknown frame magic")
        elif self._state == "skippable size":
            (self._skip,) = struct.unpack("<I", data)
            self._state = "magic"
            self.frames += 1
        elif self._state == "descriptor":
            descriptor = data[0]
            size_flag, single = descriptor >> 6, descriptor >> 5 & 1
            self._checksum = bool(descriptor >> 2 & 1)
            content_size = (1 if single else 0, 2, 4, 8)[size_flag]
            self._header_size = (0 if single else 1) + (0, 1, 2, 4)[descriptor & 3] + content_size
            self._state = "frame header" if self._header_size else "block"
        elif self._state == "frame header":
            self._state = "block"
        else:
            header = int.from_bytes(data, "little")
            last, kind, size = header & 1, header >> 1 & 3, header >> 3
            self._skip = 1 if kind == 1 else size
            if last:
                self._skip += 4 if self._checksum else 0
                self._state = "magic"
                self.frames += 1


class _Decompressor(Protocol):
    """What lzma.LZMADecompressor and bz2.BZ2Decompressor have in common."""

    @property
    def eof(self) -> bool: ...
    @property
    def needs_input(self) -> bool: ...
    @property
    def unused_data(self) -> bytes: ...
    def decompress(self, data: bytes, max_length: int = -1) -> bytes: ...


class _StreamsReader:
    """Reads concatenated xz or bzip2 streams, each output bounded by the caller's buffer.

    The stdlib's LZMAFile and BZ2File quietly drop anything after the last valid stream; an
    image with trailing garbage is corrupt, so this reader refuses it instead.
    """

    def __init__(
        self, source: _Source, factory: Callable[[], _Decompressor], *, zero_padding: bool
    ) -> None:
        self._source = source
        self._factory = factory
        self._zero_padding = zero_padding  # xz allows NUL padding between streams
        self._decompressor = factory()

    def readinto(self, buffer: memoryview, /) -> int:
        while True:
            if self._decompressor.eof:
                rest = self._decompressor.unused_data or self._source.read(_READ_SIZE)
                if self._zero_padding:
                    while rest and not rest.strip(b"\0"):
                        rest = self._source.read(_READ_SIZE)
                    rest = rest.lstrip(b"\0")
                if not rest:
                    return 0
                self._decompressor = self._factory()
            elif self._decompressor.needs_input:
                rest = self._source.read(_READ_SIZE)
                if not rest:
                    raise EOFError("the data ends before the end-of-stream marker")
            else:
                rest = b""
            data = self._decompressor.decompress(rest, len(buffer))
            if data:
                buffer[: len(data)] = data
                return len(data)

    def close(self) -> None:
        pass


class DecompressedReader(io.RawIOBase):
    """Reads the decompressed bytes of `raw`; see `open_decompressed`."""

    def __init__(self, raw: _Readable, name: str) -> None:
        super().__init__()
        if name not in MAGIC:
            raise ValueError(f"unknown compression {name!r}")
        self.name = name
        self._source = _Source(raw)
        self._frames: _ZstdFrames | None = None
        # The decompressors close what they opened, never a file object they were given.
        self._inner: _Decompressing
        if name == "gzip":
            self._inner = gzip.GzipFile(fileobj=self._source, mode="rb")
        elif name == "xz":
            self._inner = _StreamsReader(self._source, lzma.LZMADecompressor, zero_padding=True)
        elif name == "bzip2":
            self._inner = _StreamsReader(self._source, bz2.BZ2Decompressor, zero_padding=False)
        else:
            self._frames = self._source.observer = _ZstdFrames()
            self._inner = zstandard.ZstdDecompressor().stream_reader(
                cast("IO[bytes]", self._source),
                read_size=_ZSTD_READ_SIZE,
                read_across_frames=True,
                closefd=False,
            )

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        if not view:
            return 0
        try:
            count = self._inner.readinto(view)
        except FormatError:
            raise
        except (OSError, EOFError, zlib.error, lzma.LZMAError, zstandard.ZstdError) as exc:
            if exc is self._source.error:
                raise
            raise FormatError(f"corrupt {self.name} data: {_one_line(exc)}") from exc
        if count == 0 and self._frames is not None and not self._frames.at_boundary:
            raise FormatError("corrupt zstd data: the stream ends inside a frame")
        return count

    def close(self) -> None:
        if not self.closed:
            try:
                self._inner.close()
            finally:
                super().close()


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def open_decompressed(raw: BinaryIO | _Readable, name: str) -> io.BufferedReader:
    """A buffered reader of the decompressed bytes of `raw`, compressed with `name`.

    The caller keeps owning `raw`; closing the reader does not close it.
    """
    return io.BufferedReader(DecompressedReader(raw, name), buffer_size=_BUFFER_SIZE)


class _ChunkReader:
    """An iterable of chunks seen as a file with `read(size)`, holding at most one chunk."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._pending = memoryview(b"")

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            parts = [bytes(self._pending), *self._chunks]
            self._pending = memoryview(b"")
            return b"".join(parts)
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return b""
            self._pending = memoryview(chunk)
        data = bytes(self._pending[:size])
        self._pending = self._pending[size:]
        return data


def iter_decompressed(
    chunks: Iterable[bytes], name: str, *, chunk_size: int = 64 * 1024
) -> Iterator[bytes]:
    """Decompress an iterable of compressed chunks into chunks of at most `chunk_size` bytes."""
    with open_decompressed(_ChunkReader(chunks), name) as reader:
        while data := reader.read1(chunk_size):
            yield data
