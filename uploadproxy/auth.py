"""Who may upload where: the bearer token of an upload request (reference §6.3, §6.5).

In CDI's order: no `Authorization` header → 400; a header that is not `Bearer <token>` → 400;
a token whose signature, issuer (`cdi-apiserver`) or times (10 s leeway) do not check out → 401
with the reason as the body; claims that do not grant an upload into a named PVC → 400. What
passes is an `UploadClaim`: the PVC the token names, the only one the request can reach.

The verification key is CDI's `APISERVER_PUBLIC_KEY` when given, else `id_rsa.pub` of the
Secret `cdi-api-signing-key` in CDI's namespace, read through the API, cached, and read again
(at most every `reload_interval` seconds) when a signature does not verify, so a re-made key
is picked up without a restart. Tokens are never logged.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from cryptography.exceptions import UnsupportedAlgorithm

from cdi.api import jwt
from cdi.api.groups import SECRET
from cdi.api.tokens import (
    CLAIM_NAME,
    CLAIM_NAMESPACE,
    CLAIM_OPERATION,
    CLAIM_RESOURCE,
    ISSUER_APISERVER,
    OPERATION_UPLOAD,
    SIGNING_KEY_SECRET,
)
from cdi.kube.client import Client
from cdi.kube.errors import ApiError
from uploadproxy.errors import Rejection
from uploadproxy.settings import ProxySettings

log = logging.getLogger(__name__)

PUBLIC_KEY_FIELD: Final = "id_rsa.pub"
PRIVATE_KEY_FIELD: Final = "id_rsa"
PVC_RESOURCE: Final = "persistentvolumeclaims"

# CDI's authHeaderMatcher, `(?i)^Bearer\s+([A-Za-z0-9\-\._~\+\/]+)$`, for the whole value
# (fullmatch: Python's `$` would also match before a trailing newline; Go's does not).
_BEARER: Final = re.compile(r"Bearer\s+([A-Za-z0-9\-\._~\+\/]+)", re.IGNORECASE | re.ASCII)


@dataclass(frozen=True, slots=True)
class UploadClaim:
    """The PVC a verified upload token names."""

    name: str
    namespace: str


def bearer_token(header: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` value; 400 (empty body) otherwise."""
    if not header:
        raise Rejection(400)
    match = _BEARER.fullmatch(header)
    if match is None:
        raise Rejection(400)
    return match.group(1)


def upload_claim(claims: Mapping[str, Any]) -> UploadClaim:
    """The PVC verified `claims` grant an upload into; 400 when they are not an upload token
    (CDI's test: operation Upload, a name, a namespace, resource persistentvolumeclaims)."""
    name, namespace = claims.get(CLAIM_NAME), claims.get(CLAIM_NAMESPACE)
    resource = claims.get(CLAIM_RESOURCE)
    if (
        claims.get(CLAIM_OPERATION) != OPERATION_UPLOAD
        or not isinstance(name, str)
        or not name
        or not isinstance(namespace, str)
        or not namespace
        or not isinstance(resource, Mapping)
        or resource.get("resource") != PVC_RESOURCE
    ):
        log.warning(
            "token is not an upload token operation=%r resource=%r",
            claims.get(CLAIM_OPERATION),
            resource,
        )
        raise Rejection(400)
    return UploadClaim(name, namespace)


def _secret_field(secret: Mapping[str, Any], field: str) -> bytes | None:
    data = secret.get("data") or {}
    value = data.get(field)
    if not value:
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None


class TokenVerifier:
    """Checks upload tokens against the API server's public key."""

    def __init__(self, settings: ProxySettings, client: Client) -> None:
        self._settings = settings
        self._client = client
        self._key: bytes | None = settings.public_key
        self._loaded_at = time.monotonic() if self._key else float("-inf")
        self._lock = asyncio.Lock()

    async def claim(self, header: str | None, *, now: float | None = None) -> UploadClaim:
        """The PVC the request's `Authorization` header grants an upload into (else a
        `Rejection`: 400, 401, or 503 when the key cannot be read)."""
        token = bearer_token(header)
        return upload_claim(await self.verify(token, now=now))

    async def verify(self, token: str, *, now: float | None = None) -> dict[str, Any]:
        key = await self._public_key()
        try:
            return self._verify(key, token, now)
        except jwt.TokenError as err:
            if "signature" not in str(err) or not await self._reload(key):
                raise Rejection(401, str(err)) from None
        # The key was re-read and differs: the Secret was re-made since we cached it.
        try:
            return self._verify(await self._public_key(), token, now)
        except jwt.TokenError as err:
            raise Rejection(401, str(err)) from None

    def _verify(self, key: bytes, token: str, now: float | None) -> dict[str, Any]:
        try:
            return jwt.verify(
                key, token, issuer=ISSUER_APISERVER, now=now, leeway=self._settings.token_leeway
            )
        except (ValueError, UnsupportedAlgorithm) as err:  # not an RSA public key
            raise Rejection(503, f"error in upload-proxy: unusable token key: {err}") from None

    async def _public_key(self) -> bytes:
        if self._key is not None:
            return self._key
        async with self._lock:
            if self._key is None:
                self._key = await self._read_key()
                self._loaded_at = time.monotonic()
            return self._key

    async def _reload(self, used: bytes) -> bool:
        """Re-read the key from the Secret (not when it was given, nor too often); whether it
        changed from `used`."""
        if self._settings.public_key is not None:
            return False
        async with self._lock:
            if self._key is not None and self._key != used:
                return True  # another request re-read it meanwhile
            if time.monotonic() - self._loaded_at < self._settings.reload_interval:
                return False
            self._loaded_at = time.monotonic()
            try:
                key = await self._read_key()
            except Rejection as err:
                log.warning("cannot re-read the token signing key: %s", err.text)
                return False
            changed = key != used
            self._key = key
            if changed:
                log.info("token signing key changed; using the new one")
            return changed

    async def _read_key(self) -> bytes:
        namespace = self._settings.namespace
        where = f"Secret {namespace}/{SIGNING_KEY_SECRET}"
        try:
            secret = await self._client.get(SECRET, SIGNING_KEY_SECRET, namespace)
        except ApiError as err:
            raise Rejection(
                503, f"error in upload-proxy: cannot read the token signing key {where}: {err}"
            ) from None
        public = _secret_field(secret, PUBLIC_KEY_FIELD)
        if public is not None:
            return public
        private = _secret_field(secret, PRIVATE_KEY_FIELD)
        if private is not None:
            try:
                return jwt.public_key_pem(private)
            except (ValueError, UnsupportedAlgorithm) as err:
                raise Rejection(
                    503, f"error in upload-proxy: {where} holds no usable key: {err}"
                ) from None
        raise Rejection(
            503,
            f"error in upload-proxy: {where} has neither {PUBLIC_KEY_FIELD} nor "
            f"{PRIVATE_KEY_FIELD}",
        )
