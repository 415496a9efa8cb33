"""The cascade's last step: the fast verdict and the reasoning answer become the final Verdict.

Pure and deterministic: the same escalation, answer and arguments give the same Verdict, so a
redelivered escalation republishes an identical record (when the model answers the same).

Trust modes (issue 4: a small local model must not overturn the fast mode):

- ``override`` (a real guard model in production): the reasoning decision is final; an answer
  that is not a decision (REVIEW) goes to review.
- ``advisory`` (the local default): the rationale is attached and the stricter side wins. The fast
  side blocks when any category score reaches its block threshold; otherwise its evidence is the
  categories it escalated. A fast block stands whatever the model says. Without one, the model
  cannot settle the upload alone: ``unsafe`` (no fast score reaches block) and ``safe`` (the fast
  mode escalated) are both disagreements and go to review, with the model's rationale for the
  person who decides.

No usable answer (answers out of schema after the retries, a refusal) always goes to review
with the reason.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from stream_guard.errors import ErrorCode
from stream_guard.events import CategoryScore, Decision, Escalation, Mode, Reasoning, Verdict
from stream_guard.policy.model import Policy
from stream_guard.reasoning.parsers import ReasoningResult, bounded_rationale

__all__ = [
    "MAX_REVIEW_REASON_CHARS",
    "REVIEW_DISAGREEMENT",
    "REVIEW_UNAVAILABLE",
    "REVIEW_UNDECIDED",
    "Trust",
    "final_verdict",
]

Trust = Literal["override", "advisory"]

# no usable answer: out of schema after the retries, refused, or images unreadable (a server
# that is down is not this: the reasoning worker waits for it)
REVIEW_UNAVAILABLE = "reasoning.no_answer"
REVIEW_UNDECIDED = str(ErrorCode.REASONING_UNDECIDED)
REVIEW_DISAGREEMENT = "reasoning.disagreement"
MAX_REVIEW_REASON_CHARS = 800


def _ordered(codes: Iterable[str], policy: Policy) -> list[str]:
    """Unique codes in policy order; codes the policy no longer has keep their first position."""
    wanted = list(dict.fromkeys(codes))
    known = [c for c in policy.codes if c in wanted]
    return known + [c for c in wanted if c not in policy.codes]


def _blocks(score: CategoryScore, policy: Policy) -> bool:
    for cat in policy.categories:
        if cat.code == score.code:
            return score.score >= policy.thresholds_for(cat).block
    return score.decision == Decision.BLOCK


def _scores(codes: list[str], categories: list[CategoryScore]) -> str:
    by_code = {c.code: c for c in categories}
    return ", ".join(f"{c} ({by_code[c].score:.2f})" if c in by_code else c for c in codes)


def final_verdict(
    escalation: Escalation,
    result: ReasoningResult | None,
    *,
    policy: Policy,
    trust: Trust,
    model_name: str,
    prompt_format: str,
    failure_reason: str | None = None,
) -> tuple[Verdict, bool]:
    """The final reasoning-mode Verdict and whether it goes to human review.

    ``result`` is None when the model gave no usable answer; ``failure_reason`` then says why.
    The fast category scores are kept; ``flagged`` holds the codes behind the decision (for a
    review: everything either tier flagged). ``policy`` must be the policy the upload was scored
    under (same ``policy_id``); its thresholds decide what the fast side blocks.
    """
    fast = escalation.fast_verdict
    if policy.policy_id != fast.policy_id:
        raise ValueError(
            f"policy {policy.policy_id!r} does not match the verdict's {fast.policy_id!r}"
        )
    if trust not in ("override", "advisory"):
        raise ValueError(f"trust must be 'override' or 'advisory', not {trust!r}")
    fast_block = _ordered((c.code for c in fast.categories if _blocks(c, policy)), policy)
    fast_flagged = _ordered(
        (c.code for c in fast.categories if c.decision != Decision.ALLOW or c.code in fast_block),
        policy,
    )

    agreed: bool | None = None
    if result is None:
        decision = Decision.REVIEW
        flagged = fast_flagged
        said = Decision.REVIEW
        model_codes: list[str] = []
        rationale = bounded_rationale(f"no answer: {failure_reason or 'unknown failure'}")
        reason: str | None = f"{REVIEW_UNAVAILABLE}: {failure_reason or 'unknown failure'}"
    else:
        said = result.decision
        model_codes = _ordered((c for c in result.categories if c in policy.codes), policy)
        rationale = result.rationale
        if said == Decision.BLOCK and not model_codes:
            said = Decision.REVIEW  # a block must name a category of this policy
        if said != Decision.REVIEW:
            agreed = (said == Decision.BLOCK and bool(fast_block)) or (
                said == Decision.ALLOW and not fast_flagged
            )
        decision, flagged, reason = _decide(
            trust, said, model_codes, rationale, fast_block, fast_flagged, fast.categories, policy
        )

    reasoning = Reasoning(
        model=model_name,
        prompt_format=prompt_format,
        decision=said,
        categories=model_codes,
        rationale=rationale,
        trust=trust,
        agreed_with_fast=agreed,
    )
    upload = escalation.upload
    verdict = Verdict.issue(
        upload_id=upload.upload_id,
        tenant_id=upload.tenant_id,
        decision=decision,
        final=True,
        mode=Mode.REASONING,
        flagged=flagged,
        categories=list(fast.categories),
        policy_id=fast.policy_id,
        policy_version=fast.policy_version,
        model_name=fast.model_name,
        model_version=fast.model_version,
        reasoning=reasoning,
        review_reason=_bounded(reason) if decision == Decision.REVIEW else None,
    )
    return verdict, decision == Decision.REVIEW


def _bounded(reason: str | None) -> str | None:
    if reason is None or len(reason) <= MAX_REVIEW_REASON_CHARS:
        return reason
    return reason[: MAX_REVIEW_REASON_CHARS - 1] + "…"


def _decide(
    trust: Trust,
    said: Decision,
    model_codes: list[str],
    rationale: str,
    fast_block: list[str],
    fast_flagged: list[str],
    fast_scores: list[CategoryScore],
    policy: Policy,
) -> tuple[Decision, list[str], str | None]:
    """(decision, flagged codes, review reason) for an answer the model did give."""
    everything = _ordered([*fast_flagged, *model_codes], policy)
    if said == Decision.REVIEW:
        if trust == "advisory" and fast_block:
            return Decision.BLOCK, fast_block, None
        return Decision.REVIEW, everything, f"{REVIEW_UNDECIDED}: {rationale or 'no rationale'}"
    if trust == "override":
        if said == Decision.BLOCK:
            return Decision.BLOCK, model_codes, None
        return Decision.ALLOW, [], None
    # advisory
    if fast_block:
        extra = model_codes if said == Decision.BLOCK else []
        return Decision.BLOCK, _ordered([*fast_block, *extra], policy), None
    if said == Decision.BLOCK:
        escalated = _scores(fast_flagged, fast_scores) or "none"
        return (
            Decision.REVIEW,
            everything,
            f"{REVIEW_DISAGREEMENT}: the model says unsafe ({', '.join(model_codes)}) but no fast "
            f"score reaches its block threshold (escalated: {escalated})",
        )
    if fast_flagged:
        return (
            Decision.REVIEW,
            fast_flagged,
            f"{REVIEW_DISAGREEMENT}: the model says safe but the fast mode escalated "
            f"{_scores(fast_flagged, fast_scores)}",
        )
    return Decision.ALLOW, [], None
