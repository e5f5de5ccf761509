"""VDI (VirtualBox): header parse; differencing and undo images are refused.

Header v1.1, little-endian (qemu block/vdi.c mirrors VirtualBox's layout):

    offset size  field
    0x000   64   text banner ("<<< Oracle VM VirtualBox Disk Image >>>")
    0x040    4   signature 0xbeda107f (bytes 7f 10 da be)
    0x044    4   version 0x00010001 (1.1)
    0x048    4   header size
    0x04c    4   image type        1 dynamic, 2 fixed, 3 undo, 4 differencing
    0x050    4   image flags
    0x054  256   description
    0x154    4   offset of the block map
    0x158    4   offset of the data
    0x15c   12   legacy geometry
    0x168    4   sector size       512
    0x16c    4   unused
    0x170    8   disk size         bytes; qemu rounds it up to a sector
    0x178    4   block size        1 MiB
    0x17c    4   block extra data
    0x180    4   blocks in image
    0x184    4   blocks allocated
    0x188   16   image UUID
    0x198   16   last snapshot UUID
    0x1a8   16   link UUID         } non-zero: the image depends on another one
    0x1b8   16   parent UUID       }
"""

from __future__ import annotations

import struct
from typing import Final, TypedDict

from cdi.image.formats.base import FormatInspector

SIGNATURE_OFFSET: Final = 0x40
SIGNATURE: Final = b"\x7f\x10\xda\xbe"
HEADER_LENGTH: Final = 0x1C8
VERSION_1_1: Final = 0x00010001
SECTOR: Final = 512
BLOCK_SIZE: Final = 1024 * 1024

TYPE_DYNAMIC: Final = 1
TYPE_FIXED: Final = 2
TYPE_UNDO: Final = 3
TYPE_DIFFERENCING: Final = 4
_TYPE_NAMES: Final = {
    TYPE_DYNAMIC: "dynamic",
    TYPE_FIXED: "fixed",
    TYPE_UNDO: "undo",
    TYPE_DIFFERENCING: "differencing",
}

# qemu's limits (block/vdi.c): VDI_BLOCKS_IN_IMAGE_MAX and VDI_DISK_SIZE_MAX.
MAX_BLOCKS: Final = 0x3FFFFFFF
MAX_DISK_SIZE: Final = MAX_BLOCKS * BLOCK_SIZE

_FIELDS: Final = struct.Struct("<IIII")  # at 0x44: version, header size, image type, flags
_LAYOUT: Final = struct.Struct("<II12xII")  # at 0x154: bmap, data, (geometry), sector, unused
_SIZES: Final = struct.Struct("<QIIII")  # at 0x170


class VdiHeader(TypedDict):
    version: int
    image_type: int
    offset_bmap: int
    offset_data: int
    sector_size: int
    disk_size: int
    block_size: int
    blocks_in_image: int
    link_uuid: bytes
    parent_uuid: bytes


def parse_header(data: bytes) -> VdiHeader:
    version, _header_size, image_type, _flags = _FIELDS.unpack_from(data, 0x44)
    offset_bmap, offset_data, sector_size, _unused = _LAYOUT.unpack_from(data, 0x154)
    disk_size, block_size, _extra, blocks_in_image, _allocated = _SIZES.unpack_from(data, 0x170)
    return VdiHeader(
        version=version,
        image_type=image_type,
        offset_bmap=offset_bmap,
        offset_data=offset_data,
        sector_size=sector_size,
        disk_size=disk_size,
        block_size=block_size,
        blocks_in_image=blocks_in_image,
        link_uuid=data[0x1A8:0x1B8],
        parent_uuid=data[0x1B8:0x1C8],
    )


class VdiInspector(FormatInspector):
    NAME = "vdi"

    def setup(self) -> None:
        self._head = self.region("header", 0, HEADER_LENGTH)
        self._header: VdiHeader | None = None
        self.check("unsupported_version", self._check_version)
        self.check("differencing_disk", self._check_differencing)
        self.check("format_header", self._check_layout)
        self.check("virtual_size_inconsistent", self._check_sizes)

    def advance(self) -> None:
        head = self._head
        if not self.decided:
            end = SIGNATURE_OFFSET + len(SIGNATURE)
            if len(head) < end:
                return
            if head.data[SIGNATURE_OFFSET:end] != SIGNATURE:
                self.reject()
                return
            self.match()
        if self._header is None and head.complete:
            header = self._header = parse_header(head.data)
            self.parsed = True
            # VBoxManage can write odd sizes; qemu rounds them up to a whole sector.
            self.virtual_size = -(-header["disk_size"] // SECTOR) * SECTOR
            self.details["image_type"] = _TYPE_NAMES.get(header["image_type"], "unknown")
            self.release(head)

    def _hdr(self) -> VdiHeader:
        if self._header is None:
            raise RuntimeError("vdi header not parsed")
        return self._header

    def _check_version(self) -> str | None:
        version = self._hdr()["version"]
        if version != VERSION_1_1:
            return f"VDI version {version >> 16}.{version & 0xFFFF} is not supported (only 1.1)"
        return None

    def _check_differencing(self) -> str | None:
        header = self._hdr()
        if header["image_type"] in (TYPE_UNDO, TYPE_DIFFERENCING):
            kind = _TYPE_NAMES[header["image_type"]]
            return f"VDI image is a {kind} image that depends on another disk"
        if any(header["parent_uuid"]) or any(header["link_uuid"]):
            return "VDI image names a parent disk"
        return None

    def _check_layout(self) -> str | None:
        header = self._hdr()
        if header["image_type"] not in _TYPE_NAMES:
            return f"VDI image type {header['image_type']} is unknown"
        if header["offset_bmap"] % SECTOR or header["offset_data"] % SECTOR:
            return "VDI block map or data offset is not sector aligned"
        if header["sector_size"] != SECTOR:
            return f"VDI sector size {header['sector_size']} is not {SECTOR}"
        if header["block_size"] != BLOCK_SIZE:
            return f"VDI block size {header['block_size']} is not {BLOCK_SIZE}"
        if header["blocks_in_image"] > MAX_BLOCKS or header["disk_size"] > MAX_DISK_SIZE:
            return "VDI image is larger than the format allows"
        return None

    def _check_sizes(self) -> str | None:
        header = self._hdr()
        room = header["blocks_in_image"] * header["block_size"]
        if (self.virtual_size or 0) > room:
            return f"VDI disk size {header['disk_size']} exceeds its block map ({room} bytes)"
        size = self.known_size
        if size is not None:
            bmap_end = header["offset_bmap"] + header["blocks_in_image"] * 4
            if bmap_end > size or header["offset_data"] > size:
                return f"VDI block map or data area lies beyond the end of the image ({size})"
        return None
