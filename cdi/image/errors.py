"""The image toolkit's error tree, grouped by what the caller does next.

    ImageError                      base; str() is one line a user understands
    ├── BadImageError               the input is wrong: do not retry, ask for another image
    │   ├── FormatError             cannot be parsed: truncated, corrupt, inconsistent header
    │   ├── UnsafeImageError        parsed, but a named safety check failed (carries `problems`)
    │   └── ImageTooLargeError      the virtual size does not fit the space available
    ├── RetryableError              may succeed later: a tool timed out, a resource was busy
    └── PermanentError              the environment is broken: a tool is missing or crashed
        └── ToolError               an external tool (qemu-img, nbdkit) failed; has argv, stderr

Errors are translated once, at the edge (CLI exit code, HTTP status, termination message); code
below the edge raises and never prints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Problem:
    """One failed safety check: a short stable name (`backing_file`) and a sentence for people."""

    name: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "message": self.message}


class ImageError(Exception):
    """Base of the toolkit's errors. The message is one line: what was wrong, what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class BadImageError(ImageError):
    """The image itself is the problem; retrying with the same bytes cannot help."""


class FormatError(BadImageError):
    """The bytes do not parse as the format they claim, or the header contradicts itself."""


class UnsafeImageError(BadImageError):
    """One or more named safety checks failed; `problems` lists every one of them."""

    def __init__(self, problems: Sequence[Problem], *, format_name: str | None = None) -> None:
        self.problems = tuple(problems)
        self.format_name = format_name
        what = f"{format_name} image" if format_name else "image"
        details = "; ".join(p.message for p in self.problems) or "unspecified safety problem"
        super().__init__(f"refusing unsafe {what}: {details}")


class ImageTooLargeError(BadImageError):
    """The image's virtual size is larger than the space it must fit in."""

    def __init__(self, virtual_size: int, available: int) -> None:
        self.virtual_size = virtual_size
        self.available = available
        # CDI's wording, so that controllers matching on it (and users searching it) find it.
        super().__init__(
            f"virtual image size {virtual_size} is larger than the reported available storage "
            f"{available}. A larger PVC is required"
        )


class RetryableError(ImageError):
    """A transient failure: the same operation may succeed if tried again later."""


class PermanentError(ImageError):
    """The environment cannot do this (missing tool, crashed tool); retrying will not help."""


class ToolError(PermanentError):
    """An external tool failed. `stderr` keeps the tail of what it printed, for the log."""

    def __init__(
        self,
        message: str,
        *,
        argv: Sequence[str] = (),
        returncode: int | None = None,
        stderr: str = "",
    ) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(message)
