"""Clones through the whole `cdi server` (a subprocess) with kubectl: examples/dv-clone.yaml
(host-assisted copy), the snapshot strategy, and a 10 GiB sparse source holding a little data,
where the bytes the cloner sent are read from its log. The source's sha256 is the same before
and after every clone."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from tests.e2e.conftest import (
    Obj,
    annotations_of,
    apply,
    disk_path,
    example,
    no_pods,
    only,
    wait_phase,
)
from tests.support.cdiserver import CdiServer, poll

MIB = 1 << 20


def _sha256(path: Path, length: int | None = None) -> str:
    """A digest of the first `length` bytes (default: all) that reads only data ranges and
    skips zero blocks, so a 10 GiB sparse file hashes in a moment and two files with the same
    bytes but holes in different places hash the same."""
    block = 64 << 10
    zero = bytes(block)
    end = path.stat().st_size if length is None else length
    digest = hashlib.sha256(str(end).encode())
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        while offset < end:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after offset
                break
            if start >= end:
                break
            stop = min(os.lseek(fd, start, os.SEEK_HOLE), end)
            position = start - start % block
            while position < stop:
                chunk = os.pread(fd, min(block, end - position), position)
                if chunk and chunk != zero[: len(chunk)]:
                    digest.update(position.to_bytes(8, "big") + chunk)
                position += block
            offset = stop
    finally:
        os.close(fd)
    return digest.hexdigest()


def _fill(path: Path, extents: int, extent: int) -> None:
    """`extents` pieces of `extent` distinct bytes spread over the file; holes elsewhere."""
    size = path.stat().st_size
    step = size // extents
    with path.open("r+b") as f:
        for i in range(extents):
            f.seek(i * step)
            f.write(os.urandom(extent))


def _blank(server: CdiServer, ns: str, name: str, size: str) -> Path:
    docs = example("dv-blank.yaml")
    dv = only(docs, "DataVolume")
    dv["metadata"]["name"] = name
    dv["spec"]["storage"]["resources"]["requests"]["storage"] = size
    apply(server, docs, ns)
    wait_phase(server, ns, name)
    return disk_path(server, ns, name)


def _clone_doc(
    ns: str, source: str, name: str, strategy: str | None, *, retain: bool = False
) -> list[Obj]:
    docs = example("dv-clone.yaml")
    dv = only(docs, "DataVolume")
    dv["metadata"]["name"] = name
    dv["spec"]["source"]["pvc"] = {"namespace": ns, "name": source}
    if strategy is None:
        dv["metadata"].pop("annotations", None)
    else:
        dv["metadata"]["annotations"] = {"cdi.kubevirt.io/clone-strategy": strategy}
    if retain:  # keep the source pod, and its log with the bytes it sent
        dv["metadata"].setdefault("annotations", {})[
            "cdi.kubevirt.io/storage.pod.retainAfterCompletion"
        ] = "true"
    return docs


def test_clone_example_copies(full_server: CdiServer, ns: str) -> None:
    source = _blank(full_server, ns, "dv-blank", "64Mi")
    _fill(source, 4, MIB)
    size = source.stat().st_size
    digest = _sha256(source)
    apply(full_server, _clone_doc(ns, "dv-blank", "dv-clone", "copy"), ns)
    status = wait_phase(full_server, ns, "dv-clone", timeout=90)
    assert status["progress"] == "100.0%"
    annotations = annotations_of(full_server, "pvc", "dv-clone", ns)
    assert annotations["cdi.kubevirt.io/cloneType"] == "copy"
    assert annotations["k8s.io/CloneRequest"] == f"{ns}/dv-blank"
    target = disk_path(full_server, ns, "dv-clone")
    assert _sha256(target, size) == digest
    assert _sha256(source) == digest
    events = full_server.kubectl(
        "get", "events", "-n", ns, "--field-selector", "involvedObject.name=dv-clone"
    ).stdout
    assert "CloneSucceeded" in events, events
    poll(lambda: no_pods(full_server, ns), timeout=20, what="clone pods deleted")


def test_snapshot_strategy_clone(full_server: CdiServer, ns: str) -> None:
    source = _blank(full_server, ns, "golden", "64Mi")
    _fill(source, 3, MIB)
    digest = _sha256(source)
    apply(full_server, _clone_doc(ns, "golden", "smart", "snapshot"), ns)
    wait_phase(full_server, ns, "smart", timeout=60)
    annotations = annotations_of(full_server, "pvc", "smart", ns)
    assert annotations["cdi.kubevirt.io/cloneType"] == "snapshot"
    assert _sha256(disk_path(full_server, ns, "smart"), source.stat().st_size) == digest
    assert _sha256(source) == digest
    poll(
        lambda: "No resources" in full_server.kubectl("get", "volumesnapshots", "-n", ns).stderr,
        timeout=20,
        what="temporary snapshot deleted",
    )


def test_sparse_10g_source_moves_only_its_data(full_server: CdiServer, ns: str) -> None:
    """A 10 GiB volume with 100 MiB of data: the cloner sends about 100 MiB, not 10 GiB."""
    source = _blank(full_server, ns, "sparse", "10Gi")
    _fill(source, 25, 4 * MIB)
    digest = _sha256(source)
    apply(full_server, _clone_doc(ns, "sparse", "sparse-copy", "copy", retain=True), ns)
    wait_phase(full_server, ns, "sparse-copy", timeout=120)
    target = disk_path(full_server, ns, "sparse-copy")
    assert _sha256(target, source.stat().st_size) == digest
    assert target.stat().st_blocks * 512 < 200 * MIB  # holes stayed holes
    pod = annotations_of(full_server, "pvc", "sparse-copy", ns)[
        "cdi.kubevirt.io/storage.sourceClonePodName"
    ]
    log = full_server.kubectl("logs", "-n", ns, pod).stdout
    sent = [int(m) for m in re.findall(r"wire_bytes=(\d+)", log)]
    assert sent, log
    assert max(sent) < 110 * MIB, sent
    assert _sha256(source) == digest
