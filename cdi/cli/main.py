"""`cdi`: the command line. Parses arguments, dispatches to a subcommand, maps errors to exit codes.

Exit codes are defined here once: 0 success, 1 error, 2 refused (for `image inspect`: unsafe).
"""

from __future__ import annotations

import argparse
import logging
import sys

from cdi import __version__
from cdi.cli import clone, controller, datavolumes, image, imageupload, server

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_REFUSED = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cdi",
        description="Import, upload and clone VM disk images into volumes (CDI compatible).",
    )
    parser.add_argument("--version", action="version", version=f"cdi {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    image.register(sub)
    server.register(sub)
    datavolumes.register(sub)
    controller.register(sub)
    imageupload.register(sub)
    clone.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s %(message)s",
    )
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_ERROR
    try:
        code: int = args.handler(args)
    except KeyboardInterrupt:
        print("cdi: interrupted", file=sys.stderr)
        return EXIT_ERROR
    return code


if __name__ == "__main__":
    sys.exit(main())
