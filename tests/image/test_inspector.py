"""The format inspector against real images made by qemu-img, read whole and streamed at odd sizes.

Each image's format and virtual size must agree with `qemu-img info -f <format>`; streaming must
hold less than 512 KiB whatever the chunk size; the building blocks fail closed.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import cdi.image.formats as formats
from cdi.image.errors import FormatError, Problem, UnsafeImageError
from cdi.image.formats import (
    DEFAULT_MAX_VIRTUAL_SIZE,
    FORMATS,
    CaptureRegion,
    EndRegion,
    FormatInspector,
    InspectionResult,
    SafetyCheck,
    StreamInspector,
    inspect_file,
    inspect_stream,
)

from .conftest import GiB, ImageFactory, MiB, qemu_info

MEMORY_BOUND = 512 * 1024
CHUNK_SIZES = {"17B": 17, "512B": 512, "64KiB": 64 * 1024, "1MiB": MiB}
#: The last byte any format needs at offset 0 to tell raw from itself: the ISO descriptor.
ISO_WINDOW = 0x8000 + 6

Builder = Callable[[ImageFactory], Path]


@dataclass(frozen=True)
class Case:
    """One image: how to make it, what qemu calls it, what we should call it, and whether its
    verdict needs the end of the stream (fixed VHD)."""

    id: str
    build: Builder
    qemu_format: str
    fmt: str = ""
    footer: bool = False
    #: Metadata megabytes into the file: 17-byte chunks would only measure Python's call cost.
    far_metadata: bool = False

    @property
    def expected(self) -> str:
        return self.fmt or self.qemu_format


def _case(
    case_id: str,
    build: Builder,
    qemu_format: str,
    *,
    fmt: str = "",
    footer: bool = False,
    far_metadata: bool = False,
) -> Case:
    return Case(case_id, build, qemu_format, fmt, footer, far_metadata)


CASES = [
    _case("raw-7M", lambda f: f.raw(7 * MiB), "raw"),
    _case("raw-128M+512", lambda f: f.raw(128 * MiB + 512), "raw"),
    _case("raw-7M+1", lambda f: f.raw(7 * MiB + 1), "raw"),
    _case("qcow2-v2-7M", lambda f: f.create("qcow2", 7 * MiB, options=["compat=0.10"]), "qcow2"),
    _case("qcow2-v3-128M+512", lambda f: f.create("qcow2", 128 * MiB + 512), "qcow2"),
    _case("qcow2-v3-1G-sparse", lambda f: f.create("qcow2", GiB), "qcow2"),
    _case(
        "qcow2-v3-cluster512",
        lambda f: f.create("qcow2", 7 * MiB, options=["cluster_size=512"]),
        "qcow2",
    ),
    _case(
        "qcow2-zstd",
        lambda f: f.create("qcow2", 7 * MiB, options=["compression_type=zstd"]),
        "qcow2",
    ),
    _case("vmdk-sparse-7M", lambda f: f.create("vmdk", 7 * MiB), "vmdk"),
    _case("vmdk-sparse-128M+512", lambda f: f.create("vmdk", 128 * MiB + 512), "vmdk"),
    _case("vmdk-stream-7M", lambda f: f.stream_optimized(7 * MiB), "vmdk"),
    _case("vmdk-stream-footer", lambda f: f.stream_optimized_with_footer(7 * MiB), "vmdk"),
    _case("vdi-7M", lambda f: f.create("vdi", 7 * MiB), "vdi"),
    _case("vdi-128M+512", lambda f: f.create("vdi", 128 * MiB + 512), "vdi"),
    _case("vpc-dynamic-7M", lambda f: f.create("vpc", 7 * MiB), "vpc"),
    _case(
        "vpc-dynamic-force-size",
        lambda f: f.create("vpc", 7 * MiB, options=["force_size=on"]),
        "vpc",
    ),
    _case(
        "vpc-fixed-7M",
        lambda f: f.create("vpc", 7 * MiB, options=["subformat=fixed", "force_size=on"]),
        "vpc",
        footer=True,
    ),
    _case(
        "vpc-fixed-chs",
        lambda f: f.create("vpc", 7 * MiB, options=["subformat=fixed"]),
        "vpc",
        footer=True,
    ),
    _case("vhdx-7M", lambda f: f.create("vhdx", 7 * MiB), "vhdx"),
    _case(
        "vhdx-128M+512",
        lambda f: f.create("vhdx", 128 * MiB + 512, data=False),
        "vhdx",
        far_metadata=True,
    ),
    _case("iso", lambda f: f.iso(), "raw", fmt="iso"),
]


def stream_file(path: Path, chunk_size: int, *, to_eof: bool) -> tuple[InspectionResult, int]:
    """Feed a file as a stream would arrive: until complete, or to its end when `to_eof`.
    Returns the result and the most bytes the inspector held at any point."""
    inspector = StreamInspector(total_size=path.stat().st_size)
    peak = 0
    with path.open("rb") as file:
        while not inspector.complete:
            data = file.read(chunk_size)
            if not data:
                return inspector.result(eof=True), peak
            inspector.feed(data)
            peak = max(peak, inspector.bytes_held)
        if not to_eof:
            return inspector.result(eof=False), peak
        while data := file.read(MiB):
            inspector.feed(data)
            peak = max(peak, inspector.bytes_held)
    return inspector.result(eof=True), peak


FILE_CASES = [pytest.param(case, id=case.id) for case in CASES]
STREAM_CASES = [
    pytest.param(case, size, id=f"{case.id}-{size_id}")
    for case in CASES
    for size_id, size in CHUNK_SIZES.items()
    if not (case.far_metadata and size < 512)
]


@pytest.mark.parametrize("case", FILE_CASES)
def test_file_agrees_with_qemu(images: ImageFactory, case: Case) -> None:
    path = case.build(images)
    info = qemu_info(path, case.qemu_format)

    result = inspect_file(path)

    assert result.problems == ()
    assert result.safe
    assert result.format == case.expected
    assert result.qemu_format == case.qemu_format == info["format"]
    assert result.virtual_size == info["virtual-size"]
    assert result.compression is None
    assert result.bytes_inspected < 4 * MiB
    json.dumps(result.as_dict())


@pytest.mark.parametrize(("case", "chunk_size"), STREAM_CASES)
def test_stream_agrees_with_qemu(images: ImageFactory, case: Case, chunk_size: int) -> None:
    path = case.build(images)
    info = qemu_info(path, case.qemu_format)

    result, peak = stream_file(path, chunk_size, to_eof=case.footer)

    assert result.problems == ()
    assert result.format == case.expected
    assert result.virtual_size == info["virtual-size"]
    assert peak < MEMORY_BOUND


def test_fixed_vhd_needs_the_end_of_the_stream(images: ImageFactory) -> None:
    path = images.create("vpc", 7 * MiB, options=["subformat=fixed", "force_size=on"])

    early, _ = stream_file(path, 64 * 1024, to_eof=False)

    # Until the footer passes, a fixed VHD is indistinguishable from raw, and the result says so.
    assert early.format == "raw"
    assert "fixed VHD footer" in str(early.details["notes"])
    assert inspect_file(path).format == "vpc"


@pytest.mark.parametrize("chunk_size", [512, MiB], ids=["512B", "1MiB-whole-file"])
def test_stream_optimized_footer_is_noted_when_not_seen(
    images: ImageFactory, chunk_size: int
) -> None:
    path = images.stream_optimized_with_footer(7 * MiB)
    assert path.stat().st_size < MiB

    early, _ = stream_file(path, chunk_size, to_eof=False)
    late, _ = stream_file(path, chunk_size, to_eof=True)

    assert early.safe
    assert "footer not checked" in str(early.details["notes"])
    assert late.safe, late.problems
    assert "notes" not in late.details


def test_result_before_and_at_the_end(images: ImageFactory) -> None:
    """The importer asks once the headers are in, then again when the transfer ends."""
    path = images.stream_optimized_with_footer(7 * MiB, footer_capacity=1)
    inspector = StreamInspector(total_size=path.stat().st_size)
    data = path.read_bytes()
    inspector.feed(data[:65536])

    early = inspector.result(eof=False)
    inspector.feed(data[65536:])
    late = inspector.result(eof=True)

    assert early.safe
    assert "vmdk_footer" in {p.name for p in late.problems}
    assert "notes" not in late.details


def test_qcow2_details(images: ImageFactory) -> None:
    path = images.create("qcow2", 7 * MiB, options=["compat=0.10", "cluster_size=4096"])

    result = inspect_file(path)

    assert result.details["version"] == 2
    assert result.details["cluster_bits"] == 12
    assert result.as_dict()["details"] == {
        "version": 2,
        "cluster_bits": 12,
        "incompatible_features": 0,
    }


def test_vmdk_details(images: ImageFactory) -> None:
    assert (
        inspect_file(images.stream_optimized(2 * MiB)).details["create_type"] == "streamOptimized"
    )


# -- early stop and memory ----------------------------------------------------------------------


def counted_chunks(path: Path, chunk_size: int, pulled: list[int]) -> Iterator[bytes]:
    with path.open("rb") as file:
        while data := file.read(chunk_size):
            pulled.append(len(data))
            yield data


def test_qcow2_inspection_stops_early(images: ImageFactory) -> None:
    path = images.create("qcow2", GiB)
    pulled: list[int] = []

    result = inspect_stream(counted_chunks(path, 4096, pulled))

    assert result.format == "qcow2"
    assert result.virtual_size == GiB
    assert result.bytes_inspected < 64 * 1024
    assert sum(pulled) < 64 * 1024


def test_raw_needs_the_iso_window(images: ImageFactory) -> None:
    path = images.raw(8 * MiB)
    pulled: list[int] = []

    result = inspect_stream(counted_chunks(path, 512, pulled), total_size=8 * MiB)

    assert result.format == "raw"
    assert result.virtual_size == 8 * MiB
    assert result.bytes_inspected >= ISO_WINDOW
    assert ISO_WINDOW <= sum(pulled) < 64 * 1024


def test_file_reads_only_what_it_needs(images: ImageFactory) -> None:
    result = inspect_file(images.raw(128 * MiB + 512))

    assert ISO_WINDOW <= result.bytes_inspected < 64 * 1024


def test_zeros_stream_memory_is_bounded() -> None:
    inspector = StreamInspector()
    chunk = bytes(MiB)
    for _ in range(256):
        inspector.feed(chunk)
        assert inspector.bytes_held < MEMORY_BOUND

    result = inspector.result(eof=True)

    assert result.format == "raw"
    assert result.virtual_size == 256 * MiB
    assert result.safe


def test_sparse_qcow2_stream_memory_is_bounded(images: ImageFactory) -> None:
    path = images.create("qcow2", GiB)

    result, peak = stream_file(path, MiB, to_eof=True)

    assert result.format == "qcow2"
    assert result.safe
    assert peak < MEMORY_BOUND


# -- compression and containers -----------------------------------------------------------------

COMPRESSORS = ["gzip", "xz", "zstd", "bzip2"]


@pytest.mark.parametrize("tool", COMPRESSORS)
@pytest.mark.parametrize("inner", ["raw", "qcow2"])
def test_compressed_image_is_inspected_inside(images: ImageFactory, tool: str, inner: str) -> None:
    if inner == "raw":
        source = images.raw(3 * MiB)
        expected_size = None  # the stream was not read to its end
    else:
        source = images.create("qcow2", 7 * MiB)
        expected_size = qemu_info(source, "qcow2")["virtual-size"]
    path = images.compress(source, tool)

    from_file = inspect_file(path)
    with path.open("rb") as file:
        from_stream = inspect_stream(iter(lambda: file.read(512), b""))

    for result in (from_file, from_stream):
        assert result.safe, result.problems
        assert result.format == inner
        assert result.compression == tool
        assert result.virtual_size == expected_size


@pytest.mark.parametrize("tool", COMPRESSORS)
def test_compression_is_reported_without_decompress(images: ImageFactory, tool: str) -> None:
    path = images.compress(images.raw(2 * MiB), tool)

    result = inspect_file(path, decompress=False)

    assert result.format == tool
    assert result.virtual_size is None
    assert result.safe
    with pytest.raises(FormatError):
        _ = result.qemu_format


def test_small_compressed_raw_has_a_size(images: ImageFactory) -> None:
    path = images.compress(images.raw(20 * 1024, data=False), "gzip")

    result = inspect_file(path)

    assert (result.format, result.compression, result.virtual_size) == ("raw", "gzip", 20 * 1024)


def test_tar_is_a_container(images: ImageFactory) -> None:
    result = inspect_file(images.tar(images.create("qcow2", 2 * MiB)))

    assert result.format == "tar"
    assert result.safe
    assert result.virtual_size is None
    with pytest.raises(FormatError):
        _ = result.qemu_format


# -- building blocks ------------------------------------------------------------------------------


def test_capture_region_gathers_unaligned_chunks() -> None:
    region = CaptureRegion("test", 10, 20)
    data = bytes(range(100))
    for start in range(0, 100, 7):
        region.capture(start, memoryview(data[start : start + 7]))
        region.capture(start, memoryview(data[start : start + 7]))  # offered twice: harmless

    assert region.complete
    assert region.data == data[10:30]


def test_capture_region_is_missed_after_a_gap() -> None:
    region = CaptureRegion("test", 10, 20)
    region.capture(0, memoryview(bytes(12)))
    region.capture(40, memoryview(bytes(10)))

    assert region.missed
    assert not region.pending


def test_capture_region_has_a_cap() -> None:
    with pytest.raises(ValueError, match="bad offset"):
        CaptureRegion("huge", 0, formats.MAX_REGION_BYTES + 1)


@pytest.mark.parametrize("chunk", [1, 5, 17, 512, 4096])
def test_end_region_keeps_the_last_bytes(chunk: int) -> None:
    data = bytes(i % 251 for i in range(10_000))
    region = EndRegion("footer", 512)
    for start in range(0, len(data), chunk):
        region.capture(start, memoryview(data[start : start + chunk]))
        assert len(region) <= 2 * 512

    assert region.tail(len(data)) == data[-512:]
    assert region.tail(len(data) + 1) is None


def test_end_region_with_random_access() -> None:
    data = bytes(i % 251 for i in range(10_000))
    region = EndRegion("footer", 512)
    region.capture(0, memoryview(data[:4096]))
    region.capture(len(data) - 600, memoryview(data[-600:]))

    assert region.tail(len(data)) == data[-512:]


class _NoChecks(FormatInspector):
    NAME = "nochecks"

    def setup(self) -> None:
        self.region("head", 0, 4)

    def advance(self) -> None:
        self.reject()


class _Fragile(FormatInspector):
    NAME = "fragile"

    def setup(self) -> None:
        self._head = self.region("head", 0, 4)
        self.check("explodes", self._explode)

    def advance(self) -> None:
        if self._head.complete:
            self.match()
            self.parsed = True

    def _explode(self) -> str | None:
        raise ZeroDivisionError("bug")


class _Buggy(FormatInspector):
    NAME = "buggy"

    def setup(self) -> None:
        self.region("head", 0, 4)
        self.add_check(SafetyCheck.null("nothing to check"))

    def advance(self) -> None:
        raise IndexError("parser bug")


def test_inspector_without_checks_cannot_be_built() -> None:
    with pytest.raises(TypeError, match="declares no safety checks"):
        _NoChecks()


def test_exception_in_check_is_a_problem() -> None:
    inspector = _Fragile()
    inspector.feed(0, memoryview(b"abcd"))

    assert inspector.problems(eof=True) == [
        Problem("explodes", "safety check explodes could not run (ZeroDivisionError('bug'))")
    ]


def test_exception_in_parser_fails_closed() -> None:
    inspector = _Buggy()
    assert inspector.feed(0, memoryview(b"abcd")) is False

    assert inspector.matched
    assert [p.name for p in inspector.problems(eof=True)] == ["inspector_error"]


def test_early_result_fails_closed() -> None:
    inspector = StreamInspector()
    inspector.feed(b"x" * 100)

    early = inspector.result(eof=False)

    assert [p.name for p in early.problems] == ["incomplete"]
    assert inspector.result(eof=True).safe


def test_early_result_names_the_missing_structure(images: ImageFactory) -> None:
    path = images.create("vhdx", 7 * MiB, data=False)
    inspector = StreamInspector(total_size=path.stat().st_size)
    with path.open("rb") as file:
        inspector.feed(file.read(MiB))  # the metadata region is 3 MiB in

    result = inspector.result(eof=False)

    assert result.format == "vhdx"
    assert {p.name for p in result.problems} == {"incomplete"}
    assert "metadata" in result.problems[0].message


@pytest.mark.parametrize("mode", ["file", "stream"])
def test_empty_input_is_a_problem(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")

    result = inspect_file(path) if mode == "file" else inspect_stream(iter([]))

    assert result.format == "raw"
    assert [p.name for p in result.problems] == ["empty"]


def test_short_stream_is_truncated() -> None:
    inspector = StreamInspector(total_size=MiB)
    inspector.feed(bytes(64 * 1024))

    result = inspector.result(eof=True)

    assert [p.name for p in result.problems] == ["truncated"]


def test_long_stream_is_a_mismatch() -> None:
    inspector = StreamInspector(total_size=64 * 1024)
    inspector.feed(bytes(128 * 1024))

    assert [p.name for p in inspector.result(eof=True).problems] == ["size_mismatch"]


def test_feed_accepts_any_buffer() -> None:
    inspector = StreamInspector()
    inspector.feed(bytearray(b"QFI\xfb"))
    inspector.feed(memoryview(struct.pack(">I", 3)))
    inspector.feed(memoryview(bytes(8)).cast("I"))

    assert inspector.bytes_fed == 16


def test_result_api() -> None:
    problem = Problem("backing_file", "has a backing file")
    result = InspectionResult(
        format="iso", virtual_size=2048, problems=(problem,), bytes_inspected=10
    )

    assert result.qemu_format == "raw"
    assert not result.safe
    with pytest.raises(UnsafeImageError) as caught:
        result.raise_for_problems()
    assert caught.value.problems == (problem,)
    assert caught.value.format_name == "iso"
    assert result.as_dict() == {
        "format": "iso",
        "virtual_size": 2048,
        "compression": None,
        "safe": False,
        "problems": [{"name": "backing_file", "message": "has a backing file"}],
        "details": {},
    }


def test_public_names() -> None:
    for name in formats.__all__:
        assert hasattr(formats, name), name
    assert DEFAULT_MAX_VIRTUAL_SIZE == 64 * 1024**4
    assert set(FORMATS) == {
        "qcow2",
        "vmdk",
        "vdi",
        "vpc",
        "vhdx",
        "iso",
        "gzip",
        "xz",
        "zstd",
        "bzip2",
        "tar",
    }
