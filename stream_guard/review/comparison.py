"""Live and shadow policies against reviewer labels: confusion counts per category (pure).

A reviewed upload has a person's label (the categories of a block; none for an allow), the live
policy's fast verdict (its per-category decisions, carried in the reviewed verdict) and, when a
candidate ran in shadow, the candidate's verdict. A category counts as flagged when the policy did
not allow it (escalate or block: either sends it to someone). ``ANY`` is the binary view: an
upload is unsafe when it has any label, flagged when any category is.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

__all__ = ["ANY", "Confusion", "LabelledComparison"]

ANY = "any"


@dataclass
class Confusion:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def add(self, flagged: bool, labelled: bool) -> str:
        outcome = ("tp" if labelled else "fp") if flagged else ("fn" if labelled else "tn")
        setattr(self, outcome, getattr(self, outcome) + 1)
        return outcome

    @property
    def precision(self) -> float | None:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else None

    @property
    def recall(self) -> float | None:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else None


class LabelledComparison:
    """Confusion counts keyed by (candidate, side, category); side is ``live`` or ``shadow``."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, str], Confusion] = {}

    def observe(
        self,
        candidate: str,
        codes: Iterable[str],
        labels: Iterable[str],
        live_flags: Iterable[str],
        shadow_flags: Iterable[str],
    ) -> list[tuple[str, str, str, str]]:
        """Count one reviewed upload; returns (candidate, side, category, outcome) per count."""
        truth = set(labels)
        counted = []
        for side, flags in (("live", set(live_flags)), ("shadow", set(shadow_flags))):
            for code in [*codes, ANY]:
                flagged = bool(flags) if code == ANY else code in flags
                labelled = bool(truth) if code == ANY else code in truth
                key = (candidate, side, code)
                outcome = self.counts.setdefault(key, Confusion()).add(flagged, labelled)
                counted.append((*key, outcome))
        return counted

    def items(self) -> Iterator[tuple[tuple[str, str, str], Confusion]]:
        yield from self.counts.items()
