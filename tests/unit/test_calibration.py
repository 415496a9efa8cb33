"""Threshold calibration: exact small cases, constraints on synthetic sets, policy write-back."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from stream_guard.errors import PolicyError
from stream_guard.policy.model import parse_policy
from stream_guard.quality.calibration import apply_to_policy_yaml, calibrate, format_calibration

SCORES_1 = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05]
LABELS_1 = [1, 1, 0, 1, 0, 1, 0, 0, 0, 0]


def _one(max_escalation_rate, target_precision=0.75):
    return calibrate(
        ["x"],
        np.array(LABELS_1, dtype=bool)[:, None],
        np.array(SCORES_1)[:, None],
        target_precision=target_precision,
        max_escalation_rate=max_escalation_rate,
    )


@pytest.mark.parametrize(
    "max_rate, allow, escalation, recall_at_allow",
    [
        (0.0, 0.6, 0.0, 0.75),  # no budget: nothing escalates, allow = block
        (0.1, 0.6, 0.0, 0.75),  # the next positive (0.4) needs two escalations: 0.5 and 0.4
        (0.2, 0.4, 0.2, 1.0),
        (1.0, 0.4, 0.2, 1.0),  # never lower than the lowest positive: more would gain nothing
    ],
)
def test_single_category_thresholds_match_hand_computation(
    max_rate, allow, escalation, recall_at_allow
):
    r = _one(max_rate)
    c = r.category("x")
    # precision at 0.9, 0.8, 0.7, 0.6 = 1, 1, 2/3, 3/4: 0.6 is the lowest reaching 0.75
    assert c.block == 0.6 and c.block_reachable and c.note == ""
    assert c.precision_at_block == pytest.approx(0.75)
    assert c.recall_at_block == pytest.approx(0.75)
    assert c.allow == allow
    assert r.escalation_rate == pytest.approx(escalation)
    assert c.recall_at_allow == pytest.approx(recall_at_allow)
    assert r.block_rate == pytest.approx(0.4)


def test_block_moves_up_from_a_negative_to_the_lowest_positive_above_it():
    # at 0.5 precision is 3/4 (reaches 0.7) but 0.5 is a negative: 0.6 has the same recall
    r = calibrate(
        ["x"],
        np.array([1, 1, 1, 0, 0, 0], dtype=bool)[:, None],
        np.array([0.9, 0.8, 0.6, 0.5, 0.3, 0.2])[:, None],
        target_precision=0.7,
    )
    assert r.category("x").block == 0.6
    assert r.category("x").precision_at_block == 1.0


def test_tradeoff_table_reports_precision_recall_and_escalation_per_threshold():
    c = _one(0.2).category("x")
    rows = {r.threshold: r for r in c.tradeoff}
    assert {0.05, 0.4, 0.5, 0.6, 0.95} <= set(rows)
    assert list(rows) == sorted(rows)
    assert (rows[0.5].precision, rows[0.5].recall) == (pytest.approx(0.6), 0.75)
    assert rows[0.5].escalation_rate == pytest.approx(0.1)  # only 0.5 in [0.5, 0.6)
    assert rows[0.4].escalation_rate == pytest.approx(0.2)
    assert rows[0.95].precision is None and rows[0.95].recall == 0.0
    assert rows[0.95].escalation_rate == 0.0  # above block: nothing escalates


def test_greedy_spends_the_escalation_budget_where_a_positive_costs_least():
    n = 10
    labels = np.zeros((n, 2), dtype=bool)
    scores = np.zeros((n, 2))
    # p: catching its second positive (0.5) escalates three uploads (0.7, 0.6, 0.5)
    labels[[0, 3], 0] = True
    scores[[0, 1, 2, 3], 0] = [0.9, 0.7, 0.6, 0.5]
    # q: catching its second positive escalates two (0.7, 0.5)
    labels[[4, 6], 1] = True
    scores[[4, 5, 6], 1] = [0.9, 0.7, 0.5]
    r = calibrate(["p", "q"], labels, scores, target_precision=0.9, max_escalation_rate=0.3)
    # p alone would fit the budget of three, but q buys a positive for fewer escalations
    assert r.thresholds() == {"p": (0.9, 0.9), "q": (0.5, 0.9)}
    assert r.escalation_rate == pytest.approx(0.2)


def _synthetic(seed: int, n: int = 600):
    rng = np.random.default_rng(seed)
    labels = np.zeros((n, 3), dtype=bool)
    labels[:, 0] = rng.random(n) < 0.1
    labels[:, 1] = rng.random(n) < 0.15
    labels[:, 2] = rng.random(n) < 0.1
    scores = np.empty((n, 3))
    # a: separable; b: overlapping; c: uninformative
    scores[:, 0] = np.where(labels[:, 0], rng.uniform(0.7, 1.0, n), rng.uniform(0.0, 0.5, n))
    scores[:, 1] = np.where(labels[:, 1], rng.uniform(0.35, 0.95, n), rng.uniform(0.0, 0.6, n))
    scores[:, 2] = rng.random(n)
    return ["a", "b", "c"], labels, scores


def _decide(scores, thresholds, codes):
    """Policy.decide on the whole set, through a real Policy."""
    text = apply_to_policy_yaml(_policy_yaml(codes), thresholds)
    policy = parse_policy(text)
    out = []
    for row in scores:
        overall, _ = policy.decide(dict(zip(codes, row.tolist(), strict=True)))
        out.append(str(overall))
    return np.array(out)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("max_rate", [0.02, 0.05, 0.15])
def test_calibration_meets_its_constraints_on_a_synthetic_set(seed, max_rate):
    codes, labels, scores = _synthetic(seed)
    r = calibrate(codes, labels, scores, target_precision=0.9, max_escalation_rate=max_rate)
    s = np.round(scores, 4)

    a = r.category("a")
    assert a.block_reachable and a.precision_at_block == 1.0 and a.recall_at_block == 1.0
    assert a.block == s[labels[:, 0], 0].min()
    assert a.allow == a.block  # separable: escalating would catch nothing more

    for c in r.categories:
        assert 0.0 <= c.allow <= c.block <= 1.0
        if c.block_reachable:
            assert c.precision_at_block >= 0.9
        assert c.recall_at_allow >= c.recall_at_block
    assert r.escalation_rate <= max_rate
    assert r.unreachable == ["c"]
    assert r.category("c").block == 1.0

    # the numbers hold once the thresholds are in a policy and Policy.decide applies them
    decided = _decide(scores, r, codes)
    assert np.mean(decided == "escalate") == pytest.approx(r.escalation_rate)
    assert np.mean(decided == "block") == pytest.approx(r.block_rate)

    # greedy is maximal: lowering any allow to its next positive would break the budget
    allow = np.array([c.allow for c in r.categories])
    block = np.array([c.block for c in r.categories])
    blocked = (s >= block).any(axis=1)
    for j in range(len(codes)):
        below = s[labels[:, j] & (s[:, j] < allow[j]), j]
        if below.size:
            trial = allow.copy()
            trial[j] = below.max()
            band = (s >= trial) & (s < block)
            assert np.mean(~blocked & band.any(axis=1)) > max_rate


def test_unreachable_precision_falls_back_and_is_reported():
    codes, labels, scores = _synthetic(3)
    labels[:, 2] = False  # no positives at all for c
    r = calibrate(codes, labels, scores, target_precision=1.0, fallback_block=0.99)
    assert "c" in r.unreachable
    c = r.category("c")
    assert c.block == 0.99 and c.allow == 0.99 and "no positives" in c.note
    b = r.category("b")
    assert b.block_reachable and b.precision_at_block == 1.0  # b's top scores are positives
    assert r.to_dict()["unreachable"] == r.unreachable
    assert "no positives: block unreachable" in format_calibration(r)


def test_uninformative_scores_cannot_reach_a_high_precision():
    rng = np.random.default_rng(7)
    labels = rng.random((300, 1)) < 0.3
    r = calibrate(["x"], labels, rng.random((300, 1)), target_precision=0.99)
    c = r.category("x")
    assert not c.block_reachable and c.block == 1.0
    assert "precision 0.99 unreachable" in c.note


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target_precision": 0.0}, "target_precision"),
        ({"max_escalation_rate": 1.5}, "max_escalation_rate"),
        ({"fallback_block": 2.0}, "fallback_block"),
    ],
)
def test_bad_parameters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        calibrate(["x"], [[True]], [[0.5]], **kwargs)


def _policy_yaml(codes, extra=""):
    cats = "".join(
        f"""
  - code: {code}
    name: Category {code}
    definition: Content of kind {code}, defined at length.
    examples: [an example of {code}]{extra}
"""
        for code in codes
    )
    return f"""# the team's policy; this comment is lost on write-back
policy_id: calibrated
version: "3"
description: kept as is
thresholds: {{allow: 0.4, block: 0.8}}
categories:{cats}"""


def test_thresholds_are_written_into_the_policy_and_the_rest_is_kept():
    codes, labels, scores = _synthetic(0)
    r = calibrate(codes, labels, scores)
    original = _policy_yaml(codes, extra="\n    thresholds: {allow: 0.3, block: 0.7}")
    text = apply_to_policy_yaml(original, r)
    policy = parse_policy(text)
    for cat in policy.categories:
        allow, block = r.thresholds()[cat.code]
        assert (cat.thresholds.allow, cat.thresholds.block) == (allow, block)
    before, after = yaml.safe_load(original), yaml.safe_load(text)
    assert list(after) == list(before)
    assert after["description"] == "kept as is" and after["version"] == "3"
    assert after["thresholds"] == {"allow": 0.4, "block": 0.8}
    for b, a in zip(before["categories"], after["categories"], strict=True):
        assert {k: v for k, v in a.items() if k != "thresholds"} == {
            k: v for k, v in b.items() if k != "thresholds"
        }

    kept = parse_policy(apply_to_policy_yaml(original, r, skip_unreachable=True))
    c = next(cat for cat in kept.categories if cat.code == "c")
    assert (c.thresholds.allow, c.thresholds.block) == (0.3, 0.7)


def test_calibrated_categories_missing_from_the_policy_are_an_error():
    codes, labels, scores = _synthetic(0)
    r = calibrate(codes, labels, scores)
    with pytest.raises(PolicyError, match=r"\['c'\] are not in the policy"):
        apply_to_policy_yaml(_policy_yaml(["a", "b"]), r)
    with pytest.raises(PolicyError, match="categories"):
        apply_to_policy_yaml("just: a mapping", r)


def test_calibration_report_round_trips_to_json():
    import json

    codes, labels, scores = _synthetic(1)
    r = calibrate(codes, labels, scores)
    data = json.loads(r.to_json())
    assert list(data["categories"]) == codes
    assert data["categories"]["a"]["tradeoff"][0] == {
        "threshold": 0.05,
        "precision": pytest.approx(data["categories"]["a"]["tradeoff"][0]["precision"]),
        "recall": 1.0,
        "escalation_rate": pytest.approx(data["categories"]["a"]["tradeoff"][0]["escalation_rate"]),
    }
    text = format_calibration(r)
    assert "<- block" in text and all(code in text for code in codes)
