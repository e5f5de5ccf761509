"""The cloner's two outcomes besides success, each with its exit status.

SettingsError   a bad environment variable (named): the pod spec must change; exit 2
CloneError      the clone failed (source unreadable, server unreachable or refusing):
                the pod restarts and tries again, the receiver takes a new attempt; exit 1
"""

from __future__ import annotations

from typing import Final

EXIT_FAILED: Final = 1
EXIT_SETTINGS: Final = 2


class SettingsError(Exception):
    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


class CloneError(Exception):
    """One line, as it goes to stderr and the termination log."""
