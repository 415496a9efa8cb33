"""Policies: unsafe categories, their definitions and examples, and the score thresholds.

A policy is configuration (YAML). Changing it recompiles the classification head; it never
retrains the encoder. This module is pure: parsing, validation and the allow / escalate / block
decision, with no I/O beyond reading the file it is given.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stream_guard.errors import PolicyError
from stream_guard.events import CategoryScore, Decision

__all__ = [
    "CODE_PATTERN",
    "Category",
    "DatasetRef",
    "IMAGE_SIGNALS",
    "Policy",
    "Thresholds",
    "head_model_name",
    "load_policy",
    "parse_policy",
]

CODE_PATTERN = r"^[A-Za-z][A-Za-z0-9_]{0,31}$"

# Classes of the NudeNet 320n detector, in its output order: the image signals a category may use.
IMAGE_SIGNALS: tuple[str, ...] = (
    "FEMALE_GENITALIA_COVERED",
    "FACE_FEMALE",
    "BUTTOCKS_EXPOSED",
    "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED",
    "MALE_BREAST_EXPOSED",
    "ANUS_EXPOSED",
    "FEET_EXPOSED",
    "BELLY_COVERED",
    "FEET_COVERED",
    "ARMPITS_COVERED",
    "ARMPITS_EXPOSED",
    "FACE_MALE",
    "BELLY_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
    "ANUS_COVERED",
    "FEMALE_BREAST_COVERED",
    "BUTTOCKS_COVERED",
)


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DatasetRef(_Strict):
    """A public labelled dataset the compiler also trains on (see ``policy/datasets.py``)."""

    name: str = Field(description="a dataset reader: davidson")
    labels: dict[str, list[str]] = Field(
        min_length=1,
        description="dataset class -> category codes ([] = safe); unlisted classes are unused",
    )
    path: str | None = Field(
        default=None,
        description="the dataset file, relative to the policy file (default: "
        "$STREAM_GUARD_DATASETS/<name>/..., then ../shared/datasets of a source checkout)",
    )
    available: bool = Field(default=False, description="set when the policy is loaded")
    digest: str = Field(default="", description="set when the policy is loaded: the file's SHA-256")

    @model_validator(mode="after")
    def _known(self) -> DatasetRef:
        from stream_guard.policy.datasets import READERS

        reader = READERS.get(self.name)
        if reader is None:
            raise ValueError(f"unknown dataset {self.name!r}; known: {sorted(READERS)}")
        unknown = sorted(set(self.labels) - set(reader.classes))
        if unknown:
            raise ValueError(
                f"dataset {self.name}: unknown classes {unknown}; it has {list(reader.classes)}"
            )
        return self


class Thresholds(_Strict):
    """score < allow -> allow; allow <= score < block -> escalate; score >= block -> block."""

    allow: float = Field(ge=0.0, le=1.0)
    block: float = Field(ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _ordered(self) -> Thresholds:
        if self.allow > self.block:
            raise ValueError(f"allow ({self.allow}) must not exceed block ({self.block})")
        return self

    def decide(self, score: float) -> Decision:
        if score >= self.block:
            return Decision.BLOCK
        if score >= self.allow:
            return Decision.ESCALATE
        return Decision.ALLOW


class Category(_Strict):
    code: str = Field(pattern=CODE_PATTERN)
    name: str = Field(min_length=1, max_length=80)
    definition: str = Field(min_length=10, max_length=4000)
    examples: list[str] = Field(min_length=1, description="text that violates this category")
    negative_examples: list[str] = Field(
        default_factory=list, description="near misses that do NOT violate it (hard negatives)"
    )
    keywords: list[str] = Field(
        default_factory=list, description="explicit terms (lexical evidence beside the embedding)"
    )
    image_signals: list[str] = Field(
        default_factory=list, description="detector classes that evidence this category"
    )
    escalation_share: float | None = Field(
        default=None,
        gt=0.0,
        lt=0.5,
        description="share of this category's labelled negatives the compiler lets reach its "
        "escalation band when it calibrates on a pack (default 0.004): higher catches more of "
        "what the category targets, at the cost of more uploads for the reasoning tier",
    )
    block_precision: float | None = Field(
        default=None,
        ge=0.5,
        lt=1.0,
        description="precision on the pack's out-of-fold rows the compiler places this "
        "category's block point at (default 0.9): lower blocks more of it outright, with fewer "
        "escalations and more wrong blocks",
    )
    text_signals: list[str] = Field(
        default_factory=list,
        description="text classifier outputs served beside the text tower that evidence this "
        "category (checked against the served tower when the head is compiled)",
    )
    image_descriptions: list[str] = Field(
        default_factory=list,
        description="what a violating image shows, in words: zero-shot prototypes embedded by "
        "the image guard's text tower (needs an exported CLIP/SigLIP image tower)",
    )
    image_negative_descriptions: list[str] = Field(
        default_factory=list,
        description="benign images that look alike (counter-prototypes of this category)",
    )
    image_examples: list[str] = Field(
        default_factory=list,
        description="violating example images (s3:// URIs or paths relative to the policy "
        "file): few-shot prototypes embedded by the image tower",
    )
    image_negative_examples: list[str] = Field(
        default_factory=list, description="benign example images (few-shot counter-prototypes)"
    )
    thresholds: Thresholds | None = None

    @field_validator(
        "examples",
        "negative_examples",
        "keywords",
        "text_signals",
        "image_descriptions",
        "image_negative_descriptions",
        "image_examples",
        "image_negative_examples",
    )
    @classmethod
    def _non_blank(cls, v: list[str]) -> list[str]:
        if any(not s.strip() for s in v):
            raise ValueError("examples and keywords must not be blank")
        return v

    @field_validator("image_signals")
    @classmethod
    def _known_signals(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - set(IMAGE_SIGNALS))
        if unknown:
            raise ValueError(f"unknown image signals {unknown}; known: {list(IMAGE_SIGNALS)}")
        return v

    @model_validator(mode="after")
    def _examples_need_words(self) -> Category:
        if (self.image_examples or self.image_negative_examples) and not self.image_descriptions:
            raise ValueError(
                "image_examples refine image_descriptions: describe the violating images in "
                "words too (image_descriptions)"
            )
        return self

    @property
    def has_image_evidence(self) -> bool:
        """Judged on images by the image guard (an exported CLIP/SigLIP tower)."""
        return bool(self.image_descriptions)


class Policy(_Strict):
    policy_id: str = Field(pattern=r"^[a-z][a-z0-9_]{0,47}$")
    version: str = Field(min_length=1, max_length=64)
    description: str = ""
    thresholds: Thresholds = Thresholds(allow=0.4, block=0.8)
    ocr: bool = Field(default=False, description="add text read from images to the upload text")
    safe_examples: list[str] = Field(
        default_factory=list, description="benign text every category is contrasted with"
    )
    image_safe_descriptions: list[str] = Field(
        default_factory=list,
        description="benign images every image category is contrasted with, in words",
    )
    categories: list[Category] = Field(min_length=1)
    pack: str | None = Field(
        default=None,
        description="labelled examples the compiler trains and calibrates on: "
        "builtin:<name> or a directory (relative to the policy file)",
    )
    datasets: list[DatasetRef] = Field(
        default_factory=list, description="public labelled datasets the compiler also trains on"
    )
    digest: str = ""

    @model_validator(mode="after")
    def _unique_codes(self) -> Policy:
        codes = [c.code for c in self.categories]
        dupes = sorted({c for c in codes if codes.count(c) > 1})
        if dupes:
            raise ValueError(f"duplicate category codes: {dupes}")
        return self

    @model_validator(mode="after")
    def _dataset_codes(self) -> Policy:
        codes = set(self.codes)
        for ref in self.datasets:
            unknown = sorted({c for cs in ref.labels.values() for c in cs} - codes)
            if unknown:
                raise ValueError(f"dataset {ref.name} maps to unknown category codes {unknown}")
        return self

    @model_validator(mode="after")
    def _image_alternatives(self) -> Policy:
        # Image evidence is a choice between what a category's images show and what benign
        # images show: without any benign description every image would match.
        alone = [
            c.code
            for c in self.categories
            if c.image_descriptions
            and not c.image_negative_descriptions
            and not self.image_safe_descriptions
        ]
        if alone:
            raise ValueError(
                f"categories {alone} have image_descriptions but nothing to contrast them with: "
                "add image_negative_descriptions (benign look-alikes) or the policy's "
                "image_safe_descriptions"
            )
        return self

    @property
    def image_codes(self) -> list[str]:
        """Codes of the categories judged on images by the image guard."""
        return [c.code for c in self.categories if c.has_image_evidence]

    @property
    def codes(self) -> list[str]:
        return [c.code for c in self.categories]

    @property
    def effective_version(self) -> str:
        """Declared version plus a content digest: an edit without a bump still changes it."""
        return f"{self.version}+{self.digest[:8]}" if self.digest else self.version

    def thresholds_for(self, category: Category) -> Thresholds:
        return category.thresholds or self.thresholds

    def decide(self, scores: Mapping[str, float]) -> tuple[Decision, list[CategoryScore]]:
        """Per-category decisions and the upload's decision: any block, else any escalate."""
        per_category = []
        for cat in self.categories:
            score = round(min(max(float(scores[cat.code]), 0.0), 1.0), 4)
            decision = self.thresholds_for(cat).decide(score)
            per_category.append(
                CategoryScore(code=cat.code, name=cat.name, score=score, decision=decision)
            )
        decisions = {c.decision for c in per_category}
        for overall in (Decision.BLOCK, Decision.ESCALATE):
            if overall in decisions:
                return overall, per_category
        return Decision.ALLOW, per_category


def parse_policy(text: str, *, source: str = "<string>", base: Path | None = None) -> Policy:
    """Parse and validate policy YAML; a bad policy raises PolicyError saying what to fix."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PolicyError(f"{source}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise PolicyError(
            f"{source}: a policy is a YAML mapping with policy_id, version, categories"
        )
    data["digest"] = hashlib.sha256(text.encode()).hexdigest()
    try:
        policy = Policy.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()
        )
        raise PolicyError(f"{source}: invalid policy: {problems}") from e
    policy = _resolve_datasets(_resolve_image_examples(policy, base, source), base)
    if policy.pack is None:
        return policy
    from stream_guard.policy.packs import pack_digest, pack_dir

    directory = pack_dir(policy.pack, base)
    if not directory.is_dir():
        raise PolicyError(f"{source}: pack {policy.pack!r} is not a directory ({directory})")
    # The pack is part of what the head is compiled from: its content is in the version too.
    digest = hashlib.sha256((policy.digest + pack_digest(directory)).encode()).hexdigest()
    return policy.model_copy(update={"pack": str(directory), "digest": digest})


def _resolve_datasets(policy: Policy, base: Path | None) -> Policy:
    """Find each dataset; what was found (or that it was not) joins the digest, so a head
    compiled without a dataset never shares a version with one compiled with it."""
    if not policy.datasets:
        return policy
    from stream_guard.policy.datasets import dataset_file, file_digest

    digest = hashlib.sha256(policy.digest.encode())
    refs = []
    for ref in policy.datasets:
        found = dataset_file(ref.name, ref.path, base)
        file_sha = file_digest(found) if found else ""
        digest.update(f"{ref.name}:{file_sha or 'absent'}".encode())
        path = str(found) if found else ref.path
        refs.append(
            ref.model_copy(
                update={"path": path, "available": found is not None, "digest": file_sha}
            )
        )
    return policy.model_copy(update={"datasets": refs, "digest": digest.hexdigest()})


def _resolve_image_examples(policy: Policy, base: Path | None, source: str) -> Policy:
    """Example images as absolute paths or s3:// URIs; local files' bytes join the digest, so
    replacing an example image recompiles the image head like an edit of the policy text."""
    if not any(c.image_examples or c.image_negative_examples for c in policy.categories):
        return policy
    digest = hashlib.sha256(policy.digest.encode())
    categories = []
    for cat in policy.categories:
        fields = {}
        for name in ("image_examples", "image_negative_examples"):
            resolved = []
            for uri in getattr(cat, name):
                if uri.startswith("s3://"):
                    resolved.append(uri)
                    digest.update(uri.encode())
                    continue
                path = Path(uri) if Path(uri).is_absolute() or base is None else base / uri
                try:
                    digest.update(path.read_bytes())
                except OSError as e:
                    raise PolicyError(
                        f"{source}: category {cat.code}: cannot read example image {uri}: {e}"
                    ) from e
                resolved.append(str(path.resolve()))
            fields[name] = resolved
        categories.append(cat.model_copy(update=fields))
    return policy.model_copy(update={"categories": categories, "digest": digest.hexdigest()})


def load_policy(path: Path) -> Policy:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise PolicyError(f"cannot read policy file {path}: {e}") from e
    return parse_policy(text, source=str(path), base=Path(path).resolve().parent)


def head_model_name(prefix: str, policy_id: str) -> str:
    """Triton model name of the head compiled from a policy."""
    return f"{prefix}_{re.sub(r'[^a-z0-9_]', '_', policy_id)}"
