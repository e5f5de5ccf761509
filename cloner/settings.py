"""Cloner settings, loaded once from the source pod's environment (reference §7.3).

CDI's names where CDI has them (UPLOAD_URL, CLIENT_CERT, CLIENT_KEY, SERVER_CA_CERT, OWNER_UID,
VOLUME_MODE, MOUNT_POINT, PREALLOCATION); ours for what CDI's cloner does not have
(UPLOAD_SERVER_ADDRESS, CLONE_CONTENT_TYPE, CLONE_COMPRESSION) and for the paths that let the
worker run outside a container (CDI_BLOCK_DEVICE, CDI_METRICS_ADDR, CDI_TERMINATION_LOG).
Every value is checked here; a bad one raises `SettingsError` naming the variable.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TypeVar

from yarl import URL

from cdi.api import env
from cloner.errors import SettingsError

UPLOAD_SERVER_ADDRESS: Final = "UPLOAD_SERVER_ADDRESS"
CLONE_CONTENT_TYPE: Final = "CLONE_CONTENT_TYPE"
CLONE_COMPRESSION: Final = "CLONE_COMPRESSION"
CLONE_CONNECT_WAIT: Final = "CLONE_CONNECT_WAIT"
DEFAULT_CONNECT_WAIT: Final = 60.0
DEFAULT_METRICS_ADDR: Final = f"0.0.0.0:{env.METRICS_PORT}"

# Go's strconv.ParseBool, which CDI uses for PREALLOCATION.
_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}

E = TypeVar("E", bound=enum.StrEnum)


class Content(enum.StrEnum):
    KUBEVIRT = "kubevirt"  # disk.img (Filesystem) or the device (Block) as an extent stream
    ARCHIVE = "archive"  # the Filesystem volume's files as a tar


class Compression(enum.StrEnum):
    NONE = "none"
    ZSTD = "zstd"


@dataclass(frozen=True, slots=True)
class Tls:
    """PEM contents, as CDI passes them (from a secret, through the environment)."""

    client_cert: str = field(repr=False)
    client_key: str = field(repr=False)
    server_ca: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class CloneSettings:
    upload_url: URL
    server_address: tuple[str, int] | None = None  # connect here instead of the URL's host
    tls: Tls | None = None  # None for an http:// URL (tests against an insecure server)
    owner_uid: str = ""
    block: bool = False
    mount_point: Path = Path(env.CLONE_SOURCE_MOUNT)
    block_device: Path = Path(env.DEFAULT_BLOCK_DEVICE)
    preallocation: bool = False
    content: Content = Content.KUBEVIRT
    compression: Compression = Compression.NONE
    metrics_addr: tuple[str, int] | None = ("0.0.0.0", env.METRICS_PORT)  # noqa: S104 - as CDI
    connect_wait: float = DEFAULT_CONNECT_WAIT
    """Seconds a refused connection to the upload server is retried (it may not listen yet)."""

    @property
    def source(self) -> Path:
        """The kubevirt source: the device, or the disk image in the mounted volume."""
        if self.block:
            return self.block_device
        return self.mount_point / env.DISK_IMAGE_NAME

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> CloneSettings:
        e = os.environ if environ is None else environ

        def get(name: str) -> str:
            return e.get(name, "").strip()

        url = _upload_url(get(env.UPLOAD_URL))
        address = None
        if raw_address := get(UPLOAD_SERVER_ADDRESS):
            address = _host_port(UPLOAD_SERVER_ADDRESS, raw_address, allow_zero=False)

        tls = None
        if url.scheme == "https":
            tls = Tls(
                client_cert=_pem(get, env.CLIENT_CERT, "CERTIFICATE"),
                client_key=_pem(get, env.CLIENT_KEY, "PRIVATE KEY"),
                server_ca=_pem(get, env.SERVER_CA_CERT, "CERTIFICATE"),
            )

        raw_mode = get(env.VOLUME_MODE).lower() or "filesystem"
        if raw_mode not in ("block", "filesystem"):
            raise SettingsError(env.VOLUME_MODE, f"{raw_mode!r} is not block or filesystem")
        block = raw_mode == "block"

        content = _choice(get, CLONE_CONTENT_TYPE, Content, Content.KUBEVIRT)
        compression = _choice(get, CLONE_COMPRESSION, Compression, Compression.NONE)

        mount_point = Path(get(env.MOUNT_POINT) or env.CLONE_SOURCE_MOUNT)
        block_device = Path(get(env.CDI_BLOCK_DEVICE) or env.DEFAULT_BLOCK_DEVICE)
        if block:
            if content is Content.ARCHIVE:
                raise SettingsError(
                    CLONE_CONTENT_TYPE, "archive content needs VOLUME_MODE=filesystem"
                )
            if not (block_device.is_block_device() or block_device.is_file()):
                raise SettingsError(env.CDI_BLOCK_DEVICE, f"{block_device} is not a device")
        elif not mount_point.is_dir():
            raise SettingsError(env.MOUNT_POINT, f"{mount_point} is not a directory")

        metrics: tuple[str, int] | None = None
        raw_metrics = get(env.CDI_METRICS_ADDR) or DEFAULT_METRICS_ADDR
        if raw_metrics != "off":
            metrics = _host_port(env.CDI_METRICS_ADDR, raw_metrics, allow_zero=True)

        connect_wait = DEFAULT_CONNECT_WAIT
        if raw_wait := get(CLONE_CONNECT_WAIT):
            try:
                connect_wait = float(raw_wait)
            except ValueError:
                connect_wait = -1.0
            if not 0 <= connect_wait <= 3600:
                raise SettingsError(CLONE_CONNECT_WAIT, f"{raw_wait!r} is not 0..3600 seconds")

        return cls(
            upload_url=url,
            server_address=address,
            tls=tls,
            owner_uid=get(env.OWNER_UID),
            block=block,
            mount_point=mount_point,
            block_device=block_device,
            preallocation=_parse_bool(get(env.PREALLOCATION), env.PREALLOCATION),
            content=content,
            compression=compression,
            metrics_addr=metrics,
            connect_wait=connect_wait,
        )


def _upload_url(raw: str) -> URL:
    if not raw:
        raise SettingsError(env.UPLOAD_URL, "is required (https://<upload service>:8443/...)")
    try:
        url = URL(raw)
    except (ValueError, TypeError) as err:
        raise SettingsError(env.UPLOAD_URL, f"{raw!r} is not a URL: {err}") from None
    if url.scheme not in ("https", "http") or not url.host:
        raise SettingsError(env.UPLOAD_URL, f"{raw!r} is not an https:// URL with a host")
    return url


def _host_port(variable: str, value: str, *, allow_zero: bool) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or int(port) > 65535 or (int(port) == 0 and not allow_zero):
        raise SettingsError(variable, f"{value!r} is not host:port")
    if not host:
        if variable == UPLOAD_SERVER_ADDRESS:
            raise SettingsError(variable, f"{value!r} has no host")
        host = "0.0.0.0"  # noqa: S104 - ":8443" means every interface, as CDI serves metrics
    return host, int(port)


def _pem(get: Callable[[str], str], name: str, kind: str) -> str:
    value = get(name)
    if not value:
        raise SettingsError(name, "is required for an https UPLOAD_URL (PEM contents)")
    if f"-----BEGIN {kind}" not in value and not (
        kind == "PRIVATE KEY" and "PRIVATE KEY-----" in value
    ):
        raise SettingsError(name, f"is not PEM ({kind}) contents")
    return value


def _choice(get: Callable[[str], str], name: str, kind: type[E], default: E) -> E:
    raw = get(name).lower()
    if not raw:
        return default
    try:
        return kind(raw)
    except ValueError:
        allowed = " | ".join(member.value for member in kind)
        raise SettingsError(name, f"{raw!r} is not one of {allowed}") from None


def _parse_bool(value: str, name: str) -> bool:
    if value == "" or value in _FALSE:
        return False
    if value in _TRUE:
        return True
    raise SettingsError(name, f"{value!r} is not a boolean; use true or false")
