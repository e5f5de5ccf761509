"""The format registry and the entry points that run every inspector over one stream.

Owns: `FORMATS` (qemu-img name -> inspector class), `InspectionResult` (the verdict),
`StreamInspector` (feeds all inspectors the same bytes, in one pass, with bounded memory) and the
helpers `inspect_stream` and `inspect_file`. The verdict is fail-closed:
- more than one specific format matching is `multiple_formats`, never a choice;
- raw is a positive decision, made only when nothing matched, every inspector had the bytes it
  needed (or the stream ended), and the stream was not empty;
- a compressed stream is decompressed and inspected again, and `compression` says so.

Used by the importer and upload server before any external tool sees the data, and by the CLI.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from cdi.image.compression import NAMES as COMPRESSION_NAMES
from cdi.image.compression import detect_compression, iter_decompressed, open_decompressed
from cdi.image.errors import FormatError, Problem, UnsafeImageError
from cdi.image.formats.base import FormatInspector
from cdi.image.formats.iso import IsoInspector
from cdi.image.formats.qcow2 import Qcow2Inspector
from cdi.image.formats.vdi import VdiInspector
from cdi.image.formats.vhd import VhdInspector
from cdi.image.formats.vhdx import VhdxInspector
from cdi.image.formats.vmdk import VmdkInspector
from cdi.image.formats.wrappers import (
    Bzip2Inspector,
    GzipInspector,
    TarInspector,
    XzInspector,
    ZstdInspector,
)

#: The largest virtual size accepted unless the caller says otherwise: 64 TiB, far beyond any
#: real disk, so only absurd headers (or a volume limit passed per call) trip it.
DEFAULT_MAX_VIRTUAL_SIZE: Final = 64 * 1024**4

#: Every specific format, in the order a verdict names them. Raw is what none of them matched.
FORMATS: Final[Mapping[str, type[FormatInspector]]] = MappingProxyType(
    {
        cls.NAME: cls
        for cls in (
            Qcow2Inspector,
            VmdkInspector,
            VdiInspector,
            VhdInspector,
            VhdxInspector,
            IsoInspector,
            GzipInspector,
            XzInspector,
            ZstdInspector,
            Bzip2Inspector,
            TarInspector,
        )
    }
)
WRAPPER_FORMATS: Final = frozenset(name for name, cls in FORMATS.items() if cls.WRAPPER)
COMPRESSION_FORMATS: Final = frozenset(COMPRESSION_NAMES)

_NOWHERE: Final = 1 << 62

#: The magic of every compression format fits in this many leading bytes.
_COMPRESSION_MAGIC_BYTES: Final = 6


def _empty_details() -> Mapping[str, object]:
    return MappingProxyType({})


@dataclass(frozen=True)
class InspectionResult:
    """What the inspector decided about one image."""

    #: qemu-img's spelling ("raw", "qcow2", "vmdk", "vdi", "vpc", "vhdx"), "iso", or a
    #: container: "gzip", "xz", "zstd", "bzip2", "tar".
    format: str
    #: Bytes, as `qemu-img info` reports it: for raw and iso the total size (rounded up to a
    #: sector, as qemu does) when known; None for containers and when unknown.
    virtual_size: int | None
    problems: tuple[Problem, ...]
    #: How many bytes of the stream the verdict needed (for files: how many were read).
    bytes_inspected: int
    #: The compression the image was found inside, when it was decompressed to be inspected.
    compression: str | None = None
    #: Format facts worth showing (qcow2 version, vmdk create_type, ...), and `notes` on what
    #: could not be checked.
    details: Mapping[str, object] = field(default_factory=_empty_details)

    @property
    def qemu_format(self) -> str:
        """What to pass to `qemu-img -f`. Containers have none: unpack them first."""
        if self.format in WRAPPER_FORMATS:
            raise FormatError(f"{self.format} is a container, not a disk image qemu-img can read")
        return "raw" if self.format == "iso" else self.format

    @property
    def safe(self) -> bool:
        return not self.problems

    def raise_for_problems(self) -> None:
        if self.problems:
            raise UnsafeImageError(self.problems, format_name=self.format)

    def as_dict(self) -> dict[str, object]:
        return {
            "format": self.format,
            "virtual_size": self.virtual_size,
            "compression": self.compression,
            "safe": self.safe,
            "problems": [p.as_dict() for p in self.problems],
            "details": {key: _jsonable(value) for key, value in self.details.items()},
        }


def _jsonable(value: object) -> object:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    return value


def _qemu_raw_size(size: int | None) -> int | None:
    """qemu counts a raw file in whole sectors: a partial last sector reads as zeros."""
    return None if size is None else -(-size // 512) * 512


class StreamInspector:
    """Runs every format's inspector over one stream fed in chunks of any size.

    Memory is the sum of the inspectors' capped regions, whatever the stream's size; once
    `complete`, a chunk costs only the footer buffers' update, so it can sit in the data path of
    a whole transfer and give the footer-based verdicts at `result(eof=True)`.
    """

    def __init__(
        self,
        *,
        total_size: int | None = None,
        max_virtual_size: int = DEFAULT_MAX_VIRTUAL_SIZE,
    ) -> None:
        if total_size is not None and total_size < 0:
            raise ValueError(f"total_size must not be negative, got {total_size}")
        self._total_size = total_size
        self._max_virtual_size = max_virtual_size
        self._inspectors = [cls(total_size=total_size) for cls in FORMATS.values()]
        self._position = 0
        self._end = 0
        self._complete = False
        #: Inspectors still reading headers, and the others that keep a footer buffer.
        self._active = list(self._inspectors)
        self._tails = [i for i in self._inspectors if i.end_length]
        self._next_needed = 0
        #: Set by `inspect_file`: bytes arrive by offset, and the file's size is the stream's.
        self._random_access = False

    @property
    def complete(self) -> bool:
        """True once every format had the header bytes it needs to decide."""
        return self._complete

    @property
    def bytes_held(self) -> int:
        return sum(inspector.bytes_held for inspector in self._inspectors)

    @property
    def bytes_fed(self) -> int:
        return self._position

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
        if not view:
            return
        self._feed_at(self._position, view)
        self._position += len(view)

    def result(self, *, eof: bool) -> InspectionResult:
        """The verdict: once `complete`, or with `eof=True` once the stream has ended.

        Asked earlier, it fails closed: the result carries an `incomplete` problem.
        """
        # A file's size is known up front; a stream's is what arrived, once it has ended.
        stream_size = self._total_size if self._random_access or not eof else self._end
        problems: list[Problem] = []
        if eof and not self._random_access and self._total_size is not None:
            if self._end < self._total_size:
                problems.append(
                    Problem(
                        "truncated",
                        f"the stream ended after {self._end} of {self._total_size} bytes",
                    )
                )
            elif self._end > self._total_size:
                problems.append(
                    Problem(
                        "size_mismatch",
                        f"the stream is longer than the {self._total_size} bytes announced",
                    )
                )
        for inspector in self._inspectors:
            inspector.finish(eof=eof, stream_size=stream_size)
        if eof and stream_size == 0:
            return InspectionResult(
                format="raw",
                virtual_size=0,
                problems=(Problem("empty", "the image is empty (0 bytes)"),),
                bytes_inspected=0,
            )
        matched = [inspector for inspector in self._inspectors if inspector.matched]
        details: dict[str, object] = {}
        notes: list[str] = []
        if len(matched) > 1:
            names = [inspector.NAME for inspector in matched]
            problems.append(
                Problem(
                    "multiple_formats",
                    f"the image matches several formats ({', '.join(names)}); "
                    "refusing an ambiguous image",
                )
            )
            details["matched_formats"] = names
        virtual_size: int | None
        if matched:
            chosen = matched[0]
            name = chosen.NAME
            virtual_size = chosen.virtual_size
            for inspector in matched:
                for problem in inspector.problems(eof=eof):
                    if problem not in problems:
                        problems.append(problem)
            details.update(chosen.details)
            notes.extend(chosen.notes)
        else:
            name = "raw"
            virtual_size = _qemu_raw_size(stream_size)
            if not eof:
                notes.append("end of stream not seen: a fixed VHD footer was not looked for")
        if not eof and not self._complete and not any(p.name == "incomplete" for p in problems):
            problems.append(
                Problem(
                    "incomplete",
                    f"inspection stopped after {self._end} bytes, before every format had "
                    "the header bytes it needs",
                )
            )
        if virtual_size is not None and virtual_size > self._max_virtual_size:
            problems.append(
                Problem(
                    "virtual_size_limit",
                    f"virtual size {virtual_size} exceeds the limit of {self._max_virtual_size}",
                )
            )
        if notes:
            details["notes"] = tuple(notes)
        if self._complete:
            inspected = min(self._end, max(i.consumed for i in self._inspectors))
        else:
            inspected = self._end
        return InspectionResult(
            format=name,
            virtual_size=virtual_size,
            problems=tuple(problems),
            bytes_inspected=inspected,
            details=MappingProxyType(details),
        )

    # -- used by inspect_file -----------------------------------------------------------------

    def _feed_at(self, position: int, view: memoryview) -> None:
        stop = position + len(view)
        for inspector in self._tails:
            inspector.feed_end(position, view)
        if stop > self._next_needed:
            # Someone waits for bytes in this chunk; otherwise the chunk costs only the footers.
            self._active = [i for i in self._active if i.feed(position, view)]
            tails = [i for i in self._inspectors if i.end_length]
            for inspector in tails:
                if inspector not in self._tails:
                    # A footer buffer declared by this very chunk's header needs it too.
                    inspector.feed_end(position, view)
            self._tails = tails
            self._next_needed = min((i.next_needed for i in self._active), default=_NOWHERE)
            self._complete = not self._active
        self._end = max(self._end, stop)

    def _next_span(self, limit: int) -> tuple[int, int] | None:
        """The next byte range worth reading: from the earliest byte still needed, as far as
        the regions wanting bytes within `limit` of it need."""
        pending = [r for i in self._inspectors for r in i.pending_regions]
        if not pending:
            return None
        start = min(r.next_offset for r in pending)
        stop = max(r.end for r in pending if r.next_offset < start + limit)
        return start, min(stop, start + limit)

    def _tail_length(self) -> int:
        return max((i.end_length for i in self._inspectors), default=0)


def inspect_stream(
    chunks: Iterable[bytes],
    *,
    total_size: int | None = None,
    max_virtual_size: int = DEFAULT_MAX_VIRTUAL_SIZE,
    decompress: bool = True,
) -> InspectionResult:
    """Inspect a stream, pulling chunks only until the verdict is complete.

    Footers are checked only if the stream ends before the headers are complete (the result's
    `notes` say what was not checked). When the stream is compressed and `decompress` is true,
    the decompressed stream is inspected instead and the result says which `compression` it
    was in; the chunks pulled so far (the first ~33 KiB, the most any format at offset 0 needs)
    are kept to replay into the decompressor.
    """
    inspector = StreamInspector(total_size=total_size, max_virtual_size=max_virtual_size)
    iterator = iter(chunks)
    head = b""
    replay: list[bytes] = []
    eof = True
    for chunk in iterator:
        inspector.feed(chunk)
        if decompress and (len(head) < _COMPRESSION_MAGIC_BYTES or replay):
            head = (head + bytes(chunk[:_COMPRESSION_MAGIC_BYTES]))[:_COMPRESSION_MAGIC_BYTES]
            if len(head) < _COMPRESSION_MAGIC_BYTES or detect_compression(head):
                replay.append(chunk)
            else:
                replay.clear()
        if inspector.complete:
            eof = False
            break
    result = inspector.result(eof=eof)
    if not decompress or result.format not in COMPRESSION_FORMATS or not result.safe:
        return result
    inner_chunks = iter_decompressed(itertools.chain(replay, iterator), result.format)
    inner = inspect_stream(inner_chunks, max_virtual_size=max_virtual_size, decompress=False)
    return dataclasses.replace(inner, compression=result.format)


def inspect_file(
    path: str | os.PathLike[str],
    *,
    max_virtual_size: int = DEFAULT_MAX_VIRTUAL_SIZE,
    chunk_size: int = 64 * 1024,
    decompress: bool = True,
) -> InspectionResult:
    """Inspect a file (or block device), reading only the ranges the formats ask for: the
    header windows, the structures they point to, and the last bytes for footers."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    with open(path, "rb") as file:
        size = file.seek(0, os.SEEK_END)
        inspector = StreamInspector(total_size=size, max_virtual_size=max_virtual_size)
        inspector._random_access = True  # the two cooperate by design
        read = 0
        while not inspector.complete:
            span = inspector._next_span(chunk_size)
            if span is None or span[0] >= size:
                break
            start, stop = span[0], min(span[1], size)
            file.seek(start)
            data = file.read(stop - start)
            if not data:
                break
            inspector._feed_at(start, memoryview(data))
            read += len(data)
        tail = inspector._tail_length()
        if tail and size:
            start = max(0, size - tail)
            file.seek(start)
            data = file.read(size - start)
            inspector._feed_at(start, memoryview(data))
            read += len(data)
        result = dataclasses.replace(inspector.result(eof=True), bytes_inspected=read)
        if not decompress or result.format not in COMPRESSION_FORMATS or not result.safe:
            return result
        file.seek(0)
        with open_decompressed(file, result.format) as reader:
            inner = inspect_stream(
                _read_chunks(reader, chunk_size),
                max_virtual_size=max_virtual_size,
                decompress=False,
            )
        return dataclasses.replace(inner, compression=result.format)


def _read_chunks(reader: io.BufferedReader, chunk_size: int) -> Iterator[bytes]:
    while data := reader.read1(chunk_size):
        yield data
