"""Guard-quality metrics: hand-computed tables, and scikit-learn as the reference on random data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stream_guard.events import Decision
from stream_guard.policy.model import parse_policy
from stream_guard.quality.metrics import (
    EvalReport,
    average_precision,
    evaluate,
    format_report,
    policy_decisions,
    precision_recall_curve,
    primary_categories,
    roc_auc,
    write_plots,
)

CODES = ["hate", "sexual", "violence"]
# row: (true labels, flagged, scores)
ROWS = [
    ((), (), (0.1, 0.2, 0.1)),
    (("hate",), ("hate",), (0.9, 0.1, 0.2)),
    (("sexual",), ("violence",), (0.1, 0.3, 0.7)),
    (("hate", "violence"), ("hate", "violence"), (0.8, 0.1, 0.6)),
    ((), ("sexual",), (0.2, 0.6, 0.1)),
    (("violence",), (), (0.3, 0.2, 0.4)),
]


def _matrix(sets):
    return np.array([[c in s for c in CODES] for s in sets], dtype=bool)


LABELS = _matrix(r[0] for r in ROWS)
FLAGS = _matrix(r[1] for r in ROWS)
SCORES = np.array([r[2] for r in ROWS])


@pytest.fixture(scope="module")
def report() -> EvalReport:
    return evaluate(CODES, LABELS, SCORES, FLAGS)


@pytest.mark.parametrize(
    "metric, expected",
    [
        ("multiclass_accuracy", 3 / 6),
        ("top1_accuracy", 2 / 3),
        ("n_single_label", 3),
        ("n_safe", 2),
        ("macro_f1", (1 + 0 + 0.5) / 3),
        ("micro_f1", 6 / 10),
        ("mean_auprc", (1 + 0.5 + (0.5 * 0.5 + 0.5 * 2 / 3)) / 3),
        ("escalation_rate", None),
        ("decision_rates", None),
        ("escalate_as", None),
    ],
)
def test_report_metric_matches_hand_computation(report, metric, expected):
    value = getattr(report, metric)
    assert value == (pytest.approx(expected) if isinstance(expected, float) else expected)


@pytest.mark.parametrize(
    "metric, expected",
    [
        ("tp", 3),
        ("fp", 1),
        ("fn", 1),
        ("tn", 1),
        ("accuracy", 4 / 6),
        ("tpr", 3 / 4),
        ("recall", 3 / 4),
        ("fpr", 1 / 2),
        ("precision", 3 / 4),
        ("f1", 0.75),
    ],
)
def test_binary_metric_matches_hand_computation(report, metric, expected):
    assert getattr(report.binary, metric) == pytest.approx(expected)


@pytest.mark.parametrize(
    "code, counts, tpr, fpr, precision, f1, auprc, auc",
    [
        ("hate", (2, 0, 0, 4), 1.0, 0.0, 1.0, 1.0, 1.0, 1.0),
        ("sexual", (0, 1, 1, 4), 0.0, 0.2, 0.0, 0.0, 0.5, 0.8),
        ("violence", (1, 1, 1, 3), 0.5, 0.25, 0.5, 0.5, 0.25 + 1 / 3, 0.75),
    ],
)
def test_per_category_metrics_match_hand_computation(
    report, code, counts, tpr, fpr, precision, f1, auprc, auc
):
    c = report.category(code)
    assert (c.tp, c.fp, c.fn, c.tn) == counts
    assert c.support == counts[0] + counts[2]
    assert c.tpr == pytest.approx(tpr)
    assert c.fpr == pytest.approx(fpr)
    assert c.precision == pytest.approx(precision)
    assert c.f1 == pytest.approx(f1)
    assert c.auprc == pytest.approx(auprc)
    assert c.roc_auc == pytest.approx(auc)
    assert c.escalation_rate is None


def test_confusion_matrix_credits_any_true_label_and_counts_misses_as_safe(report):
    assert report.confusion_labels == ("safe", "hate", "sexual", "violence")
    assert report.confusion_matrix == (
        (1, 0, 1, 0),  # safe: one passed, one flagged as sexual
        (0, 2, 0, 0),  # hate (the hate+violence row predicted hate sits here)
        (0, 0, 0, 1),  # sexual predicted as violence
        (1, 0, 0, 0),  # violence missed
    )


def test_primary_prediction_is_the_highest_scoring_flagged_category():
    true, pred = primary_categories(
        [[True, True], [False, False]], [[True, True], [False, True]], [[0.6, 0.9], [0.2, 0.1]]
    )
    assert pred.tolist() == [2, 2]  # row 1: the flagged category wins even with a lower score
    assert true.tolist() == [2, 0]


@pytest.mark.parametrize(
    "escalate_as, binary_counts, fpr, flags_hate",
    [
        ("unsafe", (2, 1, 0, 1), 0.5, [False, True, True, True]),
        ("safe", (1, 0, 1, 2), 0.0, [False, False, True, False]),
    ],
)
def test_decisions_report_escalations_and_count_them_as_asked(
    escalate_as, binary_counts, fpr, flags_hate
):
    labels = np.array([[0, 0], [1, 0], [1, 1], [0, 0]], dtype=bool)
    scores = np.array([[0.1, 0.1], [0.5, 0.1], [0.9, 0.5], [0.5, 0.1]])
    decisions = [
        [Decision.ALLOW, Decision.ALLOW],
        [Decision.ESCALATE, Decision.ALLOW],
        [Decision.BLOCK, Decision.ESCALATE],
        [Decision.REVIEW, Decision.ALLOW],
    ]
    r = evaluate(["hate", "sexual"], labels, scores, decisions, escalate_as=escalate_as)
    b = r.binary
    assert (b.tp, b.fp, b.fn, b.tn) == binary_counts
    assert b.fpr == pytest.approx(fpr)
    assert r.escalation_rate == pytest.approx(0.5)  # rows 1 and 3; row 2 is blocked
    assert r.decision_rates == pytest.approx({"allow": 0.25, "escalate": 0.5, "block": 0.25})
    assert r.category("hate").escalation_rate == pytest.approx(0.5)
    assert r.category("sexual").escalation_rate == 0.0  # its escalation sits on a blocked row
    assert r.escalate_as == escalate_as
    hate = r.category("hate")
    assert hate.tp + hate.fp == sum(flags_hate)
    # plain strings are as good as Decision members
    as_str = evaluate(
        ["hate", "sexual"], labels, scores, np.array(decisions, dtype=str), escalate_as=escalate_as
    )
    assert as_str == r


def test_category_without_positives_reports_undefined_rates_as_none():
    r = evaluate(["a", "b"], [[1, 0], [0, 0]], [[0.9, 0.1], [0.2, 0.3]], [[1, 0], [0, 0]])
    b = r.category("b")
    assert (b.tpr, b.precision, b.f1, b.auprc, b.roc_auc) == (None, None, None, None, None)
    assert b.fpr == 0.0
    assert r.macro_f1 == 1.0  # b has no defined F1 and is left out of the mean
    assert r.mean_auprc == 1.0
    assert r.to_dict()["categories"]["b"]["tpr"] is None


def test_policy_decisions_apply_the_policys_thresholds_per_category():
    policy = parse_policy(POLICY_YAML)
    scores = np.array([[0.1, 0.1], [0.45, 0.95], [0.85, 0.75], [0.79995, 0.69]])
    got = policy_decisions(policy, ["hate", "sexual"], scores)
    assert got.tolist() == [
        ["allow", "allow"],
        ["escalate", "block"],
        ["block", "escalate"],
        ["block", "allow"],  # Policy.decide rounds 0.79995 to 0.8, its block threshold
    ]


POLICY_YAML = """
policy_id: test
version: "1"
thresholds: {allow: 0.4, block: 0.8}
categories:
  - code: hate
    name: Hate
    definition: Attacks on people for protected traits.
    examples: [an example of hate]
  - code: sexual
    name: Sexual
    definition: Sexually explicit content of any kind.
    examples: [an example of explicit text]
    thresholds: {allow: 0.7, block: 0.9}
"""


def test_ties_in_scores_give_one_curve_point_per_distinct_threshold():
    precision, recall, thresholds = precision_recall_curve([1, 0, 1, 0], [0.8, 0.8, 0.3, 0.1])
    assert thresholds.tolist() == [0.1, 0.3, 0.8]
    assert precision.tolist() == [0.5, 2 / 3, 0.5, 1.0]
    assert recall.tolist() == [1.0, 1.0, 0.5, 0.0]
    assert average_precision([1, 0, 1, 0], [0.8, 0.8, 0.3, 0.1]) == pytest.approx(
        0.5 * 0.5 + 0.5 * 2 / 3
    )
    assert roc_auc([1, 0, 1, 0], [0.8, 0.8, 0.3, 0.1]) == pytest.approx((1.5 + 1) / 4)


def test_report_json_has_stable_keys(report):
    data = json.loads(report.to_json())
    assert list(data) == [
        "schema_version",
        "n",
        "n_safe",
        "codes",
        "multiclass_accuracy",
        "top1_accuracy",
        "n_single_label",
        "binary",
        "macro_f1",
        "micro_f1",
        "mean_auprc",
        "escalation_rate",
        "decision_rates",
        "escalate_as",
        "categories",
        "confusion_matrix",
    ]
    assert list(data["categories"]) == CODES
    assert list(data["categories"]["hate"]) == [
        "support",
        "tpr",
        "fpr",
        "precision",
        "f1",
        "auprc",
        "roc_auc",
        "escalation_rate",
        "tp",
        "fp",
        "fn",
        "tn",
    ]
    assert data["confusion_matrix"]["rows_true_cols_predicted"][0] == [1, 0, 1, 0]
    assert data["binary"]["f1"] == 0.75


def test_text_report_names_every_category_and_the_headline_numbers(report):
    text = format_report(report)
    assert "multi-class accuracy 0.5000" in text
    assert "FPR 0.5000" in text
    for code in CODES:
        assert code in text
    assert "confusion matrix" in text


@pytest.mark.parametrize(
    "labels, scores, decisions, message",
    [
        ([[1, 0]], [[0.1, 0.2, 0.3]], [[1, 0]], "scores must have"),
        ([[1, 0]], [[0.1, float("nan")]], [[1, 0]], "finite"),
        ([[2, 0]], [[0.1, 0.2]], [[1, 0]], "labels must be boolean"),
        ([[1, 0]], [[0.1, 0.2]], [["block", "maybe"]], "unknown decisions"),
        ([[1, 0]], [[0.1, 0.2]], [[1, 0, 0]], "decisions must have"),
        (np.zeros((0, 2)), np.zeros((0, 2)), np.zeros((0, 2)), "labels must be"),
    ],
)
def test_bad_inputs_are_refused_with_a_reason(labels, scores, decisions, message):
    with pytest.raises(ValueError, match=message):
        evaluate(["a", "b"], labels, scores, decisions)


def test_plots_are_written_as_valid_pngs(tmp_path, report):
    from PIL import Image

    paths = write_plots(report, SCORES, LABELS, tmp_path / "plots", thresholds={"hate": (0.4, 0.8)})
    assert set(paths) == {"pr_curves", "score_histograms"}
    for path in paths.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            assert img.format == "PNG"
            assert img.size[0] > 100 and img.size[1] > 100


def _random_case(seed: int, n: int = 400, n_cat: int = 4):
    rng = np.random.default_rng(seed)
    labels = rng.random((n, n_cat)) < 0.2
    labels[:n_cat, :] = np.eye(n_cat, dtype=bool)  # every category has a positive
    # rounding makes ties, the case where hand-written AP most often goes wrong
    scores = np.round(np.clip(labels * 0.35 + rng.random((n, n_cat)) * 0.7, 0, 1), 2)
    flags = scores >= 0.55
    return [f"c{j}" for j in range(n_cat)], labels, scores, flags


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_agree_with_scikit_learn_on_random_data(seed):
    metrics = pytest.importorskip("sklearn.metrics")
    codes, labels, scores, flags = _random_case(seed)
    r = evaluate(codes, labels, scores, flags)

    for j, c in enumerate(r.categories):
        y, s, f = labels[:, j], scores[:, j], flags[:, j]
        assert c.auprc == pytest.approx(metrics.average_precision_score(y, s), abs=1e-12)
        assert c.roc_auc == pytest.approx(metrics.roc_auc_score(y, s), abs=1e-12)
        assert c.f1 == pytest.approx(metrics.f1_score(y, f), abs=1e-12)
        assert c.precision == pytest.approx(metrics.precision_score(y, f), abs=1e-12)
        assert c.tpr == pytest.approx(metrics.recall_score(y, f), abs=1e-12)
        tn, fp, fn, tp = metrics.confusion_matrix(y, f, labels=[False, True]).ravel()
        assert (c.tp, c.fp, c.fn, c.tn) == (tp, fp, fn, tn)
        p, rec, t = precision_recall_curve(y, s)
        sp, srec, st = metrics.precision_recall_curve(y, s)
        np.testing.assert_allclose(p, sp)
        np.testing.assert_allclose(rec, srec)
        np.testing.assert_allclose(t, st)

    assert r.macro_f1 == pytest.approx(metrics.f1_score(labels, flags, average="macro"))
    assert r.micro_f1 == pytest.approx(metrics.f1_score(labels, flags, average="micro"))
    assert r.multiclass_accuracy == pytest.approx(metrics.accuracy_score(labels, flags))
    y_any, p_any = labels.any(axis=1), flags.any(axis=1)
    assert r.binary.accuracy == pytest.approx(metrics.accuracy_score(y_any, p_any))
    assert r.binary.f1 == pytest.approx(metrics.f1_score(y_any, p_any))

    true, pred = primary_categories(labels, flags, scores)
    expected = metrics.confusion_matrix(true, pred, labels=list(range(len(codes) + 1)))
    assert np.array_equal(np.array(r.confusion_matrix), expected)
    assert sum(map(sum, r.confusion_matrix)) == len(labels)
