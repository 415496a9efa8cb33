from __future__ import annotations

import pytest

from stream_guard.events import Decision, Mode, Verdict
from stream_guard.policy.model import Policy
from stream_guard.reasoning.cascade import final_verdict
from stream_guard.reasoning.parsers import ReasoningResult

from .conftest import EscalationFactory

ALLOW, BLOCK, REVIEW = Decision.ALLOW, Decision.BLOCK, Decision.REVIEW
ESCALATED = {"S1": 0.62, "S10": 0.1, "S12": 0.35}  # S1 between allow and block
FAST_BLOCKS = {"S1": 0.91, "S10": 0.1, "S12": 0.35}  # S1 at or above its block threshold
ALL_CLEAR = {"S1": 0.1, "S10": 0.1, "S12": 0.1}


def said(decision: Decision, *codes: str) -> ReasoningResult:
    return ReasoningResult(
        decision=decision, categories=list(codes), rationale=f"model says {decision}", raw="..."
    )


# (trust, fast scores, model answer or None, decision, flagged, to review, review reason prefix,
#  agreed_with_fast)
# fmt: off
CASES = [
    # override: the model's decision is final
    ("override", ESCALATED, said(BLOCK, "S1"), BLOCK, ["S1"], False, None, False),
    ("override", ESCALATED, said(BLOCK, "S12", "S10"), BLOCK, ["S10", "S12"], False, None, False),
    ("override", ESCALATED, said(ALLOW), ALLOW, [], False, None, False),
    ("override", FAST_BLOCKS, said(ALLOW), ALLOW, [], False, None, False),
    ("override", FAST_BLOCKS, said(BLOCK, "S1"), BLOCK, ["S1"], False, None, True),
    ("override", ALL_CLEAR, said(ALLOW), ALLOW, [], False, None, True),
    ("override", ESCALATED, said(REVIEW, "S10"), REVIEW, ["S1", "S10"], True,
     "reasoning.undecided", None),
    ("override", ESCALATED, said(BLOCK), REVIEW, ["S1"], True, "reasoning.undecided", None),
    ("override", ESCALATED, None, REVIEW, ["S1"], True, "reasoning.no_answer", None),
    # advisory: the stricter side wins, disagreements go to a person
    ("advisory", ESCALATED, said(BLOCK, "S10"), REVIEW, ["S1", "S10"], True,
     "reasoning.disagreement", False),
    ("advisory", ESCALATED, said(BLOCK, "S1"), REVIEW, ["S1"], True,
     "reasoning.disagreement", False),
    ("advisory", ESCALATED, said(ALLOW), REVIEW, ["S1"], True, "reasoning.disagreement", False),
    ("advisory", ESCALATED, said(REVIEW), REVIEW, ["S1"], True, "reasoning.undecided", None),
    ("advisory", ESCALATED, None, REVIEW, ["S1"], True, "reasoning.no_answer", None),
    ("advisory", FAST_BLOCKS, said(ALLOW), BLOCK, ["S1"], False, None, False),
    ("advisory", FAST_BLOCKS, said(BLOCK, "S12"), BLOCK, ["S1", "S12"], False, None, True),
    ("advisory", FAST_BLOCKS, said(REVIEW), BLOCK, ["S1"], False, None, None),
    ("advisory", FAST_BLOCKS, None, REVIEW, ["S1"], True, "reasoning.no_answer", None),
    ("advisory", ALL_CLEAR, said(ALLOW), ALLOW, [], False, None, True),
    ("advisory", ALL_CLEAR, said(BLOCK, "S1"), REVIEW, ["S1"], True,
     "reasoning.disagreement", False),
]
# fmt: on


@pytest.mark.parametrize(
    ("trust", "scores", "result", "decision", "flagged", "review", "reason", "agreed"), CASES
)
def test_final_verdict_table(
    trust: str,
    scores: dict[str, float],
    result: ReasoningResult | None,
    decision: Decision,
    flagged: list[str],
    review: bool,
    reason: str | None,
    agreed: bool | None,
    policy: Policy,
    escalation_factory: EscalationFactory,
) -> None:
    esc = escalation_factory(scores=scores)
    verdict, to_review = final_verdict(
        esc,
        result,
        policy=policy,
        trust=trust,  # type: ignore[arg-type]
        model_name="smollm2-135m-instruct",
        prompt_format="safevision",
        failure_reason=None if result else "reasoning server unavailable: timed out",
    )
    assert (verdict.decision, verdict.flagged, to_review) == (decision, flagged, review)
    if reason is None:
        assert verdict.review_reason is None
    else:
        assert verdict.review_reason is not None and verdict.review_reason.startswith(reason)
    assert verdict.reasoning is not None
    assert verdict.reasoning.agreed_with_fast is agreed
    assert verdict.reasoning.trust == trust


def test_final_verdict_keeps_the_fast_scores_and_names_the_reasoning_model(
    policy: Policy, escalation_factory: EscalationFactory
) -> None:
    esc = escalation_factory()
    verdict, _ = final_verdict(
        esc, said(BLOCK, "S1"), policy=policy, trust="override",
        model_name="llama-guard-4-12b", prompt_format="llama_guard_4", failure_reason=None,
    )  # fmt: skip
    fast = esc.fast_verdict
    assert verdict.mode == Mode.REASONING and verdict.final is True
    assert verdict.categories == fast.categories
    assert verdict.verdict_id == Verdict.make_id("u-1", fast.policy_version, Mode.REASONING, True)
    assert verdict.verdict_id != fast.verdict_id
    assert (verdict.upload_id, verdict.tenant_id) == ("u-1", "acme")
    assert (verdict.policy_id, verdict.policy_version) == (fast.policy_id, fast.policy_version)
    assert (verdict.model_name, verdict.model_version) == (fast.model_name, fast.model_version)
    assert verdict.reasoning is not None
    assert verdict.reasoning.model == "llama-guard-4-12b"
    assert verdict.reasoning.prompt_format == "llama_guard_4"
    assert verdict.reasoning.rationale == "model says block"
    assert verdict.reasoning.categories == ["S1"]


def test_the_rationale_is_attached_when_the_upload_goes_to_review(
    policy: Policy, escalation_factory: EscalationFactory
) -> None:
    verdict, review = final_verdict(
        escalation_factory(), said(ALLOW), policy=policy, trust="advisory",
        model_name="m", prompt_format="shieldvlm", failure_reason=None,
    )  # fmt: skip
    assert review and verdict.reasoning is not None
    assert verdict.reasoning.rationale == "model says allow"
    assert verdict.reasoning.decision == ALLOW
    assert "S1 (0.62)" in (verdict.review_reason or "")


def test_an_unavailable_server_goes_to_review_with_the_reason(
    policy: Policy, escalation_factory: EscalationFactory
) -> None:
    verdict, review = final_verdict(
        escalation_factory(), None, policy=policy, trust="override", model_name="m",
        prompt_format="safevision", failure_reason="out-of-schema answer after 3 attempts",
    )  # fmt: skip
    assert review and verdict.decision == REVIEW
    assert verdict.review_reason == "reasoning.no_answer: out-of-schema answer after 3 attempts"
    assert verdict.reasoning is not None and verdict.reasoning.decision == REVIEW
    assert "out-of-schema" in verdict.reasoning.rationale


def test_the_same_inputs_give_the_identical_record(
    policy: Policy, escalation_factory: EscalationFactory
) -> None:
    args = dict(policy=policy, trust="advisory", model_name="m", prompt_format="safevision")
    a, _ = final_verdict(escalation_factory(), said(BLOCK, "S10"), failure_reason=None, **args)  # type: ignore[arg-type]
    b, _ = final_verdict(escalation_factory(), said(BLOCK, "S10"), failure_reason=None, **args)  # type: ignore[arg-type]
    assert a.to_bytes() == b.to_bytes()


def test_a_policy_other_than_the_upload_s_is_refused(
    policy: Policy, escalation_factory: EscalationFactory
) -> None:
    other = policy.model_copy(update={"policy_id": "other"})
    with pytest.raises(ValueError, match="does not match"):
        final_verdict(
            escalation_factory(), said(ALLOW), policy=other, trust="override",
            model_name="m", prompt_format="safevision",
        )  # fmt: skip


def test_model_codes_outside_the_policy_are_not_flagged(
    policy: Policy, escalation_factory: EscalationFactory
) -> None:
    verdict, _ = final_verdict(
        escalation_factory(), said(BLOCK, "S99", "S12"), policy=policy, trust="override",
        model_name="m", prompt_format="safevision",
    )  # fmt: skip
    assert verdict.flagged == ["S12"]
