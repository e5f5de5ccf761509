"""VHDX (Hyper-V): headers, region table and metadata; differencing disks are refused.

The virtual size lives in a metadata item, reached in three hops: the region table at 192 KiB
locates the metadata region, whose table locates the items. Every hop is bounded: offsets past
`POINTER_LIMIT` are a malformed header, and tables are read only as far as their entry count.
Layout, little-endian (MS-VHDX; GUIDs in Microsoft's mixed-endian byte order):

    file offset  structure
    0            file identifier: "vhdxfile", creator (UTF-16)
    64 KiB       header 1          } "head", crc32c, sequence number, ..., log GUID at 48,
    128 KiB      header 2          } version at 66; qemu uses the valid one with the higher sequence
    192 KiB      region table      "regi", crc32c (over 64 KiB), entry count, then 32-byte entries:
                                   GUID, file offset u64, length u32, flags u32 (bit 0 required)
    (region)     metadata table    "metadata", entry count u16 at 10, then from 32 the 32-byte
                                   entries: item GUID, offset u32 (from the region start),
                                   length u32, flags u32 (bit 2 required)

Metadata items used: File Parameters (block size u32, flags u32: bit 1 has parent), Virtual Disk
Size (u64), Logical Sector Size (u32). A Parent Locator item, or the has-parent bit, means the
disk reads from another file: refused.
"""

from __future__ import annotations

import struct
import uuid
from typing import Final

from cdi.image.formats.base import POINTER_LIMIT, CaptureRegion, FormatInspector

SIGNATURE: Final = b"vhdxfile"
HEADER_OFFSETS: Final = (64 * 1024, 128 * 1024)
HEADER_LENGTH: Final = 4096
REGION_TABLE_OFFSET: Final = 192 * 1024
REGION_TABLE_LENGTH: Final = 64 * 1024
METADATA_TABLE_LENGTH: Final = 64 * 1024
TABLE_HEADER_LENGTH: Final = 16
METADATA_HEADER_LENGTH: Final = 32
ENTRY_LENGTH: Final = 32
MAX_ENTRIES: Final = 2047
MIB: Final = 1024 * 1024
SECTOR: Final = 512

HEADER_SIGNATURE: Final = b"head"
REGION_SIGNATURE: Final = b"regi"
METADATA_SIGNATURE: Final = b"metadata"
REGION_REQUIRED: Final = 1
METADATA_REQUIRED: Final = 1 << 2
PARAMS_HAS_PARENT: Final = 1 << 1


def _guid(text: str) -> bytes:
    return uuid.UUID(text).bytes_le


BAT_REGION: Final = _guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_REGION: Final = _guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS: Final = _guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE: Final = _guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
PAGE_83_DATA: Final = _guid("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE: Final = _guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE: Final = _guid("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR: Final = _guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
KNOWN_ITEMS: Final = frozenset(
    {
        FILE_PARAMETERS,
        VIRTUAL_DISK_SIZE,
        PAGE_83_DATA,
        LOGICAL_SECTOR_SIZE,
        PHYSICAL_SECTOR_SIZE,
        PARENT_LOCATOR,
    }
)
#: The items we read, and how many bytes of each.
_ITEMS_READ: Final = {FILE_PARAMETERS: 8, VIRTUAL_DISK_SIZE: 8, LOGICAL_SECTOR_SIZE: 4}
#: The VHDX specification's largest virtual disk.
MAX_VIRTUAL_SIZE: Final = 64 * 1024**4

_HEADER: Final = struct.Struct("<4sIQ16s16s16sHHIQ")
_TABLE_HEADER: Final = struct.Struct("<4sIII")
_REGION_ENTRY: Final = struct.Struct("<16sQII")
_METADATA_ENTRY: Final = struct.Struct("<16sIII")


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C: Final = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), which VHDX uses; the stdlib only has CRC-32."""
    crc = 0xFFFFFFFF
    table = _CRC32C
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def checksum_ok(data: bytes) -> bool:
    """VHDX checksums cover the whole structure with the checksum field (at 4) zeroed."""
    stored: int = struct.unpack_from("<I", data, 4)[0]
    return crc32c(data[:4] + b"\0\0\0\0" + data[8:]) == stored


class VhdxInspector(FormatInspector):
    NAME = "vhdx"

    def setup(self) -> None:
        self._ident = self.region("file identifier", 0, len(SIGNATURE))
        self._headers: list[CaptureRegion] = []
        self._region_table: CaptureRegion | None = None
        self._region_table_parsed = False
        self._metadata_length = 0
        self._metadata_head: CaptureRegion | None = None
        self._metadata_entries: CaptureRegion | None = None
        self._metadata_offset = 0
        self._items: dict[bytes, CaptureRegion] = {}
        self._items_parsed = False
        self._log_guid: bytes | None = None
        self._version: int | None = None
        self._has_parent_item = False
        self._has_parent_bit = False
        self._unknown_required: list[str] = []
        self._item_values: dict[bytes, int] = {}
        self.check("differencing_disk", self._check_parent)
        self.check("unknown_features", self._check_unknown)
        self.check("unsupported_version", self._check_version)
        self.check("vhdx_log", self._check_log)
        self.check("format_header", self._check_metadata)

    # -- parsing --------------------------------------------------------------------------------

    def advance(self) -> None:
        if not self.decided:
            if not self._ident.complete:
                return
            if self._ident.data != SIGNATURE:
                self.reject()
                return
            self.match()
            self.release(self._ident)
            self._headers = [self.region("header", off, HEADER_LENGTH) for off in HEADER_OFFSETS]
            # The checksum covers the whole 64 KiB table, so we hold all of it, briefly.
            self._region_table = self.region(
                "region table", REGION_TABLE_OFFSET, REGION_TABLE_LENGTH
            )
        self._advance_headers()
        self._advance_region_table()
        self._advance_metadata()

    def _advance_headers(self) -> None:
        if self._headers and all(h.complete for h in self._headers):
            best: tuple[int, bytes] | None = None
            for region in self._headers:
                data = region.data
                if data[:4] != HEADER_SIGNATURE or not checksum_ok(data):
                    continue
                _sig, _sum, sequence, _fw, _dw, log_guid, _lv, version, _ll, _lo = (
                    _HEADER.unpack_from(data, 0)
                )
                if best is None or sequence > best[0]:
                    best = (sequence, data)
                    self._log_guid = log_guid
                    self._version = version
            for region in self._headers:
                self.release(region)
            self._headers = []
            if best is None:
                self.flag("format_header", "VHDX has no valid header")

    def _advance_region_table(self) -> None:
        table = self._region_table
        if table is not None and table.complete and not self._region_table_parsed:
            self._region_table_parsed = True
            self._parse_region_table(table.data)
            self.release(table)

    def _parse_region_table(self, data: bytes) -> None:
        signature, _sum, count, _reserved = _TABLE_HEADER.unpack_from(data, 0)
        if signature != REGION_SIGNATURE or count > MAX_ENTRIES:
            self.flag("format_header", "VHDX region table is malformed")
            return
        if not checksum_ok(data):
            self.flag("format_header", "VHDX region table checksum is wrong")
            return
        metadata: tuple[int, int] | None = None
        for index in range(count):
            guid, offset, length, flags = _REGION_ENTRY.unpack_from(
                data, TABLE_HEADER_LENGTH + index * ENTRY_LENGTH
            )
            if guid == METADATA_REGION:
                if metadata is not None:
                    self.flag("format_header", "VHDX has two metadata regions")
                    return
                metadata = (offset, length)
            elif guid != BAT_REGION and flags & REGION_REQUIRED:
                self._unknown_required.append(f"region {uuid.UUID(bytes_le=guid)}")
        if metadata is None:
            self.flag("format_header", "VHDX has no metadata region")
            return
        offset, length = metadata
        if (
            offset % MIB
            or offset < MIB
            or length < METADATA_TABLE_LENGTH
            or offset + METADATA_TABLE_LENGTH > POINTER_LIMIT
        ):
            self.flag(
                "format_header",
                f"VHDX metadata region at {offset} (+{length}) is out of range "
                f"(followed up to {POINTER_LIMIT} bytes)",
            )
            return
        self._metadata_offset = offset
        self._metadata_length = length
        self._metadata_head = self.region("metadata table", offset, METADATA_HEADER_LENGTH)

    def _advance_metadata(self) -> None:
        head = self._metadata_head
        if head is not None and head.complete and self._metadata_entries is None:
            self._metadata_head = None
            signature = head.data[:8]
            (count,) = struct.unpack_from("<H", head.data, 10)
            self.release(head)
            if signature != METADATA_SIGNATURE or count > MAX_ENTRIES:
                self.flag("format_header", "VHDX metadata table is malformed")
                return
            if count == 0:
                self.flag("format_header", "VHDX metadata table is empty")
                return
            self._metadata_entries = self.region("metadata entries", head.end, count * ENTRY_LENGTH)
        entries = self._metadata_entries
        if entries is not None and entries.complete and not self._items_parsed:
            self._items_parsed = True
            self._parse_metadata_entries(entries.data)
            self.release(entries)
        if self._items and all(r.complete for r in self._items.values()):
            for guid, region in self._items.items():
                if guid == VIRTUAL_DISK_SIZE:
                    (self._item_values[guid],) = struct.unpack_from("<Q", region.data)
                elif guid == FILE_PARAMETERS:
                    block_size, flags = struct.unpack_from("<II", region.data)
                    self._item_values[guid] = block_size
                    self._has_parent_bit = bool(flags & PARAMS_HAS_PARENT)
                else:
                    (self._item_values[guid],) = struct.unpack_from("<I", region.data)
                self.release(region)
            self._items = {}
            self._finish_metadata()

    def _parse_metadata_entries(self, data: bytes) -> None:
        seen: set[bytes] = set()
        wanted: dict[bytes, tuple[int, int]] = {}
        for index in range(len(data) // ENTRY_LENGTH):
            guid, offset, length, flags = _METADATA_ENTRY.unpack_from(data, index * ENTRY_LENGTH)
            if guid in seen:
                self.flag("format_header", "VHDX metadata lists an item twice")
                return
            seen.add(guid)
            if guid == PARENT_LOCATOR:
                self._has_parent_item = True
            elif guid not in KNOWN_ITEMS and flags & METADATA_REQUIRED:
                self._unknown_required.append(f"metadata item {uuid.UUID(bytes_le=guid)}")
            if guid in _ITEMS_READ:
                if length < _ITEMS_READ[guid] or offset + length > self._metadata_length:
                    self.flag("format_header", "VHDX metadata item lies outside its region")
                    return
                wanted[guid] = (self._metadata_offset + offset, _ITEMS_READ[guid])
        missing = set(_ITEMS_READ) - set(wanted)
        if missing:
            self.flag("format_header", "VHDX metadata lacks a required item")
            return
        for guid, (offset, length) in sorted(wanted.items(), key=lambda item: item[1][0]):
            if offset + length > POINTER_LIMIT:
                self.flag("format_header", f"VHDX metadata item beyond {POINTER_LIMIT} bytes")
                return
            self._items[guid] = self.region("metadata item", offset, length)

    def _finish_metadata(self) -> None:
        size = self._item_values.get(VIRTUAL_DISK_SIZE, 0)
        sector = self._item_values.get(LOGICAL_SECTOR_SIZE, 0)
        block = self._item_values.get(FILE_PARAMETERS, 0)
        self.virtual_size = size // SECTOR * SECTOR
        self.details.update(block_size=block, logical_sector_size=sector)
        self.parsed = True

    # -- checks ---------------------------------------------------------------------------------

    def _check_parent(self) -> str | None:
        if self._has_parent_item:
            return "VHDX has a parent locator: it is a differencing disk"
        if self._has_parent_bit:
            return "VHDX file parameters say it has a parent disk"
        return None

    def _check_unknown(self) -> str | None:
        if self._unknown_required:
            return "VHDX requires features we do not know: " + ", ".join(self._unknown_required)
        return None

    def _check_version(self) -> str | None:
        if self._version is not None and self._version != 1:
            return f"VHDX version {self._version} is not supported"
        return None

    def _check_log(self) -> str | None:
        if self._log_guid is not None and any(self._log_guid):
            return "VHDX has a log to replay (it was not closed cleanly)"
        return None

    def _check_metadata(self) -> str | None:
        size = self._item_values.get(VIRTUAL_DISK_SIZE, 0)
        sector = self._item_values.get(LOGICAL_SECTOR_SIZE, 0)
        block = self._item_values.get(FILE_PARAMETERS, 0)
        if sector not in (512, 4096):
            return f"VHDX logical sector size {sector} is invalid"
        if block < MIB or block > 256 * MIB or block & (block - 1):
            return f"VHDX block size {block} is invalid"
        if size == 0 or size % sector or size > MAX_VIRTUAL_SIZE:
            return f"VHDX virtual disk size {size} is invalid"
        return None
