"""Policy schema: the shipped policies, threshold decisions, validation messages, versions."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from stream_guard.errors import PolicyError
from stream_guard.events import Decision
from stream_guard.policy.model import (
    IMAGE_SIGNALS,
    Category,
    Policy,
    Thresholds,
    head_model_name,
    load_policy,
    parse_policy,
)

ALLOW, ESCALATE, BLOCK = Decision.ALLOW, Decision.ESCALATE, Decision.BLOCK
POLICY_DIR = Path(__file__).resolve().parents[2] / "stream_guard" / "policy" / "builtin"
SHIPPED = sorted(POLICY_DIR.glob("*.yaml"))
SEXUAL_SIGNALS = {
    "FEMALE_GENITALIA_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
    "FEMALE_BREAST_EXPOSED",
    "BUTTOCKS_EXPOSED",
    "ANUS_EXPOSED",
}

MINIMAL = """\
policy_id: tiny
version: "1"
categories:
  - code: a
    name: A
    definition: a definition of A
    examples: ["x"]
"""


def _policy(*codes: str, allow: float = 0.35, block: float = 0.8, **overrides) -> Policy:
    cats = [
        Category(
            code=c,
            name=c.upper(),
            definition=f"definition of {c}",
            examples=[f"{c} text"],
            thresholds=overrides.get(c),
        )
        for c in codes
    ]
    return Policy(
        policy_id="t", version="1", thresholds=Thresholds(allow=allow, block=block), categories=cats
    )


# -- the shipped policies ------------------------------------------------------------------


def test_both_documented_policies_are_shipped():
    assert {p.name for p in SHIPPED} >= {"llama_guard_4.yaml", "safevision_visionharm_t.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_policy_parses_and_its_id_matches_its_file_name(path):
    policy = load_policy(path)
    assert policy.policy_id == path.stem
    assert policy.digest and policy.effective_version.startswith(policy.version + "+")


def test_llama_guard_4_policy_has_the_fourteen_hazard_categories_in_order():
    policy = load_policy(POLICY_DIR / "llama_guard_4.yaml")
    assert policy.codes == [f"S{i}" for i in range(1, 15)]
    names = {c.code: c.name for c in policy.categories}
    assert names["S1"] == "Violent Crimes" and names["S10"] == "Hate"
    assert names["S11"] == "Suicide & Self-Harm" and names["S14"] == "Code Interpreter Abuse"
    assert (policy.thresholds.allow, policy.thresholds.block) == (0.35, 0.8)


def test_safevision_policy_has_the_nine_unsafe_visionharm_t_categories():
    policy = load_policy(POLICY_DIR / "safevision_visionharm_t.yaml")
    assert policy.codes == [
        "hate",
        "violence",
        "sexual",
        "crime",
        "weapons_substance_abuse",
        "self_harm",
        "animal_cruelty",
        "disasters_emergencies",
        "political",
    ]
    assert "safe" not in policy.codes  # "Safe" is the absence of flags: safe_examples


@pytest.mark.parametrize(
    "file, examples, negatives",
    [
        ("llama_guard_4.yaml", (12, 20), (8, 12)),
        ("safevision_visionharm_t.yaml", (10, 15), (8, 12)),
    ],
)
def test_shipped_policy_categories_have_enough_examples_and_hard_negatives(
    file, examples, negatives
):
    policy = load_policy(POLICY_DIR / file)
    assert len(policy.safe_examples) >= 30
    for cat in policy.categories:
        assert examples[0] <= len(cat.examples) <= examples[1], cat.code
        assert negatives[0] <= len(cat.negative_examples) <= negatives[1], cat.code


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_policy_never_uses_one_text_as_both_violating_and_benign(path):
    policy = load_policy(path)
    benign = set(policy.safe_examples)
    positives: dict[str, str] = {}
    for cat in policy.categories:
        benign |= set(cat.negative_examples)
        for text in cat.examples:
            assert text not in positives, f"{text!r} is in {positives.get(text)} and {cat.code}"
            positives[text] = cat.code
    assert not benign & set(positives)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_only_sexual_categories_use_exposed_body_signals_and_never_faces_or_feet(path):
    policy = load_policy(path)
    used = {s for c in policy.categories for s in c.image_signals}
    assert used, "the sexual-content category should use the detector"
    assert used <= SEXUAL_SIGNALS
    for cat in policy.categories:
        if cat.image_signals:
            assert "sex" in cat.name.lower(), cat.code


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_per_category_threshold_overrides_are_explained_in_a_comment(path):
    text = path.read_text()
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^\s{4}thresholds:", line):
            above = "\n".join(lines[max(0, i - 6) : i])
            assert "#" in above, f"{path.name}:{i + 1}: a threshold override needs a reason"


# -- threshold decisions -------------------------------------------------------------------


@pytest.mark.parametrize(
    "allow, block, score, expected",
    [
        (0.35, 0.8, 0.0, ALLOW),
        (0.35, 0.8, 0.3499, ALLOW),
        (0.35, 0.8, 0.35, ESCALATE),  # exactly allow: escalates
        (0.35, 0.8, 0.5, ESCALATE),
        (0.35, 0.8, 0.7999, ESCALATE),
        (0.35, 0.8, 0.8, BLOCK),  # exactly block: blocks
        (0.35, 0.8, 1.0, BLOCK),
        (0.5, 0.5, 0.4999, ALLOW),  # allow == block: no escalate band
        (0.5, 0.5, 0.5, BLOCK),
        (0.0, 1.0, 0.0, ESCALATE),  # the widest band escalates everything below 1
        (0.0, 1.0, 0.9999, ESCALATE),
        (0.0, 1.0, 1.0, BLOCK),
        (0.0, 0.0, 0.0, BLOCK),
        (1.0, 1.0, 0.9999, ALLOW),
    ],
)
def test_threshold_decision_at_and_around_the_edges(allow, block, score, expected):
    assert Thresholds(allow=allow, block=block).decide(score) is expected


@pytest.mark.parametrize(
    "scores, expected",
    [
        ({"a": 0.1, "b": 0.2, "c": 0.0}, ALLOW),
        ({"a": 0.1, "b": 0.5, "c": 0.0}, ESCALATE),
        ({"a": 0.9, "b": 0.5, "c": 0.0}, BLOCK),  # any block beats any escalate
        ({"a": 0.35, "b": 0.35, "c": 0.35}, ESCALATE),
        ({"a": 0.1, "b": 0.1, "c": 0.8}, BLOCK),
        ({"a": 0.8, "b": 0.8, "c": 0.8}, BLOCK),
    ],
)
def test_upload_decision_is_any_block_else_any_escalate_else_allow(scores, expected):
    overall, per_category = _policy("a", "b", "c").decide(scores)
    assert overall is expected
    assert [c.code for c in per_category] == ["a", "b", "c"]  # policy order, not score order


def test_category_threshold_override_replaces_the_policy_default():
    strict = Thresholds(allow=0.1, block=0.3)
    policy = _policy("a", "b", b=strict)
    overall, cats = policy.decide({"a": 0.3, "b": 0.3})
    assert [c.decision for c in cats] == [ALLOW, BLOCK]
    assert overall is BLOCK
    assert policy.thresholds_for(policy.categories[1]) is strict


@pytest.mark.parametrize(
    "raw, published",
    [
        (-0.5, 0.0),
        (-1e-9, 0.0),
        (1.7, 1.0),
        (0.123456, 0.1235),
        (0.99999, 1.0),
        (0.5, 0.5),
        (1, 1.0),
    ],
)
def test_scores_are_clamped_to_the_unit_interval_and_rounded_to_four_decimals(raw, published):
    _, (cat,) = _policy("a").decide({"a": raw})
    assert cat.score == published
    assert cat.name == "A"


def test_decision_is_made_on_the_published_rounded_score():
    # 0.34996 is published as 0.35, and 0.35 escalates: the score and decision never disagree.
    _, (cat,) = _policy("a").decide({"a": 0.34996})
    assert (cat.score, cat.decision) == (0.35, ESCALATE)


def test_policy_without_thresholds_uses_the_schema_default():
    policy = parse_policy(MINIMAL)
    assert (policy.thresholds.allow, policy.thresholds.block) == (0.4, 0.8)
    assert policy.decide({"a": 0.39})[0] is ALLOW and policy.decide({"a": 0.4})[0] is ESCALATE


# -- invalid policies ----------------------------------------------------------------------

SECOND_A = """\
  - code: a
    name: A again
    definition: another definition
    examples: ["y"]
"""


@pytest.mark.parametrize(
    "text, fragments",
    [
        (MINIMAL + SECOND_A, ["duplicate category codes", "'a'"]),
        (
            MINIMAL.replace('"1"\n', '"1"\nthresholds: {allow: 0.9, block: 0.5}\n'),
            ["thresholds", "allow (0.9) must not exceed block (0.5)"],
        ),
        (
            MINIMAL + "    thresholds: {allow: 0.6, block: 0.2}\n",
            ["categories.0.thresholds", "must not exceed"],
        ),
        (
            MINIMAL.replace('"1"\n', '"1"\nthresholds: {allow: 0.2, block: 1.5}\n'),
            ["thresholds.block", "less than or equal to 1"],
        ),
        (
            MINIMAL + "    image_signals: [GUN_VISIBLE]\n",
            ["categories.0.image_signals", "unknown image signals ['GUN_VISIBLE']"],
        ),
        (MINIMAL.replace('["x"]', '["x", "   "]'), ["categories.0.examples", "blank"]),
        (MINIMAL + '    negative_examples: [""]\n', ["categories.0.negative_examples", "blank"]),
        (MINIMAL + '    keywords: [" "]\n', ["categories.0.keywords", "blank"]),
        (MINIMAL.replace('["x"]', "[]"), ["categories.0.examples", "at least 1"]),
        ('policy_id: tiny\nversion: "1"\n', ["categories", "Field required"]),
        ('policy_id: tiny\nversion: "1"\ncategories: []\n', ["categories", "at least 1"]),
        (MINIMAL.replace("policy_id: tiny", "policy_id: Tiny-Policy"), ["policy_id", "pattern"]),
        (MINIMAL.replace("policy_id: tiny\n", ""), ["policy_id", "Field required"]),
        (MINIMAL.replace("code: a", "code: 1a"), ["categories.0.code", "pattern"]),
        (MINIMAL.replace('version: "1"', "version: 1.0"), ["version", "valid string"]),
        (MINIMAL + "    severity: high\n", ["categories.0.severity", "Extra inputs"]),
        ("policy_id: [tiny\n", ["not valid YAML"]),
        ("- just\n- a list\n", ["a policy is a YAML mapping"]),
        ("just a sentence\n", ["a policy is a YAML mapping"]),
        ("", ["a policy is a YAML mapping"]),
    ],
    ids=[
        "duplicate-codes",
        "allow-above-block",
        "category-allow-above-block",
        "threshold-above-1",
        "unknown-image-signal",
        "blank-example",
        "blank-negative",
        "blank-keyword",
        "no-examples",
        "missing-categories",
        "empty-categories",
        "bad-policy-id",
        "missing-policy-id",
        "bad-code",
        "unquoted-numeric-version",
        "unknown-field",
        "not-yaml",
        "yaml-list",
        "yaml-scalar",
        "empty-file",
    ],
)
def test_invalid_policy_is_rejected_with_a_message_naming_the_problem(text, fragments):
    with pytest.raises(PolicyError) as err:
        parse_policy(text, source="tenant.yaml")
    message = str(err.value)
    assert message.startswith("tenant.yaml: "), message  # says which file to fix
    for fragment in fragments:
        assert fragment in message, message


def test_unreadable_policy_file_is_a_policy_error_naming_the_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(PolicyError, match="cannot read policy file .*nope.yaml"):
        load_policy(missing)


# -- versions ------------------------------------------------------------------------------


def test_same_text_gives_the_same_digest_and_effective_version():
    a, b = parse_policy(MINIMAL), parse_policy(MINIMAL)
    assert a.digest == b.digest and a.effective_version == b.effective_version
    assert re.fullmatch(r"1\+[0-9a-f]{8}", a.effective_version)
    assert len(a.digest) == 64


@pytest.mark.parametrize(
    "edit",
    [
        lambda t: t.replace('["x"]', '["x", "another violating text"]'),
        lambda t: t.replace("a definition of A", "a sharper definition of A"),
        lambda t: t + "    thresholds: {allow: 0.3, block: 0.9}\n",
        lambda t: "# a comment\n" + t,
    ],
    ids=["example-added", "definition-changed", "threshold-override", "comment-only"],
)
def test_any_edit_changes_the_effective_version_even_without_a_version_bump(edit):
    before, after = parse_policy(MINIMAL), parse_policy(edit(MINIMAL))
    assert after.version == before.version
    assert after.digest != before.digest
    assert after.effective_version != before.effective_version


def test_version_bump_shows_in_the_effective_version():
    bumped = parse_policy(MINIMAL.replace('version: "1"', 'version: "2.0.0"'))
    assert bumped.effective_version.startswith("2.0.0+")


def test_digest_written_in_the_file_is_ignored_in_favour_of_the_content_digest():
    forged = parse_policy(MINIMAL + "digest: deadbeef\n")
    assert forged.digest != "deadbeef" and not forged.effective_version.endswith("+deadbeef")


def test_policy_built_in_code_without_a_digest_uses_the_bare_version():
    assert _policy("a").effective_version == "1"


def test_shipped_policy_round_trips_through_yaml_to_the_same_categories():
    path = POLICY_DIR / "llama_guard_4.yaml"
    original = load_policy(path)
    reparsed = parse_policy(yaml.safe_dump(yaml.safe_load(path.read_text())))
    assert reparsed.categories == original.categories
    assert reparsed.digest != original.digest  # different text, different digest


# -- misc ----------------------------------------------------------------------------------


def test_image_signals_are_the_detector_classes_without_duplicates():
    assert len(IMAGE_SIGNALS) == len(set(IMAGE_SIGNALS)) == 18


@pytest.mark.parametrize(
    "prefix, policy_id, name",
    [
        ("guard_head", "llama_guard_4", "guard_head_llama_guard_4"),
        ("guard_head", "safevision_visionharm_t", "guard_head_safevision_visionharm_t"),
    ],
)
def test_head_model_name_is_prefix_and_policy_id(prefix, policy_id, name):
    assert head_model_name(prefix, policy_id) == name
