"""The importer's error tree, grouped by what the controller does next, with CDI's wording.

    ImporterError                 base; str() is the one line written to the termination log
    ├── SettingsError             a bad env value: names the variable; the pod spec must change
    ├── SourceError               "Unable to connect to <kind> data source: ..." (retry later:
    │                             a 404 today may be a file restored tomorrow, as CDI assumes)
    ├── ProcessingError           "Unable to process data: ..." (image or data problem)
    │   ├── FatalProcessingError  retrying cannot help: unsafe image, too large, checksum mismatch
    │   └── ChecksumMismatchError fatal; everything written is removed first
    └── ScratchSpaceRequired      not an error for the controller: exit 0 with scratchSpaceRequired

`fatal` tells the controller not to retry; every other error is worth another pod run.
"""

from __future__ import annotations


class ImporterError(Exception):
    fatal = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class SettingsError(ImporterError):
    fatal = True

    def __init__(self, variable: str, problem: str) -> None:
        self.variable = variable
        super().__init__(f"{variable}: {problem}")


class SourceError(ImporterError):
    """The source could not be reached or read; a later attempt may work."""

    def __init__(self, kind: str, detail: str) -> None:
        self.kind = kind
        self.detail = detail
        super().__init__(f"Unable to connect to {kind} data source: {detail}")


class ProcessingError(ImporterError):
    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(f"Unable to process data: {detail}")


class FatalProcessingError(ProcessingError):
    fatal = True


class ChecksumMismatchError(FatalProcessingError):
    def __init__(self, expected: str, calculated: str) -> None:
        self.expected = expected
        self.calculated = calculated
        super().__init__(
            f"checksum mismatch: expected {expected}, calculated {calculated}; "
            "check IMPORTER_CHECKSUM (the DataVolume's checksum) against the source"
        )


class ScratchSpaceRequired(ImporterError):
    def __init__(self, why: str) -> None:
        super().__init__(f"scratch space required and none found ({why})")
