"""Runs the controllers of the control plane: `run_controllers(client, stop=..., local=...)`.

Owns wiring, not logic: the DataVolume controller (primary DataVolume, watching the PVCs it
controls), the import and upload controllers (primary PVC, each watching the worker pods the
PVC controls), and a small loop that keeps the CDIConfig `config` (created when missing; status
from `config.cdiconfig_status`) and one StorageProfile per StorageClass (status from
`config.storage_profile_status`) up to date.

Called by `cdi server` (with its node client) and by tests. Must not interpret DataVolumes or
PVCs itself: that is `cdi.controller.datavolume`, `cdi.controller.importing` and
`cdi.controller.uploading`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Final

from cdi.api.groups import (
    CDI_CONFIG,
    CDI_CONFIG_NAME,
    DATA_VOLUME,
    PERSISTENT_VOLUME_CLAIM,
    POD,
    STORAGE_CLASS,
    STORAGE_PROFILE,
    VOLUME_SNAPSHOT,
)
from cdi.controller.cloneplan import snapshot_class_for
from cdi.controller.cloning import CloneReconciler, target_of_pod
from cdi.controller.config import cdiconfig_status, storage_profile_status
from cdi.controller.datavolume import DataVolumeReconciler
from cdi.controller.importing import ImportReconciler
from cdi.controller.runtime import Controller, Request, Result
from cdi.controller.sizedetection import requester_of_pod
from cdi.controller.uploading import UploadReconciler, UploadSettings
from cdi.kube.client import Client
from cdi.kube.errors import AlreadyExists, ApiError, NotFound

log = logging.getLogger(__name__)

#: Reconciles in flight per controller. They wait on the API, not the CPU: with 4, finished
#: imports queued behind new DataVolumes (bench/controller.py: p95 queue wait 13-22 s for 200
#: DVs, 2-3.5 s with 16).
WORKERS: Final = 16
CONFIG_INTERVAL: Final = 10.0
"""Seconds between CDIConfig/StorageProfile refreshes besides the event-driven ones: a safety
net, and the way a cluster with no StorageClass at all still gets its CDIConfig."""


async def sync_config(client: Client, *, upload_proxy_url: str | None = None) -> None:
    """One pass: CDIConfig `config` and a StorageProfile per StorageClass, status up to date."""
    classes, _ = await client.list(STORAGE_CLASS)
    try:
        config = await client.get(CDI_CONFIG, CDI_CONFIG_NAME)
    except NotFound:
        manifest = {
            "apiVersion": CDI_CONFIG.api_version,
            "kind": CDI_CONFIG.kind,
            "metadata": {"name": CDI_CONFIG_NAME},
            "spec": {},
        }
        try:
            config = await client.create(CDI_CONFIG, manifest)
            log.info("%s CDIConfig created", CDI_CONFIG_NAME)
        except AlreadyExists:
            config = await client.get(CDI_CONFIG, CDI_CONFIG_NAME)
    status = cdiconfig_status(config.get("spec") or {}, classes, upload_proxy_url=upload_proxy_url)
    if config.get("status") != status:
        config["status"] = status
        # CDI's CDIConfig CRD has no status subresource: status is written with the object.
        await client.replace(CDI_CONFIG, config)
        log.info("%s CDIConfig status updated", CDI_CONFIG_NAME)
    for sc in classes:
        name = str(sc["metadata"]["name"])
        try:
            profile: dict[str, Any] = await client.get(STORAGE_PROFILE, name)
        except NotFound:
            manifest = {
                "apiVersion": STORAGE_PROFILE.api_version,
                "kind": STORAGE_PROFILE.kind,
                "metadata": {"name": name},
                "spec": {},
            }
            try:
                profile = await client.create(STORAGE_PROFILE, manifest)
                log.info("%s StorageProfile created", name)
            except AlreadyExists:
                profile = await client.get(STORAGE_PROFILE, name)
        driver = str(sc.get("provisioner") or "")
        wanted = storage_profile_status(
            sc,
            profile.get("spec"),
            snapshot_class=await snapshot_class_for(client, driver, profile),
        )
        if profile.get("status") != wanted:
            profile["status"] = wanted
            await client.replace_status(STORAGE_PROFILE, profile)
            log.info("%s StorageProfile status updated", name)


class ConfigReconciler:
    """Any change of the CDIConfig, a StorageClass or a StorageProfile: one `sync_config` pass.
    Event-driven so that a new StorageClass has its StorageProfile before DataVolumes need it
    (the local provisioner creates its classes while the controllers start)."""

    def __init__(self, client: Client, *, upload_proxy_url: str | None = None) -> None:
        self.client = client
        self.upload_proxy_url = upload_proxy_url

    async def __call__(self, request: Request) -> Result:
        await sync_config(self.client, upload_proxy_url=self.upload_proxy_url)
        return Result()


def _the_config(_: dict[str, Any]) -> list[Request]:
    return [Request("", CDI_CONFIG_NAME)]


async def _config_loop(
    client: Client, stop: asyncio.Event, *, upload_proxy_url: str | None
) -> None:
    while not stop.is_set():
        try:
            await sync_config(client, upload_proxy_url=upload_proxy_url)
        except ApiError as err:
            log.warning("config sync failed error=%s", err)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), CONFIG_INTERVAL)


async def run_controllers(
    client: Client,
    *,
    stop: asyncio.Event,
    local: bool,
    upload: UploadSettings | None = None,
    upload_proxy_url: str | None = None,
) -> None:
    """Run the DataVolume, import and upload controllers and the config loop until `stop`.
    `upload_proxy_url` is published as CDIConfig status.uploadProxyURL (unless overridden)."""
    datavolumes = Controller(
        client,
        name="datavolume",
        primary=DATA_VOLUME,
        reconcile=DataVolumeReconciler(client, local=local),
        workers=WORKERS,
    )
    datavolumes.watch_owned(PERSISTENT_VOLUME_CLAIM, owner_kind=DATA_VOLUME.kind)
    # A smart clone's temporary snapshot is owned by its DataVolume: ready -> create the claim.
    datavolumes.watch_owned(VOLUME_SNAPSHOT, owner_kind=DATA_VOLUME.kind)
    # A size-detection pod that answered wakes the clone DataVolume that started it.
    datavolumes.watch_mapped(POD, requester_of_pod)
    imports = Controller(
        client,
        name="import",
        primary=PERSISTENT_VOLUME_CLAIM,
        reconcile=ImportReconciler(client, local=local),
        workers=WORKERS,
    )
    imports.watch_owned(POD, owner_kind=PERSISTENT_VOLUME_CLAIM.kind)
    uploads = Controller(
        client,
        name="upload",
        primary=PERSISTENT_VOLUME_CLAIM,
        reconcile=UploadReconciler(client, local=local, settings=upload),
        workers=WORKERS,
    )
    uploads.watch_owned(POD, owner_kind=PERSISTENT_VOLUME_CLAIM.kind)
    clones = Controller(
        client,
        name="clone",
        primary=PERSISTENT_VOLUME_CLAIM,
        reconcile=CloneReconciler(client, local=local),
        workers=WORKERS,
    )
    clones.watch_mapped(POD, target_of_pod)
    config = Controller(
        client,
        name="config",
        primary=CDI_CONFIG,
        reconcile=ConfigReconciler(client, upload_proxy_url=upload_proxy_url),
        workers=1,
    )
    config.watch_mapped(STORAGE_CLASS, _the_config)
    config.watch_mapped(STORAGE_PROFILE, _the_config)
    log.info("controllers starting local=%s", local)
    await asyncio.gather(
        datavolumes.run(stop),
        imports.run(stop),
        uploads.run(stop),
        clones.run(stop),
        config.run(stop),
        _config_loop(client, stop, upload_proxy_url=upload_proxy_url),
    )
    log.info("controllers stopped")
