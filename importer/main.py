"""`cdi-importer`: the importer pod's entry point (CDI's worker contract, reference §5).

Reads settings from the environment, runs one import, writes the termination message and exits:
0 with JSON on success (or when scratch space is required), 1 with one line of text on failure.
The only place that turns errors into exit codes and text.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from cdi.api import MESSAGE_SCRATCH_REQUIRED, TerminationMessage, encode_failure
from cdi.image.metricsserver import MetricsServer
from cdi.image.worker import configure_logging, write_termination
from importer.errors import ImporterError, ProcessingError, ScratchSpaceRequired
from importer.metrics import ImportProgress
from importer.pipeline import run_import
from importer.settings import ImporterSettings, parse_listen_address

log = logging.getLogger("importer")

HELP = """\
Fill one volume from a source and exit, as CDI's importer pod does. All input comes from
environment variables (CDI's names):

  IMPORTER_SOURCE        http | s3 | none (blank image)             [http]
  IMPORTER_ENDPOINT      URL of the image (http/https; s3: https://host/bucket/key)
  IMPORTER_CONTENTTYPE   kubevirt (disk image -> disk.img) | archive (tar -> data dir)
  IMPORTER_IMAGE_SIZE    volume size as a quantity (10Gi); the image grows to fit it
  FILESYSTEM_OVERHEAD    fraction kept free on Filesystem volumes (0.06)  [0]
  PREALLOCATION          true | false                                       [false]
  IMPORTER_CHECKSUM      algo:hex (md5, sha1, sha256, sha512) of the source bytes
  IMPORTER_ACCESS_KEY_ID / IMPORTER_SECRET_KEY   basic auth (http) or S3 keys
  IMPORTER_CERT_DIR      directory of CA certificates (PEM) to trust
  INSECURE_TLS           true to skip TLS verification
  IMPORTER_EXTRA_HEADER_<i>   extra request header "Name: value"
  OWNER_UID              label of the progress metric
  http_proxy, https_proxy, no_proxy (either case)

Paths (CDI's in-pod paths unless overridden, so it runs anywhere):
  CDI_DATA_DIR [/data]  CDI_BLOCK_DEVICE [/dev/cdi-block-volume]  CDI_SCRATCH_DIR [/scratch]
  CDI_TERMINATION_LOG [/dev/termination-log, written only if it exists]
  CDI_METRICS_ADDR [:8443]  host:port, :0 for any free port, or off
  CDI_STALL_TIMEOUT [600]   seconds without data before a download is abandoned

Exit status: 0 and a JSON termination message on success (also when scratch space is
required), 1 and one line of text on failure.
"""


def run(settings: ImporterSettings) -> int:
    progress = ImportProgress(settings.owner_uid)
    metrics = None
    if settings.metrics_addr:
        host, port = parse_listen_address(settings.metrics_addr)
        try:
            metrics = MetricsServer(progress.registry, host, port)
        except OSError as err:
            # As CDI's importer: the metrics endpoint is best effort (progress shows N/A), and
            # an address in use must not fail the import, let alone as a traceback.
            log.warning("metrics not served addr=%s error=%s", settings.metrics_addr, err)
    try:
        message = asyncio.run(run_import(settings, progress))
    except ScratchSpaceRequired as err:
        log.info("%s", err)
        message = TerminationMessage(scratch_space_required=True, message=MESSAGE_SCRATCH_REQUIRED)
    except ImporterError as err:
        return _fail(err)
    except Exception as err:  # the edge: nothing may escape as a traceback
        log.debug("unexpected error", exc_info=True)
        return _fail(ProcessingError(f"{type(err).__name__}: {err}"))
    finally:
        if metrics is not None:
            metrics.close()
    text = message.to_json()
    write_termination(text)
    print(text)
    return 0


def _fail(err: ImporterError) -> int:
    line = encode_failure(str(err))
    write_termination(line)
    print(f"cdi-importer: {line}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cdi-importer",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(argv)
    configure_logging()
    try:
        settings = ImporterSettings.from_env()
    except ImporterError as err:
        return _fail(err)
    log.info("settings %s", settings)
    return run(settings)


if __name__ == "__main__":
    sys.exit(main())
