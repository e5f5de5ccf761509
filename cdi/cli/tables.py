"""kubectl-style tables for `cdi get`: upper-case headers, aligned columns, kubectl's ages.

Owns layout only: `Table` (columns padded like kubectl's tabwriter: at least 10 wide, 3 spaces
between; widths kept from the first print, with optional minimum widths, so that rows a watch
prints later line up) and `human_age` (apimachinery's HumanDuration: "45s", "3m20s", "5h",
"12d"). Which columns a kind has, and their values, are the caller's (`cdi.cli.listing`). Must
not talk to the API.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Final, TextIO

MIN_WIDTH: Final = 10
PADDING: Final = 3


class Table:
    """Prints rows under a header; the header goes out with the first rows. `min_widths`
    (by header) are widths of content, padding not included."""

    def __init__(
        self, headers: Sequence[str], out: TextIO, *, min_widths: Mapping[str, int] | None = None
    ) -> None:
        self.headers = [h.upper() for h in headers]
        self._out = out
        self._min = [(min_widths or {}).get(h, 0) for h in self.headers]
        self._widths: list[int] | None = None

    def write(self, rows: Sequence[Sequence[str]]) -> None:
        if not rows:
            return
        if self._widths is None:
            self._widths = [
                max(
                    MIN_WIDTH,
                    max([self._min[i], *(len(r[i]) for r in [self.headers, *rows])]) + PADDING,
                )
                for i in range(len(self.headers))
            ]
            self._line(self.headers)
        for row in rows:
            self._line(row)
        self._out.flush()

    def _line(self, cells: Sequence[str]) -> None:
        assert self._widths is not None
        last = len(cells) - 1
        for i, cell in enumerate(cells[:last]):
            # A longer value widens its column from here on, so later rows line up again.
            self._widths[i] = max(self._widths[i], len(cell) + PADDING)
        text = "".join(
            cell if i == last else cell.ljust(self._widths[i]) for i, cell in enumerate(cells)
        )
        print(text.rstrip(), file=self._out)


def parse_timestamp(text: str) -> datetime.datetime | None:
    """An RFC 3339 timestamp as the API writes it ("2024-05-01T10:00:00Z"), None if it is not."""
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def human_age(created: str | None, now: datetime.datetime | None = None) -> str:
    """The AGE column: how long ago `created` was, spelled as kubectl spells it."""
    when = parse_timestamp(created) if created else None
    if when is None:
        return "<unknown>"
    now = now or datetime.datetime.now(datetime.UTC)
    return human_duration((now - when).total_seconds())


def human_duration(seconds: float) -> str:
    """apimachinery's `duration.HumanDuration`: precise when short, coarse when long."""
    secs = int(seconds)
    if secs < -1:
        return "<invalid>"
    if secs < 0:
        return "0s"
    if secs < 120:
        return f"{secs}s"
    minutes = secs // 60
    if minutes < 10:
        rest = secs % 60
        return f"{minutes}m" if rest == 0 else f"{minutes}m{rest}s"
    if minutes < 180:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 8:
        rest = minutes % 60
        return f"{hours}h" if rest == 0 else f"{hours}h{rest}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        rest = hours % 24
        return f"{hours // 24}d" if rest == 0 else f"{hours // 24}d{rest}h"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        rest = (hours // 24) % 365
        years = hours // 24 // 365
        return f"{years}y" if rest == 0 else f"{years}y{rest}d"
    return f"{hours // 24 // 365}y"
