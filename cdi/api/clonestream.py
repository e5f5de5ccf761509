"""The host-assisted clone stream between `cdi-cloner` and the upload server (ours and CDI's).

Request headers: `x-cdi-content-type` (CDI's: `CloneContentType`, what makes an upload a clone),
and ours: `x-cdi-clone-encoding: extents-v1` (the body is the extent stream below, not raw
bytes), `x-cdi-clone-compression: zstd` (the whole body is one zstd stream),
`x-cdi-preallocation` (informational: the target decides).

The extent stream, a volume's data without its holes:

    header   8 bytes b"CDIEXT01", then the source's total size (u64 big-endian)
    record   offset (u64 BE), length (u64 BE), then `length` bytes of data;
             offsets strictly increasing, records never overlap nor pass the total
    end      a record with offset = the total size and length 0

Whatever no record covers reads as zeros on the target; the end marker tells a complete stream
from one cut short at a record boundary. Both workers import this one definition.
"""

from __future__ import annotations

import struct
from typing import Final

CONTENT_TYPE_HEADER: Final = "x-cdi-content-type"
ENCODING_HEADER: Final = "x-cdi-clone-encoding"
COMPRESSION_HEADER: Final = "x-cdi-clone-compression"
PREALLOCATION_HEADER: Final = "x-cdi-preallocation"
EXTENTS_V1: Final = "extents-v1"
ZSTD: Final = "zstd"

MAGIC: Final = b"CDIEXT01"
HEADER: Final = struct.Struct(">8sQ")
RECORD: Final = struct.Struct(">QQ")


def stream_header(total: int) -> bytes:
    return HEADER.pack(MAGIC, total)


def record_header(offset: int, length: int) -> bytes:
    return RECORD.pack(offset, length)


def end_marker(total: int) -> bytes:
    return RECORD.pack(total, 0)
