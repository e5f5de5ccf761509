"""Hostile and broken images, each made in the test, each refused with a named problem.

For the constructs that make qemu read other files (backing file, data file, VMDK extents and
parents) an audit hook proves the inspector itself never opens anything but the image.
"""

from __future__ import annotations

import os
import random
import struct
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from cdi.image.formats import (
    DEFAULT_MAX_VIRTUAL_SIZE,
    InspectionResult,
    StreamInspector,
    inspect_file,
    inspect_stream,
)
from cdi.image.formats.vhd import footer_checksum
from cdi.image.formats.vhdx import crc32c

from .conftest import ImageFactory, MiB, minimal_iso, patch, run

# -- the audit hook: one per process (hooks cannot be removed), recording only when asked -------

_OPENED: list[str] = []
_RECORDING: list[bool] = [False]


def _audit(event: str, args: tuple[object, ...]) -> None:
    if event == "open" and _RECORDING[0] and args:
        target = args[0]
        if isinstance(target, str | bytes | os.PathLike):
            _OPENED.append(os.fsdecode(os.fspath(target)))


sys.addaudithook(_audit)


@contextmanager
def recording_opens() -> Iterator[list[str]]:
    _OPENED.clear()
    _RECORDING[0] = True
    try:
        yield _OPENED
    finally:
        _RECORDING[0] = False


# -- helpers ------------------------------------------------------------------------------------

SECRET_TEXT = b"TOP SECRET: must never leave this file\n"


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    path.write_bytes(SECRET_TEXT * (MiB // len(SECRET_TEXT)))
    return path


def read_all(
    path: Path, chunk_size: int, *, max_virtual_size: int = DEFAULT_MAX_VIRTUAL_SIZE
) -> InspectionResult:
    """Inspect as a stream arriving whole: every byte fed, then the end of the stream."""
    inspector = StreamInspector(total_size=path.stat().st_size, max_virtual_size=max_virtual_size)
    with path.open("rb") as file:
        while data := file.read(chunk_size):
            inspector.feed(data)
    return inspector.result(eof=True)


def names(result: InspectionResult) -> set[str]:
    return {problem.name for problem in result.problems}


def rewrite_vmdk_descriptor(path: Path, old: bytes, new: bytes) -> None:
    """Edit the descriptor embedded after a sparse VMDK header (sectors 1..20)."""
    data = bytearray(path.read_bytes())
    end = data.index(b"\0", 512)
    text = bytes(data[512:end])
    assert old in text
    text = text.replace(old, new)
    assert len(text) < 20 * 512
    data[512 : 512 + 20 * 512] = text.ljust(20 * 512, b"\0")
    path.write_bytes(bytes(data))


def fix_vhd_footer_checksum(path: Path, offset: int = 0) -> None:
    with path.open("r+b") as file:
        file.seek(offset)
        footer = file.read(512)
        file.seek(offset + 64)
        file.write(struct.pack(">I", footer_checksum(footer)))


def fix_vhdx_checksum(path: Path, offset: int, length: int) -> None:
    with path.open("r+b") as file:
        file.seek(offset)
        block = bytearray(file.read(length))
        block[4:8] = bytes(4)
        file.seek(offset + 4)
        file.write(struct.pack("<I", crc32c(bytes(block))))


# -- the cases ----------------------------------------------------------------------------------

Build = Callable[[ImageFactory, Path], Path]


@dataclass(frozen=True)
class Refusal:
    id: str
    build: Build
    problems: frozenset[str]
    fmt: str
    #: The refusal reads outside the image in qemu: prove we never open the secret.
    touches_secret: bool = False
    max_virtual_size: int = DEFAULT_MAX_VIRTUAL_SIZE


def qcow2(size: int = 7 * MiB) -> Build:
    return lambda images, secret: images.create("qcow2", size)


def patched(base: Build, *edits: tuple[int, bytes]) -> Build:
    def build(images: ImageFactory, secret: Path) -> Path:
        path = base(images, secret)
        for offset, data in edits:
            patch(path, offset, data)
        return path

    return build


def qcow2_backing(images: ImageFactory, secret: Path) -> Path:
    path = images.path("backed.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", secret, "-F", "raw", path)
    return path


def qcow2_json_backing(images: ImageFactory, secret: Path) -> Path:
    path = images.path("json.qcow2")
    backing = f'json:{{"driver":"raw","file":{{"driver":"file","filename":"{secret}"}}}}'
    run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "raw", path, "1M")
    return path


def qcow2_data_file(images: ImageFactory, secret: Path) -> Path:
    # qemu-img creates (truncates!) the data file: point it at a scratch file, never the secret.
    data_file = images.path("external.bin")
    return images.create(
        "qcow2",
        MiB,
        name="datafile.qcow2",
        options=[f"data_file={data_file}", "data_file_raw=on"],
        data=False,
    )


def qcow2_data_file_extension_only(images: ImageFactory, secret: Path) -> Path:
    path = qcow2_data_file(images, secret)
    patch(path, 72, struct.pack(">Q", 0))  # clear the feature bit, keep the extension
    return path


def qcow2_truncated(images: ImageFactory, secret: Path) -> Path:
    path = images.create("qcow2", MiB, data=False)
    path.write_bytes(path.read_bytes()[:60])
    return path


def qcow2_huge(images: ImageFactory, secret: Path) -> Path:
    return images.create("qcow2", 100 * 1024**4, name="huge.qcow2", data=False)


def vmdk_descriptor_file(images: ImageFactory, secret: Path) -> Path:
    path = images.path("disguised.img")
    path.write_text(
        "# Disk DescriptorFile\n"
        "version=1\n"
        "CID=12345678\n"
        "parentCID=ffffffff\n"
        'createType="monolithicFlat"\n'
        "\n"
        "# Extent description\n"
        f'RW 2048 FLAT "{secret}" 0\n'
    )
    return path


def vmdk_descriptor_file_sparse(images: ImageFactory, secret: Path) -> Path:
    path = images.path("other.vmdk")
    path.write_text(
        '# Disk DescriptorFile\nversion=1\ncreateType="monolithicSparse"\nRW 2048 SPARSE "x.vmdk"\n'
    )
    return path


def vmdk(edit: Callable[[Path, Path], None]) -> Build:
    def build(images: ImageFactory, secret: Path) -> Path:
        path = images.create("vmdk", 7 * MiB)
        edit(path, secret)
        return path

    return build


def vmdk_stream_footer_mismatch(images: ImageFactory, secret: Path) -> Path:
    return images.stream_optimized_with_footer(7 * MiB, footer_capacity=28672)


def vmdk_stream_footer_missing(images: ImageFactory, secret: Path) -> Path:
    path = images.stream_optimized(7 * MiB)
    patch(path, 56, struct.pack("<Q", 0xFFFFFFFFFFFFFFFF))
    return path


def vpc_dynamic(edit: Callable[[Path], None]) -> Build:
    def build(images: ImageFactory, secret: Path) -> Path:
        path = images.create("vpc", 7 * MiB)
        edit(path)
        return path

    return build


def vpc_differencing(path: Path) -> None:
    patch(path, 60, struct.pack(">I", 4))
    fix_vhd_footer_checksum(path)


def vpc_parent_locator(path: Path) -> None:
    patch(path, 512 + 576, b"W2ku" + struct.pack(">IIIQ", 512, 40, 0, 4096))


def vpc_bad_checksum(path: Path) -> None:
    patch(path, 64, b"\x00\x00\x00\x01")


VHDX_METADATA = 0x300000  # where qemu-img puts the metadata region


def vhdx(edit: Callable[[Path], None]) -> Build:
    def build(images: ImageFactory, secret: Path) -> Path:
        path = images.create("vhdx", 7 * MiB, data=False)
        edit(path)
        return path

    return build


def vhdx_parent_locator(path: Path) -> None:
    # Turn the Page 83 item (third entry) into a Parent Locator item.
    guid = bytes.fromhex("2d5fd3a80bb34d45abf7d3d84834ab0c")
    parent_locator = struct.pack("<IHH", 0xA8D35F2D, 0xB30B, 0x454D) + guid[8:]
    patch(path, VHDX_METADATA + 32 + 2 * 32, parent_locator)


def vhdx_has_parent_bit(path: Path) -> None:
    patch(path, VHDX_METADATA + 0x10000 + 4, struct.pack("<I", 2))


def vhdx_far_metadata(path: Path) -> None:
    patch(path, 0x30000 + 16 + 32 + 16, struct.pack("<Q", 128 * MiB))
    fix_vhdx_checksum(path, 0x30000, 64 * 1024)


def vhdx_log(path: Path) -> None:
    for header in (0x10000, 0x20000):
        patch(path, header + 48, b"\x5a" * 16)
        fix_vhdx_checksum(path, header, 4096)


def vhdx_truncated(path: Path) -> None:
    with path.open("r+b") as file:
        file.truncate(200 * 1024)


def vhdx_unknown_required_region(path: Path) -> None:
    table = 0x30000
    patch(path, table + 8, struct.pack("<I", 3))  # a third entry...
    entry = b"\x11" * 16 + struct.pack("<QII", 4 * MiB, MiB, 1)  # ...unknown, and required
    patch(path, table + 16 + 2 * 32, entry)
    fix_vhdx_checksum(path, table, 64 * 1024)


def vhdx_version_2(path: Path) -> None:
    for header in (0x10000, 0x20000):
        patch(path, header + 66, struct.pack("<H", 2))
        fix_vhdx_checksum(path, header, 4096)


def vpc_fixed_short(images: ImageFactory, secret: Path) -> Path:
    """A fixed VHD whose footer claims more data than precedes it."""
    path = images.create("vpc", 7 * MiB, options=["subformat=fixed", "force_size=on"])
    data = path.read_bytes()
    path.write_bytes(data[: 3 * MiB] + data[-512:])
    return path


def iso_patched(offset: int, data: bytes) -> Build:
    def build(images: ImageFactory, secret: Path) -> Path:
        path = images.iso()
        patch(path, 0x8000 + offset, data)
        return path

    return build


def vdi(*edits: tuple[int, bytes]) -> Build:
    return patched(lambda images, secret: images.create("vdi", 7 * MiB), *edits)


def iso_truncated(images: ImageFactory, secret: Path) -> Path:
    path = images.iso()
    with path.open("r+b") as file:
        file.truncate(path.stat().st_size // 2)
    return path


def iso_with_qcow2_header(images: ImageFactory, secret: Path) -> Path:
    header = images.create("qcow2", MiB, name="planted.qcow2", data=False).read_bytes()[:512]
    path = images.iso()
    patch(path, 0, header)
    return path


def qcow2_with_cd001(images: ImageFactory, secret: Path) -> Path:
    path = images.create("qcow2", 7 * MiB, options=["cluster_size=512"])
    patch(path, 0x8000, b"\x01CD001\x01")
    return path


def gzip_backed_qcow2(images: ImageFactory, secret: Path) -> Path:
    return images.compress(qcow2_backing(images, secret), "gzip")


def raw_too_big(images: ImageFactory, secret: Path) -> Path:
    return images.raw(8 * MiB)


def minimal_iso_file(images: ImageFactory, secret: Path) -> Path:
    path = images.path("tiny.iso")
    path.write_bytes(minimal_iso(blocks=64)[: 40 * 2048])
    return path


u32be = struct.Struct(">I").pack
u64be = struct.Struct(">Q").pack
u32le = struct.Struct("<I").pack
u64le = struct.Struct("<Q").pack

REFUSALS = [
    # qcow2
    Refusal("qcow2-backing-file", qcow2_backing, frozenset({"backing_file"}), "qcow2", True),
    Refusal("qcow2-json-backing", qcow2_json_backing, frozenset({"backing_file"}), "qcow2", True),
    Refusal("qcow2-data-file", qcow2_data_file, frozenset({"data_file"}), "qcow2", True),
    Refusal(
        "qcow2-data-file-extension",
        qcow2_data_file_extension_only,
        frozenset({"data_file"}),
        "qcow2",
    ),
    Refusal(
        "qcow2-unknown-feature-bit",
        patched(qcow2(), (72, u64be(1 << 5))),
        frozenset({"unknown_features"}),
        "qcow2",
    ),
    Refusal(
        "qcow2-unknown-high-feature-bit",
        patched(qcow2(), (72, u64be(1 << 40))),
        frozenset({"unknown_features"}),
        "qcow2",
    ),
    Refusal(
        "qcow2-corrupt-bit", patched(qcow2(), (72, u64be(1 << 1))), frozenset({"corrupt"}), "qcow2"
    ),
    Refusal(
        "qcow2-unknown-compression",
        patched(
            lambda images, secret: images.create(
                "qcow2", MiB, options=["compression_type=zstd"], data=False
            ),
            (104, b"\x07"),
        ),
        frozenset({"unknown_features"}),
        "qcow2",
    ),
    Refusal(
        "qcow2-version-4",
        patched(qcow2(), (4, u32be(4))),
        frozenset({"unsupported_version"}),
        "qcow2",
    ),
    Refusal(
        "qcow2-version-1",
        patched(qcow2(), (4, u32be(1))),
        frozenset({"unsupported_version"}),
        "qcow2",
    ),
    Refusal(
        "qcow2-absurd-cluster-bits",
        patched(qcow2(), (20, u32be(30))),
        frozenset({"cluster_size"}),
        "qcow2",
    ),
    Refusal("qcow2-encrypted", patched(qcow2(), (32, u32be(1))), frozenset({"encrypted"}), "qcow2"),
    Refusal(
        "qcow2-l1-beyond-file",
        patched(qcow2(), (40, u64be(1 << 40))),
        frozenset({"virtual_size_inconsistent"}),
        "qcow2",
    ),
    Refusal(
        "qcow2-l1-too-small",
        patched(qcow2(), (36, u32be(0))),
        frozenset({"virtual_size_inconsistent"}),
        "qcow2",
    ),
    Refusal(
        "qcow2-header-length",
        patched(qcow2(), (100, u32be(50))),
        frozenset({"format_header"}),
        "qcow2",
    ),
    Refusal("qcow2-truncated", qcow2_truncated, frozenset({"truncated"}), "qcow2"),
    Refusal("qcow2-absurd-size", qcow2_huge, frozenset({"virtual_size_limit"}), "qcow2"),
    Refusal(
        "qcow2-over-caller-limit",
        qcow2(),
        frozenset({"virtual_size_limit"}),
        "qcow2",
        max_virtual_size=4 * MiB,
    ),
    Refusal(
        "gzip-qcow2-backing-file", gzip_backed_qcow2, frozenset({"backing_file"}), "qcow2", True
    ),
    # vmdk
    Refusal(
        "vmdk-descriptor-file-flat-extent",
        vmdk_descriptor_file,
        frozenset({"vmdk_create_type", "vmdk_extent"}),
        "vmdk",
        True,
    ),
    Refusal(
        "vmdk-descriptor-file-sparse-extent",
        vmdk_descriptor_file_sparse,
        frozenset({"vmdk_extent"}),
        "vmdk",
    ),
    Refusal(
        "vmdk-create-type-vmfs",
        vmdk(
            lambda path, secret: rewrite_vmdk_descriptor(
                path, b'createType="monolithicSparse"', b'createType="vmfs"'
            )
        ),
        frozenset({"vmdk_create_type"}),
        "vmdk",
    ),
    Refusal(
        "vmdk-extent-with-slash",
        vmdk(
            lambda path, secret: rewrite_vmdk_descriptor(
                path, b'SPARSE "disk.vmdk"', f'SPARSE "{secret}"'.encode()
            )
        ),
        frozenset({"vmdk_extent"}),
        "vmdk",
        True,
    ),
    Refusal(
        "vmdk-flat-extent-in-sparse",
        vmdk(
            lambda path, secret: rewrite_vmdk_descriptor(
                path, b'SPARSE "disk.vmdk"', b'FLAT "disk.vmdk" 0'
            )
        ),
        frozenset({"vmdk_extent"}),
        "vmdk",
    ),
    Refusal(
        "vmdk-two-extents",
        vmdk(
            lambda path, secret: rewrite_vmdk_descriptor(
                path,
                b'RW 14336 SPARSE "disk.vmdk"',
                b'RW 14336 SPARSE "disk.vmdk"\nRW 2048 ZERO',
            )
        ),
        frozenset({"vmdk_extent"}),
        "vmdk",
    ),
    Refusal(
        "vmdk-unknown-line",
        vmdk(
            lambda path, secret: rewrite_vmdk_descriptor(
                path, b"# The Disk Data Base", b'changeTrackPath="disk-ctk.vmdk"'
            )
        ),
        frozenset({"vmdk_descriptor"}),
        "vmdk",
    ),
    Refusal(
        "vmdk-parent-hint",
        vmdk(
            lambda path, secret: rewrite_vmdk_descriptor(
                path, b"# The Disk Data Base", f'parentFileNameHint="{secret}"'.encode()
            )
        ),
        frozenset({"backing_file"}),
        "vmdk",
        True,
    ),
    Refusal(
        "vmdk-parent-hint-in-comment",
        vmdk(
            lambda path, secret: rewrite_vmdk_descriptor(
                path, b"# The Disk Data Base", f'# parentFileNameHint="{secret}"'.encode()
            )
        ),
        frozenset({"backing_file"}),
        "vmdk",
        True,
    ),
    Refusal(
        "vmdk-parent-cid",
        vmdk(
            lambda path, secret: rewrite_vmdk_descriptor(
                path, b"parentCID=ffffffff", b"parentCID=12345678"
            )
        ),
        frozenset({"backing_file"}),
        "vmdk",
    ),
    Refusal(
        "vmdk-capacity-zero",
        vmdk(lambda path, secret: patch(path, 12, u64le(0))),
        frozenset({"vmdk_extent"}),
        "vmdk",
    ),
    Refusal(
        "vmdk-descriptor-too-large",
        vmdk(lambda path, secret: patch(path, 36, u64le(200))),
        frozenset({"vmdk_descriptor"}),
        "vmdk",
    ),
    Refusal(
        "vmdk-descriptor-moved",
        vmdk(lambda path, secret: patch(path, 28, u64le(5))),
        frozenset({"vmdk_descriptor"}),
        "vmdk",
    ),
    Refusal(
        "vmdk-extent-size-mismatch",
        vmdk(
            lambda path, secret: rewrite_vmdk_descriptor(
                path, b"RW 14336 SPARSE", b"RW 14337 SPARSE"
            )
        ),
        frozenset({"virtual_size_inconsistent"}),
        "vmdk",
    ),
    Refusal(
        "vmdk-footer-mismatch", vmdk_stream_footer_mismatch, frozenset({"vmdk_footer"}), "vmdk"
    ),
    Refusal("vmdk-footer-missing", vmdk_stream_footer_missing, frozenset({"vmdk_footer"}), "vmdk"),
    Refusal(
        "vmdk-cowd",
        vmdk(lambda path, secret: patch(path, 0, b"COWD")),
        frozenset({"unsupported_version"}),
        "vmdk",
    ),
    # vhd
    Refusal(
        "vpc-differencing",
        vpc_dynamic(vpc_differencing),
        frozenset({"differencing_disk"}),
        "vpc",
    ),
    Refusal(
        "vpc-parent-locator",
        vpc_dynamic(vpc_parent_locator),
        frozenset({"differencing_disk"}),
        "vpc",
    ),
    Refusal("vpc-bad-checksum", vpc_dynamic(vpc_bad_checksum), frozenset({"format_header"}), "vpc"),
    # vhdx
    Refusal(
        "vhdx-parent-locator",
        vhdx(vhdx_parent_locator),
        frozenset({"differencing_disk"}),
        "vhdx",
    ),
    Refusal(
        "vhdx-has-parent-bit",
        vhdx(vhdx_has_parent_bit),
        frozenset({"differencing_disk"}),
        "vhdx",
    ),
    Refusal("vhdx-metadata-too-far", vhdx(vhdx_far_metadata), frozenset({"format_header"}), "vhdx"),
    Refusal("vhdx-dirty-log", vhdx(vhdx_log), frozenset({"vhdx_log"}), "vhdx"),
    Refusal("vhdx-truncated", vhdx(vhdx_truncated), frozenset({"truncated"}), "vhdx"),
    # vdi
    Refusal("vdi-differencing", vdi((0x4C, u32le(4))), frozenset({"differencing_disk"}), "vdi"),
    Refusal("vdi-parent-uuid", vdi((0x1B8, b"\x42" * 16)), frozenset({"differencing_disk"}), "vdi"),
    Refusal(
        "vdi-version-1.0",
        vdi((0x44, u32le(0x00010000))),
        frozenset({"unsupported_version"}),
        "vdi",
    ),
    Refusal(
        "vdi-disk-size-beyond-map",
        vdi((0x170, u64le(64 * MiB))),
        frozenset({"virtual_size_inconsistent"}),
        "vdi",
    ),
    Refusal(
        "vmdk-unknown-compression",
        vmdk(lambda path, secret: patch(path, 77, struct.pack("<H", 5))),
        frozenset({"unknown_features"}),
        "vmdk",
    ),
    Refusal("vdi-block-size", vdi((0x178, u32le(4096))), frozenset({"format_header"}), "vdi"),
    Refusal(
        "vhdx-unknown-required-region",
        vhdx(vhdx_unknown_required_region),
        frozenset({"unknown_features"}),
        "vhdx",
    ),
    Refusal("vhdx-version-2", vhdx(vhdx_version_2), frozenset({"unsupported_version"}), "vhdx"),
    Refusal("vpc-fixed-short", vpc_fixed_short, frozenset({"virtual_size_inconsistent"}), "vpc"),
    Refusal(
        "vpc-table-too-small",
        vpc_dynamic(lambda path: patch(path, 512 + 28, struct.pack(">I", 1))),
        frozenset({"virtual_size_inconsistent"}),
        "vpc",
    ),
    Refusal(
        "iso-bad-block-size",
        iso_patched(128, struct.pack("<H", 3000) + struct.pack(">H", 3000)),
        frozenset({"format_header"}),
        "iso",
    ),
    Refusal(
        "iso-endian-disagreement",
        iso_patched(80, struct.pack("<I", 100) + struct.pack(">I", 101)),
        frozenset({"format_header"}),
        "iso",
    ),
    # iso, polyglots, raw
    Refusal("iso-truncated", iso_truncated, frozenset({"virtual_size_inconsistent"}), "iso"),
    Refusal(
        "iso-minimal-truncated",
        minimal_iso_file,
        frozenset({"virtual_size_inconsistent"}),
        "iso",
    ),
    Refusal(
        "iso-with-qcow2-header", iso_with_qcow2_header, frozenset({"multiple_formats"}), "qcow2"
    ),
    Refusal("qcow2-with-cd001", qcow2_with_cd001, frozenset({"multiple_formats"}), "qcow2"),
    Refusal(
        "raw-over-caller-limit",
        raw_too_big,
        frozenset({"virtual_size_limit"}),
        "raw",
        max_virtual_size=4 * MiB,
    ),
]

MODES = ["file", "stream-17", "stream-4096"]


def inspect(path: Path, mode: str, refusal: Refusal) -> InspectionResult:
    limit = refusal.max_virtual_size
    if mode == "file":
        return inspect_file(path, max_virtual_size=limit)
    chunk_size = int(mode.split("-")[1])
    if path.suffix == ".gz":
        with path.open("rb") as file:
            chunks = iter(lambda: file.read(chunk_size), b"")
            return inspect_stream(chunks, max_virtual_size=limit)
    return read_all(path, chunk_size, max_virtual_size=limit)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("refusal", [pytest.param(r, id=r.id) for r in REFUSALS])
def test_refused(images: ImageFactory, secret: Path, refusal: Refusal, mode: str) -> None:
    if mode == "stream-17" and refusal.id.startswith("vhdx"):
        mode = "stream-4096"  # the metadata is 3 MiB in: 17-byte chunks only cost time
    path = refusal.build(images, secret)

    with recording_opens() as opened:
        result = inspect(path, mode, refusal)

    assert not result.safe
    assert refusal.problems <= names(result), result.problems
    assert result.format == refusal.fmt
    for problem in result.problems:
        assert "\n" not in problem.message
    if refusal.touches_secret:
        assert str(secret) not in opened
        assert set(opened) <= {str(path)}


def test_backing_file_message_names_the_file(images: ImageFactory, secret: Path) -> None:
    result = inspect_file(qcow2_backing(images, secret))

    (problem,) = [p for p in result.problems if p.name == "backing_file"]
    assert str(secret) in problem.message


def test_vmdk_text_descriptor_is_what_qemu_follows(images: ImageFactory, secret: Path) -> None:
    """The construct is real: qemu-img would read the secret through it."""
    path = vmdk_descriptor_file(images, secret)
    out = run("qemu-img", "info", "--output=json", "-f", "vmdk", path).stdout

    assert str(secret) in out
    assert inspect_file(path).format == "vmdk"


def test_refusal_raises_with_every_problem(images: ImageFactory, secret: Path) -> None:
    result = inspect_file(vmdk_descriptor_file(images, secret))

    with pytest.raises(Exception, match="refusing unsafe vmdk image") as caught:
        result.raise_for_problems()
    assert "vmdk_extent" in {p.name for p in caught.value.problems}  # type: ignore[attr-defined]


def test_garbage_never_raises() -> None:
    """Random bytes with every format's magic at its offset: problems, never exceptions."""
    rng = random.Random(1234)
    magics = [
        (0, b"QFI\xfb"),
        (0, b"KDMV"),
        (0, b"conectix"),
        (0, b"vhdxfile"),
        (0x40, b"\x7f\x10\xda\xbe"),
        (0x8001, b"CD001"),
        (0, b"# Disk DescriptorFile\nversion=1\n"),
    ]
    for seed in range(40):
        data = bytearray(rng.randbytes(rng.choice([100, 4096, 70_000, 300_000])))
        offset, magic = magics[seed % len(magics)]
        if offset + len(magic) <= len(data):
            data[offset : offset + len(magic)] = magic
        inspector = StreamInspector()
        for start in range(0, len(data), 997):
            inspector.feed(data[start : start + 997])
        result = inspector.result(eof=True)
        assert isinstance(result.problems, tuple)
        assert all(p.name != "inspector_error" for p in result.problems), result.problems
