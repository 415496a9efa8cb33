"""The review queue the console shows, built from three topics (pure state, no I/O).

- ``guard.review``: verdicts needing a person, the items of the queue;
- ``guard.escalations``: the uploads behind them (text, image references, fast evidence), joined
  by upload id. An escalation is published before its review record, so recent escalations are
  kept (``index_size`` of them, oldest dropped first) until their review record arrives;
- ``guard.review.decisions``: decisions made (by this console or another replica), which settle
  items. Settled upload ids are remembered (bounded), so a review record redelivered after its
  decision does not bring the item back.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from stream_guard.events import Escalation, UploadEvent, Verdict

__all__ = ["QueueItem", "ReviewQueue", "SETTLED_MEMORY"]

SETTLED_MEMORY = 200_000


@dataclass
class QueueItem:
    verdict: Verdict  # the reasoning tier's verdict with decision `review`
    escalation: Escalation | None = None

    @property
    def upload_id(self) -> str:
        return self.verdict.upload_id

    @property
    def upload(self) -> UploadEvent | None:
        return self.escalation.upload if self.escalation is not None else None


class ReviewQueue:
    def __init__(self, index_size: int, settled_memory: int = SETTLED_MEMORY) -> None:
        self.index_size = index_size
        self.settled_memory = settled_memory
        self._escalations: OrderedDict[str, Escalation] = OrderedDict()
        self._items: OrderedDict[str, QueueItem] = OrderedDict()
        self._settled: OrderedDict[str, str] = OrderedDict()

    def add_escalation(self, escalation: Escalation) -> None:
        upload_id = escalation.upload.upload_id
        item = self._items.get(upload_id)
        if item is not None:
            item.escalation = escalation
            return
        if upload_id in self._settled:
            return
        self._escalations[upload_id] = escalation
        self._escalations.move_to_end(upload_id)
        while len(self._escalations) > self.index_size:
            self._escalations.popitem(last=False)

    def add_review(self, verdict: Verdict) -> None:
        upload_id = verdict.upload_id
        if upload_id in self._settled:
            return
        current = self._items.get(upload_id)
        escalation = self._escalations.pop(upload_id, None)
        if current is not None:  # redelivered: keep the place in the queue, refresh the record
            current.verdict = verdict
            current.escalation = current.escalation or escalation
            return
        self._items[upload_id] = QueueItem(verdict, escalation)

    def settle(self, upload_id: str, decision_id: str) -> None:
        self._items.pop(upload_id, None)
        self._escalations.pop(upload_id, None)
        self._settled[upload_id] = decision_id
        self._settled.move_to_end(upload_id)
        while len(self._settled) > self.settled_memory:
            self._settled.popitem(last=False)

    def is_settled(self, upload_id: str) -> bool:
        return upload_id in self._settled

    def item(self, upload_id: str) -> QueueItem | None:
        return self._items.get(upload_id)

    def pending(self) -> list[QueueItem]:
        """Items waiting for a person, oldest first."""
        return list(self._items.values())

    def __len__(self) -> int:
        return len(self._items)
