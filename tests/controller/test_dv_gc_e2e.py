"""Deleting a DataVolume mid-import removes its PVC, pod and volume data; opt-in DataVolume
garbage collection (CDIConfig spec.dataVolumeTTLSeconds): off by default, a
Succeeded DV is deleted after the TTL with its PVC kept and its data intact, and a DV annotated
`storage.deleteAfterCompletion: "false"` stays."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from cdi.api import annotations as ann
from cdi.api.groups import CDI_CONFIG, CDI_CONFIG_NAME, DATA_VOLUME, PERSISTENT_VOLUME_CLAIM
from cdi.kube.client import Client
from cdi.kube.errors import NotFound
from tests.support.cluster import Cluster, eventually
from tests.support.dv import NS, blank_dv, dv_in, http_dv, no_pods, volume_of
from tests.support.httpserver import BadServer
from tests.support.images import MIB, convert, patterned_raw


async def _set_ttl(client: Client, ttl: int) -> None:
    async def probe() -> dict[str, Any] | None:
        try:
            return await client.get(CDI_CONFIG, CDI_CONFIG_NAME)
        except NotFound:
            return None

    config = await eventually(probe, within=10.0, what="CDIConfig")
    config["spec"]["dataVolumeTTLSeconds"] = ttl
    await client.replace(CDI_CONFIG, config)


async def _dv_gone(client: Client, name: str) -> bool:
    try:
        await client.get(DATA_VOLUME, name, NS)
    except NotFound:
        return True
    return False


async def test_succeeded_dvs_are_kept_by_default(stack: Cluster) -> None:
    client = stack.client
    await client.create(DATA_VOLUME, blank_dv("kept"))
    await dv_in(client, "kept", "Succeeded")
    await asyncio.sleep(2.0)
    assert not await _dv_gone(client, "kept")


async def test_ttl_deletes_the_dv_and_keeps_the_pvc(stack: Cluster) -> None:
    client = stack.client
    await _set_ttl(client, 1)
    await client.create(DATA_VOLUME, blank_dv("collected"))
    exempt = blank_dv("exempt")
    exempt["metadata"]["annotations"] = {ann.DELETE_AFTER_COMPLETION: "false"}
    await client.create(DATA_VOLUME, exempt)
    await eventually(lambda: _dv_gone(client, "collected"), within=20.0, what="the DV collected")
    pvc = await client.get(PERSISTENT_VOLUME_CLAIM, "collected", NS)
    assert not pvc["metadata"].get("ownerReferences")
    assert pvc["metadata"]["annotations"][ann.POD_PHASE] == "Succeeded"
    await asyncio.sleep(1.0)  # the GC would have removed an owned PVC by now
    await client.get(PERSISTENT_VOLUME_CLAIM, "collected", NS)
    assert (await dv_in(client, "exempt", "Succeeded"))["metadata"]["name"] == "exempt"
    assert not await _dv_gone(client, "exempt")


async def test_deleting_a_dv_mid_import_removes_pvc_pod_and_volume(
    stack: Cluster, tmp_path: Path
) -> None:
    client = stack.client
    raw = patterned_raw(tmp_path / "disk.raw", 8 * MIB)
    www = tmp_path / "www"
    www.mkdir()
    convert(raw, www / "disk.qcow2", "qcow2")
    with BadServer(www) as server:
        server.behave("/disk.qcow2", throttle=500_000)
        await client.create(DATA_VOLUME, http_dv("doomed", server.url("/disk.qcow2")))
        await dv_in(client, "doomed", "ImportInProgress")
        volume = await volume_of(client, "doomed")
        await client.delete(DATA_VOLUME, "doomed", NS)

        async def all_gone() -> bool:
            claims, _ = await client.list(PERSISTENT_VOLUME_CLAIM, NS)
            return not claims and await no_pods(client) and not volume.exists()

        await eventually(all_gone, within=20.0, what="PVC, pod and volume removed")
