"""Guard quality on a labelled set: SafeVision's metrics, computed from scores and decisions.

Pure numpy (no scikit-learn): the tests cross-check every metric against scikit-learn, but the
serving environment does not carry it. Inputs are in ``codes`` order:

- ``labels`` [n, C] bool: the true categories of each upload (none = safe);
- ``scores`` [n, C] float: the fast path's per-category scores;
- ``decisions`` [n, C]: either predicted flags (bool) or per-category decisions
  (``Decision`` values: allow / escalate / block / review), for example from
  :func:`policy_decisions`. With decisions, escalations are reported, and ``escalate_as`` says
  whether an escalated category counts as flagged (``"unsafe"``: fast mode did not let it
  through) or not (``"safe"``: only blocks count).

Metrics follow SafeVision (shared/seeds/001): multi-class accuracy (the predicted set of
categories equals the true set), binary accuracy (unsafe if any category), FPR, F1, and per
category AUPRC, F1, TPR and FPR, where each category is the positive class and every other
upload, safe or not, is negative. A rate whose denominator is zero is ``None`` (``null`` in
JSON), never a made-up 0 or 1.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "BinaryMetrics",
    "BoolArray",
    "CategoryMetrics",
    "EscalateAs",
    "EvalReport",
    "FloatArray",
    "REPORT_SCHEMA_VERSION",
    "SAFE",
    "as_arrays",
    "average_precision",
    "evaluate",
    "format_report",
    "policy_decisions",
    "precision_recall_curve",
    "primary_categories",
    "roc_auc",
    "write_plots",
]

if TYPE_CHECKING:
    from stream_guard.policy.model import Policy

SAFE = "safe"
REPORT_SCHEMA_VERSION = 1
_DECISION_VALUES = ("allow", "escalate", "block", "review")

BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float64]
EscalateAs = Literal["unsafe", "safe"]


@dataclass(frozen=True)
class BinaryMetrics:
    """Safe vs unsafe: an upload is unsafe if it has any label, predicted unsafe if any flag."""

    tp: int
    fp: int
    fn: int
    tn: int
    accuracy: float
    tpr: float | None
    fpr: float | None
    precision: float | None
    f1: float | None

    @property
    def recall(self) -> float | None:
        return self.tpr


@dataclass(frozen=True)
class CategoryMetrics:
    """One category as the positive class, every other upload (safe or not) as negative."""

    code: str
    support: int
    tp: int
    fp: int
    fn: int
    tn: int
    tpr: float | None
    fpr: float | None
    precision: float | None
    f1: float | None
    auprc: float | None
    roc_auc: float | None
    # uploads escalated (none of their categories blocks) with this category in its band
    escalation_rate: float | None

    @property
    def recall(self) -> float | None:
        return self.tpr


@dataclass(frozen=True)
class EvalReport:
    codes: tuple[str, ...]
    n: int
    n_safe: int
    multiclass_accuracy: float
    top1_accuracy: float | None
    n_single_label: int
    binary: BinaryMetrics
    categories: tuple[CategoryMetrics, ...]
    macro_f1: float | None
    micro_f1: float | None
    mean_auprc: float | None
    confusion_labels: tuple[str, ...]
    confusion_matrix: tuple[tuple[int, ...], ...]
    escalation_rate: float | None
    decision_rates: Mapping[str, float] | None
    escalate_as: EscalateAs | None

    def category(self, code: str) -> CategoryMetrics:
        for c in self.categories:
            if c.code == code:
                return c
        raise KeyError(code)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with a fixed key order (consumers and diffs rely on it)."""
        return {
            "schema_version": REPORT_SCHEMA_VERSION,
            "n": self.n,
            "n_safe": self.n_safe,
            "codes": list(self.codes),
            "multiclass_accuracy": self.multiclass_accuracy,
            "top1_accuracy": self.top1_accuracy,
            "n_single_label": self.n_single_label,
            "binary": {
                "accuracy": self.binary.accuracy,
                "tpr": self.binary.tpr,
                "fpr": self.binary.fpr,
                "precision": self.binary.precision,
                "f1": self.binary.f1,
                "tp": self.binary.tp,
                "fp": self.binary.fp,
                "fn": self.binary.fn,
                "tn": self.binary.tn,
            },
            "macro_f1": self.macro_f1,
            "micro_f1": self.micro_f1,
            "mean_auprc": self.mean_auprc,
            "escalation_rate": self.escalation_rate,
            "decision_rates": dict(self.decision_rates) if self.decision_rates else None,
            "escalate_as": self.escalate_as,
            "categories": {
                c.code: {
                    "support": c.support,
                    "tpr": c.tpr,
                    "fpr": c.fpr,
                    "precision": c.precision,
                    "f1": c.f1,
                    "auprc": c.auprc,
                    "roc_auc": c.roc_auc,
                    "escalation_rate": c.escalation_rate,
                    "tp": c.tp,
                    "fp": c.fp,
                    "fn": c.fn,
                    "tn": c.tn,
                }
                for c in self.categories
            },
            "confusion_matrix": {
                "labels": list(self.confusion_labels),
                "rows_true_cols_predicted": [list(r) for r in self.confusion_matrix],
            },
        }

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def evaluate(
    codes: Sequence[str],
    labels: npt.ArrayLike,
    scores: npt.ArrayLike,
    decisions: npt.ArrayLike,
    *,
    escalate_as: EscalateAs = "unsafe",
) -> EvalReport:
    """Compute every metric of the report; see the module docstring for the inputs."""
    codes = tuple(codes)
    y, s = as_arrays(codes, labels, scores)
    flags, dec = _flags(decisions, y.shape, escalate_as)
    n, n_cat = y.shape

    unsafe_true, unsafe_pred = y.any(axis=1), flags.any(axis=1)
    binary = _binary(unsafe_true, unsafe_pred)

    single = y.sum(axis=1) == 1
    top1 = (
        _mean(np.argmax(s[single], axis=1) == np.argmax(y[single], axis=1))
        if single.any()
        else None
    )

    escalated_cells = None
    escalated_rows = None
    if dec is not None:
        # an upload escalates when no category blocks and one escalates (Policy.decide)
        escalated_cells = np.isin(dec, ("escalate", "review"))
        escalated_rows = ~np.any(dec == "block", axis=1) & escalated_cells.any(axis=1)
        escalated_cells &= escalated_rows[:, None]
    categories = []
    for j, code in enumerate(codes):
        yj, fj = y[:, j], flags[:, j]
        tp, fp = int(np.sum(yj & fj)), int(np.sum(~yj & fj))
        fn, tn = int(np.sum(yj & ~fj)), int(np.sum(~yj & ~fj))
        categories.append(
            CategoryMetrics(
                code=code,
                support=tp + fn,
                tp=tp,
                fp=fp,
                fn=fn,
                tn=tn,
                tpr=_ratio(tp, tp + fn),
                fpr=_ratio(fp, fp + tn),
                precision=_ratio(tp, tp + fp),
                f1=_f1(tp, fp, fn),
                auprc=average_precision(yj, s[:, j]),
                roc_auc=roc_auc(yj, s[:, j]),
                escalation_rate=(
                    _mean(escalated_cells[:, j]) if escalated_cells is not None else None
                ),
            )
        )

    f1s = [c.f1 for c in categories if c.f1 is not None]
    aps = [c.auprc for c in categories if c.auprc is not None]
    tp_all = sum(c.tp for c in categories)
    fp_all = sum(c.fp for c in categories)
    fn_all = sum(c.fn for c in categories)

    true_idx, pred_idx = primary_categories(y, flags, s)
    matrix = np.zeros((n_cat + 1, n_cat + 1), dtype=np.int64)
    np.add.at(matrix, (true_idx, pred_idx), 1)

    escalation_rate = None
    decision_rates = None
    if dec is not None and escalated_rows is not None:
        blocked = np.any(dec == "block", axis=1)
        escalation_rate = _mean(escalated_rows)
        decision_rates = {
            "allow": _mean(~blocked & ~escalated_rows),
            "escalate": escalation_rate,
            "block": _mean(blocked),
        }

    return EvalReport(
        codes=codes,
        n=n,
        n_safe=int(np.sum(~unsafe_true)),
        multiclass_accuracy=_mean(np.all(flags == y, axis=1)),
        top1_accuracy=top1,
        n_single_label=int(single.sum()),
        binary=binary,
        categories=tuple(categories),
        macro_f1=float(np.mean(f1s)) if f1s else None,
        micro_f1=_f1(tp_all, fp_all, fn_all),
        mean_auprc=float(np.mean(aps)) if aps else None,
        confusion_labels=(SAFE, *codes),
        confusion_matrix=tuple(tuple(int(v) for v in row) for row in matrix),
        escalation_rate=escalation_rate,
        decision_rates=decision_rates,
        escalate_as=escalate_as if dec is not None else None,
    )


def policy_decisions(policy: Policy, codes: Sequence[str], scores: npt.ArrayLike) -> np.ndarray:
    """[n, C] decision values (str) from ``Policy.decide``: the exact rule production applies."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] != len(codes):
        raise ValueError(f"scores must be [n, {len(codes)}], got {s.shape}")
    out = np.empty(s.shape, dtype="<U8")
    for i, row in enumerate(s):
        _, per_category = policy.decide(dict(zip(codes, row.tolist(), strict=True)))
        by_code = {c.code: str(c.decision) for c in per_category}
        out[i] = [by_code[c] for c in codes]
    return out


def primary_categories(
    labels: npt.ArrayLike, flags: npt.ArrayLike, scores: npt.ArrayLike
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Indices into ``("safe", *codes)`` of each upload's true and predicted primary category.

    Predicted: the flagged category with the highest score, or safe when nothing is flagged.
    True: safe when unlabelled; for several labels, the predicted one when it is among them
    (a correct pick of any true label sits on the diagonal), else the first label in code order.
    """
    y = np.asarray(labels, dtype=bool)
    f = np.asarray(flags, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    rows = np.arange(y.shape[0])
    pred = np.where(f.any(axis=1), np.argmax(np.where(f, s, -np.inf), axis=1) + 1, 0)
    hit = (pred > 0) & y[rows, np.maximum(pred - 1, 0)]
    first_true = np.argmax(y, axis=1) + 1
    true = np.where(~y.any(axis=1), 0, np.where(hit, pred, first_true))
    return true.astype(np.int64), pred.astype(np.int64)


def precision_recall_curve(
    y_true: npt.ArrayLike, y_score: npt.ArrayLike
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """(precision, recall, thresholds) in scikit-learn's layout: thresholds ascending, and a
    final (precision 1, recall 0) point. Needs at least one positive."""
    y = np.asarray(y_true, dtype=bool).ravel()
    s = np.asarray(y_score, dtype=np.float64).ravel()
    if y.size != s.size or y.size == 0:
        raise ValueError("y_true and y_score must be non-empty and the same length")
    order = np.argsort(s, kind="mergesort")[::-1]
    s, y = s[order], y[order]
    # the last index of each run of equal scores: one curve point per distinct threshold
    last = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]
    tps = np.cumsum(y)[last].astype(np.float64)
    fps = (last + 1) - tps
    if tps[-1] == 0:
        raise ValueError("precision-recall curve needs at least one positive")
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], s[last][::-1]


def average_precision(y_true: npt.ArrayLike, y_score: npt.ArrayLike) -> float | None:
    """AP = sum over thresholds of (R_k - R_{k-1}) * P_k, as sklearn's average_precision_score
    (no interpolation). ``None`` without positives."""
    if not np.any(np.asarray(y_true, dtype=bool)):
        return None
    precision, recall, _ = precision_recall_curve(y_true, y_score)
    return float(-np.sum(np.diff(recall) * precision[:-1]))


def roc_auc(y_true: npt.ArrayLike, y_score: npt.ArrayLike) -> float | None:
    """Area under the ROC curve (Mann-Whitney U, ties count one half). ``None`` if one class."""
    y = np.asarray(y_true, dtype=bool).ravel()
    s = np.asarray(y_score, dtype=np.float64).ravel()
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0
    ranks = average_rank[inverse]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def format_report(report: EvalReport) -> str:
    """A compact text table for a terminal."""
    b = report.binary
    lines = [
        f"uploads {report.n} (safe {report.n_safe}), categories {len(report.codes)}",
        f"multi-class accuracy {_fmt(report.multiclass_accuracy)}   "
        f"top-1 accuracy {_fmt(report.top1_accuracy)} (single-label n={report.n_single_label})",
        f"binary: accuracy {_fmt(b.accuracy)}  TPR {_fmt(b.tpr)}  FPR {_fmt(b.fpr)}  "
        f"precision {_fmt(b.precision)}  F1 {_fmt(b.f1)}  "
        f"(TP {b.tp} FP {b.fp} FN {b.fn} TN {b.tn})",
        f"macro F1 {_fmt(report.macro_f1)}  micro F1 {_fmt(report.micro_f1)}  "
        f"mean AUPRC {_fmt(report.mean_auprc)}",
    ]
    if report.decision_rates is not None:
        r = report.decision_rates
        lines.append(
            f"decisions: allow {_fmt(r['allow'])}  escalate {_fmt(r['escalate'])}  "
            f"block {_fmt(r['block'])}  (escalated counted as {report.escalate_as})"
        )
    width = max(8, *(len(c) for c in report.confusion_labels))
    head = ["support", "TP", "FP", "FN", "TN", "TPR", "FPR", "prec", "F1", "AUPRC", "ROC-AUC"]
    if report.escalation_rate is not None:
        head.append("escal")
    lines.append("")
    lines.append(f"{'category':<{width}} " + " ".join(f"{h:>7}" for h in head))
    for c in report.categories:
        cells = [str(c.support), str(c.tp), str(c.fp), str(c.fn), str(c.tn)]
        cells += [_fmt(v) for v in (c.tpr, c.fpr, c.precision, c.f1, c.auprc, c.roc_auc)]
        if report.escalation_rate is not None:
            cells.append(_fmt(c.escalation_rate))
        lines.append(f"{c.code:<{width}} " + " ".join(f"{v:>7}" for v in cells))
    lines.append("")
    lines.append("confusion matrix (rows: true primary, columns: predicted primary)")
    cw = max(6, *(len(c) for c in report.confusion_labels))
    lines.append(" " * width + " " + " ".join(f"{c:>{cw}}" for c in report.confusion_labels))
    for label, row in zip(report.confusion_labels, report.confusion_matrix, strict=True):
        lines.append(f"{label:<{width}} " + " ".join(f"{v:>{cw}}" for v in row))
    return "\n".join(lines)


def write_plots(
    report: EvalReport,
    scores: npt.ArrayLike,
    labels: npt.ArrayLike,
    out_dir: str | Path,
    *,
    thresholds: Mapping[str, tuple[float, float]] | None = None,
) -> dict[str, Path]:
    """Write ``pr_curves.png`` (one curve per category) and ``score_histograms.png`` (positives
    vs negatives, one panel per category; ``thresholds`` maps a code to (allow, block) lines).

    Uses matplotlib's object API on an Agg canvas: no pyplot, no global backend switch, so it is
    safe inside a worker or a test run. Returns the written paths by kind.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    y, s = as_arrays(report.codes, labels, scores)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"pr_curves": out / "pr_curves.png", "score_histograms": out / "score_histograms.png"}

    fig = Figure(figsize=(7.0, 5.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for j, code in enumerate(report.codes):
        if not y[:, j].any():
            ax.plot([], [], label=f"{code} (no positives)")
            continue
        precision, recall, _ = precision_recall_curve(y[:, j], s[:, j])
        ap = report.categories[j].auprc
        ax.step(recall, precision, where="post", label=f"{code} (AP {_fmt(ap)})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.05)
    ax.set_title(f"Precision-recall per category (n={report.n})")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", fontsize="small")
    fig.savefig(paths["pr_curves"], format="png")

    n_cat = len(report.codes)
    ncols = min(3, n_cat)
    nrows = math.ceil(n_cat / ncols)
    fig = Figure(figsize=(4.0 * ncols, 3.0 * nrows), dpi=100)
    FigureCanvasAgg(fig)
    lo, hi = float(min(0.0, s.min())), float(max(1.0, s.max()))
    bins = np.linspace(lo, hi, 26).tolist()
    for j, code in enumerate(report.codes):
        ax = fig.add_subplot(nrows, ncols, j + 1)
        pos, neg = s[y[:, j], j], s[~y[:, j], j]
        if neg.size:
            ax.hist(neg, bins=bins, density=True, alpha=0.55, label=f"negatives ({neg.size})")
        if pos.size:
            ax.hist(pos, bins=bins, density=True, alpha=0.55, label=f"positives ({pos.size})")
        if thresholds and code in thresholds:
            allow, block = thresholds[code]
            ax.axvline(allow, color="tab:green", linestyle="--", label=f"allow {allow:g}")
            ax.axvline(block, color="tab:red", linestyle="--", label=f"block {block:g}")
        ax.set_title(code)
        ax.set_xlabel("score")
        ax.set_ylabel("density")
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(paths["score_histograms"], format="png")
    return paths


def as_arrays(
    codes: Sequence[str], labels: npt.ArrayLike, scores: npt.ArrayLike
) -> tuple[BoolArray, FloatArray]:
    """Validate and convert (labels [n, C] bool or 0/1, scores [n, C] finite float)."""
    if not codes:
        raise ValueError("need at least one category code")
    if len(set(codes)) != len(codes):
        raise ValueError(f"duplicate category codes: {list(codes)}")
    if SAFE in codes:
        raise ValueError(f"{SAFE!r} is the name of the no-category class, not a category code")
    raw = np.asarray(labels)
    if raw.dtype != bool:
        if not np.isin(raw, (0, 1)).all():
            raise ValueError("labels must be boolean (or 0/1)")
        raw = raw.astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    shape = (raw.shape[0] if raw.ndim else 0, len(codes))
    if raw.ndim != 2 or raw.shape != shape or raw.shape[0] == 0:
        raise ValueError(f"labels must be [n>0, {len(codes)}], got {raw.shape}")
    if s.shape != raw.shape:
        raise ValueError(f"scores must have the labels' shape {raw.shape}, got {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    return raw, s


def _flags(
    decisions: npt.ArrayLike, shape: tuple[int, ...], escalate_as: EscalateAs
) -> tuple[BoolArray, np.ndarray | None]:
    if escalate_as not in ("unsafe", "safe"):
        raise ValueError(f"escalate_as must be 'unsafe' or 'safe', got {escalate_as!r}")
    arr = np.asarray(decisions)
    if arr.shape != shape:
        raise ValueError(f"decisions must have the labels' shape {shape}, got {arr.shape}")
    if arr.dtype == bool:
        return arr, None
    if arr.dtype.kind in "iu":
        if not np.isin(arr, (0, 1)).all():
            raise ValueError("integer decisions must be 0/1 flags")
        return arr.astype(bool), None
    # str() of a Decision (a StrEnum) is its value
    dec = np.char.lower(arr.astype(str))
    unknown = sorted(set(np.unique(dec)) - set(_DECISION_VALUES))
    if unknown:
        raise ValueError(f"unknown decisions {unknown}; expected {list(_DECISION_VALUES)}")
    flagged = ("block", "escalate", "review") if escalate_as == "unsafe" else ("block",)
    return np.isin(dec, flagged), dec


def _binary(y: BoolArray, p: BoolArray) -> BinaryMetrics:
    tp, fp = int(np.sum(y & p)), int(np.sum(~y & p))
    fn, tn = int(np.sum(y & ~p)), int(np.sum(~y & ~p))
    return BinaryMetrics(
        tp=tp,
        fp=fp,
        fn=fn,
        tn=tn,
        accuracy=(tp + tn) / y.size,
        tpr=_ratio(tp, tp + fn),
        fpr=_ratio(fp, fp + tn),
        precision=_ratio(tp, tp + fp),
        f1=_f1(tp, fp, fn),
    )


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def _f1(tp: int, fp: int, fn: int) -> float | None:
    den = 2 * tp + fp + fn
    return 2 * tp / den if den else None


def _mean(mask: BoolArray) -> float:
    return float(np.mean(mask))


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"
