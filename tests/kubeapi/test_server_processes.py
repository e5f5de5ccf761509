"""`cdi server` owns the processes its agent starts: none outlives it, stopped or killed."""

from __future__ import annotations

import json
import os
import signal

import pytest

from tests.kubeapi.conftest import CdiServer, poll

SLEEPER = """
apiVersion: v1
kind: Pod
metadata: {name: sleeper}
spec:
  restartPolicy: Never
  containers:
  - {name: main, image: none, command: ["sleep", "300"]}
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie waiting for a reaper that is gone counts as dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _running_pid(server: CdiServer) -> int:
    def pid() -> int | None:
        out = server.kubectl("get", "pod", "sleeper", "-o", "json").stdout
        statuses = json.loads(out).get("status", {}).get("containerStatuses") or []
        if statuses and "running" in (statuses[0].get("state") or {}):
            return int(statuses[0]["containerID"].rpartition("/")[2])
        return None

    found: int = poll(pid, timeout=30, what="the sleeper pod running")
    assert _alive(found)
    return found


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_no_pod_process_outlives_the_server(fresh_cdi_server: CdiServer, how: str) -> None:
    server = fresh_cdi_server
    server.kubectl("apply", "-f", "-", input=SLEEPER)
    pid = _running_pid(server)
    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM if how == "SIGTERM" else signal.SIGKILL)
    server.proc.wait(timeout=30)
    poll(lambda: not _alive(pid), timeout=10, what=f"pod process {pid} gone after {how}")


def test_deleting_a_pod_kills_its_process(fresh_cdi_server: CdiServer) -> None:
    server = fresh_cdi_server
    server.kubectl("apply", "-f", "-", input=SLEEPER)
    pid = _running_pid(server)
    server.kubectl("delete", "pod", "sleeper", "--wait=false")
    poll(lambda: not _alive(pid), timeout=20, what=f"pod process {pid} gone after delete")


ECHO = """
apiVersion: v1
kind: Pod
metadata: {name: echo}
spec:
  restartPolicy: Never
  containers:
  - name: main
    image: none
    command: ["sh", "-c", "echo line one; echo line two >&2; echo done > $CDI_TERMINATION_LOG"]
"""


def test_kubectl_logs_of_an_agent_run_pod(fresh_cdi_server: CdiServer) -> None:
    server = fresh_cdi_server
    server.kubectl("apply", "-f", "-", input=ECHO)

    def finished() -> bool:
        out = server.kubectl("get", "pod", "echo", "-o", "jsonpath={.status.phase}").stdout
        return out == "Succeeded"

    poll(finished, timeout=30, what="the echo pod to succeed")
    logs = server.kubectl("logs", "echo").stdout
    assert "line one" in logs
    assert "line two" in logs
    assert server.kubectl("logs", "echo", "--tail=1").stdout.strip() in ("line one", "line two")
    wrong = server.kubectl("logs", "echo", "-c", "nope", check=False)
    assert wrong.returncode != 0
    assert "nope" in wrong.stderr
    status = server.kubectl("get", "pod", "echo").stdout
    assert "Completed" in status
