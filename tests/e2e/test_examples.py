"""The manifests of `examples/` against the whole `cdi server` (a subprocess), with kubectl.

Each example is applied as it is written, except what can only be known in the test (the URL
of the test's image server, its CA): those fields are changed in the parsed documents, which are
then written to a file and applied with `kubectl apply -f`. Every example validates with a
server-side dry run; the http, blank, archive, authenticated https, s3 and WaitForFirstConsumer
ones import for real, and what kubectl shows of them (`get dv`, `get dv -w`, `wait`,
annotations, conditions) is checked, as are the bytes in the volume.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.e2e.conftest import (
    EXAMPLES,
    Obj,
    annotations_of,
    apply,
    conditions,
    disk_path,
    dv_status,
    example,
    get_json,
    names,
    no_pods,
    only,
    run_watch,
    volume_dir,
    wait_phase,
)
from tests.support.cdiserver import CdiServer, poll, worker_processes
from tests.support.httpserver import BadServer
from tests.support.images import MIB, convert, patterned_raw, same_image

EXAMPLE_FILES = sorted(p.name for p in EXAMPLES.glob("*.yaml"))
DV_COLUMNS = ["NAME", "PHASE", "PROGRESS", "RESTARTS", "AGE"]


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, Path]:
    """(raw image, directory to serve holding it as disk.qcow2)."""
    raw = patterned_raw(tmp_path / "disk.raw", 8 * MIB)
    www = tmp_path / "www"
    www.mkdir()
    convert(raw, www / "disk.qcow2", "qcow2")
    return raw, www


def _no_workers(server: CdiServer) -> bool:
    assert server.proc is not None
    return not worker_processes(server.data_dir, exclude=[server.proc.pid])


def test_examples_are_there() -> None:
    assert set(EXAMPLE_FILES) >= {
        "dv-archive.yaml",
        "dv-blank-block.yaml",
        "dv-blank.yaml",
        "dv-http-auth.yaml",
        "dv-http.yaml",
        "dv-s3.yaml",
        "dv-wffc.yaml",
        "pod-consumer.yaml",
    }
    for name in EXAMPLE_FILES:
        assert (EXAMPLES / name).read_text().startswith("# "), f"{name} has no comment header"
    assert (EXAMPLES / "README.md").exists()


def test_examples_validate_with_server_dry_run(full_server: CdiServer, ns: str) -> None:
    """`kubectl apply --dry-run=server -f examples/`, as the README says: every document is
    accepted (schema validation included) and nothing is created."""
    result = full_server.kubectl("apply", "--dry-run=server", "-n", ns, "-f", str(EXAMPLES))
    lines = result.stdout.splitlines()
    assert len(lines) == sum(len(example(name)) for name in EXAMPLE_FILES), result.stdout
    assert all(line.endswith("(server dry run)") for line in lines), result.stdout
    for name in EXAMPLE_FILES:
        for doc in example(name):
            group = doc["apiVersion"].rpartition("/")[0]
            kind = doc["kind"].lower() + (f".{group}" if group else "")
            line = f"{kind}/{doc['metadata']['name']} created (server dry run)"
            assert line in lines, (name, result.stdout)
    for kind in ("datavolumes", "persistentvolumeclaims", "pods", "secrets", "configmaps"):
        assert names(full_server, kind, ns) == [], kind


def test_http_example_imports(full_server: CdiServer, ns: str, image: tuple[Path, Path]) -> None:
    raw, www = image
    docs = example("dv-http.yaml")
    dv = only(docs, "DataVolume")
    name = dv["metadata"]["name"]
    with BadServer(www) as web:
        dv["spec"]["source"]["http"]["url"] = web.url("/disk.qcow2")
        out = apply(full_server, docs, ns)
        assert f"datavolume.cdi.kubevirt.io/{name} created" in out
        status = wait_phase(full_server, ns, name)
    assert status["progress"] == "100.0%"
    assert status["claimName"] == name
    conds = conditions(status)
    assert conds["Bound"]["status"] == "True"
    assert conds["Ready"]["status"] == "True"
    assert conds["Running"]["status"] == "False"
    assert conds["Running"]["reason"] == "Completed"

    table = full_server.kubectl("get", "dv", "-n", ns).stdout.splitlines()
    assert table[0].split() == DV_COLUMNS
    row = table[1].split()
    assert row[:4] == [name, "Succeeded", "100.0%", "0"], table

    found = annotations_of(full_server, "pvc", name, ns)
    assert found["cdi.kubevirt.io/storage.pod.phase"] == "Succeeded"
    assert found["cdi.kubevirt.io/storage.import.endpoint"] == dv["spec"]["source"]["http"]["url"]
    assert found["cdi.kubevirt.io/storage.import.source"] == "http"
    assert found["cdi.kubevirt.io/storage.contentType"] == "kubevirt"
    assert found["cdi.kubevirt.io/storage.import.importPodName"] == f"importer-{name}"

    described = full_server.kubectl("describe", "dv", name, "-n", ns).stdout
    assert "Succeeded" in described
    assert "Completed" in described

    assert same_image(raw, disk_path(full_server, ns, name))
    poll(lambda: no_pods(full_server, ns), timeout=15, what="the importer pod deleted")
    poll(lambda: _no_workers(full_server), timeout=10, what="no importer process left")
    assert names(full_server, "pvc", ns) == [name]


def test_get_dv_watch_shows_the_phases(
    full_server: CdiServer, ns: str, image: tuple[Path, Path]
) -> None:
    raw, www = image
    docs = example("dv-http.yaml")
    dv = only(docs, "DataVolume")
    name = dv["metadata"]["name"]
    lines: list[str] = []
    succeeded = threading.Event()
    watch = run_watch(full_server, "dv", "-n", ns)

    def read() -> None:
        assert watch.stdout is not None
        for line in watch.stdout:
            lines.append(line.rstrip("\n"))
            if " Succeeded " in line:
                succeeded.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        with BadServer(www) as web:
            # One stream, no ranges, 2 MB/s: a few seconds through the scratch volume.
            web.behave("/disk.qcow2", throttle=2_000_000, ignore_range=True, no_accept_ranges=True)
            dv["spec"]["source"]["http"]["url"] = web.url("/disk.qcow2")
            apply(full_server, docs, ns)
            assert succeeded.wait(60), "\n".join(lines)
    finally:
        watch.terminate()
        watch.wait(10)
        reader.join(10)
    assert watch.stdout is not None
    watch.stdout.close()
    assert lines[0].split() == DV_COLUMNS, lines
    # A DataVolume with no status yet shows only its name and age (empty columns), as with CDI.
    rows = [line.split() for line in lines[1:] if len(line.split()) == len(DV_COLUMNS)]
    assert all(row[0] == name for row in rows), lines
    phases = [row[1] for row in rows]
    first_done = phases.index("Succeeded")
    assert {"ImportScheduled", "ImportInProgress"} & set(phases[:first_done]), lines
    assert rows[first_done][2] == "100.0%", lines
    assert all(re.fullmatch(r"N/A|\d{1,3}\.\d\d?%", row[2]) for row in rows), lines
    assert same_image(raw, disk_path(full_server, ns, name))


def test_blank_examples_succeed(full_server: CdiServer, ns: str) -> None:
    fs = only(example("dv-blank.yaml"), "DataVolume")["metadata"]["name"]
    block = only(example("dv-blank-block.yaml"), "DataVolume")["metadata"]["name"]
    apply(full_server, example("dv-blank.yaml"), ns)
    apply(full_server, example("dv-blank-block.yaml"), ns)
    for name in (fs, block):
        status = wait_phase(full_server, ns, name)
        assert status["progress"] == "100.0%"
        assert conditions(status)["Ready"]["status"] == "True"
    disk = disk_path(full_server, ns, fs)
    assert disk.name == "disk.img"
    assert disk.stat().st_size >= 1000 * MIB
    assert disk.stat().st_blocks * 512 < 16 * MIB  # sparse: nothing written
    device = volume_dir(full_server, ns, block)
    assert device.is_file()
    assert device.stat().st_size == 1 << 30
    poll(lambda: no_pods(full_server, ns), timeout=15, what="no importer pod left")


def _archive_content(tmp_path: Path) -> Path:
    content = tmp_path / "content"
    (content / "sub").mkdir(parents=True)
    (content / "hello.txt").write_text("hello from the archive\n")
    (content / "sub" / "data.bin").write_bytes(bytes(range(256)) * 64)
    return content


def _import_archive(server: CdiServer, ns: str, www: Path) -> tuple[str, Obj]:
    """dv-archive.yaml pointed at www/files.tar; (name, status) once it Succeeded or its
    importer failed once."""
    docs = example("dv-archive.yaml")
    dv = only(docs, "DataVolume")
    name = dv["metadata"]["name"]
    assert dv["spec"]["contentType"] == "archive"
    with BadServer(www) as web:
        dv["spec"]["source"]["http"]["url"] = web.url("/files.tar")
        apply(server, docs, ns)

        def settled() -> Obj | None:
            status = dv_status(server, ns, name)
            failed = conditions(status).get("Running", {}).get("reason") == "Error"
            return status if status.get("phase") == "Succeeded" or failed else None

        status: Obj = poll(settled, timeout=60, interval=0.5, what=f"dv {name} settled")
    return name, status


def test_archive_example_unpacks(full_server: CdiServer, ns: str, tmp_path: Path) -> None:
    content = _archive_content(tmp_path)
    www = tmp_path / "www"
    www.mkdir()
    with tarfile.open(www / "files.tar", "w") as tar:  # as `cd content && tar -cf files.tar *`
        for entry in sorted(content.iterdir()):
            tar.add(entry, arcname=entry.name)
    name, status = _import_archive(full_server, ns, www)
    assert status["phase"] == "Succeeded", status
    volume = volume_dir(full_server, ns, name)
    assert (volume / "hello.txt").read_text() == "hello from the archive\n"
    assert (volume / "sub" / "data.bin").read_bytes() == bytes(range(256)) * 64
    assert not (volume / "disk.img").exists()
    found = annotations_of(full_server, "pvc", name, ns)
    assert found["cdi.kubevirt.io/storage.contentType"] == "archive"


def test_archive_of_dot_unpacks(full_server: CdiServer, ns: str, tmp_path: Path) -> None:
    content = _archive_content(tmp_path)
    www = tmp_path / "www"
    www.mkdir()
    with tarfile.open(www / "files.tar", "w") as tar:  # as `tar -C content -cf files.tar .`
        tar.add(content, arcname=".")
    try:
        name, status = _import_archive(full_server, ns, www)
        assert status["phase"] == "Succeeded", status
        volume = volume_dir(full_server, ns, name)
        assert (volume / "hello.txt").read_text() == "hello from the archive\n"
        assert (volume / "sub" / "data.bin").read_bytes() == bytes(range(256)) * 64
    finally:  # no importer left retrying in the module's server
        full_server.kubectl("delete", "dv", "--all", "-n", ns, "--wait=false")


def test_http_auth_example_imports_over_tls_with_credentials(
    full_server: CdiServer, ns: str, image: tuple[Path, Path]
) -> None:
    raw, www = image
    docs = example("dv-http-auth.yaml")
    secret = only(docs, "Secret")
    config_map = only(docs, "ConfigMap")
    dv = only(docs, "DataVolume")
    name = dv["metadata"]["name"]
    source = dv["spec"]["source"]["http"]
    assert source["secretRef"] == secret["metadata"]["name"]
    assert source["certConfigMap"] == config_map["metadata"]["name"]
    assert source["url"].startswith("https://")
    user, password = secret["stringData"]["accessKeyId"], secret["stringData"]["secretKey"]
    with BadServer(www, tls=True) as web:
        assert web.ca_file is not None
        web.behave("/disk.qcow2", basic_auth=(user, password))
        (key,) = config_map["data"]
        config_map["data"][key] = Path(web.ca_file).read_text()
        source["url"] = web.url("/disk.qcow2")
        apply(full_server, docs, ns)
        wait_phase(full_server, ns, name)
        authorized = [r for r in web.requests_for("/disk.qcow2") if r.headers.get("Authorization")]
    assert authorized, "the importer never sent the credentials"
    assert same_image(raw, disk_path(full_server, ns, name))


def test_s3_example_imports(
    full_server: CdiServer, ns: str, image: tuple[Path, Path], moto_endpoint: str
) -> None:
    import boto3  # noqa: PLC0415  (slow to import; only this test needs it)

    raw, www = image
    docs = example("dv-s3.yaml")
    secret = only(docs, "Secret")
    dv = only(docs, "DataVolume")
    name = dv["metadata"]["name"]
    url = dv["spec"]["source"]["s3"]["url"]
    bucket, key = url.split("/", 3)[3].split("/", 1)
    s3 = boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        region_name="us-east-1",
        aws_access_key_id=secret["stringData"]["accessKeyId"],
        aws_secret_access_key=secret["stringData"]["secretKey"],
    )
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key=key, Body=(www / "disk.qcow2").read_bytes())
    dv["spec"]["source"]["s3"]["url"] = f"{moto_endpoint}/{bucket}/{key}"
    apply(full_server, docs, ns)
    wait_phase(full_server, ns, name)
    found = annotations_of(full_server, "pvc", name, ns)
    assert found["cdi.kubevirt.io/storage.import.source"] == "s3"
    assert same_image(raw, disk_path(full_server, ns, name))


def test_wffc_example_binds_when_the_consumer_pod_comes(
    full_server: CdiServer, ns: str, image: tuple[Path, Path]
) -> None:
    raw, www = image
    docs = example("dv-wffc.yaml")
    dv = only(docs, "DataVolume")
    name = dv["metadata"]["name"]
    pod = only(example("pod-consumer.yaml"), "Pod")
    assert dv["spec"]["storage"]["storageClassName"] == "local-wffc"
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]]
    assert claims == [name]
    with BadServer(www) as web:
        dv["spec"]["source"]["http"]["url"] = web.url("/disk.qcow2")
        apply(full_server, docs, ns)
        wait_phase(full_server, ns, name, "WaitForFirstConsumer", timeout=30)
        time.sleep(1.0)  # nothing happens while no pod uses the claim
        pvc_phase = full_server.kubectl(
            "get", "pvc", name, "-n", ns, "-o", "jsonpath={.status.phase}"
        ).stdout
        assert pvc_phase == "Pending"
        assert no_pods(full_server, ns)
        full_server.kubectl("apply", "-n", ns, "-f", str(EXAMPLES / "pod-consumer.yaml"))
        wait_phase(full_server, ns, name)
    assert same_image(raw, disk_path(full_server, ns, name))
    consumer = pod["metadata"]["name"]
    full_server.kubectl(
        "wait", "-n", ns, "--for=jsonpath={.status.phase}=Running", f"pod/{consumer}"
    )
    poll(
        lambda: "total" in full_server.kubectl("logs", consumer, "-n", ns).stdout,
        timeout=15,
        what="the consumer's listing of the volume",
    )
    full_server.kubectl("delete", "pod", consumer, "-n", ns, "--timeout=30s")
    poll(lambda: no_pods(full_server, ns), timeout=15, what="the consumer pod gone")


def test_readme_walkthrough_with_python_http_server(
    full_server: CdiServer, ns: str, tmp_path: Path
) -> None:
    """examples/README.md as written: a 1G qcow2 made by qemu-img, served by `python3 -m
    http.server` (no ranges: the scratch route), imported with dv-http.yaml; then deleted."""
    images = tmp_path / "images"
    images.mkdir()
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(images / "disk.qcow2"), "1G"],
        check=True,
        timeout=30,
    )
    port = _free_port()
    web = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "http.server",
            str(port),
            "--bind",
            "127.0.0.1",
            "--directory",
            str(images),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        poll(lambda: _listening(port), timeout=10, what="python -m http.server listening")
        docs = example("dv-http.yaml")
        dv = only(docs, "DataVolume")
        name = dv["metadata"]["name"]
        url = dv["spec"]["source"]["http"]["url"]
        assert url == "http://127.0.0.1:8000/disk.qcow2"
        dv["spec"]["source"]["http"]["url"] = url.replace(":8000/", f":{port}/")
        apply(full_server, docs, ns)
        status = wait_phase(full_server, ns, name)
    finally:
        web.terminate()
        web.wait(10)
    assert status["progress"] == "100.0%"
    pvc = annotations_of(full_server, "pvc", name, ns)
    assert pvc["cdi.kubevirt.io/storage.import.requiresScratch"] == "true"
    disk = disk_path(full_server, ns, name)
    assert disk.stat().st_size == 1 << 30
    poll(
        lambda: names(full_server, "pvc", ns) == [name],
        timeout=15,
        what="the scratch PVC deleted",
    )
    volume = volume_dir(full_server, ns, name)
    full_server.kubectl("delete", "dv", name, "-n", ns, "--timeout=30s")
    poll(lambda: names(full_server, "pvc", ns) == [], timeout=15, what="the PVC deleted")
    poll(lambda: not volume.exists(), timeout=15, what=f"{volume} removed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_server_dry_run_of_applied_examples_changes_nothing(
    full_server: CdiServer, ns: str
) -> None:
    docs = [doc for doc in example("dv-http-auth.yaml") if doc["kind"] in ("Secret", "ConfigMap")]
    apply(full_server, docs, ns)
    config_map = only(docs, "ConfigMap")
    name = config_map["metadata"]["name"]
    before = get_json(full_server, "configmap", name, "-n", ns)
    (key,) = config_map["data"]
    config_map["data"][key] = "changed\n"
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump_all(docs, f)
        f.flush()
        out = full_server.kubectl("apply", "--dry-run=server", "-n", ns, "-f", f.name).stdout
        assert "(server dry run)" in out
        full_server.kubectl("delete", "--dry-run=server", "-n", ns, "-f", f.name)
    after = full_server.kubectl("get", "configmap", name, "-n", ns, "-o", "json", check=False)
    assert after.returncode == 0, f"deleted by a dry run: {after.stderr}"
    assert json.loads(after.stdout)["data"] == before["data"], "changed by a dry run"
