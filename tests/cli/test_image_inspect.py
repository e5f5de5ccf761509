"""`cdi image inspect`: the verdict as JSON and the exit codes (0 safe, 2 refused, 1 error)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.images import MIB, compress, convert, patterned_raw

CDI = [sys.executable, "-m", "cdi.cli.main"]


def inspect(*args: str, strace_log: Path | None = None) -> tuple[int, dict[str, Any] | None, str]:
    argv = [*CDI, "image", "inspect", *args]
    if strace_log is not None:
        argv = [
            "strace",
            "-f",
            "-qq",
            "-e",
            "trace=open,openat,openat2,execve",
            "-o",
            str(strace_log),
            *argv,
        ]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    report = json.loads(proc.stdout) if proc.stdout.strip() else None
    return proc.returncode, report, proc.stderr


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return patterned_raw(tmp_path_factory.mktemp("img") / "base.raw", 12 * MIB + 512)


@pytest.mark.parametrize(
    ("fmt", "options", "expected_format"),
    [
        ("raw", (), "raw"),
        ("qcow2", (), "qcow2"),
        ("vmdk", (), "vmdk"),
        ("vmdk", ("-o", "subformat=streamOptimized"), "vmdk"),
        ("vdi", (), "vdi"),
        ("vpc", ("-o", "force_size=on"), "vpc"),
        ("vhdx", (), "vhdx"),
    ],
    ids=["raw", "qcow2", "vmdk", "vmdk-stream", "vdi", "vpc", "vhdx"],
)
def test_safe_images(
    base: Path, tmp_path: Path, fmt: str, options: tuple[str, ...], expected_format: str
) -> None:
    image = base if fmt == "raw" else convert(base, tmp_path / f"img.{fmt}", fmt, *options)
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "-f", fmt, "--output=json", str(image)],
            capture_output=True,
            check=True,
        ).stdout
    )
    code, report, stderr = inspect(str(image))
    assert code == 0, (report, stderr)
    assert report is not None
    assert report["format"] == expected_format
    assert report["virtual_size"] == info["virtual-size"]
    assert report["safe"] is True
    assert report["problems"] == []
    assert report["qemu_img"] == {"format": fmt, "virtual_size": info["virtual-size"]}


@pytest.mark.parametrize("tool", ["gzip", "xz", "zstd", "bzip2"])
def test_compressed_image_is_inspected_inside(base: Path, tmp_path: Path, tool: str) -> None:
    qcow2 = convert(base, tmp_path / "img.qcow2", "qcow2")
    code, report, _ = inspect(str(compress(qcow2, tool)))
    assert code == 0
    assert report is not None
    assert report["format"] == "qcow2"
    assert report["compression"] == tool
    assert report["virtual_size"] == 12 * MIB + 512


def test_backing_file_refused_without_opening_it(tmp_path: Path) -> None:
    secret = tmp_path / "secret.raw"
    secret.write_bytes(b"secret" * 1000)
    image = tmp_path / "backed.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(secret), "-F", "raw", str(image)],
        check=True,
    )
    log = tmp_path / "strace.log"
    code, report, _ = inspect(str(image), strace_log=log)
    assert code == 2
    assert report is not None
    assert report["safe"] is False
    assert "backing_file" in {p["name"] for p in report["problems"]}
    assert "qemu-img never opened it" in report["qemu_img"]["skipped"]
    trace = log.read_text()
    assert str(secret) not in trace
    assert "qemu-img" not in trace


def test_vmdk_descriptor_pointing_elsewhere(tmp_path: Path) -> None:
    image = tmp_path / "flat.vmdk"
    image.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        'createType="monolithicFlat"\n'
        'RW 2048 FLAT "/etc/shadow" 0\n'
    )
    log = tmp_path / "strace.log"
    code, report, _ = inspect(str(image), strace_log=log)
    assert code == 2
    assert report is not None
    assert report["format"] == "vmdk"
    assert "/etc/shadow" not in log.read_text()


def test_max_virtual_size(tmp_path: Path) -> None:
    image = tmp_path / "big.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "2T"], check=True)
    code, report, _ = inspect(str(image), "--max-virtual-size", "1Ti")
    assert code == 2
    assert report is not None
    assert "virtual_size_limit" in {p["name"] for p in report["problems"]}
    code, _, _ = inspect(str(image))
    assert code == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("/nonexistent/disk.img",), "no such file"),
        (("/tmp",), "is a directory"),
        (("/etc/hostname", "--max-virtual-size", "huge"), "--max-virtual-size"),
    ],
)
def test_errors_exit_1_without_traceback(args: tuple[str, ...], message: str) -> None:
    code, report, stderr = inspect(*args)
    assert code == 1
    assert report is None
    assert message in stderr
    assert "Traceback" not in stderr


def test_help_explains_exit_codes() -> None:
    proc = subprocess.run(
        [*CDI, "image", "inspect", "--help"], capture_output=True, text=True, check=True
    )
    assert "0 safe, 2 refused, 1 error" in " ".join(proc.stdout.split())
