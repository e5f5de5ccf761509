"""VMDK (VMware): sparse header, embedded descriptor, stream footer, and text descriptor files.

Only the self-contained subformats are accepted, monolithicSparse and streamOptimized, whose one
extent is the image itself. Every other VMDK is a descriptor that makes qemu open other files
(flat extents, parent disks), so:
- the descriptor is parsed line by line and any line not understood refuses the image;
- the one extent must be SPARSE and name a plain file (no "/", "\\" or ":");
- "parentFileNameHint" anywhere in the window qemu searches refuses (qemu does a substring search);
- capacity 0 with a descriptor offset refuses (qemu then opens the descriptor's extents);
- a text descriptor file (no binary header) is always refused: its extents are other files.

Sparse header, little-endian (VMware Virtual Disk Format 5.0; qemu block/vmdk.c):

    offset size  field
       0     4   magic "KDMV"
       4     4   version                1..3
       8     4   flags                  bit 16 compressed grains, bit 17 markers
      12     8   capacity               sectors
      20     8   grain_size             sectors
      28     8   descriptor_offset      sectors; qemu reads the descriptor at sector 1 anyway
      36     8   descriptor_size        sectors
      44     4   num_gtes_per_gt
      48     8   rgd_offset             sectors
      56     8   gd_offset              sectors; GD_AT_END means "see the footer"
      64     8   overhead               sectors before the first grain
      72     1   unclean_shutdown
      73     4   newline test chars
      77     2   compress_algorithm     0 none, 1 deflate

Stream footer, the last 1536 bytes when gd_offset is GD_AT_END (qemu then uses the footer's
copy of the header instead of the header):

       0   marker      val u64, size u32 = 0, type u32 = 3 (footer)
     512   header copy "KDMV" + the fields above with the real gd_offset
    1024   marker      val 0, size 0, type 0 (end of stream)
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Final, Literal, TypedDict

from cdi.image.formats.base import CaptureRegion, EndRegion, FormatInspector, printable

MAGIC: Final = b"KDMV"
COWD_MAGIC: Final = b"COWD"
SECTOR: Final = 512
HEADER_LENGTH: Final = 512
GD_AT_END: Final = 0xFFFFFFFFFFFFFFFF
FOOTER_LENGTH: Final = 3 * SECTOR
MARKER_END_OF_STREAM: Final = 0
MARKER_FOOTER: Final = 3
COMPRESSION_NONE: Final = 0
COMPRESSION_DEFLATE: Final = 1

_HEADER: Final = struct.Struct("<4sIIQQQQIQQQ?4sH")
_MARKER: Final = struct.Struct("<QII")

#: Every descriptor byte we hold. qemu-img writes 20 sectors; anything past 64 KiB is refused.
DESCRIPTOR_CAP: Final = 64 * 1024
#: qemu searches this many bytes after the header for "parentFileNameHint" (DESC_SIZE).
QEMU_DESCRIPTOR_WINDOW: Final = 20 * SECTOR
#: qemu probes a text descriptor within this many bytes (BLOCK_PROBE_BUF_SIZE).
TEXT_PROBE_WINDOW: Final = 2048

ALLOWED_CREATE_TYPES: Final = frozenset({"monolithicSparse", "streamOptimized"})
_PARENT_HINT: Final = b"parentFileNameHint"
_NO_PARENT_CID: Final = "ffffffff"

# qemu's limits (block/vmdk.c).
MAX_GRAIN_SECTORS: Final = 0x200000
MAX_GTES_PER_GT: Final = 512
MAX_L1_ENTRIES: Final = 512 * 1024 * 1024

_TOP_LEVEL_KEYS: Final = frozenset(
    {
        "version",
        "encoding",
        "CID",
        "parentCID",
        "createType",
        "isNativeSnapshot",
        "parentFileNameHint",  # understood, and refused by the backing_file check
    }
)
_KEY_LINE: Final = re.compile(r"([A-Za-z][A-Za-z0-9_.]*)\s*=\s*(.*?)\s*")
_EXTENT_LINE: Final = re.compile(
    r'(RW|RDONLY|NOACCESS)\s+(\d+)\s+([A-Z]+)(?:\s+"([^"]*)")?(?:\s+(\d+))?\s*'
)
_BAD_NAME_CHARS: Final = frozenset('/\\:"\0')


class VmdkHeader(TypedDict):
    version: int
    flags: int
    capacity: int
    grain_size: int
    descriptor_offset: int
    descriptor_size: int
    num_gtes_per_gt: int
    rgd_offset: int
    gd_offset: int
    overhead: int
    compress_algorithm: int


def parse_header(data: bytes) -> VmdkHeader:
    """Parse a sparse header (or the footer's copy); `data` starts with the magic."""
    (
        _magic,
        version,
        flags,
        capacity,
        grain_size,
        descriptor_offset,
        descriptor_size,
        num_gtes_per_gt,
        rgd_offset,
        gd_offset,
        overhead,
        _unclean,
        _newlines,
        compress_algorithm,
    ) = _HEADER.unpack_from(data, 0)
    return VmdkHeader(
        version=version,
        flags=flags,
        capacity=capacity,
        grain_size=grain_size,
        descriptor_offset=descriptor_offset,
        descriptor_size=descriptor_size,
        num_gtes_per_gt=num_gtes_per_gt,
        rgd_offset=rgd_offset,
        gd_offset=gd_offset,
        overhead=overhead,
        compress_algorithm=compress_algorithm,
    )


_HeaderField = Literal[
    "version",
    "capacity",
    "grain_size",
    "num_gtes_per_gt",
    "descriptor_offset",
    "descriptor_size",
    "compress_algorithm",
    "gd_offset",
    "rgd_offset",
]
#: The footer replaces the header for qemu, so the fields that shape the disk must agree.
_FOOTER_MUST_AGREE: Final[tuple[_HeaderField, ...]] = (
    "version",
    "capacity",
    "grain_size",
    "num_gtes_per_gt",
    "descriptor_offset",
    "descriptor_size",
    "compress_algorithm",
)
_TABLE_OFFSETS: Final[tuple[_HeaderField, ...]] = ("gd_offset", "rgd_offset")


@dataclass(frozen=True, slots=True)
class Extent:
    access: str
    sectors: int
    kind: str
    filename: str | None
    offset: int | None


@dataclass(slots=True)
class Descriptor:
    """What a descriptor says, and every line that we did not understand."""

    keys: dict[str, str]
    extents: list[Extent]
    bad_lines: list[str]


def parse_descriptor(text: bytes) -> Descriptor:
    """Parse descriptor text line by line; unknown lines are collected, never skipped."""
    descriptor = Descriptor(keys={}, extents=[], bad_lines=[])
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError:
        descriptor.bad_lines.append("(descriptor is not UTF-8 text)")
        return descriptor
    for raw_line in decoded.split("\n"):
        line = raw_line.rstrip("\r").strip()
        if not line or line.startswith("#"):
            continue
        extent = _EXTENT_LINE.fullmatch(line)
        if extent is not None:
            access, sectors, kind, filename, offset = extent.groups()
            descriptor.extents.append(
                Extent(
                    access, int(sectors), kind, filename, None if offset is None else int(offset)
                )
            )
            continue
        key_value = _KEY_LINE.fullmatch(line)
        if key_value is not None:
            key, value = key_value.groups()
            if key in _TOP_LEVEL_KEYS:
                descriptor.keys[key] = value.strip('"')
                continue
            if key.startswith("ddb."):
                continue
        descriptor.bad_lines.append(line)
    return descriptor


def probe_text_descriptor(data: bytes) -> bool | None:
    """qemu's test for a text descriptor: comments and blank lines, then "version=N".

    Returns None while more bytes could still change the answer.
    """
    pos, size = 0, min(len(data), TEXT_PROBE_WINDOW)
    while pos < size:
        if data[pos] == ord("#"):
            newline = data.find(b"\n", pos, size)
            if newline < 0:
                break
            pos = newline + 1
            continue
        if data[pos] == ord(" "):
            while pos < size and data[pos] == ord(" "):
                pos += 1
            if pos < size and data[pos] == ord("\r"):
                pos += 1
            if pos >= size:
                break
            if data[pos] != ord("\n"):
                return False
            pos += 1
            continue
        rest = data[pos:size]
        for version in (b"1", b"2", b"3"):
            for ending in (b"\n", b"\r\n"):
                wanted = b"version=" + version + ending
                if rest.startswith(wanted):
                    return True
                if len(rest) < len(wanted) and wanted.startswith(rest):
                    return None if len(data) < TEXT_PROBE_WINDOW else False
        return False
    return None if len(data) < TEXT_PROBE_WINDOW else False


class VmdkInspector(FormatInspector):
    NAME = "vmdk"

    def setup(self) -> None:
        self._head = self.region("header", 0, HEADER_LENGTH)
        self._text: CaptureRegion | None = None
        self._embedded: CaptureRegion | None = None
        self._mode: str | None = None  # "sparse", "text" or "cowd"
        self._header: VmdkHeader | None = None
        self._footer_region: EndRegion | None = None
        self._footer: VmdkHeader | None = None
        self._footer_error: str | None = None
        self._descriptor: Descriptor | None = None
        self._parent_hint = False
        self._eof = False
        self.check("vmdk_create_type", self._check_create_type)
        self.check("vmdk_extent", self._check_extents)
        self.check("vmdk_descriptor", self._check_descriptor)
        self.check("backing_file", self._check_parent)
        self.check("unsupported_version", self._check_version)
        self.check("unknown_features", self._check_compression)
        self.check("format_header", self._check_layout)
        self.check("vmdk_footer", self._check_footer)
        self.check("virtual_size_inconsistent", self._check_sizes)

    # -- parsing --------------------------------------------------------------------------------

    def advance(self) -> None:
        if self._mode is None:
            self._identify()
        if self._mode == "sparse":
            if self._header is None and self._head.complete:
                self._parse_sparse_header(self._head.data)
            embedded = self._embedded
            if embedded is not None and embedded.complete and self._descriptor is None:
                self._parse_embedded_descriptor(embedded.data)
        elif (
            self._mode == "text"
            and self._text is not None
            and self._text.complete
            and self._descriptor is None
        ):
            self.flag("vmdk_descriptor", f"VMDK descriptor is larger than {DESCRIPTOR_CAP}")
            self._parse_text_descriptor(self._text)

    def on_finish(self, *, eof: bool, stream_size: int | None) -> None:
        self._eof = eof
        if self._mode == "text" and self._descriptor is None and eof and self._text is not None:
            self._parse_text_descriptor(self._text)
        if self._footer_region is None:
            return
        if eof and stream_size is not None:
            self._read_footer(self._footer_region, stream_size)
        else:
            note = "streamOptimized footer not checked: the end of the stream was not seen"
            if note not in self.notes:
                self.notes.append(note)

    def _identify(self) -> None:
        data = self._head.data
        if not data:
            return
        if self._text is None and data[:1] in (b"#", b" ", b"v"):
            # Declared while the first chunk (at offset 0) is still being offered.
            self._text = self.region("descriptor file", 0, HEADER_LENGTH + DESCRIPTOR_CAP)
        if self._text is not None:
            verdict = probe_text_descriptor(self._text.data[:TEXT_PROBE_WINDOW])
            if verdict is None:
                return
            if verdict:
                self._mode = "text"
                self.match()
                self.release(self._head)
            else:
                self.reject()
            return
        if not (MAGIC.startswith(data[:4]) or COWD_MAGIC.startswith(data[:4])):
            self.reject()
        elif data.startswith(MAGIC):
            self._mode = "sparse"
            self.match()
        elif data.startswith(COWD_MAGIC):
            self._mode = "cowd"
            self.match()
            self.release(self._head)
            self.flag("unsupported_version", "VMDK3 (COWD) sparse images are not supported")

    def _parse_sparse_header(self, data: bytes) -> None:
        header = self._header = parse_header(data)
        self.parsed = True
        self.release(self._head)
        self.virtual_size = header["capacity"] * SECTOR
        descriptor_bytes = header["descriptor_size"] * SECTOR
        if descriptor_bytes > DESCRIPTOR_CAP:
            self.flag(
                "vmdk_descriptor",
                f"VMDK descriptor of {descriptor_bytes} bytes is larger than {DESCRIPTOR_CAP}",
            )
        # qemu reads the descriptor right after the header whatever descriptor_offset says,
        # and searches at least QEMU_DESCRIPTOR_WINDOW bytes of it for a parent.
        window = min(max(descriptor_bytes, QEMU_DESCRIPTOR_WINDOW), DESCRIPTOR_CAP)
        self._embedded = self.region("descriptor", HEADER_LENGTH, window)
        if header["gd_offset"] == GD_AT_END:
            self._footer_region = self.end_region("stream footer", FOOTER_LENGTH)
        compressed = header["compress_algorithm"] == COMPRESSION_DEFLATE
        self.details["subformat_from_header"] = (
            "streamOptimized" if compressed else "monolithicSparse"
        )
        self.details["version"] = header["version"]

    def _parse_embedded_descriptor(self, data: bytes) -> None:
        header = self._header
        assert header is not None
        self._parent_hint = _PARENT_HINT in data[:QEMU_DESCRIPTOR_WINDOW]
        length = min(header["descriptor_size"] * SECTOR, DESCRIPTOR_CAP)
        self._descriptor = parse_descriptor(data[:length].split(b"\0", 1)[0])
        self._describe(self._descriptor)
        if self._embedded is not None:
            self.release(self._embedded)

    def _parse_text_descriptor(self, region: CaptureRegion) -> None:
        data = region.data
        self._parent_hint = _PARENT_HINT in data
        self._descriptor = parse_descriptor(data.split(b"\0", 1)[0])
        self._describe(self._descriptor)
        self.virtual_size = sum(e.sectors for e in self._descriptor.extents) * SECTOR
        self.details["descriptor_file"] = True
        self.parsed = True
        self.release(region)

    def _describe(self, descriptor: Descriptor) -> None:
        create_type = descriptor.keys.get("createType")
        if create_type is not None:
            self.details["create_type"] = create_type

    def _read_footer(self, region: EndRegion, stream_size: int) -> None:
        self._footer = None
        self._footer_error = None
        tail = region.tail(stream_size)
        if tail is None or len(tail) < FOOTER_LENGTH:
            self._footer_error = "VMDK stream footer is missing: the image is too short"
            return
        if stream_size % SECTOR:
            self._footer_error = "VMDK stream is not a whole number of sectors"
            return
        _val, marker_size, marker_type = _MARKER.unpack_from(tail, 0)
        eos_val, eos_size, eos_type = _MARKER.unpack_from(tail, 2 * SECTOR)
        if marker_size != 0 or marker_type != MARKER_FOOTER:
            self._footer_error = "VMDK stream footer marker is missing"
        elif tail[SECTOR : SECTOR + 4] != MAGIC:
            self._footer_error = "VMDK stream footer has no header copy"
        elif (eos_val, eos_size, eos_type) != (0, 0, MARKER_END_OF_STREAM):
            self._footer_error = "VMDK stream does not end with an end-of-stream marker"
        else:
            self._footer = parse_header(tail[SECTOR : 2 * SECTOR])
            self.virtual_size = self._footer["capacity"] * SECTOR

    # -- checks ---------------------------------------------------------------------------------

    def _check_create_type(self) -> str | None:
        if self._descriptor is None:
            return None if self._mode == "cowd" else "VMDK descriptor could not be read"
        create_type = self._descriptor.keys.get("createType")
        if create_type is None:
            return "VMDK descriptor has no createType"
        if create_type not in ALLOWED_CREATE_TYPES:
            return (
                f"VMDK createType {printable(create_type.encode())!r} is not accepted "
                "(only monolithicSparse and streamOptimized)"
            )
        return None

    def _check_extents(self) -> str | None:
        header = self._header
        if self._mode == "text":
            if not self._descriptor or not self._descriptor.extents:
                return "VMDK descriptor file has no extents of its own"
            names = ", ".join(
                repr(printable((e.filename or e.kind).encode())) for e in self._descriptor.extents
            )
            return f"VMDK descriptor file refers to data in other files: {names}"
        if header is not None and header["capacity"] == 0 and header["descriptor_offset"]:
            return "VMDK header has capacity 0, which makes qemu follow the descriptor's extents"
        if self._descriptor is None:
            return None
        extents = self._descriptor.extents
        if len(extents) != 1:
            return f"VMDK descriptor lists {len(extents)} extents; exactly one is accepted"
        extent = extents[0]
        if extent.access not in ("RW", "RDONLY"):
            return f"VMDK extent access {extent.access} is not accepted"
        if extent.kind != "SPARSE" or extent.offset is not None:
            return f"VMDK extent type {extent.kind} is not accepted (only SPARSE)"
        name = extent.filename or ""
        if not name or any(c in _BAD_NAME_CHARS for c in name):
            return f"VMDK extent {printable(name.encode())!r} must name the image itself"
        return None

    def _check_descriptor(self) -> str | None:
        header = self._header
        if header is not None and header["descriptor_offset"] != 1:
            return f"VMDK descriptor at sector {header['descriptor_offset']}, expected sector 1"
        if self._descriptor is not None and self._descriptor.bad_lines:
            shown = "; ".join(
                repr(printable(line.encode(), 60)) for line in self._descriptor.bad_lines[:3]
            )
            return f"VMDK descriptor has lines that are not understood: {shown}"
        return None

    def _check_parent(self) -> str | None:
        if self._parent_hint:
            return "VMDK descriptor names a parent disk (parentFileNameHint)"
        if self._descriptor is not None:
            parent = self._descriptor.keys.get("parentCID", _NO_PARENT_CID).lower()
            if parent != _NO_PARENT_CID:
                return f"VMDK descriptor has a parent (parentCID={printable(parent.encode())!r})"
        return None

    def _check_version(self) -> str | None:
        for header in (self._header, self._footer):
            if header is not None and not 1 <= header["version"] <= 3:
                return f"VMDK version {header['version']} is not supported"
        if self._descriptor is not None:
            version = self._descriptor.keys.get("version", "1")
            if version not in ("1", "2", "3"):
                return f"VMDK descriptor version {printable(version.encode())!r} is not supported"
        return None

    def _check_compression(self) -> str | None:
        for header in (self._header, self._footer):
            if header is not None and header["compress_algorithm"] not in (
                COMPRESSION_NONE,
                COMPRESSION_DEFLATE,
            ):
                return f"VMDK compression algorithm {header['compress_algorithm']} is unknown"
        return None

    def _check_layout(self) -> str | None:
        for header in (self._header, self._footer):
            if header is None:
                continue
            grain, gtes = header["grain_size"], header["num_gtes_per_gt"]
            if grain == 0 or grain & (grain - 1) or grain > MAX_GRAIN_SECTORS:
                return f"VMDK grain size {grain} sectors is invalid"
            if gtes == 0 or gtes > MAX_GTES_PER_GT:
                return f"VMDK grain table size {gtes} is invalid"
            if -(-header["capacity"] // (grain * gtes)) > MAX_L1_ENTRIES:
                return "VMDK grain directory is too large"
        return None

    def _check_footer(self) -> str | None:
        header = self._header
        if header is None or header["gd_offset"] != GD_AT_END:
            return None
        if not self._eof:
            return None  # on_finish left a note: a stream can only be checked at its end
        if self._footer_error is not None:
            return self._footer_error
        footer = self._footer
        if footer is None:
            return "VMDK stream footer was not read"
        for field in _FOOTER_MUST_AGREE:
            if footer[field] != header[field]:
                return (
                    f"VMDK footer {field} {footer[field]} disagrees with the header's "
                    f"{header[field]}"
                )
        if footer["gd_offset"] == GD_AT_END:
            return "VMDK footer does not locate the grain directory"
        return None

    def _check_sizes(self) -> str | None:
        header = self._footer or self._header
        if header is None:
            return None
        if self._descriptor is not None and len(self._descriptor.extents) == 1:
            sectors = self._descriptor.extents[0].sectors
            if sectors != header["capacity"]:
                return (
                    f"VMDK extent of {sectors} sectors disagrees with the header's capacity "
                    f"of {header['capacity']} sectors"
                )
        size = self.known_size
        if size is None:
            return None
        if header["overhead"] * SECTOR > size:
            return f"VMDK grains start at {header['overhead'] * SECTOR}, beyond the image ({size})"
        for what in _TABLE_OFFSETS:
            offset = header[what]
            if offset != GD_AT_END and offset * SECTOR > size:
                return f"VMDK {what} lies beyond the end of the image ({size})"
        return None
