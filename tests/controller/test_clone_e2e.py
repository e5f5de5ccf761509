"""Clone DataVolumes end to end: the in-process API server, the local provisioner and node agent,
and the controllers, with the real `cdi-cloner` and `cdi-uploadserver` run as pods.

Sources are blank DataVolumes whose volume the test then writes a pattern into (a few extents,
the rest holes). Every test checks the source's sha256 before and after: a clone never
modifies its source."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from cdi.api import annotations as ann
from cdi.api import parse_size
from cdi.api.groups import (
    CDI_CONFIG,
    CDI_CONFIG_NAME,
    DATA_VOLUME,
    EVENT,
    NAMESPACE,
    PERSISTENT_VOLUME_CLAIM,
    POD,
    VOLUME_SNAPSHOT,
)
from cdi.controller.cloning import REASON_SOURCE_GONE
from cdi.controller.datavolume import CLONE_PROGRESS_METRIC, read_progress
from cdi.controller.manager import run_controllers
from cdi.kube.client import Client
from cdi.kube.errors import NotFound
from tests.support.cdiserver import worker_processes
from tests.support.cluster import Cluster, eventually
from tests.support.dv import (
    NS,
    blank_dv,
    conditions,
    disk_of,
    dv_in,
    dv_manifest,
    volume_of,
)
from tests.support.stack import LOOP_STOP_TIMEOUT, running_controllers

MIB = 1 << 20
CLONE_TIMEOUT = 60.0
PATTERN_OFFSETS = (0, 5 * MIB + 4096, 17 * MIB)


def _sha256(path: Path, length: int | None = None) -> str:
    digest = hashlib.sha256()
    left = os.path.getsize(path) if length is None else length
    with path.open("rb") as f:
        while left > 0:
            chunk = f.read(min(left, 4 * MIB))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def _write_pattern(path: Path) -> None:
    """A few MiB of distinct data at a few offsets; holes elsewhere."""
    with path.open("r+b") as f:
        for i, offset in enumerate(PATTERN_OFFSETS):
            f.seek(offset)
            f.write(hashlib.sha256(str(i).encode()).digest() * (MIB // 32))


def _zeros_after(path: Path, start: int) -> bool:
    with path.open("rb") as f:
        f.seek(start)
        while chunk := f.read(4 * MIB):
            if chunk.count(0) != len(chunk):
                return False
    return True


async def _source(
    client: Client, name: str, *, size: str = "32Mi", namespace: str = NS, block: bool = False
) -> tuple[Path, str, int]:
    """A filled source volume: its disk path, sha256 and size."""
    storage: dict[str, Any] = {"volumeMode": "Block"} if block else {}
    manifest = blank_dv(name, size=size, **storage)
    manifest["metadata"]["namespace"] = namespace
    await client.create(DATA_VOLUME, manifest)
    dv = await dv_in(client, name, "Succeeded", "Failed", namespace=namespace)
    assert dv["status"]["phase"] == "Succeeded", dv["status"]
    disk = await disk_of(client, name, namespace)
    _write_pattern(disk)
    return disk, _sha256(disk), disk.stat().st_size


def clone_dv(
    name: str,
    source: str,
    *,
    source_namespace: str = NS,
    namespace: str = NS,
    size: str | None = None,
    strategy: str | None = "copy",
    **storage: Any,
) -> dict[str, Any]:
    manifest = dv_manifest(
        name,
        {"pvc": {"namespace": source_namespace, "name": source}},
        size=size,
        namespace=namespace,
        storage=storage,
    )
    if strategy:
        manifest["metadata"]["annotations"] = {ann.STORAGE_CLASS_CLONE_STRATEGY: strategy}
    return manifest


async def _reasons(client: Client, name: str, namespace: str = NS) -> set[str]:
    events, _ = await client.list(EVENT, namespace)
    return {e["reason"] for e in events if e["involvedObject"]["name"] == name}


async def _no_clone_pods(client: Client) -> bool:
    items, _ = await client.list(POD)
    return not [
        p
        for p in items
        if (p["metadata"].get("labels") or {}).get(ann.LABEL_COMPONENT)
        in (ann.LABEL_COMPONENT_CLONE_SOURCE, ann.LABEL_COMPONENT_UPLOAD_SERVER)
    ]


async def test_copy_filesystem_to_filesystem_empty_size(stack: Cluster) -> None:
    client = stack.client
    src, digest, size = await _source(client, "src")
    await client.create(DATA_VOLUME, clone_dv("copy", "src"))
    dv = await dv_in(client, "copy", "Succeeded", "Failed", within=CLONE_TIMEOUT)
    assert dv["status"]["phase"] == "Succeeded", dv["status"]
    assert dv["status"]["progress"] == "100.0%"
    assert conditions(dv)["Ready"]["status"] == "True"
    target = await disk_of(client, "copy")
    assert _sha256(target, size) == digest
    assert _zeros_after(target, size)
    assert _sha256(src) == digest
    pvc = await client.get(PERSISTENT_VOLUME_CLAIM, "copy", NS)
    annotations = pvc["metadata"]["annotations"]
    assert annotations[ann.CLONE_REQUEST] == f"{NS}/src"
    assert annotations[ann.CLONE_TYPE] == "copy"
    reasons = await _reasons(client, "copy")
    assert {"CloneScheduled", "CloneSucceeded", "SizeDetectionPodCreated"} <= reasons, reasons
    # The size-detection pod's answer is cached on the source; the pod is gone.
    source = await client.get(PERSISTENT_VOLUME_CLAIM, "src", NS)
    cached = source["metadata"]["annotations"]
    assert cached[ann.SOURCE_VIRTUAL_SIZE] == str(size)
    assert cached[ann.SOURCE_CAPACITY] == source["status"]["capacity"]["storage"]
    await eventually(lambda: _no_clone_pods(client), within=15.0, what="clone pods deleted")
    await eventually(lambda: _no_size_pods(client), within=15.0, what="size-detection pod deleted")


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True, timeout=60)


async def _no_size_pods(client: Client) -> bool:
    items, _ = await client.list(POD)
    return not [p for p in items if p["metadata"]["name"].startswith("size-detection-")]


async def test_empty_size_copy_takes_the_image_virtual_size(stack: Cluster) -> None:
    """CDI's size detection: the target of a host-assisted copy with no size is sized from the
    virtual size of the source's image (here 8 MiB in a 64 MiB volume), not from the source
    volume; a second clone of the same source uses the cached size (no new pod)."""
    client = stack.client
    src, _, _ = await _source(client, "roomy-src", size="64Mi")
    os.truncate(src, 8 * MIB)
    digest = _sha256(src)
    await client.create(DATA_VOLUME, clone_dv("fitted", "roomy-src"))
    dv = await dv_in(client, "fitted", "Succeeded", "Failed", within=CLONE_TIMEOUT)
    assert dv["status"]["phase"] == "Succeeded", dv["status"]
    pvc = await client.get(PERSISTENT_VOLUME_CLAIM, "fitted", NS)
    requested = parse_size(pvc["spec"]["resources"]["requests"]["storage"])
    assert 8 * MIB <= requested < 16 * MIB, pvc["spec"]["resources"]
    assert _sha256(await disk_of(client, "fitted"), 8 * MIB) == digest
    assert _sha256(src) == digest
    assert "SizeDetectionPodCreated" in await _reasons(client, "fitted")
    await client.create(DATA_VOLUME, clone_dv("fitted-again", "roomy-src"))
    dv = await dv_in(client, "fitted-again", "Succeeded", "Failed", within=CLONE_TIMEOUT)
    assert dv["status"]["phase"] == "Succeeded", dv["status"]
    assert "SizeDetectionPodCreated" not in await _reasons(client, "fitted-again")


async def test_size_detection_refusing_the_image_keeps_the_clone_pending(
    stack: Cluster,
) -> None:
    """A source image the inspector refuses (a qcow2 naming a backing file) is never read by
    qemu-img: the pod fails, the DataVolume stays Pending saying why, nothing is created."""
    client = stack.client
    src, _, _ = await _source(client, "odd-src")
    backing = src.parent / "base.raw"
    backing.write_bytes(bytes(MIB))
    src.unlink()
    qemu_img("create", "-f", "qcow2", "-b", str(backing), "-F", "raw", str(src))
    digest = _sha256(src)
    await client.create(DATA_VOLUME, clone_dv("odd", "odd-src"))

    async def failed_and_said() -> bool:
        dv = await client.get(DATA_VOLUME, "odd", NS)
        return (
            "SizeDetectionPodFailed" in await _reasons(client, "odd")
            and (dv.get("status") or {}).get("phase") == "Pending"
        )

    await eventually(failed_and_said, within=CLONE_TIMEOUT, what="size detection failed")
    with contextlib.suppress(NotFound):
        await client.get(PERSISTENT_VOLUME_CLAIM, "odd", NS)
        raise AssertionError("a PVC was created for a clone whose size is unknown")
    assert _sha256(src) == digest


async def test_copy_between_volume_modes(stack: Cluster) -> None:
    client = stack.client
    fs_src, fs_digest, fs_size = await _source(client, "fs-src")
    block_src, block_digest, block_size = await _source(client, "block-src", block=True)
    await client.create(DATA_VOLUME, clone_dv("to-block", "fs-src", volumeMode="Block"))
    await client.create(DATA_VOLUME, clone_dv("to-fs", "block-src"))
    for name in ("to-block", "to-fs"):
        dv = await dv_in(client, name, "Succeeded", "Failed", within=CLONE_TIMEOUT)
        assert dv["status"]["phase"] == "Succeeded", (name, dv["status"])
    assert _sha256(await disk_of(client, "to-block"), fs_size) == fs_digest
    assert _sha256(await disk_of(client, "to-fs"), block_size) == block_digest
    assert _sha256(fs_src) == fs_digest
    assert _sha256(block_src) == block_digest


async def test_cross_namespace_copy(stack: Cluster) -> None:
    client = stack.client
    await client.create(
        NAMESPACE, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "golden"}}
    )
    src, digest, size = await _source(client, "base", namespace="golden")
    await client.create(DATA_VOLUME, clone_dv("mine", "base", source_namespace="golden"))
    dv = await dv_in(client, "mine", "Succeeded", "Failed", within=CLONE_TIMEOUT)
    assert dv["status"]["phase"] == "Succeeded", dv["status"]
    assert _sha256(await disk_of(client, "mine"), size) == digest
    assert _sha256(src) == digest
    await eventually(lambda: _no_clone_pods(client), within=15.0, what="clone pods deleted")


async def test_missing_source_waits_then_clones(stack: Cluster) -> None:
    client = stack.client
    await client.create(DATA_VOLUME, clone_dv("early", "later"))

    async def waiting() -> dict[str, Any] | None:
        dv = await client.get(DATA_VOLUME, "early", NS)
        if not (dv.get("status") or {}).get("conditions"):
            return None
        return dv if conditions(dv)["Bound"]["reason"] == "CloneWithoutSource" else None

    dv = await eventually(waiting, within=20.0, what="CloneWithoutSource")
    assert dv["status"]["phase"] == "Pending"
    assert "later" in conditions(dv)["Bound"]["message"]
    _, digest, size = await _source(client, "later")
    done = await dv_in(client, "early", "Succeeded", "Failed", within=CLONE_TIMEOUT)
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert _sha256(await disk_of(client, "early"), size) == digest


async def test_smaller_target_refused_unless_permissive(stack: Cluster) -> None:
    client = stack.client
    src, digest, _ = await _source(client, "big", size="64Mi")
    await client.create(DATA_VOLUME, clone_dv("small", "big", size="16Mi"))
    dv = await dv_in(client, "small", "Failed", "Succeeded", within=20.0)
    message = conditions(dv)["Bound"]["message"]
    assert "smaller than the source" in message and "permissiveClone" in message, message
    assert dv["status"]["phase"] == "Failed"
    items, _ = await client.list(PERSISTENT_VOLUME_CLAIM, NS)
    assert "small" not in {p["metadata"]["name"] for p in items}
    assert _sha256(src) == digest


async def test_source_in_use_waits(stack: Cluster) -> None:
    client = stack.client
    src, digest, size = await _source(client, "busy")
    writer = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "writer", "namespace": NS},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "c",
                    "image": "busybox",
                    "command": ["sleep", "30"],
                    "volumeMounts": [{"name": "v", "mountPath": "/data"}],
                }
            ],
            "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": "busy"}}],
        },
    }
    await client.create(POD, writer, NS)

    async def running() -> bool:
        pod = await client.get(POD, "writer", NS)
        return (pod.get("status") or {}).get("phase") == "Running"

    await eventually(running, within=20.0, what="writer pod running")
    await client.create(DATA_VOLUME, clone_dv("after", "busy"))

    async def in_use() -> bool:
        return "CloneSourceInUse" in await _reasons(client, "after")

    await eventually(in_use, within=20.0, what="CloneSourceInUse event")
    dv = await client.get(DATA_VOLUME, "after", NS)
    assert dv["status"]["phase"] != "Succeeded"
    await client.delete(POD, "writer", NS)
    done = await dv_in(client, "after", "Succeeded", "Failed", within=CLONE_TIMEOUT)
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert _sha256(await disk_of(client, "after"), size) == digest
    assert _sha256(src) == digest


async def test_snapshot_strategy_and_fallback(stack: Cluster) -> None:
    client = stack.client
    src, digest, size = await _source(client, "snap-src")
    await client.create(DATA_VOLUME, clone_dv("smart", "snap-src", strategy="snapshot"))
    await client.create(
        DATA_VOLUME, clone_dv("fallback", "snap-src", strategy="snapshot", volumeMode="Block")
    )
    smart = await dv_in(client, "smart", "Succeeded", "Failed", within=CLONE_TIMEOUT)
    assert smart["status"]["phase"] == "Succeeded", smart["status"]
    pvc = await client.get(PERSISTENT_VOLUME_CLAIM, "smart", NS)
    assert pvc["metadata"]["annotations"][ann.CLONE_TYPE] == "snapshot"
    assert pvc["spec"]["dataSource"]["kind"] == "VolumeSnapshot"
    assert _sha256(await disk_of(client, "smart"), size) == digest

    async def snapshot_gone() -> bool:
        items, _ = await client.list(VOLUME_SNAPSHOT, NS)
        return not items

    await eventually(snapshot_gone, within=15.0, what="temporary snapshot deleted")
    fallback = await dv_in(client, "fallback", "Succeeded", "Failed", within=CLONE_TIMEOUT)
    assert fallback["status"]["phase"] == "Succeeded", fallback["status"]
    pvc = await client.get(PERSISTENT_VOLUME_CLAIM, "fallback", NS)
    annotations = pvc["metadata"]["annotations"]
    assert annotations[ann.CLONE_TYPE] == "copy"
    assert "volume mode" in annotations[ann.CLONE_FALLBACK_REASON]
    assert "IncompatibleVolumeModes" in await _reasons(client, "fallback")
    assert _sha256(await disk_of(client, "fallback"), size) == digest
    assert _sha256(src) == digest
    await asyncio.sleep(0)


# --- failures mid-clone ------------------------------------------------------------------------


async def _slow_workers(client: Client) -> None:
    """Worker pods limited to a slice of a CPU (CDIConfig podResourceRequirements), so that a
    clone of ~100 MiB takes seconds: long enough to break it in the middle."""

    async def config_status() -> dict[str, Any] | None:
        with contextlib.suppress(NotFound):
            config = await client.get(CDI_CONFIG, CDI_CONFIG_NAME)
            return config if config.get("status") else None
        return None

    config = await eventually(config_status, within=20.0, what="the CDIConfig")
    config.setdefault("spec", {})["podResourceRequirements"] = {
        "limits": {"cpu": "100m", "memory": "600M"},
        "requests": {"cpu": "10m", "memory": "60M"},
    }
    await client.replace(CDI_CONFIG, config)

    async def applied() -> bool:
        current = await client.get(CDI_CONFIG, CDI_CONFIG_NAME)
        resources = (current.get("status") or {}).get("defaultPodResourceRequirements") or {}
        return (resources.get("limits") or {}).get("cpu") == "100m"

    await eventually(applied, within=20.0, what="slow pod resources in the CDIConfig status")


async def _big_source(client: Client, name: str) -> tuple[Path, str, int]:
    await client.create(DATA_VOLUME, blank_dv(name, size="128Mi"))
    dv = await dv_in(client, name, "Succeeded", "Failed")
    assert dv["status"]["phase"] == "Succeeded", dv["status"]
    disk = await disk_of(client, name)
    with disk.open("r+b") as f:
        for i in range(12):
            f.seek(i * 10 * MIB)
            f.write(os.urandom(8 * MIB))
    return disk, _sha256(disk), disk.stat().st_size


def _worker_pids(data_dir: Path, command: str) -> list[int]:
    return [
        p.pid
        for p in worker_processes(data_dir)
        if (command in p.cmdline and "python" in p.cmdline) or p.cmdline.startswith(command)
    ]


async def _kill_mid_stream(stack: Cluster, name: str, command: str) -> None:
    """SIGKILL the worker `command` once the clone `name` has sent some of its data (the
    cloner's progress metric, read from its pod, between 0 and 80%)."""

    dv = await stack.client.get(DATA_VOLUME, name, NS)
    owner = str(dv["metadata"]["uid"])

    async def streaming() -> list[int] | None:
        items, _ = await stack.client.list(
            POD, NS, label_selector=f"{ann.LABEL_COMPONENT}={ann.LABEL_COMPONENT_CLONE_SOURCE}"
        )
        ips = [(p.get("status") or {}).get("podIP") for p in items]
        for ip in filter(None, ips):
            progress = await read_progress(str(ip), owner, metric=CLONE_PROGRESS_METRIC)
            if progress is not None and 0 < float(progress.rstrip("%")) < 80:
                return _worker_pids(stack.data_dir, command) or None
        return None

    pids = await eventually(
        streaming, within=CLONE_TIMEOUT, interval=0.05, what=f"{command} streaming"
    )
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def test_cloner_killed_mid_stream_retries(stack: Cluster) -> None:
    client = stack.client
    src, digest, size = await _big_source(client, "kill-src")
    await _slow_workers(client)
    await client.create(DATA_VOLUME, clone_dv("kill-cloner", "kill-src"))
    await _kill_mid_stream(stack, "kill-cloner", "cdi-cloner")
    dv = await dv_in(client, "kill-cloner", "Succeeded", "Failed", within=CLONE_TIMEOUT * 2)
    assert dv["status"]["phase"] == "Succeeded", dv["status"]
    assert dv["status"]["restartCount"] >= 1
    assert _sha256(await disk_of(client, "kill-cloner"), size) == digest
    assert _sha256(src) == digest


@pytest.mark.slow  # the cloner-killed case covers the retry in the default run
async def test_upload_server_killed_mid_stream_retries(stack: Cluster) -> None:
    client = stack.client
    src, digest, size = await _big_source(client, "kill-src2")
    await _slow_workers(client)
    await client.create(DATA_VOLUME, clone_dv("kill-server", "kill-src2"))
    await _kill_mid_stream(stack, "kill-server", "cdi-uploadserver")
    dv = await dv_in(client, "kill-server", "Succeeded", "Failed", within=CLONE_TIMEOUT * 2)
    assert dv["status"]["phase"] == "Succeeded", dv["status"]
    assert _sha256(await disk_of(client, "kill-server"), size) == digest
    assert _sha256(src) == digest


async def test_source_deleted_mid_clone_stops_and_waits(stack: Cluster) -> None:
    client = stack.client
    await _big_source(client, "doomed")
    await _slow_workers(client)
    await client.create(DATA_VOLUME, clone_dv("orphan", "doomed"))
    await dv_in(client, "orphan", "CloneInProgress", "Succeeded", within=CLONE_TIMEOUT)
    await client.delete(DATA_VOLUME, "doomed", NS)

    async def waiting() -> dict[str, Any] | None:
        dv = await client.get(DATA_VOLUME, "orphan", NS)
        running = conditions(dv)["Running"]
        return dv if "is gone" in running.get("message", "") else None

    dv = await eventually(
        waiting, within=CLONE_TIMEOUT, what="the clone notices its source is gone"
    )
    assert dv["status"]["phase"] != "Succeeded"
    assert REASON_SOURCE_GONE in await _reasons(client, "orphan")
    await eventually(
        lambda: _no_source_pods(client), within=20.0, what="source pod deleted with its source"
    )


async def _no_source_pods(client: Client) -> bool:
    items, _ = await client.list(POD)
    return not [
        p
        for p in items
        if (p["metadata"].get("labels") or {}).get(ann.LABEL_COMPONENT)
        == ann.LABEL_COMPONENT_CLONE_SOURCE
    ]


async def test_content_type_mismatch_fails(stack: Cluster) -> None:
    client = stack.client
    src, digest, _ = await _source(client, "kv")
    manifest = clone_dv("as-archive", "kv")
    manifest["spec"]["contentType"] = "archive"
    await client.create(DATA_VOLUME, manifest)
    dv = await dv_in(client, "as-archive", "Failed", "Succeeded", within=20.0)
    assert "content type" in conditions(dv)["Bound"]["message"]
    assert _sha256(src) == digest


async def test_snapshot_source_restores(stack: Cluster) -> None:
    """A DataVolume with `source.snapshot`: restored from a VolumeSnapshot the user took."""
    client = stack.client
    src, digest, size = await _source(client, "snapped")
    snapshot = {
        "apiVersion": VOLUME_SNAPSHOT.api_version,
        "kind": VOLUME_SNAPSHOT.kind,
        "metadata": {"name": "snap1", "namespace": NS},
        "spec": {"source": {"persistentVolumeClaimName": "snapped"}},
    }
    await client.create(VOLUME_SNAPSHOT, snapshot, NS)
    manifest = dv_manifest("restored", {"snapshot": {"namespace": NS, "name": "snap1"}}, size=None)
    await client.create(DATA_VOLUME, manifest)
    dv = await dv_in(client, "restored", "Succeeded", "Failed", within=CLONE_TIMEOUT)
    assert dv["status"]["phase"] == "Succeeded", dv["status"]
    pvc = await client.get(PERSISTENT_VOLUME_CLAIM, "restored", NS)
    assert pvc["spec"]["dataSource"] == {
        "apiGroup": "snapshot.storage.k8s.io",
        "kind": "VolumeSnapshot",
        "name": "snap1",
    }
    assert _sha256(await disk_of(client, "restored"), size) == digest
    # the user's snapshot is theirs: kept
    assert (await client.get(VOLUME_SNAPSHOT, "snap1", NS))["status"]["readyToUse"] is True
    assert _sha256(src) == digest


async def test_archive_content_cloned_as_a_tree(stack: Cluster) -> None:
    client = stack.client
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": "files",
            "namespace": NS,
            "annotations": {ann.CONTENT_TYPE: "archive"},
        },
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "64Mi"}},
        },
    }
    await client.create(PERSISTENT_VOLUME_CLAIM, pvc, NS)

    async def bound() -> bool:
        current = await client.get(PERSISTENT_VOLUME_CLAIM, "files", NS)
        return (current.get("status") or {}).get("phase") == "Bound"

    await eventually(bound, within=20.0, what="source PVC bound")
    root = await volume_of(client, "files")
    (root / "etc").mkdir()
    (root / "etc" / "motd").write_text("cloned as a tree\n")
    with (root / "sparse.bin").open("wb") as f:
        f.seek(20 * MIB)
        f.write(b"end")
    manifest = clone_dv("files-copy", "files", size="64Mi")
    manifest["spec"]["contentType"] = "archive"
    await client.create(DATA_VOLUME, manifest)
    dv = await dv_in(client, "files-copy", "Succeeded", "Failed", within=CLONE_TIMEOUT)
    assert dv["status"]["phase"] == "Succeeded", dv["status"]
    copy = await volume_of(client, "files-copy")
    assert (copy / "etc" / "motd").read_text() == "cloned as a tree\n"
    sparse = copy / "sparse.bin"
    assert sparse.stat().st_size == 20 * MIB + 3
    assert sparse.stat().st_blocks * 512 < MIB  # the hole stayed a hole
    assert not (copy / "disk.img").exists()


async def test_permissive_clone_takes_a_smaller_target(stack: Cluster) -> None:
    """`permissiveClone` skips the size check: a source whose image is smaller than its claim
    clones into a claim smaller than the source's."""
    client = stack.client
    src, _, _ = await _source(client, "roomy", size="64Mi")
    with src.open("r+b") as f:
        f.truncate(8 * MIB)  # the image uses an eighth of its volume
    digest = _sha256(src)
    manifest = clone_dv("tight", "roomy", size="16Mi")
    manifest["metadata"]["annotations"][ann.PERMISSIVE_CLONE] = "true"
    await client.create(DATA_VOLUME, manifest)
    dv = await dv_in(client, "tight", "Succeeded", "Failed", within=CLONE_TIMEOUT)
    assert dv["status"]["phase"] == "Succeeded", dv["status"]
    assert _sha256(await disk_of(client, "tight"), 8 * MIB) == digest
    assert _sha256(src) == digest


async def test_restarted_controllers_converge_on_one_source_pod(node: Cluster) -> None:
    """The controllers stopped and started again four times during a copy: one source pod and
    one upload pod at a time (no duplicates), the right bytes at the end."""
    client = node.client
    async with running_controllers(client):
        src, digest, size = await _big_source(client, "restart-src")
        await _slow_workers(client)
    pods_seen: dict[str, set[str]] = {}

    async def spy() -> None:
        while True:
            items, _ = await client.list(POD, NS)
            for p in items:
                pods_seen.setdefault(str(p["metadata"]["name"]), set()).add(
                    str(p["metadata"]["uid"])
                )
            await asyncio.sleep(0.05)

    spying = asyncio.create_task(spy())
    try:
        await client.create(DATA_VOLUME, clone_dv("restarted", "restart-src"))
        for delay in (0.4, 0.8, 1.5, 1.0):
            stop = asyncio.Event()
            task = asyncio.create_task(run_controllers(client, stop=stop, local=True))
            await asyncio.sleep(delay)
            stop.set()
            await asyncio.wait_for(task, LOOP_STOP_TIMEOUT)
        async with running_controllers(client):
            dv = await dv_in(client, "restarted", "Succeeded", "Failed", within=CLONE_TIMEOUT * 2)
    finally:
        spying.cancel()
    assert dv["status"]["phase"] == "Succeeded", dv["status"]
    assert _sha256(await disk_of(client, "restarted"), size) == digest
    assert _sha256(src) == digest
    workers = {n: uids for n, uids in pods_seen.items() if n.endswith("source-pod")}
    workers |= {n: uids for n, uids in pods_seen.items() if n.startswith("cdi-upload-")}
    assert workers, pods_seen
    assert all(len(uids) == 1 for uids in workers.values()), workers
