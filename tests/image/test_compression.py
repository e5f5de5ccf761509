"""Streaming decompression: round trips, concatenated members and frames, corrupt and truncated
data (FormatError), source errors passed through, and reads bounded by what was asked for."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from cdi.image.compression import (
    detect_compression,
    iter_decompressed,
    open_decompressed,
)
from cdi.image.errors import FormatError

from .conftest import MiB, run

Compress = Callable[[bytes], bytes]


def _zstd(data: bytes) -> bytes:
    # With a checksum, as the zstd command writes by default: without one, corrupt literals
    # cannot be told from data.
    return zstandard.ZstdCompressor(level=1, write_checksum=True).compress(data)


COMPRESSORS: dict[str, Compress] = {
    "gzip": lambda data: gzip.compress(data, compresslevel=1),
    "xz": lambda data: lzma.compress(data, preset=0),
    "zstd": _zstd,
    "bzip2": lambda data: bz2.compress(data, compresslevel=1),
}
NAMES = list(COMPRESSORS)


def payload(size: int = 3 * MiB + 17) -> bytes:
    """Half random, half zeros: both the hard and the easy case for a decompressor."""
    half = size // 2
    return os.urandom(half) + bytes(size - half)


def read_all(reader: io.BufferedReader, size: int) -> bytes:
    parts = []
    while data := reader.read(size):
        assert len(data) <= size
        parts.append(data)
    return b"".join(parts)


@pytest.mark.parametrize("name", NAMES)
def test_detect(name: str) -> None:
    assert detect_compression(COMPRESSORS[name](b"hello")[:16]) == name


@pytest.mark.parametrize(
    "head",
    [b"", b"\x1f", b"\x1f\x8b\x07rest", b"BZh0", b"BZx9", b"QFI\xfb\x00\x00\x00\x03", bytes(512)],
    ids=["empty", "short", "gzip-bad-method", "bzip2-bad-level", "bzip2-bad", "qcow2", "zeros"],
)
def test_detect_nothing(head: bytes) -> None:
    assert detect_compression(head) is None


@pytest.mark.parametrize("name", NAMES)
def test_round_trip(name: str) -> None:
    data = payload()

    with open_decompressed(io.BytesIO(COMPRESSORS[name](data)), name) as reader:
        assert read_all(reader, 65536) == data


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [1, 17, 4096], ids=["1B", "17B", "4KiB"])
def test_readinto_small_buffers(name: str, size: int) -> None:
    data = payload(200_000)
    buffer = bytearray(size)
    out = bytearray()

    with open_decompressed(io.BytesIO(COMPRESSORS[name](data)), name) as reader:
        while count := reader.readinto(buffer):
            assert count <= size
            out += buffer[:count]

    assert out == data


@pytest.mark.parametrize("name", NAMES)
def test_concatenated_members(name: str) -> None:
    """Multi-member gzip, concatenated zstd frames, xz streams and bzip2 streams all read
    through, as their command-line tools do."""
    parts = [b"first member\n" * 1000, os.urandom(5000), b"third"]
    compressed = b"".join(COMPRESSORS[name](part) for part in parts)

    with open_decompressed(io.BytesIO(compressed), name) as reader:
        assert reader.read() == b"".join(parts)


def test_xz_stream_padding() -> None:
    compressed = lzma.compress(b"one") + bytes(8) + lzma.compress(b"two") + bytes(4)

    with open_decompressed(io.BytesIO(compressed), "xz") as reader:
        assert reader.read() == b"onetwo"


def test_gzip_zero_padding() -> None:
    with open_decompressed(io.BytesIO(gzip.compress(b"data") + bytes(512)), "gzip") as reader:
        assert reader.read() == b"data"


def test_zstd_skippable_frame() -> None:
    skippable = b"\x50\x2a\x4d\x18" + (4).to_bytes(4, "little") + b"meta"
    compressed = _zstd(b"one") + skippable + _zstd(b"two")

    with open_decompressed(io.BytesIO(compressed), "zstd") as reader:
        assert reader.read() == b"onetwo"


@pytest.mark.parametrize("name", NAMES)
def test_iter_decompressed_over_odd_chunks(name: str) -> None:
    data = payload(300_000)
    compressed = COMPRESSORS[name](data)
    chunks = (compressed[i : i + 17] for i in range(0, len(compressed), 17))

    out = list(iter_decompressed(chunks, name, chunk_size=4096))

    assert b"".join(out) == data
    assert max(len(chunk) for chunk in out) <= 4096


@pytest.mark.parametrize("name", NAMES)
def test_truncated_is_a_format_error(name: str) -> None:
    compressed = COMPRESSORS[name](payload(300_000))

    with (
        pytest.raises(FormatError, match=f"corrupt {name} data"),
        open_decompressed(io.BytesIO(compressed[: len(compressed) * 2 // 3]), name) as reader,
    ):
        read_all(reader, 65536)


@pytest.mark.parametrize("name", NAMES)
def test_corrupt_is_a_format_error(name: str) -> None:
    compressed = bytearray(COMPRESSORS[name](payload(300_000)))
    middle = len(compressed) // 2
    compressed[middle : middle + 64] = bytes(b ^ 0x5A for b in compressed[middle : middle + 64])

    with (
        pytest.raises(FormatError) as caught,
        open_decompressed(io.BytesIO(bytes(compressed)), name) as reader,
    ):
        read_all(reader, 65536)
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith(f"corrupt {name} data")


@pytest.mark.parametrize("name", NAMES)
def test_trailing_garbage_is_a_format_error(name: str) -> None:
    compressed = COMPRESSORS[name](b"data" * 1000) + b"garbage after the end" * 10

    with (
        pytest.raises(FormatError),
        open_decompressed(io.BytesIO(compressed), name) as reader,
    ):
        read_all(reader, 65536)


@pytest.mark.parametrize("name", NAMES)
def test_magic_only_is_a_format_error(name: str) -> None:
    with (
        pytest.raises(FormatError),
        open_decompressed(io.BytesIO(COMPRESSORS[name](b"x")[:4]), name) as reader,
    ):
        reader.read()


class _FailingSource(io.RawIOBase):
    def __init__(self, data: bytes, fail_after: int) -> None:
        self._data = io.BytesIO(data)
        self._left = fail_after

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            raise ConnectionResetError("source went away")
        data = self._data.read(min(size, self._left) if size >= 0 else self._left)
        self._left -= len(data)
        return data


@pytest.mark.parametrize("name", NAMES)
def test_source_errors_pass_through(name: str) -> None:
    compressed = COMPRESSORS[name](os.urandom(500_000))

    with (
        pytest.raises(ConnectionResetError),
        open_decompressed(_FailingSource(compressed, 100_000), name) as reader,
    ):
        read_all(reader, 65536)


def test_closing_the_reader_leaves_the_source_open() -> None:
    source = io.BytesIO(_zstd(b"abc"))
    with open_decompressed(source, "zstd") as reader:
        reader.read()
    assert not source.closed


def test_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown compression"):
        open_decompressed(io.BytesIO(b""), "lz4")


@pytest.mark.parametrize("name", NAMES)
def test_memory_is_bounded(name: str) -> None:
    """32 MiB of zeros compress to almost nothing; reading them 64 KiB at a time must never
    hold more than a small multiple of that."""
    compressed = COMPRESSORS[name](bytes(32 * MiB))

    tracemalloc.start()
    try:
        with open_decompressed(io.BytesIO(compressed), name) as reader:
            total = 0
            while data := reader.read1(65536):
                total += len(data)
                del data
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert total == 32 * MiB
    assert peak < 4 * MiB


@pytest.mark.parametrize("tool", ["gzip", "xz", "zstd", "bzip2"])
def test_command_line_tools_output(tmp_path: Path, tool: str) -> None:
    """What the real tools write (including multi-threaded xz blocks) reads back intact."""
    source = tmp_path / "data"
    data = payload(MiB + 3)
    source.write_bytes(data)
    argv = {
        "gzip": ["gzip", "-k", "-1"],
        "xz": ["xz", "-k", "-0", "-T2", "--block-size=65536"],
        "zstd": ["zstd", "-q", "-1"],
        "bzip2": ["bzip2", "-k", "-1"],
    }[tool]
    run(*argv, source)
    suffix = {"gzip": ".gz", "xz": ".xz", "zstd": ".zst", "bzip2": ".bz2"}[tool]
    compressed = source.with_name(source.name + suffix)

    with compressed.open("rb") as raw:
        assert detect_compression(raw.read(16)) == tool
        raw.seek(0)
        with open_decompressed(raw, tool) as reader:
            assert read_all(reader, 65536) == data
