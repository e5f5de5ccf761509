"""cdi.image.nbdkit against the real nbdkit, read back with the real qemu-img and nbdinfo."""

from __future__ import annotations

import asyncio
import filecmp
import os
import site
import struct
import subprocess
import sysconfig
from collections.abc import Callable
from pathlib import Path

import pytest

from cdi.image import nbdkit, qemuimg
from cdi.image.errors import PermanentError, ToolError
from cdi.image.nbdkit import NbdkitServer, python_plugin_env

from .conftest import IMAGE_SIZE, MIB, run_qemu_img

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def gone(pid: int) -> bool:
    """True once the process no longer exists (reaped, not merely a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def exists(path: str) -> bool:
    return os.path.exists(path)


def all_zero(path: Path) -> bool:
    with open(path, "rb") as f:
        while chunk := f.read(MIB):
            if chunk.count(0) != len(chunk):
                return False
    return True


def pattern_bytes(size: int) -> bytes:
    """What nbdkit's pattern plugin serves: each 8-byte word is its own offset, big-endian."""
    words = b"".join(struct.pack(">Q", offset) for offset in range(0, size, 8))
    return words[:size]


async def nbdinfo_size(uri: str) -> int:
    proc = await asyncio.create_subprocess_exec(
        "nbdinfo", "--size", uri, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        async with asyncio.timeout(30):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err
    return int(out)


async def test_memory_plugin_served_to_qemu_img(
    tmp_path: Path, no_leftover_children: Callable[[], None]
) -> None:
    out = tmp_path / "out.raw"
    async with NbdkitServer("memory", ["size=64M"], workdir=str(tmp_path)) as server:
        assert server.uri == f"nbd+unix:///?socket={tmp_path}/nbdkit.sock"
        assert exists(server.socket_path)
        assert await nbdinfo_size(server.uri) == 64 * MIB
        await qemuimg.convert(server.uri, str(out), src_fmt="raw", src_is_uri=True)
    assert out.stat().st_size == 64 * MIB
    assert all_zero(out)
    no_leftover_children()


@pytest.mark.parametrize("size", [MIB, 3 * MIB + 4096], ids=["1MiB", "3MiB+4KiB"])
async def test_pattern_plugin_bytes(size: int, tmp_path: Path) -> None:
    out = tmp_path / "out.raw"
    async with NbdkitServer("pattern", [f"size={size}"], workdir=str(tmp_path)) as server:
        result = await qemuimg.info(server.uri, fmt="raw", allow_uri=True)
        assert result.virtual_size == size
        seen: list[float] = []
        await qemuimg.convert(
            server.uri, str(out), src_fmt="raw", src_is_uri=True, progress=seen.append
        )
    assert out.read_bytes() == pattern_bytes(size)
    assert seen[-1] == 100.0


async def test_qcow2_over_nbd_matches_local_convert(
    tmp_path: Path, make_image: Callable[..., Path], raw_image: Path
) -> None:
    image = make_image("qcow2")
    out = tmp_path / "out.raw"
    workdir = tmp_path / "nbd"
    async with NbdkitServer("file", [str(image)], workdir=str(workdir)) as server:
        result = await qemuimg.info(server.uri, fmt="qcow2", allow_uri=True)
        assert qemuimg.cross_check("qcow2", IMAGE_SIZE, result) == []
        measured = await qemuimg.measure(server.uri, src_fmt="qcow2", allow_uri=True)
        assert measured.required == IMAGE_SIZE
        await qemuimg.convert(
            server.uri, str(out), src_fmt="qcow2", src_is_uri=True, out_of_order_writes=True
        )
    assert filecmp.cmp(out, raw_image, shallow=False)


async def test_vmdk_over_nbd_passes_cross_check(
    tmp_path: Path, make_image: Callable[..., Path]
) -> None:
    image = make_image("vmdk")
    async with NbdkitServer("file", [str(image)], workdir=str(tmp_path / "nbd")) as server:
        result = await qemuimg.info(server.uri, fmt="vmdk", allow_uri=True)
    assert qemuimg.cross_check("vmdk", IMAGE_SIZE, result) == []


async def test_backing_file_is_not_read_over_nbd(tmp_path: Path) -> None:
    secret = tmp_path / "secret.raw"
    secret.write_bytes(b"TOP SECRET".ljust(MIB, b"!"))
    image = tmp_path / "backed.qcow2"
    run_qemu_img("create", "-q", "-f", "qcow2", "-b", str(secret), "-F", "raw", str(image))
    out = tmp_path / "out.raw"
    async with NbdkitServer("file", [str(image)], workdir=str(tmp_path / "nbd")) as server:
        result = await qemuimg.info(server.uri, fmt="qcow2", allow_uri=True)
        assert [p.name for p in qemuimg.cross_check("qcow2", MIB, result)] == ["backing_file"]
        await qemuimg.convert(server.uri, str(out), src_fmt="qcow2", src_is_uri=True)
    assert out.read_bytes() == bytes(MIB)


async def test_socket_path_with_space_is_quoted_in_uri(tmp_path: Path) -> None:
    workdir = tmp_path / "a dir&x"
    async with NbdkitServer("pattern", ["size=1M"], workdir=str(workdir)) as server:
        assert "a%20dir%26x" in server.uri
        assert await nbdinfo_size(server.uri) == MIB
        result = await qemuimg.info(server.uri, fmt="raw", allow_uri=True)
        assert result.virtual_size == MIB


async def test_readonly_by_default_and_writable_on_request(tmp_path: Path) -> None:
    server = NbdkitServer("memory", ["size=1M"], workdir=str(tmp_path))
    assert "-r" in server.argv
    writable = NbdkitServer("memory", ["size=1M"], workdir=str(tmp_path), readonly=False)
    assert "-r" not in writable.argv
    src = tmp_path / "pattern.raw"
    src.write_bytes(pattern_bytes(MIB))
    async with writable:
        target = f"{writable.uri}"
        proc = await asyncio.create_subprocess_exec(
            "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), target
        )
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        out = tmp_path / "back.raw"
        await qemuimg.convert(writable.uri, str(out), src_fmt="raw", src_is_uri=True)
    assert out.read_bytes() == src.read_bytes()


def test_argv_order() -> None:
    server = NbdkitServer(
        "curl",
        ["url=http://127.0.0.1/x"],
        filters=["retry", "readahead"],
        workdir="/tmp/w",
        extra_args=["--threads=4"],
    )
    assert server.argv == [
        "nbdkit",
        "--foreground",
        "-U",
        "/tmp/w/nbdkit.sock",
        "--pidfile",
        "/tmp/w/nbdkit.pid",
        "-r",
        "--filter=retry",
        "--filter=readahead",
        "--threads=4",
        "curl",
        "url=http://127.0.0.1/x",
    ]


def test_socket_path_too_long(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="longer than"):
        NbdkitServer("memory", ["size=1M"], workdir=str(tmp_path / ("x" * 120)))


async def test_unknown_plugin_is_a_tool_error_with_log(
    tmp_path: Path, no_leftover_children: Callable[[], None]
) -> None:
    server = NbdkitServer("no-such-plugin", workdir=str(tmp_path))
    with pytest.raises(ToolError) as caught:
        await server.start()
    error = caught.value
    assert "exited with status 1 during start" in str(error)
    assert "no-such-plugin" in error.stderr
    assert error.stderr == server.log_tail()
    assert "\n" not in str(error)
    assert not exists(server.socket_path)
    no_leftover_children()


async def test_bad_plugin_argument_is_a_tool_error_with_log(tmp_path: Path) -> None:
    with pytest.raises(ToolError) as caught:
        async with NbdkitServer("memory", ["size=lots"], workdir=str(tmp_path)):
            pytest.fail("the body must not run")
    assert "lots" in str(caught.value)
    assert "lots" in caught.value.stderr


async def test_start_timeout_stops_the_server(
    tmp_path: Path, no_leftover_children: Callable[[], None]
) -> None:
    # A plugin that never finishes configuring, so nbdkit never listens.
    script = tmp_path / "slow.py"
    script.write_text(
        "import time\n"
        "API_VERSION = 2\n"
        "def config_complete():\n"
        "    time.sleep(60)\n"
        "def open(readonly):\n"
        "    return 1\n"
        "def get_size(h):\n"
        "    return 0\n"
        "def pread(h, buf, offset, flags):\n"
        "    pass\n"
    )
    server = NbdkitServer("python", [str(script)], workdir=str(tmp_path), start_timeout=0.5)
    with pytest.raises(ToolError, match=r"did not become ready within 0\.5 s"):
        await server.start()
    pid = server.pid
    assert pid is not None and gone(pid)
    no_leftover_children()


async def test_missing_nbdkit_is_permanent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nbdkit, "NBDKIT", "/nonexistent/nbdkit")
    with pytest.raises(PermanentError, match="install the nbdkit package") as caught:
        await NbdkitServer("memory", ["size=1M"], workdir=str(tmp_path)).start()
    assert not isinstance(caught.value, ToolError)


async def test_process_gone_after_context(tmp_path: Path) -> None:
    async with NbdkitServer("memory", ["size=1M"], workdir=str(tmp_path)) as server:
        pid = server.pid
        assert pid is not None and not gone(pid)
    assert gone(pid)
    assert not exists(server.socket_path)
    assert exists(server.log_path)


async def test_process_gone_when_body_raises(tmp_path: Path) -> None:
    server = NbdkitServer("memory", ["size=1M"], workdir=str(tmp_path))
    with pytest.raises(LookupError, match="from the body"):
        async with server:
            raise LookupError("from the body")
    assert server.pid is not None and gone(server.pid)


async def test_stop_failure_does_not_hide_body_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = NbdkitServer("memory", ["size=1M"], workdir=str(tmp_path))
    real_stop = server.stop

    async def failing_stop() -> None:
        await real_stop()
        raise OSError("stop failed")

    with pytest.raises(LookupError, match="from the body"):
        async with server:
            monkeypatch.setattr(server, "stop", failing_stop)
            raise LookupError("from the body")
    with pytest.raises(OSError, match="stop failed"):
        await server.__aexit__(None, None, None)


async def test_stop_is_idempotent_and_safe_before_start(tmp_path: Path) -> None:
    server = NbdkitServer("memory", ["size=1M"], workdir=str(tmp_path))
    await server.stop()
    await server.start()
    with pytest.raises(RuntimeError, match="already running"):
        await server.start()
    await server.stop()
    await server.stop()
    assert server.pid is not None and gone(server.pid)
    # A stopped server can be started again in the same workdir.
    async with server:
        assert await nbdinfo_size(server.uri) == MIB


async def test_server_that_dies_is_reaped_by_stop(tmp_path: Path) -> None:
    server = NbdkitServer("memory", ["size=1M"], workdir=str(tmp_path))
    async with server:
        assert server.pid is not None
        os.kill(server.pid, 9)
        await asyncio.sleep(0.1)
    assert gone(server.pid)


async def test_stale_files_do_not_fake_readiness(tmp_path: Path) -> None:
    (tmp_path / "nbdkit.pid").write_text("1\n")
    (tmp_path / "nbdkit.sock").write_text("")
    async with NbdkitServer("pattern", ["size=1M"], workdir=str(tmp_path)) as server:
        assert await nbdinfo_size(server.uri) == MIB


async def test_log_tail(tmp_path: Path) -> None:
    server = NbdkitServer("memory", ["size=1M"], workdir=str(tmp_path))
    assert server.log_tail() == ""
    (tmp_path / "nbdkit.log").write_bytes(b"a" * 100 + b"\xff end")
    assert server.log_tail(5) == "\ufffd end"


PLUGIN = """
import builtins

import nbdkit

import aiohttp
import cdi.api

API_VERSION = 2
DATA = "|".join([cdi.api.__file__, aiohttp.__file__, nbdkit.__name__]).encode().ljust(4096, b"\\0")


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def open(readonly):
    return 1


def get_size(h):
    return len(DATA)


def pread(h, buf, offset, flags):
    buf[:] = DATA[offset : offset + len(buf)]
"""


async def test_python_plugin_imports_our_packages(tmp_path: Path) -> None:
    script = tmp_path / "plugin.py"
    script.write_text(PLUGIN)
    out = tmp_path / "out.raw"
    async with NbdkitServer("python", [str(script)], workdir=str(tmp_path)) as server:
        assert await nbdinfo_size(server.uri) == 4096
        await qemuimg.convert(server.uri, str(out), src_fmt="raw", src_is_uri=True)
    check_plugin_imports(out.read_bytes())


def check_plugin_imports(data: bytes) -> None:
    api_file, aiohttp_file, nbdkit_name = data.rstrip(b"\0").decode().split("|")
    # `cdi` came from this checkout and aiohttp from the venv, not from Debian's dist-packages.
    assert Path(api_file).resolve() == PROJECT_ROOT / "cdi" / "api" / "__init__.py"
    assert any(Path(aiohttp_file).is_relative_to(p) for p in site.getsitepackages())
    assert nbdkit_name == "nbdkit"


def test_python_plugin_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PYTHONHOME", "/somewhere")
    monkeypatch.setenv("PYTHONPATH", "/stale")
    monkeypatch.setenv("CDI_MARKER", "kept")
    env = python_plugin_env([str(tmp_path), "/does/not/exist", sysconfig.get_paths()["stdlib"]])
    paths = env["PYTHONPATH"].split(os.pathsep)
    assert paths[0] == str(PROJECT_ROOT)
    assert (Path(paths[0]) / "cdi" / "__init__.py").exists()
    assert paths[1] == str(tmp_path)
    assert paths[2:] == [p for p in site.getsitepackages() if os.path.isdir(p)]
    assert sysconfig.get_paths()["stdlib"] not in paths
    assert "/stale" not in paths
    assert "PYTHONHOME" not in env
    assert env["CDI_MARKER"] == "kept"


def test_plugin_env_keeps_venv_bin_dirs_off_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With a venv's bin/ first on PATH, the embedded interpreter took the venv's base Python's
    # stdlib and `import ssl` failed inside the plugin (seen in CI through `make test`).
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /nowhere\n")
    monkeypatch.setenv("PATH", f"{venv / 'bin'}:/usr/bin:/bin")
    path = python_plugin_env()["PATH"].split(":")
    assert str(venv / "bin") not in path
    assert "/usr/bin" in path
