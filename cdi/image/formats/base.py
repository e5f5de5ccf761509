"""Building blocks every format inspector is made of.

Owns:
- `CaptureRegion`: the bytes of one on-disk structure at a fixed stream offset, gathered from
  chunks of any size and alignment, with an explicit byte cap so memory stays bounded;
- `EndRegion`: the last N bytes of a stream (footers), kept in a bounded rolling buffer;
- `SafetyCheck`: one named check; its failure is a `Problem`, and an exception inside a check is
  a failure too, never a pass;
- `FormatInspector`: the base of the per-format modules. A subclass declares its regions and
  checks in `setup()` and parses in `advance()` / `on_finish()`. An inspector that declares no
  check cannot be built: a format with nothing to check must say so with `SafetyCheck.null()`.

Called by `registry.StreamInspector`, which feeds every inspector the same stream. Nothing here
does I/O, and hostile bytes never raise: they become problems. Only programming errors raise.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Final

from cdi.image.errors import Problem

log = logging.getLogger(__name__)

#: The largest region any format may declare. Regions hold header structures, never data, so a
#: format that wants more is buggy; the cap is what keeps an inspector's memory bounded.
MAX_REGION_BYTES: Final = 128 * 1024

#: How far into a stream a format may follow an offset it read from a header. Legitimate images
#: keep their metadata near the start; a pointer further out is treated as a malformed header,
#: so a hostile image cannot make a streaming inspection read gigabytes before deciding.
POINTER_LIMIT: Final = 64 * 1024 * 1024

_NOWHERE: Final = 1 << 62

#: How many times one chunk may make an inspector declare new regions before we call it a loop.
_MAX_ADVANCE_ROUNDS: Final = 256


def printable(raw: bytes, limit: int = 80) -> str:
    """Attacker-controlled bytes as text for a one-line message: cut at `limit` characters.

    Show it with `!r`, which escapes control characters (newlines, terminal escapes).
    """
    text = raw.decode("utf-8", errors="replace")
    return text if len(text) <= limit else text[: limit - 3] + "..."


class CaptureRegion:
    """`length` bytes at stream offset `offset`, captured from whatever chunks pass by.

    Bytes are appended only when they continue what is already held, so offering the same
    chunk twice is harmless. If the stream moves past the next byte this region needs, the
    region is `missed`: a streaming reader cannot go back for it.
    """

    __slots__ = ("_buf", "length", "missed", "name", "offset")

    def __init__(self, name: str, offset: int, length: int) -> None:
        if offset < 0 or length <= 0 or length > MAX_REGION_BYTES:
            raise ValueError(f"region {name}: bad offset {offset} or length {length}")
        self.name = name
        self.offset = offset
        self.length = length
        self.missed = False
        self._buf = bytearray()

    def __repr__(self) -> str:
        return f"CaptureRegion({self.name!r}, {self.offset}, {len(self._buf)}/{self.length})"

    def __len__(self) -> int:
        return len(self._buf)

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def next_offset(self) -> int:
        """The stream offset of the next byte this region still needs."""
        return self.offset + len(self._buf)

    @property
    def complete(self) -> bool:
        return len(self._buf) >= self.length

    @property
    def pending(self) -> bool:
        return not self.complete and not self.missed

    @property
    def data(self) -> bytes:
        """What has been captured so far: all `length` bytes once complete."""
        return bytes(self._buf)

    def shrink(self, length: int) -> None:
        """Need fewer bytes than first declared (a header told us how much is really there)."""
        if length <= 0:
            raise ValueError(f"region {self.name}: cannot shrink to {length}")
        if length < self.length:
            self.length = length
            del self._buf[length:]

    def capture(self, position: int, chunk: memoryview) -> None:
        """Take the part of `chunk` (which starts at stream offset `position`) that we need."""
        if not self.pending:
            return
        want = self.next_offset
        if position > want:
            self.missed = True
            return
        stop = min(position + len(chunk), self.end)
        if stop > want:
            self._buf += chunk[want - position : stop - position]


class EndRegion:
    """The last `length` bytes of the stream, whatever its size, in a bounded rolling buffer.

    Works for sequential streams and for a file read at two places (headers, then the tail):
    the buffer always holds the bytes ending at the highest offset seen so far.
    """

    __slots__ = ("_buf", "_end", "length", "name")

    def __init__(self, name: str, length: int) -> None:
        if length <= 0 or length > MAX_REGION_BYTES:
            raise ValueError(f"end region {name}: bad length {length}")
        self.name = name
        self.length = length
        self._buf = bytearray()
        self._end = 0

    def __repr__(self) -> str:
        return f"EndRegion({self.name!r}, {len(self._buf)}/{self.length}, end={self._end})"

    def __len__(self) -> int:
        return len(self._buf)

    def capture(self, position: int, chunk: memoryview) -> None:
        """Keep the last bytes of what has passed; `chunk` starts at stream offset `position`."""
        stop = position + len(chunk)
        if stop <= self._end:
            return
        if position > self._end or not self._buf:
            self._buf = bytearray(chunk[-self.length :])
        else:
            self._buf += chunk[self._end - position :]
            # Trim lazily: with tiny chunks, one memmove per `length` bytes rather than per chunk.
            if len(self._buf) > 2 * self.length:
                del self._buf[: len(self._buf) - self.length]
        self._end = stop

    def tail(self, stream_size: int) -> bytes | None:
        """The last bytes of a stream of `stream_size` bytes, or None if we did not see them."""
        if self._end != stream_size:
            return None
        if len(self._buf) < min(self.length, stream_size):
            return None
        return bytes(self._buf[-self.length :])


@dataclass(frozen=True, slots=True)
class SafetyCheck:
    """A named rule an image must pass. `run` returns None when the image passes, or a sentence
    saying what is wrong. Exceptions are failures: a check that cannot decide refuses."""

    name: str
    run: Callable[[], str | None]

    @classmethod
    def null(cls, reason: str) -> SafetyCheck:
        """Say explicitly that a format has nothing to check, and why (`reason` is for readers)."""
        del reason
        return cls("none", lambda: None)

    def __call__(self) -> Problem | None:
        try:
            message = self.run()
        except Exception as exc:
            log.warning("safety check %s failed to run: %r", self.name, exc, exc_info=True)
            return Problem(self.name, f"safety check {self.name} could not run ({exc!r})")
        return None if message is None else Problem(self.name, message)


class FormatInspector(abc.ABC):
    """Recognises one format in a stream and checks it is safe to hand to qemu-img.

    Subclasses set `NAME` (qemu-img's spelling), declare regions and checks in `setup()`, and
    parse in `advance()`, which runs after every chunk that brought new bytes and again whenever
    it declared new regions, so it must be written as idempotent stages. `match()` / `reject()`
    decide whether the format is present; `flag()` records a structural problem found while
    parsing; checks run only once `parsed` is set (a header too short to parse is `truncated`).
    """

    NAME: ClassVar[str]
    #: Containers (compression, tar) hold an image; they are not one.
    WRAPPER: ClassVar[bool] = False

    def __init__(self, *, total_size: int | None = None) -> None:
        self.total_size = total_size
        #: The stream's size once known: the declared total, or what was read by eof.
        self.known_size = total_size
        self.virtual_size: int | None = None
        self.details: dict[str, object] = {}
        self.notes: list[str] = []
        self.parsed = False
        self._matched: bool | None = None
        self._regions: list[CaptureRegion] = []
        self._end_regions: list[EndRegion] = []
        self._checks: list[SafetyCheck] = []
        self._flags: list[Problem] = []
        self._chunk_position = 0
        self._chunk: memoryview | None = None
        self._declared = 0
        self._consumed = 0
        self._done = False
        self._next_needed = 0
        self.setup()
        if not self._checks:
            raise TypeError(
                f"{type(self).__name__} declares no safety checks; "
                "use SafetyCheck.null() to say there is nothing to check"
            )

    # -- what subclasses implement -------------------------------------------------------------

    @abc.abstractmethod
    def setup(self) -> None:
        """Declare the first regions and every safety check."""

    @abc.abstractmethod
    def advance(self) -> None:
        """Parse whatever the regions hold now; decide, declare more regions, or wait."""

    def on_finish(self, *, eof: bool, stream_size: int | None) -> None:
        """Last word before the verdict: read footers (`EndRegion.tail`) when `eof`.

        Called each time a result is built, so it must be idempotent. `stream_size` is the
        size of the whole stream when it is known.
        """
        del eof, stream_size

    # -- tools for subclasses ----------------------------------------------------------------

    def region(self, name: str, offset: int, length: int) -> CaptureRegion:
        """Declare that we need `length` bytes at `offset`; the current chunk is offered at once."""
        region = CaptureRegion(name, offset, length)
        self._regions.append(region)
        self._declared += 1
        if self._chunk is not None:
            if offset < self._chunk_position:
                region.missed = True
                self.flag(
                    "format_header",
                    f"{self.NAME} {name} at offset {offset} lies before data already read "
                    "(headers must point forwards)",
                )
            else:
                region.capture(self._chunk_position, self._chunk)
                self._note_consumed(region)
        return region

    def end_region(self, name: str, length: int) -> EndRegion:
        region = EndRegion(name, length)
        self._end_regions.append(region)
        return region

    def release(self, region: CaptureRegion) -> None:
        """Stop capturing a region we no longer need, and free its bytes."""
        if region in self._regions:
            self._regions.remove(region)

    def check(self, name: str, run: Callable[[], str | None]) -> None:
        self._checks.append(SafetyCheck(name, run))

    def add_check(self, check: SafetyCheck) -> None:
        self._checks.append(check)

    def flag(self, name: str, message: str) -> None:
        problem = Problem(name, message)
        if problem not in self._flags:
            self._flags.append(problem)

    def match(self) -> None:
        self._matched = True

    def reject(self) -> None:
        """Not this format: drop every header region (end regions stay, footers may still match)."""
        self._matched = False
        self._regions.clear()

    # -- what the stream inspector uses -------------------------------------------------------

    @property
    def matched(self) -> bool:
        return self._matched is True

    @property
    def decided(self) -> bool:
        return self._matched is not None

    @property
    def complete(self) -> bool:
        """Nothing more is needed from the headers to decide (footers are read at eof)."""
        if self._matched is False:
            return True
        if self._matched is None:
            return False
        return not any(r.pending for r in self._regions)

    @property
    def pending_regions(self) -> list[CaptureRegion]:
        if self._matched is False:
            return []
        return [r for r in self._regions if r.pending]

    @property
    def end_length(self) -> int:
        return max((r.length for r in self._end_regions), default=0)

    @property
    def next_needed(self) -> int:
        """The earliest stream offset a header region still waits for (huge when none)."""
        return _NOWHERE if self._done else self._next_needed

    @property
    def consumed(self) -> int:
        """The furthest stream offset this inspector has needed bytes up to."""
        return self._consumed

    @property
    def bytes_held(self) -> int:
        return sum(len(r) for r in self._regions) + sum(len(r) for r in self._end_regions)

    def feed(self, position: int, chunk: memoryview) -> bool:
        """Offer one chunk that starts at stream offset `position`.

        Returns whether the headers still need bytes; footers are fed by `feed_end`.
        """
        if self._done:
            return False
        if position + len(chunk) <= self._next_needed:
            return True  # nothing we wait for is in this chunk: skip the parse entirely
        self._chunk_position = position
        self._chunk = chunk
        try:
            for region in list(self._regions):
                region.capture(position, chunk)
                self._note_consumed(region)
                if region.missed:
                    self.flag(
                        "format_header",
                        f"{self.NAME} {region.name} at offset {region.offset} could not be read",
                    )
            self._advance()
        finally:
            self._chunk = None
        self._done = self.complete
        pending = [r.next_offset for r in self._regions if r.pending]
        self._next_needed = min(pending) if pending and not self._done else _NOWHERE
        return not self._done

    def feed_end(self, position: int, chunk: memoryview) -> None:
        """Offer a chunk to the footer buffers only."""
        for end in self._end_regions:
            end.capture(position, chunk)

    def finish(self, *, eof: bool, stream_size: int | None) -> None:
        """Prepare for a verdict; may run more than once (before and at the end of a stream)."""
        if stream_size is not None:
            self.known_size = stream_size
        self.notes = []
        try:
            self.on_finish(eof=eof, stream_size=stream_size)
        except Exception as exc:
            self._broken(exc)
        if eof and self._matched is None:
            # Too short to hold this format's magic.
            self._matched = False

    def problems(self, *, eof: bool) -> list[Problem]:
        """Every problem found: structural flags first, then the checks (once parsed)."""
        found = list(self._flags)
        if self.matched and self.pending_regions:
            what = ", ".join(sorted({r.name for r in self.pending_regions}))
            if eof:
                found.append(Problem("truncated", f"{self.NAME} image ends inside its {what}"))
            else:
                found.append(Problem("incomplete", f"{self.NAME} {what} not seen yet"))
        if self.matched and self.parsed:
            for check in self._checks:
                problem = check()
                if problem is not None and problem not in found:
                    found.append(problem)
        return found

    # -- internals ----------------------------------------------------------------------------

    def _note_consumed(self, region: CaptureRegion) -> None:
        if len(region):
            self._consumed = max(self._consumed, region.next_offset)

    def _advance(self) -> None:
        for _ in range(_MAX_ADVANCE_ROUNDS):
            before = self._declared
            try:
                self.advance()
            except Exception as exc:
                self._broken(exc)
                return
            if self._declared == before:
                return
        self._broken(RuntimeError("declared regions without end"))

    def _broken(self, exc: Exception) -> None:
        """A bug met hostile (or unexpected) bytes: fail closed, never pass silently."""
        log.error("%s inspector failed: %r", self.NAME, exc, exc_info=True)
        self.flag("inspector_error", f"{self.NAME} inspector failed ({exc!r}); refusing the image")
        self._matched = True
        self.parsed = False
        self._regions.clear()
        self._done = True
