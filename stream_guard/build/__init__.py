"""Build-time model tooling: text encoder, detector, export, TensorRT engines, repository writer."""

__all__: list[str] = []
