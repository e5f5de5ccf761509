"""Upload and clone tokens: JWTs signed PS256, in the compact form CDI's Go code produces.

CDI signs with go-jose: RSASSA-PSS over SHA-256, MGF1 with SHA-256 and a salt as long as the
digest (32 bytes, `rsa.PSSSaltLengthEqualsHash`), and verifies with the salt length detected
(`rsa.PSSSaltLengthAuto`); we do the same, so tokens cross between CDI's components and ours
(reference §6.3). Verification checks, in order: the compact structure, the header's algorithm
(PS256 only: never `none`, never an HMAC that a public key could be abused as), the signature,
then the claims (`iss`, `exp`, `nbf`, `iat`, with a leeway, as go-jose's `ValidateWithLeeway`).
Unlike go-jose, a token without `exp` is refused: we never issue one.

Pure functions over PEM bytes and claim dicts; no I/O, nothing of ours but `cdi.api`.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from cdi.api.tokens import (
    CLAIM_NAME,
    CLAIM_NAMESPACE,
    CLAIM_OPERATION,
    CLAIM_RESOURCE,
    ISSUER_APISERVER,
    OPERATION_UPLOAD,
    TOKEN_LEEWAY_SECONDS,
    UPLOAD_TOKEN_LIFETIME_SECONDS,
)

ALGORITHM: Final = "PS256"
KEY_BITS: Final = 2048
SALT_LENGTH: Final = 32  # SHA-256's digest length: go-jose's PSSSaltLengthEqualsHash
PVC_RESOURCE: Final = {"group": "", "version": "v1", "resource": "persistentvolumeclaims"}

_HEADER: Final = {"alg": ALGORITHM, "typ": "JWT"}
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


class TokenError(Exception):
    """The token is not one to trust: malformed, wrongly signed, expired, or not ours.

    The message says which, in one line (the upload proxy answers it with a 401)."""


# --- keys -----------------------------------------------------------------------------------


def generate_signing_key() -> bytes:
    """A new RSA 2048 private key, PEM (PKCS#8, unencrypted)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@functools.lru_cache(maxsize=8)
def _private_key(private_pem: bytes) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(private_pem, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"the signing key is not an RSA key but {type(key).__name__}")
    return key


@functools.lru_cache(maxsize=8)
def _public_key(public_pem: bytes) -> rsa.RSAPublicKey:
    key = serialization.load_pem_public_key(public_pem)
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError(f"the verification key is not an RSA key but {type(key).__name__}")
    return key


def public_key_pem(private_pem: bytes) -> bytes:
    """The public half of a private key PEM (PKCS#1 or PKCS#8), as PEM SubjectPublicKeyInfo
    (`-----BEGIN PUBLIC KEY-----`, what CDI stores as `id_rsa.pub`)."""
    return (
        _private_key(private_pem)
        .public_key()
        .public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )
    )


# --- encoding -------------------------------------------------------------------------------


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(part: str, what: str) -> bytes:
    # RFC 7515 §2: base64url with the padding left off, and nothing else in it.
    if not _B64URL.fullmatch(part) or len(part) % 4 == 1:
        raise TokenError(f"malformed token: the {what} is not base64url")
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError):
        raise TokenError(f"malformed token: the {what} is not base64url") from None


def _json_object(part: str, what: str) -> dict[str, Any]:
    raw = _b64decode(part, what)
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise TokenError(f"malformed token: the {what} is not JSON") from None
    if not isinstance(value, dict):
        raise TokenError(f"malformed token: the {what} is not a JSON object")
    return value


def _compact_json(value: Mapping[str, Any]) -> bytes:
    # Go's encoding/json writes map keys sorted and no spaces; so do we.
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _pss() -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=SALT_LENGTH)


def _pss_verify() -> padding.PSS:
    # go-jose verifies with rsa.PSSSaltLengthAuto: any salt length the signature encodes.
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.AUTO)


# --- sign and verify ------------------------------------------------------------------------


def sign(private_pem: bytes, claims: Mapping[str, Any]) -> str:
    """The compact JWS `header.payload.signature` of `claims`, signed PS256 with the key."""
    signing_input = f"{_b64encode(_compact_json(_HEADER))}.{_b64encode(_compact_json(claims))}"
    signature = _private_key(private_pem).sign(signing_input.encode(), _pss(), hashes.SHA256())
    return f"{signing_input}.{_b64encode(signature)}"


def _when(stamp: float) -> str:
    try:
        return datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return str(stamp)


def _numeric_date(claims: Mapping[str, Any], name: str, *, required: bool) -> float | None:
    value = claims.get(name)
    if value is None:
        if required:
            raise TokenError(f"malformed token: no {name} claim")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokenError(f"malformed token: the {name} claim is not a number: {value!r}")
    return float(value)


def verify(
    public_pem: bytes,
    token: str,
    *,
    issuer: str,
    now: float | None = None,
    leeway: float = TOKEN_LEEWAY_SECONDS,
) -> dict[str, Any]:
    """The claims of `token` once its signature, issuer and times check out; `TokenError` says
    why not. `now` defaults to the clock; times may be off by `leeway` seconds either way."""
    parts = token.strip().split(".")
    if len(parts) != 3:
        raise TokenError(
            f"malformed token: expected 3 dot-separated parts (header.payload.signature), "
            f"got {len(parts)}"
        )
    header_part, payload_part, signature_part = parts
    header = _json_object(header_part, "header")
    alg = header.get("alg")
    if alg != ALGORITHM:
        raise TokenError(f"token algorithm {alg!r} is not accepted: expected {ALGORITHM}")
    if "crit" in header:
        raise TokenError(f"token header names critical extensions we do not know: {header['crit']}")
    signature = _b64decode(signature_part, "signature")
    try:
        _public_key(public_pem).verify(
            signature, f"{header_part}.{payload_part}".encode(), _pss_verify(), hashes.SHA256()
        )
    except InvalidSignature:
        raise TokenError("token signature invalid") from None
    claims = _json_object(payload_part, "payload")
    if claims.get("iss") != issuer:
        raise TokenError(f"token issuer is {claims.get('iss')!r}, expected {issuer!r}")
    moment = time.time() if now is None else now
    expiry = _numeric_date(claims, "exp", required=True)
    not_before = _numeric_date(claims, "nbf", required=False)
    issued_at = _numeric_date(claims, "iat", required=False)
    if expiry is not None and moment - leeway > expiry:
        raise TokenError(f"token expired at {_when(expiry)}")
    if not_before is not None and moment + leeway < not_before:
        raise TokenError(f"token not valid before {_when(not_before)}")
    if issued_at is not None and moment + leeway < issued_at:
        raise TokenError(f"token issued in the future, at {_when(issued_at)}")
    return claims


# --- CDI's claims ---------------------------------------------------------------------------


def upload_token_claims(
    name: str, namespace: str, *, now: float, lifetime: int = UPLOAD_TOKEN_LIFETIME_SECONDS
) -> dict[str, Any]:
    """The claims of CDI's upload token for PVC `namespace/name`, issued at `now` (seconds)."""
    issued = int(now)
    return {
        "iss": ISSUER_APISERVER,
        "iat": issued,
        "nbf": issued,
        "exp": issued + lifetime,
        CLAIM_OPERATION: OPERATION_UPLOAD,
        CLAIM_NAME: name,
        CLAIM_NAMESPACE: namespace,
        CLAIM_RESOURCE: dict(PVC_RESOURCE),
    }


def is_upload_for(claims: Mapping[str, Any], name: str, namespace: str) -> bool:
    """Whether verified `claims` grant an upload into PVC `namespace/name`."""
    resource = claims.get(CLAIM_RESOURCE)
    return (
        claims.get(CLAIM_OPERATION) == OPERATION_UPLOAD
        and bool(name)
        and claims.get(CLAIM_NAME) == name
        and claims.get(CLAIM_NAMESPACE) == namespace
        and isinstance(resource, Mapping)
        and resource.get("group", "") == PVC_RESOURCE["group"]
        and resource.get("resource") == PVC_RESOURCE["resource"]
    )


__all__ = [
    "ALGORITHM",
    "PVC_RESOURCE",
    "TokenError",
    "generate_signing_key",
    "is_upload_for",
    "public_key_pem",
    "sign",
    "upload_token_claims",
    "verify",
]
