"""cdi.api.jwt: PS256 compact JWS as CDI's go-jose makes and checks them (reference §6.3).

The interop cases build and check tokens with `cryptography` primitives written out here, so
they do not share a code path with the module under test."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from cdi.api import jwt, tokens

NOW = 1_700_000_000.0
ISSUER = tokens.ISSUER_APISERVER


@pytest.fixture(scope="module")
def private_pem() -> bytes:
    return jwt.generate_signing_key()


@pytest.fixture(scope="module")
def public_pem(private_pem: bytes) -> bytes:
    return jwt.public_key_pem(private_pem)


@pytest.fixture(scope="module")
def other_private_pem() -> bytes:
    return jwt.generate_signing_key()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def claims(**overrides: Any) -> dict[str, Any]:
    return {**jwt.upload_token_claims("disk", "ns1", now=NOW), **overrides}


def forge(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    return (
        f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}.{b64(signature)}"
    )


def independent_sign(private_pem: bytes, payload: dict[str, Any], *, salt: int) -> str:
    """A PS256 JWT made without cdi.api.jwt: cryptography's RSA-PSS over SHA-256."""
    key = serialization.load_pem_private_key(private_pem, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    signing_input = (
        f"{b64(json.dumps({'alg': 'PS256'}).encode())}.{b64(json.dumps(payload).encode())}"
    )
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=salt)
    signature = key.sign(signing_input.encode(), pss, hashes.SHA256())
    return f"{signing_input}.{b64(signature)}"


def verify(public_pem: bytes, token: str, **kwargs: Any) -> dict[str, Any]:
    return jwt.verify(public_pem, token, **{"issuer": ISSUER, "now": NOW, **kwargs})


def rejected(public_pem: bytes, token: str, **kwargs: Any) -> str:
    with pytest.raises(jwt.TokenError) as info:
        verify(public_pem, token, **kwargs)
    return str(info.value)


# --- the format ---------------------------------------------------------------------------


def test_round_trip(private_pem: bytes, public_pem: bytes) -> None:
    token = jwt.sign(private_pem, claims())
    assert verify(public_pem, token) == claims()


def test_keys_are_rsa_2048_pkcs8_pem(private_pem: bytes, public_pem: bytes) -> None:
    assert private_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public_pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    key = serialization.load_pem_private_key(private_pem, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    assert key.key_size == 2048


def test_token_is_compact_ps256_jws_without_padding(private_pem: bytes) -> None:
    token = jwt.sign(private_pem, claims())
    header, payload, signature = token.split(".")
    assert "=" not in token
    assert json.loads(unb64(header)) == {"alg": "PS256", "typ": "JWT"}
    assert json.loads(unb64(payload)) == claims()
    assert len(unb64(signature)) == 256  # one RSA 2048 block


def test_an_independent_verifier_accepts_our_tokens_with_a_32_byte_salt(
    private_pem: bytes, public_pem: bytes
) -> None:
    token = jwt.sign(private_pem, claims())
    header, payload, signature = token.split(".")
    key = serialization.load_pem_public_key(public_pem)
    assert isinstance(key, rsa.RSAPublicKey)
    # salt_length=32 exactly (go-jose signs with PSSSaltLengthEqualsHash): raises if not.
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    key.verify(unb64(signature), f"{header}.{payload}".encode(), pss, hashes.SHA256())


@pytest.mark.parametrize("salt", [32, padding.PSS.MAX_LENGTH], ids=["equals-hash", "max"])
def test_we_accept_independently_signed_tokens(
    private_pem: bytes, public_pem: bytes, salt: int
) -> None:
    # go-jose verifies with PSSSaltLengthAuto, so any salt length a signer chose passes.
    token = independent_sign(private_pem, claims(), salt=salt)
    assert verify(public_pem, token) == claims()


def test_a_pkcs1_private_key_as_cdi_stores_it_signs_too(private_pem: bytes) -> None:
    key = serialization.load_pem_private_key(private_pem, password=None)
    pkcs1 = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    assert pkcs1.startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    assert jwt.public_key_pem(pkcs1) == jwt.public_key_pem(private_pem)
    assert verify(jwt.public_key_pem(pkcs1), jwt.sign(pkcs1, claims())) == claims()


# --- signatures ---------------------------------------------------------------------------


def test_a_tampered_payload_is_rejected(private_pem: bytes, public_pem: bytes) -> None:
    header, _, signature = jwt.sign(private_pem, claims()).split(".")
    payload = b64(json.dumps(claims(name="someone-elses-disk")).encode())
    assert rejected(public_pem, f"{header}.{payload}.{signature}") == "token signature invalid"


def test_a_tampered_signature_is_rejected(private_pem: bytes, public_pem: bytes) -> None:
    header, payload, signature = jwt.sign(private_pem, claims()).split(".")
    raw = bytearray(unb64(signature))
    raw[10] ^= 0x01
    assert rejected(public_pem, f"{header}.{payload}.{b64(bytes(raw))}") == (
        "token signature invalid"
    )
    assert rejected(public_pem, f"{header}.{payload}.") == "token signature invalid"


def test_a_token_of_another_key_is_rejected(other_private_pem: bytes, public_pem: bytes) -> None:
    token = jwt.sign(other_private_pem, claims())
    assert rejected(public_pem, token) == "token signature invalid"


def test_alg_none_is_rejected(public_pem: bytes) -> None:
    token = forge({"alg": "none", "typ": "JWT"}, claims())
    assert rejected(public_pem, token) == "token algorithm 'none' is not accepted: expected PS256"


def test_hs256_keyed_with_the_public_key_is_rejected(public_pem: bytes) -> None:
    # The classic confusion: an HMAC whose secret is the (public) verification key.
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64(json.dumps(claims()).encode())
    mac = hmac.new(public_pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    message = rejected(public_pem, f"{header}.{payload}.{b64(mac)}")
    assert message == "token algorithm 'HS256' is not accepted: expected PS256"


def test_rs256_and_a_missing_alg_are_rejected(private_pem: bytes, public_pem: bytes) -> None:
    _, payload, signature = jwt.sign(private_pem, claims()).split(".")
    for header in ({"alg": "RS256"}, {"typ": "JWT"}):
        token = f"{b64(json.dumps(header).encode())}.{payload}.{signature}"
        assert "is not accepted: expected PS256" in rejected(public_pem, token)


def test_unknown_critical_header_is_rejected(private_pem: bytes, public_pem: bytes) -> None:
    token = forge({"alg": "PS256", "crit": ["exp-v2"], "exp-v2": 1}, claims())
    assert "critical extensions" in rejected(public_pem, token)


# --- claims -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds_past", "leeway", "ok"),
    [
        (0, 10, True),
        (9, 10, True),
        (10, 10, True),
        (11, 10, False),
        (1, 0, False),
        (600, 10, False),
    ],
)
def test_expiry_with_leeway(
    private_pem: bytes, public_pem: bytes, seconds_past: int, leeway: float, ok: bool
) -> None:
    token = jwt.sign(private_pem, claims(exp=int(NOW)))
    if ok:
        assert verify(public_pem, token, now=NOW + seconds_past, leeway=leeway)["exp"] == NOW
    else:
        message = rejected(public_pem, token, now=NOW + seconds_past, leeway=leeway)
        assert message == "token expired at 2023-11-14T22:13:20Z"


def test_the_default_leeway_is_cdis_ten_seconds(private_pem: bytes, public_pem: bytes) -> None:
    token = jwt.sign(private_pem, claims(exp=int(NOW)))
    jwt.verify(public_pem, token, issuer=ISSUER, now=NOW + 9)
    with pytest.raises(jwt.TokenError, match="expired"):
        jwt.verify(public_pem, token, issuer=ISSUER, now=NOW + 11)


def test_upload_tokens_live_five_minutes(private_pem: bytes, public_pem: bytes) -> None:
    token = jwt.sign(private_pem, claims())
    verify(public_pem, token, now=NOW + 300)
    assert "expired" in rejected(public_pem, token, now=NOW + 311)


def test_not_before_in_the_future(private_pem: bytes, public_pem: bytes) -> None:
    token = jwt.sign(private_pem, claims(nbf=int(NOW) + 60, iat=int(NOW)))
    assert rejected(public_pem, token) == "token not valid before 2023-11-14T22:14:20Z"
    assert verify(public_pem, token, now=NOW + 55)["nbf"] == NOW + 60  # within the leeway


def test_issued_in_the_future(private_pem: bytes, public_pem: bytes) -> None:
    token = jwt.sign(private_pem, claims(iat=int(NOW) + 60, nbf=int(NOW)))
    assert "token issued in the future" in rejected(public_pem, token)


def test_wrong_issuer(private_pem: bytes, public_pem: bytes) -> None:
    token = jwt.sign(private_pem, claims(iss="cdi-deployment"))
    assert rejected(public_pem, token) == (
        "token issuer is 'cdi-deployment', expected 'cdi-apiserver'"
    )
    no_issuer = {k: v for k, v in claims().items() if k != "iss"}
    assert "token issuer is None" in rejected(public_pem, jwt.sign(private_pem, no_issuer))


def test_a_token_without_expiry_is_refused(private_pem: bytes, public_pem: bytes) -> None:
    forever = {k: v for k, v in claims().items() if k != "exp"}
    assert rejected(public_pem, jwt.sign(private_pem, forever)) == "malformed token: no exp claim"


def test_a_time_claim_that_is_not_a_number(private_pem: bytes, public_pem: bytes) -> None:
    for bad in ("soon", True, [1]):
        token = jwt.sign(private_pem, claims(exp=bad))
        assert "the exp claim is not a number" in rejected(public_pem, token)


# --- malformed ----------------------------------------------------------------------------


def test_wrong_number_of_parts(private_pem: bytes, public_pem: bytes) -> None:
    header, payload, signature = jwt.sign(private_pem, claims()).split(".")
    assert rejected(public_pem, f"{header}.{payload}") == (
        "malformed token: expected 3 dot-separated parts (header.payload.signature), got 2"
    )
    assert "got 4" in rejected(public_pem, f"{header}.{payload}.{signature}.x")
    assert "got 1" in rejected(public_pem, "")


@pytest.mark.parametrize("bad", ["!!!!", "ab+c", "ab/c", "abc=", "a"])
def test_bad_base64(private_pem: bytes, public_pem: bytes, bad: str) -> None:
    header, payload, signature = jwt.sign(private_pem, claims()).split(".")
    assert rejected(public_pem, f"{bad}.{payload}.{signature}") == (
        "malformed token: the header is not base64url"
    )
    assert rejected(public_pem, f"{header}.{payload}.{bad}") == (
        "malformed token: the signature is not base64url"
    )


def test_bad_json(private_pem: bytes, public_pem: bytes) -> None:
    _, payload, signature = jwt.sign(private_pem, claims()).split(".")
    assert rejected(public_pem, f"{b64(b'{not json')}.{payload}.{signature}") == (
        "malformed token: the header is not JSON"
    )
    assert rejected(public_pem, f"{b64(b'[1, 2]')}.{payload}.{signature}") == (
        "malformed token: the header is not a JSON object"
    )
    assert rejected(public_pem, f"{b64(bytes([0xFF, 0xFE]))}.{payload}.{signature}") == (
        "malformed token: the header is not JSON"
    )


def test_a_validly_signed_payload_that_is_not_json(private_pem: bytes, public_pem: bytes) -> None:
    key = serialization.load_pem_private_key(private_pem, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    signing_input = f"{b64(json.dumps({'alg': 'PS256'}).encode())}.{b64(b'not json')}"
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    signature = key.sign(signing_input.encode(), pss, hashes.SHA256())
    token = f"{signing_input}.{b64(signature)}"
    assert rejected(public_pem, token) == "malformed token: the payload is not JSON"


def test_a_key_that_is_not_rsa_is_a_caller_error(private_pem: bytes) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415

    ec_pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ValueError, match="not an RSA key"):
        jwt.verify(ec_pem, jwt.sign(private_pem, claims()), issuer=ISSUER, now=NOW)


# --- CDI's upload claims ------------------------------------------------------------------


def test_upload_token_claims_are_cdis() -> None:
    assert jwt.upload_token_claims("disk", "ns1", now=NOW + 0.7) == {
        "iss": "cdi-apiserver",
        "iat": 1_700_000_000,
        "nbf": 1_700_000_000,
        "exp": 1_700_000_300,
        "operation": "Upload",
        "name": "disk",
        "namespace": "ns1",
        "resource": {"group": "", "version": "v1", "resource": "persistentvolumeclaims"},
    }
    assert jwt.upload_token_claims("d", "n", now=NOW, lifetime=60)["exp"] == NOW + 60


def test_is_upload_for() -> None:
    good = claims()
    assert jwt.is_upload_for(good, "disk", "ns1")
    assert not jwt.is_upload_for(good, "disk", "ns2")
    assert not jwt.is_upload_for(good, "other", "ns1")
    assert not jwt.is_upload_for(claims(operation="Clone"), "disk", "ns1")
    assert not jwt.is_upload_for(
        claims(resource={"group": "snapshot.storage.k8s.io", "resource": "volumesnapshots"}),
        "disk",
        "ns1",
    )
    assert not jwt.is_upload_for(claims(resource="persistentvolumeclaims"), "disk", "ns1")
    assert not jwt.is_upload_for(claims(name=""), "", "ns1")


def test_upload_token_lifetime_is_configurable() -> None:
    from cdi.apiserver import uploadtoken  # noqa: PLC0415

    key = jwt.generate_signing_key()
    obj = {"metadata": {"name": "t"}, "spec": {"pvcName": "disk"}}
    answer = uploadtoken.issue(obj, "ns", key, now=1000.0, lifetime=3600)
    claims = jwt.verify(
        jwt.public_key_pem(key), answer["status"]["token"], issuer="cdi-apiserver", now=4500.0
    )
    assert claims["exp"] - claims["iat"] == 3600
    default = uploadtoken.issue(obj, "ns", key, now=1000.0)
    claims = jwt.verify(
        jwt.public_key_pem(key), default["status"]["token"], issuer="cdi-apiserver", now=1200.0
    )
    assert claims["exp"] - claims["iat"] == 300
