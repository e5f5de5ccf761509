"""The local node agent against the real embedded API: pods run as processes, with their env,
volumes, limits, restarts, logs and termination messages; deleting or stopping kills them; and a
hand-made CDI importer pod fills a provisioned volume end to end."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from cdi.agent import AgentSettings, ContainerRequired, LogNotFound, read_log, run_agent
from cdi.agent.processes import session_members
from cdi.api.groups import CONFIG_MAP, PERSISTENT_VOLUME, PERSISTENT_VOLUME_CLAIM, POD, SECRET
from cdi.kube.client import Client
from cdi.kube.errors import NotFound
from cdi.provisioner import volume_path
from tests.support.cluster import Cluster, eventually
from tests.support.httpserver import BadServer
from tests.support.images import MIB, convert, patterned_raw, same_image

NS = "default"
POD_TIMEOUT = 20.0
IMPORT_TIMEOUT = 60.0


def pod_manifest(
    name: str,
    command: list[str],
    *,
    restart: str = "Never",
    env: list[dict[str, Any]] | None = None,
    volumes: list[dict[str, Any]] | None = None,
    mounts: list[dict[str, Any]] | None = None,
    limits: dict[str, str] | None = None,
    message_policy: str | None = None,
    grace: int | None = None,
) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "main", "image": "local", "command": command}
    if env:
        container["env"] = env
    if mounts:
        container["volumeMounts"] = mounts
    if limits:
        container["resources"] = {"limits": limits}
    if message_policy:
        container["terminationMessagePolicy"] = message_policy
    spec: dict[str, Any] = {"restartPolicy": restart, "containers": [container]}
    if volumes:
        spec["volumes"] = volumes
    if grace is not None:
        spec["terminationGracePeriodSeconds"] = grace
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS},
        "spec": spec,
    }


async def phase_is(client: Client, name: str, *phases: str, within: float = POD_TIMEOUT) -> Any:
    async def probe() -> dict[str, Any] | None:
        pod = await client.get(POD, name, NS)
        return pod if pod["status"].get("phase") in phases else None

    return await eventually(probe, within=within, what=f"pod {name} in {phases}")


def main_status(pod: dict[str, Any]) -> dict[str, Any]:
    (status,) = pod["status"]["containerStatuses"]
    assert status["name"] == "main"
    return dict(status)


async def running_pid(client: Client, name: str) -> int:
    async def probe() -> int | None:
        pod = await client.get(POD, name, NS)
        statuses = pod["status"].get("containerStatuses") or []
        if statuses and "running" in statuses[0]["state"]:
            return int(statuses[0]["containerID"].removeprefix("cdi-local://"))
        return None

    return await eventually(probe, within=POD_TIMEOUT, what=f"pod {name} running")


async def process_gone(pid: int) -> None:
    async def probe() -> bool:
        try:
            os.kill(pid, 0)  # a zombie would still answer: this also proves it was reaped
        except ProcessLookupError:
            return True
        return False

    await eventually(probe, within=10.0, what=f"process {pid} gone")


@pytest.mark.usefixtures("agent")
async def test_pod_succeeds_with_termination_message_and_log(cluster: Cluster) -> None:
    client = cluster.client
    await client.create(
        POD, pod_manifest("hello", ["sh", "-c", "echo hi; echo done > $CDI_TERMINATION_LOG"])
    )
    pod = await phase_is(client, "hello", "Succeeded")
    status = main_status(pod)
    terminated = status["state"]["terminated"]
    assert terminated["exitCode"] == 0
    assert terminated["reason"] == "Completed"
    assert terminated["message"] == "done\n"
    assert status["restartCount"] == 0
    assert status["ready"] is False
    assert pod["spec"]["nodeName"] == "cdi-local"
    ip = pod["status"]["podIP"]
    assert ip.startswith("127.0.") and not ip.startswith("127.0.0.")
    assert pod["status"]["podIPs"] == [{"ip": ip}]
    conditions = {c["type"]: c for c in pod["status"]["conditions"]}
    assert conditions["PodScheduled"]["status"] == "True"
    assert conditions["Ready"]["reason"] == "PodCompleted"
    assert await read_log(cluster.data_dir, NS, "hello", "main") == "hi\n"
    assert await read_log(cluster.data_dir, NS, "hello", None) == "hi\n"


async def test_read_log_refuses_odd_names_and_missing_logs(tmp_path: Path) -> None:
    with pytest.raises(LogNotFound):
        await read_log(tmp_path, NS, "nope", "main")
    with pytest.raises(LogNotFound):
        await read_log(tmp_path, NS, "x", "../../etc/passwd")
    with pytest.raises(LogNotFound):
        await read_log(tmp_path, "..", "x", None)
    pod = tmp_path / "pods" / NS / "two"
    pod.mkdir(parents=True)
    (pod / "a.log").write_text("a")
    (pod / "b.log").write_text("b")
    with pytest.raises(ContainerRequired, match=r"choose one of: \[a b\]"):
        await read_log(tmp_path, NS, "two", None)


@pytest.mark.usefixtures("agent")
async def test_env_secrets_config_maps_fields_and_mounts(cluster: Cluster) -> None:
    client = cluster.client
    await client.create(
        SECRET,
        {"metadata": {"name": "creds", "namespace": NS}, "data": {"key": "czNjcjN0"}},
    )
    await client.create(
        CONFIG_MAP, {"metadata": {"name": "settings", "namespace": NS}, "data": {"mode": "fast"}}
    )
    env: list[dict[str, Any]] = [
        {"name": "A", "value": "plain"},
        {"name": "B", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "key"}}},
        {"name": "C", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}},
        {"name": "D", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "E", "value": "$(A)-x"},
        {"name": "F", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "CREDS", "value": "/etc/creds/key"},
    ]
    script = 'echo "$A|$B|$C|$D|$E|$F|$POD_IP"; cat "$CDI_MOUNT_ETC_CREDS/key"; echo; cat "$CREDS"'
    await client.create(
        POD,
        pod_manifest(
            "envy",
            ["sh", "-c", script],
            env=env,
            volumes=[{"name": "c", "secret": {"secretName": "creds"}}],
            mounts=[{"name": "c", "mountPath": "/etc/creds"}],
        ),
    )
    pod = await phase_is(client, "envy", "Succeeded", "Failed")
    text = await read_log(cluster.data_dir, NS, "envy", "main")
    assert pod["status"]["phase"] == "Succeeded", text
    ip = pod["status"]["podIP"]
    assert text.splitlines() == [f"plain|s3cr3t|fast|envy|plain-x|{ip}|{ip}", "s3cr3t", "s3cr3t"]


@pytest.mark.usefixtures("agent")
async def test_missing_secret_keeps_the_container_waiting(cluster: Cluster) -> None:
    client = cluster.client
    env = [{"name": "B", "valueFrom": {"secretKeyRef": {"name": "later", "key": "k"}}}]
    await client.create(POD, pod_manifest("patient", ["sh", "-c", 'echo "$B"'], env=env))

    async def waiting() -> bool:
        pod = await client.get(POD, "patient", NS)
        statuses = pod["status"].get("containerStatuses") or []
        state = statuses[0]["state"] if statuses else {}
        return (state.get("waiting") or {}).get("reason") == "CreateContainerConfigError"

    await eventually(waiting, within=POD_TIMEOUT, what="CreateContainerConfigError")
    await client.create(
        SECRET, {"metadata": {"name": "later", "namespace": NS}, "stringData": {"k": "v"}}
    )
    await phase_is(client, "patient", "Succeeded")
    assert await read_log(cluster.data_dir, NS, "patient", "main") == "v\n"


@pytest.mark.usefixtures("agent")
async def test_failing_container_is_restarted_until_it_succeeds(cluster: Cluster) -> None:
    # The working directory (HOME) persists across restarts: count the runs there.
    script = (
        'n=$(cat runs 2>/dev/null || echo 0); n=$((n+1)); echo $n > runs; echo "run $n"; '
        "[ $n -ge 3 ]"
    )
    client = cluster.client
    await client.create(POD, pod_manifest("flaky", ["sh", "-c", script], restart="OnFailure"))
    pod = await phase_is(client, "flaky", "Succeeded")
    status = main_status(pod)
    assert status["restartCount"] == 2
    assert status["lastState"]["terminated"]["exitCode"] == 1
    assert status["state"]["terminated"]["exitCode"] == 0
    assert await read_log(cluster.data_dir, NS, "flaky", "main") == "run 3\n"
    assert await read_log(cluster.data_dir, NS, "flaky", "main", previous=True) == "run 2\n"


@pytest.mark.usefixtures("agent")
async def test_always_restarts_with_back_off(cluster: Cluster) -> None:
    client = cluster.client
    await client.create(POD, pod_manifest("crashy", ["sh", "-c", "exit 3"], restart="Always"))

    async def restarted() -> dict[str, Any] | None:
        pod = await client.get(POD, "crashy", NS)
        statuses = pod["status"].get("containerStatuses") or []
        return pod if statuses and statuses[0]["restartCount"] >= 2 else None

    pod = await eventually(restarted, within=POD_TIMEOUT, what="two restarts")
    assert pod["status"]["phase"] == "Running"
    status = main_status(pod)
    assert status["lastState"]["terminated"]["exitCode"] == 3
    await client.delete(POD, "crashy", NS)


@pytest.mark.usefixtures("agent")
async def test_never_failing_pod_reports_the_log_as_message(cluster: Cluster) -> None:
    client = cluster.client
    await client.create(
        POD,
        pod_manifest(
            "broken",
            ["sh", "-c", "echo first; echo 'it broke'; exit 3"],
            message_policy="FallbackToLogsOnError",
        ),
    )
    pod = await phase_is(client, "broken", "Failed")
    terminated = main_status(pod)["state"]["terminated"]
    assert terminated["exitCode"] == 3
    assert terminated["reason"] == "Error"
    assert terminated["message"] == "first\nit broke\n"


@pytest.mark.usefixtures("agent")
async def test_unknown_command_is_a_start_error(cluster: Cluster) -> None:
    client = cluster.client
    await client.create(POD, pod_manifest("typo", ["no-such-command-here"]))
    pod = await phase_is(client, "typo", "Failed")
    terminated = main_status(pod)["state"]["terminated"]
    assert terminated["reason"] == "StartError"
    assert "executable file not found" in terminated["message"]


@pytest.mark.usefixtures("agent")
async def test_memory_limit_exceeded_kills_the_container(cluster: Cluster) -> None:
    hog = (
        "import time\n"
        "chunks = []\n"
        "while True:\n"
        "    chunks.append(bytearray(8 << 20))\n"
        "    time.sleep(0.01)\n"
    )
    client = cluster.client
    await client.create(
        POD, pod_manifest("hog", [sys.executable, "-c", hog], limits={"memory": "64Mi"})
    )
    pod = await phase_is(client, "hog", "Failed")
    terminated = main_status(pod)["state"]["terminated"]
    # The watchdog's SIGKILL (OOMKilled, 137) normally wins; a burst past RLIMIT_AS between
    # two samples ends in MemoryError (Error, 1) instead.
    assert (terminated["reason"], terminated["exitCode"]) in {("OOMKilled", 137), ("Error", 1)}


@pytest.mark.usefixtures("agent")
async def test_deleting_a_running_pod_kills_its_process(cluster: Cluster) -> None:
    client = cluster.client
    await client.create(POD, pod_manifest("sleeper", ["sleep", "60"], grace=1))
    pid = await running_pid(client, "sleeper")
    os.kill(pid, 0)
    await client.delete(POD, "sleeper", NS)
    await process_gone(pid)


@pytest.mark.usefixtures("agent")
async def test_pod_marked_for_deletion_is_stopped_and_reported(cluster: Cluster) -> None:
    """With a finalizer the API keeps the pod, with a deletionTimestamp: the agent stops it
    gracefully, reports how it ended, and asks for the final deletion."""
    client = cluster.client
    manifest = pod_manifest("held", ["sleep", "60"], grace=1)
    manifest["metadata"]["finalizers"] = ["example.com/hold"]
    await client.create(POD, manifest)
    pid = await running_pid(client, "held")
    await client.delete(POD, "held", NS)
    await process_gone(pid)

    pod = await phase_is(client, "held", "Failed")
    terminated = main_status(pod)["state"]["terminated"]
    assert (terminated["exitCode"], terminated.get("signal")) == (143, 15)
    await client.patch(POD, "held", {"metadata": {"finalizers": None}}, NS)

    async def deleted() -> bool:
        try:
            await client.get(POD, "held", NS)
        except NotFound:
            return True
        return False

    await eventually(deleted, what="pod deleted once its finalizer is gone")


@pytest.mark.usefixtures("agent")
async def test_pod_waits_for_a_missing_claim(cluster: Cluster) -> None:
    client = cluster.client
    await client.create(
        POD,
        pod_manifest(
            "orphan",
            ["true"],
            volumes=[{"name": "d", "persistentVolumeClaim": {"claimName": "nope"}}],
            mounts=[{"name": "d", "mountPath": "/data"}],
        ),
    )

    async def unschedulable() -> dict[str, Any] | None:
        pod = await client.get(POD, "orphan", NS)
        conditions = {c["type"]: c for c in pod["status"].get("conditions") or []}
        scheduled = conditions.get("PodScheduled") or {}
        return scheduled if scheduled.get("reason") == "Unschedulable" else None

    condition = await eventually(unschedulable, within=POD_TIMEOUT, what="Unschedulable")
    assert condition["status"] == "False"
    assert 'persistentvolumeclaim "nope" not found' in condition["message"]
    pod = await client.get(POD, "orphan", NS)
    assert pod["status"]["phase"] == "Pending"
    assert not pod["spec"].get("nodeName")


@pytest.mark.usefixtures("provisioner", "agent")
async def test_pod_gets_its_wffc_volume_as_the_data_dir(cluster: Cluster) -> None:
    client = cluster.client
    await client.create(
        PERSISTENT_VOLUME_CLAIM,
        {
            "metadata": {"name": "late", "namespace": NS},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": "local-wffc",
                "resources": {"requests": {"storage": "1Mi"}},
            },
        },
    )
    script = "echo written > $CDI_DATA_DIR/file; test ! -e $CDI_BLOCK_DEVICE"
    await client.create(
        POD,
        pod_manifest(
            "writer",
            ["sh", "-c", script],
            volumes=[{"name": "d", "persistentVolumeClaim": {"claimName": "late"}}],
            mounts=[{"name": "d", "mountPath": "/data"}],
        ),
    )
    await phase_is(client, "writer", "Succeeded")
    pvc = await client.get(PERSISTENT_VOLUME_CLAIM, "late", NS)
    assert pvc["metadata"]["annotations"]["volume.kubernetes.io/selected-node"] == "cdi-local"
    path = volume_path(await client.get(PERSISTENT_VOLUME, pvc["spec"]["volumeName"]))
    assert path is not None
    assert (path / "file").read_text() == "written\n"


@pytest.mark.usefixtures("provisioner", "agent")
async def test_a_worker_cannot_write_more_than_the_claim_holds(cluster: Cluster) -> None:
    client = cluster.client
    await client.create(
        PERSISTENT_VOLUME_CLAIM,
        {
            "metadata": {"name": "small", "namespace": NS},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "1Mi"}},
            },
        },
    )
    script = "head -c 3000000 /dev/zero > $CDI_DATA_DIR/big"
    await client.create(
        POD,
        pod_manifest(
            "greedy",
            ["sh", "-c", script],
            volumes=[{"name": "d", "persistentVolumeClaim": {"claimName": "small"}}],
            mounts=[{"name": "d", "mountPath": "/data"}],
        ),
    )
    pod = await phase_is(client, "greedy", "Failed")
    assert main_status(pod)["state"]["terminated"]["exitCode"] != 0
    pvc = await client.get(PERSISTENT_VOLUME_CLAIM, "small", NS)
    path = volume_path(await client.get(PERSISTENT_VOLUME, pvc["spec"]["volumeName"]))
    assert path is not None
    assert (path / "big").stat().st_size <= MIB


async def test_stopping_the_agent_kills_every_process(cluster: Cluster) -> None:
    client = cluster.client
    stop = asyncio.Event()
    settings = AgentSettings(poll_interval=0.1, shutdown_grace=2.0)
    agent = asyncio.create_task(
        run_agent(client, root=cluster.data_dir, stop=stop, settings=settings)
    )
    try:
        # A child that leaves the process group but stays in the session.
        script = "sleep 60 & python3 -c 'import os,time; os.setpgid(0,0); time.sleep(60)' & wait"
        await client.create(POD, pod_manifest("family", ["sh", "-c", script]))
        pid = await running_pid(client, "family")

        async def family() -> list[int] | None:
            members = session_members(pid)
            return members if len(members) >= 3 else None

        members = await eventually(family, what="three processes in the pod's session")
    finally:
        stop.set()
        await asyncio.wait_for(agent, 15)
    for member in members:
        await process_gone(member)
    assert session_members(pid) == []
    # The status is left for a restarted agent to adopt.
    pod = await client.get(POD, "family", NS)
    assert pod["status"]["phase"] == "Running"


async def test_a_restarted_agent_adopts_its_pods(cluster: Cluster) -> None:
    client = cluster.client
    settings = AgentSettings(poll_interval=0.1, shutdown_grace=2.0, backoff_base=0.1)
    # The first run sleeps until the agent stops under it; the second one succeeds.
    script = (
        "n=$(cat runs 2>/dev/null || echo 0); n=$((n+1)); echo $n > runs; [ $n -ge 2 ] || sleep 60"
    )
    await client.create(POD, pod_manifest("survivor", ["sh", "-c", script], restart="OnFailure"))

    stop = asyncio.Event()
    agent = asyncio.create_task(
        run_agent(client, root=cluster.data_dir, stop=stop, settings=settings)
    )
    runs = cluster.data_dir / "pods" / NS / "survivor" / "main" / "runs"

    async def first_run_counted() -> bool:
        return runs.exists() and runs.read_text() == "1\n"

    try:
        await running_pid(client, "survivor")
        await eventually(first_run_counted, what="the first run to count itself")
    finally:
        stop.set()
        await asyncio.wait_for(agent, 15)
    first_ip = (await client.get(POD, "survivor", NS))["status"]["podIP"]

    stop = asyncio.Event()
    agent = asyncio.create_task(
        run_agent(client, root=cluster.data_dir, stop=stop, settings=settings)
    )
    try:
        pod = await phase_is(client, "survivor", "Succeeded")
    finally:
        stop.set()
        await asyncio.wait_for(agent, 15)
    status = main_status(pod)
    assert status["restartCount"] == 1
    assert status["lastState"]["terminated"]["reason"] == "ContainerStatusUnknown"
    assert pod["status"]["podIP"] == first_ip


@pytest.mark.usefixtures("provisioner", "agent")
async def test_hand_made_importer_pod_fills_a_provisioned_volume(
    cluster: Cluster, tmp_path: Path
) -> None:
    raw = patterned_raw(tmp_path / "disk.raw", 8 * MIB + 4096)
    www = tmp_path / "www"
    www.mkdir()
    convert(raw, www / "disk.qcow2", "qcow2")
    client = cluster.client
    await client.create(
        PERSISTENT_VOLUME_CLAIM,
        {
            "metadata": {"name": "target", "namespace": NS},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "16Mi"}},
            },
        },
    )
    with BadServer(www) as server:
        env = [
            {"name": "IMPORTER_SOURCE", "value": "http"},
            {"name": "IMPORTER_ENDPOINT", "value": server.url("/disk.qcow2")},
            {"name": "IMPORTER_CONTENTTYPE", "value": "kubevirt"},
            {"name": "IMPORTER_IMAGE_SIZE", "value": "16Mi"},
            {"name": "CDI_METRICS_ADDR", "value": "off"},
        ]
        await client.create(
            POD,
            pod_manifest(
                "importer-target",
                ["cdi-importer"],
                restart="OnFailure",
                env=env,
                volumes=[
                    {"name": "cdi-data-vol", "persistentVolumeClaim": {"claimName": "target"}}
                ],
                mounts=[{"name": "cdi-data-vol", "mountPath": "/data"}],
            ),
        )
        pod = await phase_is(
            client, "importer-target", "Succeeded", "Failed", within=IMPORT_TIMEOUT
        )
    text = await read_log(cluster.data_dir, NS, "importer-target", "main")
    assert pod["status"]["phase"] == "Succeeded", text
    message = json.loads(main_status(pod)["state"]["terminated"]["message"])
    assert message["message"] == "Import Complete"
    pvc = await client.get(PERSISTENT_VOLUME_CLAIM, "target", NS)
    path = volume_path(await client.get(PERSISTENT_VOLUME, pvc["spec"]["volumeName"]))
    assert path is not None
    disk = path / "disk.img"
    assert same_image(raw, disk)
    assert disk.stat().st_size == 16 * MIB


@pytest.mark.usefixtures("provisioner", "agent")
async def test_importer_pod_fills_a_block_volume(cluster: Cluster, tmp_path: Path) -> None:
    raw = patterned_raw(tmp_path / "disk.raw", 4 * MIB + 512)
    www = tmp_path / "www"
    www.mkdir()
    convert(raw, www / "disk.qcow2", "qcow2")
    client = cluster.client
    await client.create(
        PERSISTENT_VOLUME_CLAIM,
        {
            "metadata": {"name": "blk", "namespace": NS},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "volumeMode": "Block",
                "resources": {"requests": {"storage": "8Mi"}},
            },
        },
    )
    with BadServer(www) as server:
        manifest = pod_manifest(
            "importer-blk",
            ["/usr/bin/cdi-importer"],  # an image's path: found here by its base name
            restart="OnFailure",
            env=[
                {"name": "IMPORTER_SOURCE", "value": "http"},
                {"name": "IMPORTER_ENDPOINT", "value": server.url("/disk.qcow2")},
                {"name": "CDI_METRICS_ADDR", "value": "off"},
            ],
            volumes=[{"name": "cdi-data-vol", "persistentVolumeClaim": {"claimName": "blk"}}],
        )
        manifest["spec"]["containers"][0]["volumeDevices"] = [
            {"name": "cdi-data-vol", "devicePath": "/dev/cdi-block-volume"}
        ]
        await client.create(POD, manifest)
        pod = await phase_is(client, "importer-blk", "Succeeded", "Failed", within=IMPORT_TIMEOUT)
    text = await read_log(cluster.data_dir, NS, "importer-blk", "main")
    assert pod["status"]["phase"] == "Succeeded", text
    pvc = await client.get(PERSISTENT_VOLUME_CLAIM, "blk", NS)
    device = volume_path(await client.get(PERSISTENT_VOLUME, pvc["spec"]["volumeName"]))
    assert device is not None
    assert device.stat().st_size == 8 * MIB  # a device does not change size
    assert same_image(raw, device)
