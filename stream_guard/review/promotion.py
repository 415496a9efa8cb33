"""Promoting a candidate policy: does it beat the live one on labelled data, and the swap itself.

The rule (pure, table-tested): on the reviewers' labelled manifest, scored through Triton by both
policies, the candidate's binary accuracy must exceed the live policy's by more than ``min_gain``
and its recall (unsafe uploads flagged) must not fall more than ``max_recall_drop`` below the
live one's. Escalations count as flagged: an escalated safe upload costs a person's time, an
escalated unsafe one is caught.

The swap writes the candidate's text over the live policy file atomically (a new file renamed
over the old one), which is what the workers' hot reload watches: they compile or find the head
for the new version and switch between batches, without a restart and without losing an upload.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from stream_guard.errors import ConfigError
from stream_guard.policy.model import Policy, load_policy, parse_policy
from stream_guard.quality.metrics import EvalReport
from stream_guard.settings import Settings

__all__ = ["Judgement", "judge", "live_policy_file", "replace_policy_file"]


@dataclass(frozen=True)
class Judgement:
    beats: bool
    reasons: list[str]
    live_accuracy: float
    candidate_accuracy: float
    live_recall: float | None
    candidate_recall: float | None


def judge(
    live: EvalReport, candidate: EvalReport, *, min_gain: float = 0.0, max_recall_drop: float = 0.0
) -> Judgement:
    la, ca = live.binary.accuracy, candidate.binary.accuracy
    lr, cr = live.binary.recall, candidate.binary.recall
    reasons = []
    if not ca > la + min_gain:
        reasons.append(
            f"binary accuracy {ca:.3f} does not beat the live {la:.3f} by more than {min_gain:g}"
        )
    if lr is not None and (cr is None or cr < lr - max_recall_drop):
        reasons.append(
            f"recall {_fmt(cr)} falls more than {max_recall_drop:g} below the live {lr:.3f}"
        )
    return Judgement(not reasons, reasons, la, ca, lr, cr)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def live_policy_file(settings: Settings, policy_id: str) -> Path:
    """The configured policy file that declares ``policy_id`` (the default or a tenant's)."""
    for path in dict.fromkeys([settings.policy.path, *settings.policy.tenants.values()]):
        if load_policy(path).policy_id == policy_id:
            return path
    raise ConfigError(
        f"no configured policy file declares policy_id {policy_id!r} "
        "(STREAM_GUARD_POLICY__PATH, STREAM_GUARD_POLICY__TENANTS): pass --live"
    )


def replace_policy_file(candidate_text: str, candidate: Policy, live_path: Path) -> Policy:
    """Write the candidate over ``live_path`` atomically; returns the policy read back there.

    Checked first: read from the live file's folder, the text must make the candidate's exact
    version (a relative ``pack`` would otherwise point elsewhere and make another head)."""
    there = parse_policy(candidate_text, source=str(live_path), base=live_path.resolve().parent)
    if there.effective_version != candidate.effective_version:
        raise ConfigError(
            f"at {live_path} the candidate reads as {there.effective_version}, not "
            f"{candidate.effective_version} (a relative `pack` resolves elsewhere): "
            "use builtin:<name> or an absolute pack path"
        )
    fd, tmp = tempfile.mkstemp(dir=live_path.parent, prefix=f".{live_path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(candidate_text)
        if live_path.exists():
            os.chmod(tmp, live_path.stat().st_mode & 0o777)
        os.replace(tmp, live_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return load_policy(live_path)
