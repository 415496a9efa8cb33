"""The quality comparison's logic: baselines, operating points and summaries, on toy data.

A bag-of-words hash stands in for the text tower, so these tests need no model weights.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from typer.testing import CliRunner

from stream_guard.policy.model import IMAGE_SIGNALS, parse_policy
from stream_guard.quality.compare import (
    SYSTEMS,
    LabelledTexts,
    NearestPrototype,
    TfidfLogReg,
    argmax_flags,
    best_f1_threshold,
    compare,
    differences,
    format_differences,
    format_markdown,
    paired_bootstrap,
    policy_corpus,
    summarise,
    tpr_at_fpr,
)
from stream_guard.quality.manifest import parse_manifest

POLICY = """
policy_id: toy
version: "1"
safe_examples: ["lovely sunny day at the beach", "my cat sleeps on the sofa"]
categories:
  - code: threat
    name: Threats
    definition: threats to hurt or kill a person
    examples: ["i will hurt you", "i will kill you tonight", "you are dead meat",
               "watch your back i will hurt you", "i will find you and kill you"]
    negative_examples: ["kill the lights please"]
  - code: drugs
    name: Drugs
    definition: selling illegal drugs for money
    examples: ["selling pills cheap", "buy cocaine here", "pills and powder for sale",
               "drugs delivered to your door"]
"""


def fake_embed(texts):
    out = np.zeros((len(texts), 64), np.float32)
    for i, text in enumerate(texts):
        for word in text.lower().split():
            out[i, zlib.crc32(word.encode()) % 64] += 1.0
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


@pytest.fixture
def policy():
    return parse_policy(POLICY)


@pytest.mark.parametrize(
    ("unsafe", "score", "expected"),
    [
        ([1, 1, 0, 0], [0.9, 0.8, 0.3, 0.2], 0.8),  # separable: the lowest positive
        ([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1], 0.7),  # F1 0.8 at 0.7 beats 0.667 at 0.9
        ([1, 1, 0], [0.5, 0.5, 0.5], 0.5),  # one distinct score
        ([0, 0], [0.2, 0.4], 0.4 + 1e-6),  # no positives: above every score
    ],
)
def test_best_f1_threshold_picks_the_best_binary_f1(unsafe, score, expected):
    assert best_f1_threshold(unsafe, score) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("unsafe", "score", "max_fpr", "expected"),
    [
        ([1, 1, 0, 0], [0.9, 0.8, 0.3, 0.2], 0.0, 1.0),
        ([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1], 0.0, 0.5),  # 0.7 would cost FPR 0.5
        ([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1], 0.5, 1.0),
        ([0, 1], [0.9, 0.1], 0.0, 0.0),  # every threshold catching the positive costs FPR 1
        ([1, 1], [0.9, 0.1], 0.1, None),  # one class only
    ],
)
def test_tpr_at_fpr_is_the_best_tpr_within_the_fpr_budget(unsafe, score, max_fpr, expected):
    assert tpr_at_fpr(unsafe, score, max_fpr) == expected


def test_argmax_flags_flag_at_most_the_top_category():
    flags = argmax_flags([[0.2, 0.7, 0.6], [0.1, 0.2, 0.3], [0.5, 0.5, 0.1]], 0.5)
    assert flags.tolist() == [[False, True, False], [False, False, False], [True, False, False]]


def test_policy_corpus_labels_examples_and_keeps_negatives_safe(policy):
    corpus = policy_corpus(policy)
    by_text = dict(zip(corpus.texts, corpus.labels.tolist(), strict=True))
    assert by_text["threats to hurt or kill a person"] == [True, False]
    assert by_text["buy cocaine here"] == [False, True]
    assert by_text["kill the lights please"] == [False, False]
    assert by_text["my cat sleeps on the sofa"] == [False, False]
    assert len(corpus) == len(set(corpus.texts)) == 2 + 6 + 1 + 5


def test_labelled_texts_leave_out_rows_without_text(policy):
    rows = parse_manifest(
        '{"text": "i will hurt you", "labels": ["threat"]}\n'
        '{"images": ["s3://b/k.png"], "labels": []}\n'
        '{"prompt": "where to buy", "response": "pills and powder", "labels": ["drugs"]}\n',
        format="jsonl",
    )
    data = LabelledTexts.from_rows(rows, policy.codes)
    assert data.texts == ["i will hurt you", "where to buy\npills and powder"]
    assert data.labels.tolist() == [[True, False], [False, True]]


def test_nearest_prototype_uses_the_definition_and_four_examples(policy):
    head = NearestPrototype.fit(policy, fake_embed)
    assert head.mask.sum(axis=1).tolist() == [5, 5]  # definition + 4, the 5th example unused
    scores = head.scores(fake_embed(["i will hurt you", "i will find you and kill you"]))
    assert scores[0, 0] == pytest.approx(1.0)  # a prototype itself
    assert scores[1, 0] < 1.0  # the fifth example is not a prototype
    # The threshold comes from leave-one-out similarities, so it is below a perfect match.
    assert 0.0 < head.threshold < 1.0
    flags = head.flags(scores)
    assert flags.sum(axis=1).max() <= 1


def test_tfidf_baseline_learns_words_and_skips_categories_without_positives():
    pytest.importorskip("sklearn")
    data = LabelledTexts(
        ["kill you now", "i will kill him", "nice cat", "lovely beach", "sunny day"],
        np.array([[1, 0], [1, 0], [0, 0], [0, 0], [0, 0]], dtype=bool),
    )
    model = TfidfLogReg.fit(data)
    scores = model.scores(["kill", "cat on the beach"])
    assert scores[0, 0] > 0.5 > scores[1, 0]
    assert model.models[1] is None and np.all(scores[:, 1] == 0.0)
    assert model.flags(scores).tolist() == [[True, False], [False, False]]


def test_summarise_counts_escalations_as_flagged():
    labels = np.array([[1, 0], [0, 1], [0, 0], [0, 0]], dtype=bool)
    scores = np.array([[0.9, 0.1], [0.2, 0.5], [0.4, 0.0], [0.1, 0.1]])
    decisions = np.array(
        [["block", "allow"], ["allow", "escalate"], ["escalate", "allow"], ["allow", "allow"]]
    )
    r = summarise("compiled", "toy", ["a", "b"], labels, scores, decisions)
    assert (r.n, r.binary_tpr, r.binary_fpr) == (4, 1.0, 0.5)
    assert r.binary_accuracy == 0.75 and r.binary_f1 == pytest.approx(0.8)
    assert r.auprc == {"a": 1.0, "b": 1.0}
    # unsafe vs safe by the highest score: 0.9, 0.5 positive above 0.4, 0.1
    assert r.binary_auprc == 1.0 and r.tpr_at_low_fpr == 1.0
    assert r.to_dict()["auprc"] == {"a": 1.0, "b": 1.0}


def test_compare_runs_every_system_on_every_set(policy):
    pytest.importorskip("sklearn")
    codes = policy.codes
    evalset = LabelledTexts(
        ["i will kill you", "pills for sale cheap", "sunny day at the park"],
        np.array([[1, 0], [0, 1], [0, 0]], dtype=bool),
    )
    train = LabelledTexts(
        ["you are dead", "cocaine for sale"], np.array([[1, 0], [0, 1]], dtype=bool)
    )
    results = compare(policy, fake_embed, {"toy": evalset}, train, n_signals=len(IMAGE_SIGNALS))
    assert [r.system for r in results] == list(SYSTEMS)
    assert all(r.n == 3 and set(r.auprc) == set(codes) for r in results)
    without = compare(policy, fake_embed, {"toy": evalset}, None, n_signals=len(IMAGE_SIGNALS))
    assert [r.system for r in without] == ["nearest-prototype", "tfidf-logreg", "compiled"]
    table = format_markdown(results, codes)
    assert table.count("| toy |") == 2 * len(SYSTEMS)
    assert "| set | system | threat | drugs |" in table


def test_eval_baselines_refuses_a_train_split_that_overlaps_the_sets(tmp_path):
    from stream_guard.cli.app import app

    row = '{"text": "i will hurt you", "labels": ["threat"]}\n'
    (tmp_path / "policy.yaml").write_text(POLICY)
    (tmp_path / "set.jsonl").write_text(row)
    (tmp_path / "train.jsonl").write_text(row)
    result = CliRunner().invoke(
        app,
        [
            "eval-baselines",
            str(tmp_path / "set.jsonl"),
            "--policy",
            str(tmp_path / "policy.yaml"),
            "--train",
            str(tmp_path / "train.jsonl"),
        ],
    )
    assert result.exit_code == 2
    assert "shares 1 texts with the evaluated sets" in result.stderr


def test_paired_bootstrap_resamples_the_same_rows_for_both_systems():
    rng = np.random.default_rng(3)
    labels = rng.random((60, 2)) < 0.3
    good = np.where(labels, 0.8, 0.2) + rng.normal(0, 0.05, labels.shape)
    noise = rng.random(labels.shape)
    decisions = np.zeros(labels.shape, dtype=bool)
    a = summarise("compiled", "toy", ["x", "y"], labels, good, decisions)
    b = summarise("tfidf-logreg", "toy", ["x", "y"], labels, noise, decisions)
    same = paired_bootstrap(a, a, "mean_auprc", rounds=50)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)
    better = paired_bootstrap(a, b, "mean_auprc", rounds=200)
    assert better.value > 0 and 0 < better.low <= better.value <= better.high
    diffs = differences([a, b], rounds=20)
    assert [(d.a, d.b) for d in diffs] == [("compiled", "tfidf-logreg")] * 3
    assert "| toy | compiled | tfidf-logreg | mean_auprc |" in format_differences(diffs)
