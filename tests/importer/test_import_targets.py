"""Blank images, Block targets, S3 sources and the progress metrics of the importer."""

from __future__ import annotations

import os
import re
import ssl
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import pytest

from cdi.image.metricsserver import MetricsServer
from importer.metrics import ImportProgress
from tests.support.httpserver import BadServer
from tests.support.images import MIB, compress, convert, patterned_raw, same_image
from tests.support.importer_run import Sandbox


@pytest.fixture
def box(tmp_path: Path) -> Sandbox:
    return Sandbox(tmp_path / "box")


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return patterned_raw(tmp_path / "base.raw", 8 * MIB)


def serve(server: BadServer, image: Path) -> str:
    target = server.root / image.name
    if not target.exists():
        os.link(image, target)
    return server.url("/" + image.name)


# --- blank ---------------------------------------------------------------------------------------


def test_blank_filesystem_image_is_sparse_and_sized(box: Sandbox) -> None:
    result = box.run(IMPORTER_SOURCE="none", IMPORTER_IMAGE_SIZE="64Mi", FILESYSTEM_OVERHEAD="0.06")
    assert result.returncode == 0, result.stderr
    assert result.message == {"message": "Import Complete", "preallocationApplied": False}
    assert box.disk.stat().st_size == 60 * MIB
    assert box.disk.stat().st_blocks == 0 or box.disk.stat().st_blocks * 512 < MIB


def test_blank_preallocated(box: Sandbox) -> None:
    result = box.run(IMPORTER_SOURCE="none", IMPORTER_IMAGE_SIZE="16Mi", PREALLOCATION="true")
    assert result.returncode == 0, result.stderr
    assert result.message["preallocationApplied"] is True
    assert box.disk.stat().st_blocks * 512 >= 16 * MIB


def test_blank_needs_a_size_on_filesystem(box: Sandbox) -> None:
    result = box.run(IMPORTER_SOURCE="none")
    assert result.returncode == 1
    assert result.termination.startswith("IMPORTER_IMAGE_SIZE: ")


@pytest.fixture
def device(tmp_path: Path) -> Path:
    """A file standing in for the Block volume, full of old data (0xff)."""
    path = tmp_path / "block-device"
    path.write_bytes(b"\xff" * (24 * MIB))
    return path


def test_blank_block_preallocation_zeroes_the_device(box: Sandbox, device: Path) -> None:
    result = box.run(IMPORTER_SOURCE="none", PREALLOCATION="true", CDI_BLOCK_DEVICE=str(device))
    assert result.returncode == 0, result.stderr
    assert device.read_bytes() == bytes(24 * MIB)
    assert box.entries() == {"vol", "scratch"}


def test_import_into_block_device(
    bad_server: BadServer, box: Sandbox, device: Path, base: Path, tmp_path: Path
) -> None:
    qcow2 = convert(base, tmp_path / "img.qcow2", "qcow2")
    result = box.run(
        IMPORTER_SOURCE="http",
        IMPORTER_ENDPOINT=serve(bad_server, qcow2),
        CDI_BLOCK_DEVICE=str(device),
    )
    assert result.returncode == 0, result.stderr
    data = device.read_bytes()
    assert data[: 8 * MIB] == base.read_bytes()  # old 0xff data where the image has holes is gone
    assert device.stat().st_size == 24 * MIB
    assert not box.disk.exists()


def test_compressed_raw_into_block_device(
    bad_server: BadServer, box: Sandbox, device: Path, base: Path
) -> None:
    packed = compress(base, "zstd")
    result = box.run(
        IMPORTER_SOURCE="http",
        IMPORTER_ENDPOINT=serve(bad_server, packed),
        CDI_BLOCK_DEVICE=str(device),
    )
    assert result.returncode == 0, result.stderr
    assert device.read_bytes()[: 8 * MIB] == base.read_bytes()


def test_block_device_too_small(bad_server: BadServer, box: Sandbox, tmp_path: Path) -> None:
    small = tmp_path / "small-device"
    small.write_bytes(bytes(4 * MIB))
    big = patterned_raw(tmp_path / "big.raw", 8 * MIB)
    qcow2 = convert(big, tmp_path / "big.qcow2", "qcow2")
    result = box.run(
        IMPORTER_SOURCE="http",
        IMPORTER_ENDPOINT=serve(bad_server, qcow2),
        CDI_BLOCK_DEVICE=str(small),
    )
    assert result.returncode == 1
    assert "A larger PVC is required" in result.termination


# --- S3 ------------------------------------------------------------------------------------------


@pytest.fixture
def s3(moto_endpoint: str) -> Iterator[Any]:
    client = boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=botocore.config.Config(s3={"addressing_style": "path"}),
    )
    client.create_bucket(Bucket="images")
    yield client
    client.close()


def s3_env(endpoint: str, key: str) -> dict[str, str]:
    return {
        "IMPORTER_SOURCE": "s3",
        "IMPORTER_ENDPOINT": f"{endpoint}/images/{key}",
        "IMPORTER_ACCESS_KEY_ID": "testing",
        "IMPORTER_SECRET_KEY": "testing",
    }


@pytest.mark.parametrize(
    ("fmt", "wrapper"), [("raw", None), ("qcow2", None), ("qcow2", "gzip"), ("raw", "xz")]
)
def test_s3_import(
    s3: Any,
    moto_endpoint: str,
    box: Sandbox,
    base: Path,
    tmp_path: Path,
    fmt: str,
    wrapper: str | None,
) -> None:
    image = base if fmt == "raw" else convert(base, tmp_path / "img.qcow2", fmt)
    if wrapper:
        image = compress(image, wrapper)
    s3.upload_file(str(image), "images", f"disks/{image.name}")
    result = box.run(**s3_env(moto_endpoint, f"disks/{image.name}"))
    assert result.returncode == 0, result.stderr
    assert same_image(base, box.disk)
    assert box.entries() == {"vol", "vol/disk.img", "scratch"}


def test_s3_missing_object(s3: Any, moto_endpoint: str, box: Sandbox) -> None:
    result = box.run(**s3_env(moto_endpoint, "nope.img"))
    assert result.returncode == 1
    assert result.termination.startswith(
        "Unable to connect to s3 data source: expected status code 200, got 404"
    )
    assert box.entries() == {"vol", "scratch"}


def test_s3_url_without_key(box: Sandbox) -> None:
    result = box.run(IMPORTER_SOURCE="s3", IMPORTER_ENDPOINT="http://127.0.0.1:9/bucket-only")
    assert result.returncode == 1
    assert "names no bucket and key" in result.termination


# --- metrics -------------------------------------------------------------------------------------


def test_progress_metric_is_served_over_https_and_never_falls() -> None:
    progress = ImportProgress("uid-1234")
    server = MetricsServer(progress.registry, "127.0.0.1", 0)
    try:
        progress.set_percent(12.5)
        progress.set_percent(3.0)  # lower values are ignored: it is a counter
        progress.add_bytes(4096)
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # a throw-away self-signed certificate, as in CDI
        with urllib.request.urlopen(
            f"https://127.0.0.1:{server.port}/metrics", context=ctx, timeout=10
        ) as r:
            text = r.read().decode()
    finally:
        server.close()
    # The regex CDI's controller uses to read progress.
    m = re.search(r'kubevirt_cdi_import_progress_total\{ownerUID="uid-1234"\} ([0-9.e+]+)', text)
    assert m and float(m[1]) == 12.5
    assert 'cdi_import_transferred_bytes_total{ownerUID="uid-1234"} 4096.0' in text
