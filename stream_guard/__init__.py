"""stream-guard: streaming content moderation on Kafka, S3 and Triton."""

__all__: list[str] = []
