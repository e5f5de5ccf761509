"""Fixtures that make real disk images with qemu-img and qemu-io in the test's tmp_path.

Images are sparse wherever the format allows, so big virtual sizes cost nothing; data is written
with qemu-io's pattern writes so that the images are not trivially empty.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

MiB = 1024 * 1024
GiB = 1024 * MiB
#: Where qemu-io writes a recognisable pattern in every image that holds data.
DATA_WRITE = "write -P 0xab 1M 64k"


def run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], check=True, capture_output=True, text=True, timeout=60
    )


def qemu_info(path: Path, fmt: str) -> dict[str, Any]:
    """`qemu-img info` with the format forced, as the importer runs it."""
    out = run("qemu-img", "info", "--output=json", "-f", fmt, path).stdout
    info: dict[str, Any] = json.loads(out)
    return info


class ImageFactory:
    """Makes images in one directory; every method returns the new image's path."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, name: str) -> Path:
        return self.directory / name

    def create(
        self,
        fmt: str,
        size: int,
        *,
        name: str | None = None,
        options: Sequence[str] = (),
        data: bool = True,
    ) -> Path:
        path = self.path(name or f"disk.{fmt}")
        argv: list[str] = ["qemu-img", "create", "-q", "-f", fmt]
        for option in options:
            argv += ["-o", option]
        run(*argv, path, str(size))
        if data:
            run("qemu-io", "-f", fmt, "-c", DATA_WRITE, path)
        return path

    def raw(self, size: int, *, name: str = "disk.raw", data: bool = True) -> Path:
        path = self.path(name)
        with path.open("wb") as file:
            file.truncate(size)
        if data:
            run("qemu-io", "-f", "raw", "-c", DATA_WRITE, path)
        return path

    def convert(self, source: Path, fmt: str, *, name: str, options: Sequence[str] = ()) -> Path:
        path = self.path(name)
        argv: list[str] = ["qemu-img", "convert", "-f", "raw", "-O", fmt]
        for option in options:
            argv += ["-o", option]
        run(*argv, source, path)
        return path

    def stream_optimized(self, size: int, *, name: str = "stream.vmdk") -> Path:
        source = self.raw(size, name=f"{name}.src")
        return self.convert(source, "vmdk", name=name, options=["subformat=streamOptimized"])

    def stream_optimized_with_footer(
        self, size: int, *, name: str = "footer.vmdk", footer_capacity: int | None = None
    ) -> Path:
        """A streamOptimized VMDK laid out as VMware writes it: the header says "grain directory
        at end" and a footer (marker, header copy, end-of-stream marker) closes the file."""
        plain = self.stream_optimized(size, name=f"{name}.plain")
        data = bytearray(plain.read_bytes())
        footer = bytearray(data[:512])
        if footer_capacity is not None:
            struct.pack_into("<Q", footer, 12, footer_capacity)
        struct.pack_into("<Q", data, 56, 0xFFFFFFFFFFFFFFFF)
        marker = struct.pack("<QII", 1, 0, 3).ljust(512, b"\0")
        path = self.path(name)
        path.write_bytes(bytes(data) + marker + bytes(footer) + bytes(512))
        return path

    def iso(self, *, name: str = "disk.iso") -> Path:
        """A real ISO 9660 image: genisoimage when installed, else a minimal one by hand."""
        path = self.path(name)
        content = self.path(f"{name}.d")
        content.mkdir()
        (content / "hello.txt").write_text("hello\n")
        tool = shutil.which("genisoimage") or shutil.which("mkisofs")
        if tool:
            run(tool, "-quiet", "-V", "TESTVOL", "-o", path, content)
        else:  # pragma: no cover - depends on the machine
            path.write_bytes(minimal_iso(blocks=64))
        return path

    def compress(self, source: Path, tool: str) -> Path:
        suffix = {"gzip": "gz", "xz": "xz", "zstd": "zst", "bzip2": "bz2"}[tool]
        path = self.path(f"{source.name}.{suffix}")
        argv = {
            "gzip": ["gzip", "-c", "-1"],
            "xz": ["xz", "-c", "-0", "-T1"],
            "zstd": ["zstd", "-q", "-c", "-1"],
            "bzip2": ["bzip2", "-c", "-1"],
        }[tool]
        with path.open("wb") as out:
            subprocess.run([*argv, str(source)], check=True, stdout=out, timeout=60)
        return path

    def tar(self, source: Path) -> Path:
        path = self.path(f"{source.name}.tar")
        run("tar", "-cf", path, "-C", source.parent, source.name)
        return path


def minimal_iso(*, blocks: int) -> bytes:
    """An ISO 9660 skeleton: system area, a primary volume descriptor and a terminator."""
    image = bytearray(blocks * 2048)
    pvd = 16 * 2048
    image[pvd : pvd + 7] = b"\x01CD001\x01"
    image[pvd + 80 : pvd + 84] = blocks.to_bytes(4, "little")
    image[pvd + 84 : pvd + 88] = blocks.to_bytes(4, "big")
    image[pvd + 128 : pvd + 130] = (2048).to_bytes(2, "little")
    image[pvd + 130 : pvd + 132] = (2048).to_bytes(2, "big")
    image[pvd + 2048 : pvd + 2048 + 7] = b"\xffCD001\x01"
    return bytes(image)


def patch(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as file:
        file.seek(offset)
        file.write(data)


@pytest.fixture
def images(tmp_path: Path) -> ImageFactory:
    return ImageFactory(tmp_path)
