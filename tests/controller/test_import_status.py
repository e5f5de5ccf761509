"""Pure pieces of the import and DataVolume reconcilers: permanent-failure detection, the
Running annotations from a container state, and the progress metric regex."""

from __future__ import annotations

from typing import Any

from cdi.api import annotations as ann
from cdi.controller.datavolume import progress_regex
from cdi.controller.importing import fatal_reason, running_annotations


def test_fatal_reasons() -> None:
    assert fatal_reason("checksum mismatch: sha256 abc != def") == "ChecksumError"
    assert fatal_reason("refusing unsafe image: backing file") == "Error"
    assert fatal_reason("image is 2G. A larger PVC is required") == "Error"
    assert fatal_reason("HTTP 404 Not Found") is None


def test_running_annotations_follow_the_container() -> None:
    running: dict[str, Any] = {"status": {"containerStatuses": [{"state": {"running": {}}}]}}
    assert running_annotations(running) == {
        ann.CONDITION_RUNNING: "true",
        ann.CONDITION_RUNNING_REASON: "Pod is running",
        ann.CONDITION_RUNNING_MESSAGE: "",
    }
    done = {
        "status": {
            "containerStatuses": [
                {
                    "state": {
                        "terminated": {
                            "exitCode": 0,
                            "reason": "Completed",
                            "message": '{"message":"Import Complete"}',
                        }
                    }
                }
            ]
        }
    }
    assert running_annotations(done)[ann.CONDITION_RUNNING_MESSAGE] == "Import Complete"
    retrying = {
        "status": {
            "containerStatuses": [
                {
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                    "lastState": {
                        "terminated": {
                            "exitCode": 1,
                            "reason": "Error",
                            "message": "HTTP 404 Not Found\nmore detail",
                        }
                    },
                }
            ]
        }
    }
    got = running_annotations(retrying)
    assert got[ann.CONDITION_RUNNING] == "false"
    assert got[ann.CONDITION_RUNNING_REASON] == "Error"
    assert got[ann.CONDITION_RUNNING_MESSAGE] == "HTTP 404 Not Found"
    assert running_annotations({"status": {}}) == {}


def test_progress_regex_matches_only_its_owner() -> None:
    text = (
        'kubevirt_cdi_import_progress_total{ownerUID="other"} 99\n'
        'kubevirt_cdi_import_progress_total{ownerUID="abc-1"} 42.5\n'
    )
    match = progress_regex("abc-1").search(text)
    assert match is not None and match.group(1) == "42.5"
    assert progress_regex("missing").search(text) is None


def test_space_errors_read_as_too_small() -> None:
    pod = {
        "status": {
            "containerStatuses": [
                {
                    "state": {
                        "terminated": {
                            "exitCode": 1,
                            "reason": "Error",
                            "message": "write /data/disk.img: no space left on device",
                        }
                    }
                }
            ]
        }
    }
    message = running_annotations(pod)[ann.CONDITION_RUNNING_MESSAGE]
    assert message == "DataVolume too small to contain image"


def _waiting(reason: str, message: str = "", **extra: Any) -> dict[str, Any]:
    return {
        "status": {
            "containerStatuses": [
                {
                    "image": "quay.io/kubevirt/cdi-importer:latest",
                    **extra,
                    "state": {"waiting": {"reason": reason, "message": message}},
                }
            ]
        }
    }


def test_pull_failures_read_as_image_pull_failed() -> None:
    for reason in ("ImagePullBackOff", "ErrImagePull", "InvalidImageName"):
        got = running_annotations(_waiting(reason, "rpc error: not found"))
        assert got[ann.CONDITION_RUNNING_REASON] == "ImagePullFailed"
        assert got[ann.CONDITION_RUNNING_MESSAGE] == (
            "failed to pull image: quay.io/kubevirt/cdi-importer:latest"
        )
    terminated = {
        "status": {
            "containerStatuses": [
                {
                    "state": {
                        "terminated": {
                            "exitCode": 1,
                            "reason": "Error",
                            "message": "failed to pull image: docker://x/y:wrongtag",
                        }
                    }
                }
            ]
        }
    }
    assert running_annotations(terminated)[ann.CONDITION_RUNNING_REASON] == "ImagePullFailed"


def test_a_missing_secret_wins_over_the_last_failure() -> None:
    # The retry after a failure waits for a secret that was deleted since: the waiting message
    # says what to fix now, the old termination does not.
    pod = _waiting(
        "CreateContainerConfigError",
        'secret "creds" not found',
        lastState={"terminated": {"exitCode": 1, "reason": "Error", "message": "HTTP 401"}},
    )
    got = running_annotations(pod)
    assert got[ann.CONDITION_RUNNING_REASON] == "CreateContainerConfigError"
    assert got[ann.CONDITION_RUNNING_MESSAGE] == 'secret "creds" not found'


def test_unschedulable_pod() -> None:
    pod: dict[str, Any] = {
        "status": {
            "phase": "Pending",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": 'persistentvolumeclaim "x-scratch" is not bound',
                }
            ],
        }
    }
    got = running_annotations(pod)
    assert got[ann.POD_SCHEDULABLE] == "false"
    assert got[ann.CONDITION_RUNNING] == "false"
    assert got[ann.CONDITION_RUNNING_REASON] == "Unschedulable"
    assert got[ann.CONDITION_RUNNING_MESSAGE] == "Importer pod cannot be scheduled"
    pod["status"]["conditions"][0].update(status="True", reason="", message="")
    pod["status"]["containerStatuses"] = [{"state": {"running": {}}}]
    assert running_annotations(pod)[ann.POD_SCHEDULABLE] == "true"
