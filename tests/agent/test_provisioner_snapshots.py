"""Snapshots, restores and clones of local volumes, against the real embedded API and the real
provisioner: the objects (VolumeSnapshotContent, statuses, events) and the bytes and holes of
the files under the data dir."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from cdi.api.groups import (
    EVENT,
    PERSISTENT_VOLUME,
    PERSISTENT_VOLUME_CLAIM,
    VOLUME_SNAPSHOT,
    VOLUME_SNAPSHOT_CLASS,
    VOLUME_SNAPSHOT_CONTENT,
)
from cdi.kube.client import Client
from cdi.kube.errors import NotFound
from cdi.provisioner import ProvisionerSettings, run_provisioner, volume_path
from tests.support.cdiserver import KUBECTL
from tests.support.cluster import Cluster, eventually

pytestmark = pytest.mark.usefixtures("provisioner")

NS = "default"
MIB = 1 << 20
DRIVER = "cdi.kubevirt.io/local"
#: Long enough for the provisioner to have seen an object (it reacts in milliseconds).
SETTLE = 0.5


# --- helpers -----------------------------------------------------------------------------------


def pvc_manifest(
    name: str,
    size: str,
    *,
    mode: str = "Filesystem",
    storage_class: str | None = None,
    source: dict[str, Any] | None = None,
    source_field: str = "dataSource",
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "volumeMode": mode,
        "resources": {"requests": {"storage": size}},
    }
    if storage_class is not None:
        spec["storageClassName"] = storage_class
    if source is not None:
        spec[source_field] = source
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": NS},
        "spec": spec,
    }


def from_snapshot(name: str) -> dict[str, Any]:
    return {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": name}


def from_pvc(name: str) -> dict[str, Any]:
    return {"kind": "PersistentVolumeClaim", "name": name}


def snapshot_manifest(name: str, pvc: str, snapshot_class: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"source": {"persistentVolumeClaimName": pvc}}
    if snapshot_class is not None:
        spec["volumeSnapshotClassName"] = snapshot_class
    return {
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "kind": "VolumeSnapshot",
        "metadata": {"name": name, "namespace": NS},
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


async def ready(client: Client, name: str) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        vs = await client.get(VOLUME_SNAPSHOT, name, NS)
        return vs if (vs.get("status") or {}).get("readyToUse") is True else None

    return await eventually(probe, what=f"snapshot {name} ready")


async def data_of(client: Client, pvc: dict[str, Any]) -> Path:
    path = volume_path(await client.get(PERSISTENT_VOLUME, pvc["spec"]["volumeName"]))
    assert path is not None
    return path


async def events_for(client: Client, name: str, reason: str) -> list[dict[str, Any]]:
    events, _ = await client.list(EVENT, NS)
    return [e for e in events if e["involvedObject"]["name"] == name and e["reason"] == reason]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(MIB):
            digest.update(chunk)
    return digest.hexdigest()


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def write_sparse(path: Path, size: int, chunks: dict[int, bytes]) -> None:
    """A file of `size` bytes holding `chunks` at their offsets, holes everywhere else."""
    with path.open("r+b" if path.exists() else "wb") as f:
        for offset, data in chunks.items():
            f.seek(offset)
            f.write(data)
        f.truncate(size)


async def filesystem_source(client: Client, name: str = "src") -> tuple[dict[str, Any], Path]:
    """A Bound 100Mi Filesystem PVC holding a sparse 64 MiB disk.img with 2 MiB of data."""
    await client.create(PERSISTENT_VOLUME_CLAIM, pvc_manifest(name, "100Mi"))
    pvc = await bound(client, name)
    image = await data_of(client, pvc) / "disk.img"
    write_sparse(image, 64 * MIB, {0: os.urandom(MIB), 40 * MIB: os.urandom(MIB)})
    return pvc, image


async def block_source(client: Client, name: str = "bsrc") -> tuple[dict[str, Any], Path]:
    """A Bound 8Mi Block PVC with 1 MiB of data at 1 MiB, holes elsewhere."""
    await client.create(PERSISTENT_VOLUME_CLAIM, pvc_manifest(name, "8Mi", mode="Block"))
    pvc = await bound(client, name)
    path = await data_of(client, pvc)
    write_sparse(path, 8 * MIB, {MIB: os.urandom(MIB)})
    return pvc, path


# --- the class ---------------------------------------------------------------------------------


async def test_snapshot_class_is_served(cluster: Cluster) -> None:
    client = cluster.client
    vsclass = await eventually(
        lambda: get_or_none(client, VOLUME_SNAPSHOT_CLASS, "local-snapshots"), what="class"
    )
    assert vsclass["driver"] == DRIVER
    assert vsclass["deletionPolicy"] == "Delete"
    annotations = vsclass["metadata"]["annotations"]
    assert annotations["snapshot.storage.kubernetes.io/is-default-class"] == "true"


# --- snapshots ---------------------------------------------------------------------------------


async def test_snapshot_of_a_filesystem_volume_is_a_sparse_copy(cluster: Cluster) -> None:
    client = cluster.client
    pvc, image = await filesystem_source(client)
    before = sha256(image)
    created = await client.create(VOLUME_SNAPSHOT, snapshot_manifest("snap", "src"))
    vs = await ready(client, "snap")
    uid = created["metadata"]["uid"]
    content_name = f"snapcontent-{uid}"
    assert vs["spec"]["volumeSnapshotClassName"] == "local-snapshots"  # the default, written back
    assert vs["status"]["boundVolumeSnapshotContentName"] == content_name
    assert vs["status"]["restoreSize"] == "100Mi"
    assert vs["status"]["creationTime"].endswith("Z")
    assert "error" not in vs["status"]

    content = await client.get(VOLUME_SNAPSHOT_CONTENT, content_name)
    assert content["spec"]["driver"] == DRIVER
    assert content["spec"]["deletionPolicy"] == "Delete"
    assert content["spec"]["source"] == {"volumeHandle": pvc["spec"]["volumeName"]}
    assert content["spec"]["sourceVolumeMode"] == "Filesystem"
    ref = content["spec"]["volumeSnapshotRef"]
    assert (ref["name"], ref["namespace"], ref["uid"]) == ("snap", NS, uid)
    assert content["status"]["readyToUse"] is True
    assert content["status"]["restoreSize"] == 100 * MIB
    assert content["status"]["snapshotHandle"] == content_name
    assert content["status"]["creationTime"] > 10**18  # nanoseconds since the epoch

    copy = cluster.data_dir.resolve() / "snapshots" / content_name / "disk.img"
    assert copy.stat().st_size == 64 * MIB
    assert sha256(copy) == before
    assert allocated(copy) <= allocated(image) < 8 * MIB  # the holes are holes still
    assert sha256(image) == before  # the source is only read
    assert await events_for(client, "snap", "SnapshotReady")


async def test_a_snapshot_waits_for_its_pvc(cluster: Cluster) -> None:
    client = cluster.client
    await client.create(VOLUME_SNAPSHOT, snapshot_manifest("early", "later"))

    async def failing() -> dict[str, Any] | None:
        vs = await client.get(VOLUME_SNAPSHOT, "early", NS)
        return vs if (vs.get("status") or {}).get("error") else None

    vs = await eventually(failing, what="snapshot error status")
    assert vs["status"]["readyToUse"] is False
    assert "later" in vs["status"]["error"]["message"]
    assert "does not exist" in vs["status"]["error"]["message"]
    assert vs["status"]["error"]["time"].endswith("Z")

    await client.create(PERSISTENT_VOLUME_CLAIM, pvc_manifest("later", "1Mi"))
    vs = await ready(client, "early")
    assert vs["status"]["restoreSize"] == "1Mi"
    assert "error" not in vs["status"]


async def test_deleting_a_snapshot_removes_content_and_data(cluster: Cluster) -> None:
    client = cluster.client
    _, image = await filesystem_source(client)
    before = sha256(image)
    await client.create(VOLUME_SNAPSHOT, snapshot_manifest("gone", "src"))
    vs = await ready(client, "gone")
    content_name = vs["status"]["boundVolumeSnapshotContentName"]
    data = cluster.data_dir.resolve() / "snapshots" / content_name
    assert data.is_dir()
    await client.delete(VOLUME_SNAPSHOT, "gone", NS)

    async def content_gone() -> bool:
        return await get_or_none(client, VOLUME_SNAPSHOT_CONTENT, content_name) is None

    await eventually(content_gone, what="content deleted")
    assert not data.exists()
    assert sha256(image) == before


async def test_a_relist_collects_what_a_missed_deletion_left(cluster: Cluster) -> None:
    """Content of ours whose snapshot is gone, and data no content names, go on a relist."""
    client = cluster.client
    snapshots = cluster.data_dir.resolve() / "snapshots"
    # The fixture's provisioner has listed everything before the orphans appear: only the
    # second one's relist can find them.
    await eventually(
        lambda: get_or_none(client, VOLUME_SNAPSHOT_CLASS, "local-snapshots"), what="class"
    )
    await asyncio.sleep(SETTLE)
    orphan_name = "snapcontent-00000000-0000-0000-0000-000000000001"
    await client.create(
        VOLUME_SNAPSHOT_CONTENT,
        {
            "metadata": {
                "name": orphan_name,
                "labels": {"app.kubernetes.io/managed-by": "cdi-local-provisioner"},
            },
            "spec": {
                "driver": DRIVER,
                "deletionPolicy": "Delete",
                "source": {"volumeHandle": "pvc-x"},
                "volumeSnapshotRef": {"name": "old", "namespace": NS, "uid": "no-such-uid"},
            },
        },
    )
    (snapshots / orphan_name).mkdir(parents=True)
    stray = snapshots / "snapcontent-00000000-0000-0000-0000-000000000002"
    stray.write_bytes(b"left by a crash")
    keep = snapshots / "not-ours.txt"
    keep.write_text("the admin's")
    stop = asyncio.Event()
    second = asyncio.create_task(
        run_provisioner(
            client, root=cluster.data_dir, stop=stop, settings=ProvisionerSettings(retry_delay=0.2)
        )
    )
    try:

        async def collected() -> bool:
            gone = await get_or_none(client, VOLUME_SNAPSHOT_CONTENT, orphan_name) is None
            return gone and not (snapshots / orphan_name).exists() and not stray.exists()

        await eventually(collected, what="orphans collected")
    finally:
        stop.set()
        await asyncio.wait_for(second, 10)
    assert keep.read_text() == "the admin's"


async def kubectl(cluster: Cluster, *args: str, stdin: str | None = None) -> str:
    """The real kubectl against the in-process server (run as a child: the server is on this
    event loop, so a blocking call would deadlock it)."""
    proc = await asyncio.create_subprocess_exec(
        KUBECTL,
        *args,
        env={
            **os.environ,
            "KUBECONFIG": str(cluster.data_dir / "kubeconfig"),
            "KUBECACHEDIR": str(cluster.data_dir / "kubectl-cache"),
        },
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(
        proc.communicate(stdin.encode() if stdin is not None else None), 30
    )
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_kubectl_sees_and_deletes_snapshots(cluster: Cluster) -> None:
    client = cluster.client
    await client.create(PERSISTENT_VOLUME_CLAIM, pvc_manifest("small", "1Mi"))
    await bound(client, "small")
    await kubectl(cluster, "apply", "-f", "-", stdin=json.dumps(snapshot_manifest("kube", "small")))
    vs = await ready(client, "kube")
    content = vs["status"]["boundVolumeSnapshotContentName"]
    got = await kubectl(cluster, "get", "vs", "kube", "-o", "jsonpath={.status.readyToUse}")
    assert got == "true"
    assert content in await kubectl(cluster, "get", "vsc", "-o", "name")
    assert "cdi.kubevirt.io/local" in await kubectl(cluster, "get", "vsclass", "local-snapshots")
    await kubectl(cluster, "delete", "vs", "kube")

    async def content_gone() -> bool:
        return await get_or_none(client, VOLUME_SNAPSHOT_CONTENT, content) is None

    await eventually(content_gone, what="content deleted")


# --- restores ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["100Mi", "300Mi"], ids=["same-size", "larger"])
async def test_restore_a_filesystem_snapshot(cluster: Cluster, size: str) -> None:
    client = cluster.client
    _, image = await filesystem_source(client)
    before = sha256(image)
    await client.create(VOLUME_SNAPSHOT, snapshot_manifest("snap", "src"))
    await ready(client, "snap")
    await client.create(
        PERSISTENT_VOLUME_CLAIM,
        pvc_manifest("restored", size, source=from_snapshot("snap"), source_field="dataSourceRef"),
    )
    pvc = await bound(client, "restored")
    assert pvc["status"]["capacity"] == {"storage": size}
    pv = await client.get(PERSISTENT_VOLUME, pvc["spec"]["volumeName"])
    assert pv["spec"]["capacity"] == {"storage": size}
    restored = await data_of(client, pvc) / "disk.img"
    assert sha256(restored) == before
    assert allocated(restored) < 8 * MIB
    restored.write_bytes(b"changed")  # the restore is a copy: nothing else sees this
    assert sha256(image) == before
    content = (await client.get(VOLUME_SNAPSHOT, "snap", NS))["status"]
    snapshot_copy = (
        cluster.data_dir.resolve()
        / "snapshots"
        / content["boundVolumeSnapshotContentName"]
        / "disk.img"
    )
    assert sha256(snapshot_copy) == before
    events = await events_for(client, "restored", "ProvisioningSucceeded")
    assert "from VolumeSnapshot snap" in events[0]["message"]


@pytest.mark.parametrize("size", ["8Mi", "16Mi"], ids=["same-size", "larger"])
async def test_restore_a_block_snapshot(cluster: Cluster, size: str) -> None:
    client = cluster.client
    _, source = await block_source(client)
    before = sha256(source)
    original = source.read_bytes()
    await client.create(VOLUME_SNAPSHOT, snapshot_manifest("bsnap", "bsrc"))
    vs = await ready(client, "bsnap")
    assert vs["status"]["restoreSize"] == "8Mi"
    content = await client.get(
        VOLUME_SNAPSHOT_CONTENT, vs["status"]["boundVolumeSnapshotContentName"]
    )
    assert content["spec"]["sourceVolumeMode"] == "Block"
    await client.create(
        PERSISTENT_VOLUME_CLAIM,
        pvc_manifest("brestored", size, mode="Block", source=from_snapshot("bsnap")),
    )
    pvc = await bound(client, "brestored")
    assert pvc["status"]["capacity"] == {"storage": size}
    restored = await data_of(client, pvc)
    wanted = {"8Mi": 8 * MIB, "16Mi": 16 * MIB}[size]
    assert restored.stat().st_size == wanted
    data = restored.read_bytes()
    assert data[: len(original)] == original
    assert data[len(original) :] == bytes(wanted - len(original))  # grown with zeros
    assert allocated(restored) <= allocated(source)  # holes, not written zeros
    assert sha256(source) == before


async def test_a_restore_smaller_than_the_snapshot_is_refused(cluster: Cluster) -> None:
    client = cluster.client
    await filesystem_source(client)
    await client.create(VOLUME_SNAPSHOT, snapshot_manifest("snap", "src"))
    await ready(client, "snap")
    await client.create(
        PERSISTENT_VOLUME_CLAIM, pvc_manifest("small", "50Mi", source=from_snapshot("snap"))
    )
    events = await eventually(
        lambda: events_for(client, "small", "ProvisioningFailed"), what="ProvisioningFailed"
    )
    assert events[0]["type"] == "Warning"
    assert events[0]["message"] == (
        "requested 50Mi is smaller than the snapshot's restore size 100Mi"
    )
    await asyncio.sleep(SETTLE)
    pvc = await client.get(PERSISTENT_VOLUME_CLAIM, "small", NS)
    assert pvc["status"]["phase"] == "Pending"
    assert "volumeName" not in pvc["spec"]
    assert len(await events_for(client, "small", "ProvisioningFailed")) == 1


async def test_volume_modes_must_match(cluster: Cluster) -> None:
    client = cluster.client
    await filesystem_source(client)
    await client.create(VOLUME_SNAPSHOT, snapshot_manifest("snap", "src"))
    await ready(client, "snap")
    await client.create(
        PERSISTENT_VOLUME_CLAIM,
        pvc_manifest("as-block", "100Mi", mode="Block", source=from_snapshot("snap")),
    )
    await client.create(
        PERSISTENT_VOLUME_CLAIM,
        pvc_manifest("clone-as-block", "100Mi", mode="Block", source=from_pvc("src")),
    )

    def refused(name: str) -> Callable[[], Awaitable[list[dict[str, Any]]]]:
        return lambda: events_for(client, name, "ProvisioningFailed")

    for name, message in (
        ("as-block", "volume mode Block does not match the snapshot's source volume mode"),
        ("clone-as-block", "volume mode Block does not match the source volume mode"),
    ):
        events = await eventually(refused(name), what=f"{name} refused")
        assert events[0]["type"] == "Warning"
        assert events[0]["message"].startswith(message)
        pvc = await client.get(PERSISTENT_VOLUME_CLAIM, name, NS)
        assert pvc["status"]["phase"] == "Pending"


async def test_a_restore_waits_for_its_snapshot(cluster: Cluster) -> None:
    client = cluster.client
    await client.create(
        PERSISTENT_VOLUME_CLAIM, pvc_manifest("patient", "100Mi", source=from_snapshot("snap"))
    )
    await asyncio.sleep(SETTLE)
    pvc = await client.get(PERSISTENT_VOLUME_CLAIM, "patient", NS)
    assert pvc["status"]["phase"] == "Pending"
    assert await events_for(client, "patient", "WaitingForDataSource")
    _, image = await filesystem_source(client)
    await client.create(VOLUME_SNAPSHOT, snapshot_manifest("snap", "src"))
    pvc = await bound(client, "patient")
    assert sha256(await data_of(client, pvc) / "disk.img") == sha256(image)


async def test_a_wait_for_first_consumer_restore_waits_for_a_node(cluster: Cluster) -> None:
    client = cluster.client
    await filesystem_source(client)
    await client.create(VOLUME_SNAPSHOT, snapshot_manifest("snap", "src"))
    await ready(client, "snap")
    await client.create(
        PERSISTENT_VOLUME_CLAIM,
        pvc_manifest("late", "100Mi", storage_class="local-wffc", source=from_snapshot("snap")),
    )
    await asyncio.sleep(SETTLE)
    pvc = await client.get(PERSISTENT_VOLUME_CLAIM, "late", NS)
    assert pvc["status"]["phase"] == "Pending"
    await client.patch(
        PERSISTENT_VOLUME_CLAIM,
        "late",
        {"metadata": {"annotations": {"volume.kubernetes.io/selected-node": "cdi-local"}}},
        NS,
    )
    await bound(client, "late")


# --- clones ------------------------------------------------------------------------------------


async def test_clone_a_filesystem_pvc(cluster: Cluster) -> None:
    client = cluster.client
    _, image = await filesystem_source(client)
    before = sha256(image)
    await client.create(
        PERSISTENT_VOLUME_CLAIM, pvc_manifest("copy", "200Mi", source=from_pvc("src"))
    )
    pvc = await bound(client, "copy")
    assert pvc["status"]["capacity"] == {"storage": "200Mi"}
    copy = await data_of(client, pvc) / "disk.img"
    assert sha256(copy) == before
    assert allocated(copy) <= allocated(image)
    assert sha256(image) == before
    events = await events_for(client, "copy", "ProvisioningSucceeded")
    assert "from PersistentVolumeClaim src" in events[0]["message"]


async def test_clone_a_block_pvc_into_a_larger_one(cluster: Cluster) -> None:
    client = cluster.client
    _, source = await block_source(client)
    before = sha256(source)
    await client.create(
        PERSISTENT_VOLUME_CLAIM,
        pvc_manifest("bcopy", "12Mi", mode="Block", source=from_pvc("bsrc")),
    )
    pvc = await bound(client, "bcopy")
    copy = await data_of(client, pvc)
    assert copy.stat().st_size == 12 * MIB
    with copy.open("rb") as f:
        assert hashlib.sha256(f.read(8 * MIB)).hexdigest() == before
        assert f.read() == bytes(4 * MIB)
    assert sha256(source) == before


async def test_a_clone_waits_for_its_source_to_bind(cluster: Cluster) -> None:
    client = cluster.client
    await client.create(
        PERSISTENT_VOLUME_CLAIM, pvc_manifest("wsrc", "1Mi", storage_class="local-wffc")
    )
    await client.create(
        PERSISTENT_VOLUME_CLAIM, pvc_manifest("wcopy", "1Mi", source=from_pvc("wsrc"))
    )
    await asyncio.sleep(SETTLE)
    pvc = await client.get(PERSISTENT_VOLUME_CLAIM, "wcopy", NS)
    assert pvc["status"]["phase"] == "Pending"
    events = await events_for(client, "wcopy", "WaitingForDataSource")
    assert "to be bound" in events[0]["message"]
    await client.patch(
        PERSISTENT_VOLUME_CLAIM,
        "wsrc",
        {"metadata": {"annotations": {"volume.kubernetes.io/selected-node": "cdi-local"}}},
        NS,
    )
    await bound(client, "wcopy")
    # A clone smaller than its source is refused, as a CSI driver refuses it.
    await client.create(
        PERSISTENT_VOLUME_CLAIM, pvc_manifest("tiny", "1Ki", source=from_pvc("wsrc"))
    )
    events = await eventually(
        lambda: events_for(client, "tiny", "ProvisioningFailed"), what="tiny refused"
    )
    assert events[0]["message"] == "requested 1Ki is smaller than the source volume's size 1Mi"


# --- what is not ours --------------------------------------------------------------------------


async def test_populator_claims_are_left_alone(cluster: Cluster) -> None:
    client = cluster.client
    source = {"apiGroup": "cdi.kubevirt.io", "kind": "VolumeImportSource", "name": "import"}
    await client.create(
        PERSISTENT_VOLUME_CLAIM,
        pvc_manifest("populated", "1Mi", source=source, source_field="dataSourceRef"),
    )
    await asyncio.sleep(SETTLE)
    pvc = await client.get(PERSISTENT_VOLUME_CLAIM, "populated", NS)
    assert pvc["status"]["phase"] == "Pending"
    assert "volumeName" not in pvc["spec"]
    events, _ = await client.list(EVENT, NS)
    assert [e for e in events if e["involvedObject"]["name"] == "populated"] == []
    items, _ = await client.list(PERSISTENT_VOLUME)
    assert items == []


async def test_snapshots_of_other_classes_are_left_alone(cluster: Cluster) -> None:
    client = cluster.client
    await client.create(
        VOLUME_SNAPSHOT_CLASS,
        {"metadata": {"name": "theirs"}, "driver": "example.com/else", "deletionPolicy": "Delete"},
    )
    await filesystem_source(client)
    await client.create(VOLUME_SNAPSHOT, snapshot_manifest("foreign", "src", "theirs"))
    await asyncio.sleep(SETTLE)
    vs = await client.get(VOLUME_SNAPSHOT, "foreign", NS)
    assert "status" not in vs or not vs["status"]
    items, _ = await client.list(VOLUME_SNAPSHOT_CONTENT)
    assert items == []
