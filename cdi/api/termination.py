"""The worker-to-controller termination message (reference §5.9).

On success a worker writes one JSON object (at most 4096 bytes, the kubelet's limit) to its
termination log and exits 0; on failure it writes one line of plain text and exits non-zero. The
controller parses JSON only when the exit code is 0. Owns encoding and decoding, no file I/O.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

MAX_TERMINATION_MESSAGE_BYTES = 4096

MESSAGE_IMPORT_COMPLETE = "Import Complete"
MESSAGE_UPLOAD_COMPLETE = "Upload Complete"
MESSAGE_CLONE_COMPLETE = "Clone Complete"
MESSAGE_DEADLINE_PASSED = "Deadline Passed"
MESSAGE_SCRATCH_REQUIRED = "scratch space required and none found"


class TerminationMessageError(ValueError):
    """A termination message that does not follow the contract (too long, not JSON, wrong types)."""


@dataclass(frozen=True, slots=True)
class VddkInfo:
    version: str = ""
    host: str = ""


@dataclass(frozen=True, slots=True)
class TerminationMessage:
    """What a worker that exited 0 tells the controller. Unset fields are left out of the JSON."""

    message: str | None = None
    scratch_space_required: bool | None = None
    preallocation_applied: bool | None = None
    deadline_passed: bool | None = None
    labels: dict[str, str] = field(default_factory=dict)
    vddk_info: VddkInfo | None = None

    def to_json(self) -> str:
        doc: dict[str, Any] = {}
        if self.scratch_space_required is not None:
            doc["scratchSpaceRequired"] = self.scratch_space_required
        if self.preallocation_applied is not None:
            doc["preallocationApplied"] = self.preallocation_applied
        if self.deadline_passed is not None:
            doc["deadlinePassed"] = self.deadline_passed
        if self.vddk_info is not None:
            doc["vddkInfo"] = {"Version": self.vddk_info.version, "Host": self.vddk_info.host}
        if self.labels:
            doc["labels"] = dict(self.labels)
        if self.message is not None:
            doc["message"] = self.message
        text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
        if len(text.encode()) > MAX_TERMINATION_MESSAGE_BYTES:
            raise TerminationMessageError(
                f"termination message is {len(text.encode())} bytes, more than the "
                f"{MAX_TERMINATION_MESSAGE_BYTES} the kubelet keeps"
            )
        return text

    @classmethod
    def from_json(cls, text: str) -> TerminationMessage:
        if len(text.encode()) > MAX_TERMINATION_MESSAGE_BYTES:
            raise TerminationMessageError("termination message longer than 4096 bytes")
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise TerminationMessageError(f"termination message is not JSON: {e.msg}") from None
        if not isinstance(doc, dict):
            raise TerminationMessageError("termination message is not a JSON object")

        def opt_bool(key: str) -> bool | None:
            value = doc.get(key)
            if value is None or isinstance(value, bool):
                return value
            raise TerminationMessageError(f"termination message field {key!r} is not a boolean")

        message = doc.get("message")
        if message is not None and not isinstance(message, str):
            raise TerminationMessageError("termination message field 'message' is not a string")
        labels = doc.get("labels") or {}
        if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            raise TerminationMessageError("termination message field 'labels' is not a string map")
        vddk = doc.get("vddkInfo")
        vddk_info = None
        if isinstance(vddk, dict):
            vddk_info = VddkInfo(str(vddk.get("Version", "")), str(vddk.get("Host", "")))
        return cls(
            message=message,
            scratch_space_required=opt_bool("scratchSpaceRequired"),
            preallocation_applied=opt_bool("preallocationApplied"),
            deadline_passed=opt_bool("deadlinePassed"),
            labels=labels,
            vddk_info=vddk_info,
        )


def encode_failure(message: str) -> str:
    """The failure form: the first line only, cut to the kubelet's limit on a character boundary."""
    line = message.strip().splitlines()[0] if message.strip() else "unknown error"
    data = line.encode()[:MAX_TERMINATION_MESSAGE_BYTES]
    return data.decode(errors="ignore")


def decode(text: str, exit_code: int) -> TerminationMessage | str:
    """What the controller reads: a message object for exit 0, the failure text otherwise."""
    if exit_code == 0:
        return TerminationMessage.from_json(text)
    return encode_failure(text)
