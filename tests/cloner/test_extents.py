"""The cloner's extent reader and stream encoding over real sparse files (made with truncate and
os.pwrite), a regular file standing in for a device, and the cloner's settings."""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from cdi.api import clonestream
from cloner import extents
from cloner.errors import SettingsError
from cloner.settings import CloneSettings, Compression, Content
from importer.upload import clone as receiver

MIB = 1 << 20
KIB = 1 << 10
BLOCK = extents.ZERO_BLOCK


def pattern(length: int, seed: int) -> bytes:
    """Non-zero, position-dependent bytes (every 64 KiB block differs from zeros)."""
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:length])


def sparse_file(path: Path, size: int, writes: list[tuple[int, bytes]]) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for offset, data in writes:
            os.pwrite(fd, data, offset)
    finally:
        os.close(fd)
    return path


def image(size: int, writes: list[tuple[int, bytes]]) -> bytes:
    out = bytearray(size)
    for offset, data in writes:
        out[offset : offset + len(data)] = data
    return bytes(out)


def runs(path: Path, *, seek_data: bool | None = None) -> list[tuple[int, bytes]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        size = extents.source_size(fd)
        seek = extents.has_holes_api(fd) if seek_data is None else seek_data
        return list(extents.data_runs(fd, size, seek_data=seek))
    finally:
        os.close(fd)


def encoded(path: Path, *, seek_data: bool = True) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        size = extents.source_size(fd)
        return b"".join(extents.encode(fd, size, seek_data=seek_data))
    finally:
        os.close(fd)


def decode(stream: bytes) -> Iterator[tuple[int, bytes]]:
    """A strict reading of the format as written in cloner/extents.py's docstring."""
    magic, total = struct.unpack_from(">8sQ", stream, 0)
    assert magic == b"CDIEXT01"
    position, end = 16, 0
    while True:
        offset, length = struct.unpack_from(">QQ", stream, position)
        position += 16
        if offset == total and length == 0:
            assert position == len(stream), "bytes after the end marker"
            return
        assert offset >= end and length > 0 and offset + length <= total
        yield offset, stream[position : position + length]
        position += length
        end = offset + length


def rebuild(stream: bytes) -> bytes:
    total = struct.unpack_from(">8sQ", stream, 0)[1]
    out = bytearray(total)
    for offset, data in decode(stream):
        out[offset : offset + len(data)] = data
    return bytes(out)


# --- the reader -----------------------------------------------------------------------------------


def test_sparse_file_holes_skipped_and_data_exact(tmp_path: Path) -> None:
    size = 64 * MIB
    writes = [
        (0, pattern(100 * KIB, 1)),
        (20 * MIB, pattern(3 * MIB, 2)),
        (size - 4 * KIB, b"x" * 4096),
    ]
    path = sparse_file(tmp_path / "disk.img", size, writes)
    found = runs(path)
    assert [(o, len(d)) for o, d in found] == [
        (0, 100 * KIB),
        (20 * MIB, 3 * MIB),
        (size - 4 * KIB, 4 * KIB),
    ]
    assert rebuild(encoded(path)) == image(size, writes)
    # Only the data ranges are read: what SEEK_DATA reports, a few MiB of the 64.
    fd = os.open(path, os.O_RDONLY)
    try:
        scanned: list[int] = []
        list(extents.data_runs(fd, size, seek_data=True, on_scanned=scanned.append))
        assert sum(scanned) == extents.data_bytes(fd, size, seek_data=True) < 5 * MIB
    finally:
        os.close(fd)


def test_zero_blocks_inside_data_are_skipped(tmp_path: Path) -> None:
    # Allocated zeros (written, not holes) between two data blocks: SEEK_DATA calls them data,
    # the zero-block check leaves them out.
    a, b = pattern(BLOCK, 3), pattern(2 * BLOCK, 4)
    writes = [(0, a), (BLOCK, bytes(4 * BLOCK)), (5 * BLOCK, b)]
    path = sparse_file(tmp_path / "disk.img", 16 * MIB, writes)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert extents.data_bytes(fd, 16 * MIB, seek_data=True) >= 7 * BLOCK
    finally:
        os.close(fd)
    assert runs(path) == [(0, a), (5 * BLOCK, b)]
    assert rebuild(encoded(path)) == image(16 * MIB, writes)


def test_unaligned_edges_and_partial_blocks(tmp_path: Path) -> None:
    # A size that is no multiple of anything, data across a block edge and in the last bytes.
    size = 3 * MIB + 12345
    writes = [(BLOCK - 7, b"edge-of-a-block"), (size - 5, b"tail!")]
    path = sparse_file(tmp_path / "odd.img", size, writes)
    data = image(size, writes)
    for seek_data in (True, False):
        stream = encoded(path, seek_data=seek_data)
        assert rebuild(stream) == data
        # Only the 64 KiB blocks holding data travel (the two the first write straddles and
        # the partial last one); with SEEK_DATA, only the filesystem blocks around the data.
        blocks = 16 + 2 * 16 + 2 * BLOCK + (size % BLOCK) + 16
        if seek_data:
            assert len(stream) <= blocks
        else:
            assert len(stream) == blocks


def test_empty_and_all_hole_sources(tmp_path: Path) -> None:
    empty = sparse_file(tmp_path / "empty.img", 0, [])
    assert encoded(empty) == b"CDIEXT01" + struct.pack(">Q", 0) + struct.pack(">QQ", 0, 0)
    holes = sparse_file(tmp_path / "holes.img", 1 << 34, [])  # 16 GiB, nothing in it
    stream = encoded(holes)
    assert len(stream) == 32
    assert list(decode(stream)) == []


def test_device_without_seek_data_reads_everything_but_sends_data_only(tmp_path: Path) -> None:
    # A regular file standing in for a device, fully allocated (as a device is): zeros written.
    size = 8 * MIB
    writes = [(0, bytes(size)), (MIB, pattern(200 * KIB, 5)), (7 * MIB, pattern(BLOCK, 6))]
    path = sparse_file(tmp_path / "device", size, writes)
    as_device = runs(path, seek_data=False)
    assert as_device == runs(path, seek_data=True)
    # Block granularity: 200 KiB of data occupies four 64 KiB blocks.
    assert sum(len(d) for _, d in as_device) == 4 * BLOCK + BLOCK
    fd = os.open(path, os.O_RDONLY)
    try:
        scanned: list[int] = []
        list(extents.data_runs(fd, size, seek_data=False, on_scanned=scanned.append))
        assert sum(scanned) == size  # every byte read, as on a device
    finally:
        os.close(fd)
    assert rebuild(encoded(path, seek_data=False)) == image(size, writes)


def test_the_receiver_speaks_the_same_format() -> None:
    # Both workers take the format from cdi.api.clonestream, its one definition.
    assert receiver.MAGIC == clonestream.MAGIC
    assert extents.stream_header(5)[: len(clonestream.MAGIC)] == clonestream.MAGIC
    assert receiver.HEADER is clonestream.HEADER
    assert receiver.RECORD is clonestream.RECORD


def test_receiver_runs_split_zero_blocks_like_the_reader() -> None:
    data = pattern(BLOCK, 7) + bytes(2 * BLOCK) + pattern(100, 8)
    offset = 4 * BLOCK - 10  # unaligned: the first and last blocks are partial
    sent = list(extents.nonzero_runs(offset, data))
    kept = [(offset + s, data[s:e]) for s, e, zero in receiver._runs(offset, data) if not zero]
    assert sent == kept
    # The one block that is zero from edge to edge stays behind; partial blocks travel.
    assert [(o - offset, len(d)) for o, d in sent] == [
        (0, BLOCK + 10),
        (2 * BLOCK + 10, BLOCK - 10 + 100),
    ]


# --- settings -------------------------------------------------------------------------------------


@pytest.fixture
def base_env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "src").mkdir()
    return {"UPLOAD_URL": "http://127.0.0.1:1/v1beta1/upload", "MOUNT_POINT": str(tmp_path / "src")}


def test_settings_defaults_and_spellings(base_env: dict[str, str], tmp_path: Path) -> None:
    s = CloneSettings.from_env(base_env)
    assert not s.block and s.content is Content.KUBEVIRT and s.compression is Compression.NONE
    assert s.source == tmp_path / "src" / "disk.img"
    assert s.metrics_addr == ("0.0.0.0", 8443)
    device = sparse_file(tmp_path / "dev", MIB, [])
    s = CloneSettings.from_env(
        {
            **base_env,
            "VOLUME_MODE": "Block",
            "CDI_BLOCK_DEVICE": str(device),
            "CLONE_COMPRESSION": "ZSTD",
        }
    )
    assert s.block and s.source == device and s.compression is Compression.ZSTD
    s = CloneSettings.from_env(
        {**base_env, "UPLOAD_SERVER_ADDRESS": "10.0.0.7:8443", "CDI_METRICS_ADDR": "127.0.0.1:0"}
    )
    assert s.server_address == ("10.0.0.7", 8443) and s.metrics_addr == ("127.0.0.1", 0)


@pytest.mark.parametrize(
    ("extra", "variable"),
    [
        ({"UPLOAD_URL": ""}, "UPLOAD_URL"),
        ({"UPLOAD_URL": "ftp://x/y"}, "UPLOAD_URL"),
        ({"UPLOAD_URL": "https://h:8443/v1beta1/upload"}, "CLIENT_CERT"),
        ({"VOLUME_MODE": "tape"}, "VOLUME_MODE"),
        ({"CLONE_CONTENT_TYPE": "iso"}, "CLONE_CONTENT_TYPE"),
        ({"CLONE_COMPRESSION": "snappy"}, "CLONE_COMPRESSION"),
        ({"CDI_METRICS_ADDR": "nowhere"}, "CDI_METRICS_ADDR"),
        ({"UPLOAD_SERVER_ADDRESS": "10.0.0.1"}, "UPLOAD_SERVER_ADDRESS"),
        ({"PREALLOCATION": "maybe"}, "PREALLOCATION"),
        ({"MOUNT_POINT": "/nonexistent/mount"}, "MOUNT_POINT"),
        ({"VOLUME_MODE": "block", "CDI_BLOCK_DEVICE": "/nonexistent/dev"}, "CDI_BLOCK_DEVICE"),
    ],
)
def test_bad_settings_name_the_variable(
    base_env: dict[str, str], extra: dict[str, str], variable: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        CloneSettings.from_env({**base_env, **extra})
    assert caught.value.variable == variable
    assert str(caught.value).startswith(f"{variable}: ")
