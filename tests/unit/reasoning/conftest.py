"""A small Llama-Guard-coded policy and escalations built the way the fast mode builds them."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pytest

from stream_guard.events import (
    Decision,
    Escalation,
    Evidence,
    ImageRef,
    Mode,
    UploadEvent,
    UploadText,
    Verdict,
)
from stream_guard.policy.model import Policy, parse_policy

POLICY_YAML = """
policy_id: test_guard
version: "7"
thresholds: {allow: 0.4, block: 0.8}
safe_examples: ["a photo of my cat on the sofa", "our team won the match"]
categories:
  - code: S1
    name: Violent Crimes
    definition: Content that enables, encourages or threatens violent crimes such as murder.
    examples: ["I will kill you tomorrow", "how to build a pipe bomb", "beat him up later"]
  - code: S10
    name: Hate
    definition: Content that demeans or dehumanizes people because of protected characteristics.
    examples: ["exterminate all members of that religion"]
    thresholds: {allow: 0.3, block: 0.7}
  - code: S12
    name: Sexual Content
    definition: Explicit sexual content or nudity outside an educational or artistic context.
    examples: ["explicit nude photo"]
    image_signals: [FEMALE_BREAST_EXPOSED]
"""

DEFAULT_SCORES = {"S1": 0.62, "S10": 0.1, "S12": 0.35}  # S1 escalated, the rest allowed

EscalationFactory = Callable[..., Escalation]


@pytest.fixture(scope="session")
def policy() -> Policy:
    return parse_policy(POLICY_YAML)


def make_escalation(
    policy: Policy,
    *,
    text: UploadText | None = None,
    images: int = 1,
    scores: Mapping[str, float] = DEFAULT_SCORES,
    detections: list[dict[str, float]] | None = None,
    ocr: str = "",
    upload_id: str = "u-1",
) -> Escalation:
    upload = UploadEvent(
        upload_id=upload_id,
        tenant_id="acme",
        images=[ImageRef(uri=f"s3://uploads/{upload_id}/{i}.png") for i in range(images)],
        text=text if text is not None else UploadText(caption="see you at the river tonight"),
    )
    decision, categories = policy.decide(scores)
    version = policy.effective_version
    verdict = Verdict(
        verdict_id=Verdict.make_id(upload_id, version, Mode.FAST, False),
        upload_id=upload_id,
        tenant_id="acme",
        decision=decision,
        final=False,
        mode=Mode.FAST,
        flagged=[c.code for c in categories if c.decision != Decision.ALLOW],
        categories=categories,
        policy_id=policy.policy_id,
        policy_version=version,
        model_name="guard_head_test_guard",
        model_version="3",
    )
    if detections is None:
        detections = [{"FEMALE_BREAST_EXPOSED": 0.41}, {"FACE_MALE": 0.77}]
    top = sorted(categories, key=lambda c: c.score, reverse=True)[:5]
    return Escalation(
        upload=upload,
        fast_verdict=verdict,
        evidence=Evidence(image_detections=detections, ocr_text=ocr, top_categories=top),
    )


@pytest.fixture
def escalation_factory(policy: Policy) -> EscalationFactory:
    def factory(**kwargs: object) -> Escalation:
        return make_escalation(policy, **kwargs)  # type: ignore[arg-type]

    return factory
