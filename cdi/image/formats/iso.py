"""ISO 9660 (CD/DVD images): recognised by its volume descriptors, read by qemu as raw.

An ISO has no header at offset 0 (those 32 KiB are a free "system area"), which is why a qcow2
header can be planted there: the registry refuses an image that two formats claim. The size
comes from the primary volume descriptor. Layout (ECMA-119), one descriptor per 2 KiB sector
from sector 16, until a terminator (type 255):

    descriptor offset  size  field
      0                  1   type                   0 boot record, 1 primary, 2 supplementary,
                                                    3 partition, 255 terminator
      1                  5   standard identifier    "CD001"
      6                  1   version                1
     80                  8   volume space size      blocks, u32 little-endian then big-endian
    128                  4   logical block size     u16 little-endian then big-endian
"""

from __future__ import annotations

from typing import Final

from cdi.image.formats.base import CaptureRegion, FormatInspector

SECTOR: Final = 2048
FIRST_DESCRIPTOR: Final = 16 * SECTOR
IDENTIFIER: Final = b"CD001"
#: The bytes of a descriptor we need: up to the end of the logical block size.
DESCRIPTOR_PREFIX: Final = 132
#: Real images have a handful of descriptors before the terminator.
MAX_DESCRIPTORS: Final = 16

TYPE_PRIMARY: Final = 1
TYPE_TERMINATOR: Final = 255


def _both_endian(data: bytes, offset: int, width: int) -> tuple[int, int]:
    """ISO stores these numbers twice, little-endian then big-endian; both must agree."""
    little = int.from_bytes(data[offset : offset + width], "little")
    big = int.from_bytes(data[offset + width : offset + 2 * width], "big")
    return little, big


class IsoInspector(FormatInspector):
    NAME = "iso"

    def setup(self) -> None:
        self._descriptor: CaptureRegion = self.region(
            "volume descriptor", FIRST_DESCRIPTOR, DESCRIPTOR_PREFIX
        )
        self._index = 0
        self._volume_size: int | None = None
        self.check("virtual_size_inconsistent", self._check_size)

    def advance(self) -> None:
        region = self._descriptor
        if not self.decided:
            if len(region) < 1 + len(IDENTIFIER):
                return
            if region.data[1 : 1 + len(IDENTIFIER)] != IDENTIFIER:
                self.reject()
                return
            self.match()
        if not region.complete or self.parsed:
            return
        data = region.data
        kind = data[0]
        if data[1:6] != IDENTIFIER:
            self.flag("format_header", "ISO volume descriptors end without a terminator")
            self.parsed = True
        elif kind == TYPE_PRIMARY:
            self._parse_primary(data)
        elif kind == TYPE_TERMINATOR:
            self.flag("format_header", "ISO has no primary volume descriptor")
            self.parsed = True
        elif self._index + 1 >= MAX_DESCRIPTORS:
            self.flag("format_header", f"ISO has more than {MAX_DESCRIPTORS} volume descriptors")
            self.parsed = True
        else:
            self._index += 1
            self.release(region)
            self._descriptor = self.region(
                "volume descriptor", FIRST_DESCRIPTOR + self._index * SECTOR, DESCRIPTOR_PREFIX
            )

    def on_finish(self, *, eof: bool, stream_size: int | None) -> None:
        if self._volume_size is None:
            return
        size = stream_size if stream_size is not None else self._volume_size
        self.virtual_size = -(-size // 512) * 512  # qemu reads it as raw, in whole sectors

    def _parse_primary(self, data: bytes) -> None:
        blocks_le, blocks_be = _both_endian(data, 80, 4)
        block_le, block_be = _both_endian(data, 128, 2)
        self.parsed = True
        self.release(self._descriptor)
        if blocks_le != blocks_be or block_le != block_be:
            self.flag("format_header", "ISO primary volume descriptor contradicts itself")
            return
        if block_le not in (512, 1024, 2048):
            self.flag("format_header", f"ISO logical block size {block_le} is invalid")
            return
        self._volume_size = blocks_le * block_le
        self.details["volume_size"] = self._volume_size
        self.details["logical_block_size"] = block_le

    def _check_size(self) -> str | None:
        size = self.known_size
        if self._volume_size is not None and size is not None and self._volume_size > size:
            return f"ISO volume of {self._volume_size} bytes is larger than the image ({size})"
        return None
