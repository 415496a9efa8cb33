"""Human review, pure parts: decisions -> verdicts and rows, the queue, views, comparisons."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from stream_guard.events import (
    Decision,
    Escalation,
    Mode,
    ReviewDecision,
    UploadEvent,
    Verdict,
)
from stream_guard.quality.manifest import read_manifest
from stream_guard.review.comparison import ANY, LabelledComparison
from stream_guard.review.decisions import final_verdict, manifest_row, opaque_reviewer
from stream_guard.review.labels import LocalLabels, export_manifest, record_row
from stream_guard.review.queue import ReviewQueue
from stream_guard.review.views import item_view, queue_view

CODES = [("S1", "Violent crimes", 0.62, "escalate"), ("S10", "Hate", 0.31, "allow")]


def reviewed(upload_id: str = "u1", **extra) -> Verdict:
    return Verdict.issue(
        upload_id=upload_id,
        tenant_id="esc",
        decision="review",
        final=True,
        mode="reasoning",
        flagged=["S1"],
        categories=[{"code": c, "name": n, "score": s, "decision": d} for c, n, s, d in CODES],
        policy_id="p",
        policy_version="1.0.0+abcd1234",
        model_name="guard_head_p",
        model_version="3",
        reasoning={
            "model": "m",
            "prompt_format": "safevision",
            "decision": "review",
            "rationale": "could be a threat",
        },
        review_reason="reasoning.disagreement: ...",
        **extra,
    )


def upload(upload_id: str = "u1") -> UploadEvent:
    return UploadEvent.model_validate(
        {
            "upload_id": upload_id,
            "tenant_id": "esc",
            "images": [{"uri": "s3://uploads/a.png"}],
            "text": {"caption": "a caption", "title": "a title"},
        }
    )


def decision(upload_id: str = "u1", **fields) -> ReviewDecision:
    v = reviewed(upload_id)
    base = {
        "decision_id": f"d-{upload_id}",
        "upload_id": upload_id,
        "tenant_id": "esc",
        "verdict_id": v.verdict_id,
        "policy_id": "p",
        "policy_version": "1.0.0+abcd1234",
        "decision": "block",
        "categories": ["S1"],
        "reviewer": opaque_reviewer("alice"),
        "decided_at": datetime(2026, 12, 1, 9, 30, tzinfo=UTC),
        "reviewed": v,
        "upload": upload(upload_id),
    }
    return ReviewDecision.model_validate({**base, **fields})


# -- the contract -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"decision": "escalate"}, "decision"),
        ({"decision": "block", "categories": []}, "at least one category"),
        ({"decision": "allow", "categories": ["S1"]}, "no category"),
        ({"categories": ["S99"]}, "categories must be distinct codes"),
        ({"categories": ["S1", "S1"]}, "categories must be distinct codes"),
        ({"verdict_id": "other"}, "reviewed verdict is not the one"),
        ({"policy_version": "2"}, "differ from the reviewed verdict"),
        ({"reviewer": "alice smith"}, "reviewer"),
        ({"note": "x" * 2001}, "note"),
    ],
)
def test_review_decision_rejects_inconsistent_or_bad_fields(fields, message):
    with pytest.raises(ValidationError, match=message):
        decision(**fields)


def test_review_decision_tolerates_unknown_fields_and_round_trips():
    d = decision()
    data = json.loads(d.to_bytes()) | {"added_later": True}
    assert ReviewDecision.model_validate(data) == d


def test_opaque_reviewer_is_stable_and_hides_the_identity():
    assert opaque_reviewer("alice") == opaque_reviewer(" alice ")
    assert opaque_reviewer("alice") != opaque_reviewer("bob")
    assert "alice" not in opaque_reviewer("alice")


# -- final verdict ----------------------------------------------------------------------------


def test_a_block_decision_makes_a_final_human_verdict_with_the_chosen_categories():
    d = decision(note="threat against a named place")
    v = final_verdict(d)
    assert (v.decision, v.final, v.mode) == (Decision.BLOCK, True, Mode.HUMAN)
    assert v.flagged == ["S1"]
    assert {c.code: c.decision for c in v.categories} == {"S1": "block", "S10": "allow"}
    assert [c.score for c in v.categories] == [0.62, 0.31], "the model's scores are kept"
    assert v.review and v.review.reviewer == d.reviewer and v.review.note == d.note
    assert v.reasoning and v.reasoning.rationale == "could be a threat"
    assert (v.policy_version, v.model_version) == ("1.0.0+abcd1234", "3")
    assert v.verdict_id == Verdict.make_id("u1", "1.0.0+abcd1234", Mode.HUMAN, True)


def test_the_same_decision_always_makes_the_same_verdict_bytes():
    assert final_verdict(decision()).to_bytes() == final_verdict(decision()).to_bytes()


def test_an_allow_decision_flags_nothing():
    v = final_verdict(decision(decision="allow", categories=[]))
    assert v.decision == Decision.ALLOW and v.flagged == []
    assert all(c.decision == Decision.ALLOW for c in v.categories)


# -- labelled rows ----------------------------------------------------------------------------


def test_manifest_row_carries_text_images_labels_and_the_policy_version():
    row = manifest_row(decision())
    assert row is not None
    assert row["id"] == "u1" and row["labels"] == ["S1"]
    assert row["images"] == ["s3://uploads/a.png"]
    assert (row["caption"], row["title"]) == ("a caption", "a title")
    assert row["policy_version"] == "1.0.0+abcd1234" and row["source"] == "review"
    assert manifest_row(decision(decision="allow", categories=[]))["labels"] == []


def test_a_decision_without_its_upload_makes_no_row():
    assert manifest_row(decision(upload=None)) is None


def test_label_store_keeps_the_first_decision_per_upload(tmp_path: Path):
    store = LocalLabels(tmp_path / "labels")
    first = manifest_row(decision("u1"))
    assert record_row(store, first) == "added"
    assert record_row(store, first) == "duplicate"
    other = manifest_row(decision("u1", decision_id="d-other", decision="allow", categories=[]))
    assert record_row(store, other) == "conflict"
    assert store.get("u1")["decision_id"] == "d-u1"
    assert record_row(store, manifest_row(decision("u2", decision="allow", categories=[]))) == (
        "added"
    )
    out = tmp_path / "labelled.jsonl"
    assert export_manifest(store, out) == 2
    rows = read_manifest(out, codes=["S1", "S10"])
    assert [(r.id, r.labels) for r in rows] == [("u1", ("S1",)), ("u2", ())]
    assert rows[0].images == ("s3://uploads/a.png",)


def test_export_of_an_empty_store_writes_no_rows(tmp_path: Path):
    assert export_manifest(LocalLabels(tmp_path / "none"), tmp_path / "m.jsonl") == 0


# -- the queue ----------------------------------------------------------------------------------


def escalation(upload_id: str) -> Escalation:
    fast = reviewed(upload_id).model_copy(update={"mode": Mode.FAST, "final": False})
    return Escalation(upload=upload(upload_id), fast_verdict=fast)


def test_queue_joins_reviews_with_their_escalations_and_settles_them():
    q = ReviewQueue(index_size=10)
    q.add_escalation(escalation("u1"))
    q.add_review(reviewed("u1"))
    q.add_review(reviewed("u2"))  # its escalation arrives later (another partition)
    q.add_escalation(escalation("u2"))
    assert [i.upload_id for i in q.pending()] == ["u1", "u2"]
    assert all(i.upload is not None for i in q.pending())
    q.settle("u1", "d1")
    assert [i.upload_id for i in q.pending()] == ["u2"]
    q.add_review(reviewed("u1"))  # redelivered after its decision
    assert [i.upload_id for i in q.pending()] == ["u2"] and q.is_settled("u1")


def test_queue_index_drops_the_oldest_escalations_first():
    q = ReviewQueue(index_size=2)
    for n in range(3):
        q.add_escalation(escalation(f"u{n}"))
    q.add_review(reviewed("u0"))
    q.add_review(reviewed("u2"))
    assert q.item("u0").upload is None, "evicted: shown without its upload"
    assert q.item("u2").upload is not None


def test_item_view_shows_scores_rationale_and_policy_text_of_flagged_categories():
    from stream_guard.policy.model import parse_policy

    policy = parse_policy(
        "policy_id: p\nversion: '1.0.0'\ncategories:\n"
        "  - {code: S1, name: Violent crimes, definition: Threats or acts of violence against "
        "people., examples: [a threat]}\n"
        "  - {code: S10, name: Hate, definition: Demeaning people for who they are., "
        "examples: [a demeaning remark]}\n"
    )
    q = ReviewQueue(index_size=10)
    q.add_escalation(escalation("u:1"))
    q.add_review(reviewed("u:1"))
    view = item_view(q.item("u:1"), policy)
    assert view["images"] == ["/api/items/u%3A1/images/0"]
    assert view["text"] == {"caption": "a caption", "title": "a title"}
    assert [c["flagged"] for c in view["categories"]] == [True, False]
    assert view["rationale"] == "could be a threat"
    assert [c["code"] for c in view["policy"]["categories"]] == ["S1"]
    assert "violence" in view["policy"]["categories"][0]["definition"]
    assert view["policy"]["same_version"] is False  # the parsed digest differs from the verdict's
    summary = queue_view(q.pending(), settled=0, caught_up=True)
    assert summary["pending"] == 1 and summary["items"][0]["top"]["code"] == "S1"


# -- live and shadow against reviewer labels ----------------------------------------------------


def test_labelled_comparison_counts_each_side_per_category_and_overall():
    c = LabelledComparison()
    codes = ["S1", "S10"]
    c.observe("cand", codes, labels=["S1"], live_flags=["S1", "S10"], shadow_flags=["S1"])
    c.observe("cand", codes, labels=[], live_flags=["S10"], shadow_flags=[])
    counts = dict(c.items())
    assert vars(counts[("cand", "live", "S10")]) == {"tp": 0, "fp": 2, "fn": 0, "tn": 0}
    assert vars(counts[("cand", "shadow", "S1")]) == {"tp": 1, "fp": 0, "fn": 0, "tn": 1}
    assert counts[("cand", "live", ANY)].precision == 0.5
    assert counts[("cand", "shadow", ANY)].precision == 1.0
    assert counts[("cand", "shadow", ANY)].recall == 1.0
    assert counts[("cand", "shadow", "S10")].precision is None
