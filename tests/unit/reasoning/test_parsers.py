from __future__ import annotations

import json
import math

import pytest

from stream_guard.errors import ReasoningError
from stream_guard.events import Decision
from stream_guard.policy.model import Policy
from stream_guard.reasoning.parsers import (
    MAX_RATIONALE_CHARS,
    ReasoningResult,
    json_schema_for,
    parse_answer,
    parse_json_answer,
    parse_llama_guard_4,
    unsafe_probability,
)
from stream_guard.reasoning.prompts import PromptLimits, answer_spec

ALLOW, BLOCK, REVIEW = Decision.ALLOW, Decision.BLOCK, Decision.REVIEW

# -- Llama Guard 4 -------------------------------------------------------------------------

LLAMA_GUARD_CASES = [
    ("safe", ALLOW, []),
    ("\n\n  safe\n", ALLOW, []),
    ("Safe.", ALLOW, []),
    ("safe\nS1", ALLOW, []),  # codes after "safe" are noise, not a decision
    ("unsafe\nS1", BLOCK, ["S1"]),
    ("unsafe\nS1,S10", BLOCK, ["S1", "S10"]),
    ("\n unsafe\ns10, s1", BLOCK, ["S10", "S1"]),  # order of mention kept, case ignored
    ("unsafe S12", BLOCK, ["S12"]),
    ("unsafe\nS1: Violent Crimes", BLOCK, ["S1"]),
    ("unsafe\nS1 S10", BLOCK, ["S1", "S10"]),
    ("unsafe\nViolent Crimes, Hate", BLOCK, ["S1", "S10"]),
    ("**unsafe**\nS1", BLOCK, ["S1"]),
    ("unsafe\n" + ",".join(["S1"] * 300) + ",S", BLOCK, ["S1"]),  # SmolLM repetition, cut off
    ("unsafe\n" + ",".join(["S1", "S10"] * 150), BLOCK, ["S1", "S10"]),
    ("unsafe\nS1,S99,S7", BLOCK, ["S1"]),  # codes of another taxonomy are dropped
    ("unsafe\nS99", REVIEW, []),
    ("unsafe", REVIEW, []),
    ("unsafe\n\n", REVIEW, []),
]


@pytest.mark.parametrize(("answer", "decision", "codes"), LLAMA_GUARD_CASES)
def test_llama_guard_parser_reads_published_and_sloppy_answers(
    answer: str, decision: Decision, codes: list[str], policy: Policy
) -> None:
    result = parse_llama_guard_4(answer, policy)
    assert (result.decision, result.categories) == (decision, codes)
    assert len(result.raw) <= 4000 and len(result.rationale) <= MAX_RATIONALE_CHARS


@pytest.mark.parametrize(
    "answer",
    [
        "",
        "   \n",
        "I cannot help with that.",
        "The content is unsafe\nS1",
        "safety first",
        "unsafety",
        "S1\nunsafe",
        "S1 Violent Crimes 0.62 (allow below 0.40)",  # SmolLM continuing the prompt
    ],
)
def test_llama_guard_parser_rejects_answers_without_a_leading_verdict(
    answer: str, policy: Policy
) -> None:
    with pytest.raises(ReasoningError):
        parse_llama_guard_4(answer, policy)


def test_unsafe_without_a_policy_code_says_why_in_the_rationale(policy: Policy) -> None:
    result = parse_llama_guard_4("unsafe\nS99", policy)
    assert result.decision == REVIEW and "S99" in result.rationale


def _lp(token: str, logprob: float, top: list[tuple[str, float]]) -> dict:
    return {
        "token": token,
        "logprob": logprob,
        "top_logprobs": [{"token": t, "logprob": lp} for t, lp in top],
    }


def test_llama_guard_score_is_the_first_token_unsafe_probability(policy: Policy) -> None:
    logprobs = {
        "content": [
            _lp("\n", -0.01, [("\n", -0.01)]),  # leading newline tokens are skipped
            _lp("unsafe", -0.1, [("unsafe", -0.1), ("safe", -2.4), ("The", -5.0)]),
            _lp("\n", -0.2, []),
        ]
    }
    result = parse_llama_guard_4("\nunsafe\nS1", policy, logprobs=logprobs)
    expected = math.exp(-0.1) / (math.exp(-0.1) + math.exp(-2.4))
    assert result.score == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize(
    ("logprobs", "expected"),
    [
        (None, None),
        ({}, None),
        ({"content": []}, None),
        ({"content": [_lp("The", -0.1, [("The", -0.1), ("I", -1.0)])]}, None),
        ({"content": [_lp("safe", 0.0, [("safe", 0.0)])]}, 0.0),
        ({"content": [_lp("un", -0.1, [("un", -0.1), ("safe", -5.0)])]}, 0.9926),
        ({"content": "garbage"}, None),
    ],
)
def test_unsafe_probability_handles_split_tokens_and_missing_logprobs(
    logprobs: object, expected: float | None
) -> None:
    assert unsafe_probability(logprobs) == expected


# -- JSON formats --------------------------------------------------------------------------


def _json(
    decision: object = "unsafe", categories: object = ("S1",), rationale: object = "a threat"
) -> str:
    cats = list(categories) if isinstance(categories, tuple) else categories
    return json.dumps({"decision": decision, "categories": cats, "rationale": rationale})


JSON_CASES = [
    (_json(), BLOCK, ["S1"]),
    (_json("safe", ()), ALLOW, []),
    (_json("uncertain", ()), REVIEW, []),
    (_json("uncertain", ("S10",)), REVIEW, ["S10"]),
    (_json("Unsafe", ("violent crimes", "s10", "S1")), BLOCK, ["S1", "S10"]),
    (_json("unsafe", ("S1",) * 40), BLOCK, ["S1"]),
    (_json("unsafe", ("S99", "S12")), BLOCK, ["S12"]),
    (_json("unsafe", ("S99",)), REVIEW, []),
    (_json("unsafe", ()), REVIEW, []),
    (_json("safe", ("S1",)), REVIEW, ["S1"]),  # contradicts itself: not a decision
    ("```json\n" + _json() + "\n```", BLOCK, ["S1"]),
    ("```\n" + _json("safe", ()) + "\n```\nDone.", ALLOW, []),
    ("Sure! Here is my assessment: " + _json() + " Hope this helps {:", BLOCK, ["S1"]),
    ("Step 1 {text} step 2 {image}\n" + _json("safe", ()), ALLOW, []),
    (
        json.dumps(
            {"analysis": "x", "rationale": "r", "decision": "unsafe", "categories": ["S12"]}
        ),
        BLOCK,
        ["S12"],
    ),
]


@pytest.mark.parametrize(("answer", "decision", "codes"), JSON_CASES)
@pytest.mark.parametrize("fmt", ["safevision", "shieldvlm"])
def test_json_parsers_read_well_formed_fenced_and_chatty_answers(
    fmt: str, answer: str, decision: Decision, codes: list[str], policy: Policy
) -> None:
    result = parse_answer(fmt, answer, policy)
    assert (result.decision, result.categories) == (decision, codes)


@pytest.mark.parametrize(
    "answer",
    [
        "",
        "no json here",
        '{"decision": "unsafe", "categories": ["S1"], "rationale": "the capt',  # max_tokens cut
        '```json\n{"decision": "unsafe", "categories": [',
        _json()[:-1],
        json.dumps({"decision": "unsafe", "categories": ["S1"]}),
        json.dumps({"categories": [], "rationale": "x"}),
        _json(categories="S1"),
        _json(categories=None),
        _json(categories=[1, 2]),
        _json(decision="maybe"),
        _json(decision=1),
        _json(decision="block"),
        _json(rationale=5),
        _json(rationale=None),
        "[1, 2, 3]",
        answer_spec(PromptLimits()),  # a model echoing the instruction
        answer_spec(PromptLimits(), rationale_first=True),
    ],
)
def test_json_parser_rejects_truncated_incomplete_and_mistyped_answers(
    answer: str, policy: Policy
) -> None:
    with pytest.raises(ReasoningError):
        parse_json_answer(answer, policy)


def test_json_rationale_is_one_bounded_line(policy: Policy) -> None:
    result = parse_json_answer(_json(rationale="line\x00one\n\n" + "word " * 2000), policy)
    assert len(result.rationale) <= MAX_RATIONALE_CHARS
    assert "\n" not in result.rationale and "\x00" not in result.rationale
    assert result.rationale.startswith("line one word")


@pytest.mark.parametrize("copied", ["", "<your reason>", "<your analysis>", "..."])
def test_an_empty_or_copied_placeholder_rationale_is_reported_as_missing(
    copied: str, policy: Policy
) -> None:
    assert parse_json_answer(_json(rationale=copied), policy).rationale == "(no rationale given)"


def test_huge_raw_answers_are_kept_bounded(policy: Policy) -> None:
    result = parse_json_answer(_json() + " " + "blah " * 5000, policy)
    assert len(result.raw) <= 4000


def test_reasoning_result_is_frozen_and_only_holds_final_decisions() -> None:
    result = ReasoningResult(decision=BLOCK, categories=["S1"])
    with pytest.raises(ValueError):
        result.decision = ALLOW  # type: ignore[misc]
    with pytest.raises(ValueError):
        ReasoningResult(decision=Decision.ESCALATE)


def test_unknown_format_is_a_value_error(policy: Policy) -> None:
    with pytest.raises(ValueError, match="unknown prompt format"):
        parse_answer("nope", "safe", policy)


# -- the JSON schema sent as response_format -----------------------------------------------


def test_json_schema_constrains_codes_uniqueness_and_lengths(policy: Policy) -> None:
    schema = json_schema_for(policy, max_rationale_chars=300)
    cats = schema["properties"]["categories"]
    assert cats["items"]["enum"] == ["S1", "S10", "S12"]
    assert cats["uniqueItems"] is True and cats["maxItems"] == 3
    assert schema["properties"]["decision"]["enum"] == ["safe", "unsafe", "uncertain"]
    assert schema["properties"]["rationale"]["maxLength"] == 300
    assert set(schema["required"]) == {"decision", "categories", "rationale"}
    assert schema["additionalProperties"] is False
    assert list(json_schema_for(policy, rationale_first=True)["properties"])[0] == "rationale"


def test_json_schema_accepts_what_the_parser_accepts_and_rejects_repetition(policy: Policy) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json_schema_for(policy)
    jsonschema.validate(json.loads(_json("unsafe", ("S1", "S10"))), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(_json("unsafe", ("S1", "S1"))), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(_json("unsafe", ("S99",))), schema)


def test_json_schema_compiles_to_a_llama_cpp_grammar(policy: Policy) -> None:
    grammar = pytest.importorskip("llama_cpp.llama_grammar")
    gbnf = grammar.json_schema_to_gbnf(json.dumps(json_schema_for(policy, rationale_first=True)))
    assert '"\\"S10\\""' in gbnf and "rationale" in gbnf
