"""What a reviewer's decision becomes: the final verdict and the labelled manifest row (pure).

Both are functions of the ReviewDecision alone, so a redelivered decision yields the same verdict
bytes and the same row: the worker that applies decisions is idempotent without any state.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from stream_guard.events import (
    Decision,
    HumanReview,
    Mode,
    ReviewDecision,
    UploadText,
    Verdict,
)
from stream_guard.quality.manifest import parse_manifest

__all__ = [
    "ROW_SOURCE",
    "final_verdict",
    "manifest_row",
    "opaque_reviewer",
]

ROW_SOURCE = "review"  # the `source` field of rows written from reviewer decisions


def opaque_reviewer(identity: str) -> str:
    """The reviewer id events carry: a stable digest, never the name or address itself."""
    return "r-" + hashlib.sha256(identity.strip().encode()).hexdigest()[:20]


def final_verdict(decision: ReviewDecision) -> Verdict:
    """The final verdict (mode ``human``) a decision makes: the reviewed verdict's scores and
    reasoning, the reviewer's decision, and the chosen categories as the blocking ones."""
    reviewed = decision.reviewed
    chosen = set(decision.categories)
    categories = [
        c.model_copy(update={"decision": Decision.BLOCK if c.code in chosen else Decision.ALLOW})
        for c in reviewed.categories
    ]
    return Verdict.issue(
        upload_id=decision.upload_id,
        tenant_id=decision.tenant_id,
        decision=decision.decision,
        final=True,
        mode=Mode.HUMAN,
        flagged=[c.code for c in categories if c.code in chosen],
        categories=categories,
        policy_id=decision.policy_id,
        policy_version=decision.policy_version,
        model_name=reviewed.model_name,
        model_version=reviewed.model_version,
        reasoning=reviewed.reasoning,
        text_truncated=reviewed.text_truncated,
        review=HumanReview(
            decision_id=decision.decision_id,
            reviewer=decision.reviewer,
            decided_at=decision.decided_at,
            note=decision.note,
        ),
    )


def manifest_row(decision: ReviewDecision) -> dict[str, Any] | None:
    """The labelled row of ``quality/manifest.py``'s format for a decision, or None when the
    decision does not carry the upload (nothing to learn from without its text and images).

    Besides the fields ``eval``, ``calibrate`` and ``head train`` read, a row keeps where its
    label came from: the policy version the upload was judged under, the decision and reviewer.
    """
    upload = decision.upload
    if upload is None:
        return None
    row: dict[str, Any] = {
        "id": decision.upload_id,
        "images": [ref.uri for ref in upload.images],
        **_text(upload.text),
        "labels": list(decision.categories),
        "source": ROW_SOURCE,
        "tenant_id": decision.tenant_id,
        "policy_id": decision.policy_id,
        "policy_version": decision.policy_version,
        "model_version": decision.reviewed.model_version,
        "decision_id": decision.decision_id,
        "decided_at": decision.decided_at.isoformat(),
        "reviewer": decision.reviewer,
    }
    codes = [c.code for c in decision.reviewed.categories]
    # The row must read back as a manifest row of this policy: checked here, not at train time.
    parse_manifest(json.dumps(row), format="jsonl", source=decision.upload_id, codes=codes)
    return row


def _text(text: UploadText) -> dict[str, str]:
    return {k: v for k, v in text.model_dump(exclude_none=True).items() if v}
