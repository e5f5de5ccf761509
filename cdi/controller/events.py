"""Core v1 Events for the reconcilers: `record_event(client, obj, reason, message)`.

Owns only the Event shape (involvedObject, reason, message, type, source component). Called by
the DataVolume and importing reconcilers. Must not raise: an event is a courtesy to the user, so
a failure to write one is logged and swallowed, never turned into a failed reconcile.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping
from typing import Any, Final

from cdi.api.groups import EVENT
from cdi.kube.client import Client
from cdi.kube.errors import ApiError

log = logging.getLogger(__name__)

COMPONENT: Final = "cdi-controller"
NORMAL: Final = "Normal"
WARNING: Final = "Warning"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def record_event(
    client: Client, obj: Mapping[str, Any], reason: str, message: str, *, type_: str = NORMAL
) -> None:
    """Create one Event about `obj` (any namespaced object with apiVersion/kind/metadata)."""
    meta = obj.get("metadata") or {}
    namespace = str(meta.get("namespace") or "default")
    name = str(meta.get("name") or "")
    now = _now()
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{name}.", "namespace": namespace},
        "involvedObject": {
            "apiVersion": str(obj.get("apiVersion") or ""),
            "kind": str(obj.get("kind") or ""),
            "name": name,
            "namespace": namespace,
            "uid": str(meta.get("uid") or ""),
        },
        "reason": reason,
        "message": message,
        "type": type_,
        "count": 1,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "source": {"component": COMPONENT},
    }
    try:
        await client.create(EVENT, event, namespace)
    except ApiError as err:
        log.warning("%s/%s event not recorded reason=%s error=%s", namespace, name, reason, err)
