"""What the console's page receives for the queue and for one item (pure, JSON-ready).

The page renders every string with ``textContent``, never as HTML, so an upload's caption or a
model's rationale cannot inject markup; the view only shapes data.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from stream_guard.events import Decision
from stream_guard.policy.model import Policy
from stream_guard.review.queue import QueueItem

__all__ = ["item_view", "queue_view"]


def queue_view(items: list[QueueItem], *, settled: int, caught_up: bool) -> dict[str, Any]:
    return {
        "pending": len(items),
        "settled": settled,
        "caught_up": caught_up,
        "items": [_summary(i) for i in items],
    }


def _summary(item: QueueItem) -> dict[str, Any]:
    v = item.verdict
    top = max(v.categories, key=lambda c: c.score, default=None)
    caption = item.upload.text.joined() if item.upload is not None else ""
    return {
        "upload_id": v.upload_id,
        "tenant_id": v.tenant_id,
        "flagged": list(v.flagged),
        "top": {"code": top.code, "name": top.name, "score": top.score} if top else None,
        "preview": caption[:120],
        "images": len(item.upload.images) if item.upload is not None else 0,
    }


def item_view(item: QueueItem, policy: Policy | None) -> dict[str, Any]:
    """One item: images (as console URLs), text, per-category scores, the reasoning model's
    rationale, why it needs a person, and the policy text of the flagged categories."""
    v, upload = item.verdict, item.upload
    flagged = set(v.flagged)
    categories = [
        {
            "code": c.code,
            "name": c.name,
            "score": c.score,
            "fast_decision": str(c.decision),
            "flagged": c.code in flagged or c.decision != Decision.ALLOW,
        }
        for c in v.categories
    ]
    reasoning = v.reasoning
    evidence = item.escalation.evidence if item.escalation is not None else None
    return {
        "upload_id": v.upload_id,
        "tenant_id": v.tenant_id,
        "verdict_id": v.verdict_id,
        "policy_id": v.policy_id,
        "policy_version": v.policy_version,
        "model_version": f"{v.model_name}:{v.model_version}",
        "review_reason": v.review_reason or "",
        "details_missing": upload is None,
        "text": upload.text.model_dump(exclude_none=True) if upload is not None else {},
        "images": [
            f"/api/items/{quote(v.upload_id, safe='')}/images/{n}"
            for n in range(len(upload.images) if upload is not None else 0)
        ],
        "categories": categories,
        "rationale": reasoning.rationale if reasoning else "",
        "reasoning": (
            {
                "model": reasoning.model,
                "decision": str(reasoning.decision),
                "categories": list(reasoning.categories),
            }
            if reasoning
            else None
        ),
        "evidence": (
            {"ocr_text": evidence.ocr_text, "detections": evidence.image_detections}
            if evidence is not None
            else None
        ),
        "policy": _policy_text(
            policy, v.policy_version, [c["code"] for c in categories if c["flagged"]]
        ),
    }


def _policy_text(policy: Policy | None, version: str, codes: list[str]) -> dict[str, Any]:
    if policy is None:
        return {"version": None, "same_version": False, "categories": []}
    by_code = {c.code: c for c in policy.categories}
    return {
        "version": policy.effective_version,
        "same_version": policy.effective_version == version,
        "categories": [
            {"code": c, "name": by_code[c].name, "definition": by_code[c].definition}
            for c in codes
            if c in by_code
        ],
    }
