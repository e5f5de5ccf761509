"""`bench/run.py` entry for bench/clone.py: host-assisted and snapshot clones, cp, qemu-img."""

from clone import main

__all__ = ["main"]
