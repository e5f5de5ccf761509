"""The upload PKI: small CA helpers, and the signer Secrets the upload controller keeps (§6.1).

Two certificate authorities, as CDI has them, each in a Secret of the CDI namespace (`cdi` by
default), type `kubernetes.io/tls` with keys `tls.crt` and `tls.key`:

* `cdi-uploadserver-signer` signs each upload server's certificate (DNS names of its Service).
  Its certificate is published in the ConfigMap `cdi-uploadserver-signer-bundle`, key
  `ca-bundle.crt`: what the upload proxy trusts when it connects to an upload server.
* `cdi-uploadserver-client-signer` signs the client certificate the proxy presents. Every upload
  server gets its certificate as `ca.crt` (CLIENT_CERT_FILE) and accepts only peers it signed
  whose CN is CLIENT_NAME. Also published as `cdi-uploadserver-client-signer-bundle`.
* `cdi-uploadserver-client-cert` holds the proxy's client certificate and key (CN
  `client.upload-server.cdi.kubevirt.io`, `cdi.api.tokens.UPLOAD_CLIENT_NAME`).

Lifetimes, and why:

* CAs: 10 years. Re-made only when missing, unreadable or within `RENEW_BEFORE` of expiry; the
  bundles keep every unexpired CA they held, so certificates signed by the old one stay trusted.
* Upload server certificates: `SERVER_CERT_LIFETIME` (7 days). A pod is replaced with a fresh
  certificate at its DEADLINE (12 h by default), so 7 days covers the deadline plus an upload
  that started just before it and runs long (TLS checks the certificate at each handshake:
  virtctl's retries after the deadline still connect), while a leaked key expires within a week.
* The proxy's client certificate: 1 year, re-issued when less than `RENEW_BEFORE` is left or when
  the client CA changed. Upload servers trust the CA, not the certificate, so re-issuing it
  breaks no running pod (the proxy must re-read the Secret; it changes in place).

Keys are ECDSA P-256: quick to make (a pod's certificate is made on the reconcile path), and
accepted by Python's ssl, Go's crypto/tls and OpenSSL alike.

Pure helpers (`create_ca`, `issue_server_cert`, `issue_client_cert`, PEM in and out) plus one
API-facing call, `ensure_upload_pki(client, namespace)`, which the upload reconciler makes before
each upload pod: idempotent (AlreadyExists re-reads the winner, so parallel reconciles and a
restarted controller agree on one CA), and it never deletes anything.
"""

from __future__ import annotations

import base64
import datetime
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cdi.api import annotations as ann
from cdi.api.groups import CONFIG_MAP, SECRET
from cdi.api.tokens import UPLOAD_CLIENT_NAME
from cdi.kube.client import Client
from cdi.kube.errors import AlreadyExists, Conflict, NotFound

log = logging.getLogger(__name__)

Obj = dict[str, Any]

CDI_NAMESPACE: Final = "cdi"
SERVER_SIGNER_SECRET: Final = "cdi-uploadserver-signer"
SERVER_SIGNER_BUNDLE: Final = "cdi-uploadserver-signer-bundle"
CLIENT_SIGNER_SECRET: Final = "cdi-uploadserver-client-signer"
CLIENT_SIGNER_BUNDLE: Final = "cdi-uploadserver-client-signer-bundle"
CLIENT_CERT_SECRET: Final = "cdi-uploadserver-client-cert"
BUNDLE_KEY: Final = "ca-bundle.crt"
TLS_CERT_KEY: Final = "tls.crt"
TLS_KEY_KEY: Final = "tls.key"
CA_CERT_KEY: Final = "ca.crt"
SECRET_TYPE_TLS: Final = "kubernetes.io/tls"

CA_LIFETIME: Final = datetime.timedelta(days=3650)
SERVER_CERT_LIFETIME: Final = datetime.timedelta(days=7)
CLIENT_CERT_LIFETIME: Final = datetime.timedelta(days=365)
#: Re-make a CA or the client certificate when less than this is left.
RENEW_BEFORE: Final = datetime.timedelta(days=30)
#: Certificates start a little in the past: clocks of the machines involved differ.
CLOCK_SKEW: Final = datetime.timedelta(minutes=5)

SERVER_SIGNER_CN: Final = "cdi-uploadserver-signer"
CLIENT_SIGNER_CN: Final = "cdi-uploadserver-client-signer"


class CertError(ValueError):
    """PEM data that is not a usable certificate or key."""


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A certificate and its private key, both PEM."""

    cert: bytes
    key: bytes


@dataclass(frozen=True, slots=True)
class UploadPKI:
    """What the upload and clone reconcilers need for one pod: the server signer (to issue the
    pod's certificate), the client CA certificate (the pod's `ca.crt`) and the client signer."""

    server_signer: KeyPair
    client_ca: bytes
    client_signer: KeyPair | None = None
    """The client signer itself: clone source pods get client certificates from it."""


# --- pure helpers --------------------------------------------------------------------------------


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def load_certificate(pem: bytes) -> x509.Certificate:
    """The first certificate of `pem`; CertError when there is none."""
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as err:
        raise CertError(f"not a PEM certificate: {err}") from None


def load_certificates(pem: bytes) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle (none for empty input)."""
    if not pem.strip():
        return []
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError as err:
        raise CertError(f"not a PEM certificate bundle: {err}") from None


def _load_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, None)
    except (ValueError, TypeError) as err:
        raise CertError(f"not a PEM private key: {err}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError("the private key is not an ECDSA key")
    return key


def create_ca(
    common_name: str,
    *,
    lifetime: datetime.timedelta = CA_LIFETIME,
    now: datetime.datetime | None = None,
) -> KeyPair:
    """A new self-signed CA (may sign end-entity certificates only: path length 0)."""
    now = now or _now()
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _issue(
    ca: KeyPair,
    common_name: str,
    *,
    usage: x509.ObjectIdentifier,
    dns_names: Sequence[str],
    lifetime: datetime.timedelta,
    now: datetime.datetime | None,
) -> KeyPair:
    now = now or _now()
    ca_cert = load_certificate(ca.cert)
    ca_key = _load_key(ca.key)
    key = ec.generate_private_key(ec.SECP256R1())
    # Never outlive the CA: a chain with an expired issuer fails anyway, and saying so is honest.
    not_after = min(now + lifetime, ca_cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if dns_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), critical=False
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def issue_server_cert(
    ca: KeyPair,
    dns_names: Sequence[str],
    *,
    lifetime: datetime.timedelta = SERVER_CERT_LIFETIME,
    now: datetime.datetime | None = None,
) -> KeyPair:
    """A TLS server certificate for `dns_names` (the first is also the CN), signed by `ca`."""
    if not dns_names:
        raise ValueError("a server certificate needs at least one DNS name")
    return _issue(
        ca,
        dns_names[0],
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        dns_names=dns_names,
        lifetime=lifetime,
        now=now,
    )


def issue_client_cert(
    ca: KeyPair,
    common_name: str,
    *,
    lifetime: datetime.timedelta = CLIENT_CERT_LIFETIME,
    now: datetime.datetime | None = None,
) -> KeyPair:
    """A TLS client certificate with CN `common_name`, signed by `ca`."""
    return _issue(
        ca,
        common_name,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        dns_names=(),
        lifetime=lifetime,
        now=now,
    )


def common_name(cert_pem: bytes) -> str:
    attrs = load_certificate(cert_pem).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def signed_by(cert_pem: bytes, ca_pem: bytes) -> bool:
    """Whether `ca_pem`'s key signed `cert_pem` (signature and issuer name; no time check)."""
    cert, ca = load_certificate(cert_pem), load_certificate(ca_pem)
    if cert.issuer != ca.subject:
        return False
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def expires_within(cert_pem: bytes, window: datetime.timedelta, *, now: datetime.datetime) -> bool:
    return load_certificate(cert_pem).not_valid_after_utc - now < window


def key_matches(pair: KeyPair) -> bool:
    """Whether the key belongs to the certificate."""
    cert_key = load_certificate(pair.cert).public_key()
    own = _load_key(pair.key).public_key()
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    return bool(
        cert_key.public_bytes(serialization.Encoding.DER, fmt)
        == own.public_bytes(serialization.Encoding.DER, fmt)
    )


def merge_bundle(bundle: bytes, ca_cert: bytes, *, now: datetime.datetime) -> bytes:
    """`bundle` with `ca_cert` added (first) and expired certificates dropped; PEM."""
    try:
        old = load_certificates(bundle)
    except CertError:
        old = []
    wanted = load_certificate(ca_cert)
    kept = [wanted] + [c for c in old if c != wanted and c.not_valid_after_utc > now]
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in kept)


# --- the Secrets and ConfigMaps ------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _secret_pair(secret: Mapping[str, Any]) -> KeyPair | None:
    data = secret.get("data") or {}
    try:
        pair = KeyPair(
            base64.b64decode(str(data.get(TLS_CERT_KEY) or "")),
            base64.b64decode(str(data.get(TLS_KEY_KEY) or "")),
        )
        return pair if key_matches(pair) else None
    except (ValueError, CertError):
        return None


def tls_secret(name: str, namespace: str, pair: KeyPair) -> Obj:
    return {
        "apiVersion": SECRET.api_version,
        "kind": SECRET.kind,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {ann.LABEL_APP: ann.LABEL_APP_VALUE},
        },
        "type": SECRET_TYPE_TLS,
        "data": {TLS_CERT_KEY: _b64(pair.cert), TLS_KEY_KEY: _b64(pair.key)},
    }


async def _ensure_pair(
    client: Client,
    namespace: str,
    name: str,
    *,
    usable: Callable[[KeyPair], bool],
    make: Callable[[], KeyPair],
) -> KeyPair:
    """The key pair in Secret `name`, (re)made with `make()` unless `usable(pair)`. A Secret
    another reconcile created first wins (AlreadyExists, Conflict on replace: re-read)."""
    for _ in range(3):
        try:
            secret: Obj | None = await client.get(SECRET, name, namespace)
        except NotFound:
            secret = None
        pair = _secret_pair(secret) if secret is not None else None
        if pair is not None and usable(pair):
            return pair
        fresh = make()
        manifest = tls_secret(name, namespace, fresh)
        try:
            if secret is None:
                await client.create(SECRET, manifest, namespace)
            else:
                manifest["metadata"]["resourceVersion"] = secret["metadata"].get("resourceVersion")
                await client.replace(SECRET, manifest)
        except (AlreadyExists, Conflict):
            continue  # another reconcile wrote it first: use theirs
        log.info("%s/%s upload PKI secret %s", namespace, name, "renewed" if secret else "created")
        return fresh
    raise RuntimeError(f"secret {namespace}/{name} keeps changing under us")


async def _ensure_bundle(client: Client, namespace: str, name: str, ca_cert: bytes) -> None:
    """ConfigMap `name` with `ca_cert` in its bundle (older unexpired CAs kept)."""
    for _ in range(3):
        try:
            cm: Obj | None = await client.get(CONFIG_MAP, name, namespace)
        except NotFound:
            cm = None
        current = str(((cm or {}).get("data") or {}).get(BUNDLE_KEY) or "").encode()
        wanted = merge_bundle(current, ca_cert, now=_now())
        if cm is not None and wanted == current:
            return
        manifest: Obj = {
            "apiVersion": CONFIG_MAP.api_version,
            "kind": CONFIG_MAP.kind,
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {ann.LABEL_APP: ann.LABEL_APP_VALUE},
            },
            "data": {BUNDLE_KEY: wanted.decode()},
        }
        try:
            if cm is None:
                await client.create(CONFIG_MAP, manifest, namespace)
            else:
                manifest["metadata"]["resourceVersion"] = cm["metadata"].get("resourceVersion")
                await client.replace(CONFIG_MAP, manifest)
        except (AlreadyExists, Conflict):
            continue  # another reconcile wrote it first: merge into theirs
        log.info("%s/%s upload CA bundle %s", namespace, name, "updated" if cm else "created")
        return
    raise RuntimeError(f"configmap {namespace}/{name} keeps changing under us")


def _ca_usable(pair: KeyPair) -> bool:
    cert = load_certificate(pair.cert)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    return constraints.ca and not expires_within(pair.cert, RENEW_BEFORE, now=_now())


async def ensure_upload_pki(client: Client, namespace: str = CDI_NAMESPACE) -> UploadPKI:
    """Both signers, their bundles and the proxy's client certificate, made when missing."""
    server_signer = await _ensure_pair(
        client,
        namespace,
        SERVER_SIGNER_SECRET,
        usable=_ca_usable,
        make=lambda: create_ca(SERVER_SIGNER_CN),
    )
    await _ensure_bundle(client, namespace, SERVER_SIGNER_BUNDLE, server_signer.cert)
    client_signer = await _ensure_pair(
        client,
        namespace,
        CLIENT_SIGNER_SECRET,
        usable=_ca_usable,
        make=lambda: create_ca(CLIENT_SIGNER_CN),
    )
    await _ensure_bundle(client, namespace, CLIENT_SIGNER_BUNDLE, client_signer.cert)
    await _ensure_pair(
        client,
        namespace,
        CLIENT_CERT_SECRET,
        usable=lambda pair: (
            signed_by(pair.cert, client_signer.cert)
            and common_name(pair.cert) == UPLOAD_CLIENT_NAME
            and not expires_within(pair.cert, RENEW_BEFORE, now=_now())
        ),
        make=lambda: issue_client_cert(client_signer, UPLOAD_CLIENT_NAME),
    )
    return UploadPKI(
        server_signer=server_signer, client_ca=client_signer.cert, client_signer=client_signer
    )
