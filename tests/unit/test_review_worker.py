"""The review worker per record, without a broker: verdicts, rows, conflicts, dead letters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stream_guard.agents.review import ReviewWorker
from stream_guard.pipeline.records import Record
from stream_guard.settings import ReviewSettings, Settings
from tests.unit.test_review import decision, reviewed


@pytest.fixture
def worker(tmp_path: Path) -> ReviewWorker:
    return ReviewWorker(Settings(review=ReviewSettings(manifest=str(tmp_path / "labels"))))


def record(value: bytes, offset: int = 0) -> Record:
    return Record(
        b"u1", value, "guard.review.decisions", 0, offset, {"traceparent": b"00-ab-cd-01"}
    )


async def test_a_decision_becomes_one_final_verdict_and_one_row(worker, tmp_path: Path):
    (out,) = await worker.apply(record(decision().to_bytes()))
    verdict = json.loads(out.value)
    assert (out.role, out.key) == ("verdicts", b"u1")
    assert verdict["mode"] == "human" and verdict["decision"] == "block"
    assert out.headers == {"traceparent": b"00-ab-cd-01"}
    rows = list((tmp_path / "labels" / "rows").glob("*.json"))
    assert [p.stem for p in rows] == ["u1"]
    # redelivered: the same bytes again, no second row
    (again,) = await worker.apply(record(decision().to_bytes(), offset=1))
    assert again.value == out.value


async def test_a_different_later_decision_for_a_settled_upload_makes_no_verdict(worker):
    await worker.apply(record(decision().to_bytes()))
    other = decision(decision_id="d-late", decision="allow", categories=[])
    assert await worker.apply(record(other.to_bytes(), offset=1)) == []


async def test_without_a_manifest_the_worker_still_keeps_the_first_decision(tmp_path: Path):
    worker = ReviewWorker(Settings())
    assert len(await worker.apply(record(decision().to_bytes()))) == 1
    other = decision(decision_id="d-late", decision="allow", categories=[])
    assert await worker.apply(record(other.to_bytes(), offset=1)) == []


@pytest.mark.parametrize("value", [b"{not json", b"[" * 100_000, json.dumps({"x": 1}).encode()])
async def test_a_malformed_decision_is_a_dead_letter(worker, value):
    (out,) = await worker.apply(record(value))
    letter = json.loads(out.value)
    assert out.role == "dlq" and letter["error_code"] == "event.malformed"
    assert letter["stage"] == "review"


async def test_reviewer_labels_are_compared_with_the_shadow_verdict_of_the_upload(worker):
    shadow = reviewed().model_copy(
        update={"policy_version": "1.1.0+beefbeef", "flagged": ["S1"], "model_version": "4"}
    )
    worker.remember_shadow(shadow.to_bytes())
    worker.remember_shadow(b"{garbage")  # skipped, never fatal
    await worker.apply(record(decision().to_bytes()))
    counts = {k: vars(v) for k, v in worker.comparison.items()}
    key = ("1.1.0+beefbeef@guard_head_p:4", "shadow", "S1")
    assert counts[key] == {"tp": 1, "fp": 0, "fn": 0, "tn": 0}
    assert counts[(key[0], "live", "S10")] == {"tp": 0, "fp": 0, "fn": 0, "tn": 1}
