"""Importer settings, loaded once from the environment (CDI's worker contract, reference §5.2).

Every value is validated here; a bad one raises `SettingsError` naming the variable, so the pod
fails at once with a message that says which field of the pod spec to fix. Nothing else in the
importer reads `os.environ`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from cdi.api import ContentType, SourceType, env, parse_overhead, parse_size
from cdi.api.quantity import QuantityError
from cdi.api.space import OverheadError
from importer.checksum import Checksum, parse_checksum
from importer.errors import SettingsError

SUPPORTED_SOURCES = (SourceType.HTTP, SourceType.S3, SourceType.NONE)
DEFAULT_STALL_TIMEOUT = 600.0  # CDI cancels a download after 10 minutes without progress
CDI_STALL_TIMEOUT = env.CDI_STALL_TIMEOUT
CDI_EXTRA_HEADERS_DIR = env.CDI_EXTRA_HEADERS_DIR
DEFAULT_EXTRA_HEADERS_DIR = env.DEFAULT_EXTRA_HEADERS_DIR

# Go's strconv.ParseBool, which CDI uses for PREALLOCATION and INSECURE_TLS.
_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


@dataclass(frozen=True, slots=True)
class Paths:
    """Where the worker reads and writes; CDI's in-pod paths unless overridden (CDI_*)."""

    data_dir: Path
    block_device: Path
    scratch_dir: Path
    termination_log: Path
    block: bool | None = None
    """None: CDI's importer rule (Block when `block_device` exists); True/False: the caller has
    decided (the upload server, from DESTINATION)."""

    @property
    def disk_image(self) -> Path:
        return self.data_dir / env.DISK_IMAGE_NAME

    @property
    def scratch_image(self) -> Path:
        return self.scratch_dir / env.SCRATCH_IMAGE_NAME

    @property
    def is_block(self) -> bool:
        """CDI's rule: Block when the device path exists inside the pod (unless decided)."""
        if self.block is not None:
            return self.block
        return self.block_device.exists()

    @property
    def has_scratch(self) -> bool:
        return self.scratch_dir.is_dir()


@dataclass(frozen=True, slots=True)
class ImporterSettings:
    source: SourceType
    endpoint: str
    content_type: ContentType
    paths: Paths
    image_size: int | None = None
    filesystem_overhead: Fraction = Fraction(0)
    preallocation: bool = False
    access_key_id: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    cert_dir: Path | None = None
    proxy_cert_dir: Path | None = None
    """CAs of the import proxy (CDIConfig importProxy.trustedCAProxy), trusted next to cert_dir."""
    insecure_tls: bool = False
    extra_headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    checksum: Checksum | None = None
    owner_uid: str = ""
    metrics_addr: str | None = ":8443"
    stall_timeout: float = DEFAULT_STALL_TIMEOUT
    # CDI's CACHE_MODE=TRYNONE (set after an OOM kill); we try O_DIRECT first anyway.
    cache_mode_none: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ImporterSettings:
        e = os.environ if environ is None else environ

        def get(name: str) -> str:
            return e.get(name, "").strip()

        raw_source = get(env.IMPORTER_SOURCE) or SourceType.HTTP.value
        try:
            source = SourceType(raw_source)
        except ValueError:
            source = None
        if source is None or source not in SUPPORTED_SOURCES:
            # CDI's wording for this case; registry, gcs and friends arrive in later issues.
            raise SettingsError(
                env.IMPORTER_SOURCE,
                f"Unknown data source: {raw_source} (supported: "
                f"{', '.join(s.value for s in SUPPORTED_SOURCES)})",
            )

        endpoint = get(env.IMPORTER_ENDPOINT)
        if source is not SourceType.NONE and not endpoint:
            raise SettingsError(env.IMPORTER_ENDPOINT, "is empty; set it to the image URL")

        raw_ct = get(env.IMPORTER_CONTENTTYPE) or ContentType.KUBEVIRT.value
        try:
            content_type = ContentType(raw_ct)
        except ValueError:
            raise SettingsError(
                env.IMPORTER_CONTENTTYPE, f"{raw_ct!r} is not one of: kubevirt, archive"
            ) from None
        if source is SourceType.NONE and content_type is ContentType.ARCHIVE:
            raise SettingsError(
                env.IMPORTER_CONTENTTYPE, "Cannot create empty disk with content type archive"
            )

        image_size = None
        if raw_size := get(env.IMPORTER_IMAGE_SIZE):
            try:
                image_size = parse_size(raw_size)
            except QuantityError as err:
                raise SettingsError(env.IMPORTER_IMAGE_SIZE, str(err)) from None

        overhead = Fraction(0)
        if raw_overhead := get(env.FILESYSTEM_OVERHEAD):
            try:
                overhead = parse_overhead(raw_overhead)
            except OverheadError as err:
                raise SettingsError(env.FILESYSTEM_OVERHEAD, str(err)) from None

        checksum = None
        if raw_checksum := get(env.IMPORTER_CHECKSUM):
            try:
                checksum = parse_checksum(raw_checksum)
            except ValueError as err:
                raise SettingsError(env.IMPORTER_CHECKSUM, str(err)) from None

        cert_dir = _directory(get, env.IMPORTER_CERT_DIR)
        proxy_cert_dir = _directory(get, env.IMPORTER_PROXY_CERT_DIR)

        stall = DEFAULT_STALL_TIMEOUT
        if raw_stall := get(CDI_STALL_TIMEOUT):
            try:
                stall = float(raw_stall)
            except ValueError:
                stall = -1.0
            if not stall > 0:
                raise SettingsError(
                    CDI_STALL_TIMEOUT, f"{raw_stall!r} is not a positive number of seconds"
                )

        raw_metrics = get(env.CDI_METRICS_ADDR) or f":{env.METRICS_PORT}"
        metrics_addr: str | None = None
        if raw_metrics != "off":
            _parse_listen_address(env.CDI_METRICS_ADDR, raw_metrics)
            metrics_addr = raw_metrics

        paths = paths_from_env(e)
        headers = _extra_headers(e) + _secret_extra_headers(
            Path(get(CDI_EXTRA_HEADERS_DIR) or DEFAULT_EXTRA_HEADERS_DIR)
        )
        return cls(
            source=source,
            endpoint=endpoint,
            content_type=content_type,
            paths=paths,
            image_size=image_size,
            filesystem_overhead=overhead,
            preallocation=_parse_bool(e, env.PREALLOCATION),
            access_key_id=get(env.IMPORTER_ACCESS_KEY_ID) or None,
            secret_key=get(env.IMPORTER_SECRET_KEY) or None,
            cert_dir=cert_dir,
            proxy_cert_dir=proxy_cert_dir,
            insecure_tls=_parse_bool(e, env.INSECURE_TLS),
            extra_headers=headers,
            checksum=checksum,
            owner_uid=get(env.OWNER_UID),
            metrics_addr=metrics_addr,
            stall_timeout=stall,
            cache_mode_none=get(env.CACHE_MODE) == env.CACHE_MODE_TRY_NONE,
        )


def paths_from_env(environ: Mapping[str, str] | None = None) -> Paths:
    """The worker paths: CDI's in-pod paths unless CDI_DATA_DIR / CDI_BLOCK_DEVICE /
    CDI_SCRATCH_DIR / CDI_TERMINATION_LOG override them (shared by every worker of this package)."""
    e = os.environ if environ is None else environ

    def get(name: str) -> str:
        return e.get(name, "").strip()

    return Paths(
        data_dir=Path(get(env.CDI_DATA_DIR) or env.DEFAULT_DATA_DIR),
        block_device=Path(get(env.CDI_BLOCK_DEVICE) or env.DEFAULT_BLOCK_DEVICE),
        scratch_dir=Path(get(env.CDI_SCRATCH_DIR) or env.DEFAULT_SCRATCH_DIR),
        termination_log=Path(get(env.CDI_TERMINATION_LOG) or env.DEFAULT_TERMINATION_LOG),
    )


def parse_bool(environ: Mapping[str, str], name: str) -> bool:
    """A boolean variable as CDI parses it (Go's strconv.ParseBool); empty is false."""
    return _parse_bool(environ, name)


def parse_listen_address(value: str) -> tuple[str, int]:
    """ "host:port", ":port" (all interfaces) or ":0" (any free port) -> (host, port)."""
    return _parse_listen_address(env.CDI_METRICS_ADDR, value)


def _parse_listen_address(variable: str, value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise SettingsError(variable, f"{value!r} is not host:port, :port or off")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - CDI serves metrics on all interfaces


def _directory(get: Callable[[str], str], name: str) -> Path | None:
    raw = get(name)
    if not raw:
        return None
    path = Path(raw)
    if not path.is_dir():
        raise SettingsError(name, f"{raw} is not a directory")
    return path


def _parse_bool(e: Mapping[str, str], name: str) -> bool:
    value = e.get(name, "").strip()
    if value == "" or value in _FALSE:
        return False
    if value in _TRUE:
        return True
    raise SettingsError(name, f"{value!r} is not a boolean; use true or false")


def _split_header(variable: str, line: str) -> tuple[str, str]:
    name, sep, value = line.partition(":")
    name = name.strip()
    if not sep or not name or any(c.isspace() for c in name):
        raise SettingsError(variable, "is not a header line; use 'Name: value'")
    if "\n" in value or "\r" in value:
        raise SettingsError(variable, "a header value cannot contain a line break")
    return name, value.strip()


def _extra_headers(e: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    found = []
    for key, value in e.items():
        if key.startswith(env.IMPORTER_EXTRA_HEADER_PREFIX):
            suffix = key[len(env.IMPORTER_EXTRA_HEADER_PREFIX) :]
            order = int(suffix) if suffix.isdigit() else 1 << 30
            found.append((order, key, _split_header(key, value)))
    return tuple(header for _, _, header in sorted(found))


def _secret_extra_headers(root: Path) -> tuple[tuple[str, str], ...]:
    """Secret headers: each mounted secret at <root>/<i>/ holds one full header line per key."""
    if not root.is_dir():
        return ()
    headers = []
    for path in sorted(p for p in root.glob("*/*") if p.is_file() and not p.name.startswith(".")):
        line = path.read_text().strip()
        headers.append(_split_header(f"secret extra header {path}", line))
    return tuple(headers)
