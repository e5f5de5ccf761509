"""`cdi-cloner`: the clone source pod's entry point (CDI's cloner contract, reference §7.3).

Streams one volume to the upload server on the clone target and exits: 0 after the server's 200
("Clone Complete" in the termination log), 1 on any failure (one line on stderr and in the
termination log; the pod restarts and tries again), 2 on bad settings (the variable named).
The only place that turns errors into exit codes and text.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import ssl
import sys
import time
from typing import Final

from cdi.api import MESSAGE_CLONE_COMPLETE, encode_failure
from cdi.image.metricsserver import MetricsServer
from cdi.image.worker import configure_logging, write_termination
from cloner.client import ClientTls, clone_headers, send
from cloner.errors import EXIT_FAILED, EXIT_SETTINGS, CloneError, SettingsError
from cloner.metrics import CloneProgress
from cloner.settings import CloneSettings, Compression, Content
from cloner.stream import ArchiveSource, Body, Counts, DiskSource, Source, zstd_chunks

log = logging.getLogger("cloner")

EXIT_TERMINATED: Final = 143

HELP = """\
Stream one volume to the upload server of a clone target and exit, as CDI's cloner pod does.
All input comes from environment variables (CDI's names, ours marked *):

  UPLOAD_URL           the target's upload server (required), such as
                       https://cdi-upload-<pvc>.<ns>.svc:8443/v1beta1/upload
  UPLOAD_SERVER_ADDRESS *  host:port to connect to instead of the URL's host; TLS still
                       checks the URL's host name and the Host header stays the URL's
  CLIENT_CERT, CLIENT_KEY  the client certificate and its key (PEM contents, not paths)
  SERVER_CA_CERT       the CA (PEM contents) that signed the server's certificate
                       (all three required for https; mutual TLS)
  OWNER_UID            label of the progress metric
  VOLUME_MODE          block | filesystem (any case)                       [filesystem]
  MOUNT_POINT          the Filesystem source directory        [/var/run/cdi/clone/source]
  CDI_BLOCK_DEVICE *   the Block source device                    [/dev/cdi-block-volume]
  PREALLOCATION        true | false, passed on as x-cdi-preallocation (the target decides)
  CLONE_CONTENT_TYPE * kubevirt: MOUNT_POINT/disk.img or the device, as a sparse extent
                       stream (only data moves, holes and zero blocks stay behind);
                       archive: a tar of MOUNT_POINT's entries (not lost+found), holes
                       kept (Filesystem only)                                [kubevirt]
  CLONE_COMPRESSION *  none | zstd: the whole stream as one zstd stream      [none]
  CLONE_CONNECT_WAIT * seconds a refused connection to the upload server is retried: the
                       source pod starts while the target's server may still be starting [60]
  CDI_METRICS_ADDR *   host:port of the HTTPS metrics endpoint (port 0: any free port),
                       or off; kubevirt_cdi_clone_progress_total{ownerUID} is the percent of
                       the source's data sent                              [0.0.0.0:8443]
  CDI_TERMINATION_LOG *  [/dev/termination-log, written only if it exists or is set]
  CDI_LOG_LEVEL *      [INFO]

The source is opened read-only. The body is POSTed with x-cdi-content-type
blockdevice-clone (x-cdi-clone-encoding: extents-v1) or filesystem-clone.

Exit status: 0 after the server's 200 ("Clone Complete" in the termination log, and one log
line "clone complete wire_bytes=... data_bytes=... seconds=... mib_per_s=..."); 1 and one
line of text when the clone failed (unreachable server, TLS, refusal with the server's
answer, unreadable source); 2 and one line naming the variable on bad settings.
"""


def _fail(message: str, code: int) -> int:
    line = encode_failure(message)
    write_termination(line)
    print(f"cdi-cloner: {line}", file=sys.stderr, flush=True)
    return code


async def clone(
    settings: CloneSettings, context: ssl.SSLContext | None, progress: CloneProgress
) -> Counts:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    counts = Counts()
    source: Source
    if settings.content is Content.ARCHIVE:
        source = ArchiveSource(settings.mount_point)
    else:
        source = DiskSource(settings.source)
    try:
        chunks = source.chunks(counts, progress)
        if settings.compression is Compression.ZSTD:
            chunks = zstd_chunks(chunks)
        body = Body(chunks, counts, source.abort)
        try:
            answer = await send(settings, context, body, clone_headers(settings))
        finally:
            body.close()  # after send: its thread is out of the body by then
    finally:
        source.close()
    log.debug("server answered %s", answer)
    return counts


def run(settings: CloneSettings, tls: ClientTls | None) -> int:
    progress = CloneProgress(settings.owner_uid)
    metrics = None
    if settings.metrics_addr is not None:
        host, port = settings.metrics_addr
        try:
            metrics = MetricsServer(progress.registry, host, port)
        except OSError as err:
            # Best effort, as for the importer: progress shows N/A, the clone goes on.
            log.warning("metrics not served addr=%s:%d error=%s", host, port, err)
    what = settings.mount_point if settings.content is Content.ARCHIVE else settings.source
    log.info(
        "clone start url=%s source=%s content=%s compression=%s",
        settings.upload_url,
        what,
        settings.content,
        settings.compression,
    )
    started = time.monotonic()
    try:
        counts = asyncio.run(clone(settings, tls.context if tls else None, progress))
    except CloneError as err:
        return _fail(str(err), EXIT_FAILED)
    except asyncio.CancelledError:
        return _fail("terminated (SIGTERM) during the clone", EXIT_TERMINATED)
    except Exception as err:  # the edge: nothing may escape as a traceback
        log.debug("unexpected error", exc_info=True)
        return _fail(f"{type(err).__name__}: {err}", EXIT_FAILED)
    finally:
        if metrics is not None:
            metrics.close()
        if tls is not None:
            tls.close()
    seconds = time.monotonic() - started
    log.info(
        "clone complete wire_bytes=%d data_bytes=%d source_bytes=%d seconds=%.3f mib_per_s=%.1f",
        counts.wire,
        counts.data,
        counts.size,
        seconds,
        counts.data / (1 << 20) / max(seconds, 1e-6),
    )
    write_termination(MESSAGE_CLONE_COMPLETE)
    print(MESSAGE_CLONE_COMPLETE, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cdi-cloner",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(argv)
    configure_logging()
    try:
        settings = CloneSettings.from_env()
        # PEM contents that do not load are bad settings too, reported before anything else.
        tls = ClientTls(settings.tls) if settings.tls is not None else None
    except SettingsError as err:
        return _fail(str(err), EXIT_SETTINGS)
    log.info("settings %s", settings)
    return run(settings, tls)


if __name__ == "__main__":
    sys.exit(main())
