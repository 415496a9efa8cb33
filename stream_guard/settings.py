"""The one settings object. Only this module reads the environment.

Variables use the prefix ``STREAM_GUARD_`` and ``__`` between a group and its field, e.g.
``STREAM_GUARD_KAFKA__BOOTSTRAP_SERVERS`` or ``STREAM_GUARD_TRITON__URL``. Helm values map one to
one onto these groups (``helm/stream-guard/values.yaml`` -> ``config``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = [
    "BatchSettings",
    "DEFAULT_POLICY",
    "KafkaSettings",
    "MediaSettings",
    "PACKAGE_DIR",
    "PolicySettings",
    "ReasoningSettings",
    "RetrySettings",
    "ReviewSettings",
    "S3Settings",
    "Settings",
    "ShadowSettings",
    "TelemetrySettings",
    "TopicSettings",
    "TritonSettings",
    "load_settings",
]

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_POLICY = PACKAGE_DIR / "policy" / "builtin" / "llama_guard_4.yaml"


class _Group(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TopicSettings(_Group):
    uploads: str = "guard.uploads"
    verdicts: str = "guard.verdicts"
    escalations: str = "guard.escalations"
    review: str = "guard.review"
    dlq: str = "guard.dlq"
    review_decisions: str = Field(
        default="guard.review.decisions", description="ReviewDecision events from reviewers"
    )
    shadow_verdicts: str = Field(
        default="guard.verdicts.shadow", description="verdicts of the shadow (candidate) policy"
    )
    partitions: int = Field(default=4, ge=1, description="partitions when the stack creates topics")


class KafkaSettings(_Group):
    bootstrap_servers: str = "127.0.0.1:9092"
    consumer_group: str = "stream-guard-fast"
    reasoning_group: str = "stream-guard-reasoning"
    review_group: str = "stream-guard-review"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    session_timeout_s: float = Field(default=10.0, gt=0)
    heartbeat_interval_s: float = Field(default=3.0, gt=0)
    max_event_bytes: int = Field(default=1_000_000, gt=0, description="larger values are DLQ'd")
    fetch_max_wait_ms: int = Field(
        default=25,
        ge=1,
        le=30_000,
        description="how long the broker may hold a fetch with nothing to return; Tansu "
        "answers after up to half of it even when a record arrives meanwhile, so this bounds "
        "the consume latency there; a broker that answers as records arrive (Apache Kafka, "
        "Redpanda) can take 500 (fewer idle requests, same latency)",
    )
    topics: TopicSettings = TopicSettings()


class S3Settings(_Group):
    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    allowed_buckets: list[str] = Field(default_factory=lambda: ["uploads"])
    verify_tls: bool = True
    ca_bundle: Path | None = None
    max_object_bytes: int = Field(default=20 * 1024 * 1024, gt=0)
    timeout_s: float = Field(default=10.0, gt=0)
    max_concurrency: int = Field(default=16, ge=1)


class TritonSettings(_Group):
    url: str = "127.0.0.1:8001"
    text_model: str = "text_encoder"
    image_model: str = Field(
        default="image_detector",
        description="NudeNet detector model (nudity signals); empty: no detector",
    )
    head_model: str = "guard_head"  # prefix: the head of policy P is <prefix>_<P's policy_id>
    image_tower: str = Field(
        default="",
        description="exported CLIP/SigLIP image tower judging images against the policy's "
        "image_descriptions (e.g. siglip_image_encoder); empty: none",
    )
    image_text_tower: str = Field(
        default="",
        description="raw-text tower of the same dual encoder (TEXT -> EMBEDDING); empty: "
        "<prefix>_text_embedder beside <prefix>_image_encoder",
    )
    image_head_model: str = Field(
        default="guard_image_head",
        description="prefix: the image head of policy P is <prefix>_<P's policy_id>",
    )
    model_repository: Path | None = Field(
        default=None, description="repository dir this worker writes new head versions to"
    )
    timeout_s: float = Field(default=10.0, gt=0)
    ssl: bool = False
    root_certificates: Path | None = None


class BatchSettings(_Group):
    max_size: int = Field(default=32, ge=1, description="uploads per batch")
    window_s: float = Field(default=0.02, gt=0, description="max wait to fill a batch")
    max_in_flight: int = Field(default=3, ge=1, description="batches being processed at once")
    stall_after_s: float = Field(
        default=120.0, gt=0, description="/healthz fails after this long without progress"
    )


class TextSettings(_Group):
    max_segments: int = Field(
        default=24, ge=1, description="text windows scored per upload; longer text escalates"
    )


class RetrySettings(_Group):
    attempts: int = Field(default=6, ge=1)
    initial_backoff_s: float = Field(default=0.2, gt=0)
    max_backoff_s: float = Field(default=5.0, gt=0)


class PolicySettings(_Group):
    path: Path = DEFAULT_POLICY
    tenants: dict[str, Path] = Field(
        default_factory=dict, description="tenant id -> policy file; others use `path`"
    )
    reload_interval_s: float = Field(default=2.0, gt=0)


class MediaSettings(_Group):
    max_pixels: int = Field(default=40_000_000, gt=0)
    max_side: int = Field(default=16_384, gt=0)
    max_frames: int = Field(default=300, ge=1)
    decode_workers: int = Field(default=2, ge=1)
    max_buffered_bytes: int = Field(
        default=256 * 1024 * 1024, gt=0, description="fetched image bytes held awaiting decode"
    )


class ReasoningSettings(_Group):
    base_url: str = "http://127.0.0.1:8080/v1"
    api_key: SecretStr | None = None
    model: str = "smollm2-135m-instruct"
    prompt_format: Literal["llama_guard_4", "safevision", "shieldvlm"] = "safevision"
    trust: Literal["override", "advisory"] = "advisory"
    vision: bool = False
    timeout_s: float = Field(default=60.0, gt=0)
    max_concurrency: int = Field(default=2, ge=1)
    rate_limit_per_s: float = Field(default=5.0, gt=0)
    attempts: int = Field(default=3, ge=1)
    max_tokens: int = Field(default=256, ge=16)


class ReviewSettings(_Group):
    manifest: str | None = Field(
        default=None,
        description="labelled manifest that reviewer decisions accumulate into: a local folder "
        "or s3://bucket/prefix (null: none)",
    )
    console_host: str = "127.0.0.1"
    console_port: int = Field(default=8090, ge=0, le=65535)
    reviewer_header: str = Field(
        default="X-Forwarded-User",
        description="request header an authenticating proxy sets to the reviewer's identity",
    )
    require_reviewer_header: bool = Field(
        default=False,
        description="refuse decisions without the reviewer header (true behind a proxy; false "
        "lets the page send a name, for local use)",
    )
    queue_index: int = Field(
        default=20_000, ge=1, description="escalations the console keeps to show their uploads"
    )
    image_max_side: int = Field(default=1024, ge=16, description="console image size in pixels")


class ShadowSettings(_Group):
    policy: Path | None = Field(
        default=None, description="candidate policy scored beside the live one (null: none)"
    )
    head_version: int | None = Field(
        default=None, ge=1, description="pin the candidate's head version (null: by policy)"
    )
    sample_rate: float = Field(default=1.0, ge=0.0, le=1.0, description="share of uploads")
    max_pending: int = Field(default=4, ge=1, description="batches waiting; more are skipped")


class TelemetrySettings(_Group):
    service_name: str = "stream-guard"
    otlp_endpoint: str | None = Field(default=None, description="OTLP/HTTP traces endpoint")
    span_file: Path | None = Field(default=None, description="also write spans as JSON lines")
    metrics_port: int = Field(default=9464, ge=0, le=65535)
    http_host: str = "127.0.0.1"
    log_json: bool = True
    log_level: str = "INFO"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="STREAM_GUARD_", env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    kafka: KafkaSettings = KafkaSettings()
    s3: S3Settings = S3Settings()
    triton: TritonSettings = TritonSettings()
    batch: BatchSettings = BatchSettings()
    text: TextSettings = TextSettings()
    retry: RetrySettings = RetrySettings()
    policy: PolicySettings = PolicySettings()
    media: MediaSettings = MediaSettings()
    reasoning: ReasoningSettings = ReasoningSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    review: ReviewSettings = ReviewSettings()
    shadow: ShadowSettings = ShadowSettings()
    shutdown_grace_s: float = Field(default=25.0, gt=0)

    def as_dict(self) -> dict[str, Any]:
        """Settings for logs and `stream-guard config`: secrets are masked."""
        return self.model_dump(mode="json")


def load_settings() -> tuple[Settings, list[str]]:
    """Settings from the environment, plus warnings about ``STREAM_GUARD_`` variables that are
    not settings. Raises ``config_errors.SettingsInvalid`` naming each bad variable, its value
    and the expected format (a ``ConfigError``)."""
    from stream_guard.config_errors import load

    return load(Settings, os.environ)
