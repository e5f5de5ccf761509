"""The nbdkit Python plugin for real: nbdkit + importer/nbdkit_plugin.py + the bad server (or moto),
read by qemu-img, nbdinfo and nbdcopy. Outputs are compared with `cmp` against the source.

One small in-process test drives the plugin's callbacks with a stand-in `nbdkit` module, for the
range check that nbdkit itself would never let through.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import types
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

import importer
from cdi.image.errors import ToolError
from cdi.image.nbdkit import NbdkitServer
from importer.rangeclient import RangeCheckError, S3Location, SourceConfig
from tests.support.httpserver import BadServer, TestCA

MiB = 1024 * 1024
PLUGIN = str(Path(importer.__file__).parent / "nbdkit_plugin.py")
VIRTUAL_SIZE = 24 * MiB
COMMAND_TIMEOUT = 60.0

pytestmark = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("nbdkit", "qemu-img", "qemu-io", "nbdcopy", "nbdinfo")),
    reason="needs nbdkit, qemu-img, qemu-io, nbdcopy and nbdinfo",
)


# ---- images and helpers ----------------------------------------------------------------------


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=COMMAND_TIMEOUT)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base.raw (24 MiB: qemu-io patterns, a random region, holes) and the same as qcow2."""
    root = tmp_path_factory.mktemp("images")
    raw = root / "base.raw"
    _sh("qemu-img", "create", "-q", "-f", "raw", str(raw), str(VIRTUAL_SIZE))
    _sh(
        "qemu-io", "-f", "raw",
        "-c", "write -P 0x5a 1M 1M",
        "-c", "write -P 0xa5 3M 512K",
        "-c", "write -P 0x33 23M 1M",
        str(raw),
    )  # fmt: skip
    # Random bytes too: with constant patterns, bytes resumed at a wrong offset could still match.
    fd = os.open(raw, os.O_WRONLY)
    try:
        os.pwrite(fd, os.urandom(9 * MiB + 4321), 8 * MiB + 17)
    finally:
        os.close(fd)
    qcow2 = root / "base.qcow2"
    _sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2))
    return {"raw": raw, "qcow2": qcow2}


@pytest.fixture
def served(bad_server: BadServer, images: dict[str, Path]) -> BadServer:
    """The bad server with /disk.raw and /disk.qcow2 (hard links: no copies)."""
    for fmt, path in images.items():
        os.link(path, bad_server.root / f"disk.{fmt}")
    return bad_server


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    # nbdkit's Unix socket path must fit in 107 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="nbdt-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def http_config(server: BadServer, path: str, **overrides: Any) -> SourceConfig:
    fields: dict[str, Any] = {
        "kind": "http",
        "url": server.url(path),
        "size": (server.root / path.lstrip("/")).stat().st_size,
        "retries": 3,
        "backoff": 0.01,
        "timeout": 5.0,
        "ca_file": server.ca_file,
    }
    fields.update(overrides)
    return SourceConfig(**fields)


@contextlib.asynccontextmanager
async def plugin(workdir: Path, config: SourceConfig) -> AsyncIterator[NbdkitServer]:
    """nbdkit serving `config` through our plugin; the config goes in a 0600 file, not argv."""
    config_path = workdir / "source.json"
    config.save(str(config_path))
    server = NbdkitServer(
        "python", [PLUGIN, f"config={config_path}"], workdir=str(workdir), start_timeout=15.0
    )
    async with server:
        yield server


async def run(*argv: str) -> tuple[int, str]:
    """Run a tool with a bounded wait; return its status and combined output."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), COMMAND_TIMEOUT)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


async def convert(uri: str, fmt: str, out: Path) -> tuple[int, str]:
    return await run("qemu-img", "convert", "-f", fmt, "-O", "raw", uri, str(out))


async def assert_same(a: Path, b: Path) -> None:
    rc, out = await run("cmp", str(a), str(b))
    assert rc == 0, out


# ---- correct transfers -----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
async def test_qemu_img_convert_is_identical(
    served: BadServer, images: dict[str, Path], short_tmp: Path, tmp_path: Path, fmt: str
) -> None:
    async with plugin(short_tmp, http_config(served, f"/disk.{fmt}")) as nbd:
        rc, out = await convert(nbd.uri, fmt, tmp_path / "out.raw")
        assert rc == 0, out + nbd.log_tail()
        assert "source ready" in nbd.log_tail()
    await assert_same(tmp_path / "out.raw", images["raw"])
    gets = served.requests_for(f"/disk.{fmt}", "GET")
    assert gets, "no request reached the server"
    assert all(r.range is not None and r.range.startswith("bytes=") for r in gets)


async def test_dropped_connections_resume_with_the_right_bytes(
    served: BadServer, images: dict[str, Path], short_tmp: Path, tmp_path: Path
) -> None:
    async with plugin(short_tmp, http_config(served, "/disk.raw")) as nbd:
        # qemu-img reads up to 2 MiB at a time: an odd cut point lands inside those reads.
        served.behave("/disk.raw", drop_after=MiB + 17, drop_times=3)
        rc, out = await convert(nbd.uri, "raw", tmp_path / "out.raw")
        assert rc == 0, out + nbd.log_tail()
        log = nbd.log_tail(64 * 1024)
    await assert_same(tmp_path / "out.raw", images["raw"])
    assert log.count("retrying source=") == 3, log
    resumed = [
        r.range
        for r in served.requests_for("/disk.raw", "GET")
        if r.range and int(r.range[6:].split("-")[0]) % MiB == 17
    ]
    assert len(resumed) == 3, resumed


async def test_nbdcopy_over_several_connections(
    served: BadServer, images: dict[str, Path], short_tmp: Path, tmp_path: Path
) -> None:
    async with plugin(short_tmp, http_config(served, "/disk.raw")) as nbd:
        rc, out = await run("nbdinfo", "--can", "multi-conn", nbd.uri)
        assert rc == 0, "plugin does not advertise multi-conn: " + out
        # Flakiness while several connections and threads read at once must not mix up bytes.
        served.behave("/disk.raw", drop_after=300_001, drop_times=4, flaky=2)
        rc, out = await run(
            "nbdcopy", "--connections=4", "--request-size=1048576", nbd.uri, str(tmp_path / "o")
        )
        assert rc == 0, out + nbd.log_tail()
    await assert_same(tmp_path / "o", images["raw"])


async def test_basic_auth_and_extra_headers_reach_the_server(
    served: BadServer, images: dict[str, Path], short_tmp: Path, tmp_path: Path
) -> None:
    served.behave("/disk.qcow2", basic_auth=("admin", "hunter2"))
    token = base64.b64encode(b"admin:hunter2").decode()
    headers = {"Authorization": f"Basic {token}", "X-Cdi-Secret-Header": "opaque-value"}
    async with plugin(short_tmp, http_config(served, "/disk.qcow2", headers=headers)) as nbd:
        # Secrets stay in the 0600 file: nbdkit's command line names only that file.
        assert not any("hunter2" in arg or token in arg for arg in nbd.argv)
        assert oct((short_tmp / "source.json").stat().st_mode & 0o777) == "0o600"
        rc, out = await convert(nbd.uri, "qcow2", tmp_path / "out.raw")
        assert rc == 0, out + nbd.log_tail()
        assert token not in nbd.log_tail() and "opaque-value" not in nbd.log_tail()
    await assert_same(tmp_path / "out.raw", images["raw"])
    requests = served.requests_for("/disk.qcow2")
    assert requests
    assert all(r.headers.get("X-Cdi-Secret-Header") == "opaque-value" for r in requests)


async def test_http_proxy_from_the_environment(
    served: BadServer,
    images: dict[str, Path],
    short_tmp: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # NbdkitServer hands our environment (plus PYTHONPATH) to nbdkit, so the plugin sees it.
    monkeypatch.setenv("HTTP_PROXY", served.base_url)
    config = http_config(served, "/disk.qcow2", url="http://images.example.invalid/disk.qcow2")
    async with plugin(short_tmp, config) as nbd:
        rc, out = await convert(nbd.uri, "qcow2", tmp_path / "out.raw")
        assert rc == 0, out + nbd.log_tail()
    await assert_same(tmp_path / "out.raw", images["raw"])
    assert {r.target for r in served.requests} == {"http://images.example.invalid/disk.qcow2"}


# ---- failures: qemu-img fails, the nbdkit log says why ----------------------------------------

DURING: list[tuple[dict[str, Any], str]] = [
    ({"ignore_range": True}, "ignored the Range header (200 instead of 206"),
    ({"wrong_content_range": "shift"}, "does not match the requested bytes"),
    ({"short_body": 1000}, "giving up after 2 attempts"),
    ({"status": 404}, "HTTP 404 Not Found"),
    ({"redirect_to": "file:///etc/passwd"}, "refusing redirect to scheme 'file'"),
]


@pytest.mark.parametrize("knobs,reason", DURING, ids=[next(iter(k)) for k, _ in DURING])
async def test_misbehaviour_mid_transfer_fails_the_convert(
    served: BadServer, short_tmp: Path, tmp_path: Path, knobs: dict[str, Any], reason: str
) -> None:
    async with plugin(short_tmp, http_config(served, "/disk.raw", retries=1)) as nbd:
        served.behave("/disk.raw", **knobs)
        rc, out = await convert(nbd.uri, "raw", tmp_path / "out.raw")
        log = nbd.log_tail(64 * 1024)
    assert rc != 0
    assert "Input/output error" in out or "error" in out.lower(), out
    assert reason in log, log


AT_START: list[tuple[dict[str, Any], dict[str, Any], str]] = [
    ({"status": 404}, {}, "HTTP 404 Not Found"),
    ({"ignore_range": True}, {}, "does not support byte ranges"),
    ({"wrong_content_range": "garbage"}, {}, "malformed Content-Range"),
    ({}, {"size": 12345}, "expected 12345"),
]


@pytest.mark.parametrize(
    "knobs,overrides,reason",
    AT_START,
    ids=["404", "ignore_range", "garbage-content-range", "size-mismatch"],
)
async def test_a_bad_source_stops_nbdkit_at_start(
    served: BadServer,
    short_tmp: Path,
    knobs: dict[str, Any],
    overrides: dict[str, Any],
    reason: str,
) -> None:
    served.behave("/disk.raw", **knobs)
    with pytest.raises(ToolError) as caught:
        async with plugin(short_tmp, http_config(served, "/disk.raw", retries=0, **overrides)):
            pass
    assert reason in caught.value.stderr, caught.value.stderr
    assert "nbdkit exited" in str(caught.value)


async def test_a_config_readable_by_others_is_refused(served: BadServer, short_tmp: Path) -> None:
    config_path = short_tmp / "source.json"
    http_config(served, "/disk.raw").save(str(config_path))
    config_path.chmod(0o644)
    server = NbdkitServer("python", [PLUGIN, f"config={config_path}"], workdir=str(short_tmp))
    with pytest.raises(ToolError) as caught:
        async with server:
            pass
    assert "it must be 0600" in caught.value.stderr


# ---- TLS -------------------------------------------------------------------------------------


@pytest.fixture
def served_tls(bad_tls_server: BadServer, images: dict[str, Path]) -> BadServer:
    os.link(images["qcow2"], bad_tls_server.root / "disk.qcow2")
    return bad_tls_server


async def test_https_with_the_test_ca(
    served_tls: BadServer, images: dict[str, Path], short_tmp: Path, tmp_path: Path
) -> None:
    async with plugin(short_tmp, http_config(served_tls, "/disk.qcow2")) as nbd:
        rc, out = await convert(nbd.uri, "qcow2", tmp_path / "out.raw")
        assert rc == 0, out + nbd.log_tail()
    await assert_same(tmp_path / "out.raw", images["raw"])


async def test_https_with_an_unknown_ca_fails(served_tls: BadServer, short_tmp: Path) -> None:
    other = TestCA.create("someone else").write_cert(short_tmp / "other-ca.pem")
    config = http_config(served_tls, "/disk.qcow2", ca_file=str(other))
    with pytest.raises(ToolError) as caught:
        async with plugin(short_tmp, config):
            pass
    assert "certificate verification failed" in caught.value.stderr


# ---- S3 (moto) -------------------------------------------------------------------------------


async def test_s3_object_through_moto(
    moto_endpoint: str, images: dict[str, Path], short_tmp: Path, tmp_path: Path
) -> None:
    qcow2 = images["qcow2"]
    assert qcow2.stat().st_size <= 16 * MiB  # moto's ranged GETs cost time per object size
    client = boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}),
    )
    client.create_bucket(Bucket="images")
    client.upload_file(str(qcow2), "images", "vm/disk.qcow2")
    location = S3Location(
        bucket="images",
        key="vm/disk.qcow2",
        endpoint_url=moto_endpoint,
        access_key="test",
        secret_key="test",
    )
    config = SourceConfig(kind="s3", s3=location, size=qcow2.stat().st_size, backoff=0.01)
    async with plugin(short_tmp, config) as nbd:
        assert "source=s3://images/vm/disk.qcow2" in nbd.log_tail()
        rc, out = await convert(nbd.uri, "qcow2", tmp_path / "out.raw")
        assert rc == 0, out + nbd.log_tail()
    await assert_same(tmp_path / "out.raw", images["raw"])


# ---- the adapter itself, without nbdkit ----------------------------------------------------


@pytest.fixture
def plugin_module(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    """importer.nbdkit_plugin imported fresh, with a stand-in for nbdkit's built-in module."""
    fake = types.ModuleType("nbdkit")
    fake.THREAD_MODEL_PARALLEL = 3  # type: ignore[attr-defined]
    fake.CACHE_NONE = 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "nbdkit", fake)
    monkeypatch.delitem(sys.modules, "importer.nbdkit_plugin", raising=False)
    module = importlib.import_module("importer.nbdkit_plugin")
    yield module
    module.unload()
    sys.modules.pop("importer.nbdkit_plugin", None)


def test_plugin_callbacks_check_ranges(
    plugin_module: types.ModuleType, served: BadServer, tmp_path: Path, images: dict[str, Path]
) -> None:
    config_path = tmp_path / "source.json"
    http_config(served, "/disk.raw").save(str(config_path))
    plugin_module.config("config", str(config_path))
    plugin_module.config_complete()
    h = plugin_module.open(True)
    assert plugin_module.thread_model() == 3
    assert plugin_module.can_multi_conn(h) is True
    assert plugin_module.get_size(h) == VIRTUAL_SIZE
    buf = bytearray(4096)
    plugin_module.pread(h, memoryview(buf), 8 * MiB + 17, 0)
    with images["raw"].open("rb") as f:
        f.seek(8 * MiB + 17)
        assert buf == f.read(4096)
    served.clear_requests()
    with pytest.raises(RangeCheckError, match="outside the export"):
        plugin_module.pread(h, memoryview(buf), VIRTUAL_SIZE - 100, 0)
    assert served.requests == []


def test_plugin_rejects_unknown_parameters(plugin_module: types.ModuleType) -> None:
    with pytest.raises(ValueError, match="unknown parameter 'url'"):
        plugin_module.config("url", "http://example.invalid/")
