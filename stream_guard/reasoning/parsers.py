"""Parsers of the reasoning model's answers, one per prompt format, and the JSON output schema.

Every parser returns a ``ReasoningResult`` (ALLOW / BLOCK / REVIEW, the policy's codes, a bounded
rationale, the raw answer) or raises ``ReasoningError`` when the answer is out of schema, so the
client can retry and the cascade can route the upload to review. Parsers are tolerant where models
are sloppy in harmless ways (whitespace, code fences, leading prose, case, names for codes,
repeated codes until the token limit) and strict where a guess would be a decision the model did
not make (no verdict word, missing fields, wrong types, truncated JSON).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from stream_guard.errors import ReasoningError
from stream_guard.events import Decision
from stream_guard.policy.model import Policy

__all__ = [
    "JSON_DECISIONS",
    "MAX_RATIONALE_CHARS",
    "MAX_RAW_CHARS",
    "MAX_SCHEMA_CATEGORIES",
    "NO_RATIONALE",
    "PARSERS",
    "Parser",
    "RATIONALE_FIRST",
    "ReasoningResult",
    "WANTS_JSON",
    "bounded_rationale",
    "extract_json_object",
    "json_schema_for",
    "map_categories",
    "parse_answer",
    "parse_json_answer",
    "parse_llama_guard_4",
    "parse_safevision",
    "parse_shieldvlm",
    "unsafe_probability",
]

MAX_RATIONALE_CHARS = 600
MAX_RAW_CHARS = 4000
MAX_SCHEMA_CATEGORIES = 8
JSON_DECISIONS = ("safe", "unsafe", "uncertain")

_REASONING_DECISIONS = (Decision.ALLOW, Decision.BLOCK, Decision.REVIEW)
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class ReasoningResult(BaseModel):
    """What the reasoning model decided, in the policy's terms."""

    model_config = ConfigDict(frozen=True)

    decision: Decision = Field(description="ALLOW, BLOCK or REVIEW (the model could not decide)")
    categories: list[str] = Field(default_factory=list, description="policy codes, unique, ordered")
    rationale: str = Field(default="", max_length=MAX_RATIONALE_CHARS)
    raw: str = Field(default="", max_length=MAX_RAW_CHARS, description="the answer as received")
    score: float | None = Field(
        default=None, ge=0.0, le=1.0, description="P(unsafe) from first-token logprobs, if any"
    )

    @field_validator("decision")
    @classmethod
    def _reasoning_decision(cls, v: Decision) -> Decision:
        if v not in _REASONING_DECISIONS:
            raise ValueError(f"a reasoning decision is allow, block or review, not {v}")
        return v


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def bounded_rationale(text: str, limit: int = MAX_RATIONALE_CHARS) -> str:
    """One line of plain text, no control characters, at most ``limit`` characters."""
    return _clip(" ".join(_CONTROL_CHARS.sub(" ", text).split()), limit)


def _excerpt(text: str) -> str:
    return json.dumps(_clip(text.strip(), 120), ensure_ascii=False)


# -- categories ----------------------------------------------------------------------------

_TOKEN = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_STRIP = " \t\r\n\"'`*[](){}.:;-"


def _lookup(policy: Policy) -> tuple[dict[str, str], dict[str, str]]:
    codes = {c.code.lower(): c.code for c in policy.categories}
    names = {" ".join(c.name.lower().split()): c.code for c in policy.categories}
    return codes, names


def map_categories(items: Iterable[str], policy: Policy) -> tuple[list[str], list[str]]:
    """(policy codes, unrecognised items): codes or names, case-insensitive, deduplicated.

    An item is a code (``s1``), a name (``violent crimes``), ``S1: Violent Crimes``, or a run of
    codes (``S1 S10``). Order of first mention is kept. Unknown items are returned, not raised:
    a model that invents a code has not decided about this policy's categories.
    """
    codes, names = _lookup(policy)
    found: list[str] = []
    unknown: list[str] = []

    def add(code: str) -> None:
        if code not in found:
            found.append(code)

    for raw in items:
        item = raw.strip(_STRIP)
        if not item:
            continue
        key = " ".join(item.lower().split())
        if key in codes:
            add(codes[key])
        elif key in names:
            add(names[key])
        elif ":" in item and " ".join(item.split(":", 1)[0].lower().split()) in codes:
            add(codes[" ".join(item.split(":", 1)[0].lower().split())])
        else:
            hits = [codes[t.lower()] for t in _TOKEN.findall(item) if t.lower() in codes]
            for code in hits:
                add(code)
            if not hits and len(unknown) < 8:
                unknown.append(_clip(item, 40))
    return found, unknown


def _describe(codes: list[str], policy: Policy) -> str:
    names = {c.code: c.name for c in policy.categories}
    return ", ".join(f"{c} {names[c]}" for c in codes)


# -- Llama Guard 4 -------------------------------------------------------------------------

_LG_HEAD = re.compile(r"^[\s\W]*?(unsafe|safe)\b", re.IGNORECASE)


def unsafe_probability(logprobs: Any) -> float | None:
    """P(unsafe) / (P(safe) + P(unsafe)) at the first non-blank token, from OpenAI ``logprobs``.

    Tokenisers split the verdict word differently (``unsafe`` or ``un`` + ``safe``), so a token
    counts for a word when it is a non-empty prefix of it. None when nothing usable came back.
    """
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list):
        return None
    for entry in content:
        if not isinstance(entry, dict) or not str(entry.get("token", "")).strip():
            continue
        candidates = [entry, *(entry.get("top_logprobs") or [])]
        seen: dict[str, float] = {}
        for cand in candidates:
            if not isinstance(cand, dict) or not isinstance(cand.get("logprob"), int | float):
                continue
            seen.setdefault(str(cand.get("token", "")), float(cand["logprob"]))
        p_safe = p_unsafe = 0.0
        for token, logprob in seen.items():
            word = token.strip().lower()
            if not word:
                continue
            if word.startswith("unsafe") or "unsafe".startswith(word):
                p_unsafe += math.exp(logprob)
            elif word.startswith("safe") or "safe".startswith(word):
                p_safe += math.exp(logprob)
        total = p_safe + p_unsafe
        return round(min(max(p_unsafe / total, 0.0), 1.0), 4) if total > 0 else None
    return None


def parse_llama_guard_4(text: str, policy: Policy, *, logprobs: Any = None) -> ReasoningResult:
    """``safe`` or ``unsafe`` then a comma-separated code line (Llama Guard's published format).

    Tolerated: leading whitespace or markup, codes on the verdict line or the next ones, codes
    repeated until the token limit, a cut-off last code, unknown codes (dropped). ``unsafe`` with
    no code of this policy is REVIEW: the model flagged something the policy does not name.
    """
    raw = _clip(text, MAX_RAW_CHARS)
    match = _LG_HEAD.match(text[:MAX_RAW_CHARS])
    if match is None:
        raise ReasoningError(
            f"llama_guard_4 answer does not start with safe/unsafe: {_excerpt(text)}"
        )
    score = unsafe_probability(logprobs)
    if match.group(1).lower() == "safe":
        return ReasoningResult(
            decision=Decision.ALLOW, rationale="safe (Llama Guard format)", raw=raw, score=score
        )
    rest = text[match.end() : MAX_RAW_CHARS]
    codes, unknown = map_categories(re.split(r"[,;\n]+", rest), policy)
    if not codes:
        got = f" (got: {', '.join(unknown)})" if unknown else ""
        return ReasoningResult(
            decision=Decision.REVIEW,
            rationale=bounded_rationale(f"unsafe without a category of this policy{got}"),
            raw=raw,
            score=score,
        )
    return ReasoningResult(
        decision=Decision.BLOCK,
        categories=codes,
        rationale=bounded_rationale(f"unsafe: {_describe(codes, policy)} (Llama Guard format)"),
        raw=raw,
        score=score,
    )


# -- JSON formats (SafeVision, ShieldVLM) --------------------------------------------------

NO_RATIONALE = "(no rationale given)"
_PLACEHOLDERS = {"", "your reason", "your analysis", "...", "string"}
_FENCE = re.compile(r"```[A-Za-z]*\s*(.*?)```", re.DOTALL)
_MAX_OPENINGS = 16


def extract_json_object(text: str) -> dict[str, Any]:
    """The first JSON object in ``text``: inside a code fence, or after leading prose."""
    decoder = json.JSONDecoder()
    sources = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    for source in sources:
        start = source.find("{")
        tries = 0
        while start != -1 and tries < _MAX_OPENINGS:
            try:
                obj, _ = decoder.raw_decode(source, start)
            except json.JSONDecodeError:
                pass
            else:
                if isinstance(obj, dict):
                    return obj
            start = source.find("{", start + 1)
            tries += 1
    raise ReasoningError(f"no complete JSON object in the answer: {_excerpt(text)}")


def parse_json_answer(text: str, policy: Policy) -> ReasoningResult:
    """``{"decision": "safe"|"unsafe"|"uncertain", "categories": [...], "rationale": "..."}``.

    Missing fields and wrong types are out of schema (``ReasoningError``); extra fields (a
    ShieldVLM ``analysis``) are ignored. ``uncertain``, ``unsafe`` with no code of this policy,
    and ``safe`` that still names categories are REVIEW: none of them is a decision.
    """
    raw = _clip(text, MAX_RAW_CHARS)
    obj = extract_json_object(text)
    missing = [k for k in ("decision", "categories", "rationale") if k not in obj]
    if missing:
        raise ReasoningError(f"answer lacks {missing}: {_excerpt(text)}")
    decision, categories, rationale = obj["decision"], obj["categories"], obj["rationale"]
    if not isinstance(decision, str) or decision.strip().lower() not in JSON_DECISIONS:
        raise ReasoningError(f"decision must be one of {list(JSON_DECISIONS)}, got {decision!r}")
    if not isinstance(categories, list) or not all(isinstance(c, str) for c in categories):
        raise ReasoningError(f"categories must be a list of strings, got {categories!r}")
    if not isinstance(rationale, str):
        raise ReasoningError(f"rationale must be a string, got {type(rationale).__name__}")
    codes, unknown = map_categories(categories, policy)
    rationale = bounded_rationale(rationale)
    if rationale.strip("<>. ").lower() in _PLACEHOLDERS:
        rationale = NO_RATIONALE  # a small model copied the prompt's placeholder
    said = decision.strip().lower()
    if said == "safe":
        if codes:
            note = f"[answered safe but named {', '.join(codes)}] "
            return ReasoningResult(
                decision=Decision.REVIEW,
                categories=codes,
                rationale=bounded_rationale(note + rationale),
                raw=raw,
            )
        return ReasoningResult(decision=Decision.ALLOW, rationale=rationale, raw=raw)
    if said == "unsafe" and codes:
        return ReasoningResult(
            decision=Decision.BLOCK, categories=codes, rationale=rationale, raw=raw
        )
    if said == "unsafe":
        got = f" (got: {', '.join(unknown)})" if unknown else ""
        note = f"[answered unsafe without a category of this policy{got}] "
        return ReasoningResult(
            decision=Decision.REVIEW, rationale=bounded_rationale(note + rationale), raw=raw
        )
    return ReasoningResult(
        decision=Decision.REVIEW,
        categories=codes,
        rationale=bounded_rationale("[uncertain] " + rationale),
        raw=raw,
    )


def parse_safevision(text: str, policy: Policy, *, logprobs: Any = None) -> ReasoningResult:
    return parse_json_answer(text, policy)


def parse_shieldvlm(text: str, policy: Policy, *, logprobs: Any = None) -> ReasoningResult:
    return parse_json_answer(text, policy)


Parser = Callable[..., ReasoningResult]

PARSERS: dict[str, Parser] = {
    "llama_guard_4": parse_llama_guard_4,
    "safevision": parse_safevision,
    "shieldvlm": parse_shieldvlm,
}

WANTS_JSON: dict[str, bool] = {"llama_guard_4": False, "safevision": True, "shieldvlm": True}
RATIONALE_FIRST: dict[str, bool] = {"llama_guard_4": False, "safevision": False, "shieldvlm": True}


def parse_answer(
    prompt_format: str, text: str, policy: Policy, *, logprobs: Any = None
) -> ReasoningResult:
    try:
        parser = PARSERS[prompt_format]
    except KeyError:
        raise ValueError(
            f"unknown prompt format {prompt_format!r}; known: {sorted(PARSERS)}"
        ) from None
    return parser(text, policy, logprobs=logprobs)


def json_schema_for(
    policy: Policy,
    *,
    rationale_first: bool = False,
    max_rationale_chars: int = MAX_RATIONALE_CHARS,
    max_categories: int = MAX_SCHEMA_CATEGORIES,
) -> dict[str, Any]:
    """JSON Schema of the answer, for ``response_format`` (constrained decoding where supported).

    Categories are an enum of the policy's codes, unique and capped, so a constrained small model
    cannot repeat a code until the token limit; the rationale is length-bounded. Property order
    is generation order for grammar-based servers: ``rationale_first`` makes the model reason
    before it labels (ShieldVLM).
    """
    props: dict[str, Any] = {
        "decision": {"type": "string", "enum": list(JSON_DECISIONS)},
        "categories": {
            "type": "array",
            "items": {"type": "string", "enum": policy.codes},
            "uniqueItems": True,
            "maxItems": min(len(policy.codes), max_categories),
        },
        "rationale": {"type": "string", "maxLength": max_rationale_chars},
    }
    order = ["rationale", "decision", "categories"] if rationale_first else list(props)
    return {
        "type": "object",
        "properties": {k: props[k] for k in order},
        "required": order,
        "additionalProperties": False,
    }
