"""The local provisioner against the real embedded API: classes, binding, WFFC, expansion,
capacity reports and reclaim, checked on the objects and on the files under the data dir."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from cdi.api import annotations as ann
from cdi.api.groups import EVENT, PERSISTENT_VOLUME, PERSISTENT_VOLUME_CLAIM, STORAGE_CLASS
from cdi.kube.client import Client
from cdi.kube.errors import NotFound
from cdi.provisioner import ProvisionerSettings, run_provisioner, volume_path
from tests.support.cluster import Cluster, eventually

pytestmark = pytest.mark.usefixtures("provisioner")

NS = "default"
MIB = 1 << 20
#: Long enough for the provisioner to have seen a PVC (it reacts in milliseconds).
SETTLE = 0.5


def pvc_manifest(
    name: str,
    size: str,
    *,
    mode: str = "Filesystem",
    storage_class: str | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "volumeMode": mode,
        "resources": {"requests": {"storage": size}},
    }
    if storage_class is not None:
        spec["storageClassName"] = storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": NS, "annotations": annotations or {}},
        "spec": spec,
    }


async def get_or_none(client: Client, res: Any, name: str, ns: str | None = None) -> Any:
    try:
        return await client.get(res, name, ns)
    except NotFound:
        return None


async def bound(client: Client, name: str) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        pvc = await client.get(PERSISTENT_VOLUME_CLAIM, name, NS)
        return pvc if (pvc.get("status") or {}).get("phase") == "Bound" else None

    return await eventually(probe, what=f"pvc {name} bound")


async def test_storage_classes_are_served(cluster: Cluster) -> None:
    client = cluster.client
    local = await eventually(lambda: get_or_none(client, STORAGE_CLASS, "local"), what="class")
    wffc = await eventually(lambda: get_or_none(client, STORAGE_CLASS, "local-wffc"), what="wffc")
    assert local["provisioner"] == "cdi.kubevirt.io/local"
    assert local["metadata"]["annotations"]["storageclass.kubernetes.io/is-default-class"] == "true"
    assert local["volumeBindingMode"] == "Immediate"
    assert local["allowVolumeExpansion"] is True
    assert local["reclaimPolicy"] == "Delete"
    assert wffc["volumeBindingMode"] == "WaitForFirstConsumer"
    assert "annotations" not in wffc["metadata"]


async def test_filesystem_pvc_without_class_gets_a_directory(cluster: Cluster) -> None:
    client = cluster.client
    created = await client.create(PERSISTENT_VOLUME_CLAIM, pvc_manifest("fs", "10Mi"))
    pvc = await bound(client, "fs")
    uid = created["metadata"]["uid"]
    assert pvc["spec"]["storageClassName"] == "local"  # the default class, written back
    assert pvc["spec"]["volumeName"] == f"pvc-{uid}"
    assert pvc["status"]["capacity"] == {"storage": "10Mi"}
    assert pvc["status"]["accessModes"] == ["ReadWriteOnce"]
    pv = await client.get(PERSISTENT_VOLUME, f"pvc-{uid}")
    assert pv["status"]["phase"] == "Bound"
    assert pv["spec"]["capacity"] == {"storage": "10Mi"}
    assert pv["spec"]["claimRef"]["uid"] == uid
    assert pv["spec"]["persistentVolumeReclaimPolicy"] == "Delete"
    assert pv["spec"]["volumeMode"] == "Filesystem"
    path = volume_path(pv)
    assert path == (cluster.data_dir / "volumes" / f"pvc-{uid}").resolve()
    assert path.is_dir()


@pytest.mark.parametrize("size", ["1048577", "3Mi"], ids=["odd-bytes", "3Mi"])
async def test_block_pvc_is_a_sparse_file_of_exactly_its_size(cluster: Cluster, size: str) -> None:
    client = cluster.client
    await client.create(PERSISTENT_VOLUME_CLAIM, pvc_manifest("blk", size, mode="Block"))
    pvc = await bound(client, "blk")
    pv = await client.get(PERSISTENT_VOLUME, pvc["spec"]["volumeName"])
    assert pv["spec"]["volumeMode"] == "Block"
    path = volume_path(pv)
    assert path is not None and path.is_file()
    st = path.stat()
    expected = {"1048577": MIB + 1, "3Mi": 3 * MIB}[size]
    assert st.st_size == expected
    assert st.st_blocks * 512 < expected  # sparse: nothing written yet


async def test_expansion_grows_pv_file_and_status(cluster: Cluster) -> None:
    client = cluster.client
    await client.create(PERSISTENT_VOLUME_CLAIM, pvc_manifest("grow", "1Mi", mode="Block"))
    pvc = await bound(client, "grow")
    pv_name = pvc["spec"]["volumeName"]
    path = volume_path(await client.get(PERSISTENT_VOLUME, pv_name))
    assert path is not None
    path.write_bytes(b"keep")  # data must survive the growth
    os.truncate(path, MIB)
    await client.patch(
        PERSISTENT_VOLUME_CLAIM,
        "grow",
        {"spec": {"resources": {"requests": {"storage": "5Mi"}}}},
        NS,
    )

    async def grown() -> bool:
        pvc = await client.get(PERSISTENT_VOLUME_CLAIM, "grow", NS)
        return bool(pvc["status"].get("capacity") == {"storage": "5Mi"})

    await eventually(grown, what="status.capacity 5Mi")
    pv = await client.get(PERSISTENT_VOLUME, pv_name)
    assert pv["spec"]["capacity"] == {"storage": "5Mi"}
    assert path.stat().st_size == 5 * MIB
    assert path.read_bytes()[:4] == b"keep"


async def test_deleting_the_pvc_deletes_pv_and_data(cluster: Cluster) -> None:
    client = cluster.client
    await client.create(PERSISTENT_VOLUME_CLAIM, pvc_manifest("gone", "1Mi"))
    pvc = await bound(client, "gone")
    pv_name = pvc["spec"]["volumeName"]
    path = volume_path(await client.get(PERSISTENT_VOLUME, pv_name))
    assert path is not None
    (path / "disk.img").write_bytes(b"x" * 4096)
    await client.delete(PERSISTENT_VOLUME_CLAIM, "gone", NS)

    async def pv_gone() -> bool:
        return await get_or_none(client, PERSISTENT_VOLUME, pv_name) is None

    await eventually(pv_gone, what="pv deleted")
    assert not path.exists()


async def test_wait_for_first_consumer_binds_when_a_node_is_selected(cluster: Cluster) -> None:
    client = cluster.client
    await client.create(
        PERSISTENT_VOLUME_CLAIM, pvc_manifest("late", "1Mi", storage_class="local-wffc")
    )
    await asyncio.sleep(SETTLE)
    pvc = await client.get(PERSISTENT_VOLUME_CLAIM, "late", NS)
    assert pvc["status"]["phase"] == "Pending"
    assert "volumeName" not in pvc["spec"]
    await client.patch(
        PERSISTENT_VOLUME_CLAIM,
        "late",
        {"metadata": {"annotations": {"volume.kubernetes.io/selected-node": "cdi-local"}}},
        NS,
    )
    await bound(client, "late")


async def test_wait_for_first_consumer_honours_cdi_immediate_binding(cluster: Cluster) -> None:
    client = cluster.client
    manifest = pvc_manifest(
        "now",
        "1Mi",
        storage_class="local-wffc",
        annotations={ann.BIND_IMMEDIATE_REQUESTED: ""},
    )
    await client.create(PERSISTENT_VOLUME_CLAIM, manifest)
    await bound(client, "now")


async def test_claims_of_other_classes_are_left_alone(cluster: Cluster) -> None:
    client = cluster.client
    await client.create(
        STORAGE_CLASS,
        {"metadata": {"name": "other"}, "provisioner": "example.com/else"},
    )
    await client.create(
        PERSISTENT_VOLUME_CLAIM, pvc_manifest("theirs", "1Mi", storage_class="other")
    )
    await client.create(PERSISTENT_VOLUME_CLAIM, pvc_manifest("static", "1Mi", storage_class=""))
    await asyncio.sleep(SETTLE)
    for name in ("theirs", "static"):
        pvc = await client.get(PERSISTENT_VOLUME_CLAIM, name, NS)
        assert pvc["status"]["phase"] == "Pending"
        assert "volumeName" not in pvc["spec"]
    items, _ = await client.list(PERSISTENT_VOLUME)
    assert items == []


async def test_a_volume_over_capacity_is_reported(cluster: Cluster) -> None:
    client = cluster.client
    await client.create(PERSISTENT_VOLUME_CLAIM, pvc_manifest("full", "1Mi"))
    pvc = await bound(client, "full")
    path = volume_path(await client.get(PERSISTENT_VOLUME, pvc["spec"]["volumeName"]))
    assert path is not None
    (path / "big").write_bytes(os.urandom(2 * MIB))

    async def reported() -> list[dict[str, Any]]:
        events, _ = await client.list(EVENT, NS)
        return [
            e
            for e in events
            if e["reason"] == "VolumeOverCapacity" and e["involvedObject"]["name"] == "full"
        ]

    events = await eventually(reported, what="VolumeOverCapacity event")
    assert events[0]["type"] == "Warning"
    assert "more than its capacity" in events[0]["message"]
    await asyncio.sleep(SETTLE)  # several scans later: still one event for one episode
    assert len(await reported()) == 1


async def test_bound_data_survives_a_provisioner_restart(cluster: Cluster) -> None:
    """A relist must not re-provision or release anything that is bound."""
    client = cluster.client
    await client.create(PERSISTENT_VOLUME_CLAIM, pvc_manifest("kept", "1Mi"))
    pvc = await bound(client, "kept")
    pv = await client.get(PERSISTENT_VOLUME, pvc["spec"]["volumeName"])
    path = volume_path(pv)
    assert path is not None
    (path / "data").write_text("still here")
    stop = asyncio.Event()
    second = asyncio.create_task(
        run_provisioner(
            client, root=cluster.data_dir, stop=stop, settings=ProvisionerSettings(retry_delay=0.2)
        )
    )
    await asyncio.sleep(SETTLE)
    stop.set()
    await asyncio.wait_for(second, 10)
    again = await client.get(PERSISTENT_VOLUME, pv["metadata"]["name"])
    assert again["metadata"]["uid"] == pv["metadata"]["uid"]
    assert again["status"]["phase"] == "Bound"
    assert (path / "data").read_text() == "still here"
