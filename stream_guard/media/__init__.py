"""Media: S3 fetch, hardened image decoding and model preprocessing."""

__all__: list[str] = []
