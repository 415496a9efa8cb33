"""Pure decisions of the fast stage: bytes to UploadEvent, scores to outputs, errors to DLQ.

No I/O and no clocks beyond the dead letter's timestamp: table-tested in
``tests/unit/pipeline/test_decide.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence

import numpy as np
from pydantic import ValidationError

from stream_guard.errors import ErrorCode, EventError, PermanentError
from stream_guard.events import (
    DeadLetter,
    Decision,
    Escalation,
    Evidence,
    Mode,
    SourceRef,
    UploadEvent,
    Verdict,
)
from stream_guard.pipeline.records import MAX_OUTPUT_BYTES, Output, Record, Result, trace_headers
from stream_guard.policy.model import Policy

__all__ = [
    "MAX_DLQ_ORIGINAL_BYTES",
    "dead_letter",
    "decide",
    "parse_upload",
    "unexpected",
]

log = logging.getLogger(__name__)

# The embedded original of a dead letter: base64 of 256 KiB is ~350 kB, well inside the
# producer's 1 MB request limit beside the rest of the record.
MAX_DLQ_ORIGINAL_BYTES = 256 * 1024
# Evidence of an escalation: detector signals at or above this are worth words to the model.
DETECTION_FLOOR = 0.2


def _clean(text: str, limit: int = 2000) -> str:
    """Text safe to put in an event: lone surrogates and other unencodable characters escaped."""
    return text[:limit].encode("utf-8", "backslashreplace").decode("utf-8")


def dead_letter(
    record: Record,
    error: PermanentError,
    upload_id: str | None = None,
    headers: dict[str, bytes] | None = None,
) -> Result:
    letter = DeadLetter.of(
        record.value,
        record.key,
        max_original_bytes=MAX_DLQ_ORIGINAL_BYTES,
        upload_id=upload_id,
        error_code=str(error.code),
        reason=_clean(error.reason),
        stage=error.stage,
        source=SourceRef(topic=record.topic, partition=record.partition, offset=record.offset),
    )
    log.warning(
        "dead-lettered %s: %s",
        record.where,
        _clean(str(error), 500),
        extra={"where": record.where, "upload_id": upload_id, "error_code": str(error.code)},
    )
    out = Output("dlq", _dlq_key(record.key), letter.to_bytes(), headers or trace_headers(record))
    return Result(record, "dlq", [out], upload_id, str(error.code))


MAX_KEY_BYTES = 1024


def _dlq_key(key: bytes | None) -> bytes | None:
    """The dead letter's Kafka key: the original when small, else its digest (a key is never
    the reason a dead letter cannot be written)."""
    if key is None or len(key) <= MAX_KEY_BYTES:
        return key
    return b"sha256:" + hashlib.sha256(key).hexdigest().encode()


def unexpected(record: Record, exc: BaseException, stage: str) -> Result:
    """An exception nobody foresaw, for this one record: a dead letter with its own code and
    the exception type, never a lost record or a dead batch."""
    error = PermanentError(
        ErrorCode.INTERNAL_UNEXPECTED, f"{type(exc).__name__}: {exc}", stage=stage
    )
    log.error("unexpected error on %s", record.where, exc_info=exc)
    return dead_letter(record, error)


def parse_upload(record: Record, max_bytes: int) -> UploadEvent:
    if len(record.value) > max_bytes:
        raise EventError(
            ErrorCode.EVENT_TOO_LARGE,
            f"event is {len(record.value)} bytes, over the {max_bytes}-byte limit",
            stage="parse",
        )
    try:
        data = json.loads(record.value)
    except RecursionError as e:  # json raises this, not JSONDecodeError, on deep nesting
        raise EventError(ErrorCode.EVENT_MALFORMED, "JSON nested too deeply", stage="parse") from e
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, and integers over the
        # interpreter's digit limit (a plain ValueError)
        raise EventError(
            ErrorCode.EVENT_MALFORMED, f"not JSON: {str(e)[:300]}", stage="parse"
        ) from e
    if _has_lone_surrogate(data):
        raise EventError(
            ErrorCode.EVENT_MALFORMED, "text is not valid Unicode (lone surrogate)", stage="parse"
        )
    if isinstance(data, dict) and isinstance(data.get("schema_version"), int):
        if data["schema_version"] > 1:
            raise EventError(
                ErrorCode.EVENT_UNSUPPORTED_SCHEMA,
                f"schema_version {data['schema_version']} is newer than this worker reads (1)",
                stage="parse",
            )
    try:
        upload = UploadEvent.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            for err in e.errors()[:5]
        )
        raise EventError(ErrorCode.EVENT_MALFORMED, problems, stage="parse") from e
    except RecursionError as e:
        raise EventError(ErrorCode.EVENT_MALFORMED, "JSON nested too deeply", stage="parse") from e
    return upload


def _has_lone_surrogate(data: object) -> bool:
    """True when any string of the parsed document, keys included, holds a lone surrogate
    (JSON's ``\\ud800`` escapes parse, but no UTF-8 encoder can write them back out).
    Iterative: the document may be nested as deep as the parser allowed."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _evidence(
    signals: np.ndarray, signal_names: Sequence[str], top: list, ocr_text: str
) -> Evidence:
    detections = [
        {name: round(float(s), 4)}
        for name, s in zip(signal_names, signals, strict=True)
        if s >= DETECTION_FLOOR
    ]
    return Evidence(image_detections=detections, top_categories=top, ocr_text=ocr_text[:2000])


def decide(
    record: Record,
    upload: UploadEvent,
    policy: Policy,
    model: tuple[str, str],
    scores: np.ndarray,
    *,
    signals: np.ndarray,
    signal_names: Sequence[str],
    ocr_text: str = "",
    headers: dict[str, bytes] | None = None,
    truncated: bool = False,
    image_models: Sequence[tuple[str, str, str]] | None = None,
) -> Result:
    """The fast verdict of one scored upload (and its escalation when it is uncertain). Text cut
    by the segment budget was not all read: such an upload is never allowed by the fast tier.
    ``image_models``: (role, name, version) of the image guard's models, when they scored it."""
    decision, categories = policy.decide(dict(zip(policy.codes, scores.tolist(), strict=True)))
    if truncated and decision == Decision.ALLOW:
        decision = Decision.ESCALATE
    final = decision != Decision.ESCALATE
    verdict = Verdict.issue(
        upload_id=upload.upload_id,
        tenant_id=upload.tenant_id,
        decision=decision,
        final=final,
        mode=Mode.FAST,
        flagged=[c.code for c in categories if c.decision != Decision.ALLOW],
        categories=categories,
        policy_id=policy.policy_id,
        policy_version=policy.effective_version,
        model_name=model[0],
        model_version=model[1],
        text_truncated=True if truncated else None,
        image_models=[{"role": r, "name": n, "version": v} for r, n, v in image_models]
        if image_models
        else None,
    )
    headers = headers or trace_headers(record)
    key = upload.upload_id.encode()
    outputs = [Output("verdicts", key, verdict.to_bytes(), headers)]
    if decision == Decision.ESCALATE:
        top = sorted(categories, key=lambda c: c.score, reverse=True)[:5]
        escalation = Escalation(
            upload=upload,
            fast_verdict=verdict,
            evidence=_evidence(signals, signal_names, top, ocr_text),
        )
        value = escalation.to_bytes()
        if len(value) > MAX_OUTPUT_BYTES:  # one outcome per upload: no provisional verdict either
            error = PermanentError(
                ErrorCode.OUTPUT_TOO_LARGE,
                f"escalation would be {len(value)} bytes, over {MAX_OUTPUT_BYTES}; lower "
                "kafka.max_event_bytes to leave room for the fast verdict",
                stage="decide",
            )
            return dead_letter(record, error, upload.upload_id, headers)
        outputs.append(Output("escalations", key, value, headers))
    return Result(record, str(decision), outputs, upload.upload_id)
