"""qcow2, QEMU's copy-on-write format: header parse and the checks that keep it self-contained.

A qcow2 image can make qemu read other files (a backing file, an external data file), so those
are refused outright; so are feature bits we do not know, since qemu would interpret them and
we could not vouch for what they do. Layout, big-endian (qemu docs/interop/qcow2.txt):

    offset size  field
       0     4   magic "QFI\\xfb"
       4     4   version                    2 or 3
       8     8   backing_file_offset        } non-zero: reads fall through to another file
      16     4   backing_file_size          }
      20     4   cluster_bits               9..21
      24     8   size                       virtual size, bytes
      32     4   crypt_method               0 none, 1 AES, 2 LUKS
      36     4   l1_size                    entries
      40     8   l1_table_offset
      48     8   refcount_table_offset
      56     4   refcount_table_clusters
      60     4   nb_snapshots
      64     8   snapshots_offset
    --- version 3 only ---
      72     8   incompatible_features      bit 0 dirty, 1 corrupt, 2 external data file,
                                            3 compression type, 4 extended L2
      80     8   compatible_features
      88     8   autoclear_features
      96     4   refcount_order             0..6
     100     4   header_length              >= 104
     104     1   compression_type           0 zlib, 1 zstd (when header_length > 104)

Header extensions follow the header (at header_length; at 72 for version 2), each a 4-byte type,
a 4-byte length and the data padded to 8 bytes, until type 0. They end before the backing file
name, or at the end of the first cluster.
"""

from __future__ import annotations

import struct
from typing import Final, TypedDict

from cdi.image.formats.base import CaptureRegion, FormatInspector, printable

MAGIC: Final = b"QFI\xfb"
V2_HEADER_LENGTH: Final = 72
V3_HEADER_LENGTH: Final = 104

_V2_FIELDS: Final = struct.Struct(">4sIQIIQIIQQIIQ")
_V3_FIELDS: Final = struct.Struct(">QQQII")
_EXTENSION: Final = struct.Struct(">II")

INCOMPAT_DIRTY: Final = 1 << 0
INCOMPAT_CORRUPT: Final = 1 << 1
INCOMPAT_DATA_FILE: Final = 1 << 2
INCOMPAT_COMPRESSION: Final = 1 << 3
INCOMPAT_EXTENDED_L2: Final = 1 << 4
KNOWN_INCOMPATIBLE: Final = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION
) | INCOMPAT_EXTENDED_L2

EXT_END: Final = 0x00000000
EXT_BACKING_FORMAT: Final = 0xE2792ACA
EXT_DATA_FILE: Final = 0x44415441

# qemu's own limits (block/qcow2.h); beyond them qemu refuses the image, so we do too.
MIN_CLUSTER_BITS: Final = 9
MAX_CLUSTER_BITS: Final = 21
MAX_L1_BYTES: Final = 32 * 1024 * 1024
MAX_REFTABLE_BYTES: Final = 8 * 1024 * 1024
MAX_SNAPSHOTS: Final = 65536
MAX_REFCOUNT_ORDER: Final = 6
COMPRESSION_TYPES: Final = {0: "zlib", 1: "zstd"}

#: Legitimate images carry a handful of extensions; more is a header built to waste our time.
MAX_EXTENSIONS: Final = 64
#: qemu's limit for the backing file name; we only read it to name it in the message.
MAX_BACKING_NAME: Final = 1023
_MAX_NAME: Final = 1023


class Qcow2Header(TypedDict):
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int
    compatible_features: int
    autoclear_features: int
    refcount_order: int
    header_length: int


def parse_header(data: bytes) -> Qcow2Header:
    """Parse the fixed header; `data` holds 72 bytes (version 2) or 104 (version 3)."""
    (
        _magic,
        version,
        backing_file_offset,
        backing_file_size,
        cluster_bits,
        size,
        crypt_method,
        l1_size,
        l1_table_offset,
        refcount_table_offset,
        refcount_table_clusters,
        nb_snapshots,
        snapshots_offset,
    ) = _V2_FIELDS.unpack_from(data, 0)
    incompatible = compatible = autoclear = 0
    refcount_order, header_length = 4, V2_HEADER_LENGTH
    if version >= 3 and len(data) >= V3_HEADER_LENGTH:
        incompatible, compatible, autoclear, refcount_order, header_length = _V3_FIELDS.unpack_from(
            data, V2_HEADER_LENGTH
        )
    return Qcow2Header(
        version=version,
        backing_file_offset=backing_file_offset,
        backing_file_size=backing_file_size,
        cluster_bits=cluster_bits,
        size=size,
        crypt_method=crypt_method,
        l1_size=l1_size,
        l1_table_offset=l1_table_offset,
        refcount_table_offset=refcount_table_offset,
        refcount_table_clusters=refcount_table_clusters,
        nb_snapshots=nb_snapshots,
        snapshots_offset=snapshots_offset,
        incompatible_features=incompatible,
        compatible_features=compatible,
        autoclear_features=autoclear,
        refcount_order=refcount_order,
        header_length=header_length,
    )


class Qcow2Inspector(FormatInspector):
    NAME = "qcow2"

    def setup(self) -> None:
        self._head = self.region("header", 0, V3_HEADER_LENGTH)
        self._header: Qcow2Header | None = None
        self._compression: CaptureRegion | None = None
        self._extension: CaptureRegion | None = None
        self._extension_count = 0
        self._extensions_end = 0
        self._walk_done = False
        self._data_file_name: CaptureRegion | None = None
        self._backing_name: CaptureRegion | None = None
        self._has_data_file_extension = False
        self.check("unsupported_version", self._check_version)
        self.check("cluster_size", self._check_cluster_size)
        self.check("backing_file", self._check_backing_file)
        self.check("data_file", self._check_data_file)
        self.check("unknown_features", self._check_unknown_features)
        self.check("corrupt", self._check_corrupt)
        self.check("encrypted", self._check_encrypted)
        self.check("format_header", self._check_layout)
        self.check("virtual_size_inconsistent", self._check_tables)

    # -- parsing --------------------------------------------------------------------------------

    def advance(self) -> None:
        head = self._head
        if not self.decided:
            if len(head) < len(MAGIC):
                return
            if head.data[: len(MAGIC)] != MAGIC:
                self.reject()
                return
            self.match()
        if len(head) >= 8 and head.length > V2_HEADER_LENGTH:
            (version,) = struct.unpack_from(">I", head.data, 4)
            if version < 3:
                head.shrink(V2_HEADER_LENGTH)
        if self._header is None:
            if not head.complete:
                return
            self._parse_header(head.data)
        self._walk_extensions()

    def _parse_header(self, data: bytes) -> None:
        header = self._header = parse_header(data)
        self.parsed = True
        self.virtual_size = header["size"] // 512 * 512
        self.details.update(
            version=header["version"],
            cluster_bits=header["cluster_bits"],
            incompatible_features=header["incompatible_features"],
        )
        if header["version"] not in (2, 3) or not (
            MIN_CLUSTER_BITS <= header["cluster_bits"] <= MAX_CLUSTER_BITS
        ):
            # The checks refuse it; walking extensions of a header we cannot trust is pointless.
            self._walk_done = True
            return
        cluster_size = 1 << header["cluster_bits"]
        start = header["header_length"]
        if header["version"] == 3:
            if start < V3_HEADER_LENGTH or start > cluster_size:
                self.flag("format_header", f"qcow2 header length {start} is out of range")
                self._walk_done = True
                return
            if start > V3_HEADER_LENGTH:
                self._compression = self.region("compression type", V3_HEADER_LENGTH, 1)
        backing = header["backing_file_offset"]
        self._extensions_end = backing if backing else cluster_size
        if start + _EXTENSION.size > min(self._extensions_end, cluster_size):
            self._walk_done = True
            return
        self._extension = self.region("header extension", start, _EXTENSION.size)

    def _walk_extensions(self) -> None:
        """Follow the extension list one 8-byte header at a time, reading only names we show."""
        while not self._walk_done and self._extension is not None and self._extension.complete:
            here = self._extension
            ext_type, length = _EXTENSION.unpack(here.data)
            self.release(here)
            if ext_type == EXT_END:
                self._walk_done = True
                self._declare_backing_name(here.offset + _EXTENSION.size)
                return
            if ext_type == EXT_DATA_FILE:
                self._has_data_file_extension = True
                if length:
                    self._data_file_name = self.region(
                        "data file name", here.next_offset, min(length, _MAX_NAME)
                    )
            elif ext_type == EXT_BACKING_FORMAT and length:
                self.details["backing_format_extension"] = True
            self._extension_count += 1
            following = here.offset + _EXTENSION.size + (length + 7) // 8 * 8
            if self._extension_count >= MAX_EXTENSIONS:
                self.flag("format_header", f"qcow2 has more than {MAX_EXTENSIONS} extensions")
                self._walk_done = True
            elif following + _EXTENSION.size > self._extensions_end:
                self.flag("format_header", "qcow2 header extensions run past their area")
                self._walk_done = True
            else:
                self._extension = self.region("header extension", following, _EXTENSION.size)

    def _declare_backing_name(self, after: int) -> None:
        header = self._header
        if header is None or not header["backing_file_offset"]:
            return
        offset, size = header["backing_file_offset"], header["backing_file_size"]
        # qemu keeps the name inside the first cluster; only then is it worth reading to show.
        if size and after <= offset and offset + size <= 1 << header["cluster_bits"]:
            self._backing_name = self.region(
                "backing file name", offset, min(size, MAX_BACKING_NAME)
            )

    # -- checks ---------------------------------------------------------------------------------

    def _hdr(self) -> Qcow2Header:
        if self._header is None:
            raise RuntimeError("qcow2 header not parsed")
        return self._header

    def _check_version(self) -> str | None:
        version = self._hdr()["version"]
        if version not in (2, 3):
            return f"qcow2 version {version} is not supported (only 2 and 3)"
        return None

    def _check_cluster_size(self) -> str | None:
        bits = self._hdr()["cluster_bits"]
        if not MIN_CLUSTER_BITS <= bits <= MAX_CLUSTER_BITS:
            return f"qcow2 cluster_bits {bits} is outside {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}"
        return None

    def _check_backing_file(self) -> str | None:
        header = self._hdr()
        if not header["backing_file_offset"] and not header["backing_file_size"]:
            return None
        name = ""
        if self._backing_name is not None and len(self._backing_name):
            name = f" {printable(self._backing_name.data)!r}"
        return f"qcow2 image has a backing file{name}; only self-contained images are accepted"

    def _check_data_file(self) -> str | None:
        header = self._hdr()
        if (
            not header["incompatible_features"] & INCOMPAT_DATA_FILE
            and not self._has_data_file_extension
        ):
            return None
        name = ""
        if self._data_file_name is not None and len(self._data_file_name):
            name = f" {printable(self._data_file_name.data)!r}"
        return f"qcow2 image keeps its data in an external file{name}"

    def _check_unknown_features(self) -> str | None:
        header = self._hdr()
        unknown = header["incompatible_features"] & ~KNOWN_INCOMPATIBLE
        if unknown:
            return f"qcow2 image uses unknown incompatible features {unknown:#x}"
        if self._compression is not None and self._compression.complete:
            kind = self._compression.data[0]
            if kind not in COMPRESSION_TYPES:
                return f"qcow2 compression type {kind} is unknown"
            if kind and not header["incompatible_features"] & INCOMPAT_COMPRESSION:
                return "qcow2 compression type is set without its feature bit"
        return None

    def _check_corrupt(self) -> str | None:
        if self._hdr()["incompatible_features"] & INCOMPAT_CORRUPT:
            return "qcow2 image is marked corrupt"
        return None

    def _check_encrypted(self) -> str | None:
        method = self._hdr()["crypt_method"]
        if method:
            return f"qcow2 image is encrypted (method {method}); it cannot be imported"
        return None

    def _check_layout(self) -> str | None:
        header = self._hdr()
        cluster_size = 1 << min(header["cluster_bits"], 63)
        issues: list[str] = []
        if header["version"] == 3 and header["refcount_order"] > MAX_REFCOUNT_ORDER:
            issues.append(f"refcount order {header['refcount_order']} is too large")
        if header["backing_file_offset"] > cluster_size:
            issues.append("backing file name lies outside the first cluster")
        if header["l1_size"] * 8 > MAX_L1_BYTES:
            issues.append(f"L1 table of {header['l1_size']} entries is too large")
        if header["l1_table_offset"] % cluster_size:
            issues.append("L1 table is not cluster aligned")
        if header["refcount_table_offset"] % cluster_size:
            issues.append("refcount table is not cluster aligned")
        if header["refcount_table_clusters"] * cluster_size > MAX_REFTABLE_BYTES:
            issues.append("refcount table is too large")
        if header["nb_snapshots"] > MAX_SNAPSHOTS:
            issues.append(f"{header['nb_snapshots']} snapshots is too many")
        if header["nb_snapshots"] and header["snapshots_offset"] % cluster_size:
            issues.append("snapshot table is not cluster aligned")
        return "qcow2 header is malformed: " + "; ".join(issues) if issues else None

    def _check_tables(self) -> str | None:
        header = self._hdr()
        cluster_bits = min(header["cluster_bits"], MAX_CLUSTER_BITS)
        cluster_size = 1 << cluster_bits
        entry = 16 if header["incompatible_features"] & INCOMPAT_EXTENDED_L2 else 8
        l1_span = cluster_size * (cluster_size // entry)
        needed = -(-header["size"] // l1_span)
        if header["l1_size"] < needed:
            return (
                f"qcow2 L1 table has {header['l1_size']} entries but a virtual size of "
                f"{header['size']} needs {needed}"
            )
        size = self.known_size
        if size is None:
            return None
        tables = [
            ("L1 table", header["l1_table_offset"], header["l1_size"] * 8),
            (
                "refcount table",
                header["refcount_table_offset"],
                header["refcount_table_clusters"] * cluster_size,
            ),
        ]
        if header["nb_snapshots"]:
            tables.append(("snapshot table", header["snapshots_offset"], 1))
        for what, offset, length in tables:
            if length and offset + length > size:
                return f"qcow2 {what} at offset {offset} lies beyond the end of the image ({size})"
        return None
