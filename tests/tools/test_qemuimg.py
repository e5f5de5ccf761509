"""cdi.image.qemuimg against the real qemu-img, with images made in the test."""

from __future__ import annotations

import asyncio
import filecmp
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cdi.image import qemuimg
from cdi.image.errors import (
    FormatError,
    PermanentError,
    Problem,
    RetryableError,
    ToolError,
)
from cdi.image.qemuimg import ImageInfo, Limits, Measurement

from .conftest import IMAGE_SIZE, MIB, run_qemu_img

FORMATS = ["raw", "qcow2", "vmdk", "vdi", "vpc", "vhdx"]


def fake_qemu_img(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> Path:
    """Point the wrapper at a shell script that misbehaves the way a test needs."""
    script = tmp_path / "fake-qemu-img"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(0o755)
    monkeypatch.setattr(qemuimg, "QEMU_IMG", str(script))
    return script


def names(problems: list[Problem]) -> list[str]:
    return sorted(p.name for p in problems)


# --- info -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
async def test_info_reports_format_and_virtual_size(
    fmt: str, make_image: Callable[..., Path]
) -> None:
    path = make_image(fmt)
    result = await qemuimg.info(str(path), fmt=fmt)
    assert result.format == fmt
    assert result.virtual_size == IMAGE_SIZE
    assert isinstance(result.actual_size, int)
    assert result.backing_filename is None
    assert result.data_file is None
    assert result.raw["format"] == fmt
    assert result.raw["filename"] == str(path)
    assert qemuimg.cross_check(fmt, IMAGE_SIZE, result) == []


async def test_info_forced_raw_on_qcow2_reports_raw(make_image: Callable[..., Path]) -> None:
    path = make_image("qcow2")
    result = await qemuimg.info(str(path), fmt="raw")
    assert result.format == "raw"
    assert result.virtual_size == path.stat().st_size
    assert names(qemuimg.cross_check("qcow2", IMAGE_SIZE, result)) == [
        "format_mismatch",
        "virtual_size_mismatch",
    ]


@pytest.mark.parametrize(
    "name",
    [
        'json:{"driver":"raw","file":{"driver":"null-co","size":"1"}}',
        "nbd:localhost:1",
        "nbd+unix:",
        "file:other.img",
        "http:example.com",
    ],
    ids=["json", "nbd", "nbd+unix", "file", "http"],
)
async def test_info_treats_prefixed_names_as_local_files(
    name: str,
    tmp_path: Path,
    make_image: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A file whose relative name qemu-img would read as options or as a protocol.
    make_image("qcow2", name=name)
    monkeypatch.chdir(tmp_path)
    result = await qemuimg.info(name, fmt="qcow2")
    assert result.format == "qcow2"
    assert result.virtual_size == IMAGE_SIZE
    assert result.raw["filename"] == str(tmp_path / name)


async def test_info_does_not_follow_a_uri_unless_allowed(tmp_path: Path) -> None:
    # Without allow_uri an NBD URI is a (missing) local file: no connection is attempted.
    uri = f"nbd+unix:///?socket={tmp_path}/none.sock"
    with pytest.raises(ToolError) as caught:
        await qemuimg.info(uri, fmt="raw")
    assert "No such file or directory" in str(caught.value)
    assert caught.value.argv[-1].startswith("/")
    # With allow_uri the same string is an NBD URI: qemu-img tries to connect to the socket.
    with pytest.raises(ToolError, match="Failed to connect") as caught:
        await qemuimg.info(uri, fmt="raw", allow_uri=True)
    assert caught.value.argv[-1] == uri


@pytest.mark.parametrize(
    "uri", ["http://127.0.0.1:1/x.img", "ssh://host/x", "file:/etc/passwd"], ids=str
)
async def test_info_refuses_other_uri_schemes(uri: str) -> None:
    with pytest.raises(ValueError, match="not allowed"):
        await qemuimg.info(uri, fmt="raw", allow_uri=True)


async def test_info_unknown_format_is_a_caller_bug(raw_image: Path) -> None:
    with pytest.raises(ValueError, match="unsupported image format"):
        await qemuimg.info(str(raw_image), fmt="iso")


async def test_info_error_is_qemu_imgs_last_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing.qcow2"
    with pytest.raises(ToolError) as caught:
        await qemuimg.info(str(missing), fmt="qcow2")
    error = caught.value
    assert str(error).startswith(f"qemu-img: Could not open '{missing}'")
    assert "\n" not in str(error)
    assert error.returncode == 1
    assert str(error) in error.stderr
    assert error.argv[:5] == ("qemu-img", "info", "-f", "qcow2", "--output=json")


async def test_info_address_space_limit_is_a_format_error(
    make_image: Callable[..., Path], no_leftover_children: Callable[[], None]
) -> None:
    path = make_image("qcow2")
    with pytest.raises(FormatError, match="exceeded its limits"):
        await qemuimg.info(str(path), fmt="qcow2", limits=Limits(address_space=16 * MIB))
    no_leftover_children()


async def test_info_cpu_limit_is_a_format_error(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_leftover_children: Callable[[], None],
) -> None:
    fake_qemu_img(tmp_path, monkeypatch, "while :; do :; done")
    started = time.monotonic()
    with pytest.raises(FormatError, match=r"exceeded its limits.*(SIGXCPU|SIGKILL)"):
        await qemuimg.info(
            str(tmp_path / "x"), fmt="raw", limits=Limits(cpu_seconds=1, wall_seconds=30)
        )
    assert time.monotonic() - started < 10
    no_leftover_children()


async def test_info_wall_timeout_kills_qemu_img(
    tmp_path: Path, no_leftover_children: Callable[[], None]
) -> None:
    # qemu-img blocks in open() on a FIFO nobody writes to: no CPU used, only the wall clock helps.
    fifo = tmp_path / "image.fifo"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(
        FormatError, match=r"exceeded its limits on this image \(no answer within 0\.5 s\)"
    ):
        await qemuimg.info(str(fifo), fmt="qcow2", limits=Limits(wall_seconds=0.5))
    assert time.monotonic() - started < 5
    no_leftover_children()


async def test_info_cancelled_kills_qemu_img(
    tmp_path: Path, no_leftover_children: Callable[[], None]
) -> None:
    fifo = tmp_path / "image.fifo"
    os.mkfifo(fifo)
    task = asyncio.create_task(qemuimg.info(str(fifo), fmt="raw"))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    no_leftover_children()


async def test_info_output_that_is_not_json_is_a_tool_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_qemu_img(tmp_path, monkeypatch, "echo 'this is not json'")
    with pytest.raises(ToolError, match="not JSON"):
        await qemuimg.info(str(tmp_path / "x"), fmt="raw")


async def test_info_json_without_virtual_size_is_a_tool_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_qemu_img(tmp_path, monkeypatch, """echo '{"format": "raw"}'""")
    with pytest.raises(ToolError, match="virtual-size"):
        await qemuimg.info(str(tmp_path / "x"), fmt="raw")


async def test_missing_qemu_img_is_permanent_with_a_hint(
    raw_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(qemuimg, "QEMU_IMG", "/nonexistent/qemu-img")
    with pytest.raises(PermanentError, match="qemu-utils") as caught:
        await qemuimg.info(str(raw_image), fmt="raw")
    assert not isinstance(caught.value, ToolError)


# --- convert: argv --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, []),
        ({"cache": "none"}, ["-t", "none"]),
        ({"src_cache": "writeback"}, ["-T", "writeback"]),
        ({"out_of_order_writes": True}, ["-W"]),
        ({"coroutines": 8}, ["-m", "8"]),
        ({"no_create": True}, ["-n"]),
        ({"no_create": True, "target_is_zero": True}, ["-n", "--target-is-zero"]),
        ({"sparse_size": 0}, ["-S", "0"]),
        ({"sparse_size": 4096}, ["-S", "4096"]),
        ({"progress": True}, ["-p"]),
    ],
    ids=lambda v: "-".join(v) if isinstance(v, dict) else None,
)
def test_convert_argv_options(options: dict[str, Any], expected: list[str]) -> None:
    argv = qemuimg.build_convert_argv(
        "/images/src.qcow2", "/data/disk.img", src_fmt="qcow2", no_backing=False, **options
    )
    assert argv == [
        "qemu-img",
        "convert",
        *expected,
        "-O",
        "raw",
        "-f",
        "qcow2",
        "/images/src.qcow2",
        "/data/disk.img",
    ]


def test_convert_argv_preallocation_and_output_format() -> None:
    argv = qemuimg.build_convert_argv(
        "src.raw", "dst.qcow2", src_fmt="raw", dst_fmt="qcow2", preallocation="falloc"
    )
    assert argv[2:6] == ["-O", "qcow2", "-o", "preallocation=falloc"]
    assert argv[-1] == os.path.abspath("dst.qcow2")


def test_convert_argv_no_backing_source_is_a_json_spec() -> None:
    argv = qemuimg.build_convert_argv("json:x.qcow2", "json:out", src_fmt="qcow2")
    assert "-f" not in argv
    spec = argv[-2]
    assert spec.startswith("json:")
    assert json.loads(spec[5:]) == {
        "driver": "qcow2",
        "file": {"filename": os.path.abspath("json:x.qcow2")},
        "backing": None,
    }
    assert argv[-1] == os.path.abspath("json:out")


def test_convert_argv_nbd_uri_becomes_an_nbd_node() -> None:
    argv = qemuimg.build_convert_argv(
        "nbd+unix:///exp%20one?socket=/run/a%20b.sock", "out", src_fmt="raw", src_is_uri=True
    )
    assert json.loads(argv[-2][5:]) == {
        "driver": "raw",
        "file": {
            "driver": "nbd",
            "export": "exp one",
            "server": {"type": "unix", "path": "/run/a b.sock"},
        },
        "backing": None,
    }
    argv = qemuimg.build_convert_argv(
        "nbd://127.0.0.1:10810/e", "out", src_fmt="qcow2", src_is_uri=True
    )
    assert json.loads(argv[-2][5:])["file"] == {
        "driver": "nbd",
        "export": "e",
        "server": {"type": "inet", "host": "127.0.0.1", "port": "10810"},
    }


def test_convert_argv_json_source_gets_backing_null() -> None:
    src = 'json:{"file":{"driver":"file","filename":"/x"}}'
    argv = qemuimg.build_convert_argv(src, "out", src_fmt="qcow2", src_is_uri=True)
    assert json.loads(argv[-2][5:]) == {
        "file": {"driver": "file", "filename": "/x"},
        "driver": "qcow2",
        "backing": None,
    }


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"target_is_zero": True}, "needs no_create"),
        ({"no_create": True, "preallocation": "falloc"}, "no effect with no_create"),
        ({"coroutines": 0}, "coroutines"),
        ({"coroutines": 17}, "coroutines"),
        ({"sparse_size": 100}, "sparse_size"),
        ({"sparse_size": 32 * MIB}, "sparse_size"),
        ({"cache": "bogus"}, "invalid cache"),
        ({"src_cache": "bogus"}, "invalid src_cache"),
        ({"preallocation": "sometimes"}, "invalid preallocation"),
        ({"dst_fmt": "iso"}, "unsupported image format"),
        ({"src_fmt": "iso"}, "unsupported image format"),
    ],
    ids=lambda v: "-".join(f"{k}={w}" for k, w in v.items()) if isinstance(v, dict) else None,
)
def test_convert_argv_rejects_contradictions(options: dict[str, Any], message: str) -> None:
    kwargs: dict[str, Any] = {"src_fmt": "qcow2", **options}
    with pytest.raises(ValueError, match=message):
        qemuimg.build_convert_argv("a", "b", **kwargs)


def test_convert_argv_refuses_unlisted_schemes() -> None:
    with pytest.raises(ValueError, match="not allowed"):
        qemuimg.build_convert_argv("http://h/x", "out", src_fmt="raw", src_is_uri=True)


# --- convert: running -----------------------------------------------------------------------------


def test_progress_parser_handles_split_reports() -> None:
    seen: list[float] = []
    parser = qemuimg._ProgressParser(seen.append)
    stream = (
        b"    (0.00/100%)\r    (12.50/100%)\r    (12.50/100%)\r    (3.00/100%)\r    (99.99/100%)\r"
    )
    for size in (1, 7, 17, 4096):
        seen.clear()
        parser = qemuimg._ProgressParser(seen.append)
        for i in range(0, len(stream), size):
            parser.feed(stream[i : i + size])
        assert seen == [0.0, 12.5, 99.99]


async def test_convert_qcow2_to_raw_matches_qemu_img(
    tmp_path: Path, make_image: Callable[..., Path], raw_image: Path
) -> None:
    src = make_image("qcow2")
    baseline = tmp_path / "baseline.raw"
    run_qemu_img("convert", "-f", "qcow2", "-O", "raw", str(src), str(baseline))
    out = tmp_path / "out.raw"
    seen: list[float] = []
    await qemuimg.convert(str(src), str(out), src_fmt="qcow2", progress=seen.append)
    assert filecmp.cmp(out, baseline, shallow=False)
    assert filecmp.cmp(out, raw_image, shallow=False)
    assert seen[-1] == 100.0
    assert seen == sorted(set(seen))


@pytest.mark.parametrize("fmt", FORMATS)
async def test_convert_each_format_to_raw(
    fmt: str, tmp_path: Path, make_image: Callable[..., Path], raw_image: Path
) -> None:
    src = make_image(fmt)
    out = tmp_path / "out.raw"
    await qemuimg.convert(str(src), str(out), src_fmt=fmt, out_of_order_writes=True)
    assert filecmp.cmp(out, raw_image, shallow=False)


async def test_convert_with_every_option_runs(
    tmp_path: Path, make_image: Callable[..., Path], raw_image: Path
) -> None:
    src = make_image("qcow2")
    out = tmp_path / "out.raw"
    out.write_bytes(b"")
    os.truncate(out, IMAGE_SIZE)
    await qemuimg.convert(
        str(src),
        str(out),
        src_fmt="qcow2",
        cache="none",
        src_cache="writeback",
        out_of_order_writes=True,
        coroutines=4,
        no_create=True,
        target_is_zero=True,
        sparse_size=4096,
        timeout=60,
    )
    assert filecmp.cmp(out, raw_image, shallow=False)


@pytest.mark.parametrize(
    "options", [{"preallocation": "falloc"}, {"sparse_size": 0}], ids=["falloc", "S0"]
)
async def test_convert_fully_allocated(
    options: dict[str, Any], tmp_path: Path, make_image: Callable[..., Path], raw_image: Path
) -> None:
    src = make_image("qcow2")
    out = tmp_path / "out.raw"
    await qemuimg.convert(str(src), str(out), src_fmt="qcow2", **options)
    assert filecmp.cmp(out, raw_image, shallow=False)
    assert out.stat().st_blocks * 512 >= IMAGE_SIZE
    # The default output is sparse, which is what makes the check above meaningful.
    sparse = tmp_path / "sparse.raw"
    await qemuimg.convert(str(src), str(sparse), src_fmt="qcow2")
    assert sparse.stat().st_blocks * 512 < IMAGE_SIZE


async def test_convert_never_reads_a_backing_file(tmp_path: Path) -> None:
    secret = tmp_path / "secret.raw"
    secret.write_bytes(b"TOP SECRET".ljust(MIB, b"!"))
    image = tmp_path / "backed.qcow2"
    run_qemu_img(
        "create", "-q", "-f", "qcow2", "-b", str(secret), "-F", "raw", str(image), str(MIB)
    )
    out = tmp_path / "out.raw"
    await qemuimg.convert(str(image), str(out), src_fmt="qcow2")
    assert out.read_bytes() == bytes(MIB)
    # The control: without "backing": null qemu-img does leak the file.
    leaked = tmp_path / "leaked.raw"
    await qemuimg.convert(str(image), str(leaked), src_fmt="qcow2", no_backing=False)
    assert leaked.read_bytes() == secret.read_bytes()


async def test_convert_failure_is_one_line_tool_error(tmp_path: Path) -> None:
    with pytest.raises(ToolError) as caught:
        await qemuimg.convert(str(tmp_path / "missing"), str(tmp_path / "out"), src_fmt="raw")
    message = str(caught.value)
    assert message.startswith("qemu-img: Could not open")
    assert "\n" not in message and "\r" not in message
    assert caught.value.returncode == 1


async def test_convert_wrong_format_fails(raw_image: Path, tmp_path: Path) -> None:
    with pytest.raises(ToolError, match="qcow2"):
        await qemuimg.convert(str(raw_image), str(tmp_path / "out"), src_fmt="qcow2")


async def test_convert_timeout_is_retryable_and_reaps(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_leftover_children: Callable[[], None],
) -> None:
    fake_qemu_img(tmp_path, monkeypatch, "exec sleep 60")
    started = time.monotonic()
    with pytest.raises(RetryableError, match=r"within 0\.3 s"):
        await qemuimg.convert("a", "b", src_fmt="raw", timeout=0.3)
    assert time.monotonic() - started < 5
    no_leftover_children()


async def test_convert_cancelled_reaps(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_leftover_children: Callable[[], None],
) -> None:
    fake_qemu_img(tmp_path, monkeypatch, "printf '    (0.00/100%%)\\r'; exec sleep 60")
    seen: list[float] = []
    task = asyncio.create_task(qemuimg.convert("a", "b", src_fmt="raw", progress=seen.append))
    for _ in range(100):
        if seen:
            break
        await asyncio.sleep(0.02)
    assert seen == [0.0]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    no_leftover_children()


async def test_convert_progress_callback_error_kills_qemu_img(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_leftover_children: Callable[[], None],
) -> None:
    fake_qemu_img(tmp_path, monkeypatch, "printf '    (1.00/100%%)\\r'; exec sleep 60")

    def explode(value: float) -> None:
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        await qemuimg.convert("a", "b", src_fmt="raw", progress=explode)
    no_leftover_children()


async def test_killed_qemu_img_is_reported_by_signal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_qemu_img(tmp_path, monkeypatch, "kill -SEGV $$")
    with pytest.raises(ToolError, match="qemu-img convert was killed by SIGSEGV"):
        await qemuimg.convert("a", "b", src_fmt="raw")


# --- resize, create, measure ----------------------------------------------------------------------


async def test_create_and_resize_raw(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    await qemuimg.create(str(path), 3 * MIB)
    assert path.stat().st_size == 3 * MIB
    assert path.stat().st_blocks * 512 < MIB
    await qemuimg.resize(str(path), 5 * MIB + 512)
    assert path.stat().st_size == 5 * MIB + 512
    with pytest.raises(ToolError, match=r"^qemu-img: Use the --shrink option"):
        await qemuimg.resize(str(path), MIB)
    await qemuimg.resize(str(path), MIB, shrink=True)
    assert path.stat().st_size == MIB
    await qemuimg.resize(str(path), 2 * MIB, preallocation="falloc")
    assert path.stat().st_size == 2 * MIB
    assert path.stat().st_blocks * 512 >= MIB


async def test_create_preallocated_and_qcow2(tmp_path: Path) -> None:
    raw = tmp_path / "falloc.img"
    await qemuimg.create(str(raw), 2 * MIB, preallocation="falloc")
    assert raw.stat().st_blocks * 512 >= 2 * MIB
    qcow2 = tmp_path / "blank.qcow2"
    await qemuimg.create(str(qcow2), IMAGE_SIZE, fmt="qcow2")
    result = await qemuimg.info(str(qcow2), fmt="qcow2")
    assert (result.format, result.virtual_size) == ("qcow2", IMAGE_SIZE)


async def test_create_path_with_prefix_stays_local(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    await qemuimg.create("nbd:localhost:1", MIB)
    assert (tmp_path / "nbd:localhost:1").stat().st_size == MIB


async def test_resize_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ToolError, match=r"^qemu-img: Could not open"):
        await qemuimg.resize(str(tmp_path / "missing"), MIB)


async def test_measure(make_image: Callable[..., Path]) -> None:
    src = make_image("qcow2")
    as_raw = await qemuimg.measure(str(src), src_fmt="qcow2")
    assert as_raw == Measurement(required=IMAGE_SIZE, fully_allocated=IMAGE_SIZE)
    as_qcow2 = await qemuimg.measure(str(src), src_fmt="qcow2", out_fmt="qcow2")
    assert 0 < as_qcow2.required < as_qcow2.fully_allocated
    assert as_qcow2.fully_allocated > IMAGE_SIZE


async def test_measure_under_limits(make_image: Callable[..., Path]) -> None:
    src = make_image("qcow2")
    with pytest.raises(FormatError, match="measure exceeded its limits"):
        await qemuimg.measure(str(src), src_fmt="qcow2", limits=Limits(address_space=16 * MIB))


# --- cross_check ----------------------------------------------------------------------------------


async def test_cross_check_backing_file(tmp_path: Path, raw_image: Path) -> None:
    image = tmp_path / "backed.qcow2"
    run_qemu_img("create", "-q", "-f", "qcow2", "-b", str(raw_image), "-F", "raw", str(image))
    result = await qemuimg.info(str(image), fmt="qcow2")
    assert result.backing_filename == str(raw_image)
    assert names(qemuimg.cross_check("qcow2", IMAGE_SIZE, result)) == ["backing_file"]


async def test_cross_check_json_backing_file(tmp_path: Path, raw_image: Path) -> None:
    image = tmp_path / "backed.qcow2"
    backing = json.dumps({"driver": "file", "filename": str(raw_image)})
    # -u: qemu-img would open the backing to check it, and a bare file node is not an image.
    run_qemu_img(
        "create", "-q", "-f", "qcow2", "-u", "-b", f"json:{backing}", "-F", "raw", str(image), "1M"
    )
    result = await qemuimg.info(str(image), fmt="qcow2")
    assert result.backing_filename == f"json:{backing}"
    assert names(qemuimg.cross_check("qcow2", MIB, result)) == ["backing_file"]


async def test_cross_check_data_file(tmp_path: Path) -> None:
    # data_file= creates (or truncates!) the named file: only ever point it into tmp_path.
    data = tmp_path / "external.data"
    image = tmp_path / "with-data-file.qcow2"
    run_qemu_img(
        "create", "-q", "-f", "qcow2", "-o", f"data_file={data},data_file_raw=on", str(image), "1M"
    )
    result = await qemuimg.info(str(image), fmt="qcow2")
    assert result.data_file == str(data)
    assert names(qemuimg.cross_check("qcow2", MIB, result)) == ["data_file"]
    # Still reported when the data file has gone.
    data.unlink()
    result = await qemuimg.info(str(image), fmt="qcow2")
    assert names(qemuimg.cross_check("qcow2", MIB, result)) == ["data_file"]


async def test_cross_check_vmdk_flat_extent(tmp_path: Path) -> None:
    secret = tmp_path / "secret.raw"
    secret.write_bytes(b"s" * MIB)
    descriptor = tmp_path / "disguised.img"
    descriptor.write_text(
        "# Disk DescriptorFile\n"
        "version=1\n"
        "CID=fffffffe\n"
        "parentCID=ffffffff\n"
        'createType="monolithicFlat"\n'
        "\n"
        f'RW 2048 FLAT "{secret}" 0\n'
        "\n"
        'ddb.adapterType = "ide"\n'
    )
    result = await qemuimg.info(str(descriptor), fmt="vmdk")
    problems = qemuimg.cross_check("vmdk", result.virtual_size, result)
    assert set(names(problems)) == {"vmdk_extent"}
    assert any("monolithicFlat" in p.message for p in problems)
    assert any(str(secret) in p.message for p in problems)


async def test_cross_check_vmdk_split_extents(tmp_path: Path) -> None:
    image = tmp_path / "split.vmdk"
    run_qemu_img(
        "create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", str(image), "1M"
    )
    result = await qemuimg.info(str(image), fmt="vmdk")
    problems = qemuimg.cross_check("vmdk", MIB, result)
    assert names(problems) == ["vmdk_extent", "vmdk_extent"]
    assert any("split-s001.vmdk" in p.message for p in problems)


async def test_cross_check_vmdk_stream_optimized_is_fine(
    make_image: Callable[..., Path],
) -> None:
    path = make_image("vmdk", "subformat=streamOptimized")
    result = await qemuimg.info(str(path), fmt="vmdk")
    assert result.format_specific["data"]["create-type"] == "streamOptimized"
    assert qemuimg.cross_check("vmdk", IMAGE_SIZE, result) == []


async def test_cross_check_virtual_size_mismatch(raw_image: Path) -> None:
    result = await qemuimg.info(str(raw_image), fmt="raw")
    assert names(qemuimg.cross_check("raw", IMAGE_SIZE + 512, result)) == ["virtual_size_mismatch"]
    assert qemuimg.cross_check("raw", None, result) == []


@pytest.mark.parametrize(
    ("inspected", "reported", "ok"),
    [
        ("iso", "raw", True),
        ("ISO", "raw", True),
        ("gpt", "raw", True),
        ("vhd", "vpc", True),
        ("qcow2", "qcow2", True),
        ("raw", "qcow2", False),
        ("vhdx", "vpc", False),
        ("iso", "qcow2", False),
    ],
)
def test_cross_check_format_names(inspected: str, reported: str, ok: bool) -> None:
    result = synthetic_info(format=reported)
    assert names(qemuimg.cross_check(inspected, None, result)) == (
        [] if ok else ["format_mismatch"]
    )


def synthetic_info(**raw: Any) -> ImageInfo:
    fields: dict[str, Any] = {"format": "raw", "virtual-size": MIB, "filename": "/x"} | raw
    specific = fields.get("format-specific", {})
    return ImageInfo(
        format=fields["format"],
        virtual_size=fields["virtual-size"],
        actual_size=None,
        backing_filename=fields.get("backing-filename"),
        data_file=specific.get("data", {}).get("data-file"),
        format_specific=specific,
        raw=fields,
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"backing-filename-format": "raw"}, ["backing_file"]),
        ({"format-specific": {"type": "qcow2", "data": {"data-file": None}}}, ["data_file"]),
        ({"format": "vmdk", "format-specific": {"type": "vmdk", "data": {}}}, ["vmdk_extent"] * 2),
        (
            {
                "format": "vmdk",
                "format-specific": {
                    "type": "vmdk",
                    "data": {
                        "create-type": "monolithicSparse",
                        "extents": [{"filename": "/x"}, {"filename": "/x"}],
                    },
                },
            },
            [],
        ),
        (
            {
                "format": "vmdk",
                "format-specific": {
                    "type": "vmdk",
                    "data": {"create-type": "monolithicSparse", "extents": ["/x"]},
                },
            },
            ["vmdk_extent"],
        ),
    ],
    ids=["backing-format-only", "null-data-file", "vmdk-no-extents", "vmdk-ok", "vmdk-junk"],
)
def test_cross_check_synthetic(raw: dict[str, Any], expected: list[str]) -> None:
    result = synthetic_info(**raw)
    assert names(qemuimg.cross_check(result.format, MIB, result)) == expected


def test_stderr_line_selection() -> None:
    pick = qemuimg._last_meaningful_line
    assert pick("") is None
    assert pick("\n \n") is None
    assert pick("    (10.00/100%)\r    (20.00/100%)\r\n") is None
    assert pick("qemu-img: first\nsome detail\n\n") == "qemu-img: first"
    assert pick("warning: a\nerror: b\n") == "error: b"
    assert (
        pick("qemu-img: Use --shrink.\nqemu-img: warning: data loss\n") == "qemu-img: Use --shrink."
    )
    assert pick("qemu-img: warning: only this\n") == "qemu-img: warning: only this"
    assert pick("qemu-img: " + "x" * 5000) == ("qemu-img: " + "x" * 5000)[:1000]


def test_limits_defaults() -> None:
    assert Limits() == Limits(address_space=1 << 30, cpu_seconds=30, wall_seconds=60.0)
