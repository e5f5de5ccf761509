"""`bench/run.py` entry for bench/clone.py: host-assisted and snapshot clones, cp, qemu-img.

Under `make bench` (root, `mkfs.xfs` installed by the bench target) the snapshot clone is also
measured on a loop-mounted reflink XFS, where the issue's <= 1 s target applies.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence

from clone import main as clone_main


def main(argv: Sequence[str] | None = None) -> int:
    args = list(argv or [])
    if "--xfs" not in args and os.geteuid() == 0 and shutil.which("mkfs.xfs"):
        args.append("--xfs")
    return int(clone_main(args))


__all__ = ["main"]
