"""Upload server settings, loaded once from CDI's upload pod environment (reference §6.2).

As for the importer, every value is validated here and a bad one raises `SettingsError` naming the
variable. The path variables (CDI_DATA_DIR, CDI_BLOCK_DEVICE, CDI_SCRATCH_DIR,
CDI_TERMINATION_LOG) are the importer's (`importer.settings.paths_from_env`).

DESTINATION decides the volume mode:
* unset or CDI's `/data/disk.img`: Filesystem, the image is `<CDI_DATA_DIR>/disk.img`;
* CDI's `/dev/cdi-block-volume`: Block, the device is CDI_BLOCK_DEVICE (default that path);
* any other path named `disk.img` that is not a block device: Filesystem in its directory;
* any other path: Block; it must exist (a device, or a file standing in for one).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

from cdi.api import ContentType, SourceType, env, parse_overhead, parse_size
from cdi.api.quantity import QuantityError
from cdi.api.space import OverheadError
from cdi.api.tokens import UPLOAD_CLIENT_NAME
from importer.errors import SettingsError
from importer.settings import ImporterSettings, Paths, parse_bool, paths_from_env

#: Ours, tests only: plain HTTP and no client certificate, refused unless the address is loopback.
UPLOAD_INSECURE = "UPLOAD_INSECURE"
DEFAULT_LISTEN_ADDRESS = "0.0.0.0"  # noqa: S104 - the pod's port, as CDI
DEFAULT_DESTINATION = f"{env.DEFAULT_DATA_DIR}/{env.DISK_IMAGE_NAME}"

# CDIConfig's TLS security profile names (Go's crypto/tls constants), and plain spellings.
_TLS_VERSIONS = {
    "VersionTLS10": ssl.TLSVersion.TLSv1,
    "VersionTLS11": ssl.TLSVersion.TLSv1_1,
    "VersionTLS12": ssl.TLSVersion.TLSv1_2,
    "VersionTLS13": ssl.TLSVersion.TLSv1_3,
    "1.0": ssl.TLSVersion.TLSv1,
    "1.1": ssl.TLSVersion.TLSv1_1,
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
}
# TLS 1.3 suites are not configurable through OpenSSL's cipher list (nor in Python).
_TLS13_SUITES = ("TLS_AES_", "TLS_CHACHA20_")


@dataclass(frozen=True, slots=True)
class TlsFiles:
    key: Path
    cert: Path
    client_ca: Path


@dataclass(frozen=True, slots=True)
class UploadSettings:
    paths: Paths  # `paths.block` is decided from DESTINATION
    destination: Path
    listen_address: str = DEFAULT_LISTEN_ADDRESS
    listen_port: int = env.UPLOAD_SERVER_PORT
    tls: TlsFiles | None = None  # None: UPLOAD_INSECURE (plain HTTP, loopback only)
    client_name: str = UPLOAD_CLIENT_NAME
    tls_min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
    tls_ciphers: tuple[str, ...] = ()
    image_size: int | None = None
    filesystem_overhead: Fraction = Fraction(0)
    preallocation: bool = False
    deadline: datetime.datetime | None = None
    owner_uid: str = ""
    cache_mode_none: bool = False

    @property
    def insecure(self) -> bool:
        return self.tls is None

    @property
    def is_block(self) -> bool:
        return self.paths.is_block

    def importer_settings(self, content_type: ContentType) -> ImporterSettings:
        """What the importer's pipeline needs for one upload. The source field is not used: the
        server hands `ImportRun` the request body as its source."""
        return ImporterSettings(
            source=SourceType.HTTP,
            endpoint="",
            content_type=content_type,
            paths=self.paths,
            image_size=self.image_size,
            filesystem_overhead=self.filesystem_overhead,
            preallocation=self.preallocation,
            owner_uid=self.owner_uid,
            metrics_addr=None,
            cache_mode_none=self.cache_mode_none,
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        """Server certificate, client certificate asked for at the handshake (optional there,
        required by the handler) and verified against CLIENT_CERT_FILE."""
        if self.tls is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = self.tls_min_version
        try:
            ctx.load_cert_chain(str(self.tls.cert), str(self.tls.key))
        except (OSError, ssl.SSLError) as err:
            raise SettingsError(
                env.TLS_CERT_FILE, f"cannot load {self.tls.cert} with key {self.tls.key}: {err}"
            ) from None
        try:
            ctx.load_verify_locations(cafile=str(self.tls.client_ca))
        except (OSError, ssl.SSLError) as err:
            raise SettingsError(
                env.CLIENT_CERT_FILE, f"{self.tls.client_ca} is not a PEM CA certificate: {err}"
            ) from None
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ciphers = [c for c in self.tls_ciphers if not c.startswith(_TLS13_SUITES)]
        if ciphers:
            try:
                ctx.set_ciphers(":".join(ciphers))
            except ssl.SSLError as err:
                raise SettingsError(
                    env.TLS_CIPHERS, f"no usable cipher in {','.join(ciphers)}: {err}"
                ) from None
        return ctx

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> UploadSettings:
        e = os.environ if environ is None else environ

        def get(name: str) -> str:
            return e.get(name, "").strip()

        paths, destination = _destination(get(env.DESTINATION), paths_from_env(e))

        address = get(env.LISTEN_ADDRESS) or DEFAULT_LISTEN_ADDRESS
        port = env.UPLOAD_SERVER_PORT
        if raw_port := get(env.LISTEN_PORT):
            if not raw_port.isdigit() or int(raw_port) > 65535:
                raise SettingsError(env.LISTEN_PORT, f"{raw_port!r} is not a port number")
            port = int(raw_port)

        tls: TlsFiles | None = None
        if parse_bool(e, UPLOAD_INSECURE):
            if not _is_loopback(address):
                raise SettingsError(
                    UPLOAD_INSECURE,
                    "plain HTTP without client certificates is for tests only; it is refused "
                    f"unless LISTEN_ADDRESS is a loopback address (it is {address})",
                )
        else:
            tls = TlsFiles(
                key=_file(get, env.TLS_KEY_FILE),
                cert=_file(get, env.TLS_CERT_FILE),
                client_ca=_file(get, env.CLIENT_CERT_FILE),
            )

        min_version = ssl.TLSVersion.TLSv1_2
        if raw_min := get(env.TLS_MIN_VERSION):
            if raw_min not in _TLS_VERSIONS:
                raise SettingsError(
                    env.TLS_MIN_VERSION, f"{raw_min!r} is not one of VersionTLS10..VersionTLS13"
                )
            min_version = _TLS_VERSIONS[raw_min]
        ciphers = tuple(
            c.strip() for c in get(env.TLS_CIPHERS).replace(":", ",").split(",") if c.strip()
        )

        image_size = None
        if raw_size := get(env.UPLOAD_IMAGE_SIZE):
            try:
                image_size = parse_size(raw_size)
            except QuantityError as err:
                raise SettingsError(env.UPLOAD_IMAGE_SIZE, str(err)) from None

        overhead = Fraction(0)
        if raw_overhead := get(env.FILESYSTEM_OVERHEAD):
            try:
                overhead = parse_overhead(raw_overhead)
            except OverheadError as err:
                raise SettingsError(env.FILESYSTEM_OVERHEAD, str(err)) from None

        deadline = None
        if raw_deadline := get(env.DEADLINE):
            deadline = _parse_rfc3339(raw_deadline)

        return cls(
            paths=paths,
            destination=destination,
            listen_address=address,
            listen_port=port,
            tls=tls,
            client_name=get(env.CLIENT_NAME) or UPLOAD_CLIENT_NAME,
            tls_min_version=min_version,
            tls_ciphers=ciphers,
            image_size=image_size,
            filesystem_overhead=overhead,
            preallocation=parse_bool(e, env.PREALLOCATION),
            deadline=deadline,
            owner_uid=get(env.OWNER_UID),
            cache_mode_none=get(env.CACHE_MODE) == env.CACHE_MODE_TRY_NONE,
        )


def _destination(raw: str, paths: Paths) -> tuple[Paths, Path]:
    if not raw or raw == DEFAULT_DESTINATION:
        fs = replace(paths, block=False)
        _require_dir(fs.data_dir)
        return fs, fs.disk_image
    if raw == env.DEFAULT_BLOCK_DEVICE:
        return _block(paths, paths.block_device)
    path = Path(raw)
    if path.name == env.DISK_IMAGE_NAME and not path.is_block_device():
        fs = replace(paths, data_dir=path.parent, block=False)
        _require_dir(fs.data_dir)
        return fs, path
    return _block(paths, path)


def _block(paths: Paths, device: Path) -> tuple[Paths, Path]:
    if not (device.is_block_device() or device.is_file()):
        raise SettingsError(
            env.DESTINATION,
            f"{device} does not exist; a Block destination is the volume's device, a "
            f"Filesystem one is <volume>/{env.DISK_IMAGE_NAME}",
        )
    return replace(paths, block_device=device, block=True), device


def _require_dir(directory: Path) -> None:
    if not directory.is_dir():
        raise SettingsError(
            env.DESTINATION,
            f"the volume directory {directory} does not exist (set CDI_DATA_DIR or DESTINATION)",
        )


def _file(get: Callable[[str], str], name: str) -> Path:
    raw = get(name)
    if not raw:
        raise SettingsError(name, f"is required (or {UPLOAD_INSECURE}=true on loopback, tests)")
    path = Path(raw)
    if not path.is_file():
        raise SettingsError(name, f"{raw} is not a file")
    return path


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def _parse_rfc3339(text: str) -> datetime.datetime:
    try:
        value = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise SettingsError(
            env.DEADLINE, f"{text!r} is not an RFC 3339 time (2006-01-02T15:04:05Z)"
        ) from None
    if value.tzinfo is None:
        raise SettingsError(env.DEADLINE, f"{text!r} has no time zone (end it with Z)")
    return value
