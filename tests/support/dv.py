"""Helpers for DataVolume end-to-end tests: manifests, waiting for phases, reading the volume."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from cdi.api.groups import DATA_VOLUME, PERSISTENT_VOLUME, PERSISTENT_VOLUME_CLAIM, POD
from cdi.kube.client import Client
from cdi.provisioner import volume_path
from tests.support.cluster import eventually

NS: Final = "default"
IMPORT_TIMEOUT: Final = 40.0


def dv_manifest(
    name: str,
    source: dict[str, Any],
    *,
    size: str | None = "64Mi",
    namespace: str = NS,
    storage: dict[str, Any] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """A DataVolume using the storage API (`storage` entries merged in)."""
    storage_spec: dict[str, Any] = dict(storage or {})
    if size is not None:
        storage_spec.setdefault("resources", {"requests": {"storage": size}})
    return {
        "apiVersion": DATA_VOLUME.api_version,
        "kind": DATA_VOLUME.kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"source": source, "storage": storage_spec, **spec},
    }


def http_dv(name: str, url: str, *, size: str = "64Mi", **source: Any) -> dict[str, Any]:
    return dv_manifest(name, {"http": {"url": url, **source}}, size=size)


def blank_dv(name: str, *, size: str = "8Mi", **storage: Any) -> dict[str, Any]:
    return dv_manifest(name, {"blank": {}}, size=size, storage=storage)


async def dv_in(
    client: Client, name: str, *phases: str, within: float = IMPORT_TIMEOUT, namespace: str = NS
) -> dict[str, Any]:
    """The DataVolume once its phase is one of `phases`."""

    async def probe() -> dict[str, Any] | None:
        dv = await client.get(DATA_VOLUME, name, namespace)
        return dv if (dv.get("status") or {}).get("phase") in phases else None

    return await eventually(probe, within=within, interval=0.1, what=f"dv {name} in {phases}")


def conditions(dv: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in dv["status"]["conditions"]}


async def volume_of(client: Client, pvc_name: str, namespace: str = NS) -> Path:
    """The local path of a bound PVC's volume: a directory (Filesystem) or a file (Block)."""
    pvc = await client.get(PERSISTENT_VOLUME_CLAIM, pvc_name, namespace)
    path = volume_path(await client.get(PERSISTENT_VOLUME, pvc["spec"]["volumeName"]))
    assert path is not None
    return path


async def disk_of(client: Client, pvc_name: str, namespace: str = NS) -> Path:
    """The disk image of a Filesystem PVC (`disk.img`), or the Block volume's file."""
    path = await volume_of(client, pvc_name, namespace)
    return path / "disk.img" if path.is_dir() else path


async def pods(client: Client, namespace: str = NS) -> list[str]:
    items, _ = await client.list(POD, namespace)
    return [str(p["metadata"]["name"]) for p in items]


async def no_pods(client: Client, namespace: str = NS) -> bool:
    return not await pods(client, namespace)
