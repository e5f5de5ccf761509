"""What `cdi import --wait` shows while a DataVolume fills: a rich bar on a terminal, lines if not.

Owns reading a DataVolume's status into a `Transfer` (phase, "NN.NN%" progress as a number or
None for "N/A", restarts, and the Running condition's message while the worker is not running,
e.g. a 404 it is retrying), and two displays fed with every version of the object seen:

- `BarDisplay` (stdout is a terminal): phase, bar, percent, an approximate rate (the percent of
  the requested size per second: the importer reports a percentage, not bytes, so "~12.3 MB/s"),
  elapsed time and ETA; a message seen while retrying is printed above the bar once.
- `LineDisplay` (logs, pipes, CI): one line per phase change, per whole percent moved or new
  message, e.g. `ImportInProgress 42.10%`, never one per status update.

Called by `cdi.cli.datavolumes`. Must not talk to the API or decide when waiting ends.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Protocol, Self, TextIO

from rich import filesize
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column
from rich.text import Text

from cdi.api import ConditionStatus, ConditionType, DataVolumePhase

_PERCENT: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")
LINE_STEP: Final = 1.0
"""Percentage points the progress must move before `LineDisplay` prints another line."""


@dataclass(frozen=True, slots=True)
class Transfer:
    """The parts of a DataVolume's status a person watching an import cares about."""

    phase: str
    progress: str
    percent: float | None
    restarts: int
    message: str

    @classmethod
    def of(cls, dv: Mapping[str, Any]) -> Transfer:
        status: Mapping[str, Any] = dv.get("status") or {}
        progress = str(status.get("progress") or "N/A")
        try:
            restarts = int(status.get("restartCount") or 0)
        except (TypeError, ValueError):
            restarts = 0
        return cls(
            phase=str(status.get("phase") or ""),
            progress=progress,
            percent=parse_percent(progress),
            restarts=restarts,
            message=waiting_message(dv),
        )

    def describe(self) -> str:
        """ "phase ImportInProgress, 42.10%" for messages about where a DataVolume is."""
        if not self.phase:
            return "no phase yet"
        return f"phase {self.phase}, {self.progress}"


def parse_percent(progress: str) -> float | None:
    """42.1 for "42.10%", None for "N/A" (or anything else: then the bar is indeterminate)."""
    match = _PERCENT.match(progress)
    return min(float(match.group(1)), 100.0) if match else None


def condition(dv: Mapping[str, Any], type_: str) -> Mapping[str, Any]:
    for cond in (dv.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return {}


def waiting_message(dv: Mapping[str, Any]) -> str:
    """The Running condition's message while the worker is not running (why it waits or failed),
    as one line; empty while it runs or when there is nothing to say."""
    running = condition(dv, ConditionType.RUNNING)
    if running.get("status") == ConditionStatus.TRUE:
        return ""
    return " ".join(str(running.get("message") or "").split())


class Display(Protocol):
    def update(self, dv: Mapping[str, Any]) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


def display_for(out: TextIO, *, name: str, size: int) -> Display:
    """A bar when `out` is a terminal, lines otherwise."""
    if out.isatty():
        return BarDisplay(Console(file=out), name=name, size=size)
    return LineDisplay(out)


class LineDisplay:
    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._phase: str | None = None
        self._percent: float | None = None
        self._message = ""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._out.flush()

    def update(self, dv: Mapping[str, Any]) -> None:
        now = Transfer.of(dv)
        if not now.phase:
            return
        new_phase = now.phase != self._phase
        moved = now.percent is not None and (
            self._percent is None or abs(now.percent - self._percent) >= LINE_STEP
        )
        news = _news(now, self._message)
        if not (new_phase or moved or news):
            return
        line = f"{now.phase} {now.progress}"
        if news:
            line += f": {now.message}"
            self._message = now.message
        print(line, file=self._out, flush=True)
        self._phase = now.phase
        self._percent = now.percent


def _news(now: Transfer, shown: str) -> bool:
    """A message worth a line: new, and not the worker's own "Import Complete" at the end."""
    return bool(now.message) and now.message != shown and now.phase != DataVolumePhase.SUCCEEDED


class ApproxRateColumn(ProgressColumn):
    """Bytes per second estimated from the percentage of the requested size, marked with "~"."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None or task.total is None:
            return Text("")
        return Text(f"~{filesize.decimal(int(speed))}/s", style="progress.data.speed")


class BarDisplay:
    def __init__(self, console: Console, *, name: str, size: int) -> None:
        self._size = max(size, 1)
        self._message = ""
        self._completed = 0.0
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("datavolume/{task.description}"),
            TextColumn("{task.fields[phase]}", style="cyan"),
            BarColumn(),
            TextColumn("{task.fields[progress]}", justify="right"),
            ApproxRateColumn(table_column=Column(no_wrap=True)),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
        )
        self._task = self._progress.add_task(name, total=None, phase="waiting", progress="N/A")

    def __enter__(self) -> Self:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def update(self, dv: Mapping[str, Any]) -> None:
        now = Transfer.of(dv)
        if _news(now, self._message):
            self._message = now.message
            self._progress.console.print(Text(f"  {now.phase}: {now.message}", style="yellow"))
        phase = now.phase or "waiting"
        if now.percent is None:
            self._progress.update(
                self._task, total=None, phase=phase, progress=now.progress, refresh=True
            )
            return
        completed = self._size * now.percent / 100
        if completed < self._completed:
            # The worker restarted from the beginning: the old samples would make the rate lie.
            self._progress.reset(self._task, total=self._size)
        self._completed = completed
        self._progress.update(
            self._task,
            total=self._size,
            completed=completed,
            phase=phase,
            progress=now.progress,
            # Updates come every few seconds: show each at once rather than at the next tick.
            refresh=True,
        )
