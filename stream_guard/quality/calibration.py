"""Per-category allow / block thresholds from a labelled set, and writing them into a policy.

A category's score sorts an upload into allow (score < allow), escalate (allow <= score < block)
or block (score >= block); an upload is blocked if any category blocks, else escalated if any
escalates (``Policy.decide``). Calibration picks, for each category:

- ``block``: the lowest threshold whose precision (positives among scores >= threshold) reaches
  ``target_precision``, nudged up to the lowest positive score at or above it (same recall,
  precision no lower). When no threshold reaches the target, or the category has no positives,
  ``block`` is ``fallback_block`` and the category is reported as unreachable.
- ``allow``: as low as the escalation budget allows, to catch (escalate or block) as many
  positives as possible, but never lower than needed: each ``allow`` sits on a positive's score.
  Escalation is counted per upload, across all categories, as production does, and must stay
  <= ``max_escalation_rate``. The search is greedy: starting with allow = block everywhere, it
  repeatedly lowers the category whose next positive is caught at the fewest extra escalated
  uploads per positive, until no further step fits the budget.

Scores are clipped to [0, 1] and rounded to 4 decimals first, exactly as ``Policy.decide`` does,
so the chosen thresholds reproduce the reported numbers once written into a policy.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import yaml

from stream_guard.errors import PolicyError
from stream_guard.quality.metrics import as_arrays

__all__ = [
    "CalibrationResult",
    "CategoryCalibration",
    "DECIMALS",
    "DEFAULT_GRID",
    "TradeoffRow",
    "apply_to_policy_yaml",
    "calibrate",
    "format_calibration",
]

DECIMALS = 4  # Policy.decide rounds scores to 4 decimals before comparing them
DEFAULT_GRID = tuple(round(0.05 * k, 2) for k in range(1, 20))


@dataclass(frozen=True)
class TradeoffRow:
    """What one threshold would give: precision and recall of scores >= threshold, and the
    upload escalation rate if this category's allow were min(threshold, block), the others
    staying at their chosen thresholds."""

    threshold: float
    precision: float | None
    recall: float | None
    escalation_rate: float


@dataclass(frozen=True)
class CategoryCalibration:
    code: str
    allow: float
    block: float
    n_positives: int
    block_reachable: bool
    note: str
    precision_at_block: float | None
    recall_at_block: float | None
    recall_at_allow: float | None
    escalation_rate: float  # uploads escalated with this category in its escalate band
    tradeoff: tuple[TradeoffRow, ...]


@dataclass(frozen=True)
class CalibrationResult:
    codes: tuple[str, ...]
    n: int
    target_precision: float
    max_escalation_rate: float
    categories: tuple[CategoryCalibration, ...]
    escalation_rate: float
    block_rate: float
    recall_at_block: float | None  # micro: over all (upload, category) positives
    recall_at_allow: float | None

    @property
    def unreachable(self) -> list[str]:
        return [c.code for c in self.categories if not c.block_reachable]

    def thresholds(self) -> dict[str, tuple[float, float]]:
        """(allow, block) by code."""
        return {c.code: (c.allow, c.block) for c in self.categories}

    def category(self, code: str) -> CategoryCalibration:
        for c in self.categories:
            if c.code == code:
                return c
        raise KeyError(code)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "target_precision": self.target_precision,
            "max_escalation_rate": self.max_escalation_rate,
            "escalation_rate": self.escalation_rate,
            "block_rate": self.block_rate,
            "recall_at_block": self.recall_at_block,
            "recall_at_allow": self.recall_at_allow,
            "unreachable": self.unreachable,
            "categories": {
                c.code: {
                    "allow": c.allow,
                    "block": c.block,
                    "n_positives": c.n_positives,
                    "block_reachable": c.block_reachable,
                    "note": c.note,
                    "precision_at_block": c.precision_at_block,
                    "recall_at_block": c.recall_at_block,
                    "recall_at_allow": c.recall_at_allow,
                    "escalation_rate": c.escalation_rate,
                    "tradeoff": [
                        {
                            "threshold": r.threshold,
                            "precision": r.precision,
                            "recall": r.recall,
                            "escalation_rate": r.escalation_rate,
                        }
                        for r in c.tradeoff
                    ],
                }
                for c in self.categories
            },
        }

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def calibrate(
    codes: Sequence[str],
    labels: npt.ArrayLike,
    scores: npt.ArrayLike,
    *,
    target_precision: float = 0.9,
    max_escalation_rate: float = 0.05,
    fallback_block: float = 1.0,
    grid: Sequence[float] | None = None,
) -> CalibrationResult:
    """Choose allow / block thresholds per category (see the module docstring for the rules).

    ``fallback_block`` is used where ``target_precision`` is unreachable: the default 1.0 means
    "do not auto-block this category; escalate what the budget allows". ``grid``: the thresholds
    of the trade-off tables (the chosen allow and block are always added).
    """
    if not 0.0 < target_precision <= 1.0:
        raise ValueError(f"target_precision must be in (0, 1], got {target_precision}")
    if not 0.0 <= max_escalation_rate <= 1.0:
        raise ValueError(f"max_escalation_rate must be in [0, 1], got {max_escalation_rate}")
    if not 0.0 <= fallback_block <= 1.0:
        raise ValueError(f"fallback_block must be in [0, 1], got {fallback_block}")
    codes = tuple(codes)
    y, raw = as_arrays(codes, labels, scores)
    s: npt.NDArray[np.float64] = np.round(np.clip(raw, 0.0, 1.0), DECIMALS).astype(np.float64)
    n, n_cat = y.shape

    blocks: list[float] = []
    block_info: list[tuple[bool, str]] = []
    for j in range(n_cat):
        block, reachable, note = _block_threshold(y[:, j], s[:, j], target_precision)
        blocks.append(fallback_block if block is None else block)
        block_info.append((reachable, note))
    block_arr = np.asarray(blocks)
    blocked = np.any(s >= block_arr, axis=1)

    allows = _allow_thresholds(y, s, block_arr, blocked, max_escalation_rate)
    allow_arr = np.asarray(allows)
    band = (s >= allow_arr) & (s < block_arr)
    escalated = ~blocked & band.any(axis=1)

    grid_values = DEFAULT_GRID if grid is None else tuple(grid)
    categories = []
    for j, code in enumerate(codes):
        yj, sj = y[:, j], s[:, j]
        n_pos = int(yj.sum())
        others = ~blocked & np.delete(band, j, axis=1).any(axis=1)
        rows = []
        for t in sorted({round(float(t), DECIMALS) for t in (*grid_values, allows[j], blocks[j])}):
            in_band = ~blocked & (sj >= min(t, blocks[j])) & (sj < blocks[j])
            precision, recall = _precision_recall(yj, sj >= t)
            rows.append(TradeoffRow(t, precision, recall, float(np.mean(others | in_band))))
        p_block, r_block = _precision_recall(yj, sj >= blocks[j])
        _, r_allow = _precision_recall(yj, sj >= allows[j])
        reachable, note = block_info[j]
        categories.append(
            CategoryCalibration(
                code=code,
                allow=allows[j],
                block=blocks[j],
                n_positives=n_pos,
                block_reachable=reachable,
                note=note,
                precision_at_block=p_block,
                recall_at_block=r_block,
                recall_at_allow=r_allow,
                escalation_rate=float(np.mean(escalated & band[:, j])),
                tradeoff=tuple(rows),
            )
        )

    n_pos_all = int(y.sum())
    return CalibrationResult(
        codes=codes,
        n=n,
        target_precision=target_precision,
        max_escalation_rate=max_escalation_rate,
        categories=tuple(categories),
        escalation_rate=float(np.mean(escalated)),
        block_rate=float(np.mean(blocked)),
        recall_at_block=(int(np.sum(y & (s >= block_arr))) / n_pos_all) if n_pos_all else None,
        recall_at_allow=(int(np.sum(y & (s >= allow_arr))) / n_pos_all) if n_pos_all else None,
    )


def format_calibration(result: CalibrationResult, *, tradeoff: bool = True) -> str:
    """The chosen thresholds and, per category, the trade-off table."""
    lines = [
        f"uploads {result.n}; target precision {result.target_precision:g}, "
        f"max escalation rate {result.max_escalation_rate:g}",
        f"escalation rate {result.escalation_rate:.4f}  block rate {result.block_rate:.4f}  "
        f"recall at block {_fmt(result.recall_at_block)}  "
        f"recall at allow {_fmt(result.recall_at_allow)}",
        "",
        f"{'category':<16} {'allow':>7} {'block':>7} {'pos':>5} {'P@block':>8} {'R@block':>8} "
        f"{'R@allow':>8} {'escal':>7}  note",
    ]
    for c in result.categories:
        lines.append(
            f"{c.code:<16} {c.allow:>7.4f} {c.block:>7.4f} {c.n_positives:>5} "
            f"{_fmt(c.precision_at_block):>8} {_fmt(c.recall_at_block):>8} "
            f"{_fmt(c.recall_at_allow):>8} {c.escalation_rate:>7.4f}  {c.note}"
        )
    if tradeoff:
        for c in result.categories:
            lines += ["", f"{c.code}: threshold  precision  recall  escalation"]
            for r in c.tradeoff:
                mark = " <- block" if r.threshold == c.block else ""
                mark = " <- allow" if r.threshold == c.allow and not mark else mark
                lines.append(
                    f"  {r.threshold:>9.4f}  {_fmt(r.precision):>9}  {_fmt(r.recall):>6}  "
                    f"{r.escalation_rate:>10.4f}{mark}"
                )
    return "\n".join(lines)


def apply_to_policy_yaml(
    policy_yaml_text: str, result: CalibrationResult, *, skip_unreachable: bool = False
) -> str:
    """Return the policy YAML with ``thresholds: {allow, block}`` set on each calibrated category.

    Everything else (keys, their order, values) is kept, but this is a PyYAML load/dump round
    trip: comments, anchors and quoting style are lost, so review the diff before committing.
    The policy's ``version`` is not bumped; its effective version changes anyway through the
    content digest. ``skip_unreachable`` keeps the existing thresholds of categories whose
    target precision was unreachable instead of writing the fallback block. The result is
    validated as a policy; a category in ``result`` that the policy lacks raises PolicyError.
    """
    from stream_guard.policy.model import parse_policy

    try:
        data = yaml.safe_load(policy_yaml_text)
    except yaml.YAMLError as e:
        raise PolicyError(f"policy is not valid YAML: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("categories"), list):
        raise PolicyError("a policy is a YAML mapping with a 'categories' list")
    by_code = {c.code: c for c in result.categories}
    present = {c.get("code") for c in data["categories"] if isinstance(c, dict)}
    missing = sorted(set(by_code) - present)
    if missing:
        raise PolicyError(
            f"calibrated categories {missing} are not in the policy; calibrate against the "
            "policy's own categories"
        )
    for cat in data["categories"]:
        c = by_code.get(str(cat.get("code"))) if isinstance(cat, dict) else None
        if c is None or (skip_unreachable and not c.block_reachable):
            continue
        cat["thresholds"] = {"allow": float(c.allow), "block": float(c.block)}
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)
    parse_policy(text, source="calibrated policy")
    return text


def _block_threshold(
    y: npt.NDArray[np.bool_], s: npt.NDArray[np.float64], target: float
) -> tuple[float | None, bool, str]:
    n_pos = int(y.sum())
    if n_pos == 0:
        return None, False, "no positives: block unreachable, fallback used"
    order = np.argsort(s, kind="mergesort")[::-1]
    ss, yy = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(ss)), ss.size - 1]
    tps = np.cumsum(yy)[last]
    precision = tps / (last + 1)
    ok = np.flatnonzero(precision >= target - 1e-12)
    if ok.size == 0:
        best = int(np.argmax(precision))
        return (
            None,
            False,
            f"precision {target:g} unreachable (best {precision[best]:.4f} at "
            f"{ss[last[best]]:.4f}): fallback used",
        )
    lowest = float(ss[last[ok[-1]]])
    # dropping only negatives keeps recall and cannot lower precision
    block = float(np.min(s[y & (s >= lowest)]))
    return block, True, ""


def _allow_thresholds(
    y: npt.NDArray[np.bool_],
    s: npt.NDArray[np.float64],
    block: npt.NDArray[np.float64],
    blocked: npt.NDArray[np.bool_],
    max_rate: float,
) -> list[float]:
    n, n_cat = y.shape
    budget = int(np.floor(max_rate * n + 1e-9))
    allow = [float(b) for b in block]
    # the candidate allow levels: positives' scores below block, highest first
    levels = [
        sorted({float(v) for v in s[y[:, j] & (s[:, j] < block[j]), j]}, reverse=True)
        for j in range(n_cat)
    ]
    step = [0] * n_cat
    escalated = np.zeros(n, dtype=bool)
    used = 0
    while True:
        best: tuple[float, int, int, npt.NDArray[np.bool_]] | None = None
        for j in range(n_cat):
            if step[j] >= len(levels[j]):
                continue
            a = levels[j][step[j]]
            newly = (s[:, j] >= a) & (s[:, j] < allow[j])
            added = newly & ~blocked & ~escalated
            cost = int(added.sum())
            if used + cost > budget:
                continue
            gain = int(np.sum(newly & y[:, j]))
            ratio = gain / cost if cost else float("inf")
            if best is None or (ratio, gain) > (best[0], best[1]):
                best = (ratio, gain, j, added)
        if best is None:
            return allow
        _, _, j, added = best
        allow[j] = levels[j][step[j]]
        step[j] += 1
        escalated |= added
        used += int(added.sum())


def _precision_recall(
    y: npt.NDArray[np.bool_], flagged: npt.NDArray[np.bool_]
) -> tuple[float | None, float | None]:
    tp = int(np.sum(y & flagged))
    n_flagged, n_pos = int(flagged.sum()), int(y.sum())
    return (tp / n_flagged if n_flagged else None, tp / n_pos if n_pos else None)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"
