"""nbdkit Python plugin: serve a remote image (HTTP(S) or S3) as a read-only NBD export by range.

Owns only the nbdkit callbacks. Everything about ranges, checks, retries and resume lives in
`importer.rangeclient`; this module parses the one parameter, builds a `RangeReader` once, and maps
NBD reads onto it. The importer starts it through `cdi.image.nbdkit.NbdkitServer`:

    nbdkit --foreground -U <sock> --pidfile <pid> -r \\
        python <this file> config=<path to a 0600 JSON file, see rangeclient.SourceConfig>

with the environment from `cdi.image.nbdkit.python_plugin_env()` (a PYTHONPATH that reaches our
packages and the venv's urllib3/boto3). Secrets live in the config file, never on the command line.

Runs inside nbdkit's embedded interpreter (Debian's CPython 3.11, not the venv's), in nbdkit's
worker threads, so it must not: import aiohttp or other importer modules that pull it in, start
subprocesses on `sys.executable` (that is a different Python), or call the builtin `open` by that
name (nbdkit's `open` callback below shadows it). An exception from any callback becomes an error
in nbdkit's log and EIO for the NBD client; the message says what the source did wrong.
"""

from __future__ import annotations

import logging
import sys
from typing import Final

import nbdkit

from cdi.image.lifetime import rearm_in_child
from importer.rangeclient import (
    RangeCheckError,
    RangeReader,
    SourceConfig,
    SourceError,
    open_reader,
)

API_VERSION: Final = 2

# NBD clients may ask for large requests; the reader splits them into `max_request` ranges anyway.
# 64 MiB is nbdkit's own ceiling for one request.
_MAX_NBD_REQUEST: Final = 64 * 1024 * 1024
_PREFERRED_BLOCK: Final = 4096

_config_path: str | None = None
_reader: RangeReader | None = None


def _setup_logging() -> None:
    """Send the rangeclient's retry and redirect lines to stderr, which is nbdkit's log."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("nbdkit python: %(name)s: %(levelname)s: %(message)s"))
    logger = logging.getLogger("importer")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _short(exc: SourceError) -> SourceError:
    """`exc` without its frames. nbdkit logs a traceback for every failed callback, and the
    importer quotes the log's tail in its error; the message says it all, frames inside
    rangeclient only push it out of that tail. Unexpected exceptions keep their full traceback."""
    return exc.with_traceback(None)


def thread_model() -> int:
    # A network source must be PARALLEL: serialized, one slow range stalls every other reader.
    return int(nbdkit.THREAD_MODEL_PARALLEL)


def config(key: str, value: str) -> None:
    global _config_path  # noqa: PLW0603 (nbdkit's callback API is module-level state)
    if key != "config":
        raise ValueError(f"unknown parameter {key!r}; the only one is config=<file>")
    if _config_path is not None:
        raise ValueError("config= given twice")
    _config_path = value


def config_complete() -> None:
    """Load the config and probe the source once; a wrong size or no Range support stops here."""
    global _reader
    if _config_path is None:
        raise ValueError("missing parameter config=<file>")
    # nbdkit arms SIGTERM for its parent's death, and on SIGTERM waits for a read in flight
    # (a stalled source: minutes): the importer killed, nbdkit must go at once.
    rearm_in_child()
    _setup_logging()
    cfg = SourceConfig.load(_config_path)
    if cfg.size is None:
        raise ValueError(f"{_config_path}: 'size' is required for the plugin")
    try:
        # open_reader compares the server's total with cfg.size and raises on a mismatch.
        _reader, info = open_reader(cfg)
    except SourceError as exc:
        raise _short(exc) from None
    logging.getLogger("importer.nbdkit_plugin").info(
        "source ready source=%s size=%d content_type=%s accept_ranges=%s",
        _reader.name,
        info.size,
        info.content_type,
        info.accept_ranges,
    )


def open(readonly: bool) -> int:  # shadows the builtin by nbdkit's design
    # One reader serves every connection: its connection pool is shared and thread-safe.
    return 1


def _the_reader() -> RangeReader:
    if _reader is None:
        raise RuntimeError("plugin used before config_complete")
    return _reader


def get_size(h: int) -> int:
    return _the_reader().size


def can_multi_conn(h: int) -> bool:
    # Read-only and stateless: every connection sees the same bytes.
    return True


def can_write(h: int) -> bool:
    return False


def can_cache(h: int) -> int:
    return int(nbdkit.CACHE_NONE)


def block_size(h: int) -> tuple[int, int, int]:
    return (1, _PREFERRED_BLOCK, _MAX_NBD_REQUEST)


def pread(h: int, buf: memoryview, offset: int, flags: int) -> None:
    reader = _the_reader()
    # nbdkit checks bounds against get_size too; this is the plugin's own range check.
    if offset < 0 or offset + len(buf) > reader.size:
        raise RangeCheckError(
            f"NBD read of {len(buf)} bytes at offset {offset} is outside the export "
            f"(size {reader.size})"
        )
    try:
        reader.readinto(buf, offset)
    except SourceError as exc:
        raise _short(exc) from None


def unload() -> None:
    if _reader is not None:
        _reader.close()
