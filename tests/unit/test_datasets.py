"""Public labelled datasets a policy names: read in place, split once, trained on, never the
held-out rows, never silently missing (docs/quality.md)."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest

from stream_guard.errors import PolicyError
from stream_guard.policy import compiler
from stream_guard.policy.compiler import compile_head, head_texts
from stream_guard.policy.datasets import DATASETS_ENV, dataset_rows
from stream_guard.policy.model import load_policy, parse_policy
from stream_guard.policy.training import MlpConfig
from stream_guard.settings import DEFAULT_POLICY

POLICY = """\
policy_id: toy
version: "1"
thresholds: {allow: 0.35, block: 0.8}
safe_examples: ["a quiet walk in the park"]
datasets:
  - name: davidson
    path: %s
    labels: {hate_speech: [A], neither: []}
categories:
  - code: A
    name: Alpha
    definition: texts about alpha things
    examples: ["alpha one", "alpha two"]
"""


def _write_csv(path: Path, n: int = 300) -> list[tuple[str, str]]:
    """A file in Davidson's layout with invented rows (class 0 hate, 1 offensive, 2 neither)."""
    rows = [
        (str(i % 3), f"invented post number {i} about {'alpha' if i % 3 == 0 else 'gamma'}")
        for i in range(n)
    ]
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["", "count", "hate_speech", "offensive_language", "neither", "class", "tweet"])
        for i, (cls, text) in enumerate(rows):
            w.writerow([i, 3, 0, 0, 3, cls, text])
    return rows


def _embed(width: int = 16):
    def embed(texts):
        out = []
        for t in texts:
            rng = np.random.default_rng(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16))
            v = rng.normal(size=width)
            out.append(v / np.linalg.norm(v))
        return np.array(out, np.float32)

    return embed


def test_mapped_classes_are_read_with_a_fixed_split_and_the_rest_left_out(tmp_path):
    _write_csv(tmp_path / "d.csv")
    policy = parse_policy(POLICY % "d.csv", base=tmp_path)
    (ref,) = policy.datasets
    assert ref.available and Path(ref.path) == tmp_path / "d.csv"
    rows = dataset_rows("davidson", Path(ref.path), ref.labels)
    assert len(rows) == 200  # the 100 "offensive" rows are mapped to nothing: unused
    assert {r.labels for r in rows} == {frozenset({"A"}), frozenset()}
    assert {r.split for r in rows} == {"train", "calib", "heldout"}
    again = dataset_rows("davidson", Path(ref.path), ref.labels)
    assert [(r.id, r.split) for r in rows] == [(r.id, r.split) for r in again]


def test_a_missing_dataset_changes_the_version_and_the_compiler_says_so(tmp_path, caplog):
    _write_csv(tmp_path / "d.csv")
    with_data = parse_policy(POLICY % "d.csv", base=tmp_path)
    without = parse_policy(POLICY % "absent.csv", base=tmp_path)
    assert not without.datasets[0].available
    assert with_data.effective_version != without.effective_version
    compile_head(without, _embed())
    assert "dataset davidson is not on this machine" in caplog.text


def test_one_compile_reads_each_dataset_once_and_says_a_missing_one_once(
    tmp_path, caplog, monkeypatch
):
    path = tmp_path / "d.csv"
    _write_csv(path)
    policy = parse_policy(POLICY % "d.csv", base=tmp_path)
    reads = []
    real = compiler.dataset_rows
    monkeypatch.setattr(compiler, "dataset_rows", lambda *a: reads.append(a) or real(*a))
    compiler._trained_rows.cache_clear()
    texts = head_texts(policy)  # what heads.py does: list the texts, embed, then compile
    compile_head(policy, _embed())
    assert len(reads) == 1
    assert any(t.startswith("invented post") for t in texts)  # listed without a second read

    _write_csv(path, n=330)  # a changed file is read again (its digest, not its stamp)
    compile_head(parse_policy(POLICY % "d.csv", base=tmp_path), _embed())
    assert len(reads) == 2

    without = parse_policy(POLICY % "absent.csv", base=tmp_path)
    caplog.clear()
    head_texts(without)
    compile_head(without, _embed())
    assert caplog.text.count("dataset davidson is not on this machine") == 1


def test_the_environment_variable_is_the_only_place_looked_at(tmp_path, monkeypatch):
    (tmp_path / "davidson").mkdir()
    _write_csv(tmp_path / "davidson" / "labeled_data.csv")
    text = POLICY.replace("    path: %s\n", "")
    monkeypatch.setenv(DATASETS_ENV, str(tmp_path))
    assert parse_policy(text).datasets[0].available
    monkeypatch.setenv(DATASETS_ENV, str(tmp_path / "empty"))
    assert not parse_policy(text).datasets[0].available


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("name: davidson", "name: nosuch"), "unknown dataset 'nosuch'"),
        (("neither: []", "sarcasm: []"), r"unknown classes \['sarcasm'\]"),
        (("hate_speech: [A]", "hate_speech: [Z9]"), r"unknown category codes \['Z9'\]"),
    ],
)
def test_a_bad_dataset_entry_is_refused_naming_what_to_fix(tmp_path, edit, message):
    with pytest.raises(PolicyError, match=message):
        parse_policy((POLICY % "d.csv").replace(*edit), base=tmp_path)


def test_train_rows_reach_the_mlp_but_not_the_bank_and_held_out_rows_reach_nothing(
    tmp_path, monkeypatch
):
    _write_csv(tmp_path / "d.csv")
    policy = parse_policy(POLICY % "d.csv", base=tmp_path)
    rows = dataset_rows("davidson", tmp_path / "d.csv", policy.datasets[0].labels)
    held = {r.text for r in rows if r.split == "heldout"}
    trained = {r.text for r in rows if r.split != "heldout"}
    seen: list[str] = []
    real = _embed()

    def embed(texts):
        seen.extend(texts)
        return real(texts)

    monkeypatch.setattr(compiler, "MLP", MlpConfig(hidden=4, epochs=2))
    banks: list[int] = []
    real_params = compiler.HeadParams

    def capture(bank, *args):
        banks.append(len(bank.vectors))
        return real_params(bank, *args)

    monkeypatch.setattr(compiler, "HeadParams", capture)
    head = compile_head(policy, embed)
    assert trained <= set(seen) and not held & set(seen)
    assert trained <= set(head_texts(policy)) and not held & set(head_texts(policy))
    without = compile_head(policy, embed, use_datasets=False)
    # The served bank (kNN neighbours, prototypes) is the policy's own rows either way.
    assert banks[0] == banks[1]
    # The invented "hate" rows train A; without them A has only its examples (words only).
    assert head.calibration["A"].method == "trained"
    assert without.calibration["A"].method == "words"


def test_the_default_policy_names_the_shared_tweets():
    policy = load_policy(DEFAULT_POLICY)
    (ref,) = policy.datasets
    assert ref.name == "davidson" and ref.labels == {"hate_speech": ["S10"], "neither": []}
