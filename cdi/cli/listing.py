"""How `cdi get dv` shows DataVolumes: kubectl's table, `-o wide|json|yaml`, and `-w`'s changes.

Owns a DataVolume's row (NAME PHASE PROGRESS RESTARTS AGE, NAMESPACE first with -A; wide adds
SIZE SOURCE MESSAGE), `Printer` (the first print, then one row per visible change: a status
rewritten with the same values, or only the age moving, prints nothing) and `follow`, which
feeds it every change by list-then-watch until cancelled (Ctrl-C).

Called by `cdi.cli.datavolumes`. Layout is `cdi.cli.tables`'. Must not write to the API.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Final

import yaml

from cdi.api import DataVolumePhase
from cdi.api.groups import DATA_VOLUME
from cdi.cli.cluster import informer
from cdi.cli.progress import Transfer
from cdi.cli.tables import Table, human_age
from cdi.kube.client import Client
from cdi.kube.informer import Snapshot

Obj = dict[str, Any]

HEADERS: Final = ("NAME", "PHASE", "PROGRESS", "RESTARTS", "AGE")
WIDE_HEADERS: Final = ("SIZE", "SOURCE", "MESSAGE")
WATCH_WIDTHS: Final = {"PHASE": len(DataVolumePhase.IMPORT_IN_PROGRESS), "PROGRESS": len("100.00%")}


def _name(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name", ""))


def _namespace(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("namespace", ""))


def source_of(dv: Mapping[str, Any]) -> str:
    """ "http https://...", "blank", "pvc ns/name": the wide SOURCE column."""
    spec = dv.get("spec") or {}
    source: Mapping[str, Any] = spec.get("source") or {}
    for kind, details in source.items():
        if not isinstance(details, Mapping):
            continue
        if url := details.get("url"):
            return f"{kind} {url}"
        if kind == "pvc":
            return f"pvc {details.get('namespace', '')}/{details.get('name', '')}"
        return str(kind)
    if ref := spec.get("sourceRef"):
        return f"{ref.get('kind', '')} {ref.get('name', '')}".strip()
    return ""


def table_row(dv: Mapping[str, Any], *, with_namespace: bool, wide: bool) -> list[str]:
    status = dv.get("status") or {}
    restarts = status.get("restartCount")
    row = [
        _name(dv),
        str(status.get("phase") or ""),
        str(status.get("progress") or ""),
        "" if restarts is None else str(restarts),
        human_age((dv.get("metadata") or {}).get("creationTimestamp")),
    ]
    if with_namespace:
        row.insert(0, _namespace(dv))
    if wide:
        spec = dv.get("spec") or {}
        target = spec.get("storage") or spec.get("pvc") or {}
        size = ((target.get("resources") or {}).get("requests") or {}).get("storage", "")
        row += [str(size), source_of(dv), Transfer.of(dv).message]
    return row


class Printer:
    """Prints DataVolumes in the chosen output, once per visible change."""

    def __init__(self, output: str | None, *, with_namespace: bool, watch: bool = False) -> None:
        self.output = output
        self.with_namespace = with_namespace
        headers = list(HEADERS) + (list(WIDE_HEADERS) if output == "wide" else [])
        if with_namespace:
            headers.insert(0, "NAMESPACE")
        # A watch prints the phases an import goes through under a header printed before them.
        self.table = Table(headers, sys.stdout, min_widths=WATCH_WIDTHS if watch else None)
        self._shown: dict[tuple[str, str], tuple[str, ...]] = {}

    def _row(self, dv: Mapping[str, Any]) -> list[str]:
        return table_row(dv, with_namespace=self.with_namespace, wide=self.output == "wide")

    def _signature(self, dv: Mapping[str, Any], event: str) -> tuple[str, ...]:
        if self.output in ("json", "yaml"):
            return (event, str((dv.get("metadata") or {}).get("resourceVersion", "")))
        row = self._row(dv)
        age = 5 if self.with_namespace else 4
        # The age alone moving is not a change worth a row.
        return (event, *row[:age], *row[age + 1 :])

    def show(self, items: Sequence[Mapping[str, Any]], *, single: bool = False) -> None:
        """The first print: a table, or the object (`single`) or a List as JSON or YAML."""
        for dv in items:
            self._shown[(_namespace(dv), _name(dv))] = self._signature(dv, "")
        if self.output == "json":
            doc = items[0] if single else _as_list(items)
            print(json.dumps(doc, indent=4), flush=True)
        elif self.output == "yaml":
            doc = items[0] if single else _as_list(items)
            print(yaml.safe_dump(doc, sort_keys=False), end="", flush=True)
        else:
            self.table.write([self._row(dv) for dv in items])

    def change(self, dv: Mapping[str, Any], event: str = "") -> None:
        """A watched version: printed unless it would repeat what is on screen."""
        key = (_namespace(dv), _name(dv))
        signature = self._signature(dv, event)
        if self._shown.get(key) == signature:
            return
        self._shown[key] = signature
        if self.output == "json":
            print(json.dumps(dv, indent=4), flush=True)
        elif self.output == "yaml":
            print("---\n" + yaml.safe_dump(dict(dv), sort_keys=False), end="", flush=True)
        else:
            self.table.write([self._row(dv)])


def _as_list(items: Sequence[Mapping[str, Any]]) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "List",
        "items": list(items),
        "metadata": {"resourceVersion": ""},
    }


async def follow(client: Client, namespace: str | None, names: set[str], printer: Printer) -> None:
    """Print every change of the DataVolumes (only `names`, if given) until cancelled."""
    async with informer(client, DATA_VOLUME, namespace) as stream:
        async for item in stream:
            if isinstance(item, Snapshot):
                changed = [(o, "") for o in item.items]
            else:
                changed = [(item.object, "DELETED" if item.type == "DELETED" else "")]
            for dv, event in changed:
                if not names or _name(dv) in names:
                    printer.change(dv, event)
