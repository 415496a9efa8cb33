"""Development infrastructure (local stack, demo): never imported by serving code."""

__all__: list[str] = []
