"""VHD (qemu calls it "vpc"): footer and dynamic header parse; differencing disks are refused.

A dynamic or differencing VHD starts with a copy of its footer; a fixed VHD has the footer only
in its last 512 bytes, so a stream can recognise it only at its end. The virtual size follows
qemu's rule: the CHS geometry, except for creators known to mean `current_size` (and for the
maximum geometry), so that our answer agrees with `qemu-img info`.

Footer, 512 bytes, big-endian (Microsoft VHD specification):

    offset size  field
       0     8   cookie "conectix"
       8     4   features
      12     4   file format version
      16     8   data offset            dynamic header (0xffff... for fixed disks)
      24     4   timestamp
      28     4   creator application    "qemu", "qem2", "win ", "vpc ", ...
      32     4   creator version
      36     4   creator host OS
      40     8   original size
      48     8   current size
      56     4   geometry               cylinders u16, heads u8, sectors per track u8
      60     4   disk type              2 fixed, 3 dynamic, 4 differencing
      64     4   checksum               ones' complement of the byte sum, this field as 0
      68    16   unique id
      84     1   saved state

Dynamic header, 1024 bytes at `data offset`:

       0     8   cookie "cxsparse"
       8     8   data offset (unused)
      16     8   table offset           block allocation table
      24     4   header version
      28     4   max table entries
      32     4   block size
      36     4   checksum
      40    16   parent unique id
      56     4   parent timestamp
      64   512   parent unicode name
     576   192   8 parent locators of 24 bytes: platform code u32, data space u32,
                 data length u32, reserved u32, data offset u64
"""

from __future__ import annotations

import struct
from typing import Final, TypedDict

from cdi.image.formats.base import POINTER_LIMIT, CaptureRegion, FormatInspector, printable

COOKIE: Final = b"conectix"
DYNAMIC_COOKIE: Final = b"cxsparse"
FOOTER_LENGTH: Final = 512
DYNAMIC_HEADER_LENGTH: Final = 1024
SECTOR: Final = 512

TYPE_FIXED: Final = 2
TYPE_DYNAMIC: Final = 3
TYPE_DIFFERENCING: Final = 4
_TYPE_NAMES: Final = {
    TYPE_FIXED: "fixed",
    TYPE_DYNAMIC: "dynamic",
    TYPE_DIFFERENCING: "differencing",
}

#: Creators whose images mean `current_size` rather than the CHS geometry (qemu 7.2's table).
CURRENT_SIZE_CREATORS: Final = frozenset({b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0"})
MAX_GEOMETRY_SECTORS: Final = 65535 * 16 * 255
#: qemu refuses images larger than 2040 GiB.
MAX_SECTORS: Final = 0xFF000000

_FOOTER: Final = struct.Struct(">8sIIQI4sI4sQQHBBII16sB")
_CHECKSUM_OFFSET: Final = 64
_DYNAMIC: Final = struct.Struct(">8sQQIIII16sI")
_PARENT_NAME: Final = slice(64, 576)
_LOCATORS_OFFSET: Final = 576
_LOCATOR: Final = struct.Struct(">IIIIQ")
_LOCATOR_COUNT: Final = 8


class VhdFooter(TypedDict):
    data_offset: int
    creator: bytes
    current_size: int
    cylinders: int
    heads: int
    sectors_per_track: int
    disk_type: int
    checksum: int


def parse_footer(data: bytes) -> VhdFooter:
    fields = _FOOTER.unpack_from(data, 0)
    return VhdFooter(
        data_offset=fields[3],
        creator=fields[5],
        current_size=fields[9],
        cylinders=fields[10],
        heads=fields[11],
        sectors_per_track=fields[12],
        disk_type=fields[13],
        checksum=fields[14],
    )


def footer_checksum(data: bytes) -> int:
    total = sum(data[:_CHECKSUM_OFFSET]) + sum(data[_CHECKSUM_OFFSET + 4 : FOOTER_LENGTH])
    return ~total & 0xFFFFFFFF


def qemu_virtual_size(footer: VhdFooter) -> int:
    """The size qemu 7.2 gives this disk: CHS geometry unless the creator means current_size."""
    sectors = footer["cylinders"] * footer["heads"] * footer["sectors_per_track"]
    if footer["creator"] in CURRENT_SIZE_CREATORS or sectors == MAX_GEOMETRY_SECTORS:
        sectors = footer["current_size"] // SECTOR
    return sectors * SECTOR


class VhdInspector(FormatInspector):
    NAME = "vpc"

    def setup(self) -> None:
        self._head = self.region("footer copy", 0, FOOTER_LENGTH)
        self._tail = self.end_region("footer", FOOTER_LENGTH)
        self._footer: VhdFooter | None = None
        self._footer_at_start = False
        self._dynamic: CaptureRegion | None = None
        self._parsed_dynamic = False
        self._table_offset = 0
        self._max_table_entries = 0
        self._block_size = 0
        self._parent: str | None = None
        self.check("differencing_disk", self._check_differencing)
        self.check("format_header", self._check_layout)
        self.check("virtual_size_inconsistent", self._check_sizes)

    def advance(self) -> None:
        head = self._head
        if not self.decided:
            if len(head) < len(COOKIE):
                return
            if head.data[: len(COOKIE)] != COOKIE:
                # Not dynamic; a fixed disk shows itself only by its last 512 bytes.
                self.reject()
                return
            self.match()
            self._footer_at_start = True
        if self._footer is None and head.complete:
            self._use_footer(head.data)
            self.release(head)
            self._declare_dynamic_header()
        dynamic = self._dynamic
        if dynamic is not None and dynamic.complete and not self._parsed_dynamic:
            self._parse_dynamic(dynamic.data)
            self.release(dynamic)

    def on_finish(self, *, eof: bool, stream_size: int | None) -> None:
        if self._footer_at_start or not eof or stream_size is None:
            return
        tail = self._tail.tail(stream_size)
        if tail is None or len(tail) < FOOTER_LENGTH or tail[: len(COOKIE)] != COOKIE:
            return
        self.match()
        self._use_footer(tail)
        self.details["footer_only"] = True

    def _use_footer(self, data: bytes) -> None:
        footer = self._footer = parse_footer(data)
        self.parsed = True
        self.virtual_size = qemu_virtual_size(footer)
        self.details["disk_type"] = _TYPE_NAMES.get(footer["disk_type"], "unknown")
        self.details["creator"] = printable(footer["creator"])
        if footer_checksum(data) != footer["checksum"]:
            self.flag("format_header", "VHD footer checksum is wrong")

    def _declare_dynamic_header(self) -> None:
        footer = self._footer
        assert footer is not None
        if footer["disk_type"] == TYPE_FIXED:
            # qemu would read a fixed disk's data from offset 0, footer copy included.
            self.flag("format_header", "VHD with a footer copy at offset 0 claims to be fixed")
            return
        offset = footer["data_offset"]
        if offset < FOOTER_LENGTH or offset + DYNAMIC_HEADER_LENGTH > POINTER_LIMIT:
            self.flag("format_header", f"VHD dynamic header offset {offset} is out of range")
            return
        self._dynamic = self.region("dynamic header", offset, DYNAMIC_HEADER_LENGTH)

    def _parse_dynamic(self, data: bytes) -> None:
        self._parsed_dynamic = True
        cookie, _unused, table_offset, _version, entries, block_size, _sum, parent_id, _ts = (
            _DYNAMIC.unpack_from(data, 0)
        )
        if cookie != DYNAMIC_COOKIE:
            self.flag("format_header", "VHD dynamic header has no cxsparse cookie")
            return
        self._table_offset = table_offset
        self._max_table_entries = entries
        self._block_size = block_size
        self.details["block_size"] = block_size
        if any(parent_id) or any(data[_PARENT_NAME]):
            self._parent = "parent id or name"
        for index in range(_LOCATOR_COUNT):
            code = _LOCATOR.unpack_from(data, _LOCATORS_OFFSET + index * _LOCATOR.size)[0]
            if code:
                self._parent = f"parent locator {code.to_bytes(4, 'big')!r}"
                break

    def _ftr(self) -> VhdFooter:
        if self._footer is None:
            raise RuntimeError("vhd footer not parsed")
        return self._footer

    def _check_differencing(self) -> str | None:
        if self._ftr()["disk_type"] == TYPE_DIFFERENCING:
            return "VHD is a differencing disk that reads from a parent disk"
        if self._parent is not None:
            return f"VHD names a parent disk ({self._parent})"
        return None

    def _check_layout(self) -> str | None:
        footer = self._ftr()
        if footer["disk_type"] not in _TYPE_NAMES:
            return f"VHD disk type {footer['disk_type']} is unknown"
        if not self._footer_at_start and footer["disk_type"] != TYPE_FIXED:
            return "VHD footer at the end of the image is not a fixed disk's"
        if (self.virtual_size or 0) // SECTOR > MAX_SECTORS:
            return "VHD is larger than 2040 GiB, which qemu refuses"
        if self._parsed_dynamic and self._block_size:
            block = self._block_size
            if block & (block - 1) or block < SECTOR:
                return f"VHD block size {block} is invalid"
        return None

    def _check_sizes(self) -> str | None:
        footer = self._ftr()
        size = self.known_size
        virtual = self.virtual_size or 0
        if self._parsed_dynamic and self._block_size:
            if self._max_table_entries * self._block_size < virtual:
                return "VHD block allocation table is too small for its virtual size"
            end = self._table_offset + self._max_table_entries * 4
            if size is not None and end > size:
                return f"VHD block allocation table lies beyond the end of the image ({size})"
        if footer["disk_type"] == TYPE_FIXED and size is not None and virtual > size - SECTOR:
            return f"fixed VHD claims {virtual} bytes but holds {max(size - SECTOR, 0)}"
        return None
