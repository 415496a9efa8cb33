"""One error hierarchy for stream-guard.

Every error is either *transient* (retry with backoff; never dead-letter, never ack) or
*permanent* (the event itself is bad: dead-letter it with ``code`` and move on). The split is
part of the type so callers never guess from a message string.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "ConfigError",
    "DependencyUnavailable",
    "ErrorCode",
    "EventError",
    "InferenceError",
    "MediaError",
    "PermanentError",
    "PolicyError",
    "ReasoningError",
    "StreamGuardError",
    "TransientError",
]


class ErrorCode(StrEnum):
    """Machine-readable dead-letter codes (stable: downstream tools match on them)."""

    # event envelope
    EVENT_MALFORMED = "event.malformed"  # not JSON, or JSON that fails the UploadEvent schema
    EVENT_TOO_LARGE = "event.too_large"  # the Kafka value exceeds the configured limit
    EVENT_UNSUPPORTED_SCHEMA = "event.unsupported_schema"  # schema_version newer than we read
    # media reference / fetch
    MEDIA_URI_INVALID = "media.uri_invalid"  # not s3://bucket/key
    MEDIA_BUCKET_NOT_ALLOWED = "media.bucket_not_allowed"  # bucket not on the allow-list
    MEDIA_NOT_FOUND = "media.not_found"  # NoSuchKey / NoSuchBucket
    MEDIA_ACCESS_DENIED = "media.access_denied"
    MEDIA_TOO_LARGE = "media.too_large"  # object larger than max_object_bytes
    # media decode
    IMAGE_UNDECODABLE = "image.undecodable"  # not an image Pillow can read, or truncated
    IMAGE_UNSUPPORTED_FORMAT = "image.unsupported_format"  # a format outside the allow-list
    IMAGE_CONTENT_TYPE_MISMATCH = "image.content_type_mismatch"  # declared type != real type
    IMAGE_DIMENSIONS = "image.dimensions"  # zero or absurd width/height
    IMAGE_DECOMPRESSION_BOMB = "image.decompression_bomb"  # more pixels than max_pixels
    IMAGE_TOO_MANY_FRAMES = "image.too_many_frames"  # animation frame flood
    # policy / tenancy
    POLICY_UNKNOWN_TENANT = "policy.unknown_tenant"  # no policy serves this tenant
    # model output
    INFERENCE_REJECTED = "inference.rejected"  # Triton refused this one input (invalid argument)
    # outputs
    OUTPUT_TOO_LARGE = "output.too_large"  # an output would exceed the producer's request limit
    # anything else: a bug or an answer nobody foresaw; counted, dead-lettered, never a lost record
    INTERNAL_UNEXPECTED = "internal.unexpected"
    # reasoning
    REASONING_UNDECIDED = "reasoning.undecided"


class StreamGuardError(Exception):
    """Root of every error raised by stream-guard."""


class TransientError(StreamGuardError):
    """A dependency is down or slow: retry with backoff, do not ack, do not dead-letter."""


class PermanentError(StreamGuardError):
    """The input itself cannot be processed: dead-letter it with ``code`` and keep going."""

    def __init__(self, code: ErrorCode, reason: str, *, stage: str = "unknown") -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason
        self.stage = stage


class EventError(PermanentError):
    """The Kafka record is not a valid UploadEvent."""


class MediaError(PermanentError):
    """An object could not be fetched or decoded into a safe image."""


class InferenceError(PermanentError):
    """Triton refused one input as invalid: retrying the same tensor cannot succeed."""


class PolicyError(StreamGuardError):
    """A policy file is invalid; the operator must fix it before it can be loaded."""


class ConfigError(StreamGuardError):
    """Settings are inconsistent; the message says which variable to fix."""


class DependencyUnavailable(TransientError):
    """Broker, S3, Triton or the reasoning server is unreachable or timing out."""

    def __init__(self, dependency: str, reason: str) -> None:
        super().__init__(f"{dependency} unavailable: {reason}")
        self.dependency = dependency
        self.reason = reason


class ReasoningError(StreamGuardError):
    """The reasoning model answered out of schema or could not decide."""
