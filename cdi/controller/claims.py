"""API steps every PVC-keyed reconciler takes: annotate a claim, read the CDIConfig status.

`annotate(client, pvc, wanted)` patches only the annotations that differ, with the claim's
resourceVersion (a Conflict fails the reconcile, which is retried on fresh data), and updates
`pvc["metadata"]` in place so the caller keeps working on what the API now holds.
`config_status(client)` is the CDIConfig `status` the config controller writes ({} until then).
`restarts(pvc, pod)` is the `storage.pod.restarts` value: the worker container's restart count,
never lower than what the claim already says (a replaced pod starts again from 0).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cdi.api import annotations as ann
from cdi.api.groups import CDI_CONFIG, CDI_CONFIG_NAME, PERSISTENT_VOLUME_CLAIM
from cdi.kube.client import Client
from cdi.kube.errors import NotFound

Obj = dict[str, Any]


async def annotate(client: Client, pvc: Obj, wanted: Mapping[str, str]) -> None:
    meta = pvc["metadata"]
    current = meta.get("annotations") or {}
    changed = {k: v for k, v in wanted.items() if current.get(k) != v}
    if not changed:
        return
    patch = {"metadata": {"annotations": changed, "resourceVersion": meta.get("resourceVersion")}}
    updated = await client.patch(
        PERSISTENT_VOLUME_CLAIM, str(meta["name"]), patch, str(meta["namespace"])
    )
    pvc["metadata"] = updated["metadata"]


async def config_status(client: Client) -> Obj:
    try:
        config = await client.get(CDI_CONFIG, CDI_CONFIG_NAME)
    except NotFound:
        return {}
    return dict(config.get("status") or {})


def restarts(pvc: Mapping[str, Any], pod: Mapping[str, Any]) -> str:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    current = int(statuses[0].get("restartCount") or 0) if statuses else 0
    annotations = (pvc.get("metadata") or {}).get("annotations") or {}
    try:
        previous = int(annotations.get(ann.POD_RESTARTS) or 0)
    except ValueError:
        previous = 0
    return str(max(previous, current))
