"""`cdi import`, `cdi get dv` and `cdi wait dv` against the real local stack.

The stack (API server, provisioner, node agent, controllers) runs on the test's event loop, so
the CLI runs in a thread (`main` makes its own loop) or, for Ctrl-C, as a subprocess. Images are
made with qemu-img and served by BadServer; outputs are read as a user would read them.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import os
import random
import re
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console

from cdi.api.groups import DATA_VOLUME
from cdi.cli.cluster import format_duration, parse_duration
from cdi.cli.datavolumes import goal_arg
from cdi.cli.main import main
from cdi.cli.progress import BarDisplay, LineDisplay, Transfer
from cdi.cli.tables import human_duration
from cdi.kube.client import Client
from tests.support.cluster import Cluster
from tests.support.dv import NS, disk_of, dv_in
from tests.support.httpserver import BadServer
from tests.support.images import MIB, convert, patterned_raw, same_image

CDI_BIN = Path(sys.executable).parent / "cdi"
PERCENT_LINE = re.compile(r"^ImportInProgress (\d+\.\d+)%$")


async def cdi(*argv: str) -> int:
    """`cdi ARGV` in a thread, as a user runs it; argparse's exits become the exit code."""

    def call() -> int:
        try:
            return main(list(argv))
        except SystemExit as done:
            return done.code if isinstance(done.code, int) else 1

    return await asyncio.to_thread(call)


@pytest.fixture
def stack_kube(stack: Cluster, monkeypatch: pytest.MonkeyPatch) -> Cluster:
    monkeypatch.setenv("KUBECONFIG", str(stack.data_dir / "kubeconfig"))
    return stack


@pytest.fixture
def api_kube(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> Cluster:
    """The API server alone (no controllers): for what needs objects but no import."""
    monkeypatch.setenv("KUBECONFIG", str(cluster.data_dir / "kubeconfig"))
    return cluster


def dense_qcow2(tmp_path: Path, size: int) -> tuple[Path, Path]:
    """A qcow2 with data in every cluster (so that a throttled server takes its time) and its
    raw original; the qcow2 is in tmp_path/www."""
    raw = tmp_path / "dense.raw"
    raw.write_bytes(random.Random(size).randbytes(size))
    www = tmp_path / "www"
    www.mkdir(exist_ok=True)
    return raw, convert(raw, www / "disk.qcow2", "qcow2")


async def dv_names(client: Client, namespace: str | None = NS) -> list[str]:
    items, _ = await client.list(DATA_VOLUME, namespace)
    return [str(dv["metadata"]["name"]) for dv in items]


def no_traceback(*texts: str) -> bool:
    return not any("Traceback" in text for text in texts)


# --- cdi import ----------------------------------------------------------------------------------
async def test_import_wait_shows_progress_and_fills_the_volume(
    stack_kube: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw, _ = dense_qcow2(tmp_path, 8 * MIB)
    with BadServer(tmp_path / "www") as server:
        # One paced stream (no ranges: the importer downloads to scratch, counting bytes), so
        # the progress moves steadily for about 4 s; parallel ranged reads would finish in one.
        server.behave("/disk.qcow2", throttle=2_000_000, ignore_range=True, no_accept_ranges=True)
        code = await cdi(
            "import", "web", "--url", server.url("/disk.qcow2"), "--size", "64Mi", "--wait"
        )
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "datavolume/web created"
    assert lines[-2] == "Succeeded 100.0%"
    assert lines[-1] == "datavolume/web Succeeded"
    percents = [float(m.group(1)) for line in lines if (m := PERCENT_LINE.match(line))]
    assert any(0 < p < 100 for p in percents), out
    # Never a flood: a line per phase change, new message or whole percent moved, nothing else.
    for before, after in itertools.pairwise(lines):
        if (a := PERCENT_LINE.match(before)) and (b := PERCENT_LINE.match(after)):
            assert abs(float(b.group(1)) - float(a.group(1))) >= 1.0, out
    assert same_image(raw, await disk_of(stack_kube.client, "web"))
    assert no_traceback(out, err)


async def test_import_blank_wait(stack_kube: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    code = await cdi("import", "empty", "--blank", "--size", "8Mi", "--wait", "--timeout", "30s")
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.splitlines()[-1] == "datavolume/empty Succeeded"
    dv = await stack_kube.client.get(DATA_VOLUME, "empty", NS)
    assert dv["spec"] == {
        "source": {"blank": {}},
        "storage": {"resources": {"requests": {"storage": "8Mi"}}},
    }


async def test_import_404_times_out_saying_why(
    stack_kube: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    www = tmp_path / "www"
    www.mkdir()
    with BadServer(www) as server:
        code = await cdi(
            "import",
            "late",
            "--url",
            server.url("/nothing.qcow2"),
            "--size",
            "64Mi",
            "--wait",
            "--timeout",
            "5s",
        )
    out, err = capsys.readouterr()
    assert code == 1
    # The retry's reason is shown while waiting, and again in the final line.
    assert any("404" in line for line in out.splitlines()), out
    [line] = err.strip().splitlines()
    assert line.startswith("cdi: timed out after 5s waiting for datavolume/late to be Succeeded")
    assert "404" in line
    assert no_traceback(out, err)


async def test_checksum_mismatch_fails_import_and_wait(
    stack_kube: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = patterned_raw(tmp_path / "disk.raw", 4 * MIB)
    www = tmp_path / "www"
    www.mkdir()
    convert(raw, www / "disk.qcow2", "qcow2")
    wrong = "sha256:" + "0" * 64
    with BadServer(www) as server:
        code = await cdi(
            "import",
            "sum",
            "--url",
            server.url("/disk.qcow2"),
            "--checksum",
            wrong,
            "--size",
            "64Mi",
            "--wait",
        )
    out, err = capsys.readouterr()
    assert code == 1, out
    [line] = err.strip().splitlines()
    assert line.startswith("cdi: datavolume/sum failed: ")
    assert "checksum mismatch" in line
    dv = await stack_kube.client.get(DATA_VOLUME, "sum", NS)
    assert dv["status"]["phase"] == "Failed"
    assert dv["spec"]["source"]["http"]["checksum"] == wrong

    code = await cdi("wait", "dv", "sum", "--for=Succeeded", "--timeout", "10s")
    out, err = capsys.readouterr()
    assert code == 1
    assert "datavolume/sum failed" in err
    assert "checksum mismatch" in err
    assert no_traceback(out, err)


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["--url", "http://x/d.img", "--size", "10Gx"], 2, "'10Gx' is not a quantity"),
        (["--url", "ftp://x/d.img", "--size", "1Gi"], 2, "is not an http:// or https:// URL"),
        (["--s3", "s3://bucket/key", "--size", "1Gi"], 2, "https://HOST/BUCKET/KEY"),
        (["--s3", "https://host/only-bucket", "--size", "1Gi"], 2, "not an S3 object URL"),
        (["--size", "1Gi"], 2, "one of the arguments --url --s3 --blank is required"),
        (["--url", "http://x/d", "--blank", "--size", "1Gi"], 2, "not allowed with"),
        (["--blank", "--size", "100Ki"], 2, "storage size should be at least 1MiB"),
        (["--url", "http://x/d", "--size", "1Gi", "--checksum", "sha256:12"], 2, "checksum"),
        (["--blank", "--size", "1Gi", "--secret", "s"], 2, "a blank disk has no source"),
        (["--blank", "--size", "1Gi", "--timeout", "5s"], 2, "add --wait"),
        (["--blank", "--size", "1Gi", "--wait", "--timeout", "5 min"], 2, "is not a duration"),
        (["--blank", "--size", "1Gi", "--content-type", "archive"], 2, "cannot be blank"),
        (["--blank", "--size", "1Gi", "--access-mode", "RWZ"], 2, "is not an access mode"),
    ],
    ids=[
        "bad-size",
        "ftp",
        "s3-scheme",
        "s3-no-key",
        "no-source",
        "two-sources",
        "too-small",
        "bad-checksum",
        "blank-secret",
        "timeout-without-wait",
        "bad-duration",
        "blank-archive",
        "bad-access-mode",
    ],
)
async def test_bad_import_arguments_create_nothing(
    api_kube: Cluster,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    code: int,
    message: str,
) -> None:
    assert await cdi("import", "bad", *argv) == code
    out, err = capsys.readouterr()
    assert message in err.strip().splitlines()[-1], err
    # argparse's own shape: the short usage line, then one line saying what is wrong.
    assert len(err.strip().splitlines()) <= 2, err
    assert no_traceback(out, err)
    assert await dv_names(api_kube.client) == []


async def test_import_spec_and_already_exists(
    api_kube: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "import",
        "full",
        "--s3",
        "http://127.0.0.1:9/bucket/dir/disk.img",
        "--secret",
        "creds",
        "--cert-configmap",
        "ca",
        "--size",
        "2Gi",
        "--storage-class",
        "local",
        "--volume-mode",
        "block",
        "--access-mode",
        "RWX",
        "--access-mode",
        "ReadWriteOnce",
        "--content-type",
        "archive",
        "--preallocation",
    ]
    assert await cdi(*argv) == 0
    assert capsys.readouterr().out == "datavolume/full created\n"
    dv = await api_kube.client.get(DATA_VOLUME, "full", NS)
    assert dv["apiVersion"] == "cdi.kubevirt.io/v1beta1"
    assert dv["spec"] == {
        "source": {
            "s3": {
                "url": "http://127.0.0.1:9/bucket/dir/disk.img",
                "secretRef": "creds",
                "certConfigMap": "ca",
            }
        },
        "storage": {
            "resources": {"requests": {"storage": "2Gi"}},
            "storageClassName": "local",
            "volumeMode": "Block",
            "accessModes": ["ReadWriteMany", "ReadWriteOnce"],
        },
        "contentType": "archive",
        "preallocation": True,
    }
    assert await cdi(*argv) == 1
    out, err = capsys.readouterr()
    assert err == 'cdi: datavolumes.cdi.kubevirt.io "full" already exists\n'
    assert out == ""


async def test_namespace_from_flag_and_from_the_context(
    api_kube: Cluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert await cdi("import", "there", "--blank", "--size", "8Mi", "-n", "kube-public") == 0
    assert await dv_names(api_kube.client, "kube-public") == ["there"]
    config = yaml.safe_load((api_kube.data_dir / "kubeconfig").read_text())
    config["contexts"][0]["context"]["namespace"] = "cdi"
    other = tmp_path / "other-kubeconfig"
    other.write_text(yaml.safe_dump(config))
    monkeypatch.delenv("KUBECONFIG")
    assert await cdi("import", "here", "--blank", "--size", "8Mi", "--kubeconfig", str(other)) == 0
    assert await dv_names(api_kube.client, "cdi") == ["here"]
    assert await dv_names(api_kube.client, NS) == []
    capsys.readouterr()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.mark.parametrize("command", ["import", "get", "wait"])
async def test_unreachable_server_is_one_line(
    api_kube: Cluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: str,
) -> None:
    port = closed_port()
    config = yaml.safe_load((api_kube.data_dir / "kubeconfig").read_text())
    config["clusters"][0]["cluster"]["server"] = f"http://127.0.0.1:{port}"
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("KUBECONFIG", str(path))
    argv = {
        "import": ["import", "x", "--blank", "--size", "8Mi"],
        "get": ["get", "dv"],
        "wait": ["wait", "dv", "x", "--for=Succeeded", "--timeout", "30s"],
    }[command]
    assert await cdi(*argv) == 1
    out, err = capsys.readouterr()
    assert err == (
        f"cdi: cannot reach the API server at http://127.0.0.1:{port}: is `cdi server` running?\n"
    )
    assert out == ""
    assert await dv_names(api_kube.client) == []


async def test_missing_configuration_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "nowhere"))
    assert await cdi("get", "dv") == 1
    assert capsys.readouterr().err.startswith("cdi: cannot read kubeconfig ")
    monkeypatch.delenv("KUBECONFIG")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert await cdi("import", "x", "--blank", "--size", "8Mi") == 1
    out, err = capsys.readouterr()
    assert err == (
        "cdi: no Kubernetes configuration: set KUBECONFIG (cdi server writes "
        "<data-dir>/kubeconfig)\n"
    )
    assert out == ""


# --- cdi get dv ----------------------------------------------------------------------------------
async def test_get_table_all_namespaces_and_outputs(
    stack_kube: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await cdi("get", "dv") == 0
    out, err = capsys.readouterr()
    assert (out, err) == ("", "No resources found in default namespace.\n")
    assert await cdi("import", "one", "--blank", "--size", "8Mi", "--wait") == 0
    assert await cdi("import", "two", "--blank", "--size", "8Mi", "-n", "cdi") == 0
    await dv_in(stack_kube.client, "two", "Succeeded", namespace="cdi")
    capsys.readouterr()

    assert await cdi("get", "dv") == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["NAME", "PHASE", "PROGRESS", "RESTARTS", "AGE"]
    assert [row.split()[:4] for row in rows] == [["one", "Succeeded", "100.0%", "0"]]
    assert re.fullmatch(r"\d+s", rows[0].split()[4])
    # Columns line up under their headers, as kubectl's do.
    assert rows[0].index("Succeeded") == header.index("PHASE")

    assert await cdi("get", "datavolumes", "-A") == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split()[:2] == ["NAMESPACE", "NAME"]
    assert sorted(row.split()[:3] for row in rows) == [
        ["cdi", "two", "Succeeded"],
        ["default", "one", "Succeeded"],
    ]

    assert await cdi("get", "dv", "-o", "wide") == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split()[-3:] == ["SIZE", "SOURCE", "MESSAGE"]
    assert "8Mi" in row.split()
    assert "blank" in row.split()

    assert await cdi("get", "dv", "one", "-o", "json") == 0
    one = json.loads(capsys.readouterr().out)
    assert one["metadata"]["name"] == "one"
    assert one["status"]["phase"] == "Succeeded"
    assert await cdi("get", "dvs", "-A", "-o", "json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["kind"] == "List"
    assert sorted(i["metadata"]["name"] for i in listed["items"]) == ["one", "two"]
    assert await cdi("get", "dv", "two", "-n", "cdi", "-o", "yaml") == 0
    assert yaml.safe_load(capsys.readouterr().out)["metadata"]["namespace"] == "cdi"

    assert await cdi("get", "dv", "missing") == 1
    out, err = capsys.readouterr()
    assert err == 'cdi: datavolumes.cdi.kubevirt.io "missing" not found\n'
    assert out == ""
    assert await cdi("get", "dv", "one", "-A") == 2
    assert "across all namespaces" in capsys.readouterr().err


async def test_get_watch_prints_changes_until_ctrl_c(stack_kube: Cluster, tmp_path: Path) -> None:
    dense_qcow2(tmp_path, 4 * MIB)
    env = {**os.environ, "KUBECONFIG": str(stack_kube.data_dir / "kubeconfig")}
    proc = await asyncio.create_subprocess_exec(
        str(CDI_BIN),
        "get",
        "dv",
        "-w",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    try:
        # Listed (nothing yet): from here on every change arrives as a watch event.
        first = await asyncio.wait_for(proc.stderr.readline(), 20)
        assert first == b"No resources found in default namespace.\n"
        with BadServer(tmp_path / "www") as server:
            server.behave(
                "/disk.qcow2", throttle=2_000_000, ignore_range=True, no_accept_ranges=True
            )
            await stack_kube.client.create(DATA_VOLUME, _http_dv("watched", server))
            lines: list[str] = []
            async with asyncio.timeout(40):
                while not (lines and "Succeeded" in lines[-1]):
                    raw = await proc.stdout.readline()
                    assert raw, f"cdi get -w stopped early after {lines}"
                    lines.append(raw.decode().rstrip("\n"))
        proc.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(proc.wait(), 20)
        rest = (await proc.stdout.read()).decode()
        err = (await proc.stderr.read()).decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert code == 0, err
    assert no_traceback(err, rest)
    header, *rows = lines
    assert header.split() == ["NAME", "PHASE", "PROGRESS", "RESTARTS", "AGE"]
    phases = [row.split()[1] for row in rows if len(row.split()) > 4]
    assert len(rows) > 2, lines
    assert phases[-1] == "Succeeded"
    assert "ImportInProgress" in phases, lines
    # A row only when something changed (the age moving alone is no change).
    shown = [row.split()[:-1] for row in rows]
    assert all(a != b for a, b in itertools.pairwise(shown)), lines
    # The columns keep the header's alignment, ImportInProgress included.
    full = [row for row in rows if len(row.split()) == 5]
    assert all(row.index(row.split()[1]) == header.index("PHASE") for row in full), lines


async def test_ctrl_c_stops_waiting_not_the_import(stack_kube: Cluster, tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    env = {**os.environ, "KUBECONFIG": str(stack_kube.data_dir / "kubeconfig")}
    with BadServer(www) as server:
        proc = await asyncio.create_subprocess_exec(
            str(CDI_BIN),
            "import",
            "patient",
            "--url",
            server.url("/later.qcow2"),
            "--size",
            "64Mi",
            "--wait",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        try:
            first = await asyncio.wait_for(proc.stdout.readline(), 20)
            assert first == b"datavolume/patient created\n"
            proc.send_signal(signal.SIGINT)
            out, err = await asyncio.wait_for(proc.communicate(), 20)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 1
    assert no_traceback(out.decode(), err.decode())
    assert err.decode() == (
        "cdi: stopped waiting; datavolume/patient goes on importing "
        "(follow it with `cdi get dv patient -w`)\n"
    )
    assert await dv_names(stack_kube.client) == ["patient"]


def _http_dv(name: str, server: BadServer) -> dict[str, Any]:
    return {
        "apiVersion": DATA_VOLUME.api_version,
        "kind": DATA_VOLUME.kind,
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "source": {"http": {"url": server.url("/disk.qcow2")}},
            "storage": {"resources": {"requests": {"storage": "64Mi"}}},
        },
    }


# --- cdi wait dv ---------------------------------------------------------------------------------
async def test_wait_for_phase_and_condition_even_before_it_exists(
    stack_kube: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    waiting = asyncio.create_task(cdi("wait", "dv", "soon", "--for=Succeeded", "--timeout", "30s"))
    await asyncio.sleep(1.0)
    assert not waiting.done()
    assert await cdi("import", "soon", "--blank", "--size", "8Mi") == 0
    assert await waiting == 0
    assert capsys.readouterr().out.splitlines() == [
        "datavolume/soon created",
        "datavolume/soon condition met",
    ]
    assert await cdi("wait", "datavolume", "soon", "--for=condition=Ready") == 0
    assert capsys.readouterr().out == "datavolume/soon condition met\n"
    assert await cdi("wait", "dv", "soon", "--for", "condition=ready=false", "--timeout", "1s") == 1
    err = capsys.readouterr().err
    assert err == (
        "cdi: timed out after 1s waiting for datavolume/soon to have condition Ready=False "
        "(phase Succeeded, 100.0%)\n"
    )


async def test_wait_times_out_and_refuses_bad_goals(
    api_kube: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await cdi("wait", "dv", "never", "--for=Succeeded", "--timeout", "1s") == 1
    err = capsys.readouterr().err
    assert err == (
        "cdi: timed out after 1s waiting for datavolume/never to be Succeeded (it does not exist)\n"
    )
    assert await cdi("import", "stuck", "--blank", "--size", "8Mi") == 0
    assert await cdi("wait", "dv", "stuck", "--for=succeeded", "--timeout", "500ms") == 1
    # No controllers here: the DataVolume never gets a phase.
    assert "datavolume/stuck to be Succeeded (no phase yet)" in capsys.readouterr().err
    for goal in ("Done", "jsonpath={.status}", "condition="):
        assert await cdi("wait", "dv", "stuck", f"--for={goal}") == 2
        assert "--for" in capsys.readouterr().err


# --- help ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["import", "get", "wait"])
async def test_help_has_examples(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert await cdi(command, "--help") == 0
    text = capsys.readouterr().out
    assert "examples:" in text
    assert f"cdi {command} " in text.split("examples:")[1]


async def test_wait_help_says_missing_is_waited_for(capsys: pytest.CaptureFixture[str]) -> None:
    assert await cdi("wait", "--help") == 0
    assert "does not exist yet is waited for" in capsys.readouterr().out


# --- the pieces, on their own --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "seconds", "spelled"),
    [
        ("90s", 90, "1m30s"),
        ("10m", 600, "10m"),
        ("1h", 3600, "1h"),
        ("1h30m", 5400, "1h30m"),
        ("30", 30, "30s"),
        ("500ms", 0.5, "0.5s"),
        ("2.5m", 150, "2m30s"),
    ],
)
def test_durations(text: str, seconds: float, spelled: str) -> None:
    assert parse_duration(text) == seconds
    assert format_duration(seconds) == spelled


@pytest.mark.parametrize("text", ["", "10 m", "m", "-5s", "0", "1d", "5s3", "inf", "nan"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "age"),
    [
        (-5, "<invalid>"),
        (0, "0s"),
        (119, "119s"),
        (125, "2m5s"),
        (600, "10m"),
        (7260, "121m"),
        (4 * 3600 + 60, "4h1m"),
        (30 * 3600, "30h"),
        (3 * 86400, "3d"),
        (400 * 86400, "400d"),
        (3 * 365 * 86400, "3y"),
        (10 * 365 * 86400, "10y"),
    ],
)
def test_ages_as_kubectl(seconds: int, age: str) -> None:
    assert human_duration(seconds) == age


def test_goals() -> None:
    assert goal_arg("Succeeded").phase == "Succeeded"
    assert goal_arg("phase=importinprogress").phase == "ImportInProgress"
    assert goal_arg("condition=Ready").condition == ("Ready", "True")
    assert goal_arg("condition=running=false").condition == ("Running", "False")


def _dv(phase: str, progress: str, message: str = "") -> dict[str, Any]:
    running = {"type": "Running", "status": "False", "reason": "Error", "message": message}
    return {"status": {"phase": phase, "progress": progress, "conditions": [running]}}


def test_line_display_prints_only_real_changes() -> None:
    out = io.StringIO()
    with LineDisplay(out) as display:
        display.update({})
        display.update(_dv("ImportScheduled", "N/A"))
        display.update(_dv("ImportScheduled", "N/A", "Unable to connect: 404\nNot Found"))
        display.update(_dv("ImportScheduled", "N/A", "Unable to connect: 404\nNot Found"))
        for tenth in range(1001):
            display.update(_dv("ImportInProgress", f"{tenth / 10:.2f}%"))
        display.update(_dv("Succeeded", "100.0%", "Import Complete"))
    lines = out.getvalue().splitlines()
    assert lines[:3] == [
        "ImportScheduled N/A",
        "ImportScheduled N/A: Unable to connect: 404 Not Found",
        "ImportInProgress 0.00%",
    ]
    assert lines[-1] == "Succeeded 100.0%"
    assert len(lines) == 3 + 100 + 1


def test_bar_display_renders_phase_percent_rate_and_message() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160, color_system=None)
    with BarDisplay(console, name="disk", size=100 * 10**6) as display:
        display.update(_dv("ImportScheduled", "N/A", "Unable to connect: 404"))
        display.update(_dv("ImportInProgress", "10.00%"))
        display.update(_dv("ImportInProgress", "60.00%"))
        display.update(_dv("Succeeded", "100.0%"))
    text = out.getvalue()
    assert "ImportScheduled: Unable to connect: 404" in text
    assert "datavolume/disk" in text
    assert "60.00%" in text
    assert re.search(r"~\d+(\.\d)? [kMG]?B/s", text), text


def test_transfer_reads_status() -> None:
    transfer = Transfer.of(_dv("ImportInProgress", "42.10%", "retrying"))
    assert transfer.percent == pytest.approx(42.1)
    assert transfer.describe() == "phase ImportInProgress, 42.10%"
    assert transfer.message == "retrying"
    assert Transfer.of({}).describe() == "no phase yet"
    assert Transfer.of(_dv("Pending", "N/A")).percent is None
