"""The fast stage: records in; verdicts, escalations and dead letters out."""

__all__: list[str] = []
