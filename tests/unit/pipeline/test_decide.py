"""The fast stage's pure decisions: golden verdict bytes, hostile events, dead letters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stream_guard.errors import ErrorCode, EventError
from stream_guard.events import DeadLetter, UploadEvent
from stream_guard.pipeline.decide import (
    MAX_DLQ_ORIGINAL_BYTES,
    dead_letter,
    decide,
    parse_upload,
    unexpected,
)
from stream_guard.pipeline.records import MAX_OUTPUT_BYTES, Record
from stream_guard.policy.model import IMAGE_SIGNALS, load_policy

GOLDEN = Path(__file__).resolve().parents[2] / "golden"


def _record(value: bytes, key: bytes | None = b"k", offset: int = 7) -> Record:
    return Record(key, value, "guard.uploads", 2, offset)


def test_verdict_and_escalation_bytes_match_the_recorded_golden_file():
    """Recorded from the code before the package re-layout (commit fddd489): same inputs, same
    bytes, so downstream consumers see no change."""
    golden = json.loads((GOLDEN / "fast_decisions.json").read_text())
    policy = load_policy(GOLDEN / "policy.yaml")
    assert policy.effective_version == golden["policy_effective_version"]
    for case in golden["cases"]:
        upload = UploadEvent.model_validate(case["upload"])
        headers = {k: v.encode() for k, v in case["outputs"][0]["headers"].items()}
        record = Record(
            upload.upload_id.encode(),
            upload.to_bytes(),
            "guard.uploads",
            case["partition"],
            case["offset"],
            headers,
        )
        result = decide(
            record,
            upload,
            policy,
            ("guard_head_llama_guard_4", "3"),
            np.asarray(case["scores"], np.float32),
            signals=np.asarray(case["signals"], np.float32),
            signal_names=IMAGE_SIGNALS,
            ocr_text=case["ocr_text"],
            headers=headers,
        )
        assert result.outcome == case["outcome"]
        got = [(o.role, o.key.decode(), o.value.decode()) for o in result.outputs]
        want = [(o["role"], o["key"], o["value"]) for o in case["outputs"]]
        assert got == want, case["upload"]["upload_id"]


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (b"[" * 100_000, ErrorCode.EVENT_MALFORMED),
        (b'{"upload_id": "a", "metadata": ' + b"[" * 100_000 + b"}", ErrorCode.EVENT_MALFORMED),
        (b'{"upload_id": "a", "text": {"caption": "\xff\xfe"}}', ErrorCode.EVENT_MALFORMED),
        (b'{"upload_id": "a", "text": {"caption": "x \\ud800 y"}}', ErrorCode.EVENT_MALFORMED),
        (b"null", ErrorCode.EVENT_MALFORMED),
        (b"", ErrorCode.EVENT_MALFORMED),
        (b'{"upload_id": 5, "text": {"caption": "x"}}', ErrorCode.EVENT_MALFORMED),
        (b'{"schema_version": 9, "upload_id": "a"}', ErrorCode.EVENT_UNSUPPORTED_SCHEMA),
        (
            b'{"upload_id": "a", "text": {"caption": ' + b"9" * 5000 + b"}}",
            ErrorCode.EVENT_MALFORMED,
        ),
        (
            b'{"upload_id": "a", "text": {"caption": "x"}, "metadata": {"\\ud83d": "v"}}',
            ErrorCode.EVENT_MALFORMED,
        ),
        (
            b'{"upload_id": "a", "text": {"caption": "' + b"x" * 1_000_001 + b'"}}',
            ErrorCode.EVENT_TOO_LARGE,
        ),
    ],
    ids=[
        "nested",
        "nested-metadata",
        "invalid-utf8",
        "lone-surrogate",
        "null",
        "empty",
        "wrong-type",
        "newer-schema",
        "huge-integer",
        "surrogate-in-key",
        "too-large",
    ],
)
def test_hostile_events_are_permanent_errors_with_a_code(value: bytes, code: ErrorCode):
    with pytest.raises(EventError) as e:
        parse_upload(_record(value), 1_000_000)
    assert e.value.code == code
    # and the dead letter for it can always be written and fits a Kafka request
    result = dead_letter(_record(value), e.value)
    assert len(result.outputs[0].value) < MAX_OUTPUT_BYTES
    letter = DeadLetter.model_validate_json(result.outputs[0].value)
    assert letter.error_code == str(code)


@pytest.mark.parametrize(
    "size", [10, MAX_DLQ_ORIGINAL_BYTES, MAX_DLQ_ORIGINAL_BYTES + 1, 5_000_000]
)
def test_dead_letters_embed_a_bounded_original_with_its_size_and_digest(size: int):
    value = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    err = EventError(ErrorCode.EVENT_TOO_LARGE, "big", stage="parse")
    out = dead_letter(_record(value), err).outputs[0]
    assert len(out.value) < MAX_OUTPUT_BYTES
    letter = DeadLetter.model_validate_json(out.value)
    assert letter.source is not None and letter.source.offset == 7
    kept = letter.original_value()
    assert value.startswith(kept)
    if size > MAX_DLQ_ORIGINAL_BYTES:
        import hashlib

        assert letter.original_truncated is True and letter.original_size == size
        assert letter.original_sha256 == hashlib.sha256(value).hexdigest()
        assert len(kept) == MAX_DLQ_ORIGINAL_BYTES
    else:
        assert kept == value and letter.original_truncated is None


def test_an_unexpected_exception_becomes_a_dead_letter_naming_its_type():
    result = unexpected(_record(b"{}"), KeyError("boom \ud800"), "process")
    letter = DeadLetter.model_validate_json(result.outputs[0].value)
    assert letter.error_code == "internal.unexpected"
    assert letter.reason.startswith("KeyError")


def test_an_escalation_too_large_to_publish_is_one_dead_letter_not_a_verdict():
    policy = load_policy(GOLDEN / "policy.yaml")
    upload = UploadEvent.model_validate(
        {
            "upload_id": "big",
            "text": {"caption": "y" * 19_000, "title": "t" * 19_000},
            "metadata": {f"k{n}": "v" * 30_000 for n in range(32)},
        }
    )
    scores = np.full(len(policy.codes), 0.5, np.float32)  # inside the escalation band
    result = decide(
        _record(upload.to_bytes()),
        upload,
        policy,
        ("h", "1"),
        scores,
        signals=np.zeros(len(IMAGE_SIGNALS), np.float32),
        signal_names=IMAGE_SIGNALS,
    )
    assert result.outcome == "dlq" and [o.role for o in result.outputs] == ["dlq"]
    assert result.error_code == "output.too_large"


def test_a_huge_key_never_stops_its_dead_letter_from_being_written():
    err = EventError(ErrorCode.EVENT_MALFORMED, "bad", stage="parse")
    out = dead_letter(_record(b"{", key=b"k" * 2_000_000), err).outputs[0]
    assert out.key is not None and len(out.key) < 100 and out.key.startswith(b"sha256:")
    assert dead_letter(_record(b"{", key=b"small"), err).outputs[0].key == b"small"
