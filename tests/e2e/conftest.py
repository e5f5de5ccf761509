"""End to end through a real `cdi server` subprocess (controllers, node agent, provisioner: what
`make run` starts) driven with the real kubectl, with the manifests of `examples/`.

Fixtures:
    full_server   one whole server per test module (tests isolate themselves with `ns`)
    ns            a new namespace named after the test, on `full_server`
    crash_server  a whole server of the test's own, for tests that kill and restart it

Helpers: `example(name)` loads an example's documents, `apply(server, docs, ns)` applies them
through a file as a user would, `wait_phase` / `dv_status` / `annotations_of` read back what
kubectl shows, `disk_path` finds the bytes of a volume on this machine.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import pytest
import yaml

from cdi.provisioner import volume_path
from tests.support.cdiserver import (
    KUBECTL,
    REPO,
    CdiServer,
    dns_label,
    poll,
    running_server,
    worker_processes,
)

EXAMPLES: Final = REPO / "examples"
IMPORT_TIMEOUT: Final = 60
#: Seconds a whole server may take to come up (a restart too): generous, for a loaded machine.
START_TIMEOUT: Final = 60.0
Obj = dict[str, Any]


# --- fixtures -------------------------------------------------------------------------------


def _whole_server(data_dir: Path, extra_args: Sequence[str] = ()) -> Iterator[CdiServer]:
    yield from running_server(
        data_dir, controllers=True, start_timeout=START_TIMEOUT, extra_args=extra_args
    )
    # Stopped (SIGTERM): nothing any pod of it started may be left. What is (a test failed
    # with the server killed) is killed here, so that it does not outlive the test, and the
    # teardown fails.
    try:
        poll(
            lambda: not worker_processes(data_dir),
            timeout=10,
            what=f"no process of the pods of the server over {data_dir}",
        )
    except AssertionError:
        left = worker_processes(data_dir)
        for p in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
        raise AssertionError(f"processes of the pods outlived the server: {left}") from None


@pytest.fixture(scope="module")
def full_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CdiServer]:
    yield from _whole_server(tmp_path_factory.mktemp("cdi-e2e") / "data")


@pytest.fixture(scope="module")
def quick_refusing_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CdiServer]:
    """`full_server` whose upload proxy waits 2 s, not CDI's 10, for an upload server before
    its 503: for tests of refusals, which would otherwise wait the full 10 s each."""
    yield from _whole_server(
        tmp_path_factory.mktemp("cdi-e2e") / "data", ("--upload-proxy-ready-wait", "2")
    )


@pytest.fixture
def crash_server(tmp_path: Path) -> Iterator[CdiServer]:
    yield from _whole_server(tmp_path / "data")


_NS_SEQ = itertools.count(1)


@pytest.fixture
def ns(full_server: CdiServer, request: pytest.FixtureRequest) -> str:
    name = f"{dns_label(request.node.name, 50)}-{next(_NS_SEQ)}"
    full_server.kubectl("create", "namespace", name)
    return name


# --- manifests ------------------------------------------------------------------------------


def example(name: str) -> list[Obj]:
    """The documents of examples/<name>, as a user's `kubectl apply -f` would read them."""
    return [doc for doc in yaml.safe_load_all((EXAMPLES / name).read_text()) if doc]


def only(docs: list[Obj], kind: str) -> Obj:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"{len(found)} documents of kind {kind}"
    return found[0]


def apply(server: CdiServer, docs: list[Obj], namespace: str) -> str:
    """`kubectl apply -n <namespace> -f <file>` of `docs` written to a file; kubectl's output."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="manifest-") as f:
        yaml.safe_dump_all(docs, f, sort_keys=False)
        f.flush()
        return server.kubectl("apply", "-n", namespace, "-f", f.name).stdout


# --- reading back ---------------------------------------------------------------------------


def get_json(server: CdiServer, *args: str) -> Obj:
    result: Obj = json.loads(server.kubectl("get", *args, "-o", "json").stdout)
    return result


def dv_status(server: CdiServer, namespace: str, name: str) -> Obj:
    status: Obj = get_json(server, "dv", name, "-n", namespace).get("status") or {}
    return status


def wait_phase(
    server: CdiServer,
    namespace: str,
    name: str,
    phase: str = "Succeeded",
    timeout: int = IMPORT_TIMEOUT,
) -> Obj:
    """`kubectl wait --for=jsonpath={.status.phase}=<phase> dv/<name>`; the DV's status then.
    On a timeout the failure shows the DataVolume as it was."""
    result = server.kubectl(
        "wait",
        "-n",
        namespace,
        f"--for=jsonpath={{.status.phase}}={phase}",
        f"dv/{name}",
        f"--timeout={timeout}s",
        check=False,
        timeout=timeout + 15,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"dv {namespace}/{name} not {phase} within {timeout}s: {result.stderr}\n"
            + explain(server, namespace, name)
        )
    assert "condition met" in result.stdout, result.stdout
    return dv_status(server, namespace, name)


def explain(server: CdiServer, namespace: str, name: str) -> str:
    """What a user would look at when DataVolume `name` is stuck: the DV, the pods, the
    importer's log; and the server's own last lines."""
    parts = []
    for args in (
        ("get", "dv", name, "-n", namespace, "-o", "yaml"),
        ("get", "pvc,pods", "-n", namespace, "-o", "wide"),
        ("logs", f"importer-{name}", "-n", namespace, "--tail=30"),
    ):
        shown = server.kubectl(*args, check=False)
        parts.append(f"$ kubectl {' '.join(args)}\n{shown.stdout}{shown.stderr}")
    parts.append("server output tail:\n" + "".join(server.output[-60:]))
    return "\n".join(parts)


def conditions(status: Obj) -> dict[str, Obj]:
    return {c["type"]: c for c in status.get("conditions") or []}


def annotations_of(server: CdiServer, kind: str, name: str, namespace: str) -> dict[str, str]:
    found: dict[str, str] = (
        get_json(server, kind, name, "-n", namespace)["metadata"].get("annotations") or {}
    )
    return found


def volume_dir(server: CdiServer, namespace: str, claim: str) -> Path:
    """Where a bound PVC's data is on this machine (a directory, or a file for Block)."""
    pv_name = server.kubectl(
        "get", "pvc", claim, "-n", namespace, "-o", "jsonpath={.spec.volumeName}"
    ).stdout
    assert pv_name, f"pvc {namespace}/{claim} is not bound"
    path = volume_path(get_json(server, "pv", pv_name))
    assert path is not None, f"pv {pv_name} has no local path"
    return path


def disk_path(server: CdiServer, namespace: str, claim: str) -> Path:
    """The disk image of a PVC: `disk.img` in a Filesystem volume, the file of a Block one."""
    path = volume_dir(server, namespace, claim)
    return path / "disk.img" if path.is_dir() else path


def names(server: CdiServer, kind: str, namespace: str) -> list[str]:
    out = server.kubectl("get", kind, "-n", namespace, "-o", "name").stdout
    return sorted(line.split("/", 1)[1] for line in out.split())


def no_pods(server: CdiServer, namespace: str) -> bool:
    return not names(server, "pods", namespace)


def run_watch(server: CdiServer, *args: str) -> subprocess.Popen[str]:
    """`kubectl get <args> -w` as a running process, its output on a pipe."""
    return subprocess.Popen(
        [KUBECTL, "get", *args, "-w"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        env=server.kubectl_env(),
    )
