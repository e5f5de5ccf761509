"""`cdi clone` against the real embedded API server, in-process (no controllers: the tests read
the DataVolume it creates, and play the controller's part on its status for `--wait`).

The server runs with a static token file: the admin's kubeconfig is the default, and `carol`
(nothing in the source namespace) and `dave` (CDI's datavolumes/source role there) get theirs.
The CLI runs in a thread (`main` makes its own loop), as in test_dv_cli.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import pytest
import yaml

from cdi.api.groups import DATA_VOLUME, NAMESPACE, PERSISTENT_VOLUME_CLAIM, Resource
from cdi.cli.main import main
from cdi.cli.server import ServerSettings, serve
from cdi.kube.client import Client
from cdi.kube.config import load_kubeconfig
from tests.support.cluster import START_TIMEOUT, STOP_TIMEOUT, Cluster, eventually

NS: Final = "default"
SRC: Final = "golden"
TOKENS: Final = {"carol": "carol-token-clone-cli", "dave": "dave-token-clone-cli"}
RBAC: Final = "rbac.authorization.k8s.io"
ROLE = Resource(RBAC, "v1", "Role", "roles", True)
CLUSTER_ROLE = Resource(RBAC, "v1", "ClusterRole", "clusterroles", False)
ROLE_BINDING = Resource(RBAC, "v1", "RoleBinding", "rolebindings", True)
TOKEN_ANNOTATION: Final = "cdi.kubevirt.io/storage.clone.token"
STRATEGY_ANNOTATION: Final = "cdi.kubevirt.io/clone-strategy"


async def cdi(*argv: str) -> int:
    """`cdi ARGV` in a thread, as a user runs it; argparse's exits become the exit code."""

    def call() -> int:
        try:
            return main(list(argv))
        except SystemExit as done:
            return done.code if isinstance(done.code, int) else 1

    return await asyncio.to_thread(call)


def token_file(directory: Path) -> Path:
    """kube-apiserver's static token CSV with the users of `TOKENS`."""
    path = directory / "tokens.csv"
    path.write_text("".join(f"{token},{user},uid-{user}\n" for user, token in TOKENS.items()))
    return path


@contextlib.asynccontextmanager
async def server_with_users(data_dir: Path, tokens: Path) -> AsyncIterator[Cluster]:
    """`tests.support.cluster.running_server`, plus the users of `tokens`."""
    settings = ServerSettings(
        data_dir=data_dir,
        port=0,
        insecure_http=True,
        token_file=tokens,
        local_node=False,
        controllers=False,
        upload_proxy=False,
    )
    ready, stop = asyncio.Event(), asyncio.Event()
    server = asyncio.create_task(serve(settings, ready=ready, stop=stop))
    try:
        await asyncio.wait_for(ready.wait(), START_TIMEOUT)
        client = Client(load_kubeconfig(settings.kubeconfig_path), backoff=(0.1, 0.2, 0.5))
        try:
            yield Cluster(client, data_dir)
        finally:
            await client.close()
    finally:
        stop.set()
        await asyncio.wait_for(server, STOP_TIMEOUT)


def _rbac(kind: Resource, name: str, namespace: str | None = None, **body: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": kind.api_version, "kind": kind.kind, "metadata": meta, **body}


async def grant(client: Client) -> None:
    """carol and dave may use DataVolumes in `NS`; dave may also clone from `SRC`."""
    await client.create(
        NAMESPACE, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": SRC}}
    )
    dv_verbs = ["get", "list", "watch", "create"]
    await client.create(
        ROLE,
        _rbac(
            ROLE,
            "dv-user",
            NS,
            rules=[
                {"apiGroups": ["cdi.kubevirt.io"], "resources": ["datavolumes"], "verbs": dv_verbs}
            ],
        ),
    )
    await client.create(
        CLUSTER_ROLE,
        _rbac(
            CLUSTER_ROLE,
            "datavolume-cloner",
            rules=[
                {
                    "apiGroups": ["cdi.kubevirt.io"],
                    "resources": ["datavolumes/source"],
                    "verbs": ["create"],
                }
            ],
        ),
    )
    users = [{"kind": "User", "name": user, "apiGroup": RBAC} for user in TOKENS]
    await client.create(
        ROLE_BINDING,
        _rbac(
            ROLE_BINDING,
            "dv-users",
            NS,
            subjects=users,
            roleRef={"apiGroup": RBAC, "kind": "Role", "name": "dv-user"},
        ),
    )
    await client.create(
        ROLE_BINDING,
        _rbac(
            ROLE_BINDING,
            "dave-clones",
            SRC,
            subjects=[{"kind": "User", "name": "dave", "apiGroup": RBAC}],
            roleRef={"apiGroup": RBAC, "kind": "ClusterRole", "name": "datavolume-cloner"},
        ),
    )


@pytest.fixture
async def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    """The API server alone, KUBECONFIG the admin's; carol and dave set up."""
    async with server_with_users(tmp_path / "cdi", token_file(tmp_path)) as cluster:
        await grant(cluster.client)
        monkeypatch.setenv("KUBECONFIG", str(cluster.data_dir / "kubeconfig"))
        yield cluster


def kubeconfig_of(cluster: Cluster, user: str) -> str:
    doc = yaml.safe_load((cluster.data_dir / "kubeconfig").read_text())
    doc["users"] = [{"name": user, "user": {"token": TOKENS[user]}}]
    doc["contexts"][0]["context"]["user"] = user
    path = cluster.data_dir.parent / f"{user}.kubeconfig"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def pvc(name: str, namespace: str, size: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}},
    }


async def dv_names(client: Client, namespace: str = NS) -> list[str]:
    items, _ = await client.list(DATA_VOLUME, namespace)
    return [str(dv["metadata"]["name"]) for dv in items]


def no_traceback(*texts: str) -> bool:
    return not any("Traceback" in text for text in texts)


# --- the DataVolume ------------------------------------------------------------------------------
async def test_clone_creates_the_datavolume_with_every_option(
    api: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    await api.client.create(PERSISTENT_VOLUME_CLAIM, pvc("disk", SRC, "1Gi"), SRC)
    argv = [
        "clone",
        f"{SRC}/disk",
        "copy",
        "--size",
        "2Gi",
        "--strategy",
        "snapshot",
        "--storage-class",
        "local",
        "--volume-mode",
        "block",
        "--access-mode",
        "RWX",
    ]
    assert await cdi(*argv) == 0
    out, err = capsys.readouterr()
    assert (out, err) == ("datavolume/copy created\n", "")
    dv = await api.client.get(DATA_VOLUME, "copy", NS)
    assert dv["apiVersion"] == "cdi.kubevirt.io/v1beta1"
    assert dv["spec"] == {
        "source": {"pvc": {"namespace": SRC, "name": "disk"}},
        "storage": {
            "resources": {"requests": {"storage": "2Gi"}},
            "storageClassName": "local",
            "volumeMode": "Block",
            "accessModes": ["ReadWriteMany"],
        },
    }
    notes = dv["metadata"]["annotations"]
    assert notes[STRATEGY_ANNOTATION] == "snapshot"
    assert TOKEN_ANNOTATION in notes  # the admission hook's, for the admin's allowed clone

    assert await cdi(*argv) == 1
    out, err = capsys.readouterr()
    assert err == 'cdi: datavolumes.cdi.kubevirt.io "copy" already exists\n'
    assert out == ""


async def test_source_in_the_target_namespace_and_size_from_the_source(
    api: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    await api.client.create(PERSISTENT_VOLUME_CLAIM, pvc("base", NS, "1Gi"), NS)
    assert await cdi("clone", "base", "base-copy") == 0
    out, err = capsys.readouterr()
    assert (out, err) == ("datavolume/base-copy created\n", "")
    dv = await api.client.get(DATA_VOLUME, "base-copy", NS)
    assert dv["spec"] == {"source": {"pvc": {"namespace": NS, "name": "base"}}, "storage": {}}
    assert STRATEGY_ANNOTATION not in dv["metadata"]["annotations"]

    assert await cdi("clone", "base", "there", "-n", SRC) == 0
    capsys.readouterr()
    there = await api.client.get(DATA_VOLUME, "there", SRC)
    assert there["spec"]["source"] == {"pvc": {"namespace": SRC, "name": "base"}}


async def test_missing_source_is_a_warning_and_the_clone_is_created(
    api: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await cdi("clone", f"{SRC}/later", "early") == 0
    out, err = capsys.readouterr()
    assert out == "datavolume/early created\n"
    assert err == (
        f"cdi: warning: source PVC {SRC}/later does not exist yet; the clone waits for it\n"
    )
    assert await dv_names(api.client) == ["early"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["/disk", "x"], "use SRC_NS/SRC_PVC, or SRC_PVC alone"),
        (["Golden/disk", "x"], "'Golden' is not a valid namespace"),
        ([f"{SRC}/Disk_1", "x"], "'Disk_1' is not a valid PVC name"),
        ([f"{SRC}/a/b", "x"], "'golden/a' is not a valid namespace"),
        ([f"{SRC}/disk", "New.Name"], "'New.Name' is not a valid name"),
        ([f"{SRC}/disk", "x" * 254], "at most 253 characters"),
        ([f"{SRC}/disk", "x", "--size", "10Gx"], "'10Gx' is not a quantity"),
        ([f"{SRC}/disk", "x", "--size", "100Ki"], "size should be at least 1MiB"),
        ([f"{SRC}/disk", "x", "--strategy", "fast"], "invalid choice: 'fast'"),
        ([f"{SRC}/disk", "x", "--access-mode", "RWZ"], "is not an access mode"),
        ([f"{SRC}/disk", "x", "--timeout", "5s"], "add --wait"),
        ([f"{SRC}/disk"], "the following arguments are required: NEW_NAME"),
    ],
    ids=[
        "empty-namespace",
        "bad-namespace",
        "bad-source-name",
        "two-slashes",
        "bad-name",
        "long-name",
        "bad-size",
        "too-small",
        "bad-strategy",
        "bad-access-mode",
        "timeout-without-wait",
        "no-name",
    ],
)
async def test_bad_arguments_exit_2_and_create_nothing(
    api: Cluster, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert await cdi("clone", *argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert message in lines[-1], err
    assert len(lines) <= 2, err  # argparse's usage line, then the one line saying what is wrong
    assert no_traceback(out, err)
    assert await dv_names(api.client) == []


async def test_checks_that_need_the_api_exit_2_and_create_nothing(
    api: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await cdi("clone", "same", "same") == 2
    assert capsys.readouterr().err == (
        f"cdi: same: the new volume cannot be its own source ({NS}/same); pick another name\n"
    )
    assert await cdi("clone", f"{NS}/same", "same") == 2
    capsys.readouterr()
    await api.client.create(PERSISTENT_VOLUME_CLAIM, pvc("big", SRC, "2Gi"), SRC)
    assert await cdi("clone", f"{SRC}/big", "small", "--size", "1Gi") == 2
    assert capsys.readouterr().err == (
        f"cdi: --size 1Gi is smaller than the source PVC {SRC}/big (2Gi); a clone needs at "
        "least the source's size\n"
    )
    assert await dv_names(api.client) == []


# --- authorization -------------------------------------------------------------------------------
async def test_denied_cross_namespace_clone_is_one_line_exit_1(
    api: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    await api.client.create(PERSISTENT_VOLUME_CLAIM, pvc("disk", SRC, "1Gi"), SRC)
    carol = kubeconfig_of(api, "carol")
    assert await cdi("clone", f"{SRC}/disk", "mine", "--kubeconfig", carol) == 1
    out, err = capsys.readouterr()
    assert out == ""
    # carol may not read PVCs in SRC either: no warning about the source, only the refusal.
    assert err == (
        'cdi: admission webhook "datavolume-mutate.cdi.kubevirt.io" denied the request: User '
        f"carol has insufficient permissions in clone source namespace {SRC}\n"
    )
    assert await dv_names(api.client) == []

    dave = kubeconfig_of(api, "dave")
    assert await cdi("clone", f"{SRC}/disk", "mine", "--kubeconfig", dave) == 0
    assert capsys.readouterr().out == "datavolume/mine created\n"
    assert await dv_names(api.client) == ["mine"]


# --- --wait --------------------------------------------------------------------------------------
async def _set_status(client: Client, name: str, **status: Any) -> None:
    dv = await client.get(DATA_VOLUME, name, NS)
    dv["status"] = status
    await client.replace_status(DATA_VOLUME, dv)


async def _play_controller(client: Client, name: str, statuses: list[dict[str, Any]]) -> None:
    """Write `statuses` on DataVolume `name` once it exists and the CLI follows it."""

    async def exists() -> bool:
        return name in await dv_names(client)

    await eventually(exists, what=f"datavolume/{name}")
    await asyncio.sleep(1.0)  # the CLI lists and watches by then: every version reaches it
    for status in statuses:
        await _set_status(client, name, **status)
        await asyncio.sleep(0.2)


def _running(status: str, message: str = "") -> list[dict[str, str]]:
    return [{"type": "Running", "status": status, "reason": "", "message": message}]


async def test_wait_follows_the_clone_to_succeeded(
    api: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    await api.client.create(PERSISTENT_VOLUME_CLAIM, pvc("disk", SRC, "64Mi"), SRC)
    statuses = [
        {"phase": "CloneScheduled", "progress": "N/A", "conditions": _running("False")},
        {"phase": "CloneInProgress", "progress": "45.00%", "conditions": _running("True")},
        {"phase": "Succeeded", "progress": "100.0%", "conditions": _running("False")},
    ]
    controller = asyncio.create_task(_play_controller(api.client, "followed", statuses))
    code = await cdi("clone", f"{SRC}/disk", "followed", "--wait", "--timeout", "30s")
    await controller
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.splitlines() == [
        "datavolume/followed created",
        "CloneScheduled N/A",
        "CloneInProgress 45.00%",
        "Succeeded 100.0%",
        "datavolume/followed Succeeded",
    ]
    assert err == ""


async def test_wait_ends_with_the_failure_message(
    api: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    failed = {
        "phase": "Failed",
        "progress": "N/A",
        "conditions": _running("False", "source volume mode Block, target Filesystem"),
    }
    controller = asyncio.create_task(_play_controller(api.client, "doomed", [failed]))
    code = await cdi("clone", f"{SRC}/absent", "doomed", "--wait")
    await controller
    out, err = capsys.readouterr()
    assert code == 1
    assert out.splitlines()[0] == "datavolume/doomed created"
    assert err.splitlines() == [
        f"cdi: warning: source PVC {SRC}/absent does not exist yet; the clone waits for it",
        "cdi: datavolume/doomed failed: source volume mode Block, target Filesystem",
    ]


async def test_wait_times_out_saying_where_it_was(
    api: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await cdi("clone", f"{SRC}/absent", "slow", "--wait", "--timeout", "1s") == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == (
        "cdi: timed out after 1s waiting for datavolume/slow to be Succeeded (no phase yet)"
    )


# --- help ----------------------------------------------------------------------------------------
async def test_help_explains_with_examples(capsys: pytest.CaptureFixture[str]) -> None:
    assert await cdi("clone", "--help") == 0
    text = capsys.readouterr().out
    assert "examples:" in text
    assert "cdi clone golden/fedora-40 my-fedora --wait" in text
    assert "datavolumes/source" in text
    assert "cdi.kubevirt.io/clone-strategy" in text
