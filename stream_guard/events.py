"""Event contracts on the wire: UploadEvent in, Verdict / Escalation / DeadLetter out.

Each model carries ``schema_version``. Readers tolerate unknown fields (``extra="ignore"``) so a
producer can add fields without breaking us; missing required fields are an error. The JSON
Schema of every model is committed under ``stream_guard/schemas/`` and checked by a test.
"""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "CategoryScore",
    "ContentForm",
    "DeadLetter",
    "Decision",
    "EVENT_MODELS",
    "Escalation",
    "Evidence",
    "HumanReview",
    "ID_PATTERN",
    "ImageRef",
    "MAX_IMAGES",
    "MAX_TEXT_CHARS",
    "Mode",
    "ModelRef",
    "MAX_NOTE_CHARS",
    "Reasoning",
    "ReviewDecision",
    "ReviewerId",
    "SCHEMA_VERSION",
    "SourceRef",
    "TenantId",
    "UploadEvent",
    "UploadId",
    "UploadText",
    "Verdict",
    "json_schemas",
]

SCHEMA_VERSION = 1
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$"
MAX_IMAGES = 16
MAX_TEXT_CHARS = 20_000
MAX_NOTE_CHARS = 2_000

UploadId = Annotated[str, Field(pattern=ID_PATTERN, description="Platform's id of the upload")]
TenantId = Annotated[str, Field(pattern=ID_PATTERN, description="Tenant that owns the upload")]
ReviewerId = Annotated[
    str,
    Field(
        pattern=ID_PATTERN,
        description="Opaque id of the person who decided (never a name or an e-mail address)",
    ),
]


class _Event(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


class ContentForm(StrEnum):
    """ShieldVLM's three forms of content: how the text relates to the images."""

    STATEMENT = "statement"  # a caption, title or post
    PROMPT = "prompt"  # a user's chat prompt
    DIALOG = "dialog"  # a prompt and a model's response


class ImageRef(_Event):
    uri: str = Field(description="s3://bucket/key of the object; other schemes are refused")
    content_type: str | None = Field(default=None, description="Declared MIME type, if known")

    @field_validator("uri")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if not v.startswith("s3://") or "/" not in v[5:] or v.endswith("/"):
            raise ValueError("image uri must look like s3://bucket/key")
        return v

    @property
    def bucket(self) -> str:
        return self.uri[5:].split("/", 1)[0]

    @property
    def key(self) -> str:
        return self.uri[5:].split("/", 1)[1]


class UploadText(_Event):
    model_config = ConfigDict(extra="ignore", frozen=True, str_max_length=MAX_TEXT_CHARS)

    caption: str | None = None
    title: str | None = None
    prompt: str | None = None
    response: str | None = None

    @property
    def form(self) -> ContentForm:
        if self.response:
            return ContentForm.DIALOG
        if self.prompt:
            return ContentForm.PROMPT
        return ContentForm.STATEMENT

    def joined(self) -> str:
        """All text of the upload as one string, in a stable order, for the text tower."""
        parts = [self.title, self.caption, self.prompt, self.response]
        return "\n".join(p for p in parts if p)


class UploadEvent(_Event):
    """Published by the platform to ``guard.uploads`` (key: upload_id) for every user upload."""

    schema_version: Literal[1] = 1
    upload_id: UploadId
    tenant_id: TenantId = "default"
    created_at: datetime | None = None
    images: list[ImageRef] = Field(default_factory=list, max_length=MAX_IMAGES)
    text: UploadText = Field(default_factory=UploadText)
    metadata: dict[str, str] = Field(default_factory=dict, max_length=32)

    @model_validator(mode="after")
    def _not_empty(self) -> UploadEvent:
        if not self.images and not self.text.joined():
            raise ValueError("an upload needs at least one image or some text")
        return self


class Decision(StrEnum):
    ALLOW = "allow"
    BLOCK = "block"
    ESCALATE = "escalate"  # provisional: the reasoning tier decides
    REVIEW = "review"  # a person decides (published to guard.review)


class Mode(StrEnum):
    FAST = "fast"
    REASONING = "reasoning"
    HUMAN = "human"  # a reviewer's decision (ReviewDecision) made it final


class CategoryScore(_Event):
    code: str
    name: str
    score: float = Field(ge=0.0, le=1.0)
    decision: Decision


class Reasoning(_Event):
    """What the reasoning tier said, attached to its final verdict."""

    model: str
    prompt_format: str
    decision: Decision
    categories: list[str] = Field(default_factory=list)
    rationale: str = ""
    trust: Literal["override", "advisory"] = "advisory"
    agreed_with_fast: bool | None = None


class HumanReview(_Event):
    """Who settled a reviewed upload, attached to the final verdict a ReviewDecision makes."""

    decision_id: str
    reviewer: ReviewerId
    decided_at: datetime
    note: str | None = Field(default=None, max_length=MAX_NOTE_CHARS)


class ModelRef(_Event):
    """A served model an upload's evidence passed through, beside the policy's head."""

    role: str = Field(description="image_tower, image_text_tower or image_head")
    name: str
    version: str


class Verdict(_Event):
    """Published to ``guard.verdicts`` (key: upload_id).

    ``final`` is false only for the provisional verdict of an escalated upload. A final verdict
    is deterministic for (upload_id, policy_version): redelivery yields an identical record, so
    consumers de-duplicate by key. It therefore carries no wall-clock processing time.
    """

    schema_version: Literal[1] = 1
    verdict_id: str
    upload_id: UploadId
    tenant_id: TenantId
    decision: Decision
    final: bool
    mode: Mode
    flagged: list[str] = Field(default_factory=list, description="codes of flagged categories")
    categories: list[CategoryScore]
    policy_id: str
    policy_version: str
    model_name: str
    model_version: str
    reasoning: Reasoning | None = None
    review_reason: str | None = None
    text_truncated: bool | None = Field(
        default=None,
        description="true when the upload's text was longer than the per-upload scoring budget "
        "(text.max_segments windows): the rest was not read, and the upload was escalated",
    )
    review: HumanReview | None = Field(
        default=None,
        description="set when a person's ReviewDecision made this verdict (mode human)",
    )
    image_models: list[ModelRef] | None = Field(
        default=None,
        description="set when the upload's images were judged by the image guard: the exported "
        "image tower, its text tower and the policy's image head, with their versions",
    )

    @staticmethod
    def make_id(upload_id: str, policy_version: str, mode: Mode, final: bool) -> str:
        """The verdict-id rule: one id per (upload, policy version, mode, final)."""
        raw = f"{upload_id}|{policy_version}|{mode}|{int(final)}".encode()
        return hashlib.sha256(raw).hexdigest()[:32]

    def supersedes(self, other: Verdict) -> bool:
        """The rule consumers use to keep the newest verdict of an upload under one policy
        version: a final verdict wins over a provisional one (which a redelivered fast batch
        may publish again after the final); verdicts of equal finality are identical."""
        if (self.upload_id, self.policy_version) != (other.upload_id, other.policy_version):
            raise ValueError("only verdicts of one upload under one policy version compare")
        return self.final and not other.final

    @classmethod
    def issue(cls, **fields: object) -> Verdict:
        """The one way verdicts are made: ``verdict_id`` follows from the other fields."""
        fields["verdict_id"] = cls.make_id(
            str(fields["upload_id"]),
            str(fields["policy_version"]),
            Mode(fields["mode"]),
            bool(fields["final"]),
        )
        return cls.model_validate(fields)


class Evidence(_Event):
    """Fast-mode evidence for the reasoning tier (words for a text-only model)."""

    image_detections: list[dict[str, float]] = Field(default_factory=list)
    ocr_text: str = ""
    top_categories: list[CategoryScore] = Field(default_factory=list)


class Escalation(_Event):
    """Published to ``guard.escalations`` for uploads in the policy's uncertain band."""

    schema_version: Literal[1] = 1
    upload: UploadEvent
    fast_verdict: Verdict
    evidence: Evidence = Field(default_factory=Evidence)


class ReviewDecision(_Event):
    """Published to ``guard.review.decisions`` (key: upload_id) when a person settles an upload
    that the reasoning tier sent to ``guard.review``.

    It names the upload and the verdict it settles and carries both as they were shown to the
    reviewer (``reviewed``, ``upload``), so the worker that turns it into the final verdict and
    the labelled manifest needs no other lookup: the same decision always makes the same
    verdict, byte for byte. ``decision`` is allow or block; a block names at least one category
    of the reviewed verdict's policy, an allow none.
    """

    schema_version: Literal[1] = 1
    decision_id: str = Field(pattern=ID_PATTERN, description="unique per decision made")
    upload_id: UploadId
    tenant_id: TenantId
    verdict_id: str = Field(description="verdict_id of the reviewed verdict this settles")
    policy_id: str
    policy_version: str
    decision: Literal[Decision.ALLOW, Decision.BLOCK]
    categories: list[str] = Field(default_factory=list, description="codes the reviewer chose")
    reviewer: ReviewerId
    decided_at: datetime
    note: str | None = Field(default=None, max_length=MAX_NOTE_CHARS)
    reviewed: Verdict = Field(description="the verdict the reviewer saw (from guard.review)")
    upload: UploadEvent | None = Field(
        default=None, description="the upload the reviewer saw: its text and image references"
    )

    @model_validator(mode="after")
    def _consistent(self) -> ReviewDecision:
        r = self.reviewed
        if (r.upload_id, r.verdict_id) != (self.upload_id, self.verdict_id):
            raise ValueError("reviewed verdict is not the one named by upload_id / verdict_id")
        if (r.tenant_id, r.policy_id, r.policy_version) != (
            self.tenant_id,
            self.policy_id,
            self.policy_version,
        ):
            raise ValueError("tenant / policy of the decision differ from the reviewed verdict")
        if self.upload is not None and self.upload.upload_id != self.upload_id:
            raise ValueError("upload.upload_id differs from upload_id")
        if self.decision == Decision.BLOCK and not self.categories:
            raise ValueError("a block names at least one category")
        if self.decision == Decision.ALLOW and self.categories:
            raise ValueError("an allow names no category")
        known = {c.code for c in r.categories}
        unknown = [c for c in self.categories if c not in known]
        if unknown or len(set(self.categories)) != len(self.categories):
            raise ValueError(f"categories must be distinct codes of {sorted(known)}: {unknown}")
        return self


class SourceRef(_Event):
    topic: str
    partition: int
    offset: int


class DeadLetter(_Event):
    """Published to ``guard.dlq``: the original bytes and why they could not be processed."""

    schema_version: Literal[1] = 1
    upload_id: str | None = None
    error_code: str
    reason: str
    stage: str
    attempts: int = 1
    source: SourceRef | None = None
    original_key_b64: str | None = None
    original_value_b64: str
    original_size: int | None = Field(
        default=None, description="bytes of the original value; set when the copy is truncated"
    )
    original_sha256: str | None = Field(
        default=None, description="sha256 of the whole original value; set when truncated"
    )
    original_truncated: bool | None = Field(
        default=None, description="true when original_value_b64 holds only a prefix"
    )
    failed_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @staticmethod
    def encode(raw: bytes | None) -> str | None:
        return None if raw is None else base64.b64encode(raw).decode()

    @classmethod
    def of(
        cls, value: bytes, key: bytes | None, *, max_original_bytes: int, **fields: object
    ) -> DeadLetter:
        """A dead letter that always fits a Kafka request: the original value is embedded
        whole up to ``max_original_bytes``, else as a prefix with its size and sha256 (the
        ``source`` topic/partition/offset says where to re-read the whole of it)."""
        key = key[:1024] if key is not None else None
        if len(value) <= max_original_bytes:
            return cls.model_validate(
                {
                    **fields,
                    "original_key_b64": cls.encode(key),
                    "original_value_b64": cls.encode(value),
                }
            )
        return cls.model_validate(
            {
                **fields,
                "original_key_b64": cls.encode(key),
                "original_value_b64": cls.encode(value[:max_original_bytes]),
                "original_size": len(value),
                "original_sha256": hashlib.sha256(value).hexdigest(),
                "original_truncated": True,
            }
        )

    def original_value(self) -> bytes:
        return base64.b64decode(self.original_value_b64)


EVENT_MODELS: dict[str, type[BaseModel]] = {
    "upload_event": UploadEvent,
    "verdict": Verdict,
    "escalation": Escalation,
    "dead_letter": DeadLetter,
    "review_decision": ReviewDecision,
}


def json_schemas() -> dict[str, str]:
    """The committed JSON Schema text of each event model, keyed by file stem."""
    return {
        name: json.dumps(model.model_json_schema(mode="serialization"), indent=2, sort_keys=True)
        + "\n"
        for name, model in EVENT_MODELS.items()
    }
