"""`cdi image inspect PATH`: the inspector's and qemu-img's verdict on a local image, as JSON.

The same checks an import runs before converting: the pure-Python inspector first (nothing else
touches the file if it refuses), then `qemu-img info` with the format forced, under limits, and
a cross-check of the two. Exit 0 when safe, 2 when refused, 1 on other errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from cdi.api import parse_size
from cdi.api.quantity import QuantityError
from cdi.image import qemuimg
from cdi.image.errors import FormatError, ImageError, Problem
from cdi.image.formats import DEFAULT_MAX_VIRTUAL_SIZE, WRAPPER_FORMATS, inspect_file

EXIT_OK, EXIT_ERROR, EXIT_REFUSED = 0, 1, 2


def register(sub: Any) -> None:
    image = sub.add_parser("image", help="work with local disk images")
    image_sub = image.add_subparsers(dest="image_command", metavar="COMMAND")
    inspect = image_sub.add_parser(
        "inspect",
        help="check an image before importing or uploading it",
        description=(
            "Inspect a local disk image the way an import does: detect its format (raw, qcow2, "
            "vmdk, vdi, vhd, vhdx, iso, possibly gzip/xz/zstd/bzip2 compressed), its virtual "
            "size, and refuse what is unsafe (backing files, external data files, VMDK extents "
            "outside the image, differencing disks, two formats at once, absurd sizes). Prints "
            "JSON. Exit status: 0 safe, 2 refused, 1 error."
        ),
    )
    inspect.add_argument("path", help="the image file")
    inspect.add_argument(
        "--max-virtual-size",
        default=None,
        metavar="QUANTITY",
        help="refuse images whose virtual size is larger (e.g. 2Ti) [64Ti]",
    )
    inspect.add_argument(
        "--no-qemu", action="store_true", help="skip the qemu-img cross-check (inspector only)"
    )
    inspect.set_defaults(handler=run_inspect)
    image.set_defaults(handler=lambda _args: (image.print_help(), EXIT_ERROR)[1])


def run_inspect(args: argparse.Namespace) -> int:
    limit = DEFAULT_MAX_VIRTUAL_SIZE
    if args.max_virtual_size:
        try:
            limit = parse_size(args.max_virtual_size)
        except QuantityError as err:
            return _error(f"--max-virtual-size: {err}")
    try:
        result = inspect_file(args.path, max_virtual_size=limit)
    except FileNotFoundError:
        return _error(f"{args.path}: no such file")
    except IsADirectoryError:
        return _error(f"{args.path}: is a directory, not an image file")
    except PermissionError:
        return _error(f"{args.path}: permission denied")
    except ImageError as err:
        return _error(f"{args.path}: {err}")
    report: dict[str, Any] = result.as_dict()
    problems: list[Problem] = list(result.problems)
    qemu: dict[str, Any] | None = None
    if args.no_qemu:
        qemu = {"skipped": "--no-qemu"}
    elif problems:
        qemu = {"skipped": "the inspector refused the image, so qemu-img never opened it"}
    elif result.compression or result.format in WRAPPER_FORMATS:
        qemu = {"skipped": "compressed or archived: qemu-img checks the image after decompression"}
    else:
        try:
            info = asyncio.run(qemuimg.info(args.path, fmt=result.qemu_format))
        except FormatError as err:
            problems.append(Problem("qemu_img_info", str(err)))
        except ImageError as err:
            return _error(f"{args.path}: {err}")
        else:
            qemu = {"format": info.format, "virtual_size": info.virtual_size}
            problems += qemuimg.cross_check(result.format, result.virtual_size, info)
    report["problems"] = [p.as_dict() for p in problems]
    report["safe"] = not problems
    report["qemu_img"] = qemu
    print(json.dumps(report, indent=2))
    return EXIT_OK if not problems else EXIT_REFUSED


def _error(message: str) -> int:
    print(f"cdi image inspect: {message}", file=sys.stderr)
    return EXIT_ERROR
