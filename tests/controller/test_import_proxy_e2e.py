"""CDIConfig importProxy end to end: the proxy's CA ConfigMap in the CDI namespace is copied next
to the import (`import-proxy-cm-<pvc>`), mounted at /proxycerts/ and trusted by the importer; the
copy goes away with the import, and an import waits while the CA ConfigMap is missing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cdi.api.groups import CDI_CONFIG, CDI_CONFIG_NAME, CONFIG_MAP, DATA_VOLUME
from cdi.kube.client import Client
from cdi.kube.errors import NotFound
from tests.support.cluster import Cluster, eventually
from tests.support.dv import NS, conditions, disk_of, dv_in, http_dv, no_pods
from tests.support.httpserver import BadServer
from tests.support.images import MIB, convert, patterned_raw, same_image

COPY = "import-proxy-cm-{}"


async def _trust_proxy_ca(client: Client, name: str) -> None:
    async def probe() -> dict[str, Any] | None:
        try:
            config = await client.get(CDI_CONFIG, CDI_CONFIG_NAME)
        except NotFound:
            return None
        return config if config.get("status") else None

    config = await eventually(probe, within=10.0, what="CDIConfig")
    config["spec"]["importProxy"] = {"trustedCAProxy": name}
    await client.replace(CDI_CONFIG, config)

    async def applied() -> bool:
        config = await client.get(CDI_CONFIG, CDI_CONFIG_NAME)
        proxy = (config.get("status") or {}).get("importProxy") or {}
        return proxy.get("trustedCAProxy") == name

    await eventually(applied, within=10.0, what="importProxy in the CDIConfig status")


def _ca_pem(server: BadServer) -> str:
    assert server.ca_file
    return Path(server.ca_file).read_text()


async def _exists(client: Client, name: str) -> bool:
    try:
        await client.get(CONFIG_MAP, name, NS)
    except NotFound:
        return False
    return True


async def test_proxy_ca_is_copied_trusted_and_removed(stack: Cluster, tmp_path: Path) -> None:
    client = stack.client
    raw = patterned_raw(tmp_path / "disk.raw", 4 * MIB)
    www = tmp_path / "www"
    www.mkdir()
    convert(raw, www / "disk.qcow2", "qcow2")
    with BadServer(www, tls=True) as server:
        assert server.ca_file
        await _trust_proxy_ca(client, "proxy-ca")
        # The only copy of the server's CA is the proxy's: without the copy TLS fails.
        dv = http_dv("behind-proxy", server.url("/disk.qcow2"))
        await client.create(
            CONFIG_MAP,
            {
                "metadata": {"name": "proxy-ca", "namespace": "cdi"},
                "data": {"ca.crt": _ca_pem(server)},
            },
        )
        await client.create(DATA_VOLUME, dv)

        async def copied() -> bool:
            return await _exists(client, COPY.format("behind-proxy"))

        await eventually(copied, within=20.0, what="the proxy CA copy")
        done = await dv_in(client, "behind-proxy", "Succeeded", "Failed")
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert same_image(raw, await disk_of(client, "behind-proxy"))

    async def removed() -> bool:
        return not await _exists(client, COPY.format("behind-proxy")) and await no_pods(client)

    await eventually(removed, within=10.0, what="the copy and the pod removed")


async def test_missing_proxy_ca_waits_then_proceeds(stack: Cluster, tmp_path: Path) -> None:
    client = stack.client
    raw = patterned_raw(tmp_path / "disk.raw", 2 * MIB)
    www = tmp_path / "www"
    www.mkdir()
    convert(raw, www / "disk.qcow2", "qcow2")
    with BadServer(www, tls=True) as server:
        assert server.ca_file
        await _trust_proxy_ca(client, "late-ca")
        await client.create(DATA_VOLUME, http_dv("waits", server.url("/disk.qcow2")))

        async def waiting() -> dict[str, Any] | None:
            dv = await dv_in(client, "waits", "ImportScheduled", "ImportInProgress", "Failed")
            running = conditions(dv).get("Running") or {}
            return dv if COPY.format("waits") in str(running.get("message")) else None

        dv = await eventually(waiting, within=20.0, what="the DV waiting for the CA copy")
        assert dv["status"]["phase"] == "ImportScheduled"
        await client.create(
            CONFIG_MAP,
            {
                "metadata": {"name": "late-ca", "namespace": "cdi"},
                "data": {"ca.crt": _ca_pem(server)},
            },
        )
        done = await dv_in(client, "waits", "Succeeded", "Failed")
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert same_image(raw, await disk_of(client, "waits"))
