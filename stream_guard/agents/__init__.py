"""The Faust workers: the fast agent on uploads and the reasoning agent on escalations."""

__all__: list[str] = []
