"""S3 import source on boto3 (reference §2): path-style, ranged GETs, resume after a broken stream.

boto3 is synchronous, so each call runs in a thread; the event loop never blocks on the network.
URL form as CDI: `http(s)://host[:port]/bucket/key...`; the region comes from
`s3.<region>.amazonaws.com`, else the first host label, else us-east-1 for an IP address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import boto3
import botocore.config
import botocore.exceptions

from importer.errors import SourceError
from importer.settings import ImporterSettings
from importer.sources.base import CHUNK_SIZE, MAX_STREAM_RETRIES, SourceInfo
from importer.sources.http import ca_bundle_files

log = logging.getLogger(__name__)


def parse_s3_url(url: str) -> tuple[str, str, str, str]:
    """-> (endpoint_url, bucket, key, region)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SourceError("s3", f"{url!r} is not an s3 URL; use https://host/bucket/key")
    bucket, _, key = parts.path.lstrip("/").partition("/")
    if not bucket or not key:
        raise SourceError("s3", f"{url!r} names no bucket and key; use https://host/bucket/key")
    host = parts.hostname
    labels = host.split(".")
    try:
        ipaddress.ip_address(host)
        region = "us-east-1"
    except ValueError:
        if len(labels) >= 3 and labels[0] == "s3":
            region = labels[1]
        else:
            region = labels[0] if len(labels) > 1 else "us-east-1"
    endpoint = f"{parts.scheme}://{parts.netloc}"
    return endpoint, bucket, key, region


def _client_error_detail(err: Exception) -> str:
    if isinstance(err, botocore.exceptions.ClientError):
        meta = err.response.get("ResponseMetadata", {})
        status = meta.get("HTTPStatusCode")
        code = err.response.get("Error", {}).get("Code", "")
        return f"expected status code 200, got {status}. Status: {status} {code}".rstrip()
    return str(err) or type(err).__name__


class S3Source:
    kind = "s3"

    def __init__(self, settings: ImporterSettings) -> None:
        self._settings = settings
        self.endpoint, self.bucket, self.key, self.region = parse_s3_url(settings.endpoint)
        self._info: SourceInfo | None = None
        self._bundle: str | None = None
        ca = ca_bundle_files(settings)
        verify: bool | str = not settings.insecure_tls
        if ca and not settings.insecure_tls:
            verify = str(ca[0])  # botocore takes one bundle file; CDI mounts one CA per configmap
        self._client = boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=settings.access_key_id,
            aws_secret_access_key=settings.secret_key,
            verify=verify,
            config=botocore.config.Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 3, "mode": "standard"},
                read_timeout=settings.stall_timeout,
                connect_timeout=60,
            ),
        )

    async def close(self) -> None:
        await asyncio.to_thread(self._client.close)

    async def probe(self) -> SourceInfo:
        if self._info is None:
            try:
                head = await asyncio.to_thread(
                    self._client.head_object, Bucket=self.bucket, Key=self.key
                )
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as err:
                raise SourceError("s3", _client_error_detail(err)) from err
            self._info = SourceInfo(
                size=int(head["ContentLength"]), ranges=True, url=self._settings.endpoint
            )
            log.info("probed bucket=%s key=%s size=%d", self.bucket, self.key, self._info.size)
        return self._info

    async def stream(self, offset: int = 0) -> AsyncIterator[bytes]:
        info = await self.probe()
        assert info.size is not None
        retries = 0
        while offset < info.size:
            try:
                kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key}
                if offset:
                    kwargs["Range"] = f"bytes={offset}-"
                obj = await asyncio.to_thread(self._client.get_object, **kwargs)
                body = obj["Body"]
                try:
                    while True:
                        chunk: bytes = await asyncio.to_thread(body.read, CHUNK_SIZE)
                        if not chunk:
                            break
                        offset += len(chunk)
                        retries = 0
                        yield chunk
                finally:
                    body.close()
                if offset < info.size:
                    raise SourceError(
                        "s3", f"object body ended after {offset} of {info.size} bytes"
                    )
            except botocore.exceptions.ClientError as err:
                raise SourceError("s3", _client_error_detail(err)) from err
            except (botocore.exceptions.BotoCoreError, SourceError, OSError) as err:
                if retries >= MAX_STREAM_RETRIES:
                    detail = (
                        err.detail if isinstance(err, SourceError) else _client_error_detail(err)
                    )
                    raise SourceError("s3", detail) from err
                retries += 1
                log.warning("resuming offset=%d attempt=%d error=%s", offset, retries, err)
                await asyncio.sleep(min(0.2 * 2**retries, 5.0))

    def plugin_config(self) -> dict[str, Any]:
        if self._info is None:
            raise RuntimeError("probe() first")
        return {
            "kind": "s3",
            "url": self._settings.endpoint,
            "size": self._info.size,
            "headers": {},
            "ca_files": [str(p) for p in ca_bundle_files(self._settings)],
            "insecure": self._settings.insecure_tls,
            "timeout": self._settings.stall_timeout,
            "s3": {
                "endpoint_url": self.endpoint,
                "bucket": self.bucket,
                "key": self.key,
                "access_key": self._settings.access_key_id,
                "secret_key": self._settings.secret_key,
                "region": self.region,
            },
        }
