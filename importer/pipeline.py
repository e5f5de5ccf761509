"""The import pipeline: CDI's processing phases (reference §5.3) over our streaming data path.

    Info ──┬─ archive ─────────────────────────► TransferDataDir ──────────────► Complete
           ├─ plain image, source serves ranges ► Convert (qemu-img ← nbdkit) ─► Resize ► Complete
           ├─ raw (maybe compressed) ───────────► TransferDataFile ────────────► Resize ► Complete
           └─ needs conversion, no ranges / ────► TransferScratch ► Convert ───► Resize ► Complete
              compressed / checksum

Info probes the source and inspects the first bytes (after decompression) with the pure-Python
inspector before any tool sees them. The network side is a coroutine that hashes and counts the
bytes as they come; decompression, inspection and writing run in one worker thread fed through a
bounded `ChunkFeed`, so memory stays bounded and the event loop stays free for the metrics.
A phase is entered once; entering one twice is a bug and aborts.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO

import importer
from cdi.api import (
    MESSAGE_IMPORT_COMPLETE,
    ContentType,
    ImporterPhase,
    SourceType,
    TerminationMessage,
    env,
)
from cdi.image import qemuimg
from cdi.image.compression import detect_compression, open_decompressed
from cdi.image.errors import (
    BadImageError,
    ImageError,
    ImageTooLargeError,
    UnsafeImageError,
)
from cdi.image.formats import POINTER_LIMIT, WRAPPER_FORMATS, InspectionResult, StreamInspector
from cdi.image.nbdkit import NbdkitServer, python_plugin_env
from importer.archive import extract_tar, remove_created
from importer.checksum import StreamHasher
from importer.errors import (
    ChecksumMismatchError,
    FatalProcessingError,
    ImporterError,
    ProcessingError,
    ScratchSpaceRequired,
    SettingsError,
)
from importer.feed import ChunkFeed, ReplayReader
from importer.metrics import ImportProgress
from importer.settings import ImporterSettings
from importer.sources import Source, SourceInfo, open_source
from importer.target import (
    StreamWriter,
    TargetSpace,
    device_size,
    fsync_path,
    measure_target,
    supports_direct_io,
)

log = logging.getLogger(__name__)

# The inspector may need bytes as far in as a VHDX's metadata region (POINTER_LIMIT); the head
# is kept to be written out once the route is known, in memory up to HEAD_IN_MEMORY, then on disk.
HEAD_LIMIT = POINTER_LIMIT + (128 << 10)
HEAD_IN_MEMORY = 8 << 20
INSPECT_READ = 64 << 10
COPY_BUFFER = 1 << 20
STREAM_BUFFER = 256 << 10
PLUGIN_PATH = Path(importer.__file__).parent / "nbdkit_plugin.py"


class _Route(enum.Enum):
    NBD = "nbd"  # convert straight from the source through nbdkit
    SCRATCH = "scratch"  # convert from the scratch copy
    WRITTEN = "written"  # raw bytes are already in the target
    EXTRACTED = "extracted"  # archive extracted


@dataclass
class _Outcome:
    route: _Route
    inspection: InspectionResult | None = None
    compression: str | None = None
    bytes_written: int = 0
    convert_from: Path | None = None  # SCRATCH route: the local copy (default: scratch image)


class ChainReader(io.RawIOBase):
    """The inspected head (already read, kept in `head`) followed by the rest of the stream."""

    def __init__(self, head: IO[bytes], rest: BinaryIO) -> None:
        super().__init__()
        self._head: IO[bytes] | None = head
        self._rest = rest
        head.seek(0)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        out = memoryview(buffer).cast("B")
        if self._head is not None:
            data = self._head.read(len(out))
            if data:
                out[: len(data)] = data
                return len(data)
            self._head.close()
            self._head = None
        readinto = getattr(self._rest, "readinto", None)  # buffered and decompressing readers
        if readinto is not None:
            return int(readinto(out) or 0)  # straight into the caller's buffer: no copy
        data = self._rest.read(len(out))
        out[: len(data)] = data
        return len(data)


def _translate(err: ImageError) -> ImporterError:
    """cdi.image errors become the importer's, once, with CDI's 'Unable to process data' prefix."""
    if isinstance(err, BadImageError):
        return FatalProcessingError(str(err))
    return ProcessingError(str(err))


class ImportRun:
    """One import: owns the phase record, the files it wrote, and their cleanup on failure.

    `source` replaces the one the settings name (the upload server passes the request body);
    `on_validated` is called once every byte has been received and the image has passed every
    check, before the conversion and resize that follow (the upload server's async answer).
    """

    def __init__(
        self,
        settings: ImporterSettings,
        progress: ImportProgress,
        *,
        source: Source | None = None,
        on_validated: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.progress = progress
        self._source = source
        self._on_validated = on_validated
        self.phases: list[ImporterPhase] = []
        self._written: list[Path] = []
        self._archive_entries: list[Path] = []
        self._transfer_share = 100.0  # percent of progress the download stands for
        self._preallocated = False

    def enter(self, phase: ImporterPhase) -> None:
        if phase in self.phases:
            raise ProcessingError(f"internal error: phase {phase} entered twice")
        self.phases.append(phase)
        log.info("phase=%s", phase.value)

    # --- entry point -------------------------------------------------------------------------
    async def run(self) -> TerminationMessage:
        try:
            if self.settings.source is SourceType.NONE:
                await self._blank()
            else:
                source = self._source or open_source(self.settings)
                try:
                    await self._import(source)
                finally:
                    await source.close()
        except ImageError as err:
            self._cleanup_failed()
            raise _translate(err) from err
        except BaseException:
            self._cleanup_failed()
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                if self.settings.paths.has_scratch:
                    self.settings.paths.scratch_image.unlink()
        self.enter(ImporterPhase.COMPLETE)
        self.progress.set_percent(100.0)
        return TerminationMessage(
            message=MESSAGE_IMPORT_COMPLETE, preallocation_applied=self._preallocated
        )

    def _cleanup_failed(self) -> None:
        for path in self._written:
            if path != self.settings.paths.block_device:
                path.unlink(missing_ok=True)
        remove_created(self._archive_entries)

    # --- blank -------------------------------------------------------------------------------
    async def _blank(self) -> None:
        s = self.settings
        if s.paths.is_block:
            if s.preallocation:
                self.enter(ImporterPhase.TRANSFER_DATA_FILE)
                size = device_size(s.paths.block_device)
                writer = StreamWriter(s.paths.block_device, limit=size, is_block=True, sparse=False)
                try:
                    for _ in range(size // COPY_BUFFER):
                        writer.write(bytes(COPY_BUFFER))
                    writer.write(bytes(size % COPY_BUFFER))
                    writer.finish()
                finally:
                    writer.close()
                self._preallocated = True
            return
        if not s.image_size:
            raise SettingsError(
                env.IMPORTER_IMAGE_SIZE, "is required for a blank image on a Filesystem volume"
            )
        space = measure_target(s)
        self.enter(ImporterPhase.RESIZE)
        space.path.unlink(missing_ok=True)
        self._written.append(space.path)
        prealloc = "falloc" if s.preallocation else None
        await qemuimg.create(str(space.path), space.usable, preallocation=prealloc)
        self._preallocated = s.preallocation
        os.chmod(space.path, env.DISK_IMAGE_MODE)
        fsync_path(space.path)

    # --- import ------------------------------------------------------------------------------
    async def _import(self, source: Source) -> None:
        s = self.settings
        self.enter(ImporterPhase.INFO)
        info = await source.probe()
        started = time.monotonic()
        log.info(
            "transfer start source=%s url=%s size=%s ranges=%s",
            source.kind,
            info.url,
            info.size,
            info.ranges,
        )
        space = None if s.content_type is ContentType.ARCHIVE else measure_target(s)
        hasher = StreamHasher(s.checksum) if s.checksum else None
        stream_done = asyncio.Event()
        blocking = getattr(source, "blocking_reader", None)
        direct: io.RawIOBase | None = blocking() if blocking is not None else None
        if direct is not None:
            # The worker thread reads the source itself: no producer, no feed.
            counted = _CountingReader(direct, hasher, self.progress, info.size, self)
            try:
                outcome = await asyncio.to_thread(self._consume, counted, info, space)
            finally:
                counted.close()
            if counted.eof:
                stream_done.set()
        else:
            feed = ChunkFeed()
            producer = asyncio.create_task(self._produce(source, info, feed, hasher, stream_done))
            try:
                outcome = await asyncio.to_thread(self._consume, feed, info, space)
            finally:
                feed.close()
                await producer
        if hasher is not None and outcome.route is not _Route.NBD:
            if not stream_done.is_set():
                raise ProcessingError(
                    "the source stream ended before the checksum could be checked"
                )
            if not hasher.matches():  # run() removes what was written
                raise ChecksumMismatchError(str(hasher.expected), str(hasher.calculated))
            log.info("checksum verified %s", hasher.expected)
        seconds = time.monotonic() - started
        log.info(
            "transfer end route=%s bytes=%d seconds=%.2f MiB/s=%.1f",
            outcome.route.value,
            self.progress.transferred,
            seconds,
            self.progress.transferred / (1 << 20) / max(seconds, 1e-6),
        )
        if outcome.route in (_Route.EXTRACTED, _Route.WRITTEN):
            self._validated()
        if outcome.route is _Route.EXTRACTED:
            return
        assert space is not None
        if outcome.route is _Route.NBD:
            assert outcome.inspection is not None
            await self._convert_from_nbd(source, outcome.inspection, space)
        elif outcome.route is _Route.SCRATCH:
            assert outcome.inspection is not None
            await self._convert_from_scratch(outcome.inspection, space, outcome.convert_from)
        await self._resize(space)

    def _validated(self) -> None:
        if self._on_validated is not None:
            callback, self._on_validated = self._on_validated, None
            callback()

    async def _produce(
        self,
        source: Source,
        info: SourceInfo,
        feed: ChunkFeed,
        hasher: StreamHasher | None,
        done: asyncio.Event,
    ) -> None:
        read = 0
        try:
            async for chunk in source.stream():
                if hasher is not None:
                    hasher.update(chunk)
                read += len(chunk)
                self.progress.add_bytes(len(chunk))
                if info.size:
                    self.progress.set_percent(read * self._transfer_share / info.size)
                if not await feed.put(chunk):
                    return  # the consumer has what it needs (the NBD route reads by range)
            done.set()
            await feed.finish()
        except ImporterError as err:
            await feed.finish(err)
        except Exception as err:  # the consumer must never wait for a producer that died
            await feed.finish(ProcessingError(f"reading the source failed: {err}"))

    # --- the worker thread: inspect, decide, write ---------------------------------------------
    def _consume(self, feed: io.RawIOBase, info: SourceInfo, space: TargetSpace | None) -> _Outcome:
        s = self.settings
        replay = ReplayReader(feed, limit=64 << 10)
        magic = _read_up_to(replay, 512)
        if not magic:
            raise FatalProcessingError("the source is empty (0 bytes); check the URL")
        replay.rewind()
        compression = detect_compression(magic)
        # Smaller than COPY_BUFFER: reads of COPY_BUFFER then go straight into the caller's
        # buffer (BufferedReader bypasses its own only for reads larger than it), one copy less.
        raw_stream: BinaryIO = io.BufferedReader(replay, STREAM_BUFFER)
        inner: BinaryIO = open_decompressed(raw_stream, compression) if compression else raw_stream

        inspector = StreamInspector(total_size=None if compression else info.size)
        head = tempfile.SpooledTemporaryFile(  # noqa: SIM115 - handed to ChainReader
            max_size=HEAD_IN_MEMORY,
            dir=str(s.paths.scratch_dir) if s.paths.has_scratch else None,
        )
        held = 0
        eof = False
        while not inspector.complete and held < HEAD_LIMIT:
            chunk = inner.read(INSPECT_READ)
            if not chunk:
                eof = True
                break
            inspector.feed(chunk)
            head.write(chunk)
            held += len(chunk)
        result = inspector.result(eof=eof)
        log.info(
            "inspected format=%s virtual_size=%s compression=%s problems=%s bytes=%d",
            result.format,
            result.virtual_size,
            compression,
            ",".join(p.name for p in result.problems) or "none",
            held,
        )
        rest = io.BufferedReader(ChainReader(head, inner), COPY_BUFFER)

        if s.content_type is ContentType.ARCHIVE:
            if result.format != "tar":
                raise FatalProcessingError(
                    f"content type archive needs a tar archive (optionally gzip/xz/zstd/bzip2 "
                    f"compressed), but the source is {result.format}"
                )
            self.enter(ImporterPhase.TRANSFER_DATA_DIR)
            data_dir = s.paths.data_dir
            stat = os.statvfs(data_dir)
            limit = stat.f_bavail * stat.f_frsize
            if s.image_size:
                limit = min(limit, s.image_size)
            extract_tar(rest, data_dir, limit=limit, created=self._archive_entries)
            _drain(raw_stream)
            return _Outcome(_Route.EXTRACTED, result, compression)

        assert space is not None
        if not result.safe:
            raise UnsafeImageError(result.problems, format_name=result.format)
        if result.format in WRAPPER_FORMATS:
            raise FatalProcessingError(
                f"the image is a {result.format} archive, not a disk image; import it with "
                "contentType archive, or put a disk image inside"
            )
        if result.virtual_size is not None and result.virtual_size > space.usable:
            raise ImageTooLargeError(result.virtual_size, space.usable)

        fmt = result.qemu_format
        if not compression and info.ranges and info.size is not None and not s.checksum:
            return _Outcome(_Route.NBD, result, None)

        if fmt != "raw" and not compression and info.local_path is not None:
            # A local seekable copy already exists (a staged upload): convert from it.
            self._transfer_share = 50.0
            head.close()
            return _Outcome(_Route.SCRATCH, result, None, convert_from=info.local_path)

        if fmt != "raw":
            if not s.paths.has_scratch:
                raise ScratchSpaceRequired(
                    f"a {fmt} image read as a stream must be converted from a local copy"
                )
            self.enter(ImporterPhase.TRANSFER_SCRATCH)
            self._transfer_share = 50.0  # conversion gets the other half
            scratch = s.paths.scratch_image
            stat = os.statvfs(s.paths.scratch_dir)
            writer = StreamWriter(
                scratch,
                limit=stat.f_bavail * stat.f_frsize,
                is_block=False,
                sparse=True,
                durable=False,
            )
            route = _Route.SCRATCH
        else:
            self.enter(ImporterPhase.TRANSFER_DATA_FILE)
            writer = StreamWriter(
                space.path,
                limit=space.usable,
                is_block=space.is_block,
                sparse=not s.preallocation,
            )
            self._written.append(space.path)
            route = _Route.WRITTEN
        try:
            written = _copy(rest, writer)
            preallocate = route is _Route.WRITTEN and s.preallocation and not space.is_block
            writer.finish(preallocate=preallocate)
            if route is _Route.WRITTEN:
                self._preallocated = s.preallocation
        finally:
            writer.close()
        _drain(raw_stream)
        return _Outcome(route, result, compression, written)

    # --- conversion --------------------------------------------------------------------------
    async def _convert_from_nbd(
        self, source: Source, inspection: InspectionResult, space: TargetSpace
    ) -> None:
        self.enter(ImporterPhase.CONVERT)
        workdir = Path(tempfile.mkdtemp(prefix="cdi-importer-"))
        try:
            config = _plugin_config(source.plugin_config(), workdir)
            server = NbdkitServer(
                "python",
                [str(PLUGIN_PATH), f"config={config}"],
                workdir=str(workdir),
                env=python_plugin_env(),
            )
            async with server:
                await self._validate_and_convert(server.uri, inspection, space, uri=True)
        except ImageError as err:
            # qemu-img only sees EIO; the plugin's log says what the server really did.
            detail = _last_log_line(workdir)
            if isinstance(err, BadImageError) or not detail:
                raise
            raise ProcessingError(f"{err} (nbdkit: {detail})") from err
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    async def _convert_from_scratch(
        self, inspection: InspectionResult, space: TargetSpace, local: Path | None = None
    ) -> None:
        self.enter(ImporterPhase.CONVERT)
        scratch = str(local or self.settings.paths.scratch_image)
        await self._validate_and_convert(scratch, inspection, space, uri=False)

    async def _validate_and_convert(
        self, src: str, inspection: InspectionResult, space: TargetSpace, *, uri: bool
    ) -> None:
        s = self.settings
        fmt = inspection.qemu_format
        info = await qemuimg.info(src, fmt=fmt, allow_uri=uri)
        problems = qemuimg.cross_check(inspection.format, inspection.virtual_size, info)
        if problems:
            raise UnsafeImageError(problems, format_name=inspection.format)
        if info.virtual_size > space.usable:
            raise ImageTooLargeError(info.virtual_size, space.usable)
        self._validated()
        base = 100.0 - self._transfer_share if not uri else 0.0
        share = 100.0 - base

        def on_progress(percent: float) -> None:
            self.progress.set_percent(base + percent * share / 100.0)

        if not space.is_block:
            space.path.unlink(missing_ok=True)
        self._written.append(space.path)
        preallocation = "falloc" if s.preallocation and not space.is_block else None
        await qemuimg.convert(
            src,
            str(space.path),
            src_fmt=fmt,
            src_is_uri=uri,
            cache=self._cache_mode(space),
            out_of_order_writes=True,
            no_create=space.is_block,
            preallocation=preallocation,
            sparse_size=0 if s.preallocation and space.is_block else None,
            progress=on_progress,
        )
        self._preallocated = s.preallocation

    def _cache_mode(self, space: TargetSpace) -> str:
        """O_DIRECT where the target takes it: the data is durable when qemu-img exits, with no
        flush tail and no page cache filled with a whole disk (measured faster here, too).
        Elsewhere writeback, which flushes at the end, as CDI does."""
        probe = space.path if space.is_block else space.path.parent
        return "none" if supports_direct_io(probe) else "writeback"

    async def _resize(self, space: TargetSpace) -> None:
        if space.is_block:
            fsync_path(space.path)
            return
        self.enter(ImporterPhase.RESIZE)
        current = space.path.stat().st_size
        if space.resize_to is not None and current < space.resize_to:
            prealloc = "falloc" if self.settings.preallocation else None
            await qemuimg.resize(str(space.path), space.resize_to, preallocation=prealloc)
            log.info("resized from=%d to=%d", current, space.resize_to)
        os.chmod(space.path, env.DISK_IMAGE_MODE)
        fsync_path(space.path)


class _CountingReader(io.RawIOBase):
    """A source read by the worker thread itself: hashes and counts what passes, as the
    producer coroutine does for sources read on the event loop."""

    def __init__(
        self,
        inner: io.RawIOBase,
        hasher: StreamHasher | None,
        progress: ImportProgress,
        size: int | None,
        run: ImportRun,
    ) -> None:
        super().__init__()
        self._inner = inner
        self._hasher = hasher
        self._progress = progress
        self._size = size
        self._run = run
        self._read = 0
        self.eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = self._inner.readinto(view) or 0
        if not n:
            self.eof = True
            return 0
        if self._hasher is not None:
            self._hasher.update(view[:n])
        self._read += n
        self._progress.add_bytes(n)
        if self._size:
            self._progress.set_percent(self._read * self._run._transfer_share / self._size)
        return n


def _read_up_to(reader: io.RawIOBase, size: int) -> bytes:
    buf = bytearray(size)
    got = 0
    while got < size:
        n = reader.readinto(memoryview(buf)[got:])
        if not n:
            break
        got += n
    return bytes(buf[:got])


def _copy(reader: io.BufferedReader[Any], writer: StreamWriter) -> int:
    total = 0
    while chunk := reader.read(COPY_BUFFER):  # fresh bytes each time: handed to the writer thread
        writer.write(chunk)
        total += len(chunk)
    return total


def _drain(stream: BinaryIO) -> None:
    """Read what is left (tar padding, trailing bytes) so the checksum covers the whole source."""
    while stream.read(COPY_BUFFER):
        pass


def _plugin_config(config: dict[str, Any], workdir: Path) -> Path:
    ca_files = config.pop("ca_files", [])
    config["ca_file"] = None
    if ca_files:
        bundle = workdir / "ca-bundle.pem"
        bundle.write_text("\n".join(Path(p).read_text() for p in ca_files))
        config["ca_file"] = str(bundle)
    path = workdir / "plugin.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # it may hold credentials
    with os.fdopen(fd, "w") as f:
        json.dump(config, f)
    return path


def _last_log_line(workdir: Path) -> str:
    try:
        lines = (workdir / "nbdkit.log").read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        if "error" in line.lower():
            return line.strip()
    return lines[-1].strip() if lines else ""


async def run_import(settings: ImporterSettings, progress: ImportProgress) -> TerminationMessage:
    return await ImportRun(settings, progress).run()
