"""The termination message contract (reference §5.9)."""

import json

import pytest

from cdi.api import (
    MAX_TERMINATION_MESSAGE_BYTES,
    TerminationMessage,
    TerminationMessageError,
    decode,
    encode_failure,
)


def test_success_json_uses_cdi_keys() -> None:
    msg = TerminationMessage(
        message="Import Complete", preallocation_applied=True, labels={"a": "b"}
    )
    doc = json.loads(msg.to_json())
    assert doc == {"message": "Import Complete", "preallocationApplied": True, "labels": {"a": "b"}}


def test_scratch_required() -> None:
    doc = json.loads(TerminationMessage(scratch_space_required=True).to_json())
    assert doc == {"scratchSpaceRequired": True}


def test_round_trip() -> None:
    msg = TerminationMessage(
        message="Upload Complete", deadline_passed=False, preallocation_applied=False
    )
    assert TerminationMessage.from_json(msg.to_json()) == msg


def test_decoding_what_cdi_writes() -> None:
    text = '{"scratchSpaceRequired":false,"preallocationApplied":true,"message":"Import Complete"}'
    msg = decode(text, 0)
    assert isinstance(msg, TerminationMessage)
    assert msg.preallocation_applied is True
    assert msg.scratch_space_required is False
    assert msg.message == "Import Complete"


def test_failure_is_one_line_text() -> None:
    text = "Unable to connect to http data source: expected status code 200, got 404\nstack trace"
    assert (
        decode(text, 1)
        == "Unable to connect to http data source: expected status code 200, got 404"
    )


def test_too_long_success_message_is_refused() -> None:
    with pytest.raises(TerminationMessageError, match="4096"):
        TerminationMessage(message="x" * MAX_TERMINATION_MESSAGE_BYTES).to_json()


def test_failure_text_is_cut_to_the_limit_on_a_character_boundary() -> None:
    out = encode_failure("é" * 5000)
    assert len(out.encode()) <= MAX_TERMINATION_MESSAGE_BYTES
    assert set(out) == {"é"}


@pytest.mark.parametrize(
    "text",
    ["not json", "[1,2]", '{"preallocationApplied":"yes"}', '{"message":3}', '{"labels":{"a":1}}'],
)
def test_malformed_success_messages(text: str) -> None:
    with pytest.raises(TerminationMessageError):
        TerminationMessage.from_json(text)
