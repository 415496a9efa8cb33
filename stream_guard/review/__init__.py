"""Human review: the console, reviewer decisions as final verdicts, labelled data from them."""

__all__: list[str] = []
