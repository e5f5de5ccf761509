"""`cdi-image-size-detection` as a process: CDI's flag, termination message and exit codes, with
images made by qemu-img."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import pytest

MIB = 1 << 20
COMMAND = str(Path(sys.executable).parent / "cdi-image-size-detection")


def run(tmp_path: Path, *args: str, term: Path | None = None) -> tuple[int, str, str]:
    environ = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "CDI_TERMINATION_LOG": str(term or tmp_path / "term"),
    }
    done = subprocess.run(
        [COMMAND, *args], env=environ, capture_output=True, text=True, timeout=60, check=False
    )
    return done.returncode, done.stdout, done.stderr


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True, timeout=60)


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vmdk"])
def test_virtual_size_is_the_termination_message(tmp_path: Path, fmt: str) -> None:
    image = tmp_path / f"disk.{fmt}"
    qemu_img("create", "-f", fmt, str(image), "24M")
    code, out, err = run(tmp_path, "-image-path", str(image))
    assert code == 0, err
    assert (tmp_path / "term").read_text() == str(24 * MIB)
    assert out.strip() == str(24 * MIB)


def test_missing_path_is_exit_3(tmp_path: Path) -> None:
    code, _, err = run(tmp_path, "-image-path", str(tmp_path / "nope.img"))
    assert code == 3
    assert "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "term").exists()


def test_bad_arguments_are_exit_1(tmp_path: Path) -> None:
    code, _, err = run(tmp_path)
    assert code == 1
    assert "-image-path" in err


def test_unsafe_image_is_refused_before_qemu_img_reads_it(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(MIB))
    image = tmp_path / "disk.img"
    qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "raw", str(image))
    code, _, err = run(tmp_path, "-image-path", str(image))
    assert code == 2
    assert "not a usable disk image" in err and "Traceback" not in err
    assert not (tmp_path / "term").exists()


def test_compressed_file_is_not_a_disk_image(tmp_path: Path) -> None:
    image = tmp_path / "disk.img.gz"
    image.write_bytes(gzip.compress(bytes(MIB)))
    code, _, err = run(tmp_path, "-image-path", str(image))
    assert code == 2
    assert "gzip-compressed" in err


def test_unwritable_termination_message_is_exit_4(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(MIB))
    code, _, err = run(tmp_path, "-image-path", str(image), term=tmp_path / "no" / "term")
    assert code == 4
    assert "cannot write the termination message" in err
