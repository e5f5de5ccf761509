"""cdi.controller.sizedetection's pure parts: the pod manifest and the cached answer."""

from __future__ import annotations

from typing import Any

from cdi.api import annotations as ann
from cdi.controller.runtime import Request
from cdi.controller.sizedetection import (
    COMMAND,
    IMAGE_PATH,
    POD_PREFIX,
    cached_size,
    requester_of_pod,
    size_pod,
)


def source(capacity: str = "1Gi", **annotations: str) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "golden",
            "namespace": "images",
            "uid": "1234-abcd",
            "annotations": annotations,
        },
        "spec": {"volumeMode": "Filesystem"},
        "status": {"phase": "Bound", "capacity": {"storage": capacity}},
    }


def test_pod_reads_the_source_read_only_in_its_namespace() -> None:
    pod = size_pod(source(), cdi_config_status={}, local=False, requester="team/copy")
    meta = pod["metadata"]
    assert (meta["name"], meta["namespace"]) == (POD_PREFIX + "1234-abcd", "images")
    assert meta["ownerReferences"][0]["uid"] == "1234-abcd"  # gone with the source
    container = pod["spec"]["containers"][0]
    assert container["command"] == [COMMAND, "-image-path", IMAGE_PATH]
    assert container["volumeMounts"][0]["readOnly"] is True
    assert pod["spec"]["volumes"][0]["persistentVolumeClaim"] == {
        "claimName": "golden",
        "readOnly": True,
    }
    assert pod["spec"]["restartPolicy"] == "Never"
    assert container["securityContext"]["runAsNonRoot"] is True
    # Its changes wake the DataVolume that started it.
    assert requester_of_pod(pod) == [Request("team", "copy")]
    assert requester_of_pod({"metadata": {}}) == []


def test_cached_size_holds_only_for_the_capacity_it_was_read_at() -> None:
    cached = {ann.SOURCE_VIRTUAL_SIZE: "8388608", ann.SOURCE_CAPACITY: "1Gi"}
    assert cached_size(source("1Gi", **cached)) == 8 * 1024 * 1024
    assert cached_size(source("2Gi", **cached)) is None  # grown since: read again
    assert cached_size(source("1Gi")) is None
    bad = {ann.SOURCE_VIRTUAL_SIZE: "lots", ann.SOURCE_CAPACITY: "1Gi"}
    assert cached_size(source("1Gi", **bad)) is None
