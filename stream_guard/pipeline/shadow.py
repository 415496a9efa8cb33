"""Shadow policies: a candidate policy (or head version) scored beside the live one, never acting.

The fast worker hands every finished batch to :meth:`ShadowScorer.submit` (after its own outputs
are acknowledged, so the live path never waits for the shadow). A background task scores the
sampled uploads again through a second :class:`~stream_guard.pipeline.moderator.Moderator` whose
registry holds the candidate's head, publishes the candidate's verdicts to the shadow topic, and
counts how the two compare: agreement on the upload's decision, and the decisions and flagged
categories of each side (flag rates). Its escalations and dead letters are dropped: it never
acts. The reviewer-label comparison (precision / recall) is made by the review worker, which
reads the shadow topic.

The candidate is ``shadow.policy`` (a policy file, watched like the live ones: edit or replace it
and the shadow follows without a restart), optionally pinned to ``shadow.head_version``; with
only a head version, the candidate is the default live policy served by that version. Only
uploads whose live verdict was made under the candidate's ``policy_id`` are shadowed. When the
candidate is what the live policy serves (after ``stream-guard policy promote``), nothing is
scored twice.

Cost: the shadowed uploads are fetched, decoded and embedded a second time. ``shadow.sample_rate``
bounds it (by a hash of the upload id, so one upload is always in or out), and at most
``shadow.max_pending`` batches wait: more are skipped and counted, never queued without end.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from prometheus_client import Counter, Gauge

from stream_guard.errors import StreamGuardError, TransientError
from stream_guard.events import Decision, Verdict
from stream_guard.media.storage import ObjectStore
from stream_guard.pipeline.moderator import Moderator
from stream_guard.pipeline.records import Deferred, Output, Record, Result
from stream_guard.policy.heads import resolve_head
from stream_guard.policy.model import load_policy
from stream_guard.policy.registry import ActiveHead, PolicyRegistry
from stream_guard.settings import Settings
from stream_guard.triton import GuardModels

__all__ = ["ShadowScorer", "candidate_label", "compare", "sampled"]

log = logging.getLogger(__name__)

Publish = Callable[[Sequence[Output]], Awaitable[None]]

UPLOADS = Counter(
    "stream_guard_shadow_uploads_total",
    "Uploads scored by live and shadow policy, by whether their decisions agree",
    ["policy_id", "candidate", "agreement"],
)
DECISIONS = Counter(
    "stream_guard_shadow_decisions_total",
    "Decisions of each side on the shadowed uploads",
    ["policy_id", "candidate", "side", "decision"],
)
FLAGS = Counter(
    "stream_guard_shadow_flags_total",
    "Categories flagged (not allowed) by each side on the shadowed uploads",
    ["policy_id", "candidate", "side", "category"],
)
SKIPPED = Counter(
    "stream_guard_shadow_skipped_total", "Uploads the shadow did not score", ["reason"]
)
CANDIDATE = Gauge(
    "stream_guard_shadow_candidate", "The candidate being shadowed (1)", ["policy_id", "candidate"]
)


def candidate_label(head: ActiveHead) -> str:
    return f"{head.policy.effective_version}@{head.model_version}"


def sampled(upload_id: str, rate: float) -> bool:
    """Whether an upload is in the sample; stable per upload id."""
    if rate >= 1.0:
        return True
    digest = int.from_bytes(hashlib.sha256(upload_id.encode()).digest()[:8], "big")
    return digest / 2**64 < rate


def compare(live: Verdict, shadow: Verdict) -> tuple[bool, list[tuple[str, str]]]:
    """Whether the two decisions agree, and (side, category) per flagged category."""
    flags = [
        (side, c.code)
        for side, v in (("live", live), ("shadow", shadow))
        for c in v.categories
        if c.decision != Decision.ALLOW
    ]
    return live.decision == shadow.decision, flags


class ShadowScorer:
    def __init__(
        self,
        settings: Settings,
        models: GuardModels,
        store: ObjectStore,
        publish: Publish,
    ) -> None:
        self.settings = settings
        self.models = models
        self.store = store
        self.publish = publish
        self.current: tuple[ActiveHead, Moderator] | None = None
        self._retired: list[Moderator] = []
        self._mtime: int | None = None
        self._queue: asyncio.Queue[list[tuple[Record, Result]]] = asyncio.Queue(
            settings.shadow.max_pending
        )
        self._tasks: list[asyncio.Task] = []

    @property
    def path(self) -> Path | None:
        s = self.settings
        if s.shadow.policy is not None:
            return s.shadow.policy
        return s.policy.path if s.shadow.head_version is not None else None

    @staticmethod
    def wanted(settings: Settings) -> bool:
        return settings.shadow.policy is not None or settings.shadow.head_version is not None

    def start(self) -> None:
        """Start scoring and watching the candidate file in the background: resolving (maybe
        compiling) a candidate never delays the live path or its policy reloads."""
        self._tasks = [asyncio.ensure_future(self._run()), asyncio.ensure_future(self._watch())]

    async def _watch(self) -> None:
        while True:
            try:
                await self.reload()
            except Exception as e:  # never let the watcher die: log and look again later
                log.error("shadow: candidate not reloaded: %r", e)
            await asyncio.sleep(self.settings.policy.reload_interval_s)

    async def reload(self) -> None:
        """Resolve the candidate again when its file changed (or could not be served yet)."""
        path = self.path
        if path is None:
            return
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            mtime = None
        if mtime == self._mtime:
            return
        self._mtime = mtime
        if mtime is None:
            log.info("shadow: no candidate policy at %s yet", path)
            return
        try:
            head = await self._resolve(path)
        except TransientError as e:
            self._mtime = None  # try again on the next tick
            log.warning("shadow: candidate %s not served yet: %s", path, e)
            return
        except StreamGuardError as e:
            log.error("shadow: candidate %s refused, keeping the previous one: %s", path, e)
            return
        self._adopt(head)

    async def _resolve(self, path: Path) -> ActiveHead:
        loop = asyncio.get_running_loop()
        policy = await loop.run_in_executor(None, load_policy, path)
        t = self.settings.triton
        return await resolve_head(
            policy,
            self.models,
            prefix=t.head_model,
            repo=t.model_repository,
            version=self.settings.shadow.head_version,
        )

    def _adopt(self, head: ActiveHead) -> None:
        if self.current is not None:
            old, moderator = self.current
            CANDIDATE.labels(old.policy.policy_id, candidate_label(old)).set(0)
            self._retired.append(moderator)
        moderator = Moderator(self.settings, self.models, self.store, PolicyRegistry(head))
        self.current = (head, moderator)
        CANDIDATE.labels(head.policy.policy_id, candidate_label(head)).set(1)
        log.info("shadow: scoring candidate %s beside the live policy", candidate_label(head))

    # -- the hook the fast worker calls -----------------------------------------------------

    def submit(self, records: Sequence[Record], results: Sequence[Result]) -> None:
        """Queue a finished batch for the shadow; never waits, never raises."""
        if self.current is None:
            return
        rate = self.settings.shadow.sample_rate
        pairs = [
            (rec, res)
            for rec, res in zip(records, results, strict=True)
            if res.upload_id and res.outcome != "dlq" and sampled(res.upload_id, rate)
        ]
        if not pairs:
            return
        try:
            self._queue.put_nowait(pairs)
        except asyncio.QueueFull:
            SKIPPED.labels("busy").inc(len(pairs))

    # -- the background task ----------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            pairs = await self._queue.get()
            for moderator in self._retired:
                moderator.close()
            self._retired.clear()
            try:
                await self._score(pairs)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the shadow never takes the worker down
                SKIPPED.labels("error").inc(len(pairs))
                log.warning("shadow batch of %d not scored: %r", len(pairs), e)

    async def _score(self, pairs: list[tuple[Record, Result]]) -> None:
        assert self.current is not None
        head, moderator = self.current
        live: dict[str, Verdict] = {}
        chosen: list[Record] = []
        for record, result in pairs:
            verdict = _verdict_of(result)
            if verdict is None or verdict.policy_id != head.policy.policy_id:
                continue
            if (verdict.policy_version, verdict.model_version) == (
                head.policy.effective_version,
                str(head.version),
            ) and verdict.model_name == head.model_name:
                SKIPPED.labels("candidate_is_live").inc()
                continue
            live[verdict.upload_id] = verdict
            chosen.append(record)
        if not chosen:
            return
        outputs = []
        for result in await moderator.process(chosen):
            if isinstance(result, Deferred):  # its image is unreachable now: not compared
                SKIPPED.labels("deferred").inc()
                continue
            shadow = _verdict_of(result)
            if shadow is None or shadow.upload_id not in live:
                SKIPPED.labels(result.outcome).inc()
                continue
            self._count(head, live[shadow.upload_id], shadow)
            outputs.append(
                Output(
                    "shadow",
                    shadow.upload_id.encode(),
                    shadow.to_bytes(),
                    result.outputs[0].headers,
                )
            )
        await self.publish(outputs)

    @staticmethod
    def _count(head: ActiveHead, live: Verdict, shadow: Verdict) -> None:
        policy_id, candidate = head.policy.policy_id, candidate_label(head)
        agree, flags = compare(live, shadow)
        UPLOADS.labels(policy_id, candidate, "agree" if agree else "disagree").inc()
        for side, v in (("live", live), ("shadow", shadow)):
            DECISIONS.labels(policy_id, candidate, side, str(v.decision)).inc()
        for side, code in flags:
            FLAGS.labels(policy_id, candidate, side, code).inc()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for moderator in self._retired:
            moderator.close()
        if self.current is not None:
            self.current[1].close()


def _verdict_of(result: Result) -> Verdict | None:
    for output in result.outputs:
        if output.role == "verdicts":
            return Verdict.model_validate_json(output.value)
    return None
