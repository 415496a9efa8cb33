"""Guard quality on labelled data: manifests, scoring, metrics, calibration, baselines."""

__all__: list[str] = []
