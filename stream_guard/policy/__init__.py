"""Policies: model and thresholds, the head compiler, heads on Triton, live registry, YAML."""

__all__: list[str] = []
