"""`cdi-uploadserver`: the upload pod's entry point (CDI's upload server contract, reference §6).

Receives one image over HTTPS (client certificate required), writes it into the volume through
the importer's pipeline, writes the termination message and exits: 0 with JSON after a
successful upload (or when DEADLINE passed with no upload), 1 with one line of text when an
async upload fails after it was answered, 1 on bad settings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys

from aiohttp import web

from cdi.api import encode_failure
from cdi.image.httpfront import HttpFront
from cdi.image.worker import configure_logging, write_termination
from importer.errors import ImporterError
from importer.upload.server import UploadServer
from importer.upload.settings import UploadSettings

log = logging.getLogger("importer.uploadserver")

SHUTDOWN_TIMEOUT = 5.0  # seconds the server waits for answers in flight once it is done

HELP = """\
Receive one upload into a volume and exit, as CDI's upload server pod does. All input comes
from environment variables (CDI's names):

  TLS_KEY_FILE, TLS_CERT_FILE   the server's key and certificate (PEM)
  CLIENT_CERT_FILE     CA (PEM) that must have signed the client certificate
  CLIENT_NAME          the client certificate's required CN
                       [client.upload-server.cdi.kubevirt.io]
  TLS_MIN_VERSION      VersionTLS10 .. VersionTLS13                          [VersionTLS12]
  TLS_CIPHERS          comma-separated OpenSSL cipher names (TLS 1.2 and older)
  UPLOAD_IMAGE_SIZE    volume size as a quantity (10Gi); the raw image grows to fit it
  FILESYSTEM_OVERHEAD  fraction kept free on Filesystem volumes (0.06)         [0]
  PREALLOCATION        true | false                                            [false]
  DESTINATION          /data/disk.img (Filesystem) or /dev/cdi-block-volume (Block);
                       another path: <dir>/disk.img is Filesystem, anything else an
                       existing Block device (or a file standing in for one)  [/data/disk.img]
  DEADLINE             RFC 3339 time; if it passes with no upload: exit 0 with
                       {"message":"Deadline Passed","deadlinePassed":true}
  LISTEN_ADDRESS       [0.0.0.0]     LISTEN_PORT [8443] (0: any free port, logged)
  OWNER_UID            label of the progress metric
  UPLOAD_INSECURE      true: plain HTTP, no client certificate; tests only, refused
                       unless LISTEN_ADDRESS is a loopback address             [false]

Paths (CDI's in-pod paths unless overridden, so it runs anywhere):
  CDI_DATA_DIR [/data]  CDI_BLOCK_DEVICE [/dev/cdi-block-volume]  CDI_SCRATCH_DIR [/scratch]
  CDI_TERMINATION_LOG [/dev/termination-log, written only if it exists]
  CDI_LOG_LEVEL [INFO]

Paths served (v1beta1 and v1alpha1): POST /upload (sync), /upload-async, /upload-form,
/upload-form-async (multipart field "file"), /upload-archive (tar into the volume);
HEAD on the async paths -> 200; GET /healthz, GET /metrics (progress). Resumable (ours): PUT
/upload, /upload-async or /upload-archive with "Content-Range: bytes START-END/TOTAL" appends at
the current offset, HEAD on them answers "Upload-Offset: N"; the chunk that completes TOTAL is
processed as a POST of the whole file. Staged in CDI_SCRATCH_DIR (else next to the image).

Exit status: 0 and a JSON termination message after a successful upload
({"message":"Upload Complete","preallocationApplied":...}) or when the deadline passed; 1 and
one line of text when an async upload failed after it was answered, or on bad settings.
"""


async def serve(settings: UploadSettings) -> int:
    server = UploadServer(settings)
    runner = web.AppRunner(
        server.app(),
        handle_signals=False,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        access_log_format='%a "%r" %s %b %Tfs',
        read_bufsize=1 << 20,
    )
    await runner.setup()
    loop = asyncio.get_running_loop()
    assert runner.server is not None
    try:
        # Upload bodies are read by blocking threads (see cdi.image.httpfront); the rest of
        # the requests reach the aiohttp app through it.
        front = HttpFront(
            settings.listen_address,
            settings.listen_port,
            settings.ssl_context(),
            server.route,
            loop=loop,
            protocol_factory=runner.server,
            name="upload",
        )
    except OSError as err:
        await runner.cleanup()
        raise ImporterError(
            f"cannot listen on {settings.listen_address}:{settings.listen_port}: {err}"
        ) from None
    server.front = front
    for sig, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        loop.add_signal_handler(sig, server.finish, code)
    port = front.port
    scheme = "http" if settings.insecure else "https"
    log.info(
        "serving addr=%s://%s:%d pid=%d destination=%s block=%s client_name=%s",
        scheme,
        settings.listen_address,
        port,
        os.getpid(),
        settings.destination,
        settings.is_block,
        "-" if settings.insecure else settings.client_name,
    )
    code = await server.finished
    if server.busy:
        # A signal in the middle of an upload: nothing was reported as complete (a staged
        # resumable upload stays for the next run). Its pipeline threads cannot be joined (one
        # may wait for a body that never comes), so leave now rather than wait for them.
        log.info("terminated during an upload exit=%d", code)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code not in (0, 1):
        log.info("terminated by signal exit=%d", code)
    front.close()
    await runner.cleanup()
    log.info("exit code=%d", code)
    return code


def _fail(err: ImporterError) -> int:
    line = encode_failure(str(err))
    write_termination(line)
    print(f"cdi-uploadserver: {line}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cdi-uploadserver",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(argv)
    configure_logging()
    try:
        settings = UploadSettings.from_env()
        settings.ssl_context()  # bad certificates fail here, with the variable named
    except ImporterError as err:
        return _fail(err)
    log.info("settings %s", settings)
    try:
        return asyncio.run(serve(settings))
    except ImporterError as err:
        return _fail(err)
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
