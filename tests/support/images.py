"""Test images made with the real tools (qemu-img, qemu-io, gzip/xz/zstd); never downloaded."""

from __future__ import annotations

import subprocess
from pathlib import Path

MIB = 1 << 20


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=120)


def make_raw(path: Path, size: int, writes: tuple[tuple[int, int, int], ...] = ()) -> Path:
    """A raw image of `size` bytes; `writes` are (offset, length, byte pattern) done by qemu-io."""
    run("qemu-img", "create", "-q", "-f", "raw", str(path), str(size))
    for offset, length, pattern in writes:
        run("qemu-io", "-f", "raw", "-c", f"write -P {pattern:#x} {offset} {length}", str(path))
    return path


def patterned_raw(path: Path, size: int = 16 * MIB) -> Path:
    """Data at the start, in the middle and at the very end, holes in between."""
    return make_raw(
        path,
        size,
        ((0, 64 * 1024, 0xAB), (size // 2, MIB, 0x5A), (size - 4096, 4096, 0xC3)),
    )


def convert(src: Path, dst: Path, fmt: str, *options: str, src_fmt: str = "raw") -> Path:
    run("qemu-img", "convert", "-q", "-f", src_fmt, "-O", fmt, *options, str(src), str(dst))
    return dst


def to_raw(src: Path, fmt: str, dst: Path) -> Path:
    return convert(src, dst, "raw", src_fmt=fmt)


def compress(path: Path, tool: str) -> Path:
    suffix = {"gzip": ".gz", "xz": ".xz", "zstd": ".zst", "bzip2": ".bz2"}[tool]
    out = path.with_name(path.name + suffix)
    with out.open("wb") as f:
        subprocess.run([tool, "-c", str(path)], stdout=f, check=True, timeout=120)
    return out


def same_image(expected: Path, actual: Path) -> bool:
    """`actual` holds `expected`'s bytes, followed only by zeros (the resize tail)."""
    if actual.stat().st_size < expected.stat().st_size:
        return False
    with expected.open("rb") as e, actual.open("rb") as a:
        while True:
            want = e.read(MIB)
            if not want:
                break
            if a.read(len(want)) != want:
                return False
        while chunk := a.read(MIB):
            if chunk.count(0) != len(chunk):
                return False
    return True
