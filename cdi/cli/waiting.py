"""Waiting for a DataVolume: until a goal (a phase or a condition) is met, it fails, or time is up.

Owns `Goal` (what `--for` asks, and `goal_arg` to parse it), `wait_for` (follows one DataVolume
by list-then-watch, never by polling; one that does not exist yet is waited for) and `Outcome`
with the one line that explains a wait that did not succeed, carrying the last reason for
waiting seen (a retry's 404 is gone from the status while the next attempt runs).

Called by `cdi import --wait` and `cdi wait dv` (`cdi.cli.datavolumes`). Must not print: the
callers decide what to show, through `on_update` and `Outcome.explain`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from cdi.api import ConditionType, DataVolumePhase
from cdi.api.groups import DATA_VOLUME
from cdi.cli.cluster import format_duration, informer
from cdi.cli.progress import Transfer, condition
from cdi.kube.client import Client
from cdi.kube.errors import NotFound
from cdi.kube.informer import Snapshot

Obj = dict[str, Any]

_PHASES: Final = {p.value.lower(): p.value for p in DataVolumePhase if p.value}
DEFAULT_WAIT_TIMEOUT: Final = "10m"
"""`cdi wait`'s --timeout: imports of big disks take minutes, not kubectl's 30 s."""


@dataclass(frozen=True, slots=True)
class Goal:
    """What a wait waits for: a phase, or a condition with a status."""

    text: str
    phase: str | None = None
    condition: tuple[str, str] | None = None

    def met(self, dv: Mapping[str, Any]) -> bool:
        if self.phase is not None:
            return bool((dv.get("status") or {}).get("phase") == self.phase)
        assert self.condition is not None
        type_, want = self.condition
        return str(condition(dv, type_).get("status", "")).lower() == want.lower()


def goal_arg(text: str) -> Goal:
    """--for: "Succeeded", "phase=Succeeded", "condition=Ready" or "condition=Ready=False"."""
    kind, sep, rest = text.partition("=")
    if sep and kind == "condition":
        name, _, want = rest.partition("=")
        if not name:
            raise argparse.ArgumentTypeError("condition=NAME needs a condition name, e.g. Ready")
        # Condition types are matched as kubectl does: case-insensitively, spelled as CDI does.
        known = {c.value.lower(): c.value for c in ConditionType}
        type_ = known.get(name.lower(), name)
        status = (want or "True").capitalize()
        return Goal(f"have condition {type_}={status}", condition=(type_, status))
    phase = rest if sep and kind == "phase" else text
    if sep and kind != "phase":
        raise argparse.ArgumentTypeError(
            f"{text!r}: use a phase (e.g. Succeeded) or condition=NAME[=VALUE]"
        )
    if phase.lower() not in _PHASES:
        raise argparse.ArgumentTypeError(
            f"{phase!r} is not a DataVolume phase; one of {', '.join(_PHASES.values())}"
        )
    canonical = _PHASES[phase.lower()]
    return Goal(f"be {canonical}", phase=canonical)


@dataclass(frozen=True, slots=True)
class Outcome:
    state: Literal["met", "failed", "timed out", "deleted"]
    dv: Obj | None
    message: str = ""
    """The last reason for waiting seen (a retry's error), even if a retry is running now."""

    def explain(self, name: str, goal: Goal, limit: float | None) -> str:
        """The one line saying why a wait did not succeed."""
        transfer = Transfer.of(self.dv) if self.dv is not None else None
        if self.state == "failed":
            why = (transfer.message if transfer else "") or self.message or "phase Failed"
            return f"datavolume/{name} failed: {why}"
        if self.state == "deleted":
            return f"datavolume/{name} was deleted before it was ready"
        where = "it does not exist" if transfer is None else transfer.describe()
        if self.message:
            where += f"; last message: {self.message}"
        spent = format_duration(limit) if limit is not None else "?"
        return f"timed out after {spent} waiting for datavolume/{name} to {goal.text} ({where})"


async def versions(
    client: Client, namespace: str | None, name: str
) -> AsyncGenerator[Obj | None, None]:
    """Every version of one DataVolume as it changes; None while it does not exist.

    The first comes from a plain get, so that an unreachable or forbidden API is an error at
    once; after that the informer resumes, relists and retries by itself.
    """
    try:
        yield await client.get(DATA_VOLUME, name, namespace)
    except NotFound:
        yield None
    async with informer(client, DATA_VOLUME, namespace) as stream:
        async for item in stream:
            if isinstance(item, Snapshot):
                yield next((o for o in item.items if _name(o) == name), None)
            elif _name(item.object) == name:
                yield None if item.type == "DELETED" else item.object


async def wait_for(
    client: Client,
    namespace: str | None,
    name: str,
    goal: Goal,
    *,
    limit: float | None,
    on_update: Callable[[Obj], None] | None = None,
    absent_fails: bool = False,
) -> Outcome:
    """Follow DataVolume `name` until `goal` is met, it fails, or `limit` seconds pass.

    A missing DataVolume is waited for; with `absent_fails`, one that disappears after it was
    seen ends the wait (the import it stood for is gone).
    """
    last: Obj | None = None
    message = ""
    deadline = asyncio.timeout(limit)
    try:
        async with deadline, contextlib.aclosing(versions(client, namespace, name)) as seen:
            async for dv in seen:
                if dv is None:
                    if absent_fails and last is not None:
                        return Outcome("deleted", last, message)
                    continue
                last = dv
                if on_update is not None:
                    on_update(dv)
                now = Transfer.of(dv)
                if now.message and now.phase != DataVolumePhase.SUCCEEDED:
                    message = now.message
                if goal.met(dv):
                    return Outcome("met", dv, message)
                if now.phase == DataVolumePhase.FAILED:
                    return Outcome("failed", dv, message)
    except TimeoutError:
        if not deadline.expired():
            raise
    return Outcome("timed out", last, message)


def _name(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name", ""))
