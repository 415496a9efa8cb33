"""Metrics per slice and the worst false positives / negatives of an eval, as tables."""

from __future__ import annotations

import numpy as np
import pytest

from stream_guard.quality.failures import (
    NO_SLICE,
    TEXT_CHARS,
    format_slices,
    format_worst,
    slice_summaries,
    worst_errors,
)
from stream_guard.quality.metrics import evaluate

CODES = ["S1", "S10"]
# id, slice, labels, scores, upload decision
ROWS = [
    ("a", "negated", [], [0.10, 0.05], "allow"),  # TN
    ("b", "negated", [], [0.20, 0.50], "escalate"),  # FP (escalated)
    ("c", "negated", ["S10"], [0.10, 0.90], "block"),  # TP
    ("d", "slurs", ["S10"], [0.05, 0.30], "allow"),  # FN, true-category score .30
    ("e", "slurs", ["S10"], [0.40, 0.10], "escalate"),  # TP (escalated, wrong category)
    ("f", "slurs", [], [0.95, 0.10], "block"),  # FP, the most confident
    ("g", None, ["S1"], [0.01, 0.02], "allow"),  # FN, true-category score .01: the worst
    ("h", None, [], [0.02, 0.01], "allow"),  # TN
]


def _decisions(verdict: str, scores: list[float]) -> list[str]:
    """Per-category decisions consistent with the upload decision (allow .35, block .8)."""
    return ["block" if s >= 0.8 else "escalate" if s >= 0.35 else "allow" for s in scores]


def _arrays():
    labels = np.array([[c in r[2] for c in CODES] for r in ROWS])
    scores = np.array([r[3] for r in ROWS])
    decisions = np.array([_decisions(r[4], r[3]) for r in ROWS])
    return labels, scores, decisions


def test_each_slice_is_reported_on_its_own_rows():
    labels, scores, decisions = _arrays()
    summaries = slice_summaries(CODES, [r[1] for r in ROWS], labels, scores, decisions)
    by_name = {s.name: s for s in summaries}
    assert [s.name for s in summaries] == ["negated", "slurs", NO_SLICE]
    # negated: a, b safe (b flagged), c unsafe and caught
    neg = by_name["negated"]
    assert (neg.n, neg.n_safe, neg.tpr, neg.fpr) == (3, 2, 1.0, 0.5)
    assert neg.accuracy == pytest.approx(2 / 3)
    # slurs: d missed, e caught, f safe but blocked
    slurs = by_name["slurs"]
    assert (slurs.n, slurs.n_safe, slurs.tpr, slurs.fpr) == (3, 1, 0.5, 1.0)
    assert slurs.any_unsafe_auprc == pytest.approx(average_of([0.30, 0.40], [0.95]))
    # each slice equals the full report computed on that slice alone
    mask = np.array([r[1] == "negated" for r in ROWS])
    full = evaluate(CODES, labels[mask], scores[mask], decisions[mask])
    assert neg.escalation_rate == full.escalation_rate and neg.mean_auprc == full.mean_auprc


def average_of(pos: list[float], neg: list[float]) -> float:
    from stream_guard.quality.metrics import average_precision

    return average_precision([True] * len(pos) + [False] * len(neg), pos + neg)


def test_no_slices_means_no_slice_table():
    labels, scores, decisions = _arrays()
    assert slice_summaries(CODES, [None] * len(ROWS), labels, scores, decisions) == []
    assert format_slices([]) == ""


@pytest.mark.parametrize(
    ("escalate_as", "fps", "fns"),
    [
        # escalations count as flagged: b (escalated) is a FP, e (escalated) is caught
        ("unsafe", ["f", "b"], ["g", "d"]),
        # only blocks count: b is not a FP, e is a miss (its true-category score .10)
        ("safe", ["f"], ["g", "e", "d"]),
    ],
)
def test_worst_errors_rank_the_most_confident_mistakes_first(escalate_as, fps, fns):
    labels, scores, _ = _arrays()
    worst = worst_errors(
        CODES,
        [r[0] for r in ROWS],
        [f"text of {r[0]}" for r in ROWS],
        [r[1] for r in ROWS],
        labels,
        scores,
        [r[4] for r in ROWS],
        escalate_as=escalate_as,
    )
    assert [r.id for r in worst["false_positives"]] == fps
    assert [r.id for r in worst["false_negatives"]] == fns
    f = worst["false_positives"][0]
    assert (f.score, f.labels, f.decision, f.slice) == (0.95, [], "block", "slurs")
    assert list(f.top) == ["S1", "S10"] and f.top["S1"] == 0.95
    g = worst["false_negatives"][0]
    assert (g.score, g.labels, g.slice, g.text) == (0.01, ["S1"], None, "text of g")


def test_worst_errors_keep_k_and_cut_long_texts():
    labels, scores, _ = _arrays()
    long_text = "word " * 200
    worst = worst_errors(
        CODES,
        [r[0] for r in ROWS],
        [long_text] * len(ROWS),
        [r[1] for r in ROWS],
        labels,
        scores,
        [r[4] for r in ROWS],
        k=1,
    )
    assert [len(v) for v in worst.values()] == [1, 1]
    assert len(worst["false_positives"][0].text) == TEXT_CHARS
    assert worst["false_positives"][0].text.endswith("…")


def test_a_perfect_guard_has_no_worst_errors():
    labels, scores, _ = _arrays()
    verdicts = ["block" if row.any() else "allow" for row in labels]
    worst = worst_errors(CODES, list("abcdefgh"), [""] * 8, [None] * 8, labels, scores, verdicts)
    assert worst == {"false_positives": [], "false_negatives": []}
    assert "false positives (safe, flagged; highest score first): none" in format_worst(worst)


def test_text_report_lists_slices_and_errors_with_their_scores():
    labels, scores, decisions = _arrays()
    slices = [r[1] for r in ROWS]
    table = format_slices(slice_summaries(CODES, slices, labels, scores, decisions))
    assert table.splitlines()[2].split()[:3] == ["negated", "3", "2"]
    worst = worst_errors(
        CODES, [r[0] for r in ROWS], ["hello"] * 8, slices, labels, scores, [r[4] for r in ROWS]
    )
    text = format_worst(worst)
    assert "0.950 block    f [slurs] truth=safe top: S1=0.95 S10=0.10" in text
    assert "0.010 allow    g truth=S1 top: S10=0.02 S1=0.01" in text
