"""Fixtures for the tool tests: images made with the real qemu-img, and a child-process census."""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

MIB = 1024 * 1024

# An odd virtual size (not a power of two, not a whole MiB) that every format can hold exactly.
IMAGE_SIZE = 6 * MIB + 64 * 1024


def run_qemu_img(*args: str) -> str:
    """The baseline: qemu-img run directly, the way a person would, bypassing our wrapper."""
    return subprocess.run(
        ["qemu-img", *args], check=True, capture_output=True, text=True, timeout=60
    ).stdout


def write_data(path: Path, size: int, *, seed: int = 7) -> None:
    """A sparse raw file of `size` bytes with random data in a few odd places, zeros elsewhere."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in (0, 512 * 1024 + 17, size // 2 + 4093, size - 70_000):
            f.seek(offset)
            f.write(rng.randbytes(65_000))


def child_pids() -> set[int]:
    """Processes whose parent is this test process (running or zombie)."""
    me = os.getpid()
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        # Field 4 is the ppid; the command name (field 2) may hold spaces, so split after ')'.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == me:
            found.add(int(entry))
    return found


@pytest.fixture
def raw_image(tmp_path: Path) -> Path:
    path = tmp_path / "base.raw"
    write_data(path, IMAGE_SIZE)
    return path


@pytest.fixture
def make_image(tmp_path: Path, raw_image: Path) -> Callable[..., Path]:
    """Convert the raw base image to `fmt` (extra `-o` options allowed) and return its path."""

    def make(fmt: str, *options: str, name: str | None = None) -> Path:
        path = tmp_path / (name or f"image.{fmt}")
        opts = list(options)
        if fmt == "vpc":
            # Without force_size qemu-img rounds vpc up to a CHS geometry.
            opts.append("force_size=on")
        argv = ["convert", "-f", "raw", "-O", fmt]
        if opts:
            argv += ["-o", ",".join(opts)]
        run_qemu_img(*argv, str(raw_image), str(path))
        return path

    return make


@pytest.fixture
def no_leftover_children() -> Callable[[], None]:
    """Returns a check that no child process started during the test is still around."""
    before = child_pids()

    def check() -> None:
        left = child_pids() - before
        assert not left, f"leftover child processes: {sorted(left)}"

    return check
