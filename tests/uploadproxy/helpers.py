"""Test doubles around the upload proxy: a small PKI and an upload server stand-in (`Sink`).

`Pki` makes, with `cryptography` (ECDSA P-256, quick): the upload servers' CA and a server
certificate for given DNS names, the client CA and the proxy's client certificate (CN
`client.upload-server.cdi.kubevirt.io`), and a certificate for the proxy's own HTTPS.

`Sink` is an aiohttp HTTPS server on 127.0.0.1 (port 0) that wants a client certificate from the
client CA (CERT_REQUIRED) with the right CN (else 401, as the upload server answers), and records
each request: method, path, query, headers, body size and sha256 of the body streamed through.
What it answers is set per test with `answer(...)`: status, body, headers, or to answer without
reading the body.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from multidict import CIMultiDict

from cdi.api.tokens import UPLOAD_CLIENT_NAME

HOST = "127.0.0.1"


@dataclass(frozen=True)
class KeyPair:
    cert: bytes
    key: bytes

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        cert, key = directory / f"{stem}.crt", directory / f"{stem}.key"
        cert.write_bytes(self.cert)
        key.write_bytes(self.key)
        key.chmod(0o600)
        return cert, key


@dataclass(frozen=True)
class CA:
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str) -> CA:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = _name(name)
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self, common_name: str, *, dns_names: Sequence[str] = (), client: bool = False
    ) -> KeyPair:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if dns_names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), False
            )
        cert = builder.sign(self.key, hashes.SHA256())
        return KeyPair(
            cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


#: The upload server names the tests use: the Service names of their PVCs' upload pods.
UPSTREAM_NAMES = ("*.default.svc", "*.n1.svc", "*.n2.svc")


@dataclass(frozen=True)
class Pki:
    server_ca: CA
    client_ca: CA
    upstream: KeyPair
    client: KeyPair

    @classmethod
    def create(cls, names: Sequence[str] = UPSTREAM_NAMES) -> Pki:
        server_ca = CA.create("cdi-uploadserver-signer")
        client_ca = CA.create("cdi-uploadserver-client-signer")
        return cls(
            server_ca,
            client_ca,
            server_ca.issue(names[0], dns_names=names),
            client_ca.issue(UPLOAD_CLIENT_NAME, client=True),
        )


@dataclass
class Recorded:
    method: str
    path: str
    query: str
    headers: CIMultiDict[str]
    size: int
    sha256: str
    client_cn: str


@dataclass
class Answer:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    read_body: bool = True
    cut_after: int | None = None
    """Send this many bytes of `body` (announced whole), then drop the connection."""
    before_continue: bool = False
    """Answer a request that says `Expect: 100-continue` at once, instead of `100 Continue`:
    what an upload server that refuses (busy, finished) does before reading the body."""


class Sink:
    """The upload server stand-in (see the module doc)."""

    def __init__(self, pki: Pki, *, client_name: str = UPLOAD_CLIENT_NAME) -> None:
        self.pki = pki
        self.client_name = client_name
        self.requests: list[Recorded] = []
        self.default = Answer()
        self.answers: dict[str, Answer] = {}
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._directory: Path | None = None

    def answer(self, path: str | None = None, **kwargs: Any) -> None:
        """How to answer `path` (None: every path without its own answer)."""
        if path is None:
            self.default = Answer(**kwargs)
        else:
            self.answers[path] = Answer(**kwargs)

    def ssl_context(self, directory: Path) -> ssl.SSLContext:
        context = ssl.create_default_context(
            ssl.Purpose.CLIENT_AUTH, cadata=self.pki.client_ca.pem.decode()
        )
        context.verify_mode = ssl.CERT_REQUIRED
        cert, key = self.pki.upstream.write(directory, "upstream")
        context.load_cert_chain(cert, key)
        return context

    async def handle(self, request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        cn = ""
        for rdn in (peer or {}).get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    cn = value
        answer = self.answers.get(request.path, self.default)
        digest = hashlib.sha256()
        size = 0
        if answer.read_body and cn == self.client_name:
            async for chunk in request.content.iter_chunked(1 << 20):
                digest.update(chunk)
                size += len(chunk)
        self.requests.append(
            Recorded(
                request.method,
                request.path,
                request.rel_url.raw_query_string,
                CIMultiDict(request.headers),
                size,
                digest.hexdigest(),
                cn,
            )
        )
        if cn != self.client_name:
            return web.Response(status=401, text=f"client certificate CN {cn!r} not accepted")
        if answer.cut_after is not None:
            response = web.StreamResponse(status=answer.status, headers=answer.headers)
            response.content_length = len(answer.body)
            await response.prepare(request)
            await response.write(answer.body[: answer.cut_after])
            if request.transport is not None:
                request.transport.close()
            return response
        return web.Response(status=answer.status, body=answer.body, headers=answer.headers)

    async def expect(self, request: web.Request) -> web.StreamResponse | None:
        answer = self.answers.get(request.path, self.default)
        if not answer.before_continue:
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            return None
        self.requests.append(
            Recorded(
                request.method,
                request.path,
                request.rel_url.raw_query_string,
                CIMultiDict(request.headers),
                0,
                hashlib.sha256().hexdigest(),
                "",
            )
        )
        return web.Response(status=answer.status, body=answer.body, headers=answer.headers)

    async def start(self, directory: Path, port: int = 0) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle, expect_handler=self.expect)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, HOST, port, ssl_context=self.ssl_context(directory))
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


async def wait_for(predicate: Any, within: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)
