"""Events of the local provisioner, as a CSI sidecar would record them (source component
`cdi-local-provisioner`, reporting controller the provisioner's name)."""

from __future__ import annotations

import logging

from cdi.api.groups import EVENT
from cdi.kube.client import Client
from cdi.kube.errors import ApiError
from cdi.provisioner.volumes import COMPONENT, PROVISIONER, Obj, key_of, now

log = logging.getLogger(__name__)


class EventRecorder:
    def __init__(self, client: Client, node_name: str) -> None:
        self.client = client
        self.node_name = node_name
        # (object uid, reason, message) of events already sent by `once`.
        self._reported: set[tuple[str, str, str]] = set()

    async def once(self, obj: Obj, kind: str, reason: str, message: str) -> None:
        """An event that level-triggered reconciles would otherwise repeat on every pass."""
        mark = (str(obj["metadata"].get("uid")), reason, message)
        if mark in self._reported:
            return
        self._reported.add(mark)
        logger = log.warning if kind == "Warning" else log.info
        logger("%s: %s %s", key_of(obj), reason, message)
        await self.emit(obj, kind, reason, message)

    async def emit(self, obj: Obj, kind: str, reason: str, message: str) -> None:
        md = obj["metadata"]
        stamp = now()
        event: Obj = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{md['name']}.", "namespace": md.get("namespace")},
            "involvedObject": {
                "apiVersion": obj.get("apiVersion", "v1"),
                "kind": obj.get("kind", "PersistentVolumeClaim"),
                "name": md["name"],
                "namespace": md.get("namespace"),
                "uid": md.get("uid"),
                "resourceVersion": md.get("resourceVersion"),
            },
            "reason": reason,
            "message": message,
            "type": kind,
            "source": {"component": COMPONENT, "host": self.node_name},
            "reportingComponent": PROVISIONER,
            "reportingInstance": self.node_name,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            await self.client.create(EVENT, event)
        except ApiError as err:  # an event is a courtesy; never fail the reconcile for it
            log.debug("%s: cannot record event reason=%s error=%s", key_of(obj), reason, err)
