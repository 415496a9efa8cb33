"""Where a guard fails: metrics per slice of a labelled set, and its worst mistakes.

A manifest row may name a ``slice`` (a style, a source, a language: "negated", "counter_speech",
"leetspeak"...). ``slice_summaries`` reports the headline numbers of each slice on its own, so a
good average cannot hide a slice the guard gets wrong. ``worst_errors`` lists the mistakes an
operator should read first:

- false positives: safe rows the guard flagged, highest score first (the most confident
  mistakes);
- false negatives: unsafe rows it let through, lowest score on their true categories first
  (the ones it was furthest from catching).

"Flagged" follows the report's ``escalate_as``: with ``unsafe`` (the default) an escalated row
counts as flagged. Pure numpy, no I/O; table-tested in ``tests/unit/test_quality_failures.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from stream_guard.quality.metrics import EscalateAs, average_precision, evaluate

__all__ = [
    "ErrorRow",
    "NO_SLICE",
    "SliceSummary",
    "TEXT_CHARS",
    "format_slices",
    "format_worst",
    "slice_summaries",
    "worst_errors",
]

NO_SLICE = "(no slice)"
TEXT_CHARS = 240  # of each listed row's text, in the reports
TOP_SCORES = 3


@dataclass(frozen=True)
class SliceSummary:
    name: str
    n: int
    n_safe: int
    accuracy: float
    tpr: float | None
    fpr: float | None
    f1: float | None
    escalation_rate: float | None
    any_unsafe_auprc: float | None  # a row's highest category score against unsafe / safe
    mean_auprc: float | None


@dataclass(frozen=True)
class ErrorRow:
    id: str
    slice: str | None
    text: str
    labels: list[str]
    decision: str
    score: float  # FP: the highest score; FN: the highest score on its true categories
    top: dict[str, float]  # the row's highest category scores

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _slices(slices: Sequence[str | None]) -> dict[str, np.ndarray]:
    names = [s or NO_SLICE for s in slices]
    return {n: np.array([x == n for x in names]) for n in dict.fromkeys(names)}


def slice_summaries(
    codes: Sequence[str],
    slices: Sequence[str | None],
    labels: npt.ArrayLike,
    scores: npt.ArrayLike,
    decisions: npt.ArrayLike,
    *,
    escalate_as: EscalateAs = "unsafe",
) -> list[SliceSummary]:
    """One summary per slice, in first-seen order; empty when no row names a slice."""
    if not any(slices):
        return []
    y, s, d = np.asarray(labels, bool), np.asarray(scores, float), np.asarray(decisions)
    out = []
    for name, mask in _slices(slices).items():
        r = evaluate(codes, y[mask], s[mask], d[mask], escalate_as=escalate_as)
        out.append(
            SliceSummary(
                name=name,
                n=r.n,
                n_safe=r.n_safe,
                accuracy=r.binary.accuracy,
                tpr=r.binary.tpr,
                fpr=r.binary.fpr,
                f1=r.binary.f1,
                escalation_rate=r.escalation_rate,
                any_unsafe_auprc=average_precision(y[mask].any(axis=1), s[mask].max(axis=1)),
                mean_auprc=r.mean_auprc,
            )
        )
    return out


def _row(i: int, score: float, ctx: dict[str, Any]) -> ErrorRow:
    codes, s = ctx["codes"], ctx["scores"][i]
    top = np.argsort(-s, kind="stable")[:TOP_SCORES]
    text = ctx["texts"][i]
    return ErrorRow(
        id=ctx["ids"][i],
        slice=ctx["slices"][i],
        text=text if len(text) <= TEXT_CHARS else text[: TEXT_CHARS - 1] + "…",
        labels=[c for c, f in zip(codes, ctx["labels"][i], strict=True) if f],
        decision=ctx["verdicts"][i],
        score=round(float(score), 4),
        top={codes[j]: round(float(s[j]), 4) for j in top},
    )


def worst_errors(
    codes: Sequence[str],
    ids: Sequence[str],
    texts: Sequence[str],
    slices: Sequence[str | None],
    labels: npt.ArrayLike,
    scores: npt.ArrayLike,
    verdicts: Sequence[str],
    *,
    k: int = 10,
    escalate_as: EscalateAs = "unsafe",
) -> dict[str, list[ErrorRow]]:
    """The ``k`` worst false positives and false negatives (see the module docstring);
    ``verdicts`` are the rows' upload decisions (allow / escalate / block / review)."""
    y, s = np.asarray(labels, bool), np.asarray(scores, float)
    flagged_as = ("block", "escalate", "review") if escalate_as == "unsafe" else ("block",)
    flagged = np.isin(np.char.lower(np.asarray(verdicts, str)), flagged_as)
    unsafe = y.any(axis=1)
    ctx = {
        "codes": list(codes),
        "ids": list(ids),
        "texts": list(texts),
        "slices": list(slices),
        "labels": y,
        "scores": s,
        "verdicts": list(verdicts),
    }
    fp = np.nonzero(~unsafe & flagged)[0]
    fp_score = s[fp].max(axis=1) if len(fp) else np.zeros(0)
    fn = np.nonzero(unsafe & ~flagged)[0]
    fn_score = np.where(y[fn], s[fn], -np.inf).max(axis=1) if len(fn) else np.zeros(0)
    fp_order = fp[np.argsort(-fp_score, kind="stable")][:k]
    fn_order = fn[np.argsort(fn_score, kind="stable")][:k]
    return {
        "false_positives": [_row(i, s[i].max(), ctx) for i in fp_order],
        "false_negatives": [_row(i, np.where(y[i], s[i], -np.inf).max(), ctx) for i in fn_order],
    }


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def format_slices(summaries: Sequence[SliceSummary]) -> str:
    if not summaries:
        return ""
    width = max(10, *(len(s.name) for s in summaries))
    head = ["n", "safe", "acc", "TPR", "FPR", "F1", "escal", "AUPRC*", "mAUPRC"]
    lines = [
        "per slice (AUPRC*: any-unsafe, a row's highest score; mAUPRC: mean per category)",
        f"{'slice':<{width}} " + " ".join(f"{h:>7}" for h in head),
    ]
    for s in summaries:
        cells = [str(s.n), str(s.n_safe)]
        cells += [
            _fmt(v)
            for v in (
                s.accuracy,
                s.tpr,
                s.fpr,
                s.f1,
                s.escalation_rate,
                s.any_unsafe_auprc,
                s.mean_auprc,
            )
        ]
        lines.append(f"{s.name:<{width}} " + " ".join(f"{c:>7}" for c in cells))
    return "\n".join(lines)


def format_worst(worst: dict[str, list[ErrorRow]]) -> str:
    titles = {
        "false_positives": "worst false positives (safe, flagged; highest score first)",
        "false_negatives": "worst false negatives (unsafe, let through; lowest score first)",
    }
    lines: list[str] = []
    for key, title in titles.items():
        rows = worst.get(key, [])
        lines.append(f"{title}: {len(rows)}" if rows else f"{title}: none")
        for r in rows:
            top = " ".join(f"{c}={v:.2f}" for c, v in r.top.items())
            where = f" [{r.slice}]" if r.slice else ""
            truth = ",".join(r.labels) or "safe"
            text = " ".join(r.text.split())
            lines.append(
                f"  {r.score:.3f} {r.decision:<8} {r.id}{where} truth={truth} top: {top}\n"
                f"      {text}"
            )
    return "\n".join(lines)
