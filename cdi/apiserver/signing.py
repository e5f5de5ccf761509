"""The key that signs upload tokens: Secret `cdi-api-signing-key` in namespace `cdi`.

Shaped as CDI's keystore makes it (`pkg/keys`): `data.id_rsa` the RSA private key (PEM),
`data.id_rsa.pub` its public key (PEM), label `cdi.kubevirt.io: keystore`. It is created once,
when the API server first starts, and from then on only read: a Secret that is unreadable, or
whose two halves disagree, stops the server with a message saying so; nothing replaces it
silently, since every token in flight would stop verifying. Deleting the Secret on purpose makes
the next start create a new key.

`ensure_signing_key(store)` runs at `cdi server` start against the embedded server's store (any
object with the store's `list` and `create`); `load_public_key(client)` is for the upload proxy,
which is an API client like any other.
"""

from __future__ import annotations

import base64
import binascii
import logging
from typing import Any, Final, Protocol

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from cdi.api import groups
from cdi.api.annotations import LABEL_COMPONENT
from cdi.api.jwt import generate_signing_key, public_key_pem
from cdi.api.tokens import SIGNING_KEY_SECRET
from cdi.kube.client import Client

log = logging.getLogger(__name__)

DEFAULT_NAMESPACE: Final = "cdi"
PRIVATE_KEY_FIELD: Final = "id_rsa"
PUBLIC_KEY_FIELD: Final = "id_rsa.pub"
KEYSTORE_COMPONENT: Final = "keystore"
SECRETS: Final = "secrets"  # the store's key for Secrets (core group: the plural alone)


class SigningKeyError(Exception):
    """The signing key Secret exists but cannot be used; the message says what to do."""


class _Listed(Protocol):
    @property
    def items(self) -> list[dict[str, Any]]: ...


class SecretStore(Protocol):
    """What `ensure_signing_key` needs of `cdi.kubeapi.store.Store`."""

    def list(self, resource: str, namespace: str | None = None) -> _Listed: ...

    def create(
        self, resource: str, obj: dict[str, Any], *, status_subresource: bool = True
    ) -> dict[str, Any]: ...


def secret_manifest(private_pem: bytes, namespace: str = DEFAULT_NAMESPACE) -> dict[str, Any]:
    """The Secret holding `private_pem` and its public key, as CDI writes it."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": SIGNING_KEY_SECRET,
            "namespace": namespace,
            "labels": {LABEL_COMPONENT: KEYSTORE_COMPONENT},
        },
        "type": "Opaque",
        "data": {
            PRIVATE_KEY_FIELD: base64.b64encode(private_pem).decode("ascii"),
            PUBLIC_KEY_FIELD: base64.b64encode(public_key_pem(private_pem)).decode("ascii"),
        },
    }


def _where(namespace: str) -> str:
    return f"Secret {namespace}/{SIGNING_KEY_SECRET}"


def _field(secret: dict[str, Any], field: str, namespace: str) -> bytes | None:
    data = secret.get("data") or {}
    value = data.get(field) if isinstance(data, dict) else None
    if value is None:
        return None
    try:
        return base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError):
        raise SigningKeyError(f"{_where(namespace)}: data.{field} is not base64") from None


def _normalized_public(public_pem: bytes, namespace: str) -> bytes:
    try:
        key = serialization.load_pem_public_key(public_pem)
    except (ValueError, UnsupportedAlgorithm):
        raise SigningKeyError(
            f"{_where(namespace)}: data.{PUBLIC_KEY_FIELD} is not a PEM public key"
        ) from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise SigningKeyError(f"{_where(namespace)}: data.{PUBLIC_KEY_FIELD} is not an RSA key")
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def private_key_from_secret(secret: dict[str, Any], namespace: str = DEFAULT_NAMESPACE) -> bytes:
    """The private key PEM of the stored Secret, checked: an RSA key whose public half is the
    `id_rsa.pub` stored beside it (when there is one)."""
    private_pem = _field(secret, PRIVATE_KEY_FIELD, namespace)
    if private_pem is None:
        raise SigningKeyError(
            f"{_where(namespace)} has no data.{PRIVATE_KEY_FIELD}; delete the Secret to have a "
            "new signing key made at the next start (tokens already issued then stop working)"
        )
    try:
        derived = public_key_pem(private_pem)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise SigningKeyError(
            f"{_where(namespace)}: data.{PRIVATE_KEY_FIELD} is not a usable RSA private key ({err})"
        ) from None
    public_pem = _field(secret, PUBLIC_KEY_FIELD, namespace)
    if public_pem is not None and _normalized_public(public_pem, namespace) != derived:
        raise SigningKeyError(
            f"{_where(namespace)}: data.{PUBLIC_KEY_FIELD} is not the public key of "
            f"data.{PRIVATE_KEY_FIELD}; restore the Secret, or delete it to have a new key made"
        )
    return private_pem


def _stored(store: SecretStore, namespace: str) -> dict[str, Any] | None:
    for secret in store.list(SECRETS, namespace).items:
        if (secret.get("metadata") or {}).get("name") == SIGNING_KEY_SECRET:
            return secret
    return None


def ensure_signing_key(store: SecretStore, namespace: str = DEFAULT_NAMESPACE) -> bytes:
    """The private key PEM that signs tokens: the stored one, or a new one stored first.

    `SigningKeyError` when the Secret exists but is unusable (it is never overwritten)."""
    secret = _stored(store, namespace)
    if secret is not None:
        return private_key_from_secret(secret, namespace)
    private_pem = generate_signing_key()
    try:
        store.create(SECRETS, secret_manifest(private_pem, namespace), status_subresource=False)
    except Exception:
        # Someone stored one first (AlreadyExists): theirs wins, as CDI's keystore does.
        secret = _stored(store, namespace)
        if secret is None:
            raise
        return private_key_from_secret(secret, namespace)
    log.info("created signing key secret=%s/%s", namespace, SIGNING_KEY_SECRET)
    return private_pem


async def load_public_key(client: Client, namespace: str = DEFAULT_NAMESPACE) -> bytes:
    """The public key PEM that verifies tokens, read from the Secret through the API.

    `id_rsa.pub`, or derived from `id_rsa` when only that is there. API errors (NotFound,
    Forbidden) come as `cdi.kube.errors`; a Secret without a usable key is `SigningKeyError`."""
    secret = await client.get(groups.SECRET, SIGNING_KEY_SECRET, namespace)
    public_pem = _field(secret, PUBLIC_KEY_FIELD, namespace)
    if public_pem is not None:
        return _normalized_public(public_pem, namespace)
    return public_key_pem(private_key_from_secret(secret, namespace))


__all__ = [
    "DEFAULT_NAMESPACE",
    "PRIVATE_KEY_FIELD",
    "PUBLIC_KEY_FIELD",
    "SecretStore",
    "SigningKeyError",
    "ensure_signing_key",
    "load_public_key",
    "private_key_from_secret",
    "secret_manifest",
]
