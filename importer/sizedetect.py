"""`cdi-image-size-detection -image-path PATH`: the virtual size of a volume's disk image.

CDI's size-detection pod (reference §7.4) runs this on a clone source before a host-assisted
clone with no size: the number of bytes, alone, is the termination message. The format is told
by our own inspector before qemu-img reads the file (an image is never probed by qemu-img), and
an image the inspector refuses is an invalid file.

Exit status, as CDI's: 0 the size was written; 1 bad arguments; 2 not a valid image; 3 no such
path; 4 the termination message could not be written; 5 anything else.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from cdi.api import env
from cdi.image import qemuimg
from cdi.image.errors import ImageError
from cdi.image.formats import COMPRESSION_FORMATS, inspect_file
from cdi.image.worker import configure_logging, termination_path

log = logging.getLogger("importer.sizedetect")

EXIT_OK = 0
EXIT_BAD_ARGS = 1
EXIT_INVALID_FILE = 2
EXIT_INVALID_PATH = 3
EXIT_BAD_TERMINATION_FILE = 4
EXIT_UNKNOWN = 5


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_ARGS)


async def virtual_size(path: Path) -> int:
    """The image's virtual size; ImageError when it is not a usable disk image."""
    result = await asyncio.to_thread(inspect_file, path, decompress=False)
    if not result.safe:
        problems = ", ".join(p.name for p in result.problems)
        raise ImageError(f"{path} is not a usable disk image: {problems}")
    if result.format in COMPRESSION_FORMATS:
        raise ImageError(f"{path} is {result.format}-compressed, not a disk image")
    info = await qemuimg.info(str(path), fmt=result.qemu_format)  # containers: FormatError
    return info.virtual_size


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(
        prog="cdi-image-size-detection",
        description="Write the virtual size of a disk image (bytes) as the termination message "
        f"({env.CDI_TERMINATION_LOG}, else {env.DEFAULT_TERMINATION_LOG}).",
    )
    parser.add_argument("-image-path", required=True, help="the image, e.g. /data/disk.img")
    args = parser.parse_args(argv)
    configure_logging()
    path = Path(args.image_path)
    if not path.exists():
        print(f"cdi-image-size-detection: {path} does not exist", file=sys.stderr)
        return EXIT_INVALID_PATH
    try:
        size = asyncio.run(virtual_size(path))
    except (ImageError, OSError) as err:
        print(f"cdi-image-size-detection: {err}", file=sys.stderr)
        return EXIT_INVALID_FILE
    except Exception as err:  # the edge: a line, never a traceback
        print(f"cdi-image-size-detection: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_UNKNOWN
    try:
        # CDI's pod always has the file: writing it is the point, so a missing one is exit 4.
        (termination_path() or Path(env.DEFAULT_TERMINATION_LOG)).write_text(str(size))
    except OSError as err:
        print(
            f"cdi-image-size-detection: cannot write the termination message: {err}",
            file=sys.stderr,
        )
        return EXIT_BAD_TERMINATION_FILE
    log.info("virtual size path=%s bytes=%d", path, size)
    print(size)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
