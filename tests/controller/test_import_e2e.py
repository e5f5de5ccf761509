"""DataVolumes imported end to end: the in-process API server, the local provisioner and node
agent, and the controllers (`run_controllers`), against a BadServer serving qemu-img images.

Covers an http qcow2 import through the storage API, a blank volume, a checksum mismatch (Failed
for good, no new pods), a 404 that heals once the file appears, and the scratch flow of a gzip
image served without Range support."""

from __future__ import annotations

import asyncio
import hashlib
import re
from pathlib import Path
from typing import Any

from cdi.api import annotations as ann
from cdi.api.groups import (
    CDI_CONFIG,
    CDI_CONFIG_NAME,
    DATA_VOLUME,
    EVENT,
    PERSISTENT_VOLUME_CLAIM,
    POD,
)
from cdi.controller.manager import run_controllers
from cdi.kube.errors import NotFound
from tests.support.cluster import Cluster, eventually
from tests.support.dv import (
    IMPORT_TIMEOUT,
    NS,
    blank_dv,
    conditions,
    disk_of,
    dv_in,
    http_dv,
    pods,
)
from tests.support.dv import no_pods as _no_pods
from tests.support.httpserver import BadServer
from tests.support.images import MIB, compress, convert, patterned_raw, same_image
from tests.support.stack import LOOP_STOP_TIMEOUT


async def test_http_qcow2_and_blank_succeed(stack: Cluster, tmp_path: Path) -> None:
    client = stack.client
    raw = patterned_raw(tmp_path / "disk.raw", 8 * MIB + 4096)
    www = tmp_path / "www"
    www.mkdir()
    convert(raw, www / "disk.qcow2", "qcow2")
    with BadServer(www) as server:
        await client.create(DATA_VOLUME, http_dv("web", server.url("/disk.qcow2")))
        await client.create(DATA_VOLUME, blank_dv("empty"))
        dv = await dv_in(client, "web", "Succeeded", "Failed")
    assert dv["status"]["phase"] == "Succeeded", dv["status"]
    assert dv["status"]["progress"] == "100.0%"
    assert dv["status"]["claimName"] == "web"
    conds = conditions(dv)
    assert conds["Ready"]["status"] == "True"
    assert conds["Bound"]["status"] == "True"
    assert conds["Running"]["status"] == "False"
    pvc = await client.get(PERSISTENT_VOLUME_CLAIM, "web", NS)
    annotations = pvc["metadata"]["annotations"]
    assert annotations[ann.POD_PHASE] == "Succeeded"
    assert annotations[ann.IMPORT_POD_NAME] == "importer-web"
    assert same_image(raw, await disk_of(client, "web"))
    blank = await dv_in(client, "empty", "Succeeded", "Failed")
    assert blank["status"]["phase"] == "Succeeded"
    assert blank["status"]["progress"] == "100.0%"
    await eventually(
        lambda: _no_pods(client), within=10.0, what="importer pods deleted after success"
    )
    events, _ = await client.list(EVENT, NS)
    reasons = {e["reason"] for e in events if e["involvedObject"]["name"] == "web"}
    assert {"ImportScheduled", "ImportSucceeded"} <= reasons, reasons


async def test_checksum_mismatch_fails_for_good(stack: Cluster, tmp_path: Path) -> None:
    client = stack.client
    raw = patterned_raw(tmp_path / "disk.raw", 4 * MIB)
    www = tmp_path / "www"
    www.mkdir()
    convert(raw, www / "disk.qcow2", "qcow2")
    wrong = "sha256:" + hashlib.sha256(b"not the image").hexdigest()
    with BadServer(www) as server:
        await client.create(DATA_VOLUME, http_dv("sum", server.url("/disk.qcow2"), checksum=wrong))
        dv = await dv_in(client, "sum", "Failed", "Succeeded")
        assert dv["status"]["phase"] == "Failed"
        running = conditions(dv)["Running"]
        assert "checksum mismatch" in running["message"]
        assert running["reason"] == "ChecksumError"
        await eventually(lambda: _no_pods(client), within=10.0, what="importer pod deleted")
        await asyncio.sleep(1.5)
        assert await pods(client) == []
        again = await client.get(DATA_VOLUME, "sum", NS)
        assert again["status"]["phase"] == "Failed"


async def test_404_retries_with_message_then_succeeds(stack: Cluster, tmp_path: Path) -> None:
    client = stack.client
    raw = patterned_raw(tmp_path / "disk.raw", 4 * MIB)
    www = tmp_path / "www"
    www.mkdir()
    with BadServer(www) as server:
        await client.create(DATA_VOLUME, http_dv("late", server.url("/late.qcow2")))

        async def failing() -> dict[str, Any] | None:
            dv = await client.get(DATA_VOLUME, "late", NS)
            status = dv.get("status") or {}
            message = conditions(dv)["Running"]["message"] if status.get("conditions") else ""
            return dv if "404" in message else None

        dv = await eventually(failing, within=IMPORT_TIMEOUT, what="a 404 in the Running message")
        assert dv["status"]["phase"] in ("ImportScheduled", "ImportInProgress")
        convert(raw, www / "late.qcow2", "qcow2")
        done = await dv_in(client, "late", "Succeeded", "Failed")
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert done["status"]["restartCount"] >= 1
    assert same_image(raw, await disk_of(client, "late"))


async def test_gzip_without_range_goes_through_scratch(stack: Cluster, tmp_path: Path) -> None:
    client = stack.client
    raw = patterned_raw(tmp_path / "disk.raw", 4 * MIB)
    www = tmp_path / "www"
    www.mkdir()
    qcow2 = convert(raw, www / "disk.qcow2", "qcow2")
    compress(qcow2, "gzip")
    scratch_seen = asyncio.Event()

    async def watch_scratch() -> None:
        while True:
            try:
                await client.get(PERSISTENT_VOLUME_CLAIM, "zipped-scratch", NS)
                scratch_seen.set()
                return
            except NotFound:
                await asyncio.sleep(0.05)

    with BadServer(www) as server:
        server.behave("/disk.qcow2.gz", ignore_range=True, no_accept_ranges=True)
        watcher = asyncio.create_task(watch_scratch())
        try:
            await client.create(DATA_VOLUME, http_dv("zipped", server.url("/disk.qcow2.gz")))
            dv = await dv_in(client, "zipped", "Succeeded", "Failed")
        finally:
            watcher.cancel()
    assert dv["status"]["phase"] == "Succeeded", dv["status"]
    assert scratch_seen.is_set()
    pvc = await client.get(PERSISTENT_VOLUME_CLAIM, "zipped", NS)
    assert pvc["metadata"]["annotations"][ann.REQUIRES_SCRATCH] == "true"
    assert same_image(raw, await disk_of(client, "zipped"))

    async def scratch_gone() -> bool:
        try:
            await client.get(PERSISTENT_VOLUME_CLAIM, "zipped-scratch", NS)
        except NotFound:
            return True
        return False

    await eventually(scratch_gone, within=10.0, what="scratch PVC deleted")


async def test_cdiconfig_is_created_with_status(stack: Cluster) -> None:
    async def probe() -> dict[str, Any] | None:
        try:
            config = await stack.client.get(CDI_CONFIG, CDI_CONFIG_NAME)
        except NotFound:
            return None
        return config if config.get("status") else None

    config = await eventually(probe, within=10.0, what="CDIConfig status")
    assert "filesystemOverhead" in config["status"]


async def test_restarted_controllers_converge_without_duplicates(
    node: Cluster, tmp_path: Path
) -> None:
    client = node.client
    raw = patterned_raw(tmp_path / "disk.raw", 8 * MIB)
    www = tmp_path / "www"
    www.mkdir()
    convert(raw, www / "disk.qcow2", "qcow2")
    pod_uids: set[str] = set()
    scratch_claims: set[str] = set()
    progress_seen: set[str] = set()

    async def spy() -> None:
        while True:
            items, _ = await client.list(POD, NS)
            pod_uids.update(str(p["metadata"]["uid"]) for p in items)
            claims, _ = await client.list(PERSISTENT_VOLUME_CLAIM, NS)
            scratch_claims.update(
                str(c["metadata"]["name"])
                for c in claims
                if str(c["metadata"]["name"]).endswith("-scratch")
            )
            try:
                dv = await client.get(DATA_VOLUME, "crash", NS)
                progress_seen.add(str((dv.get("status") or {}).get("progress")))
            except NotFound:
                pass
            await asyncio.sleep(0.05)

    with BadServer(www) as server:
        server.behave("/disk.qcow2", throttle=300_000)
        spying = asyncio.create_task(spy())
        try:
            await client.create(DATA_VOLUME, http_dv("crash", server.url("/disk.qcow2")))
            for delay in (0.3, 0.5, 0.8, 0.6):
                stop = asyncio.Event()
                task = asyncio.create_task(run_controllers(client, stop=stop, local=True))
                await asyncio.sleep(delay)
                stop.set()
                await asyncio.wait_for(task, LOOP_STOP_TIMEOUT)
            stop = asyncio.Event()
            task = asyncio.create_task(run_controllers(client, stop=stop, local=True))
            try:
                dv = await dv_in(client, "crash", "Succeeded", "Failed")
            finally:
                stop.set()
                await asyncio.wait_for(task, LOOP_STOP_TIMEOUT)
        finally:
            spying.cancel()
    assert dv["status"]["phase"] == "Succeeded", dv["status"]
    assert len(pod_uids) == 1, pod_uids
    assert not scratch_claims
    assert same_image(raw, await disk_of(client, "crash"))
    claims, _ = await client.list(PERSISTENT_VOLUME_CLAIM, NS)
    assert [c["metadata"]["name"] for c in claims] == ["crash"]
    # Read from the importer's metrics while it ran ("NN.NN%"), ours before and after.
    shapes = re.compile(r"^(None|N/A|100\.0%|\d{1,3}\.\d\d%)$")
    assert all(shapes.match(value) for value in progress_seen), progress_seen


async def test_foreign_pvc_is_not_taken_over(stack: Cluster) -> None:
    client = stack.client
    await client.create(
        PERSISTENT_VOLUME_CLAIM,
        {
            "metadata": {"name": "taken", "namespace": NS},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "8Mi"}},
            },
        },
    )
    await client.create(DATA_VOLUME, blank_dv("taken"))

    async def refused() -> dict[str, Any] | None:
        dv = await client.get(DATA_VOLUME, "taken", NS)
        if not (dv.get("status") or {}).get("conditions"):
            return None
        return dv if conditions(dv)["Bound"]["reason"] == "ErrResourceExists" else None

    dv = await eventually(refused, within=10.0, what="ErrResourceExists on the DV")
    assert dv["status"]["phase"] == "Pending"
    pvc = await client.get(PERSISTENT_VOLUME_CLAIM, "taken", NS)
    assert not pvc["metadata"].get("ownerReferences")
    events, _ = await client.list(EVENT, NS)
    assert any(e["reason"] == "ErrResourceExists" for e in events)


async def test_wffc_class_waits_for_first_consumer(stack: Cluster) -> None:
    client = stack.client
    manifest = blank_dv("later")
    manifest["spec"]["storage"]["storageClassName"] = "local-wffc"
    await client.create(DATA_VOLUME, manifest)
    dv = await dv_in(client, "later", "WaitForFirstConsumer", within=10.0)
    assert conditions(dv)["Bound"]["status"] == "False"
    assert await pods(client) == []


async def test_storage_api_without_size_says_so(stack: Cluster) -> None:
    # CDI's webhook refuses an import without a size ("PVC size is missing"); without a webhook
    # the DataVolume stays Pending and says the same, and nothing is created for it.
    client = stack.client
    manifest = http_dv("sizeless", "http://127.0.0.1:9/disk.qcow2")
    del manifest["spec"]["storage"]["resources"]
    await client.create(DATA_VOLUME, manifest)

    async def explained() -> dict[str, Any] | None:
        dv = await client.get(DATA_VOLUME, "sizeless", NS)
        if not (dv.get("status") or {}).get("conditions"):
            return None
        return dv if "PVC size is missing" in conditions(dv)["Bound"]["message"] else None

    dv = await eventually(explained, within=20.0, what="the missing size in the DV status")
    assert dv["status"]["phase"] == "Pending"
    claims, _ = await client.list(PERSISTENT_VOLUME_CLAIM, NS)
    assert claims == []
    assert await pods(client) == []
    events, _ = await client.list(EVENT, NS)
    assert any("PVC size is missing" in e["message"] for e in events)
