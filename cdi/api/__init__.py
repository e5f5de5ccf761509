"""cdi.api: the wire contract shared by every process. Names, enums and pure functions; no I/O.

This package imports nothing else of ours (enforced by import-linter). The stable names are
re-exported here; `tests/unit/test_exports.py` checks that `__all__` and the modules agree.
"""

from cdi.api import annotations, env, groups, tokens
from cdi.api.phases import (
    CloneContentType,
    CloneStrategy,
    ConditionReason,
    ConditionStatus,
    ConditionType,
    ContentType,
    DataVolumePhase,
    ImporterPhase,
    PodPhase,
    PVCPhase,
    SourceType,
    VolumeMode,
)
from cdi.api.quantity import QuantityError, format_size, parse_quantity, parse_size
from cdi.api.space import (
    ALIGNMENT,
    DEFAULT_FILESYSTEM_OVERHEAD,
    MIB,
    OverheadError,
    parse_overhead,
    required_size,
    resize_target,
    round_down,
    round_up,
    usable_size,
)
from cdi.api.termination import (
    MAX_TERMINATION_MESSAGE_BYTES,
    MESSAGE_CLONE_COMPLETE,
    MESSAGE_IMPORT_COMPLETE,
    MESSAGE_SCRATCH_REQUIRED,
    MESSAGE_UPLOAD_COMPLETE,
    TerminationMessage,
    TerminationMessageError,
    decode,
    encode_failure,
)

__all__ = [
    "ALIGNMENT",
    "DEFAULT_FILESYSTEM_OVERHEAD",
    "MAX_TERMINATION_MESSAGE_BYTES",
    "MESSAGE_CLONE_COMPLETE",
    "MESSAGE_IMPORT_COMPLETE",
    "MESSAGE_SCRATCH_REQUIRED",
    "MESSAGE_UPLOAD_COMPLETE",
    "MIB",
    "CloneContentType",
    "CloneStrategy",
    "ConditionReason",
    "ConditionStatus",
    "ConditionType",
    "ContentType",
    "DataVolumePhase",
    "ImporterPhase",
    "OverheadError",
    "PVCPhase",
    "PodPhase",
    "QuantityError",
    "SourceType",
    "TerminationMessage",
    "TerminationMessageError",
    "VolumeMode",
    "annotations",
    "decode",
    "encode_failure",
    "env",
    "format_size",
    "groups",
    "parse_overhead",
    "parse_quantity",
    "parse_size",
    "required_size",
    "resize_target",
    "round_down",
    "round_up",
    "tokens",
    "usable_size",
]
