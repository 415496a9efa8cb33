"""Promotion and shadow scoring, pure parts: the promotion rule, the file swap, sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stream_guard.errors import ConfigError, PolicyError
from stream_guard.events import Verdict
from stream_guard.pipeline.shadow import compare, sampled
from stream_guard.policy.model import load_policy, parse_policy
from stream_guard.quality.metrics import evaluate
from stream_guard.review.promotion import judge, replace_policy_file

CODES = ["S1", "S2"]
# four reviewed uploads: unsafe (S1), unsafe (S2), safe, safe
LABELS = np.array([[1, 0], [0, 1], [0, 0], [0, 0]], dtype=bool)


def report(decisions: list[list[str]]):
    scores = np.array([[0.9 if d == "block" else 0.1 for d in row] for row in decisions])
    return evaluate(CODES, LABELS, scores, np.array(decisions))


LIVE = report(
    [["escalate", "allow"], ["allow", "escalate"], ["escalate", "allow"], ["escalate", "allow"]]
)


@pytest.mark.parametrize(
    "candidate, gain, drop, beats",
    [
        # right on all four: beats the live policy, which sent two safe uploads to people
        (
            [["block", "allow"], ["allow", "block"], ["allow", "allow"], ["allow", "allow"]],
            0,
            0,
            True,
        ),
        # as accurate as live is not enough
        (
            [
                ["escalate", "allow"],
                ["allow", "escalate"],
                ["escalate", "allow"],
                ["escalate", "allow"],
            ],
            0,
            0,
            False,
        ),
        # more accurate, but misses an unsafe upload the live policy caught
        (
            [["block", "allow"], ["allow", "allow"], ["allow", "allow"], ["allow", "allow"]],
            0,
            0,
            False,
        ),
        # ... unless the owner accepts that recall drop
        (
            [["block", "allow"], ["allow", "allow"], ["allow", "allow"], ["allow", "allow"]],
            0,
            0.5,
            True,
        ),
        # a required gain the candidate does not reach
        (
            [["block", "allow"], ["allow", "block"], ["allow", "allow"], ["escalate", "allow"]],
            0.3,
            0,
            False,
        ),
    ],
)
def test_a_candidate_is_promoted_only_when_it_beats_the_live_policy(candidate, gain, drop, beats):
    verdict = judge(LIVE, report(candidate), min_gain=gain, max_recall_drop=drop)
    assert verdict.beats is beats
    assert bool(verdict.reasons) is not beats


POLICY = """policy_id: p
version: '{version}'
categories:
  - code: S1
    name: Violent crimes
    definition: Threats or acts of violence against people.
    examples: [a threat against a neighbour]
"""


def test_promotion_replaces_the_live_file_atomically_with_the_candidate_version(tmp_path: Path):
    live = tmp_path / "live" / "policy.yaml"
    live.parent.mkdir()
    live.write_text(POLICY.format(version="1.0.0"))
    live.chmod(0o640)
    text = POLICY.format(version="1.1.0")
    candidate = parse_policy(text)
    now = replace_policy_file(text, candidate, live)
    assert now.effective_version == candidate.effective_version
    assert load_policy(live).version == "1.1.0"
    assert live.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in live.parent.iterdir()] == ["policy.yaml"], "no temporary file left"


def test_promotion_refuses_a_relative_pack_that_would_resolve_elsewhere(tmp_path: Path):
    (tmp_path / "cand" / "pack").mkdir(parents=True)
    (tmp_path / "cand" / "pack" / "train.jsonl").write_text("")
    live = tmp_path / "policy.yaml"
    live.write_text(POLICY.format(version="1.0.0"))
    text = POLICY.format(version="1.1.0") + "pack: pack\n"
    candidate = parse_policy(text, base=tmp_path / "cand")
    with pytest.raises((ConfigError, PolicyError), match="pack"):
        replace_policy_file(text, candidate, live)
    assert load_policy(live).version == "1.0.0", "the live file is untouched"


def verdict(decisions: dict[str, str], decision: str) -> Verdict:
    return Verdict.issue(
        upload_id="u1",
        tenant_id="t",
        decision=decision,
        final=decision != "escalate",
        mode="fast",
        flagged=[c for c, d in decisions.items() if d != "allow"],
        categories=[
            {"code": c, "name": c, "score": 0.5, "decision": d} for c, d in decisions.items()
        ],
        policy_id="p",
        policy_version="1",
        model_name="m",
        model_version="1",
    )


def test_shadow_comparison_reports_agreement_and_each_sides_flags():
    live = verdict({"S1": "escalate", "S2": "allow"}, "escalate")
    shadow = verdict({"S1": "block", "S2": "allow"}, "block")
    agree, flags = compare(live, shadow)
    assert agree is False and flags == [("live", "S1"), ("shadow", "S1")]
    assert compare(live, live)[0] is True


def test_shadow_sample_is_stable_per_upload_and_near_its_rate():
    ids = [f"upload-{n}" for n in range(4000)]
    chosen = [i for i in ids if sampled(i, 0.25)]
    assert 0.2 < len(chosen) / len(ids) < 0.3
    assert chosen == [i for i in ids if sampled(i, 0.25)]
    assert all(sampled(i, 1.0) for i in ids[:10]) and not any(sampled(i, 0.0) for i in ids[:10])
