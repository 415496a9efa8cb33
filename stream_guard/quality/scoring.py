"""Scoring a labelled manifest through the fast path, as the worker would.

Every row becomes an UploadEvent, its images are decoded and validated by the worker's own
decoder (``Moderator.decode_local``; s3:// images are fetched with the worker's object store
first), and ``Moderator.judge`` scores it through Triton (text tower, image tower, the policy's
compiled head) and applies the policy's thresholds. Rows are sent concurrently, so Triton's
dynamic batcher batches them as it does the worker's traffic.
"""

from __future__ import annotations

import asyncio
import logging
import mimetypes
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stream_guard.errors import PermanentError, StreamGuardError, TransientError
from stream_guard.events import ImageRef, UploadEvent, Verdict
from stream_guard.media.storage import ObjectStore
from stream_guard.pipeline.moderator import Moderator
from stream_guard.policy.heads import resolve_head
from stream_guard.policy.model import Policy
from stream_guard.policy.registry import ActiveHead, PolicyRegistry
from stream_guard.quality.manifest import ManifestRow, label_matrix
from stream_guard.quality.metrics import policy_decisions
from stream_guard.retry import backoff_delays
from stream_guard.settings import Settings
from stream_guard.triton import GuardModels

__all__ = ["DEFAULT_CONCURRENCY", "RowError", "ScoredManifest", "score_manifest"]

DEFAULT_CONCURRENCY = 32
log = logging.getLogger(__name__)


class RowError(StreamGuardError):
    """A manifest row could not be scored (bad or missing image); names the row to fix."""


@dataclass
class ScoredManifest:
    """A manifest's rows with their truth, the fast path's scores and decisions."""

    rows: list[ManifestRow]
    codes: list[str]
    labels: np.ndarray  # [n, C] bool
    scores: np.ndarray  # [n, C] as published in the verdicts (clipped, 4 decimals)
    decisions: np.ndarray  # [n, C] str, Policy.decide per category
    verdicts: list[str]  # the upload decision of each row
    policy_id: str
    policy_version: str
    model_name: str
    model_version: int
    seconds: float
    skipped: list[dict[str, Any]] = field(default_factory=list)


class _Scorer:
    """Scores rows concurrently (bounded) with one moderator."""

    def __init__(
        self,
        settings: Settings,
        moderator: Moderator,
        *,
        concurrency: int,
        skip_bad_rows: bool,
        on_row: Callable[[], None] | None,
    ) -> None:
        self.settings = settings
        self.moderator = moderator
        self.gate = asyncio.Semaphore(max(1, concurrency))
        self.skip_bad_rows = skip_bad_rows
        self.on_row = on_row

    async def image(self, uri: str) -> np.ndarray:
        if uri.startswith("s3://"):
            obj = await self.moderator.store.fetch(ImageRef(uri=uri))
            data, ctype = obj.data, obj.content_type
        else:
            path = Path(uri)
            try:
                data = await asyncio.to_thread(path.read_bytes)
            except OSError as e:
                raise RowError(f"cannot read image {path}: {e}") from e
            ctype = mimetypes.guess_type(path.name)[0]
        return await asyncio.to_thread(self.moderator.decode_local, data, ctype)

    async def judge(self, upload: UploadEvent, images: list[np.ndarray]) -> Any:
        # Transient Triton faults (a full queue under load) are retried with the worker's
        # bounded backoff; only a fault that outlasts it fails the run.
        for delay in [*backoff_delays(self.settings.retry), None]:
            try:
                return await self.moderator.judge(upload, images)
            except TransientError:
                if delay is None:
                    raise
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def one(self, row: ManifestRow) -> Verdict | dict[str, Any]:
        async with self.gate:
            try:
                images = [await self.image(u) for u in row.images]
                upload = UploadEvent.model_validate(
                    {
                        "upload_id": row.id,
                        "images": [
                            {"uri": u if u.startswith("s3://") else f"s3://local/{row.id}/{n}"}
                            for n, u in enumerate(row.images)
                        ],
                        "text": row.text_fields,
                    }
                )
                result = await self.judge(upload, images)
            except (PermanentError, RowError, ValueError) as e:
                where = f"row {row.id} (line {row.line})"
                if not self.skip_bad_rows:
                    raise RowError(f"{where}: {e}; fix it or pass --skip-bad-rows") from e
                return {"id": row.id, "line": row.line, "error": str(e)}
            finally:
                if self.on_row is not None:
                    self.on_row()
            return Verdict.model_validate_json(result.outputs[0].value)

    async def all(self, rows: Sequence[ManifestRow]) -> list[Verdict | dict[str, Any]]:
        tasks = [asyncio.ensure_future(self.one(r)) for r in rows]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:  # a failed row stops the run: nothing keeps scoring behind it
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise


async def score_manifest(
    settings: Settings,
    policy: Policy,
    rows: Sequence[ManifestRow],
    *,
    head_version: int | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    skip_bad_rows: bool = False,
    on_row: Callable[[], None] | None = None,
) -> ScoredManifest:
    """Score every row through Triton as the worker would; see the module docstring."""
    if policy.ocr and any(r.images for r in rows):
        # Moderator.judge scores decoded images without the OCR stage the worker runs for
        # `ocr: true` policies; say so rather than report numbers for a different path.
        log.warning(
            "policy %s has ocr: true, but eval scores images without OCR (Moderator.judge "
            "has no OCR stage): text inside images is not read",
            policy.policy_id,
        )
    models = GuardModels(settings.triton)
    moderator = None
    try:
        head = await resolve_head(
            policy,
            models,
            prefix=settings.triton.head_model,
            repo=settings.triton.model_repository,
            version=head_version,
        )
        moderator = Moderator(settings, models, ObjectStore(settings.s3), PolicyRegistry(head))
        scorer = _Scorer(
            settings,
            moderator,
            concurrency=concurrency,
            skip_bad_rows=skip_bad_rows,
            on_row=on_row,
        )
        started = time.perf_counter()
        outcomes = await scorer.all(rows)
        seconds = time.perf_counter() - started
    finally:
        if moderator is not None:
            moderator.close()
        await models.close()
    return _summarise(policy, head, rows, outcomes, seconds)


def _summarise(
    policy: Policy,
    head: ActiveHead,
    rows: Sequence[ManifestRow],
    outcomes: list[Verdict | dict[str, Any]],
    seconds: float,
) -> ScoredManifest:
    kept = [(r, v) for r, v in zip(rows, outcomes, strict=True) if not isinstance(v, dict)]
    skipped = [v for v in outcomes if isinstance(v, dict)]
    if not kept:
        raise RowError("no manifest row could be scored")
    codes = policy.codes
    scores = np.array([[_by_code(v)[c].score for c in codes] for _, v in kept], dtype=np.float64)
    # The verdicts' decisions, recomputed from their scores by the same rule (Policy.decide).
    decisions = policy_decisions(policy, codes, scores)
    return ScoredManifest(
        rows=[r for r, _ in kept],
        codes=codes,
        labels=label_matrix([r for r, _ in kept], codes),
        scores=scores,
        decisions=decisions,
        verdicts=[str(v.decision) for _, v in kept],
        policy_id=policy.policy_id,
        policy_version=policy.effective_version,
        model_name=head.model_name,
        model_version=head.version,
        seconds=seconds,
        skipped=skipped,
    )


def _by_code(verdict: Any) -> dict[str, Any]:
    return {c.code: c for c in verdict.categories}
