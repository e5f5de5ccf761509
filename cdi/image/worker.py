"""What every worker process does at its edges: its log format and its termination message.

Shared by the importer (and upload server, size detection) and the cloner, which may not import
each other: logs go to stderr at CDI_LOG_LEVEL, and the termination message goes where the
kubelet reads it (CDI_TERMINATION_LOG, else /dev/termination-log when it exists: a worker run by
hand has none).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Final

from cdi.api import env

log = logging.getLogger(__name__)

LOG_LEVEL: Final = "CDI_LOG_LEVEL"


def configure_logging() -> None:
    """The workers' log format on stderr, level from CDI_LOG_LEVEL."""
    level = os.environ.get(LOG_LEVEL, "INFO").upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )


def termination_path() -> Path | None:
    """Where the termination message goes; None when run by hand (no kubelet file)."""
    override = os.environ.get(env.CDI_TERMINATION_LOG, "").strip()
    if override:
        return Path(override)
    default = Path(env.DEFAULT_TERMINATION_LOG)
    return default if default.exists() else None


def write_termination(text: str) -> None:
    """Write the termination message where the kubelet (or CDI_TERMINATION_LOG) wants it."""
    path = termination_path()
    if path is None:
        return
    try:
        path.write_text(text)
    except OSError as err:
        log.warning("cannot write termination log path=%s error=%s", path, err)
