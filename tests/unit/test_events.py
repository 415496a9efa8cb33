"""Event contracts: committed schemas, tolerance of unknown fields, strictness on required ones."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from stream_guard.events import DeadLetter, UploadEvent, Verdict, json_schemas
from stream_guard.schemas import SCHEMA_DIR


@pytest.mark.parametrize("name", sorted(json_schemas()))
def test_committed_json_schema_matches_the_model(name):
    committed = (SCHEMA_DIR / f"{name}.schema.json").read_text()
    assert committed == json_schemas()[name], (
        f"{name}.schema.json is stale: run `python -m stream_guard.schemas` and commit"
    )


def test_upload_event_tolerates_unknown_fields():
    e = UploadEvent.model_validate({"upload_id": "u1", "text": {"caption": "hi"}, "future": 1})
    assert e.upload_id == "u1" and e.tenant_id == "default"


@pytest.mark.parametrize(
    "payload, field",
    [
        ({"text": {"caption": "hi"}}, "upload_id"),
        ({"upload_id": "u1"}, "at least one image or some text"),
        ({"upload_id": "u 1", "text": {"caption": "x"}}, "upload_id"),
        ({"upload_id": "u1", "images": [{"uri": "http://evil/x.png"}]}, "s3://"),
        ({"upload_id": "u1", "images": [{"uri": "s3://bucket-only"}]}, "s3://"),
        ({"upload_id": "u1", "schema_version": 2, "text": {"caption": "x"}}, "schema_version"),
        ({"upload_id": "u1", "images": [{"uri": "s3://b/k"}] * 17}, "images"),
        ({"upload_id": "u1", "text": {"caption": "x" * 20_001}}, "caption"),
    ],
)
def test_upload_event_rejects_missing_or_bad_fields(payload, field):
    with pytest.raises(ValidationError) as err:
        UploadEvent.model_validate(payload)
    assert field in str(err.value)


def test_content_form_follows_the_text_fields():
    def form(**text):
        return UploadEvent.model_validate({"upload_id": "u", "text": text}).text.form

    assert form(caption="c") == "statement"
    assert form(prompt="p") == "prompt"
    assert form(prompt="p", response="r") == "dialog"


def test_verdict_id_is_deterministic_per_upload_policy_and_mode():
    a = Verdict.make_id("u1", "1.0+abc", "fast", True)
    assert a == Verdict.make_id("u1", "1.0+abc", "fast", True)
    assert a != Verdict.make_id("u1", "1.0+abd", "fast", True)
    assert a != Verdict.make_id("u1", "1.0+abc", "fast", False)


def test_dead_letter_round_trips_the_original_bytes():
    raw = bytes(range(256))
    letter = DeadLetter(
        error_code="event.malformed",
        reason="r",
        stage="parse",
        original_value_b64=DeadLetter.encode(raw) or "",
    )
    again = DeadLetter.model_validate(json.loads(letter.to_bytes()))
    assert again.original_value() == raw
