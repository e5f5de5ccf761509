"""`cdi-uploadproxy`'s command line and its server certificate reloading."""

from __future__ import annotations

import argparse
import asyncio
import ssl
from pathlib import Path

import pytest

from cdi.api import jwt
from tests.uploadproxy.helpers import CA, HOST
from uploadproxy import main as proxy_main
from uploadproxy.settings import ProxySettings, ResolveMode


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0.0.0.0:8443", ("0.0.0.0", 8443)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("[::1]:8443", ("::1", 8443)),
        (":9000", ("0.0.0.0", 9000)),
    ],
)
def test_listen_addresses(value: str, expected: tuple[str, int]) -> None:
    assert proxy_main.parse_listen(value) == expected


@pytest.mark.parametrize("value", ["8443", "host:", "host:port", "host:70000"])
def test_bad_listen_addresses(value: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        proxy_main.parse_listen(value)


def test_settings_from_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    public = jwt.public_key_pem(jwt.generate_signing_key())
    monkeypatch.setenv("APISERVER_PUBLIC_KEY", public.decode())
    args = proxy_main.build_parser().parse_args(
        [
            "--tls-cert",
            "c",
            "--tls-key",
            "k",
            "--resolve",
            "pod-ip",
            "--namespace",
            "other",
            "--upstream-port",
            "9443",
            "--ready-wait",
            "3",
            "--ready-poll",
            "0.5",
        ]
    )
    settings = proxy_main.settings_from_args(args)
    assert settings == ProxySettings(
        namespace="other",
        resolve=ResolveMode.POD_IP,
        upstream_port=9443,
        ready_wait=3,
        ready_poll=0.5,
        public_key=public,
    )
    key_file = tmp_path / "key.pub"
    key_file.write_bytes(b"from the file")
    args = proxy_main.build_parser().parse_args(
        ["--tls-cert", "c", "--tls-key", "k", "--public-key-file", str(key_file)]
    )
    settings = proxy_main.settings_from_args(args)
    assert settings.public_key == b"from the file"
    assert settings.resolve is ResolveMode.SERVICE
    assert "from the file" not in repr(settings)


def test_unusable_certificate_files_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = proxy_main.main(
        [
            "--tls-cert",
            str(tmp_path / "missing.crt"),
            "--tls-key",
            str(tmp_path / "x.key"),
            "--kubeconfig",
            str(tmp_path / "kubeconfig"),
        ]
    )
    assert code == 2
    assert "cdi-uploadproxy:" in capsys.readouterr().err


def test_bad_settings_are_refused() -> None:
    for bad in ({"upstream_port": 0}, {"ready_poll": 0}, {"namespace": ""}, {"chunk_size": 1}):
        with pytest.raises(ValueError):
            ProxySettings(**bad)  # type: ignore[arg-type]


async def test_server_certificate_is_reloaded_when_its_files_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(proxy_main, "CERT_CHECK_INTERVAL", 0.0)
    ca = CA.create("test")
    cert, key = ca.issue("first", dns_names=["localhost"]).write(tmp_path, "server")
    tls = proxy_main.ServerTLS(cert, key)

    async def close(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(close, HOST, 0, ssl=tls.context)
    port = server.sockets[0].getsockname()[1]
    client = ssl.create_default_context(cadata=ca.pem.decode())
    client.check_hostname = False

    async def served_name(sni: str) -> str:
        # server_hostname "" sends no SNI, as a client connecting to an IP address does.
        _, writer = await asyncio.open_connection(HOST, port, ssl=client, server_hostname=sni)
        subject = writer.get_extra_info("peercert")["subject"]
        writer.close()
        return str(dict(rdn[0] for rdn in subject)["commonName"])

    try:
        assert await served_name("localhost") == "first"
        ca.issue("second", dns_names=["localhost"]).write(tmp_path, "server")
        assert await served_name("localhost") == "second"
        # Clients that send no SNI (an IP address) get the new one too.
        ca.issue("third", dns_names=["localhost"]).write(tmp_path, "server")
        assert await served_name("") == "third"
        # A broken pair is not taken: the last good certificate stays.
        (tmp_path / "server.key").write_text("garbage")
        assert await served_name("localhost") == "third"
    finally:
        server.close()
        await server.wait_closed()
