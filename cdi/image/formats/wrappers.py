"""Containers that hold an image rather than being one: gzip, xz, zstd, bzip2 and tar.

They are recognised by magic bytes only. A compressed stream is inspected again after
decompression (see `registry.inspect_stream`); a tar archive is reported as such and handled
by content type by the caller. Magic bytes:

    format  offset  bytes
    gzip       0    1f 8b 08          (08: deflate, the only method gzip defines)
    xz         0    fd 37 7a 58 5a 00 ("\\xfd7zXZ\\0")
    zstd       0    28 b5 2f fd
    bzip2      0    "BZh" + block size digit 1..9
    tar      257    "ustar"           (POSIX "ustar\\0" and GNU "ustar ")
"""

from __future__ import annotations

from typing import ClassVar, Final

from cdi.image.formats.base import FormatInspector, SafetyCheck

TAR_MAGIC_OFFSET: Final = 257


class WrapperInspector(FormatInspector):
    """A format told by fixed magic bytes; subclasses set `MAGIC`, `OFFSET` and `NAME`."""

    WRAPPER = True
    MAGIC: ClassVar[bytes]
    OFFSET: ClassVar[int] = 0

    def setup(self) -> None:
        self._magic = self.region("magic", self.OFFSET, len(self.MAGIC) + self.extra())
        self.add_check(
            SafetyCheck.null("a container carries no disk metadata; its content is inspected")
        )

    def extra(self) -> int:
        """How many bytes after the magic `accept` wants to see."""
        return 0

    def accept(self, data: bytes) -> bool:
        """Judge the bytes of the magic region (magic plus `extra()` bytes)."""
        return data.startswith(self.MAGIC)

    def advance(self) -> None:
        region = self._magic
        if self.decided or len(region) == 0:
            return
        data = region.data
        if not self.MAGIC.startswith(data[: len(self.MAGIC)]):
            self.reject()
        elif region.complete:
            if self.accept(data):
                self.match()
                self.parsed = True
                self.release(region)
            else:
                self.reject()


class GzipInspector(WrapperInspector):
    NAME = "gzip"
    MAGIC = b"\x1f\x8b\x08"


class XzInspector(WrapperInspector):
    NAME = "xz"
    MAGIC = b"\xfd7zXZ\x00"


class ZstdInspector(WrapperInspector):
    NAME = "zstd"
    MAGIC = b"\x28\xb5\x2f\xfd"


class Bzip2Inspector(WrapperInspector):
    NAME = "bzip2"
    MAGIC = b"BZh"

    def extra(self) -> int:
        return 1

    def accept(self, data: bytes) -> bool:
        return data.startswith(self.MAGIC) and data[3:4].isdigit() and data[3:4] != b"0"


class TarInspector(WrapperInspector):
    NAME = "tar"
    MAGIC = b"ustar"
    OFFSET = TAR_MAGIC_OFFSET
